"""The client's local disk tier: blocks read from data servers kept in a directory of the
client machine (`stripefs mount --cache-dir DIR --cache-size SIZE`), so that a dataset
larger than the memory cache is read from local disk from its second epoch on, and
survives a remount.

Layout: `DIR/blocks/XX/ID` per block (XX: the id's low byte in hex), each file a header
(magic, the CRC32C of the block's bytes, their length) and the block's bytes as its writer
stored them. `DIR/lock` is held (flock) by the one client using the directory: a second
mount of the same directory is refused.

Invalidation needs no rule of its own: as in the memory cache, a block id names one
content for ever (every write stores a new block), and readers ask for the ids of the map
their own open fetched, so a file changed elsewhere is read through its new blocks; the
old ones are never asked for again and age out. Checked: every block read back is checked
against its CRC32C (a block fetched from a data server was checked against its writer's
digest before it was kept); a file that fails (torn by a crash, damaged on disk) is
removed and the block fetched again. Bounded: the bytes kept never exceed `limit_bytes`;
the least recently used blocks go first (after a remount, the least recently written).
Written in the background, a few at once; a block that would wait behind more than
WRITE_QUEUE_BYTES is not kept. Every disk access runs in a worker thread, never on the
trio thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import crc32c
import trio

from stripefs.proto.codec import Block, buffers_of
from stripefs.proto.errors import FsError

log = logging.getLogger("stripefs.client")

#: Bytes of block writes queued at once; a block beyond is not kept.
WRITE_QUEUE_BYTES = 64 * 1024 * 1024
#: Block files written at once.
WRITERS = 4
_MAGIC = b"SFBLK1\0\0"
_HEADER = struct.Struct("<8sIQ")  # magic, crc32c, length


def parse_size(text: str) -> int:
    """`10G`, `512M`, `1T`, `1000000` as bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units and not t[-1:].isdigit() else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a size (like 10G, 512M)") from None
    if value < 0:
        raise ValueError(f"{text!r} is not a size")
    return int(value)


class DiskTier:
    """Blocks by id in a local directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, limit_bytes: int) -> None:
        self.directory = Path(directory)
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self.hits = self.misses = self.corrupt = 0
        self._index: OrderedDict[int, int] = OrderedDict()  # block id -> bytes on disk, LRU first
        self._writing: dict[int, int] = {}  # block id -> bytes, queued or being written
        self._writers = trio.CapacityLimiter(WRITERS)
        self._lock_fd: Optional[int] = None
        self._mu = threading.Lock()  # the index, from worker threads and the trio thread
        self._open()

    # ------------------------------------------------------------------ setup

    def _open(self) -> None:
        """Take the directory (refused if another client holds it) and index what is in it
        (the least recently written first): runs before the client serves anything."""
        blocks = self.directory / "blocks"
        blocks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FsError(errno.EBUSY, f"{self.directory} is the cache directory of another client") from None
        self._lock_fd = fd
        found: list[tuple[int, int, int]] = []  # (mtime, id, bytes)
        for sub in blocks.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)  # a write a crash interrupted
                    continue
                try:
                    st = f.stat()
                    found.append((st.st_mtime_ns, int(f.name), st.st_size - _HEADER.size))
                except (ValueError, OSError):
                    continue
        for _, block_id, size in sorted(found):
            self._index[block_id] = size
            self.used_bytes += size
        self._evict()
        if found:
            log.info("disk tier %s: %d blocks, %d bytes kept from before", self.directory, len(self._index),
                     self.used_bytes)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _path(self, block_id: int) -> Path:
        return self.directory / "blocks" / f"{block_id & 0xFF:02x}" / str(block_id)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        """Blocks kept."""
        return len(self._index)

    @property
    def writing(self) -> int:
        """Blocks queued or being written."""
        return len(self._writing)

    def holds(self, block_id: int) -> bool:
        return block_id in self._index

    async def get(self, block_id: int) -> Optional[bytes]:
        """The block's bytes from disk, checked; None if not kept (or found damaged, then
        removed)."""
        if block_id not in self._index:
            self.misses += 1
            return None
        with self._mu:
            if block_id in self._index:
                self._index.move_to_end(block_id)
        data = await trio.to_thread.run_sync(self._read, block_id)
        if data is None:
            self.misses += 1
        else:
            self.hits += 1
        return data

    def _read(self, block_id: int) -> Optional[bytes]:
        path = self._path(block_id)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            self._forget(block_id)
            return None
        except OSError as exc:
            log.warning("disk tier: block %d unreadable (%s): fetched again", block_id, exc)
            self._remove(block_id)
            return None
        if len(raw) >= _HEADER.size:
            magic, crc, length = _HEADER.unpack_from(raw)
            data = raw[_HEADER.size :]
            if magic == _MAGIC and length == len(data) and crc32c.crc32c(data) == crc:
                return data
        self.corrupt += 1
        log.warning("disk tier: block %d failed its checksum in %s: removed, fetched again", block_id, path)
        self._remove(block_id)
        return None

    # ------------------------------------------------------------------ writing

    def put_soon(self, spawn: Callable[..., None], block_id: int, data: Block) -> None:
        """Keep a block (checked already) on disk, written in the background."""
        size = len(data)
        if (block_id in self._index or block_id in self._writing or size > self.limit_bytes
                or sum(self._writing.values()) + size > WRITE_QUEUE_BYTES):
            return
        self._writing[block_id] = size
        spawn(self._write_in_background, block_id, data)

    async def _write_in_background(self, block_id: int, data: Block) -> None:
        try:
            async with self._writers:
                await trio.to_thread.run_sync(self._write, block_id, data)
        finally:
            self._writing.pop(block_id, None)

    def _write(self, block_id: int, data: Block) -> None:
        path = self._path(block_id)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            crc = 0
            for piece in buffers_of(data):
                crc = crc32c.crc32c(piece, crc)
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, crc, len(data)))
                f.writelines(buffers_of(data))
            os.replace(tmp, path)
        except OSError as exc:
            # A full or failing local disk costs the tier, never a read.
            log.warning("disk tier: block %d not kept: %s", block_id, exc)
            tmp.unlink(missing_ok=True)
            return
        with self._mu:
            if block_id not in self._index:
                self._index[block_id] = len(data)
                self.used_bytes += len(data)
        self._evict()

    def _evict(self) -> None:
        """Remove least recently used blocks until the bytes kept fit the limit."""
        while True:
            with self._mu:
                if self.used_bytes <= self.limit_bytes or not self._index:
                    return
                block_id, size = self._index.popitem(last=False)
                self.used_bytes -= size
            self._path(block_id).unlink(missing_ok=True)

    def _forget(self, block_id: int) -> None:
        with self._mu:
            size = self._index.pop(block_id, None)
            if size is not None:
                self.used_bytes -= size

    def _remove(self, block_id: int) -> None:
        self._forget(block_id)
        try:
            self._path(block_id).unlink(missing_ok=True)
        except OSError:
            pass
