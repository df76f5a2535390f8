"""Fixtures for tests that run real stripefs processes, and the rule that a test fails
when a server or a mount logged a traceback during it.

- `cluster`: a fresh metaserver and three data servers for one test.
- `module_cluster`: the same, shared by the tests of one module that do not interfere.
- `mount`, `two_mounts`: mounted paths on `cluster`. Mount tests need root and /dev/fuse
  and are skipped otherwise; mark them `mount`.
- `mount_pair_dirs`: two mounts of `module_cluster` (shared by a module's tests), seen
  through a fresh directory per test.
- `engine_module_cluster`: `module_cluster` on each metadata engine (tests/engines.py).
- `postgres`: a private PostgreSQL (tests/pg.py) for the whole session, started on first
  use and removed at its end; `new_pg_dsn()`: the DSN of a new empty database on it,
  dropped after the test.
- `@pytest.mark.allow_tracebacks`: the test expects tracebacks in the logs (it kills
  processes, say); they do not fail it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import Cluster, Mount, new_log_text  # noqa: E402
from pg import Postgres  # noqa: E402
from pki import Pki  # noqa: E402
from engines import engine_cluster  # noqa: E402
from stripefs.metaserver.store import ENGINES  # noqa: E402

#: What a log must not contain after a test: an exception nobody expected.
TRACEBACK_MARK = "Traceback"

# Offsets up to which each harness log has been checked for tracebacks.
_checked: dict[Path, int] = {}


def mount_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "FUSE mount tests need root (allow_other, other uids)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_tracebacks: tracebacks in server or mount logs do not fail the test"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("mount") is not None:
        reason = mount_skip_reason()
        if reason:
            pytest.skip(reason)


def check_logs(allow: bool = False) -> None:
    """Fails if a harness log got a traceback since the last check."""
    found = {
        path: text for path, text in new_log_text(_checked).items() if TRACEBACK_MARK in text
    }
    if found and not allow:
        report = []
        for path, text in found.items():
            start = text.index(TRACEBACK_MARK)
            report.append(f"---- {path} ----\n{text[max(0, start - 500): start + 3000]}")
        pytest.fail("unexpected traceback in logs:\n" + "\n".join(report), pytrace=False)


@pytest.fixture(autouse=True)
def _no_tracebacks_in_logs(request: pytest.FixtureRequest):
    # Set up before, so torn down after, the function-scoped cluster: a traceback logged
    # while the cluster shuts down counts too.
    yield
    check_logs(allow=request.node.get_closest_marker("allow_tracebacks") is not None)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A test CA and its credentials, for a test that starts server processes itself."""
    return Pki(tmp_path / "credentials")


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path / "cluster", dataservers=3)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), dataservers=3)
    try:
        yield c
    finally:
        c.close()
        check_logs()


@pytest.fixture(scope="module", params=ENGINES)
def engine_module_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """`module_cluster` once per metadata engine: SQLite with its one metaserver, then
    PostgreSQL with two (mounts start at one or the other, tests/cluster.py)."""
    c = engine_cluster(request, tmp_path_factory.mktemp("cluster"), dataservers=3)
    try:
        yield c
    finally:
        c.close()
        check_logs()


@pytest.fixture(scope="session")
def postgres():
    # Never skipped: a machine without PostgreSQL fails here, with the reason (scripts/test
    # installs it).
    pg = Postgres.temporary()
    try:
        pg.start()
        yield pg
    finally:
        pg.close()


@pytest.fixture
def new_pg_dsn(postgres: Postgres):
    """A function returning the DSN of a new empty database at each call."""
    made: list[str] = []

    def new() -> str:
        made.append(postgres.new_database())
        return made[-1]

    yield new
    # A test may have left the server stopped; the next one finds it running again.
    postgres.start()
    for dsn in made:
        postgres.drop_database(dsn)


def _require_mount() -> None:
    reason = mount_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def mount(cluster: Cluster) -> Mount:
    _require_mount()
    return cluster.mount()


@pytest.fixture
def two_mounts(cluster: Cluster) -> tuple[Mount, Mount]:
    _require_mount()
    return cluster.mount(), cluster.mount()


@pytest.fixture(scope="module")
def _module_mount_pair(module_cluster: Cluster) -> tuple[Mount, Mount]:
    _require_mount()
    return module_cluster.mount(), module_cluster.mount()


@pytest.fixture
def mount_pair_dirs(_module_mount_pair, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """One directory per test, as seen through each of two mounts of one cluster."""
    a, b = _module_mount_pair
    os.mkdir(a / request.node.name)
    return a / request.node.name, b / request.node.name
