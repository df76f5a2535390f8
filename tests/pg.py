"""A private PostgreSQL for the tests of the metadata on PostgreSQL: one instance for a
test session, in a temporary directory, and a new empty database for each test that asks.

The instance is made, started and stopped by the pg_instance_* functions of
scripts/_common.sh, the ones scripts/up runs, so tests run the server as a local cluster
does: reached only through a Unix socket in a directory only root and postgres may enter,
no TCP port, `trust` on that socket.

A database per test rather than a schema per test (a search_path in the DSN), though a
schema costs less: on a 2-CPU VM, making, using and dropping a schema took 10 to 25 ms,
a database 70 to 300 ms to make (CREATE DATABASE copies template0's 7.5 MB of catalogs
through the WAL) and 25 ms to drop, the spread being other work on the machine. Only a
database keeps tests apart: LISTEN/NOTIFY channels and advisory locks, which
metaserver/store_pg.py uses, belong to a database, so two clusters in two schemas would
hear each other's notifications and wait for each other's locks.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMON_SH = REPO_ROOT / "scripts" / "_common.sh"

#: Longer than the shell functions' own limit (STRIPEFS_PG_TIMEOUT_S, 30 s) on a start or a
#: stop, so that they report a slow server with its log instead of being cut off.
script_timeout_s = 90.0
#: How long the postmaster may take to exit after SIGKILL (its children follow it).
kill_wait_s = 10.0


class PostgresError(AssertionError):
    """The private PostgreSQL could not be made, started or stopped."""


def _common(function: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `function args...` from scripts/_common.sh."""
    res = subprocess.run(
        ["bash", "-c", 'set -euo pipefail; source "$0"; "$@"', COMMON_SH, function, *args],
        capture_output=True, text=True, timeout=script_timeout_s, stdin=subprocess.DEVNULL,
    )
    if check and res.returncode != 0:
        # The functions show the end of the server's log on stderr when it fails.
        raise PostgresError(f"{function} {' '.join(args)} exited with {res.returncode}:\n{res.stderr}")
    return res


class Postgres:
    """The private PostgreSQL in `base`: made there by the first `start()`."""

    def __init__(self, base: Path, remove_on_close: bool = False) -> None:
        self.base = Path(base)
        self.remove_on_close = remove_on_close
        #: What the server and initdb wrote.
        self.log = self.base / "postgres.log"
        #: The `stripefs` database, as a metaserver of a local cluster reaches it.
        self.dsn = _common("pg_instance_dsn", os.fspath(self.base)).stdout.strip()
        #: The role that owns the databases tests get (and the `stripefs` one).
        self.role = conninfo_to_dict(self.dsn)["user"]
        #: The superuser, on the `postgres` database.
        self.superuser_dsn = make_conninfo(self.dsn, user="postgres", dbname="postgres")
        self._database_numbers = itertools.count(1)
        self._stop_at_exit = False

    @classmethod
    def temporary(cls) -> "Postgres":
        """An instance in a new directory in the system's temporary directory, removed by
        `close()`. Not in pytest's tmp_path: pytest takes the group and other bits off
        /tmp/pytest-of-root as every session starts, which empties the ACL mask that lets
        the postgres user through; a session starting on the same machine while initdb
        runs makes it fail."""
        return cls(Path(tempfile.mkdtemp(prefix="stripefs-pg-")), remove_on_close=True)

    def start(self) -> None:
        """Makes the instance if `base` has none and starts it unless it runs; returns once
        it accepts connections. Fails with the server's log."""
        _common("pg_instance_init", os.fspath(self.base))
        _common("pg_instance_start", os.fspath(self.base))
        if not self._stop_at_exit:
            # Last resort when a teardown was skipped (the test process was interrupted hard).
            atexit.register(self.close)
            self._stop_at_exit = True

    def stop(self, mode: str = "fast") -> None:
        """Stops the server if it runs: `fast` (roll back, checkpoint) or `immediate` (abort,
        as in a crash; the next start recovers from the WAL)."""
        _common("pg_instance_stop", os.fspath(self.base), mode)

    def restart(self, mode: str = "immediate") -> None:
        """Stops the server and starts it again: every client loses its connections (the
        metaservers must find a new one by themselves)."""
        self.stop(mode)
        self.start()

    @property
    def pid(self) -> Optional[int]:
        """The postmaster's pid while the server runs, else None."""
        res = _common("pg_instance_pid", os.fspath(self.base), check=False)
        return int(res.stdout) if res.returncode == 0 else None

    def execute(self, query: str | sql.Composable, params: Optional[Sequence[Any]] = None,
                dbname: str = "postgres") -> list[tuple]:
        """Runs one statement as the superuser on `dbname`, outside a transaction block
        (CREATE DATABASE needs that); returns its rows, if it has any."""
        with psycopg.connect(make_conninfo(self.superuser_dsn, dbname=dbname), autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def new_database(self) -> str:
        """Makes a new empty database owned by the `stripefs` role; returns its DSN (as
        that role)."""
        name = f"test_{next(self._database_numbers)}"
        self.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
            sql.Identifier(name), sql.Identifier(self.role)))
        return make_conninfo(self.dsn, dbname=name)

    def drop_database(self, dsn: str) -> None:
        """Drops the database of `dsn`, closing the connections still open to it."""
        name = conninfo_to_dict(dsn)["dbname"]
        self.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def close(self) -> None:
        """Stops the server, whatever state it is in: pg_ctl (fast, made immediate if slow),
        then SIGKILL to the postmaster's pid if it still runs. Removes `base` if it was
        made by `temporary()`."""
        pid = self.pid
        if pid is not None:
            try:
                self.stop("fast")
            except PostgresError:
                pass  # the pid is checked below
        if pid is not None and self.pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + kill_wait_s
            while _alive(pid):
                if time.monotonic() > deadline:
                    raise PostgresError(f"the postmaster ({pid}) outlived SIGKILL by {kill_wait_s}s")
                time.sleep(0.05)
        if self.remove_on_close:
            shutil.rmtree(self.base, ignore_errors=True)


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
