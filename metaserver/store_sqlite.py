"""The embedded engine: one SQLite database file, the default for one metaserver
(store.py is the seam it implements). The schema is metaserver/schema.sql.

Concurrency: the core runs on the RPC server's event-loop thread (batches from clients'
streams) and on worker threads (unary calls, the sweep). There is one connection and one
lock; a transaction holds the lock from BEGIN IMMEDIATE to COMMIT, so operations are
serialized and each is atomic (and nothing is ever retried).

Batches: `batch()` opens one transaction for many operations (a client's stream sends
what it has queued together). Inside it, each operation's own `transaction()` is a
savepoint, so an operation that fails undoes only itself; the batch commits once.

Durability: the database is in WAL mode with synchronous=NORMAL: a commit is in the WAL
(it survives a crash of this process) but not fsynced. An operation that promises
durability asks for it with `transaction(durable=True)` or `make_durable()`: outside a
batch the WAL is fsynced before it returns; inside one, the batch records the wish and
its caller runs `sync()` before that operation's reply leaves. Concurrent syncs share one
fsync (group commit), and the server syncs every second for everything else.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .store import LABEL_INDEX, RECOUNT_USAGE, SCHEMA_VERSION, UNLINKED_INDEX, Batch, Store, Tx

#: SQL that brings a database of version k to k + 1 (schema.sql is always the newest).
MIGRATIONS = {
    1: """
        ALTER TABLE servers ADD COLUMN report_wanted_ns INTEGER;
        ALTER TABLE replicas ADD COLUMN created_ns INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX pending_by_session ON pending(session_id);
        CREATE TABLE replication (
            block_id INTEGER NOT NULL, server_id INTEGER NOT NULL REFERENCES servers(server_id),
            created_ns INTEGER NOT NULL, sent_ns INTEGER, PRIMARY KEY (block_id, server_id));
        CREATE INDEX replication_by_server ON replication(server_id);
        CREATE TABLE reported (
            server_id INTEGER NOT NULL REFERENCES servers(server_id), block_id INTEGER NOT NULL,
            PRIMARY KEY (server_id, block_id));
    """,
    2: """
        ALTER TABLE inodes ADD COLUMN xattrs INTEGER NOT NULL DEFAULT 0;
        UPDATE inodes SET xattrs = (SELECT COUNT(*) FROM xattrs x WHERE x.ino = inodes.ino);
    """,
    3: """
        ALTER TABLE inodes ADD COLUMN inline_max INTEGER NOT NULL DEFAULT 65536;
        CREATE TABLE inline_data (
            ino INTEGER PRIMARY KEY REFERENCES inodes(ino) ON DELETE CASCADE,
            data BLOB NOT NULL, crc32c INTEGER NOT NULL);
        CREATE INDEX inodes_by_parent ON inodes(parent) WHERE parent IS NOT NULL;
        CREATE INDEX dentries_by_parent ON dentries(parent);
    """,
    4: """
        ALTER TABLE servers ADD COLUMN identity TEXT;
        ALTER TABLE sessions ADD COLUMN owner TEXT;
        CREATE TABLE verify (
            server_id INTEGER NOT NULL REFERENCES servers(server_id), block_id INTEGER NOT NULL,
            sent_ns INTEGER, PRIMARY KEY (server_id, block_id));
    """,
    5: """
        ALTER TABLE opens ADD COLUMN writable INTEGER NOT NULL DEFAULT 0;
        UPDATE opens SET writable = 1;
        ALTER TABLE blocks ADD COLUMN digest BLOB;
    """,
    6: """
        CREATE TABLE locks (
            ino         INTEGER NOT NULL,
            session_id  INTEGER NOT NULL REFERENCES sessions(session_id),
            owner       INTEGER NOT NULL,  -- lock owner within the session (signed 64-bit)
            kind        INTEGER NOT NULL,  -- 0: a record lock (fcntl, OFD), 1: a flock lock
            exclusive   INTEGER NOT NULL,  -- 1: F_WRLCK / LOCK_EX, 0: F_RDLCK / LOCK_SH
            start       INTEGER NOT NULL,  -- first byte
            end_        INTEGER NOT NULL,  -- last byte, inclusive (2^63-1: to the end of the file)
            pid         INTEGER NOT NULL   -- the locking process, as F_GETLK reports it
        );
        CREATE INDEX locks_by_ino ON locks(ino);
        CREATE INDEX locks_by_session ON locks(session_id);
    """,
    7: """
        ALTER TABLE blocks ADD COLUMN stored INTEGER;
    """,
    8: """
        CREATE TABLE requests (
            rid         INTEGER PRIMARY KEY,  -- the client's request id (random, 63 bits)
            reply       BLOB NOT NULL,        -- the reply frame it got (codec.encode_reply)
            created_ns  INTEGER NOT NULL      -- when; the sweep forgets it after REQUEST_RECORD_TTL_S
        );
        CREATE INDEX requests_by_age ON requests(created_ns);
    """,
    9: """
        CREATE TABLE requests_appended (
            seq         INTEGER PRIMARY KEY,
            rid         INTEGER NOT NULL UNIQUE,
            reply       BLOB NOT NULL,
            created_ns  INTEGER NOT NULL
        );
        INSERT INTO requests_appended (rid, reply, created_ns)
            SELECT rid, reply, created_ns FROM requests ORDER BY created_ns;
        DROP TABLE requests;
        ALTER TABLE requests_appended RENAME TO requests;
        CREATE INDEX requests_by_age ON requests(created_ns);
    """,
    10: f"""
        ALTER TABLE inodes ADD COLUMN used_files INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE inodes ADD COLUMN used_bytes INTEGER NOT NULL DEFAULT 0;
        {RECOUNT_USAGE};
    """,
    11: f"{LABEL_INDEX};",
    12: f"{UNLINKED_INDEX};",
}
SCHEMA_PATH = Path(__file__).with_name("schema.sql")
#: How long to wait for another process holding the database (there should be none).
BUSY_TIMEOUT_MS = 5000
#: WAL pages after which a commit checkpoints the WAL into the database itself. SQLite's
#: default (1000) made every ~150th commit of a create pay a checkpoint, +130 us a create
#: on average (mknod 286 -> 158 us in-process); the server checkpoints every second instead
#: (`checkpoint`), and this only bounds the WAL if that falls behind.
WAL_AUTOCHECKPOINT_PAGES = 16384
#: SQLite's own page cache (SQLite's default is 2 MiB). Metadata pages that stay in the
#: process do not depend on the kernel's page cache: like MooseFS's master, which keeps
#: all metadata in memory, a metaserver answers for its recently used inodes without disk
#: reads.
PAGE_CACHE_KIB = 64 * 1024
#: The database file read through a memory map (SQLite clamps it to its build's limit, just
#: under 2 GiB for Debian 12's): pages beyond SQLite's own cache come from the kernel's page
#: cache without a read(2) and a copy each. A 150 KiB inline sample spans ~38 overflow
#: pages; an epoch of 3,000 of them read by 8 processes (2026-12-05, two alternations): the
#: metaserver 0.57-0.61 -> 0.44-0.50 ms of CPU a sample; with samples in blocks, where the
#: metadata fits the cache, no change. The price: an I/O error on a mapped page is SIGBUS
#: (the metaserver dies, clients retry on its restart) where a read would have been EIO.
MMAP_BYTES = 2 * 1024 * 1024 * 1024


class SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def one(self, sql: str, args: Sequence[Any] = ()) -> Optional[sqlite3.Row]:
        return self._conn.execute(sql, args).fetchone()

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, args).fetchall()

    def scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        row = self._conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, args).rowcount

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def next_ids(self, n: int) -> int:
        first = self.scalar("SELECT value FROM counters WHERE name = 'next_block_id'")
        self.run("UPDATE counters SET value = value + ? WHERE name = 'next_block_id'", (n,))
        return int(first)


class SqliteStore(Store):
    engine = "sqlite"

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._batch: Optional[Batch] = None  # the open batch; set and read under _lock
        self._owner: Optional[int] = None  # the thread holding _lock in a transaction or batch
        self._wal_path = f"{path}-wal"
        # Group commit: commits are numbered; sync() fsyncs the WAL once for every commit
        # made before it started, so concurrent durable operations share one fsync.
        self._sync_lock = threading.Lock()
        self._commits = 0  # commits made (under _lock)
        self._synced = 0  # commits known to be on disk (under _sync_lock)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. The connection is shared
        # by the gRPC worker threads, always under self._lock.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"{path}: cannot switch to WAL mode (got {mode})")
            # NORMAL in WAL mode: a commit is written to the WAL (so it survives a crash of
            # this process) but not fsynced; sync() fsyncs the WAL for the operations that
            # promise durability, and the server calls it every second for the rest (the
            # way a journalling file system commits every few seconds). Checkpoints still
            # fsync the database before the WAL is reused.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            self._conn.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
            self._conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._init_schema(path)
        except BaseException:
            self._conn.close()
            raise

    def _init_schema(self, path: str) -> None:
        version = self.schema_version()
        if version == 0:
            script = SCHEMA_PATH.read_text()
            # executescript runs outside our transaction discipline; wrap it so a crash
            # half way leaves an empty database rather than half a schema.
            self._conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;"
            )
            return
        while version in MIGRATIONS and version < SCHEMA_VERSION:
            self._conn.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATIONS[version]}\nPRAGMA user_version={version + 1};\nCOMMIT;"
            )
            version += 1
        if version != SCHEMA_VERSION:
            raise RuntimeError(
                f"{path}: schema version {version}, this metaserver knows {SCHEMA_VERSION}"
            )

    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def in_transaction(self) -> bool:
        return self._owner == threading.get_ident()

    def _in_batch(self) -> Optional[Batch]:
        batch = self._batch
        # Only the thread that opened the batch holds the lock; any other waits for it.
        return batch if batch is not None and batch.thread == threading.get_ident() else None

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[Tx]:
        """Run the body as one transaction: committed if it returns, rolled back if it
        raises. durable=True: on disk (fsynced) when this returns, not only crash-safe;
        inside a batch, before the batch's caller replies (see the module docstring)."""
        batch = self._in_batch()
        if batch is not None:
            self._conn.execute("SAVEPOINT op")
            try:
                yield SqliteTx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK TO op")
                self._conn.execute("RELEASE op")
                raise
            self._conn.execute("RELEASE op")
            batch.durable = batch.durable or durable
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._owner = threading.get_ident()
            try:
                yield SqliteTx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            finally:
                self._owner = None
            self._commit()
        if durable:
            self.sync()

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """One transaction for the operations run in the body (on this thread), each of
        them a savepoint. Committed when the body returns; a commit that fails raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._batch = Batch()
            self._owner = threading.get_ident()
            try:
                yield self._batch
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            finally:
                self._batch = None
                self._owner = None
            self._commit()

    def _commit(self) -> None:
        try:
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._commits += 1

    def make_durable(self) -> None:
        """What has been committed becomes durable before the current operation answers."""
        batch = self._in_batch()
        if batch is not None:
            batch.durable = True
        else:
            self.sync()

    def sync(self) -> None:
        """Make every transaction committed so far durable: one fsync of the WAL, shared
        by all callers waiting at the same time."""
        target = self._commits
        with self._sync_lock:
            if self._synced >= target:
                return
            upto = self._commits
            try:
                fd = os.open(self._wal_path, os.O_RDONLY)
            except FileNotFoundError:  # no WAL: everything is in the database file
                os.sync()
            else:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._synced = upto

    def checkpoint(self) -> None:
        """Copy the WAL into the database, off the path of any operation. The WAL is fsynced
        first (synchronous=NORMAL does that before a checkpoint), so every commit made so
        far is durable afterwards too."""
        with self._lock:
            upto = self._commits
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        with self._sync_lock:
            self._synced = max(self._synced, upto)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
