"""The write path of the client: write-back buffers, uploads to the data servers, commits.

Writes go into per-block buffers (files.py has the concurrency protocol). A full block is
uploaded in the background (write-behind); its commit waits for a batch of
COMMIT_BATCH_BLOCKS, an fsync or a close. `settle` (close, fsync) uploads the rest and
commits, so close returns with the data on all replica servers and the block map
committed. A file whose only dirty block is block 0, no longer than its inline limit, is
committed inline instead: the bytes go to the metaserver in the commit itself, one round
trip and no data server (InlineCommitReq).

A data server that fails an upload is excluded and the block placed again, while live
servers remain. Writers past the write-back budget wait while their own buffers drain.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any, Awaitable, Callable, Optional, Sequence

import crc32c
import trio

from stripefs.proto import messages as m
from stripefs.proto.errors import FsError
from stripefs.proto.types import FILE_SIZE_MAX_BYTES

from .data import NOT_THE_SERVERS_FAULT, DataPath
from .files import DirtyBlock, FileState, WritebackBudget
from .reader import Reader

log = logging.getLogger("stripefs.client")

#: Block uploads in flight at once per client (each holds a frame and gRPC's copies).
MAX_UPLOADS_IN_FLIGHT = 4
#: Copies of a block held while it is uploaded, besides its buffer: its chunk messages and
#: gRPC's buffers of them (counted against the write-back budget).
UPLOAD_COPIES = 2
#: Uploaded blocks are committed in batches of this many (and at every fsync/close).
COMMIT_BATCH_BLOCKS = 16
#: The write-behind of block k a writer has just filled also allocates the next min(k,
#: ALLOC_AHEAD_BLOCKS) blocks, kept as the file's spares (as a create's preallocated block
#: is): a sequential writer makes one metadata call and transaction for 1 +
#: ALLOC_AHEAD_BLOCKS blocks instead of one a block, once past its first blocks. A spare
#: never written goes back with the release of the file's last close (client.py
#: `_drop_handle`: garbage then); the ramp keeps them fewer than the blocks a file has.
ALLOC_AHEAD_BLOCKS = 7
#: Placements tried for a block whose replica servers fail during the write.
WRITE_PLACEMENT_ATTEMPTS = 4
#: Commits refused because their allocations expired that are retried (per open file).
MAX_EXPIRED_COMMITS = 3


def now_ns() -> int:
    return time.time_ns()


class Writer:
    def __init__(
        self,
        data: DataPath,
        reader: Reader,
        call: Callable[[str, m.Message], Awaitable[Any]],
        session: Callable[[], int],
        budget: WritebackBudget,
        spawn: Callable[..., None],
        committed: Callable[[FileState, m.Attr], None],
    ) -> None:
        self.data = data
        self.reader = reader
        self._call = call
        self._session = session
        self.budget = budget
        self._spawn = spawn
        self._committed = committed  # told of every commit's new attributes
        self._upload_slots = trio.Semaphore(MAX_UPLOADS_IN_FLIGHT)

    # ------------------------------------------------------------------ writing

    async def write(self, f: FileState, offset: int, data: bytes | memoryview) -> int:
        if offset + len(data) > FILE_SIZE_MAX_BYTES:
            raise FsError(errno.EFBIG, "file too large")
        bs = f.block_size
        view = memoryview(data)
        pos = offset
        while view:
            i, boff = divmod(pos, bs)
            n = min(len(view), bs - boff)
            d = f.dirty.get(i)
            if d is None:
                d = await self._start_dirty(f, i, covers=boff == 0 and pos + n >= min((i + 1) * bs, f.size))
            f.write_into(d, boff, view[:n])
            pos += n
            view = view[n:]
            if pos > f.size:
                f.size = pos
            if len(d) == bs and i not in f.flushing:
                self._upload_in_background(f, i)
        f.mtime_ns = now_ns()
        # Write-back buffers take the place of cached blocks: the block cache gives up what
        # dirty data holds, so a mount that read a checkpoint and then writes one holds
        # about one budget of block data, not both (the page cache's rule too).
        self.data.cache.trim(self.data.cache.limit_bytes - self.budget.used_bytes)
        if self.budget.over():
            await self._relieve(f)
        return len(data)

    async def _relieve(self, f: FileState) -> None:
        """Back-pressure: a writer that finds the write-back budget spent waits while its
        own file's buffers drain (commits free them), keeping uploads in flight meanwhile.
        Other files' buffers are drained by their own writers, so the budget is exceeded by
        at most one write per concurrent writer."""
        while self.budget.over() and f.busy():
            if f.uploaded and not f.commit_lock.locked():
                await self._commit(f)
            elif f.flushing:
                await next(iter(f.flushing.values())).wait()
            else:
                stale = sorted(i for i in f.dirty if not f.uploaded_current(i))
                if not stale:
                    await self._commit(f)
                else:
                    await self._upload(f, stale[:COMMIT_BATCH_BLOCKS])

    async def _start_dirty(self, f: FileState, index: int, covers: bool) -> DirtyBlock:
        """A write buffer for block `index`, holding its current content unless the write
        about to go into it covers all of that content."""
        base = b"" if covers else await self.reader.fill_base(f, index)
        d = f.dirty.get(index)  # re-check: another task may have started one while we read
        return d if d is not None else f.new_dirty(index, base)

    def _upload_in_background(self, f: FileState, index: int) -> None:
        """Write-behind of a full block; its commit waits for a batch, fsync or close."""

        async def run() -> None:
            try:
                await self._upload(f, [index], behind=True)
                if len(f.uploaded) >= COMMIT_BATCH_BLOCKS:
                    await self._commit(f)
            except FsError as exc:
                log.error("inode %d: write-behind of block %d failed: %s", f.ino, index, exc)
                f.error = f.error or exc.errno

        self._spawn(run)

    # ------------------------------------------------------------------ uploads

    async def _upload(self, f: FileState, indexes: list[int], behind: bool = False) -> None:
        """Store the current content of dirty blocks as new blocks on their replica
        servers; they become part of the file at the next _commit. A server that fails is
        excluded and the block placed again, while live servers remain. `behind`: the
        write-behind of a block just filled, whose allocation takes the next ones as spares
        (one allocation of them at a time a file; a block it covers waits for its reply)."""
        for i in indexes:
            while i in f.flushing:
                await f.flushing[i].wait()
        # Re-check after the waits: the blocks may have been uploaded meanwhile.
        indexes = [i for i in indexes if i in f.dirty and i not in f.flushing and not f.uploaded_current(i)]
        if not indexes:
            return
        for i in indexes:
            f.flushing[i] = trio.Event()
        try:
            snaps = {i: (f.dirty[i].snapshot(), f.dirty[i].version) for i in indexes}

            async def content(i: int) -> list:
                return snaps[i][0]

            def stored(ref: m.BlockRef) -> None:
                f.uploaded[ref.index] = (ref, snaps[ref.index][1])
                for address in ref.servers:
                    f.unsynced.setdefault(address, set()).add(ref.block_id)

            ahead: list[int] = []
            done: Optional[trio.Event] = None
            top = max(indexes)
            on_its_way = f.ahead if f.ahead is not None and not f.ahead[1].is_set() else None
            if on_its_way is not None and on_its_way[0].intersection(indexes):
                await on_its_way[1].wait()  # it brings these blocks' allocations
            elif behind and on_its_way is None and top not in f.spare:
                last = (FILE_SIZE_MAX_BYTES - 1) // f.block_size
                # As many as the file already has before this block, up to the most: a file
                # that ends soon leaves few spares unused (each is garbage to collect).
                count = min(top, ALLOC_AHEAD_BLOCKS)
                ahead = [i for i in range(top + 1, min(top + 1 + count, last + 1)) if i not in f.spare]
                if ahead:
                    done = trio.Event()
                    f.ahead = (frozenset(ahead), done)
            try:
                await self.place(f.ino, indexes, content, stored, f.spare, ahead=ahead, ahead_done=done)
            finally:
                if done is not None:
                    done.set()
                    if f.ahead is not None and f.ahead[1] is done:
                        f.ahead = None
        finally:
            for i in indexes:
                d = f.dirty.get(i)
                if d is not None:
                    d.release(snaps[i][0])
                f.flushing.pop(i).set()

    async def place(self, ino: int, indexes: list[int], content: Callable[[int], Awaitable[list]],
                    stored: Callable[[m.BlockRef], None], spare: Optional[dict[int, m.Allocation]] = None,
                    sync: bool = False, ahead: Sequence[int] = (), ahead_done: Optional[trio.Event] = None) -> None:
        """Store blocks `indexes` of file `ino` as new blocks on their replica servers, each
        sent once down its chain (`content(i)`: block i's bytes, asked for when an upload
        slot is free; `stored(ref)`: each block stored, to be committed; `spare`: blocks
        allocated ahead; sync: the servers sync each block before they answer; `ahead`: more
        indexes for `spare`, asked for with the first allocation, `ahead_done` set once that
        allocation has answered). A
        server that fails is excluded and the block placed again, while live servers
        remain; ENOSPC when they are full, EIO when a block could not be placed."""
        todo, exclude = indexes, self.data.penalised()  # servers that just failed us, avoided from the start
        errors: dict[str, FsError] = {}
        spare = {} if spare is None else spare
        for _attempt in range(WRITE_PLACEMENT_ATTEMPTS):
            # Blocks preallocated at create need no allocation round trip.
            allocations = [spare.pop(i) for i in todo if i in spare and not exclude]
            rest = [i for i in todo if i not in {a.index for a in allocations}]
            if rest:
                extra = [i for i in ahead if i not in spare and i not in rest] if not exclude else []
                ahead = ()
                try:
                    got = await self._allocate(ino, rest + extra, exclude, errors)
                finally:
                    if ahead_done is not None:
                        ahead_done.set()
                for a in got:
                    if a.index in rest:
                        allocations.append(a)
                    else:
                        spare[a.index] = a
            elif ahead_done is not None:
                ahead_done.set()
            retry: list[int] = []

            async def put(a: m.Allocation) -> None:
                async with self._upload_slots:
                    data = await content(a.index)
                    length = sum(len(piece) for piece in data)
                    # The chunk messages and gRPC's buffers (the block is sent once,
                    # whatever R) count against the write-back budget while in flight, so
                    # the budget bounds the mount's memory, not only its dirty buffers.
                    in_flight = length * UPLOAD_COPIES
                    self.budget.used_bytes += in_flight
                    try:
                        written, failed, digest = await self.data.write_block(
                            a.block_id, a.tokens, a.servers, data, sync=sync
                        )
                    finally:
                        self.budget.used_bytes -= in_flight
                if failed:
                    retry.append(a.index)
                    errors.update(failed)
                    # Servers that failed are placed around; a refused (expired) write
                    # token only needs the new allocation the retry makes anyway, and a
                    # server that received a damaged chunk, or that a broken chain never
                    # reached, is not at fault (data.py).
                    exclude.extend(s for s, e in failed.items()
                                   if s not in exclude and e.errno not in NOT_THE_SERVERS_FAULT)
                else:
                    stored(m.BlockRef(a.index, a.block_id, length, written, digest=digest))

            async with trio.open_nursery() as nursery:
                for a in allocations:
                    nursery.start_soon(put, a)
            if not retry:
                return
            log.warning("inode %d: blocks %s: replica writes failed (%s); placing them elsewhere",
                        ino, retry, "; ".join(f"{a}: {e}" for a, e in errors.items()))
            todo = sorted(retry)
        if all(e.errno == errno.ENOSPC for e in errors.values()):
            raise FsError(errno.ENOSPC, "data servers are full")
        raise FsError(errno.EIO, f"inode {ino}: blocks {todo} could not be written")

    async def _allocate(
        self, ino: int, indexes: list[int], exclude: list[str], errors: dict[str, FsError]
    ) -> list[m.Allocation]:
        try:
            return (await self._call("alloc_blocks", m.AllocReq(ino, self._session(), indexes, exclude))).allocations
        except FsError as exc:
            if exc.errno != errno.EIO or not exclude:
                raise
            # Nothing left but servers that just failed us. If they failed for want of
            # space, that is what the application must hear (the metaserver's view of free
            # space lags by a heartbeat), not EIO.
            if self.data.all_full(exclude):
                raise FsError(errno.ENOSPC, "data servers are full") from None
            if errors:
                raise
            # Only servers penalised for earlier failures were excluded: they may have
            # recovered, so try them.
            try:
                return (await self._call("alloc_blocks", m.AllocReq(ino, self._session(), indexes, []))).allocations
            except FsError as again:
                if again.errno == errno.EIO and self.data.all_full(self.data.penalised()):
                    raise FsError(errno.ENOSPC, "data servers are full") from None
                raise

    # ------------------------------------------------------------------ commits

    async def _commit(self, f: FileState) -> None:
        """Make every finished upload part of the file, in one metadata transaction."""
        async with f.commit_lock:
            batch = dict(f.uploaded)
            if not batch:
                return
            refs = [ref for ref, _ in batch.values()]
            size = max(r.index * f.block_size + r.length for r in refs)
            mtime = f.mtime_ns or now_ns()
            try:
                reply = await self._call("commit_blocks", m.CommitReq(f.ino, self._session(), refs, size, mtime))
            except FsError as exc:
                if exc.errno != errno.EINVAL or f.expired_commits >= MAX_EXPIRED_COMMITS:
                    raise
                # The allocations expired (the write was stalled past --pending-timeout-s,
                # say by a hung server) and were collected: upload the blocks again. Their
                # content is still in the dirty buffers, which only a commit drops.
                f.expired_commits += 1
                log.warning("inode %d: commit refused (%s); uploading its blocks again", f.ino, exc)
                for i, entry in batch.items():
                    if f.uploaded.get(i) is entry:
                        del f.uploaded[i]
                return
            for i, entry in batch.items():
                ref, version = entry
                f.blocks[i] = ref
                if i == 0:
                    f.inline = None  # a stored block 0 replaced the inline one
                if f.uploaded.get(i) is entry:
                    del f.uploaded[i]
                d = f.dirty.get(i)
                if d is not None and d.version == version:
                    f.drop_dirty(i)
            self._done(f, reply.attr)

    def _fits_inline(self, f: FileState) -> bool:
        d = f.dirty.get(0)
        return (
            d is not None and len(f.dirty) == 1 and not f.uploaded and not f.flushing
            and len(d) <= f.inline_limit
        )

    async def _commit_inline(self, f: FileState) -> None:
        """Commit block 0 inline: the close of a small file in one round trip."""
        async with f.commit_lock:
            if not self._fits_inline(f):
                return  # changed while we waited for the lock
            d = f.dirty[0]
            data, version = d.content(), d.version
            req = m.InlineCommitReq(f.ino, self._session(), f.size, f.mtime_ns or now_ns(), crc32c.crc32c(data), data)
            try:
                reply = await self._call("commit_inline", req)
            except FsError as exc:
                if exc.errno != errno.EFBIG:
                    raise
                # The limit changed on the metaserver (stripefs.inline_max set lower):
                # this file's block 0 goes to the data servers.
                f.inline_refused = True
                return
            f.inline = data
            f.blocks.pop(0, None)  # an older stored block 0 is garbage now
            f.spare.pop(0, None)
            if f.dirty.get(0) is d and d.version == version:
                f.drop_dirty(0)
            self._done(f, reply.attr)

    def _done(self, f: FileState, attr: m.Attr) -> None:
        f.attr = attr
        f.commits += 1
        self._committed(f, attr)

    async def settle(self, f: FileState, durable: bool = False) -> None:
        """Upload and commit everything this client holds for the file (close: the data is
        on all its replica servers or inline, the commit made). durable=True (fsync): the
        data servers have also synced every block this client wrote to the file, before the
        commit that makes the last of them visible."""
        while f.busy():
            for pending in list(f.flushing.values()):
                await pending.wait()
            if self._fits_inline(f):
                await self._commit_inline(f)
                continue
            stale = sorted(i for i in f.dirty if not f.uploaded_current(i) and i not in f.flushing)
            if stale:
                await self._upload(f, stale)
            elif f.uploaded and not f.flushing:
                if durable:
                    await self._sync_data(f)
                await self._commit(f)
        if durable:
            await self._sync_data(f)  # blocks committed earlier by write-behind batches
        if f.error:
            code, f.error = f.error, None
            raise FsError(code, "an earlier write-behind failed")

    async def _sync_data(self, f: FileState) -> None:
        """fsync's data half: every block this client wrote to the file, synced on the
        servers that hold it. A server that died or hung since the write loses its copies:
        they are reported, and the metaserver re-replicates them from the survivors; the
        fsync fails (EIO) only for a block with no surviving copy."""
        pending, f.unsynced = f.unsynced, {}
        if not pending:
            return
        failed = await self.data.sync_blocks(pending)
        if not failed:
            return
        survivors: dict[int, int] = {}
        for address, ids in pending.items():
            for block_id in ids:
                survivors[block_id] = survivors.get(block_id, 0) + (address not in failed)
        lost = sorted(b for b, n in survivors.items() if n == 0)
        for address in failed:
            for block_id in pending[address]:
                self.data.report(block_id, address, "unreachable")
        log.warning("inode %d: sync failed on %s; %d blocks left to re-replication",
                    f.ino, ", ".join(failed), sum(len(pending[a]) for a in failed))
        if lost:
            raise FsError(errno.EIO, f"inode {f.ino}: blocks {lost[:5]} have no durable copy")
