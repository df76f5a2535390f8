"""Per-inode state of open files in one client: the block map, write-back buffers, uploads
waiting for their commit, and the locally known size; and the per-handle read state.

Concurrency protocol (one trio thread, see DESIGN.md):
- `dirty[i]` is the newest content of block i that is not yet committed. A writer mutates
  it in place and bumps its version. An upload freezes the buffer (a writer then copies it
  before writing: copy-on-write), stores it as a new block and records
  `uploaded[i] = (ref, version)`; the commit that makes the upload part
  of the file drops `dirty[i]` only if its version is still that one, so a write during an
  upload or commit is never lost.
- At most one upload of a given block is in flight (`flushing[i]`), and commits of a file
  are serialized by `commit_lock` and take whatever `uploaded` holds when they start: so
  the versions of a block become visible in the order they were written, and an older
  snapshot can never replace a newer one.
- `size` is the file size as this client sees it: the server's size, grown by local writes.
- `inline` is block 0's content when the metaserver keeps it inline (small files); a write
  into block 0 starts from it, and a close whose only dirty block is block 0, short enough,
  commits it inline again (writer.py).
- Dirty bytes of every file count against one `WritebackBudget` per client.
"""

from __future__ import annotations

import errno
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import crc32c
import trio

from stripefs.proto.codec import span
from stripefs.proto.errors import FsError
from stripefs.proto.messages import Allocation, Attr, BlockMapReply, BlockRef, Ctx, OpenReply

if TYPE_CHECKING:
    from .staging import Staged


#: Files whose last block map from the metaserver a client keeps (KnownMaps), and how
#: long one is offered; maps of more blocks than MAP_KEPT_BLOCKS_MAX are not kept (a large
#: file is opened rarely, beside what reading it costs).
MAPS_KEPT = 4096
MAP_KEPT_S = 60.0
MAP_KEPT_BLOCKS_MAX = 64


class KnownMaps:
    """The last block map the metaserver gave this client for each of the files it opened
    or looked up with their maps lately, with the file's generation: an open names it
    (OpenReq.map_generation), and the metaserver leaves the map out of its reply while the
    file's generation is the same (every change of a file's blocks moves it). So the
    reader's open of a file the prefetcher looked up with its map costs the metaserver no
    second map, nor either side its encoding. A map older than MAP_KEPT_S is not offered:
    its replica lists are the older part (a reader refreshes a map whose replicas fail it:
    reader.py)."""

    def __init__(self) -> None:
        self._maps: OrderedDict[int, tuple[int, list[BlockRef], float]] = OrderedDict()
        #: opens whose reply left the map out, this one standing (a running count)
        self.reused = 0

    def learn(self, attr: Attr, blocks: list[BlockRef]) -> None:
        """A map fresh from the metaserver (with read tokens) of the file of `attr`."""
        if not blocks or len(blocks) > MAP_KEPT_BLOCKS_MAX:
            self._maps.pop(attr.ino, None)
            return
        self._maps[attr.ino] = (attr.generation, blocks, time.monotonic())
        self._maps.move_to_end(attr.ino)
        while len(self._maps) > MAPS_KEPT:
            self._maps.popitem(last=False)

    def offer(self, ino: int) -> Optional[tuple[int, list[BlockRef]]]:
        """(generation, map) kept of `ino`, for an open to name (None: none, or too old)."""
        kept = self._maps.get(ino)
        if kept is None or time.monotonic() - kept[2] > MAP_KEPT_S:
            return None
        return kept[0], kept[1]


@dataclass
class WritebackBudget:
    """Bytes held in dirty blocks across all files of one client."""

    limit_bytes: int
    used_bytes: int = 0

    def over(self) -> bool:
        return self.used_bytes > self.limit_bytes


class DirtyBlock:
    """The newest content of one block, from the block's start (shorter than the block near
    the end of the file). While every write appends, it is kept as the writes' own
    immutable buffers, not copied (a sequential writer's 1 MiB FUSE writes become the
    upload's chunks as they came); the first write anywhere else gathers it into one
    bytearray, written in place from then on. An upload takes a `snapshot`; a write while
    the bytearray is in an upload copies it first (copy-on-write)."""

    __slots__ = ("_pieces", "_buf", "_frozen", "length", "version")

    def __init__(self, base: bytes = b"") -> None:
        self._pieces: list[bytes | memoryview] = [base] if base else []
        self._buf: Optional[bytearray] = None
        self._frozen = False  # an upload holds _buf
        self.length = len(base)
        self.version = 0  # bumped by every write into it

    def __len__(self) -> int:
        return self.length

    def write(self, offset: int, data: memoryview) -> int:
        """Write data at offset; returns how many bytes the block grew by."""
        before = self.length
        if self._buf is None and offset == self.length:
            # An append: keep the caller's buffer when it cannot change under us.
            self._pieces.append(data if isinstance(data.obj, bytes) else bytes(data))
            self.length += len(data)
        else:
            if self._buf is None:
                self._buf, self._pieces = bytearray(b"".join(self._pieces)), []
            elif self._frozen:
                self._buf, self._frozen = bytearray(self._buf), False
            if len(self._buf) < offset:
                self._buf.extend(bytes(offset - len(self._buf)))
            self._buf[offset : offset + len(data)] = data
            self.length = len(self._buf)
        self.version += 1
        return self.length - before

    def read(self, offset: int, n: int) -> bytes:
        if self._buf is not None:
            return bytes(self._buf[offset : offset + n])
        return bytes(span(self._pieces, offset, min(offset + n, self.length)))

    def snapshot(self) -> list[bytes | bytearray | memoryview]:
        """The content as buffers that no later write changes, for an upload (release it
        with `release` when done)."""
        if self._buf is not None:
            self._frozen = True
            return [self._buf]
        return list(self._pieces)

    def release(self, snapshot: list) -> None:
        if self._buf is not None and snapshot and snapshot[0] is self._buf:
            self._frozen = False

    def content(self) -> bytes:
        return self.read(0, self.length)


@dataclass
class HandleState:
    ino: int
    writable: bool = False  # opened for writing (ftruncate through it counts the open's permission)
    last_read_end: int = -1  # where this handle's previous read ended
    furthest_read: int = 0  # the furthest any read through it reached (Reader.closed)
    readahead_blocks: int = 0  # current readahead window; grows while reads stay sequential
    accessed: bool = False  # a read went through it (atime: the metaserver was told)
    recorded: bool = True  # its open is recorded on the metaserver (a release follows its close)


@dataclass
class FileState:
    ino: int
    attr: Attr  # last attributes from the metaserver (size/mtime overlaid by local writes)
    block_size: int
    budget: WritebackBudget
    blocks: dict[int, BlockRef] = field(default_factory=dict)
    dirty: dict[int, DirtyBlock] = field(default_factory=dict)
    uploaded: dict[int, tuple[BlockRef, int]] = field(default_factory=dict)  # index -> (ref, version)
    spare: dict[int, Allocation] = field(default_factory=dict)  # allocated ahead of their writes, unused yet
    # An allocation of spares on its way (writer.py, ALLOC_AHEAD_BLOCKS): the indexes it
    # asks for, and set once its reply is in `spare` (or it failed).
    ahead: Optional[tuple[frozenset[int], trio.Event]] = None
    unsynced: dict[str, set[int]] = field(default_factory=dict)  # server -> blocks written without fsync
    flushing: dict[int, trio.Event] = field(default_factory=dict)
    commit_lock: trio.Lock = field(default_factory=trio.Lock)
    size: int = 0
    mtime_ns: Optional[int] = None  # time of the newest local write not yet committed
    handles: int = 0  # open handles of this client on the inode
    unrecorded: int = 0  # of those, handles whose open the metaserver did not record
    error: Optional[int] = None  # errno of a failed background upload, reported by fsync/close
    commits: int = 0  # commits made by this client (fsync tells whether it made one)
    expired_commits: int = 0  # commits refused for expired allocations, then retried
    no_capability: bool = False  # security.capability known absent (the kernel asks on every write)
    inline: Optional[bytes] = None  # block 0's bytes when the metaserver keeps it inline
    inline_refused: bool = False  # the metaserver refused an inline commit: use blocks
    created_in: int = 0  # the directory this client created it in (0: opened, not created)
    opener: Optional[Ctx] = None  # who opened it first here, to open it again in a new session
    writable: bool = False  # some handle here opened it for writing
    grant: bytes = b""  # the metaserver's proof of an open here (for writing if `writable`), to open it so again (OpenReq.grant)
    stage: Optional[Staged] = None  # written to the local staging area, not yet uploaded (staging.py)

    def opened(self, ctx: Ctx, writable: bool, grant: bytes) -> None:
        """One more open here, as `ctx`, for writing or not, with the metaserver's grant
        (b"": none). What a new session registers again: the first opener, for writing if
        any open was, with the grant for that."""
        self.opener = self.opener or ctx
        if grant and (writable or not self.writable):
            self.grant = grant
        self.writable = self.writable or writable

    def set_map(self, attr: Attr, blocks: list[BlockRef], with_inline: OpenReply | BlockMapReply | None = None) -> None:
        """Take a fresh attr and block map (and inline block 0) from the server; local dirty
        data stays on top."""
        self.attr = attr
        self.block_size = attr.block_size
        self.blocks = {b.index: b for b in blocks}
        self.inline = inline_of(with_inline) if with_inline is not None else None
        self.size = max([attr.size] + [self.dirty_end(i) for i in self.dirty])
        if self.stage is not None:
            self.size = self.stage.size

    @property
    def inline_limit(self) -> int:
        """The most bytes block 0 may hold and still be committed inline."""
        return 0 if self.inline_refused else min(self.attr.inline_max, self.block_size)

    def dirty_end(self, index: int) -> int:
        return index * self.block_size + len(self.dirty[index])

    def dirty_bytes(self) -> int:
        return sum(len(d) for d in self.dirty.values())

    def uploaded_current(self, index: int) -> bool:
        """The upload waiting for commit holds the newest content of block `index`."""
        up = self.uploaded.get(index)
        return up is not None and index in self.dirty and up[1] == self.dirty[index].version

    def busy(self) -> bool:
        """Anything not yet committed."""
        return bool(self.dirty or self.flushing or self.uploaded)

    def new_dirty(self, index: int, base: bytes) -> DirtyBlock:
        d = self.dirty[index] = DirtyBlock(base)
        self.budget.used_bytes += len(base)
        return d

    def write_into(self, d: DirtyBlock, offset: int, data: memoryview) -> None:
        self.budget.used_bytes += d.write(offset, data)

    def drop_dirty(self, index: int) -> None:
        d = self.dirty.pop(index)
        self.budget.used_bytes -= len(d)

    def drop_all(self) -> None:
        for index in list(self.dirty):
            self.drop_dirty(index)
        self.uploaded.clear()

    def refresh_stage(self) -> None:
        """A staged file's size and mtime, taken from its local copy (Staged.refresh)."""
        s = self.stage
        assert s is not None
        s.refresh()
        self.size, self.mtime_ns = s.size, s.mtime_ns

    def overlay(self, attr: Attr) -> Attr:
        """attr with this client's uncommitted size and mtime applied."""
        self.attr = attr
        if self.stage is not None:
            if self.stage.direct:  # the kernel writes the local copy itself
                self.refresh_stage()
            size = self.stage.size  # what this client wrote; the server has not seen it yet
        elif not self.busy():
            self.size = attr.size
            return attr
        else:
            size = max(attr.size, self.size)
        mtime = self.mtime_ns if self.mtime_ns is not None else attr.mtime_ns
        if size == attr.size and mtime == attr.mtime_ns:
            return attr
        return Attr(**{**attr.__dict__, "size": size, "mtime_ns": mtime, "ctime_ns": max(attr.ctime_ns, mtime)})


def inline_of(reply: OpenReply | BlockMapReply) -> Optional[bytes]:
    """The inline block 0 of an open or block-map reply, checked against the checksum the
    metaserver committed (no server's word is taken for bytes)."""
    if not reply.inline:
        return None
    if crc32c.crc32c(reply.data) != reply.inline_crc32c:
        raise FsError(errno.EIO, f"inode {reply.attr.ino}: inline data fails its checksum")
    return reply.data
