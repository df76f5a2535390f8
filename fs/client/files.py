"""Per-inode state of open files in one client: the block map, write-back buffers and the
locally known size.

Concurrency protocol (one trio thread, see DESIGN.md):
- `dirty[i]` is the newest content of block i that is not yet committed. A writer mutates
  it in place and bumps its version; a flush takes a snapshot (bytes) and, after the commit,
  drops the entry only if the version is unchanged, so writes during a flush are never lost.
- At most one flush of a given block is in flight (`flushing[i]`): commits of one block
  therefore land in the order they were written, and an older snapshot can never overwrite
  a newer one.
- `size` is the file size as this client sees it: the server's size, grown by local writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import trio

from proto.messages import Attr, BlockRef


@dataclass
class DirtyBlock:
    data: bytearray  # block content from the block's start; shorter than block_size near EOF
    version: int = 0  # bumped by every write into it


@dataclass
class FileState:
    ino: int
    attr: Attr  # last attributes from the metaserver (size/mtime overlaid by local writes)
    block_size: int
    blocks: dict[int, BlockRef] = field(default_factory=dict)
    dirty: dict[int, DirtyBlock] = field(default_factory=dict)
    flushing: dict[int, trio.Event] = field(default_factory=dict)
    size: int = 0
    mtime_ns: Optional[int] = None  # time of the newest local write not yet committed
    handles: int = 0  # open handles of this client on the inode
    error: Optional[int] = None  # errno of a failed background flush, reported by fsync/close
    last_read_end: int = -1  # for sequential-read detection (readahead)

    def set_map(self, attr: Attr, blocks: list[BlockRef]) -> None:
        """Take a fresh attr and block map from the server; local dirty data stays on top."""
        self.attr = attr
        self.block_size = attr.block_size
        self.blocks = {b.index: b for b in blocks}
        self.size = max([attr.size] + [self.dirty_end(i) for i in self.dirty])

    def dirty_end(self, index: int) -> int:
        return index * self.block_size + len(self.dirty[index].data)

    def dirty_bytes(self) -> int:
        return sum(len(d.data) for d in self.dirty.values())

    def overlay(self, attr: Attr) -> Attr:
        """attr with this client's unflushed size and mtime applied."""
        self.attr = attr
        size = max(attr.size, self.size) if self.dirty or self.flushing else attr.size
        if not (self.dirty or self.flushing):
            self.size = attr.size
        mtime = self.mtime_ns if self.mtime_ns is not None and self.dirty else attr.mtime_ns
        if size == attr.size and mtime == attr.mtime_ns:
            return attr
        return Attr(**{**attr.__dict__, "size": size, "mtime_ns": mtime, "ctime_ns": max(attr.ctime_ns, mtime)})
