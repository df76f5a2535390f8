"""The read path of the client: pieces of blocks from the write-back buffers, the inline
block 0, the block cache or the data servers (with the read tokens of the block map), and
readahead for sequential readers.

A sequential reader (from the start, or near where the handle's last read ended) gets
whole blocks, cached and shared with concurrent readers, and a readahead window that
doubles up to READAHEAD_MAX_BYTES. Any other read fetches only the bytes asked for:
random readers must not pay for whole blocks. A block id that has been garbage-collected
or whose replicas have moved since the map was fetched (ENOENT), servers that cannot give
it (EIO: a map older than their restart on other ports, say), or a read token a data
server refuses (EACCES: too old, or a block this client wrote itself, whose map came
without tokens), make the reader refresh the block map once and retry, if the new map
differs (a new token always does).
"""

from __future__ import annotations

import errno
from typing import Awaitable, Callable, cast

from stripefs.proto import codec
from stripefs.proto import messages as m
from stripefs.proto.errors import FsError

from .data import DataPath
from .files import FileState, HandleState

#: Largest readahead window of a sequential reader.
READAHEAD_MAX_BYTES = 64 * 1024 * 1024
#: Whole-block prefetches in flight at once per client.
MAX_PREFETCHES_IN_FLIGHT = 16
#: A read starting this close to where the handle's last read ended, or within its own
#: size of it, counts as sequential (the kernel issues readahead requests concurrently,
#: slightly out of order: a mount's READs of up to 4 MiB, fs/fuse/mount.py READ_PAGES).
SEQUENTIAL_SLACK_BYTES = 1024 * 1024


class Reader:
    def __init__(self, data: DataPath, fresh_map: Callable[[FileState], Awaitable[m.BlockMapReply]],
                 spawn: Callable[..., None], use_once_above: int = 0) -> None:
        self.data = data
        #: files larger than this drop the blocks a sequential reader has passed (_drop_behind)
        self.use_once_above = use_once_above
        self._fresh_map = fresh_map  # the file's attributes and block map, asked anew
        self._spawn = spawn
        self._prefetches = 0

    async def read(self, h: HandleState, f: FileState, offset: int, size: int,
                   view: bool = False) -> bytes | memoryview | list[bytes | memoryview]:
        """Bytes [offset, offset+size) of the file, clipped to its size. view=True: what
        cached blocks hold comes back as views into the cache, not copies, and a read
        that spans buffers (a block's chunks, blocks) as the list of them, in order (for a
        caller that writes them out at once: the FUSE reply, one writev)."""
        end = min(offset + size, f.size)
        if offset >= end:
            return b""
        sequential = offset == 0 or abs(offset - h.last_read_end) <= max(SEQUENTIAL_SLACK_BYTES, size)
        parts: list[bytes | memoryview] = []
        pos = offset
        bs = f.block_size
        while pos < end:
            i, boff = divmod(pos, bs)
            n = min(end - pos, bs - boff)
            piece = await self._piece(f, i, boff, n, sequential, view=view)
            if isinstance(piece, list):
                parts.extend(piece)
            else:
                parts.append(piece)
            pos += n
        h.last_read_end = end
        h.furthest_read = max(h.furthest_read, end)
        if sequential:
            limit = max(1, READAHEAD_MAX_BYTES // bs)
            h.readahead_blocks = min(limit, max(1, h.readahead_blocks * 2))
            self._readahead(h, f, end, h.readahead_blocks)
            self._drop_behind(f, offset, end)
        else:
            h.readahead_blocks = 0
        if len(parts) == 1:
            return parts[0]
        return parts if view else b"".join(parts)

    async def _piece(self, f: FileState, index: int, boff: int, n: int, whole: bool, refreshed: bool = False,
                     view: bool = False) -> bytes | memoryview | list[memoryview]:
        chunk: bytes | memoryview
        d = f.dirty.get(index)
        if d is not None:
            chunk = d.read(boff, n)
        elif index == 0 and f.inline is not None:
            chunk = f.inline[boff : boff + n]
        else:
            ref = f.blocks.get(index)
            if ref is None:
                return bytes(n)
            try:
                if whole:
                    block = await self.data.read_block(ref)
                    if view and boff + n <= len(block):
                        return codec.views_of(block, boff, boff + n)
                    chunk = block[boff : boff + n]
                else:
                    chunk = await self.data.read_range(ref, boff, n)
            except FsError as exc:
                if exc.errno not in (errno.ENOENT, errno.EACCES, errno.EIO) or refreshed:
                    raise
                # The block was replaced and collected since our map was fetched, or moved
                # (repair), or its servers restarted on other ports, or the map was our own
                # (written here, no read tokens) or its tokens are old: refresh it, once.
                reply = await self._fresh_map(f)
                if (exc.errno != errno.EACCES and reply.blocks
                        and {(b.block_id, frozenset(b.servers)) for b in reply.blocks}
                        == {(b.block_id, frozenset(b.servers)) for b in f.blocks.values()}):
                    # The same blocks on the same servers: nothing to retry with.
                    if exc.errno == errno.EIO:
                        raise
                    raise FsError(errno.EIO, f"block {ref.block_id} of inode {f.ino} is missing") from None
                f.set_map(reply.attr, reply.blocks, reply)
                return await self._piece(f, index, boff, n, whole, refreshed=True, view=view)
        return chunk if len(chunk) == n else bytes(chunk) + bytes(n - len(chunk))

    def _drop_behind(self, f: FileState, start: int, end: int) -> None:
        """A sequential reader that has moved past block k + 1 is done with block k: it
        leaves the cache (used once), unless another handle here has the file open (it may
        be reading behind). So a stream's blocks do not fill the cache, each a buffer of
        new pages until the cache is full: their memory is freed at once, and taken again
        by the next blocks (docs/client.md, "Reads"). Only for files larger than
        `use_once_above`: a mount's (0: the kernel keeps what was read), or files larger
        than the cache (a second pass would find none of their blocks there anyway). One
        block of lag, since the kernel sends a stream's reads slightly out of order
        (SEQUENTIAL_SLACK_BYTES)."""
        if f.handles > 1 or f.size <= self.use_once_above:
            return
        self._passed(f, max(0, start // f.block_size - 1), end // f.block_size - 1)

    def closed(self, h: HandleState, f: FileState) -> None:
        """`h`, the last handle here on `f`, closed: its reads have all been answered. The
        blocks below the furthest point its reads reached, which drop behind leaves for its
        lag (or missed: the kernel's readahead sends reads out of order), leave the cache
        too, the last (a small file's only) block included once a read reached the end,
        under `_drop_behind`'s rule: through a mount the kernel's page cache holds what was
        read (keep_cache), and a copy here would only take fresh pages that each new file's
        block must fault in (a shuffled epoch of 150 KiB samples: ~30 page faults a sample,
        docs/client.md, "Reads"). A block the reads stopped inside stays: its reader may
        open the file again and read on."""
        end = h.furthest_read
        if f.handles > 1 or f.size <= self.use_once_above or end <= 0:
            return
        bs = f.block_size
        self._passed(f, 0, -(-end // bs) if end >= f.size else end // bs)

    def _passed(self, f: FileState, first: int, stop: int) -> None:
        """Blocks [first, stop) of `f` leave the cache (DataPath.passed)."""
        for index in range(first, stop):
            ref = f.blocks.get(index)
            if ref is not None:
                self.data.passed(ref.block_id, kernel_keeps=not self.use_once_above)

    def _readahead(self, h: HandleState, f: FileState, end: int, window: int) -> None:
        first = end // f.block_size
        for index in range(first, first + window):
            ref = f.blocks.get(index)
            if ref is None or index in f.dirty or self._prefetches >= MAX_PREFETCHES_IN_FLIGHT:
                continue
            if not self.data.has_or_fetching(ref.block_id):
                self._prefetches += 1
                self._spawn(self._prefetch, h, index * f.block_size, ref)

    async def _prefetch(self, h: HandleState, start: int, ref: m.BlockRef) -> None:
        try:
            # A task that starts late may find its reader already there (it fetched the
            # block itself) or past it (drop behind let the block go), or the block held or
            # on its way: nothing to fetch. (No wait in between: a fetch of its own starts
            # at once, and a reader that gets there waits for it.)
            if h.last_read_end <= start and not self.data.has_or_fetching(ref.block_id):
                await self.data.read_block(ref)
        except FsError:
            pass  # the reader will see the error itself if it gets there
        finally:
            self._prefetches -= 1

    async def fill_base(self, f: FileState, index: int) -> bytes:
        """The current content of block `index`, for a write that covers only part of it."""
        if index == 0 and f.inline is not None:
            return f.inline
        ref = f.blocks.get(index)
        # (view=False: bytes, never a view)
        return b"" if ref is None else cast(bytes, await self._piece(f, index, 0, ref.length, whole=True))
