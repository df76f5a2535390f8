"""The block store of a data server: immutable blocks as checksummed files under one directory.

Layout under `root`:

    node_id                  uuid hex naming this data directory, made on first start
    blocks/<hh>/<id>         one file per block; hh = id % 256 as two lowercase hex digits
    tmp/                     blocks being written; anything here at start is a leftover
    corrupt/<id>.<ns>        blocks that failed their checksums, moved aside for forensics
                             (never read again; an operator may delete them at will)

A block file is a header then the data. The header is FIXED_HEADER (magic, format
version, sub-block size in KiB, data length) followed by one CRC32C per sub-block of data
(the last one covers the short tail). A read fetches and verifies only the sub-blocks
covering the requested range, so a 4 KiB read of a 4 MiB block costs 4 KiB of disk and CRC
work. New blocks use SUB_BLOCK_BYTES (4 KiB); files of the format's first version (a
flags field, always 0, where the size is now, and 64 KiB sub-blocks) are still read.
Version 3 is version 2 with the writer's leaf hashes (proto/integrity.py) after the data,
then a CRC32C of them: kept for range readers, who check them against the digest the
metaserver holds; the CRC catches rot there as the sub-block CRCs do in the data (reads of
the hashes and `verify`, so the scrubber too), and a copy is checked against the digest
when a client reports it (`check` with a digest).

Crash behaviour: a block is written to tmp/ (chunk by chunk as it arrives, BlockWriter; the
header with its CRCs last), fsynced, then hard-linked into blocks/ and the directory
fsynced. The link, unlike rename, fails if the name exists, so two writers of one id can
never replace each other's data and nothing partial is ever visible under
blocks/. A crash leaves at worst a file in tmp/, removed at the next start.

Concurrency: every method may be called from many gRPC worker threads at once. Per-block
operations rely on the file system's atomic link/unlink/rename; the counters are guarded by
`_lock`, which is never held across disk I/O except on the rare repair path.

Ids are never trusted: every public method checks that a block id is a positive 64-bit
integer before building a path from it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import shutil
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import crc32c

from stripefs.proto import metrics
from stripefs.proto.errors import FsError
from stripefs.proto.integrity import LEAF_HASH_BYTES, leaf_count, leaves_match, matches
from stripefs.proto.types import MAX_BLOCK_SIZE_BYTES, SUB_BLOCK_BYTES, BlockId

log = logging.getLogger("stripefs.dataserver.store")

MAGIC = b"SFBK"
FORMAT_VERSION = 2
#: Version 2 with the writer's leaf hashes after the data.
FORMAT_WITH_LEAVES = 3
#: magic, format version, sub-block size in KiB (version 1: flags, always 0), data length
#: in bytes; little-endian.
FIXED_HEADER = struct.Struct("<4sHHQ")
#: The sub-block size of version 1 files.
V1_SUB_BLOCK_BYTES = 64 * 1024
_CRC = struct.Struct("<I")
_MAX_BLOCK_ID = (1 << 64) - 1
#: OS errors a writer should see as they are; any other failure to store is EIO.
_PASS_THROUGH_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


@dataclass(frozen=True)
class StoreStats:
    capacity_bytes: int  # size of the file system holding the store (statvfs)
    free_bytes: int  # bytes available to an unprivileged writer there
    used_bytes: int  # bytes of block files (headers included)
    blocks: int  # blocks stored
    corrupt_blocks: int  # distinct blocks found with a checksum mismatch since start


def check_block_id(block_id: object) -> BlockId:
    """The id as a BlockId, or FsError(EINVAL): the only way an id reaches a path."""
    if not isinstance(block_id, int) or isinstance(block_id, bool) or not 0 < block_id <= _MAX_BLOCK_ID:
        raise FsError(errno.EINVAL, f"bad block id {block_id!r}")
    return BlockId(block_id)


def _sub_blocks(length: int, sub: int) -> int:
    return (length + sub - 1) // sub


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# Drop-behind: a block written here leaves the page cache once it is on disk. A data server
# writes far more than it reads back soon (checkpoints, datasets written once and read in
# later epochs), and every new page of page cache costs the writer: on the machines we
# measure on (virtual, memory backed on first touch) pwrite into fresh page cache is
# ~400 MiB/s of one core's system time, against ~2 GiB/s when written pages are handed
# back as they reach the disk and their memory is reused (the data servers used 3.5-4
# CPU-s each to store 0.7 GiB; docs/dataserver.md, "Drop-behind"). HDFS's data nodes offer
# the same (drop-behind writes), Ceph's BlueStore bypasses the page cache altogether.
# A write starts each chunk's writeback as it lands (sync_file_range, not waiting); finish
# waits for the rest and drops the whole file's pages (POSIX_FADV_DONTNEED drops clean
# pages only). Readers of a block read it from disk, as a cold cache would have anyway.
DROP_BEHIND = True
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def _libc_function(name: str, restype: Any, argtypes: Optional[list] = None) -> Optional[Callable[..., int]]:
    """The C library's function `name` (errno kept for ctypes.get_errno), or None where
    there is none (not Linux with glibc)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.restype = restype
    if argtypes is not None:
        fn.argtypes = argtypes
    return fn


# Without it (not Linux with glibc) writes stay cached.
_sync_file_range = _libc_function("sync_file_range", ctypes.c_int,
                                  [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing [offset, offset+length) to disk, without waiting."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _drop_written(fd: int, on_disk: bool) -> None:
    """A whole file's pages out of the page cache, after waiting for them to reach the
    disk unless `on_disk` (fsynced). A write error found while waiting is raised here: it
    is consumed by this wait, so a later fsync of the file would not see it."""
    if not on_disk and _sync_file_range is not None:
        if _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                            | _SYNC_FILE_RANGE_WAIT_AFTER) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# cachestat(2) (Linux 6.5 and later): how many pages of a range of a file are in the page
# cache. A streamed read asks it before reading a chunk on the event loop (get_cached).
_CACHESTAT_NR = 451  # the same number on every architecture (the generic syscall table)
_PAGE_BYTES = mmap.PAGESIZE


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]


# syscall(2) takes its arguments as the call needs them: typed at each call.
_syscall = _libc_function("syscall", ctypes.c_long) if os.uname().sysname == "Linux" else None
_cachestat_works = _syscall is not None


def _pages_cached(fd: int, offset: int, length: int) -> bool:
    """Whether every page of [offset, offset+length) of the file is in the page cache.
    False where the kernel cannot say (no cachestat: before Linux 6.5), so a caller that
    must not wait for the disk reads elsewhere."""
    global _cachestat_works
    if not _cachestat_works or length <= 0:
        return _cachestat_works
    first = offset // _PAGE_BYTES
    pages = (offset + length + _PAGE_BYTES - 1) // _PAGE_BYTES - first
    rng, st = _CachestatRange(first * _PAGE_BYTES, pages * _PAGE_BYTES), _Cachestat()
    assert _syscall is not None
    if _syscall(_CACHESTAT_NR, ctypes.c_uint(fd), ctypes.byref(rng), ctypes.byref(st), ctypes.c_uint(0)) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # not this kernel (or a seccomp filter)
            _cachestat_works = False
        return False
    return st.nr_cache >= pages


class _NotCached(Exception):
    """get_cached: a page it would read is not in the page cache."""


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    buf = os.pread(fd, size, offset)
    if len(buf) != size:
        raise _Corrupt(f"short read: {len(buf)} of {size} bytes at {offset}")
    return buf


class _Corrupt(Exception):
    """A block file that does not match its own header."""


class BlockStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blocks_dir = self.root / "blocks"
        self._tmp_dir = self.root / "tmp"
        self._corrupt_dir = self.root / "corrupt"
        self._lock = threading.Lock()
        self._used_bytes = 0
        self._blocks = 0
        self._corrupt: set[int] = set()
        self._unreported: set[int] = set()  # moved aside, not yet reported to the metaserver

        for d in (self.root, self._blocks_dir, self._tmp_dir, self._corrupt_dir):
            d.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (self._blocks_dir / f"{i:02x}").mkdir(exist_ok=True)
        self._clear_tmp()
        self.node_id = self._load_node_id()
        for block_id in self.block_ids():
            try:
                size = os.stat(self._path(block_id)).st_size
            except FileNotFoundError:
                continue
            self._blocks += 1
            self._used_bytes += size

    # ----------------------------------------------------------------------- setup

    def _clear_tmp(self) -> None:
        for entry in os.scandir(self._tmp_dir):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass
            log.info("removed leftover temporary file %s", entry.path)

    def _load_node_id(self) -> str:
        path = self.root / "node_id"
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            value = ""
        if value:
            try:
                return uuid.UUID(hex=value).hex
            except ValueError:
                raise ValueError(f"{path} does not hold a uuid: {value!r}") from None
        value = uuid.uuid4().hex
        tmp = self._tmp_dir / "node_id"
        tmp.write_text(value + "\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._fsync_dir(self.root)
        return value

    # ----------------------------------------------------------------------- paths

    def _path(self, block_id: int) -> Path:
        block_id = check_block_id(block_id)
        return self._blocks_dir / f"{block_id % 256:02x}" / str(block_id)

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ----------------------------------------------------------------------- write

    def put(self, block_id: int, data: bytes | bytearray | memoryview, sync: bool = True,
            leaves: bytes = b"") -> None:
        """Store a whole block at once (re-replication, tests): a writer fed one chunk."""
        w = self.writer(block_id, len(data), sync)
        try:
            w.write(data, leaves)
            w.finish()
        finally:
            w.close()

    def writer(self, block_id: int, length: int, sync: bool = True) -> "BlockWriter":
        """A block of `length` bytes to be stored chunk by chunk (the write chain streams
        blocks in): BlockWriter.write each chunk in order, then finish. EFBIG past the
        largest block size."""
        path = self._path(block_id)
        if not 0 <= length <= MAX_BLOCK_SIZE_BYTES:
            raise FsError(errno.EFBIG, f"block {block_id}: {length} bytes is over {MAX_BLOCK_SIZE_BYTES}")
        return BlockWriter(self, check_block_id(block_id), path, length, sync)

    def sync_blocks(self, block_ids: list[int]) -> None:
        """Make stored blocks durable: fsync each block file and, once, each directory
        holding one (blocks stored with sync=False). A block that is gone is skipped: it
        was deleted as garbage, or quarantined and reported."""
        dirs = set()
        try:
            for block_id in block_ids:
                path = self._path(block_id)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                dirs.add(path.parent)
            for d in dirs:
                self._fsync_dir(d)
        except OSError as exc:
            log.error("cannot sync blocks: %s", exc)
            raise FsError(errno.EIO, f"sync: {exc.strerror or exc}") from None

    def _link_into_place(self, block_id: int, tmp: Path, path: Path, size: int, sync: bool = True) -> None:
        # A few rounds only because a concurrent delete can remove the name between our
        # failed link and our look at what holds it.
        for _ in range(3):
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            else:
                if sync:
                    self._fsync_dir(path.parent)
                with self._lock:
                    self._blocks += 1
                    self._used_bytes += size
                    # Stored again after being moved aside: the copy is not missing any more.
                    self._unreported.discard(block_id)
                return
            try:
                if self._same_content(block_id, tmp):
                    return
            except FsError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                if exc.errno != errno.EIO:
                    raise
                self._repair(block_id, tmp, path, size)
                return
            raise FsError(errno.EEXIST, f"block {block_id} exists with different content")
        raise FsError(errno.EIO, f"block {block_id}: name kept changing while storing it")

    def _repair(self, block_id: int, tmp: Path, path: Path, size: int) -> None:
        # The stored copy failed its checksums and the writer holds a token for this id, so
        # its content is the block's content: replacing the corrupt copy is a repair.
        with self._lock:
            try:
                old = os.stat(path).st_size
            except FileNotFoundError:
                old = None
            os.replace(tmp, path)
            self._fsync_dir(path.parent)
            if old is None:
                self._blocks += 1
                old = 0
            self._used_bytes += size - old
            self._corrupt.discard(block_id)
        log.warning("block %d: replaced a corrupt copy with a rewritten one", block_id)

    def _same_content(self, block_id: int, tmp: Path) -> bool:
        """Whether the stored block holds what the finished temporary file `tmp` holds (a
        retried write): the same data and leaf hashes, the stored copy verified."""
        stored, leaves = self.get(block_id), self.get_leaves(block_id)
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _, _, data_start, data_len, trailer_len = self._layout(fd)
            if data_len != len(stored):
                return False
            new_leaves = _pread_exact(fd, trailer_len - _CRC.size, data_start + data_len) if trailer_len else b""
            return new_leaves == leaves and _pread_exact(fd, data_len, data_start) == stored
        except _Corrupt:
            return False
        finally:
            os.close(fd)

    # ----------------------------------------------------------------------- read

    def get(self, block_id: int, offset: int = 0, length: int = -1) -> bytes:
        """Bytes [offset, offset+length) of a block (length -1: to its end), each covering
        sub-block verified. Reading past the end returns what there is (maybe nothing)."""
        if not isinstance(offset, int) or offset < 0 or not isinstance(length, int) or length < -1:
            raise FsError(errno.EINVAL, f"block {block_id}: bad range {offset}+{length}")
        return self._reading(block_id, lambda fd: self._read_range(fd, offset, length))

    def get_cached(self, block_id: int, offset: int = 0, length: int = -1) -> Optional[bytes]:
        """`get`, from the page cache only: None where a page it would read is not there
        (or the kernel cannot say), so that a caller on an event loop starts no disk read
        there (it may wait for the end of a read-ahead already under way for those pages:
        cachestat counts them as cached), and hands the rest to a thread. The pages of the
        file are asked about, not its name and inode: for a block read a moment ago (a
        streamed read's chunks after its first, which are there as a rule, the kernel
        having read ahead the block: see _read_range)."""
        if not isinstance(offset, int) or offset < 0 or not isinstance(length, int) or length < -1:
            raise FsError(errno.EINVAL, f"block {block_id}: bad range {offset}+{length}")
        try:
            return self._reading(block_id, lambda fd: self._read_range(fd, offset, length, cached_only=True))
        except _NotCached:
            return None

    def get_leaves(self, block_id: int) -> bytes:
        """The leaf hashes stored with a block (b"" for a block stored without them)."""

        def read(fd: int) -> bytes:
            _, _, data_start, data_len, trailer_len = self._layout(fd)
            if not trailer_len:
                return b""
            trailer = _pread_exact(fd, trailer_len, data_start + data_len)
            leaves, (crc,) = trailer[: -_CRC.size], _CRC.unpack(trailer[-_CRC.size :])
            if crc32c.crc32c(leaves) != crc:
                raise _Corrupt("checksum mismatch in the leaf hashes")
            return leaves

        return self._reading(block_id, read)

    def _reading(self, block_id: int, read: Callable[[int], bytes]) -> bytes:
        """read(fd) of a block's file, with ENOENT for a missing block and EIO for a corrupt
        (counted, see is_corrupt) or unreadable one."""
        path = self._path(block_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FsError(errno.ENOENT, f"no block {block_id}") from None
        except OSError as exc:
            raise FsError(errno.EIO, f"block {block_id}: {exc.strerror or exc}") from None
        try:
            return read(fd)
        except _Corrupt as exc:
            self._found_corrupt(block_id, str(exc))
            raise FsError(errno.EIO, f"block {block_id} is corrupt: {exc}") from None
        except OSError as exc:
            log.error("block %d: read failed: %s", block_id, exc)
            raise FsError(errno.EIO, f"block {block_id}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    @staticmethod
    def _layout(fd: int) -> tuple[int, int, int, int, int]:
        """(version, sub-block size, where the data starts, its length, bytes of leaf
        hashes and their CRC after it) of a block file, checked against the file's size."""
        magic, version, sub_kib, data_len = FIXED_HEADER.unpack(_pread_exact(fd, FIXED_HEADER.size, 0))
        if magic != MAGIC or version not in (1, FORMAT_VERSION, FORMAT_WITH_LEAVES):
            raise _Corrupt(f"bad magic {magic!r} or format version {version}")
        sub = V1_SUB_BLOCK_BYTES if version == 1 else sub_kib * 1024
        if not 0 < sub <= MAX_BLOCK_SIZE_BYTES or sub & (sub - 1):
            raise _Corrupt(f"sub-block size {sub} out of range")
        if data_len > MAX_BLOCK_SIZE_BYTES:
            raise _Corrupt(f"data length {data_len} out of range")
        data_start = FIXED_HEADER.size + _CRC.size * _sub_blocks(data_len, sub)
        trailer_len = leaf_count(data_len) * LEAF_HASH_BYTES + _CRC.size if version == FORMAT_WITH_LEAVES else 0
        # A truncated or extended file fails here even when the asked range looks intact.
        if os.fstat(fd).st_size != data_start + data_len + trailer_len:
            raise _Corrupt(f"file size does not match data length {data_len}")
        return version, sub, data_start, data_len, trailer_len

    @classmethod
    def _read_range(cls, fd: int, offset: int, length: int, cached_only: bool = False) -> bytes:
        """Bytes [offset, offset+length) of an open block file, each covering sub-block
        verified; with `cached_only`, _NotCached unless every page read is in the page
        cache (the header's, checked before reading it, and the range's)."""
        if cached_only and not _pages_cached(fd, 0, FIXED_HEADER.size):
            raise _NotCached()
        _, sub, data_start, data_len, _ = cls._layout(fd)
        end = data_len if length == -1 else min(data_len, offset + length)
        if offset >= end:
            return b""
        first, last = offset // sub, (end - 1) // sub
        count = last - first + 1
        # The data of a block starts on the page after the first CRCs, so the kernel
        # takes a first chunk's data read below for a sequential reader's and reads ahead
        # widely; a layout that breaks that makes cold reads cost 2.3x the system time
        # (docs/dataserver.md, "Cold reads and the kernel's read-ahead").
        if cached_only and not _pages_cached(fd, FIXED_HEADER.size + _CRC.size * first, _CRC.size * count):
            raise _NotCached()
        crcs = struct.unpack(
            f"<{count}I", _pread_exact(fd, _CRC.size * count, FIXED_HEADER.size + _CRC.size * first)
        )
        span_start = first * sub
        span_end = min(data_len, (last + 1) * sub)
        if cached_only and not _pages_cached(fd, data_start + span_start, span_end - span_start):
            raise _NotCached()
        buf = _pread_exact(fd, span_end - span_start, data_start + span_start)
        view = memoryview(buf)
        for i, expected in enumerate(crcs):
            piece = view[i * sub : (i + 1) * sub]
            if crc32c.crc32c(piece) != expected:
                raise _Corrupt(f"checksum mismatch in sub-block {first + i}")
        lo, hi = offset - span_start, end - span_start
        return buf if (lo, hi) == (0, len(buf)) else bytes(view[lo:hi])

    def _found_corrupt(self, block_id: int, why: str) -> None:
        with self._lock:
            self._corrupt.add(block_id)
        log.error("block %d in %s is corrupt: %s", block_id, self.root, why)

    def verify(self, block_id: int) -> int:
        """Read and check a whole block, and its leaf hashes; returns its data length.
        FsError(EIO) if corrupt (see is_corrupt), ENOENT if it is gone."""
        length = len(self.get(block_id))
        self.get_leaves(block_id)
        return length

    def is_corrupt(self, block_id: int) -> bool:
        """Whether reads of this block found a checksum mismatch (and it was not rewritten)."""
        with self._lock:
            return block_id in self._corrupt

    def quarantine(self, block_id: int) -> bool:
        """Move a corrupt block out of blocks/ into corrupt/, so it is never served again
        and the metaserver re-replicates it from a good copy; queue it for the next
        report. True if it was there to move."""
        path = self._path(block_id)
        dest = self._corrupt_dir / f"{block_id}.{time.time_ns()}"
        # Under the lock so the counters follow the file exactly; a rename is metadata only.
        with self._lock:
            try:
                size = os.stat(path).st_size
                os.rename(path, dest)
            except FileNotFoundError:
                return False
            except OSError as exc:
                log.error("cannot move corrupt block %d aside: %s", block_id, exc)
                return False
            self._blocks -= 1
            self._used_bytes -= size
            self._unreported.add(block_id)
        log.error("block %d is corrupt: moved aside to %s", block_id, dest)
        return True

    def check(self, block_id: int, digest: bytes = b"") -> str:
        """Verify a whole block against its checksums and, if given, the digest its writer
        committed (proto/integrity.py): "good"; "corrupt" (moved aside, queued for the next
        report); "missing" (not here: queued too, the metaserver's replica row is wrong); or
        "unreadable" (an I/O error that is not a checksum: the copy is left alone)."""
        try:
            if not digest:
                self.verify(block_id)
                return "good"
            data = self.get(block_id)  # checks the checksums as it reads
            stored = self.get_leaves(block_id)
            if matches(digest, data) and (not stored or leaves_match(digest, len(data), stored)):
                return "good"
            log.error("block %d matches its checksums but not its writer's digest (or its leaf hashes"
                      " do not match it)", block_id)
            self.quarantine(block_id)
            return "corrupt"
        except FsError as exc:
            if exc.errno == errno.EIO and self.is_corrupt(block_id):
                self.quarantine(block_id)
                return "corrupt"
            if exc.errno == errno.ENOENT:
                with self._lock:
                    self._unreported.add(block_id)
                return "missing"
            log.warning("cannot check block %d: %s", block_id, exc)
            return "unreadable"

    def take_corrupt(self) -> list[int]:
        """Blocks moved aside since the last call (for HeartbeatReq.corrupt)."""
        with self._lock:
            ids, self._unreported = sorted(self._unreported), set()
        return ids

    def return_corrupt(self, block_ids: list[int]) -> None:
        """A report that did not reach the metaserver: send these again next time."""
        with self._lock:
            self._unreported.update(block_ids)

    # ----------------------------------------------------------------------- delete, list, stats

    def delete(self, block_id: int) -> bool:
        """Remove a block; True if it was there. No directory fsync: a block that comes
        back after a crash is still garbage and the metaserver asks for it again."""
        path = self._path(block_id)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise FsError(errno.EIO, f"cannot delete block {block_id}: {exc.strerror or exc}") from None
        with self._lock:
            self._blocks -= 1
            self._used_bytes -= size
            self._corrupt.discard(block_id)
        return True

    def block_ids(self) -> Iterator[BlockId]:
        """Ids of stored blocks, in no particular order. Names that are not a block of
        their directory (stray files) are skipped."""
        for i in range(256):
            shard = self._blocks_dir / f"{i:02x}"
            try:
                entries = list(os.scandir(shard))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if not (name.isascii() and name.isdigit()) or name.startswith("0"):
                    continue
                block_id = int(name)
                if block_id > _MAX_BLOCK_ID or block_id % 256 != i:
                    continue
                yield BlockId(block_id)

    def stats(self) -> StoreStats:
        st = os.statvfs(self.root)
        with self._lock:
            return StoreStats(
                capacity_bytes=st.f_blocks * st.f_frsize,
                free_bytes=st.f_bavail * st.f_frsize,
                used_bytes=self._used_bytes,
                blocks=self._blocks,
                corrupt_blocks=len(self._corrupt),
            )


class BlockWriter:
    """One block being stored, chunk by chunk, into a file under tmp/ (BlockStore.writer).

    Chunks come in order; each but the last is a whole number of sub-blocks, so each
    sub-block's CRC32C is computed from one chunk. A chunk may come with the CRC32C its
    sender computed of it and with the writer's leaf hashes of it: a CRC that does not
    match is EBADMSG (damaged on the way, at any hop; nothing of it is kept), and the leaf
    hashes are kept after the data (format 3) when every chunk brings them. `finish`
    writes the header (the sub-block CRCs) and the leaf hashes, fsyncs if asked and links
    the file into place as `put` always has; `close` removes what is left in tmp/. Not
    thread-safe: one writer per block and caller, used by one thread at a time."""

    def __init__(self, store: BlockStore, block_id: int, path: Path, length: int, sync: bool) -> None:
        self.store = store
        self.block_id = block_id
        self.path = path
        self.length = length
        self.sync = sync
        self.received = 0
        self._crcs: list[int] = []
        self._leaves: list[bytes] = []
        self._with_leaves: Optional[bool] = None
        self._data_start = FIXED_HEADER.size + _CRC.size * _sub_blocks(length, SUB_BLOCK_BYTES)
        self.tmp = store._tmp_dir / f"{block_id}.{uuid.uuid4().hex}"
        try:
            self._fd: Optional[int] = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> FsError:
        code = exc.errno if exc.errno in _PASS_THROUGH_ERRNOS else errno.EIO
        log.error("cannot store block %d: %s", self.block_id, exc)
        return FsError(code, f"block {self.block_id}: {exc.strerror or exc}")

    def write(self, data: bytes | bytearray | memoryview, leaves: bytes = b"", crc: Optional[int] = None) -> None:
        """The next chunk (see the class docstring)."""
        view = memoryview(data)
        if self._fd is None:
            raise FsError(errno.EINVAL, f"block {self.block_id}: written after finish")
        if self.received % SUB_BLOCK_BYTES or self.received + len(view) > self.length:
            raise FsError(errno.EINVAL, f"block {self.block_id}: chunk at {self.received} of {len(view)} bytes"
                                        f" does not fit a {self.length}-byte block")
        if crc is not None and crc32c.crc32c(view) != crc:
            raise FsError(errno.EBADMSG, f"block {self.block_id}: chunk at {self.received} damaged on the way"
                                         " (its CRC32C does not match)")
        if leaves and len(leaves) != leaf_count(len(view)) * LEAF_HASH_BYTES:
            raise FsError(errno.EINVAL, f"block {self.block_id}: {len(leaves)} bytes of leaf hashes"
                                        f" for {len(view)}")
        if self._with_leaves is None:
            self._with_leaves = bool(leaves)
        elif self._with_leaves != bool(leaves) and len(view):
            raise FsError(errno.EINVAL, f"block {self.block_id}: leaf hashes with some chunks only")
        self._crcs.extend(crc32c.crc32c(view[i : i + SUB_BLOCK_BYTES]) for i in range(0, len(view), SUB_BLOCK_BYTES))
        self._leaves.append(leaves)
        try:
            _pwrite_all(self._fd, view, self._data_start + self.received)
            if DROP_BEHIND:
                _start_writeback(self._fd, self._data_start + self.received, len(view))
        except OSError as exc:
            raise self._error(exc) from None
        self.received += len(view)
        metrics.data().written_bytes.inc(len(view))

    def finish(self) -> None:
        """Header and leaf hashes written, fsynced if asked, linked into place: stored."""
        if self._fd is None:
            raise FsError(errno.EINVAL, f"block {self.block_id}: finished twice")
        if self.received != self.length:
            raise FsError(errno.EINVAL, f"block {self.block_id}: {self.received} of {self.length} bytes received")
        leaves = b"".join(self._leaves) if self._with_leaves else b""
        version = FORMAT_WITH_LEAVES if leaves else FORMAT_VERSION
        header = (FIXED_HEADER.pack(MAGIC, version, SUB_BLOCK_BYTES // 1024, self.length)
                  + struct.pack(f"<{len(self._crcs)}I", *self._crcs))
        trailer = leaves + _CRC.pack(crc32c.crc32c(leaves)) if leaves else b""
        fd, self._fd = self._fd, None
        try:
            try:
                _pwrite_all(fd, memoryview(header), 0)
                if trailer:
                    _pwrite_all(fd, memoryview(trailer), self._data_start + self.length)
                if self.sync:
                    os.fsync(fd)
                if DROP_BEHIND:
                    _drop_written(fd, on_disk=self.sync)
            finally:
                os.close(fd)
            self.store._link_into_place(self.block_id, self.tmp, self.path,
                                        len(header) + self.length + len(trailer), self.sync)
        except OSError as exc:
            raise self._error(exc) from None

    def close(self) -> None:
        """Drop what is left in tmp/ (all of it unless finished)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
