"""The metadata engines the in-process core tests run on (metaserver/store.py): every test
that takes `open_meta_store` runs once on SQLite and once on PostgreSQL (a new database of
the session's private instance, tests/pg.py).

`open_meta_store()` opens the test's store, again at each call (a reopen sees what the
last one committed: a metaserver restart); `meta_engine` names the engine. A test module
imports both names (`from engines import meta_engine, open_meta_store`)."""

from __future__ import annotations

from typing import Callable

import pytest

from stripefs.metaserver.store import ENGINES, Store, open_store


@pytest.fixture(params=ENGINES)
def meta_engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def open_meta_store(meta_engine: str, tmp_path, request: pytest.FixtureRequest) -> Callable[[], Store]:
    if meta_engine == "sqlite":
        target = str(tmp_path / "meta.db")
    else:
        target = request.getfixturevalue("new_pg_dsn")()
    return lambda: open_store(meta_engine, target)


def engine_cluster(request: pytest.FixtureRequest, base, **kw):
    """A Cluster (tests/cluster.py) on the engine `request.param`: SQLite with its one
    metaserver, or PostgreSQL (a new database of the session's instance) with two."""
    from cluster import Cluster

    if request.param == "sqlite":
        return Cluster(base, **kw)
    postgres = request.getfixturevalue("postgres")
    return Cluster(base, meta_dsn=postgres.new_database(), metaservers=2, **kw)
