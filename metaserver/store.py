"""The metadata store seam: what the metaserver's core asks of a database, and the two
engines that answer it (store_sqlite.py: one embedded SQLite file, the default;
store_pg.py: PostgreSQL, shared by several metaservers). The core (base.py and the ops
files) reaches the database only through `Store.transaction()` / `Store.batch()` and the
`Tx` they yield; it writes its SQL once, in the subset both engines speak:

- `?` placeholders; integers, bytes (BLOB / bytea) and text; `ON CONFLICT ... DO NOTHING`
  and `ON CONFLICT (...) DO UPDATE SET col = excluded.col` (target columns qualified with
  the table's name on the right-hand side); `CASE` instead of two-argument MIN/MAX, and
  `CASE WHEN ... THEN 1 ELSE 0 END` instead of summing comparisons;
- new row ids through `Tx.insert(sql, args, id_column)` (RETURNING), block ids through
  `Tx.next_ids(n)` (a sequence: never reused, no shared row to contend on);
- a change other metaservers must hear of (a file's locks) through `Tx.notify`.

A third engine is one module implementing `Store` and `Tx` plus its schema, and passes the
in-process core tests (tests/test_meta_core.py and the repair, fsck and lock tests run on
every engine).

Concurrency: an operation is one transaction, serializable. SQLite gets there by running
one transaction at a time; PostgreSQL runs them concurrently at SERIALIZABLE and may
refuse one at any statement or at its commit (`Store.retry_delay`): the operation is then
run again from the start (core.py, `retrying`), so the POSIX checks written once in the
core (a rename's loop check, a create's EEXIST) hold across metaservers without a lock
order of their own.

Durability: `transaction(durable=True)` / `make_durable()` promise an operation is on
disk before its reply leaves; `sync()` is the barrier that keeps that promise for a batch.
Each engine says what a commit without it guarantees (store_sqlite.py, store_pg.py).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

#: Version of the schema, the same on every engine (each keeps its own migrations to it).
SCHEMA_VERSION = 13

#: Bytes of an attribute's value that the label index (xattrs_by_value) holds: a longer
#: value is compared in full after the index narrowed the rows (labels.py), and a 64 KiB
#: one still fits an index entry (PostgreSQL's are at most ~2.7 KB).
LABEL_INDEX_VALUE_BYTES = 256
#: The label index, as schema.sql and schema_pg.sql create it (tests/test_labels.py checks
#: they do) and as the migrations to schema 12 add it.
LABEL_INDEX = f"CREATE INDEX xattrs_by_value ON xattrs(name, substr(value, 1, {LABEL_INDEX_VALUE_BYTES}), ino)"
#: Unlinked inodes waiting for their purge (base.py `_purge_if_free`), by when they lost
#: their last link, as both schemas create it and the migrations to schema 13 add it.
UNLINKED_INDEX = "CREATE INDEX inodes_unlinked ON inodes(ctime_ns) WHERE nlink = 0"


class DutiesLost(Exception):
    """Another metaserver holds the background duties (`Store.check_duties`): the sweep
    that found out stops; its next beat says who holds them."""


def counted_usage(directory: str) -> tuple[str, str]:
    """SQL for what the usage counters (inodes.used_files, used_bytes) of the directory row
    named `directory` in the query should hold, counted from its entries, in SQL both
    engines speak: the migrations' recount and fsck's check use this one definition."""
    entries = (f" FROM dentries d JOIN inodes c ON c.ino = d.ino"
               f" WHERE d.parent = {directory}.ino AND (c.mode & 61440) != 16384)")
    return f"(SELECT COUNT(*){entries}", f"(SELECT COALESCE(SUM(c.size), 0){entries}"


#: Fills every directory's usage counters: the migration to schema 11 on each engine.
RECOUNT_USAGE = "UPDATE inodes SET used_files = {}, used_bytes = {} WHERE (mode & 61440) = 16384".format(
    *counted_usage("inodes"))
#: The engines, by the name `stripefs meta --engine` takes.
ENGINES = ("sqlite", "postgres")

#: A result row: columns by name (row["ino"]) and by position (row[0]).
Row = Any


class Tx:
    """One open transaction: the only way the core reads or writes the store."""

    def one(self, sql: str, args: Sequence[Any] = ()) -> Optional[Row]:
        raise NotImplementedError

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    def scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        row = self.one(sql, args)
        return None if row is None else row[0]

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Execute a write; the number of rows it changed."""
        raise NotImplementedError

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def insert(self, sql: str, args: Sequence[Any], id_column: str) -> int:
        """Run an INSERT of one row; the id the store gave it (`id_column`)."""
        return int(self.scalar(f"{sql} RETURNING {id_column}", args))

    def next_ids(self, n: int) -> int:
        """Reserve n consecutive block ids, never handed out before; the first."""
        raise NotImplementedError

    def notify(self, inos: list[int]) -> None:
        """The locks of these files changed: tell every metaserver on this store once the
        transaction commits (`Store.on_notify`)."""


class Batch:
    """A transaction holding many operations (see `Store.batch`)."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        #: the operation running now asked for durability (reset by the caller per operation)
        self.durable = False


class Store:
    """A metadata database. Thread-safe: any thread may run transactions."""

    #: the engine's name (ENGINES)
    engine = ""
    #: a transaction is cheap enough (no network round trip per statement) to run on the
    #: RPC server's event-loop thread rather than handing it to a worker
    runs_inline = True
    #: when the store last became reachable again after an outage (ns since the epoch; 0:
    #: never lost): nothing could be recorded before, heartbeats included
    reachable_since_ns = 0

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[Tx]:
        """Run the body as one transaction: committed if it returns, rolled back if it
        raises. Inside a batch (or another transaction of this thread), a savepoint of it.
        durable=True: on disk when this returns (inside a batch: before its caller replies)."""
        raise NotImplementedError
        yield

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """One transaction for the operations run in the body (on this thread), each of
        them a savepoint. Committed when the body returns; a commit that fails raises."""
        raise NotImplementedError
        yield

    def in_transaction(self) -> bool:
        """This thread has a transaction open (an operation inside it is part of it)."""
        raise NotImplementedError

    def retry_delay(self, exc: BaseException, attempt: int, elapsed_s: float) -> Optional[float]:
        """The transaction failed only because it met another (a serialization failure, a
        deadlock) or lost its connection: how long to pause before running the operation
        again (attempt: times it ran so far; elapsed_s: since its first run). None: the
        failure is the operation's own, or it was retried long enough."""
        return None

    def retried(self, op: Callable[[], Any]) -> Any:
        """Run `op` (one or more transactions of its own) until it succeeds or the failure
        is not one `retry_delay` pauses for; inside an open transaction it runs once, the
        transaction's owner retrying the whole."""
        if self.in_transaction():
            return op()
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return op()
            except Exception as exc:  # noqa: BLE001 - retry_delay decides what is retried
                attempt += 1
                pause = self.retry_delay(exc, attempt, time.monotonic() - start)
                if pause is None:
                    raise
            time.sleep(pause)

    def beat(self, name: str, address: str, lease_s: float) -> tuple[str, list[tuple[str, str]]]:
        """Metaserver `name` (at `address`) is alive and takes or renews the background
        duties if nobody else holds them. (who holds them, [(name, address) of the live
        metaservers]). An engine one metaserver owns: always that one."""
        return name, [(name, address)]

    def check_duties(self, tx: Tx, name: str) -> None:
        """First statement of a transaction of the background duties (the sweep's): raise
        DutiesLost if a metaserver other than `name` holds them now. A holder stopped past
        its lease (SIGSTOP, a stalled machine, a sweep retried longer than the lease) may
        resume mid-sweep after another took over; this is where it stops, instead of two
        sweeps refusing each other's serializable transactions until both give up. An
        engine one metaserver owns, or a store on which nobody beat yet: nobody else does."""

    def make_durable(self) -> None:
        """What has been committed becomes durable before the current operation answers."""

    def sync(self) -> None:
        """Make every transaction committed so far durable."""

    def checkpoint(self) -> None:
        """Periodic housekeeping off the path of any operation (the server's sweep thread)."""

    def schema_version(self) -> int:
        raise NotImplementedError

    def setting(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The value every metaserver on this store shares under `name`, made by the first
        to ask (engines several metaservers share; SQLite's one metaserver keeps its
        secrets in files of its own)."""
        raise NotImplementedError

    def on_notify(self, callback: Callable[[Optional[list[int]]], None]) -> None:
        """Call `callback(inos)` for every `Tx.notify` committed by any metaserver on this
        store (this one included); `callback(None)`: notes may have been missed (the
        channel was lost), every waiter should look again. An engine only one metaserver uses needs no channel:
        the core hears of its own changes directly."""

    def close(self) -> None:
        raise NotImplementedError


def open_store(engine: str, target: str) -> Store:
    """The store of `engine` at `target` (a file path for sqlite, a libpq DSN for postgres)."""
    if engine == "sqlite":
        from .store_sqlite import SqliteStore

        return SqliteStore(target)
    if engine == "postgres":
        from .store_pg import PgStore

        return PgStore(target)
    raise ValueError(f"unknown metadata engine {engine!r} (known: {', '.join(ENGINES)})")
