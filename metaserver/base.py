"""The state and the shared mechanisms of the metadata core: the store, the clock, inode
rows and their Attr, link counting and purging, garbage, block maps and inline block 0s,
truncation, the state of each data server (up, suspect, dead) and the count of replicas
on live ones. The operations themselves live in namespace.py, files.py and registry.py;
core.py puts them together as MetaCore.

Every helper here takes the open transaction `tx` and runs inside the caller's
operation, so an operation is still exactly one transaction.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import stat
import time
from typing import Any, Callable, Optional, Sequence

import crc32c

from stripefs.proto.auth import TOKEN_TTL_S, open_grant, read_token, write_token
from stripefs.proto.credentials import ADMIN, LOCAL, Caller
from stripefs.proto.errors import FsError
from stripefs.proto.messages import Attr, BlockRef
from stripefs.proto.types import (
    DEFAULT_BLOCK_SIZE_BYTES,
    DEFAULT_INLINE_MAX_BYTES,
    DEFAULT_REPLICAS,
    FILE_SIZE_MAX_BYTES,
    ROOT_INODE,
)

from . import acl
from .locktable import LockEvents
from .store import Row, Store, Tx, open_store

log = logging.getLogger("stripefs.metaserver")

NS_PER_S = 1_000_000_000
#: A file with blocks that lost its last link is purged no sooner than this after, even if
#: no open is recorded on it (`_purge_if_free`: unrecorded readers); `--unlinked-hold-s`.
UNLINKED_HOLD_S = 10.0
#: Unlinked files the sweep purges in one transaction.
PURGE_BATCH = 256
#: Size reported for a directory, as ext4 reports for a small one.
DIR_SIZE_BYTES = 4096
#: Total bytes of names and values one inode's extended attributes may take.
XATTR_TOTAL_MAX_BYTES = 1024 * 1024
#: setxattr(2) flags.
XATTR_CREATE = 1
XATTR_REPLACE = 2
#: A data server with less free space than this many blocks gets no new blocks.
NEAR_FULL_BLOCKS = 2

#: Data server states, from the age of the last heartbeat.
UP = "up"  # heard from recently: gets new blocks and replication tasks
SUSPECT = "suspect"  # missed heartbeats: no new blocks, but its replicas still count
DEAD = "dead"  # silent too long: its replicas do not count and are re-made elsewhere
_STATE_ORDER = {UP: 0, SUSPECT: 1, DEAD: 2}
_UP_RANK = _STATE_ORDER[UP]
#: How long the servers' states that order a block map's replicas are reused
#: (`_read_order`): they only put likely replicas first, and a state changes with seconds
#: of heartbeats, so a map may order by what was true this long ago.
READ_ORDER_REUSE_NS = 500_000_000

def acl_column(inodes: str) -> str:
    """The `acl` column of a row of the inodes table named `inodes` in a query: its access
    ACL comes with the row, for the permission checks made with it (perm.py); looked up
    only for inodes that have attributes at all."""
    return (f"CASE WHEN {inodes}.xattrs > 0 THEN (SELECT value FROM xattrs x WHERE x.ino = {inodes}.ino"
            f" AND x.name = CAST('{acl.ACCESS.decode()}' AS BLOB)) END AS acl")


_INODE_COLUMNS = (
    "ino, mode, uid, gid, rdev, nlink, size, atime_ns, mtime_ns, ctime_ns, "
    "block_size, replicas, generation, parent, target, xattrs, inline_max, " + acl_column("inodes")
)


def is_dir(row: Row) -> bool:
    return stat.S_ISDIR(row["mode"])


def is_reg(row: Row) -> bool:
    return stat.S_ISREG(row["mode"])


def usage_of(row: Row, sign: int = 1) -> tuple[int, int]:
    """What an entry naming inode `row` adds to its directory's usage counters (files,
    bytes), negated with sign=-1; a directory adds nothing (it has counters of its own)."""
    return (0, 0) if is_dir(row) else (sign, sign * row["size"])


def usage_sum(*parts: tuple[int, int]) -> tuple[int, int]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def id_list(ids: list[int]) -> str:
    """An SQL list literal of integer ids, for `x IN (...)`; ints only, never text."""
    return "(" + ",".join(str(int(i)) for i in ids) + ")" if ids else "(NULL)"


#: A block's R in SQL over `inodes i` (its file), with the cluster default as its one
#: parameter: want_replicas in SQL.
WANT_SQL = "CASE WHEN i.replicas = 0 THEN ? ELSE i.replicas END"


def copies_on_sql(server_ids: list[int]) -> str:
    """The number of copies of block `b.block_id` on the servers `server_ids`, in SQL."""
    return f"(SELECT COUNT(*) FROM replicas r WHERE r.block_id = b.block_id AND r.server_id IN {id_list(server_ids)})"


def want_replicas(replicas_column: int) -> int:
    """A file's replica count R from its inode column (0: the cluster default)."""
    return replicas_column or DEFAULT_REPLICAS


def attr_of(row: Row) -> Attr:
    return Attr(
        ino=row["ino"],
        mode=row["mode"],
        nlink=row["nlink"],
        uid=row["uid"],
        gid=row["gid"],
        rdev=row["rdev"],
        size=row["size"],
        atime_ns=row["atime_ns"],
        mtime_ns=row["mtime_ns"],
        ctime_ns=row["ctime_ns"],
        block_size=row["block_size"],
        replicas=row["replicas"],
        generation=row["generation"],
        xattrs=row["xattrs"],
        inline_max=row["inline_max"],
    )


def inline_limit(row: Row) -> int:
    """The most bytes block 0 of this file may hold inline: its inline_max, never more than
    a block (the inline bytes are block 0)."""
    return min(row["inline_max"], row["block_size"])


def retrying(op: Callable[..., Any]) -> Callable[..., Any]:
    """An operation of the core that its store may refuse for meeting another one running
    at the same time (PostgreSQL at SERIALIZABLE: store_pg.py) or for a lost connection:
    it is run again from the start, after the store's pause, until it succeeds or the
    store says stop. An operation called inside an open transaction (a batch's, another
    operation's) is part of that one, retried by its owner."""

    @functools.wraps(op)
    def run(self: "CoreBase", *args: Any, **kwargs: Any) -> Any:
        return self.store.retried(lambda: op(self, *args, **kwargs))

    return run


class CoreBase:
    def __init__(
        self,
        store: Store | str,
        token_key: bytes,
        *,
        clock: Callable[[], float] = time.time,
        server_suspect_after_s: float = 3.0,
        server_dead_after_s: float = 10.0,
        session_lease_s: float = 30.0,
        gc_grace_s: float = 30.0,
        unlinked_hold_s: float = UNLINKED_HOLD_S,
        pending_timeout_s: float = 600.0,
        reserve_bytes: int = 0,
        replication_per_heartbeat: int = 8,
        replication_timeout_s: float = 60.0,
        server_forget_after_s: float = 86400.0,
    ) -> None:
        self.token_key = token_key  # signs block write tokens (proto/auth.py)
        self.clock = clock
        self.server_suspect_after_s = min(server_suspect_after_s, server_dead_after_s)
        self.server_dead_after_s = server_dead_after_s
        self.session_lease_s = session_lease_s
        self.gc_grace_s = gc_grace_s
        self.unlinked_hold_s = unlinked_hold_s
        self.pending_timeout_s = pending_timeout_s
        self.reserve_bytes = reserve_bytes
        self.replication_per_heartbeat = replication_per_heartbeat
        self.replication_timeout_s = replication_timeout_s
        self.server_forget_after_s = max(server_forget_after_s, server_dead_after_s)
        #: each file's lock generation and the waiters for it (metaserver/locks.py)
        self.lock_events = LockEvents()
        #: this metaserver among those of its store (store.beat), and what it last heard:
        #: who holds the background duties, and every live metaserver as (name, address)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.duties = self.name
        self.metaservers: list[tuple[str, str]] = []
        # A server cannot be judged silent by a metaserver that was not listening: after a
        # restart, heartbeat ages count from our start (or from the end of the store's last
        # outage, when no heartbeat could be recorded: `listening_since_ns`), so nothing
        # looks dead (and nothing is re-replicated) before the data servers had their
        # chance to beat.
        self.started_ns = self.now_ns()
        #: (when, each server's rank in a block map's replica order): `_read_order`
        self._read_order_at: tuple[int, dict[int, int]] = (0, {})
        # A hint that re-replication planning may find work (see repair.py): set by
        # whatever can leave a block short of replicas, cleared by the planner. Only a
        # hint: the planner also runs every FULL_PLAN_INTERVAL_S, and after a restart.
        self.replan = True
        self.next_full_plan_ns = 0
        #: the metadata database (store.py); a path: an SQLite file
        self.store = open_store("sqlite", store) if isinstance(store, str) else store
        self.store.on_notify(self._lock_news)
        try:
            retrying(CoreBase._init_root)(self)
        except BaseException:
            self.store.close()
            raise

    def close(self) -> None:
        self.store.close()

    def now_ns(self) -> int:
        # time.time() as a float has only ~0.2 us resolution at today's epoch; with the
        # default clock, take the exact nanoseconds.
        if self.clock is time.time:
            return time.time_ns()
        return int(self.clock() * NS_PER_S)

    def _init_root(self) -> None:
        with self.store.transaction() as tx:
            if tx.scalar("SELECT 1 FROM inodes WHERE ino = ?", (ROOT_INODE,)):
                return
            now = self.now_ns()
            tx.run(
                "INSERT INTO inodes (ino, mode, uid, gid, nlink, size, atime_ns, mtime_ns,"
                " ctime_ns, block_size, replicas, parent, inline_max)"
                " VALUES (?, ?, 0, 0, 2, ?, ?, ?, ?, ?, 0, ?, ?)",
                (ROOT_INODE, stat.S_IFDIR | 0o755, DIR_SIZE_BYTES, now, now, now,
                 DEFAULT_BLOCK_SIZE_BYTES, ROOT_INODE, DEFAULT_INLINE_MAX_BYTES),
            )

    # ------------------------------------------------------------------ inode rows

    def _inode(self, tx: Tx, ino: int) -> Row:
        row = tx.one(f"SELECT {_INODE_COLUMNS} FROM inodes WHERE ino = ?", (ino,))
        if row is None:
            raise FsError(errno.ENOENT, f"inode {ino} does not exist")
        return row

    def _inode_rows(self, tx: Tx, where: str, args: Sequence[Any] = ()) -> list[Row]:
        """The rows of the inodes `where` selects (SQL over inodes' columns), as _inode's."""
        return tx.all(f"SELECT {_INODE_COLUMNS} FROM inodes WHERE {where}", args)

    def _dir(self, tx: Tx, ino: int, *, for_create: bool = False) -> Row:
        """A directory row; ENOTDIR if not one. for_create: ENOENT if it was removed."""
        row = self._inode(tx, ino)
        if not is_dir(row):
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        if for_create and row["nlink"] == 0:
            raise FsError(errno.ENOENT, f"directory {ino} was removed")
        return row

    def _attr(self, tx: Tx, ino: int) -> Attr:
        return attr_of(self._inode(tx, ino))

    def _child(self, tx: Tx, parent: int, name: bytes) -> Optional[int]:
        return tx.scalar("SELECT ino FROM dentries WHERE parent = ? AND name = ?", (parent, name))

    def _touch_dir(self, tx: Tx, ino: int, now: int, nlink_delta: int = 0,
                   usage: tuple[int, int] = (0, 0)) -> None:
        """An entry of directory `ino` was added, removed or renamed. The generation moves
        with every such change: a client holding the whole listing keeps answering
        negative lookups from it only while the generation says nobody else changed it.
        `usage`: what the change adds to its usage counters (usage_of), in the same row
        update."""
        tx.run(
            "UPDATE inodes SET mtime_ns = ?, ctime_ns = ?, nlink = nlink + ?, generation = generation + 1,"
            " used_files = used_files + ?, used_bytes = used_bytes + ? WHERE ino = ?",
            (now, now, nlink_delta, usage[0], usage[1], ino),
        )

    def _resized(self, tx: Tx, ino: int, old_size: int, new_size: int) -> None:
        """File `ino`'s size went from old_size to new_size: every directory holding a link
        to it counts the difference, once per link (an unlinked, still open file: none)."""
        if new_size != old_size:
            tx.run(
                "UPDATE inodes SET used_bytes = used_bytes + ?"
                " * (SELECT COUNT(*) FROM dentries d WHERE d.parent = inodes.ino AND d.ino = ?)"
                " WHERE ino IN (SELECT parent FROM dentries WHERE ino = ?)",
                (new_size - old_size, ino, ino),
            )

    def _is_open(self, tx: Tx, ino: int) -> bool:
        return bool(tx.scalar("SELECT 1 FROM opens WHERE ino = ? LIMIT 1", (ino,)))

    def _drop_link(self, tx: Tx, row: Row, now: int) -> None:
        """The inode lost one directory entry: count it, and purge it if nothing holds it."""
        # A removed directory has no links left at all: its own "." goes with its entry.
        nlink = 0 if is_dir(row) else max(row["nlink"] - 1, 0)
        tx.run("UPDATE inodes SET nlink = ?, ctime_ns = ? WHERE ino = ?", (nlink, now, row["ino"]))
        if nlink == 0:
            self._purge_if_free(tx, row["ino"], now, now)

    def _maybe_purge(self, tx: Tx, ino: int, now: int) -> None:
        """After a release: purge an unlinked inode that nobody holds open any more."""
        row = tx.one("SELECT nlink, ctime_ns FROM inodes WHERE ino = ?", (ino,))
        if row is not None and row["nlink"] == 0:
            self._purge_if_free(tx, ino, row["ctime_ns"], now)

    def _purge_if_free(self, tx: Tx, ino: int, unlinked_ns: int, now: int) -> None:
        """Purge inode `ino`, which has no links left (since `unlinked_ns`), unless an open
        holds it, or unless it is a file with blocks that lost its last link less than
        `unlinked_hold_s` ago: a reader's open of it may have gone unrecorded (files.py
        `open`), and its client records such an open within `record_open_after_s` of
        making it; until then only this wait keeps the file's blocks for it. The sweep
        purges what waited (`purge_unlinked`)."""
        if self._is_open(tx, ino):
            return
        if (self.unlinked_hold_s > 0 and unlinked_ns > self._hold_cutoff_ns(now)
                and tx.scalar("SELECT 1 FROM blocks WHERE ino = ? LIMIT 1", (ino,))):
            return
        self._purge(tx, [ino], now)

    def _hold_cutoff_ns(self, now: int) -> int:
        """A file with blocks unlinked after this (`ctime_ns`) still waits (`_purge_if_free`)."""
        return now - int(self.unlinked_hold_s * NS_PER_S)

    def purge_unlinked(self, budget_s: float = 0.5) -> int:
        """The sweep's part of `_purge_if_free`: purge the unlinked files whose wait is
        over and that nobody holds open, PURGE_BATCH a transaction (so that an `rm -r` of a
        million files does not hold the store for one long one, and a conflict runs one
        batch again, not the lot), for about `budget_s` at most (the next sweep goes on);
        how many."""
        purged, t0 = 0, time.monotonic()
        while True:
            n = self.store.retried(self._purge_unlinked_batch)
            purged += n
            if n < PURGE_BATCH or time.monotonic() - t0 > budget_s:
                return purged

    def _purge_unlinked_batch(self) -> int:
        with self.store.transaction() as tx:
            self.on_duty(tx)
            now = self.now_ns()
            inos = [r[0] for r in tx.all(
                "SELECT ino FROM inodes WHERE nlink = 0 AND ctime_ns <= ? AND ino != ? AND NOT EXISTS"
                " (SELECT 1 FROM opens o WHERE o.ino = inodes.ino) LIMIT ?",
                (self._hold_cutoff_ns(now), ROOT_INODE, PURGE_BATCH),
            )]
            self._purge(tx, inos, now)
            return len(inos)

    def on_duty(self, tx: Tx) -> None:
        """Open every transaction of the background duties (the sweep's steps) with this:
        it ends the sweep (store.DutiesLost) if another metaserver has taken them over."""
        self.store.check_duties(tx, self.name)

    def record_open_after_s(self) -> float:
        """How soon a client records a reader's open that went unrecorded and is still open
        (a fifth of the wait above, which leaves the rest to a slow client and to the
        metaservers' clocks; 0: no open of a file with blocks goes unrecorded)."""
        return self.unlinked_hold_s / 5

    def _purge(self, tx: Tx, inos: list[int], now: int) -> None:
        """Delete inodes for good; their blocks become garbage (the sweep purges hundreds
        at once: `_garbage_blocks` takes them all in two statements)."""
        if not inos:
            return
        ids = id_list(inos)
        self._garbage_blocks(tx, f"ino IN {ids}", (), now)
        # xattrs and inline data go by ON DELETE CASCADE.
        tx.run(f"DELETE FROM inodes WHERE ino IN {ids}")
        tx.run(f"DELETE FROM locks WHERE ino IN {ids}")

    # ------------------------------------------------------------------ garbage

    def _gc_not_before(self, now: int) -> int:
        """When garbage made now may go: the grace period lets a reader holding the old
        block map finish its read."""
        return now + int(self.gc_grace_s * NS_PER_S)

    def _garbage(self, tx: Tx, block_id: int, server_ids: list[int], now: int) -> None:
        not_before = self._gc_not_before(now)
        tx.run_many(
            "INSERT INTO garbage (block_id, server_id, not_before_ns) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            [(block_id, sid, not_before) for sid in server_ids],
        )

    def _garbage_blocks(self, tx: Tx, where: str, args: Sequence[Any], now: int) -> None:
        """The committed blocks `where` selects (a condition on `blocks`) leave their files:
        all their replicas become garbage. Two statements however many blocks: a purge of
        hundreds of files, a truncate of a long file's tail, are short transactions (a long
        one is one that conflicts)."""
        tx.run(
            "INSERT INTO garbage (block_id, server_id, not_before_ns) SELECT block_id, server_id, ? FROM blocks"
            f" JOIN replicas USING (block_id) WHERE {where} ON CONFLICT DO NOTHING",
            (self._gc_not_before(now), *args),
        )
        tx.run(f"DELETE FROM blocks WHERE {where}", args)

    def _garbage_committed(self, tx: Tx, block_id: int, now: int) -> None:
        """A committed block leaves its file: all its replicas become garbage."""
        self._garbage_blocks(tx, "block_id = ?", (block_id,), now)

    def _garbage_pending(self, tx: Tx, block_id: int, now: int) -> None:
        """An allocation that will never be committed: wherever it may have been written."""
        sids = [r[0] for r in tx.all("SELECT server_id FROM pending_servers WHERE block_id = ?", (block_id,))]
        self._garbage(tx, block_id, sids, now)
        tx.run("DELETE FROM pending WHERE block_id = ?", (block_id,))

    # ------------------------------------------------------------------ block maps

    def _inline(self, tx: Tx, ino: int) -> Optional[tuple[bytes, int]]:
        """(bytes, crc32c) of the file's inline block 0, or None. A copy whose checksum does
        not match is EIO: there is no other copy to fall back on (fsck reports it)."""
        row = tx.one("SELECT data, crc32c FROM inline_data WHERE ino = ?", (ino,))
        if row is None:
            return None
        data = bytes(row["data"])
        if crc32c.crc32c(data) != row["crc32c"]:
            log.error("inode %d: inline data fails its checksum", ino)
            raise FsError(errno.EIO, f"inode {ino}: inline data is corrupt")
        return data, row["crc32c"]

    def _set_inline(self, tx: Tx, ino: int, data: bytes) -> None:
        """Make `data` the file's inline block 0 (empty: none)."""
        if data:
            tx.run(
                "INSERT INTO inline_data (ino, data, crc32c) VALUES (?, ?, ?)"
                " ON CONFLICT (ino) DO UPDATE SET data = excluded.data, crc32c = excluded.crc32c",
                (ino, data, crc32c.crc32c(data)),
            )
        else:
            tx.run("DELETE FROM inline_data WHERE ino = ?", (ino,))

    def _open_grant(self, ino: int, writable: bool, caller: Caller) -> bytes:
        """What an open answers with (proto/auth.py `open_grant`): recorded or not, its
        client may have to record it, or record it again, in a session to come."""
        return open_grant(self.token_key, ino, str(caller), writable)

    def _read_token(self, block_id: int, holder: str, now: int) -> bytes:
        return read_token(self.token_key, block_id, holder, now // NS_PER_S + TOKEN_TTL_S)

    def _write_token(self, block_id: int, holder: str, server: str, now: int) -> bytes:
        """A write token for `holder` at the data server `server`; it lasts as long as an
        allocation does (the pending timeout), after which the block is garbage anyway."""
        ttl_s = min(TOKEN_TTL_S, max(1, int(self.pending_timeout_s + 0.999)))
        return write_token(self.token_key, block_id, holder, server, now // NS_PER_S + ttl_s)

    def _block_map(self, tx: Tx, ino: int, now: int, holder: str = "") -> list[BlockRef]:
        """The block map of a file, with read tokens for `holder` (role:name) if given."""
        # Resolve replicas by server id, so a data server that restarted on a new port is
        # found at its current address; up servers first, then suspect, then dead, each
        # in placement order, so readers try the likely ones first and stripe.
        rows = tx.all(
            "SELECT b.idx, b.block_id, b.length, b.digest, b.stored, s.server_id, s.address FROM blocks b"
            " LEFT JOIN replicas r ON r.block_id = b.block_id"
            " LEFT JOIN servers s ON s.server_id = r.server_id"
            " WHERE b.ino = ? ORDER BY b.idx, r.rank",
            (ino,),
        )
        if not rows:
            return []  # most small files: no need for the servers' states
        ranks = self._read_order(tx, now)
        refs: list[BlockRef] = []
        order: list[list[tuple[int, str]]] = []
        for row in rows:
            if not refs or refs[-1].index != row["idx"]:
                refs.append(BlockRef(index=row["idx"], block_id=row["block_id"], length=row["length"],
                                     digest=bytes(row["digest"] or b""), stored=row["stored"] or 0))
                order.append([])
            if row["address"] is not None:
                # (A server not ranked yet registered since: it is up.)
                order[-1].append((ranks.get(row["server_id"], _UP_RANK), row["address"]))
        for ref, replicas in zip(refs, order):
            # sorted() is stable: rank order is kept within a state.
            ref.servers = [address for _, address in sorted(replicas, key=lambda x: x[0])]
            if holder:
                ref.token = self._read_token(ref.block_id, holder, now)
        return refs

    def _truncate(self, tx: Tx, row: Row, size: int, now: int) -> None:
        """Set a regular file's size. Blocks wholly past the new end become garbage; the
        block holding the new end is clamped so that bytes past it read as zeros if the
        file is extended later (its stored bytes beyond the clamp are never exposed)."""
        if size > FILE_SIZE_MAX_BYTES:
            raise FsError(errno.EFBIG, f"size {size} exceeds the largest file")
        ino, bs = row["ino"], row["block_size"]
        if size < row["size"]:
            inline = tx.scalar("SELECT length(data) FROM inline_data WHERE ino = ?", (ino,))
            if inline is not None and size < inline:
                kept = self._inline(tx, ino) if size else None
                self._set_inline(tx, ino, kept[0][:size] if kept else b"")
            first_gone = -(-size // bs)  # ceil: the first block with no byte below size
            self._garbage_blocks(tx, "ino = ? AND idx >= ?", (ino, first_gone), now)
            if size % bs:
                # The digest still describes the block as written: `stored` keeps its length
                # for readers, who check what they fetch and then keep `length` bytes.
                idx = size // bs
                tx.run(
                    "UPDATE blocks SET stored = COALESCE(stored, length), length = ?"
                    " WHERE ino = ? AND idx = ? AND length > ?",
                    (size - idx * bs, ino, idx, size - idx * bs),
                )
        tx.run(
            "UPDATE inodes SET size = ?, generation = generation + 1 WHERE ino = ?", (size, ino)
        )
        self._resized(tx, ino, row["size"], size)

    # ------------------------------------------------------------------ data servers

    def listening_since_ns(self) -> int:
        """Since when every heartbeat sent to this metaserver could have been recorded."""
        return max(self.started_ns, self.store.reachable_since_ns)

    def _state_of(self, row: Row, now: int) -> str:
        since = self.listening_since_ns()
        age_ns = now - max(row["last_heartbeat_ns"], since)
        if age_ns <= self.server_suspect_after_s * NS_PER_S:
            return UP
        if row["last_heartbeat_ns"] < since and age_ns <= self.server_dead_after_s * NS_PER_S:
            # Not heard from since our own start: it is reconnecting (gRPC's backoff after a
            # restart reaches 2 s), not silent; until it could have been judged dead, it
            # gets blocks as before the restart (a writer it fails places the block again).
            return UP
        if age_ns <= self.server_dead_after_s * NS_PER_S:
            return SUSPECT
        return DEAD

    def _servers(self, tx: Tx, now: int) -> list[tuple[Row, str]]:
        """Every registered server with its state, by server id."""
        return [(row, self._state_of(row, now)) for row in tx.all("SELECT * FROM servers ORDER BY server_id")]

    def _server_states(self, tx: Tx, now: int) -> dict[int, str]:
        return {row["server_id"]: state for row, state in self._servers(tx, now)}

    def _read_order(self, tx: Tx, now: int) -> dict[int, int]:
        """Each server's rank in a block map's replica order (up, suspect, dead: 0, 1, 2),
        from its state at most READ_ORDER_REUSE_NS ago: a map of every file did a scan of
        the servers, ~10% of the metaserver's time over an epoch of 150 KiB samples.
        Placement and repair judge the servers afresh (`_servers`)."""
        at, ranks = self._read_order_at
        if not 0 <= now - at < READ_ORDER_REUSE_NS:
            ranks = {sid: _STATE_ORDER[state] for sid, state in self._server_states(tx, now).items()}
            self._read_order_at = (now, ranks)
        return ranks

    def _live_servers(self, tx: Tx, now: int, state: str = UP) -> list[Row]:
        """Servers that get new blocks: the up ones (or those of another state)."""
        return [row for row, st in self._servers(tx, now) if st == state]

    def _has_room(self, server: Row, block_size: int) -> bool:
        # A server close to full would fail the write; it gets nothing new.
        return server["free_bytes"] >= max(self.reserve_bytes, NEAR_FULL_BLOCKS * block_size)

    @staticmethod
    def _default_replicas(live: int) -> int:
        return max(1, min(DEFAULT_REPLICAS, live))

    def _replica_health(self, tx: Tx, now: int) -> tuple[int, int, int]:
        """(blocks, under-replicated, lost) over every committed block.

        A replica counts when its server is not dead (suspect ones may just be slow). A
        block is under-replicated when it has fewer counted replicas than
        min(R, non-dead servers), R being its file's replica count; it is lost when it has
        none. Lost blocks are under-replicated too while any server is alive.
        """
        states = self._server_states(tx, now)
        alive = [sid for sid, st in states.items() if st != DEAD]
        row = tx.one(
            "SELECT COUNT(*) AS blocks,"
            " COALESCE(SUM(CASE WHEN live < CASE WHEN want < ? THEN want ELSE ? END THEN 1 ELSE 0 END), 0) AS under,"
            " COALESCE(SUM(CASE WHEN live = 0 THEN 1 ELSE 0 END), 0) AS lost FROM ("
            f"  SELECT {WANT_SQL} AS want, {copies_on_sql(alive)} AS live"
            "  FROM blocks b JOIN inodes i ON i.ino = b.ino) AS counted",
            (len(alive), len(alive), DEFAULT_REPLICAS),
        )
        assert row is not None  # (an aggregate: always one row)
        return row["blocks"], row["under"], row["lost"]

    # ------------------------------------------------------------------ sessions

    def check_session(self, session: int, caller: Caller = LOCAL) -> None:
        """The session is there and the caller's (`_session_exists`), in a transaction of its own."""
        with self.store.transaction() as tx:
            self._session_exists(tx, session, caller)

    def _session_exists(self, tx: Tx, session: int, caller: Caller = LOCAL) -> None:
        """The session is there (ESTALE otherwise) and the caller's (EPERM otherwise): a
        client works only in the sessions it opened; an admin in any."""
        row = tx.one("SELECT owner FROM sessions WHERE session_id = ?", (session,))
        if row is None:
            raise FsError(errno.ESTALE, f"session {session} is unknown or expired")
        if caller.role != ADMIN and row["owner"] != str(caller):
            raise FsError(errno.EPERM, f"session {session} is not {caller}'s")

    # ------------------------------------------------------------------ extended attributes

    def _put_xattr(self, tx: Tx, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """Store an attribute (XATTR_CREATE / XATTR_REPLACE flags as setxattr(2)), within
        the inode's total; inodes.xattrs counts the rows."""
        old = tx.one("SELECT length(name) + length(value) FROM xattrs WHERE ino = ? AND name = ?", (ino, name))
        if old is not None and flags & XATTR_CREATE:
            raise FsError(errno.EEXIST, f"attribute {name!r} exists")
        if old is None and flags & XATTR_REPLACE:
            raise FsError(errno.ENODATA, f"no attribute {name!r}")
        total = tx.scalar(
            "SELECT COALESCE(SUM(length(name) + length(value)), 0) FROM xattrs WHERE ino = ?", (ino,)
        )
        total += len(name) + len(value) - (old[0] if old is not None else 0)
        if total > XATTR_TOTAL_MAX_BYTES:
            raise FsError(errno.ENOSPC, f"attributes of inode {ino} exceed 1 MiB")
        tx.run(
            "INSERT INTO xattrs (ino, name, value) VALUES (?, ?, ?)"
            " ON CONFLICT (ino, name) DO UPDATE SET value = excluded.value",
            (ino, name, value),
        )
        if old is None:
            tx.run("UPDATE inodes SET xattrs = xattrs + 1 WHERE ino = ?", (ino,))

    def _drop_xattr(self, tx: Tx, ino: int, name: bytes, missing_ok: bool = False) -> None:
        """Remove a stored attribute; ENODATA if there is none (unless missing_ok)."""
        if not tx.run("DELETE FROM xattrs WHERE ino = ? AND name = ?", (ino, name)):
            if missing_ok:
                return
            raise FsError(errno.ENODATA, f"no attribute {name!r}")
        tx.run("UPDATE inodes SET xattrs = xattrs - 1 WHERE ino = ?", (ino,))

    def _drop_session_locks(self, tx: Tx, session: int) -> None:
        """A session ends: its locks go, and whoever waits for them hears of it."""
        inos = [r[0] for r in tx.all("SELECT DISTINCT ino FROM locks WHERE session_id = ?", (session,))]
        if inos:
            tx.run("DELETE FROM locks WHERE session_id = ?", (session,))
            self._locks_changed(tx, inos)

    def _locks_changed(self, tx: Tx, inos: list[int]) -> None:
        """The locks of these files changed: wake their waiters here (before the commit at
        worst: a waiter's next try waits for the store behind it) and on every other
        metaserver of the store (at the commit)."""
        self.lock_events.changed(inos)
        tx.notify(inos)

    def _lock_news(self, inos: Optional[list[int]]) -> None:
        """The store heard of lock changes (None: it may have missed some)."""
        self.lock_events.changed(self.lock_events.waited() if inos is None else inos)

    def _record_open(self, tx: Tx, session: int, ino: int, writable: bool = False) -> None:
        tx.run(
            "INSERT INTO opens (session_id, ino, count, writable) VALUES (?, ?, 1, ?)"
            " ON CONFLICT (session_id, ino) DO UPDATE SET count = opens.count + 1,"
            " writable = opens.writable | excluded.writable",
            (session, ino, int(writable)),
        )

    def _check_open(self, tx: Tx, session: int, ino: int, caller: Caller, *, writable: bool) -> None:
        """The session has the file open (for writing, if asked): what entitles a client to
        its read tokens, and to allocate, commit and ftruncate. EBADF otherwise, as a
        write to a descriptor not open for writing. Admins are not asked."""
        if caller.role == ADMIN:
            return
        row = tx.one("SELECT writable FROM opens WHERE session_id = ? AND ino = ?", (session, ino))
        if row is None or (writable and not row["writable"]):
            raise FsError(errno.EBADF, f"inode {ino} is not open{' for writing' if writable else ''}"
                                       f" in session {session}")
