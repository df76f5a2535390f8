"""The PostgreSQL engine: one database shared by any number of metaservers (store.py is
the seam it implements; the schema is metaserver/schema_pg.sql).

Connections: a pool (psycopg_pool); a transaction takes one for its duration, and the
thread that runs it keeps it in `_local`, so that the operations of a batch (savepoints)
and an operation's helpers all use the same one.

Isolation: every transaction is SERIALIZABLE. The core's POSIX checks (a rename's loop
check walks the target's ancestors, a create looks for the name first) are reads followed
by writes; under SERIALIZABLE, PostgreSQL refuses one of two transactions whose reads and
writes could not have happened one after the other, so two metaservers running opposite
directory renames at once cannot both pass the loop check (the anomaly behind JuiceFS's
issue 4800, which locks rows instead). The refused transaction raises a serialization
failure (or, for two inserts of one key, a unique violation; or a deadlock) and the core
runs the operation again from the start (`retry_delay`; core.py's `retrying`).

Durability: commits are synchronous (PostgreSQL's default synchronous_commit=on): every
transaction is on disk when it returns, so `sync()` has nothing left to do, and a database
crash or an immediate shutdown loses nothing a client was told. Unlike SQLite's one
fsync a second, this costs a WAL flush per commit, which PostgreSQL shares among
concurrent commits (group commit).

Connection loss (the database restarted, a network cut): the operation fails with an
OperationalError, the broken connection leaves the pool, and the operation is retried on
a new one for up to RECONNECT_FOR_S. A commit whose answer was lost may have happened: a
`once` call's retry then finds its recorded reply (core.py); other calls are idempotent or
harmless to repeat (docs/metadata.md lists them).

Notifications: `Tx.notify` is a NOTIFY delivered at commit; each store LISTENs on its own
connection (a thread) and passes what it hears to `on_notify`'s callback.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, cast

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import ConnectionPool

from .store import LABEL_INDEX, RECOUNT_USAGE, SCHEMA_VERSION, UNLINKED_INDEX, Batch, DutiesLost, Store, Tx

log = logging.getLogger("stripefs.metaserver")

SCHEMA_PATH = Path(__file__).with_name("schema_pg.sql")
#: SQL that brings a database of version k to k + 1 (schema_pg.sql is always the newest).
MIGRATIONS: dict[int, str] = {
    # Schema 10 changed the layout of SQLite's `requests` (store_sqlite.py); a PostgreSQL
    # table is a heap in insertion order already, with its key in an index of its own.
    9: "SELECT 1",
    10: "ALTER TABLE inodes ADD COLUMN used_files BIGINT NOT NULL DEFAULT 0;"
        " ALTER TABLE inodes ADD COLUMN used_bytes BIGINT NOT NULL DEFAULT 0;"
        f" {RECOUNT_USAGE}",
    11: LABEL_INDEX,
    12: UNLINKED_INDEX,
}
#: Advisory lock key held while the schema is made or migrated (several metaservers may
#: start at once on an empty database).
SCHEMA_LOCK_KEY = 0x73747269  # "stri"
#: Connections a metaserver keeps to the database at most: its worker threads plus the
#: event loop's batches; more would only queue inside PostgreSQL.
POOL_MAX = 16
#: The NOTIFY channel of lock changes, and the largest payload sent in one (PostgreSQL's
#: limit is 8000 bytes).
LOCK_CHANNEL = "stripefs_locks"
NOTIFY_PAYLOAD_MAX = 7000
#: How often the listening thread looks up from its connection (to notice a close).
LISTEN_POLL_S = 0.2
#: Conflicts: an operation is run again for up to CONFLICT_RETRY_FOR_S, after a random
#: pause whose bound doubles from CONFLICT_PAUSE_S up to CONFLICT_PAUSE_MAX_S (two
#: operations that met once must not meet again in lockstep). Bounded by time, not by
#: tries: on a busy directory an operation may lose many times in a row (30 tries were
#: seen to run out in tests/test_meta_concurrency.py), and a client's call waits 30 s.
CONFLICT_RETRY_FOR_S = 15.0
CONFLICT_PAUSE_S = 0.0005
CONFLICT_PAUSE_MAX_S = 0.1
#: A lost connection is retried for this long (a database restart takes a few seconds;
#: a client's metadata call waits 30 s), every RECONNECT_PAUSE_S.
RECONNECT_FOR_S = 20.0
RECONNECT_PAUSE_S = 0.25
#: PostgreSQL's numeric type (SUM over bigint answers in it): read back as int.
_NUMERIC_OID = 1700


class PgRow:
    """A result row: columns by name and by position, as sqlite3.Row."""

    __slots__ = ("_values", "_index")

    def __init__(self, values: tuple, index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def keys(self) -> list[str]:
        return list(self._index)

    def __repr__(self) -> str:
        return f"PgRow({dict(zip(self._index, self._values))!r})"


_shapes: dict[tuple, tuple[dict[str, int], list[int]]] = {}


def _row_factory(cursor: psycopg.Cursor) -> Callable[[Sequence[Any]], PgRow]:
    # From the raw result, not cursor.description: that builds a Column object per column
    # of every statement (a tenth of a metadata operation's time, measured).
    res = cursor.pgresult
    if res is None or not res.nfields:
        return lambda values: PgRow(tuple(values), {})
    key = tuple((res.fname(i), res.ftype(i)) for i in range(res.nfields))
    shape = _shapes.get(key)
    if shape is None:
        index = {(name or b"").decode(): i for i, (name, _) in enumerate(key)}  # (never None here)
        shape = _shapes[key] = (index, [i for i, (_, oid) in enumerate(key) if oid == _NUMERIC_OID])
    index, numeric = shape
    if not numeric:
        return lambda values: PgRow(tuple(values), index)

    def make(values: Sequence[Any]) -> PgRow:
        row = list(values)
        for i in numeric:
            if isinstance(row[i], Decimal):
                row[i] = int(row[i])
        return PgRow(tuple(row), index)

    return make


_sql_cache: dict[str, str] = {}
_SQL_CACHE_MAX = 4096


def _translate(sql: str) -> str:
    """The core's portable SQL in psycopg's placeholder style (`?` -> `%s`, `%` -> `%%`)."""
    out = _sql_cache.get(sql)
    if out is None:
        out = sql.replace("%", "%%").replace("?", "%s")
        if len(_sql_cache) >= _SQL_CACHE_MAX:
            _sql_cache.clear()  # statements with literal id lists: not worth keeping
        _sql_cache[sql] = out
    return out


def _first(conn: psycopg.Connection, sql: str, args: Sequence[Any] = ()) -> Any:
    """The first column of a query's one row (a query that always has one)."""
    row = conn.execute(sql, args).fetchone()
    assert row is not None, sql
    return row[0]


class PgTx(Tx):
    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    # (The connections' row factory makes PgRows; psycopg's types say tuples.)
    def one(self, sql: str, args: Sequence[Any] = ()) -> Optional[PgRow]:
        return cast(Optional[PgRow], self._conn.execute(_translate(sql), args).fetchone())

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[PgRow]:
        return cast(list[PgRow], self._conn.execute(_translate(sql), args).fetchall())

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._conn.execute(_translate(sql), args).rowcount

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self._conn.cursor() as cur:
                cur.executemany(_translate(sql), rows)

    def next_ids(self, n: int) -> int:
        # One sequence call for n ids: setval is not transactional, so reserve with
        # nextval n times in one statement and check they are consecutive (they are
        # unless another session interleaves; then take a fresh run).
        while True:
            ids = [r[0] for r in self.all("SELECT nextval('block_ids') FROM generate_series(1, ?)", (n,))]
            if ids == list(range(ids[0], ids[0] + n)):
                return int(ids[0])

    def notify(self, inos: list[int]) -> None:
        text = ",".join(str(int(i)) for i in sorted(set(inos)))
        while text:
            if len(text) <= NOTIFY_PAYLOAD_MAX:
                part, text = text, ""
            else:
                cut = text.rindex(",", 0, NOTIFY_PAYLOAD_MAX)
                part, text = text[:cut], text[cut + 1:]
            self._conn.execute("SELECT pg_notify(%s, %s)", (LOCK_CHANNEL, part))


class PgStore(Store):
    engine = "postgres"
    runs_inline = False  # every statement is a round trip to the database

    def __init__(self, dsn: str, pool_max: int = POOL_MAX) -> None:
        self.dsn = dsn
        self._local = threading.local()
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_max, open=False, name="stripefs-meta",
            kwargs={"autocommit": True, "row_factory": _row_factory},
        )
        self._pool.open(wait=True, timeout=RECONNECT_FOR_S)
        self._listener: Optional[threading.Thread] = None
        self._outage = False  # a connection was lost and no transaction has committed since
        self._closing = threading.Event()
        try:
            self._init_schema()
        except BaseException:
            self._pool.close()
            raise

    # ------------------------------------------------------------------ schema

    def _init_schema(self) -> None:
        with self._pool.connection() as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                if _first(conn, "SELECT to_regclass('schema_version')") is None:
                    conn.execute(SCHEMA_PATH.read_text())
                    conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
                    return
                version = _first(conn, "SELECT version FROM schema_version")
                while version in MIGRATIONS and version < SCHEMA_VERSION:
                    conn.execute(MIGRATIONS[version])
                    version += 1
                    conn.execute("UPDATE schema_version SET version = %s", (version,))
                if version != SCHEMA_VERSION:
                    raise RuntimeError(f"database schema version {version}, this metaserver knows {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        with self.transaction() as tx:
            return int(tx.scalar("SELECT version FROM schema_version"))

    # ------------------------------------------------------------------ transactions

    def in_transaction(self) -> bool:
        return getattr(self._local, "conn", None) is not None

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[Tx]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield from self._savepoint(conn)
            return
        with self._open() as conn:
            yield PgTx(conn)

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        with self._open():
            yield Batch()

    @contextmanager
    def _open(self) -> Iterator[psycopg.Connection]:
        """A SERIALIZABLE transaction on a pooled connection, this thread's until it ends."""
        with self._pool.connection(timeout=RECONNECT_FOR_S) as conn:
            self._local.conn = conn
            try:
                conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
                try:
                    yield conn
                except BaseException:
                    _quietly(conn, "ROLLBACK")
                    raise
                conn.execute("COMMIT")
                if self._outage:
                    self._outage = False
                    self.reachable_since_ns = time.time_ns()
                    log.info("metadata database reachable again")
            finally:
                self._local.conn = None

    @staticmethod
    def _savepoint(conn: psycopg.Connection) -> Iterator[Tx]:
        conn.execute("SAVEPOINT op")
        try:
            yield PgTx(conn)
        except BaseException:
            # An operation that failed undoes only itself; after a conflict or a lost
            # connection the whole transaction goes (the caller retries it).
            _quietly(conn, "ROLLBACK TO SAVEPOINT op")
            _quietly(conn, "RELEASE SAVEPOINT op")
            raise
        conn.execute("RELEASE SAVEPOINT op")

    def retry_delay(self, exc: BaseException, attempt: int, elapsed_s: float) -> Optional[float]:
        if isinstance(exc, (pgerrors.SerializationFailure, pgerrors.DeadlockDetected, pgerrors.UniqueViolation)):
            if elapsed_s >= CONFLICT_RETRY_FOR_S:
                return None
            return random.uniform(0, min(CONFLICT_PAUSE_S * 2 ** min(attempt, 16), CONFLICT_PAUSE_MAX_S))
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) or _pool_timeout(exc):
            self._outage = True
            if elapsed_s >= RECONNECT_FOR_S:
                return None
            if attempt == 1:
                log.warning("metadata database unreachable (%s): retrying for up to %.0f s", exc, RECONNECT_FOR_S)
            return RECONNECT_PAUSE_S
        return None

    # ------------------------------------------------------------------ several metaservers

    def setting(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The value every metaserver shares under `name`, made by the first to ask.
        Metaservers starting together meet on the row: the loser of the serialization
        conflict runs again and reads the winner's value."""

        def make_or_read() -> bytes:
            with self._open() as conn:
                conn.execute("INSERT INTO settings (name, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                             (name, make()))
                return bytes(_first(conn, "SELECT value FROM settings WHERE name = %s", (name,)))

        return self.retried(make_or_read)

    def beat(self, name: str, address: str, lease_s: float) -> tuple[str, list[tuple[str, str]]]:
        """This metaserver is alive; it takes or renews the background duties if their
        lease has run out or is its own, by the database's clock (metaservers' clocks may
        disagree). Metaservers beating together meet on the duties row: retried."""
        return self.retried(lambda: self._beat(name, address, lease_s))

    def _beat(self, name: str, address: str, lease_s: float) -> tuple[str, list[tuple[str, str]]]:
        with self._open() as conn:
            conn.execute(
                "INSERT INTO metaservers (name, address, seen) VALUES (%s, %s, clock_timestamp())"
                " ON CONFLICT (name) DO UPDATE SET address = excluded.address, seen = excluded.seen",
                (name, address),
            )
            row = conn.execute(
                "INSERT INTO duties (id, holder, expires) VALUES (1, %s, clock_timestamp() + make_interval(secs => %s))"
                " ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, expires = excluded.expires"
                " WHERE duties.holder = excluded.holder OR duties.expires < clock_timestamp() RETURNING holder",
                (name, lease_s),
            ).fetchone()
            holder = row[0] if row is not None else _first(conn, "SELECT holder FROM duties")
            conn.execute("DELETE FROM metaservers WHERE seen < clock_timestamp() - make_interval(secs => %s)",
                         (max(lease_s * 10, 60.0),))
            alive = conn.execute(
                "SELECT name, address FROM metaservers WHERE seen >= clock_timestamp() - make_interval(secs => %s)"
                " ORDER BY name", (lease_s,)).fetchall()
        return holder, [(r[0], r[1]) for r in alive]

    def check_duties(self, tx: Tx, name: str) -> None:
        # A read, not a lock: a stopped holder in the middle of a transaction must not keep
        # the row from the next one's beat. SERIALIZABLE orders the rest: a sweep step that
        # read the row before another's beat took it, and meets that one's sweep on the rows
        # both change, is refused and run again, and then finds the new holder here.
        holder = tx.scalar("SELECT holder FROM duties WHERE id = 1")
        if holder is not None and holder != name:
            raise DutiesLost(holder)

    def on_notify(self, callback: Callable[[Optional[list[int]]], None]) -> None:
        self._listener = threading.Thread(target=self._listen, args=(callback,), name="pg-listen", daemon=True)
        self._listener.start()

    def _listen(self, callback: Callable[[Optional[list[int]]], None]) -> None:
        """LISTEN on a connection of its own; after losing it, reconnect and tell the
        callback that anything may have changed (None): what was sent meanwhile is lost."""
        while not self._closing.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {LOCK_CHANNEL}")
                    callback(None)
                    while not self._closing.is_set():
                        for note in conn.notifies(timeout=LISTEN_POLL_S):
                            callback([int(x) for x in note.payload.split(",") if x])
            except psycopg.Error as exc:
                if self._closing.is_set():
                    return
                log.warning("lock notifications: %s (reconnecting)", exc)
                self._closing.wait(RECONNECT_PAUSE_S)

    def close(self) -> None:
        self._closing.set()
        self._pool.close()
        if self._listener is not None:
            self._listener.join(timeout=5)


def _quietly(conn: psycopg.Connection, sql: str) -> None:
    """Run a rollback that may fail because the connection is gone (nothing to undo then)."""
    try:
        conn.execute(sql)
    except psycopg.Error:
        pass


def _pool_timeout(exc: BaseException) -> bool:
    from psycopg_pool import PoolTimeout

    return isinstance(exc, PoolTimeout)
