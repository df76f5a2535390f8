"""The private PostgreSQL of tests/pg.py (the `postgres` and `new_pg_dsn` fixtures) does
what the metadata tests rely on: each test's databases are its own, what is committed
survives an immediate stop (a crash, for the server), and nothing listens on TCP."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pg import Postgres, PostgresError


def test_new_databases_are_empty_and_apart(postgres: Postgres, new_pg_dsn):
    a, b = new_pg_dsn(), new_pg_dsn()
    assert conninfo_to_dict(a)["dbname"] != conninfo_to_dict(b)["dbname"]
    with psycopg.connect(a) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (postgres.role,)
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        # The metaserver makes its own schema: the role must be allowed to.
        conn.execute("CREATE TABLE t (k int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
    with psycopg.connect(b) as conn:
        assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)
        conn.execute("CREATE TABLE t (k int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'b')")
    with psycopg.connect(a) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [("a",)]
    # Not a superuser: what a metaserver can do is what the role may.
    with psycopg.connect(a) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("CREATE ROLE intruder")


def test_committed_rows_survive_an_immediate_restart(postgres: Postgres, new_pg_dsn):
    dsn = new_pg_dsn()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE t (k int PRIMARY KEY)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
    held = psycopg.connect(dsn, autocommit=True)
    log_size = postgres.log.stat().st_size
    before = postgres.pid
    assert before is not None
    try:
        postgres.restart("immediate")
        after = postgres.pid
        assert after is not None and after != before
        # The connection held across the restart is gone, as a metaserver's would be.
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    finally:
        held.close()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*), max(k) FROM t").fetchone() == (1000, 1000)
    # The server recovered from its WAL, as after a crash.
    with open(postgres.log, errors="replace") as log:
        log.seek(log_size)
        assert "automatic recovery in progress" in log.read()


def test_start_stop_and_init_again_change_nothing(postgres: Postgres, new_pg_dsn):
    # What scripts/up and scripts/down rely on when they run again.
    dsn = new_pg_dsn()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE t (k int)")
    pid = postgres.pid
    postgres.start()  # pg_instance_init and pg_instance_start, on a running instance
    assert postgres.pid == pid
    postgres.stop()
    assert postgres.pid is None
    postgres.stop()
    postgres.start()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('t')::text").fetchone() == ("t",)


def _tcp_listening_inodes() -> set[str]:
    """Socket inodes in LISTEN state (0A) in /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                inodes.add(fields[9])
    return inodes


def _socket_inodes_of(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def test_listens_on_no_tcp_port(postgres: Postgres):
    pid = postgres.pid
    assert pid is not None
    assert postgres.execute("SHOW listen_addresses") == [("",)]
    mine = _socket_inodes_of(pid)
    assert mine, "the postmaster holds no socket at all: is this its pid?"
    assert not mine & _tcp_listening_inodes(), "the postmaster listens on a TCP port"
    # Its one way in is the Unix socket in its own directory, which only root and postgres
    # may enter.
    sock_dir = postgres.base / "sock"
    assert (sock_dir / ".s.PGSQL.5432").is_socket()
    st = sock_dir.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o700, pwd.getpwnam("postgres").pw_uid)


def test_a_server_that_cannot_start_fails_with_its_log():
    pg = Postgres.temporary()
    try:
        pg.start()
        pg.stop()
        with open(pg.base / "data" / "postgresql.conf", "a") as conf:
            conf.write("shared_buffers = 'plenty'\n")
        with pytest.raises(PostgresError, match="(?s)invalid value.*plenty.*did not start"):
            pg.start()
        assert pg.pid is None
    finally:
        pg.close()
    assert not pg.base.exists()
