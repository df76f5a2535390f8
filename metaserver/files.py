"""File data operations of the metadata core: open/release (which keep unlinked files
alive), block maps, the two-step write protocol, and inline block 0s.

A writer first asks alloc_blocks for new block ids, replica servers and write tokens,
writes the blocks to the data servers itself, then commit_blocks makes them part of the
file in one transaction. Stored blocks are immutable: a rewrite allocates a new id and
the commit sends the old one to garbage, so a reader never sees a torn block.

A small file's block 0 is kept in the store instead (inline_data): commit_inline writes it
in the one transaction of the writer's close, open returns it with the block map. A
commit of a stored block 0 replaces an inline one and the other way round, so a file moves
to data servers when it grows past its inline_max and back when it is rewritten small.

Who may: open checks the caller's permission for its flags (perm.py) and records whether
the session opened the file for writing; block maps (and the read tokens in them) go only
to a session that has the file open, allocations and commits only to one that opened it
for writing (EBADF otherwise; admins are not asked).
"""

from __future__ import annotations

import errno
import os

import crc32c

from stripefs.proto.auth import check_open_grant
from stripefs.proto.errors import FsError
from stripefs.proto.messages import (
    AccessedReq,
    AllocReply,
    AllocReq,
    Allocation,
    AttrReply,
    BlockMapReply,
    BlockMapReq,
    CommitReq,
    Empty,
    InlineCommitReq,
    OpenReply,
    OpenReq,
    PunchReq,
    ReleaseReq,
)
from stripefs.proto.types import FILE_SIZE_MAX_BYTES, RELATIME_AGE_S, STAGED_XATTR

from . import perm
from .base import (
    ADMIN, LOCAL, NS_PER_S, SUSPECT, Caller, CoreBase, attr_of, inline_limit, is_dir, is_reg, want_replicas,
)
from .store import Row, Tx


class FileOps(CoreBase):
    def open(self, req: OpenReq, caller: Caller = LOCAL) -> OpenReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            row = self._inode(tx, req.ino)
            if is_dir(row):
                raise FsError(errno.EISDIR, f"inode {req.ino} is a directory")
            self._session_exists(tx, req.session, caller)
            want = perm.open_wants(req.flags)
            self._check_open_perm(row, req, want, caller)
            if req.flags & os.O_TRUNC and is_reg(row):
                self._truncate(tx, row, 0, now)
                tx.run("UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE ino = ?", (now, now, req.ino))
            inline = self._inline(tx, req.ino) if is_reg(row) else None
            attr = self._attr(tx, req.ino) if req.flags & os.O_TRUNC else attr_of(row)
            # Every change of a file's blocks moves its generation (_bump_content,
            # _truncate), so a client holding the map of this generation has this map.
            same_map = bool(req.map_generation) and req.map_generation == attr.generation
            blocks = [] if same_map or not req.map_wanted else self._block_map(tx, req.ino, now, str(caller))
            # A reader of a file with no blocks gets all of its content in this reply: an
            # unlink elsewhere can take nothing its handle still needs. A file with blocks
            # is kept for unlinked_hold_s after an unlink (`_purge_if_free`), in which its
            # client records the open if the handle is still open. So, when the client says
            # it can do without, the open is not recorded (a transaction that writes
            # nothing, and no release to follow: docs/metaserver.md, "Opens").
            # (A client names a map only when it holds one with blocks. An open that asks
            # for no map only registers one, and is recorded: what it is for; its empty
            # `blocks` says nothing of the file's.)
            recorded = not (req.unrecorded_ok and req.map_wanted and not want & perm.WRITE and is_reg(row)
                            and (not (blocks or same_map) or self.unlinked_hold_s > 0))
            if recorded:
                self._record_open(tx, req.session, req.ino, writable=bool(want & perm.WRITE))
            return OpenReply(
                attr=attr, blocks=blocks,
                inline=inline is not None, inline_crc32c=inline[1] if inline else 0,
                data=inline[0] if inline else b"", recorded=recorded, opened_in=req.session if recorded else 0,
                grant=self._open_grant(req.ino, bool(want & perm.WRITE), caller), same_map=same_map,
            )

    def _check_open_perm(self, row: Row, req: OpenReq, want: int, caller: Caller) -> None:
        """An open's permission check, unless it registers again an open the caller was
        granted before (its grant, and no truncate: proto/auth.py `open_grant`)."""
        if (req.grant and not req.flags & os.O_TRUNC
                and check_open_grant(self.token_key, row["ino"], str(caller), bool(want & perm.WRITE), req.grant)):
            return
        perm.check(row, req.ctx, want, " (open)")

    def release(self, req: ReleaseReq, caller: Caller = LOCAL) -> Empty:
        # Lenient on purpose: a release after the session expired (and closed its opens)
        # has nothing left to do, and must not fail the close(2) that sent it.
        with self.store.transaction() as tx:
            owner = tx.scalar("SELECT owner FROM sessions WHERE session_id = ?", (req.session,))
            if owner is not None and caller.role != ADMIN and owner != str(caller):
                raise FsError(errno.EPERM, f"session {req.session} is not {caller}'s")
            now = self.now_ns()
            for block_id in req.abandon:  # only the session's own allocations of this file
                if tx.scalar("SELECT 1 FROM pending WHERE block_id = ? AND session_id = ? AND ino = ?",
                             (block_id, req.session, req.ino)):
                    self._garbage_pending(tx, block_id, now)
            if tx.run("UPDATE opens SET count = count - 1 WHERE session_id = ? AND ino = ?", (req.session, req.ino)):
                tx.run("DELETE FROM opens WHERE session_id = ? AND ino = ? AND count <= 0", (req.session, req.ino))
                self._maybe_purge(tx, req.ino, now)
            return Empty()

    def block_map(self, req: BlockMapReq, caller: Caller = LOCAL) -> BlockMapReply:
        with self.store.transaction() as tx:
            attr = self._attr(tx, req.ino)
            if caller.role != ADMIN:  # admins (fsck, tools) read any file
                self._session_exists(tx, req.session, caller)
                self._check_open(tx, req.session, req.ino, caller, writable=False)
            inline = self._inline(tx, req.ino)
            return BlockMapReply(
                attr=attr, blocks=self._block_map(tx, req.ino, self.now_ns(), str(caller)),
                inline=inline is not None, inline_crc32c=inline[1] if inline else 0,
                data=inline[0] if inline else b"",
            )

    def alloc_blocks(self, req: AllocReq, caller: Caller = LOCAL) -> AllocReply:
        with self.store.transaction() as tx:
            row = self._inode(tx, req.ino)
            if is_dir(row):
                raise FsError(errno.EISDIR, f"inode {req.ino} is a directory")
            if not is_reg(row):
                raise FsError(errno.EINVAL, f"inode {req.ino} is not a regular file")
            self._session_exists(tx, req.session, caller)
            self._check_open(tx, req.session, req.ino, caller, writable=True)
            return AllocReply(self._allocate(tx, row, req.session, req.indexes, req.exclude, self.now_ns(),
                                             str(caller)))

    def _allocate(
        self, tx: Tx, row: Row, session: int, indexes: list[int], exclude: list[str], now: int, holder: str
    ) -> list[Allocation]:
        """New block ids for positions of a regular file, with their replica servers and
        write tokens for `holder` (role:name), recorded as pending until committed (or
        abandoned)."""
        bs = row["block_size"]
        if any(i * bs >= FILE_SIZE_MAX_BYTES for i in indexes):
            raise FsError(errno.EFBIG, "block index past the largest file")
        # Only up servers get new blocks; a writer's exclusions (servers that just
        # failed it) come off next. Fewer than R left: place what can be placed. None up:
        # the suspect ones (heartbeats may be what is missing, not servers: they were
        # beating to a metaserver that hung, or the database was away), rather than fail
        # the write; a writer that finds one dead excludes it and asks again.
        excluded = set(exclude)
        candidates = [s for s in self._live_servers(tx, now) if s["address"] not in excluded] or \
            [s for s in self._live_servers(tx, now, SUSPECT) if s["address"] not in excluded]
        if not candidates:
            raise FsError(errno.EIO, "no live data server" + (" left after exclusions" if excluded else ""))
        usable = [s for s in candidates if self._has_room(s, bs)]
        if not usable:
            raise FsError(errno.ENOSPC, "every live data server is full")
        n = len(usable)
        r = min(want_replicas(row["replicas"]), n)
        first_id = tx.next_ids(len(indexes))
        allocations = []
        for k, index in enumerate(indexes):
            block_id = first_id + k
            # Striping: consecutive blocks start on consecutive servers, so a large
            # sequential read or write keeps every server busy.
            start = (row["ino"] + index) % n
            chosen = [usable[(start + j) % n] for j in range(r)]
            tx.run(
                "INSERT INTO pending (block_id, ino, idx, session_id, created_ns) VALUES (?, ?, ?, ?, ?)",
                (block_id, row["ino"], index, session, now),
            )
            tx.run_many(
                "INSERT INTO pending_servers (block_id, server_id, rank) VALUES (?, ?, ?)",
                [(block_id, s["server_id"], rank) for rank, s in enumerate(chosen)],
            )
            allocations.append(
                Allocation(
                    index=index,
                    block_id=block_id,
                    servers=[s["address"] for s in chosen],
                    tokens=[self._write_token(block_id, holder, s["address"], now) for s in chosen],
                )
            )
        return allocations

    def commit_blocks(self, req: CommitReq, caller: Caller = LOCAL) -> AttrReply:
        # Durable: this is what a client's fsync and close wait for.
        with self.store.transaction(durable=True) as tx:
            now = self.now_ns()
            self._session_exists(tx, req.session, caller)
            row = tx.one("SELECT * FROM inodes WHERE ino = ?", (req.ino,))
            if row is None:
                # The file was purged while being written: its new blocks are garbage.
                # Commit that, then report ENOENT (raising here would roll it back).
                for ref in req.blocks:
                    if tx.scalar("SELECT 1 FROM pending WHERE block_id = ? AND ino = ?", (ref.block_id, req.ino)):
                        self._garbage_pending(tx, ref.block_id, now)
            else:
                self._check_open(tx, req.session, req.ino, caller, writable=True)
                self._commit(tx, row, req, now)
                if req.unstage:
                    # A staged file's upload: whole now, so no longer holding its checkpoint back.
                    self._drop_xattr(tx, req.ino, STAGED_XATTR, missing_ok=True)
                return AttrReply(attr=self._attr(tx, req.ino))
        raise FsError(errno.ENOENT, f"inode {req.ino} was removed")

    def _file_open_for_writing(self, tx: Tx, ino: int, session: int, caller: Caller) -> Row:
        """The row of a regular file that `session` (the caller's) has open for writing."""
        row = self._inode(tx, ino)
        if not is_reg(row):
            raise FsError(errno.EISDIR if is_dir(row) else errno.EINVAL, f"inode {ino} is not a regular file")
        self._session_exists(tx, session, caller)
        self._check_open(tx, session, ino, caller, writable=True)
        return row

    def accessed(self, req: AccessedReq, caller: Caller = LOCAL) -> Empty:
        """A read of an open file (mounts with -o atime): atime becomes now under relatime's
        rules, as Linux's default: when it is not newer than mtime or ctime, or is a day
        old. Any session that has the file open may, as any reader moves atime locally."""
        with self.store.transaction() as tx:
            self._session_exists(tx, req.session, caller)
            self._check_open(tx, req.session, req.ino, caller, writable=False)
            now = self.now_ns()
            tx.run("UPDATE inodes SET atime_ns = ? WHERE ino = ?"
                   " AND (atime_ns <= mtime_ns OR atime_ns <= ctime_ns OR atime_ns < ?)",
                   (now, req.ino, now - RELATIME_AGE_S * NS_PER_S))
            return Empty()

    def punch_hole(self, req: PunchReq, caller: Caller = LOCAL) -> AttrReply:
        """The whole blocks of a range leave the file (their replicas become garbage, an
        inline block 0 goes) and read as zeros; the size stays. A content change: the
        generation moves, mtime and ctime are now."""
        with self.store.transaction(durable=True) as tx:
            now = self.now_ns()
            row = self._file_open_for_writing(tx, req.ino, req.session, caller)
            bs = row["block_size"]
            if req.start % bs or req.length % bs:
                raise FsError(errno.EINVAL, f"a hole is punched in whole blocks of {bs} bytes")
            first, last = req.start // bs, (req.start + req.length) // bs
            self._garbage_blocks(tx, "ino = ? AND idx >= ? AND idx < ?", (req.ino, first, last), now)
            if first == 0:
                self._set_inline(tx, req.ino, b"")
            self._bump_content(tx, row, row["size"], now, now)
            return AttrReply(attr=self._attr(tx, req.ino))

    def commit_inline(self, req: InlineCommitReq, caller: Caller = LOCAL) -> AttrReply:
        # Durable like commit_blocks: what a client's close and fsync wait for.
        with self.store.transaction(durable=True) as tx:
            now = self.now_ns()
            row = self._file_open_for_writing(tx, req.ino, req.session, caller)
            if len(req.data) > inline_limit(row):
                raise FsError(errno.EFBIG, f"inode {req.ino}: {len(req.data)} bytes do not fit inline")
            if req.size > FILE_SIZE_MAX_BYTES:
                raise FsError(errno.EFBIG, f"size {req.size} exceeds the largest file")
            if crc32c.crc32c(req.data) != req.crc32c:
                raise FsError(errno.EIO, f"inode {req.ino}: inline data damaged on the way")
            old = tx.scalar("SELECT block_id FROM blocks WHERE ino = ? AND idx = 0", (req.ino,))
            if old is not None:
                self._garbage_committed(tx, old, now)
            # A block 0 this writer was allocated (at create) and did not use is garbage now.
            for r in tx.all("SELECT block_id FROM pending WHERE ino = ? AND idx = 0 AND session_id = ?",
                            (req.ino, req.session)):
                self._garbage_pending(tx, r[0], now)
            self._set_inline(tx, req.ino, req.data)
            self._bump_content(tx, row, req.size, req.mtime_ns, now)
            return AttrReply(attr=self._attr(tx, req.ino))

    def _bump_content(self, tx: Tx, row: Row, size: int, mtime_ns: int, now: int) -> None:
        """A content commit to the file of `row` (read in this transaction): the size grows
        to `size` (a commit never shrinks a file), the times move, and the generation tells
        caches the content changed."""
        ino, new_size = row["ino"], max(row["size"], size)
        self._resized(tx, ino, row["size"], new_size)
        tx.run(
            "UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ?, generation = generation + 1 WHERE ino = ?",
            (new_size, mtime_ns, now, ino),
        )

    def _commit(self, tx: Tx, row: Row, req: CommitReq, now: int) -> None:
        ino, bs = row["ino"], row["block_size"]
        if not is_reg(row):
            raise FsError(errno.EINVAL, f"inode {ino} is not a regular file")
        if req.size > FILE_SIZE_MAX_BYTES:
            raise FsError(errno.EFBIG, f"size {req.size} exceeds the largest file")
        for ref in req.blocks:
            pend = tx.one("SELECT ino, idx, session_id FROM pending WHERE block_id = ?", (ref.block_id,))
            if pend is None or pend["ino"] != ino or pend["idx"] != ref.index or pend["session_id"] != req.session:
                raise FsError(errno.EINVAL, f"block {ref.block_id} is not allocated to {ino}[{ref.index}]")
            if not 0 <= ref.length <= bs:
                raise FsError(errno.EINVAL, f"block {ref.block_id}: length {ref.length} out of range")
            allocated = {
                r["address"]: (r["server_id"], r["rank"])
                for r in tx.all(
                    "SELECT s.server_id, s.address, p.rank FROM pending_servers p"
                    " JOIN servers s ON s.server_id = p.server_id WHERE p.block_id = ?",
                    (ref.block_id,),
                )
            }
            written = set(ref.servers)
            if not written or not written <= allocated.keys():
                raise FsError(
                    errno.EINVAL, f"block {ref.block_id}: written servers are not a subset of the allocated ones"
                )
            old = tx.scalar("SELECT block_id FROM blocks WHERE ino = ? AND idx = ?", (ino, ref.index))
            if old is not None:
                self._garbage_committed(tx, old, now)
            if ref.index == 0:
                self._set_inline(tx, ino, b"")  # a stored block 0 replaces an inline one
            tx.run(
                "INSERT INTO blocks (ino, idx, block_id, length, digest) VALUES (?, ?, ?, ?, ?)",
                (ino, ref.index, ref.block_id, ref.length, ref.digest or None),
            )
            # The allocation's placement order, not the order the client reports: the
            # metaserver owns placement, and it is what stripes reads over the servers.
            tx.run_many(
                "INSERT INTO replicas (block_id, server_id, rank, created_ns) VALUES (?, ?, ?, ?)",
                [(ref.block_id, *allocated[a], now) for a in written],
            )
            if len(written) < want_replicas(row["replicas"]):
                self.replan = True  # committed short of R (a server failed the writer)
            # Servers that were allocated but not written may hold a partial copy.
            unwritten = [sid for a, (sid, _) in allocated.items() if a not in written]
            self._garbage(tx, ref.block_id, unwritten, now)
            tx.run("DELETE FROM pending WHERE block_id = ?", (ref.block_id,))
        self._bump_content(tx, row, req.size, req.mtime_ns, now)
