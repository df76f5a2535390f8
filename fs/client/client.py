"""The stripefs client library: the whole file system API as trio coroutines, FUSE-free.

`open_client()` connects to a metaserver, opens a session and yields a `Client`. Inodes are
ints, names are bytes, errors are FsError(errno). File data goes straight to the data
servers (striped, replicated); the metaserver only hands out block ids and commits block
maps. Caching, write-back and readahead live here so that programs using the library
directly get them too; fs/fuse only translates.

Consistency: close-to-open. `open` fetches the attributes and the whole block map; a
`flush` (close) or `fsync` returns only after every dirty block is on all its replicas and
the metaserver committed the new block map.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import socket
import stat
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import trio

from proto import messages as m
from proto.errors import FsError, TransportError
from proto.types import FILE_SIZE_MAX_BYTES
from proto.rpc import Stub
from proto.services import META_METHODS, META_SERVICE

from .data import DataPath
from .files import DirtyBlock, FileState, HandleState, WritebackBudget
from .rpc import call

log = logging.getLogger("stripefs.client")

#: Memory for unflushed writes per client; a writer past it waits for its own flushes.
DEFAULT_WRITEBACK_BYTES = 256 * 1024 * 1024
#: Memory for cached blocks per client.
DEFAULT_CACHE_BYTES = 128 * 1024 * 1024
#: Block uploads in flight at once per client (each holds a frame and gRPC's copies).
MAX_UPLOADS_IN_FLIGHT = 4
#: Uploaded blocks are committed in batches of this many (and at every fsync/close).
COMMIT_BATCH_BLOCKS = 16
#: Placements tried for a block whose replica servers fail during the write.
WRITE_PLACEMENT_ATTEMPTS = 4
#: Commits refused because their allocations expired that are retried (per open file).
MAX_EXPIRED_COMMITS = 3
#: Blocks allocated together with a create: a small file's close then needs no allocation trip.
PREALLOC_BLOCKS_AT_CREATE = 1
#: Largest readahead window of a sequential reader.
READAHEAD_MAX_BYTES = 64 * 1024 * 1024
#: Whole-block prefetches in flight at once per client.
MAX_PREFETCHES_IN_FLIGHT = 16
#: A read starting this close to where the handle's last read ended counts as sequential
#: (the kernel issues readahead requests concurrently, slightly out of order).
SEQUENTIAL_SLACK_BYTES = 1024 * 1024
#: Metadata RPC deadline. Calls made while the metaserver is unreachable wait this long
#: for it to come back (gRPC wait_for_ready) before failing with EIO.
META_TIMEOUT_S = 30.0
#: Metadata calls that may be repeated after a transport failure mid-call.
IDEMPOTENT_META_CALLS = frozenset({
    "lookup", "getattr", "readlink", "readdir", "getxattr", "listxattr", "statfs", "block_map",
    "status", "renew_session", "open", "release", "alloc_blocks", "sync",
})
#: How long attributes from the metaserver answer a getxattr locally when they say the
#: inode has no xattrs (the kernel trusts attributes as long: fs/fuse ATTR_TIMEOUT_S).
ATTR_CACHE_S = 1.0
#: Inodes whose attributes are remembered for that; expired ones are dropped past it.
ATTR_CACHE_ENTRIES = 100_000
#: Extended attribute the kernel asks for before every write (file capabilities).
CAPABILITY_XATTR = b"security.capability"
#: Virtual layout attributes (stripefs.block_size, ...) always go to the metaserver.
VIRTUAL_XATTR_PREFIX = b"stripefs."
#: Entries fetched from the metaserver per readdir round trip.
READDIR_BATCH = 1000


def now_ns() -> int:
    return time.time_ns()


@dataclass
class DirHandle:
    ino: int
    start: int = -1  # cookie the last batch was fetched after (-1: none yet)
    entries: list[m.DirEntry] = field(default_factory=list)  # last batch fetched
    more: bool = True  # the metaserver has entries after the last batch


class Client:
    """One client session. Create with `open_client()`."""

    def __init__(
        self,
        meta_address: str,
        secret: bytes,
        *,
        mountpoint: str = "library",
        writeback_bytes: int = DEFAULT_WRITEBACK_BYTES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.meta = Stub(meta_address, secret, META_SERVICE, META_METHODS, wait_for_ready=True)
        self.data = DataPath(secret, cache_bytes)
        self.data.on_bad_replica = self._report_bad_replica
        self.mountpoint = mountpoint
        self.session = 0
        self.lease_s = 30.0
        self._files: dict[int, FileState] = {}  # open inodes of this client
        self._handles: dict[int, HandleState] = {}  # file handle -> its inode and read state
        self._budget = WritebackBudget(writeback_bytes)
        self._prefetches = 0
        self._dirs: dict[int, DirHandle] = {}  # directory handle -> listing state
        self._next_fh = itertools.count(1)
        # inode -> block-map generation the kernel page cache holds (fs/fuse keep_cache)
        self._cached_generation: dict[int, int] = {}
        # inode -> (attributes, monotonic time seen): answers getxattr of inodes with no xattrs
        self._attrs: dict[int, tuple[m.Attr, float]] = {}
        self._nursery: Optional[trio.Nursery] = None
        self._upload_slots = trio.Semaphore(MAX_UPLOADS_IN_FLIGHT)
        self._session_lock = trio.Lock()

    # ------------------------------------------------------------------ lifecycle

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        await self._open_session()
        nursery.start_soon(self._renew_loop)

    async def _open_session(self) -> None:
        reply = await self._meta("open_session", m.SessionOpenReq(socket.gethostname(), self.mountpoint))
        self.session, self.lease_s = reply.session, reply.lease_s

    async def _renew_loop(self) -> None:
        while True:
            await trio.sleep(self.lease_s / 3)
            try:
                await self._meta("renew_session", m.SessionReq(self.session))
            except FsError as exc:
                if exc.errno == errno.ESTALE:
                    await self._replace_session(self.session)
                else:
                    log.warning("session renewal failed: %s", exc)

    async def _replace_session(self, expired: int) -> None:
        """Our session expired (the metaserver did not hear from us for several leases):
        open a new one and register again the files we hold open, so that their unlinked
        inodes are kept. Inodes purged meanwhile are gone; their handles will get ENOENT."""
        if self.session != expired:
            return  # another task already replaced it
        async with self._session_lock:
            if self.session != expired:
                return
            log.warning("session %d expired; opening a new one", expired)
            await self._open_session()
            for ino in list(self._files):
                try:
                    await self._meta("open", m.OpenReq(ino, self.session))
                except FsError as exc:
                    log.error("inode %d could not be reopened in session %d: %s", ino, self.session, exc)

    async def aclose(self) -> None:
        for ino, f in list(self._files.items()):
            if not f.busy():
                continue
            try:
                await self._fsync_state(f)
            except FsError as exc:
                log.error("inode %d: unflushed data lost at shutdown: %s", ino, exc)
        try:
            await self._meta("close_session", m.SessionReq(self.session))
        except FsError as exc:
            log.warning("closing session %d failed: %s", self.session, exc)
        self.data.close()
        self.meta.close()

    async def _meta(self, name: str, req: m.Message):
        deadline = time.monotonic() + META_TIMEOUT_S
        delay = 0.1
        while True:
            try:
                return await call(self.meta, name, req, META_TIMEOUT_S)
            except TransportError as exc:
                # The call may or may not have run; repeat it only if that is harmless.
                if name not in IDEMPOTENT_META_CALLS or time.monotonic() + delay > deadline:
                    log.error("metaserver %s: %s failed: %s", self.meta.address, name, exc)
                    raise
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except FsError as exc:
                session = getattr(req, "session", None)
                if not (exc.errno == errno.ESTALE and session and name not in ("renew_session", "close_session")):
                    raise
                # The session expired under us (a long metaserver outage): replace it, retry.
                await self._replace_session(session)
                if self.session == session:
                    raise
                req = dataclasses.replace(req, session=self.session)  # type: ignore[type-var]

    def _report_bad_replica(self, block_id: int, address: str, reason: str) -> None:
        assert self._nursery is not None

        async def report() -> None:
            try:
                await call(self.meta, "report_bad_replica", m.BadReplicaReq(block_id, address, reason), 5.0)
            except FsError:
                pass  # best effort: heartbeats and scrubbing find it too

        self._nursery.start_soon(report)

    # ------------------------------------------------------------------ attributes

    def _overlay(self, attr: m.Attr) -> m.Attr:
        self._seen(attr)
        f = self._files.get(attr.ino)
        return f.overlay(attr) if f is not None else attr

    def _seen(self, attr: m.Attr) -> m.Attr:
        now = time.monotonic()
        if len(self._attrs) >= ATTR_CACHE_ENTRIES:
            self._attrs = {i: e for i, e in self._attrs.items() if now - e[1] < ATTR_CACHE_S}
            if len(self._attrs) >= ATTR_CACHE_ENTRIES:
                self._attrs.clear()
        self._attrs[attr.ino] = (attr, now)
        return attr

    def _known_without_xattrs(self, ino: int) -> bool:
        entry = self._attrs.get(ino)
        return entry is not None and entry[0].xattrs == 0 and time.monotonic() - entry[1] < ATTR_CACHE_S

    async def lookup(self, parent: int, name: bytes) -> m.Attr:
        return self._overlay((await self._meta("lookup", m.LookupReq(parent, name))).attr)

    async def getattr(self, ino: int) -> m.Attr:
        entry = self._attrs.get(ino)
        if entry is not None and stat.S_ISDIR(entry[0].mode) and time.monotonic() - entry[1] < ATTR_CACHE_S:
            # With default_permissions the kernel checks the parent directory before every
            # create and unlink, and it drops its cached attributes of a directory whenever
            # an entry changes: without this, each create costs a getattr round trip. Every
            # change this client makes to a directory refreshes or drops its entry here.
            return entry[0]
        return self._overlay((await self._meta("getattr", m.InodeReq(ino))).attr)

    def _dir_changed(self, parent: Optional[m.Attr], *dirs: int) -> None:
        """An entry change made by this client: take the directory's new attributes from
        the reply, or forget what we knew of the directories involved."""
        if parent is not None:
            self._seen(parent)
        for ino in dirs:
            if parent is None or ino != parent.ino:
                self._attrs.pop(ino, None)

    async def setattr(
        self,
        ino: int,
        ctx: m.Ctx,
        *,
        mode: Optional[int] = None,
        uid: Optional[int] = None,
        gid: Optional[int] = None,
        size: Optional[int] = None,
        atime_ns: Optional[int] = None,
        mtime_ns: Optional[int] = None,
        atime_now: bool = False,
        mtime_now: bool = False,
    ) -> m.Attr:
        f = self._files.get(ino)
        if f is not None and (size is not None or mtime_ns is not None or mtime_now):
            # Settle buffered writes first: a truncate must not race with uploads of blocks
            # it removes, and a later commit would overwrite an explicit mtime (cp -a, touch).
            await self._fsync_state(f)
        req = m.SetattrReq(ino, ctx, mode, uid, gid, size, atime_ns, mtime_ns, atime_now, mtime_now)
        self._attrs.pop(ino, None)
        attr = (await self._meta("setattr", req)).attr
        if size is not None:
            self._note_generation(ino, attr.generation)
            f = self._files.get(ino)
            if f is not None:
                reply = await self._meta("block_map", m.BlockMapReq(ino))
                f.set_map(reply.attr, reply.blocks)
                attr = reply.attr
        return self._overlay(attr)

    def _note_generation(self, ino: int, generation: int) -> None:
        """Our own content change moved the generation by one: the page cache, which saw
        the change go through it, is still right. Anything else: drop it at next open."""
        if self._cached_generation.get(ino) == generation - 1:
            self._cached_generation[ino] = generation
        else:
            self._cached_generation.pop(ino, None)

    # ------------------------------------------------------------------ namespace

    async def mknod(self, parent: int, name: bytes, mode: int, ctx: m.Ctx, rdev: int = 0) -> m.Attr:
        reply = await self._meta("mknod", m.MknodReq(parent, name, mode, ctx, rdev))
        self._dir_changed(reply.parent, parent)
        return self._seen(reply.attr)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: m.Ctx) -> tuple[int, m.Attr]:
        """Create a regular file and open it, in one metadata round trip."""
        req = m.MknodReq(parent, name, (mode & 0o7777) | 0o100000, ctx, 0, self.session, PREALLOC_BLOCKS_AT_CREATE)
        reply = await self._meta("mknod", req)
        self._dir_changed(reply.parent, parent)
        attr = self._seen(reply.attr)
        f = self._file_state(attr)
        f.set_map(attr, [])
        f.spare = {a.index: a for a in reply.allocations}
        f.no_capability = True  # a new file has no xattrs
        f.handles += 1
        self._cached_generation[attr.ino] = attr.generation
        return self._new_handle(attr.ino), attr

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: m.Ctx) -> m.Attr:
        reply = await self._meta("mkdir", m.MkdirReq(parent, name, mode, ctx))
        self._dir_changed(reply.parent, parent)
        return self._seen(reply.attr)

    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: m.Ctx) -> m.Attr:
        reply = await self._meta("symlink", m.SymlinkReq(parent, name, target, ctx))
        self._dir_changed(reply.parent, parent)
        return self._seen(reply.attr)

    async def readlink(self, ino: int) -> bytes:
        return (await self._meta("readlink", m.InodeReq(ino))).target

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> m.Attr:
        reply = await self._meta("link", m.LinkReq(ino, new_parent, new_name))
        self._dir_changed(reply.parent, new_parent)
        return self._overlay(reply.attr)

    async def unlink(self, parent: int, name: bytes, ctx: m.Ctx = m.Ctx()) -> None:
        reply = await self._meta("unlink", m.RemoveReq(parent, name, ctx))
        self._dir_changed(reply.parent, parent)

    async def rmdir(self, parent: int, name: bytes, ctx: m.Ctx = m.Ctx()) -> None:
        reply = await self._meta("rmdir", m.RemoveReq(parent, name, ctx))
        self._dir_changed(reply.parent, parent)

    async def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0, ctx: m.Ctx = m.Ctx()
    ) -> None:
        try:
            await self._meta("rename", m.RenameReq(parent, name, new_parent, new_name, flags, ctx))
        finally:
            self._dir_changed(None, parent, new_parent)

    async def statfs(self) -> m.StatfsReply:
        return await self._meta("statfs", m.Empty())

    async def status(self) -> m.StatusReply:
        return await self._meta("status", m.Empty())

    # ------------------------------------------------------------------ directories

    def opendir(self, ino: int) -> int:
        dh = next(self._next_fh)
        self._dirs[dh] = DirHandle(ino)
        return dh

    def dir_inode(self, dh: int) -> int:
        return self._dirs[dh].ino

    async def readdir(self, dh: int, offset: int) -> tuple[list[m.DirEntry], bool]:
        """Entries after cookie `offset` (0: from the start), and whether more follow.
        Served from the handle's last batch when it continues it, so the kernel's small
        readdir buffers do not each cost a round trip."""
        d = self._dirs[dh]
        if d.start >= 0 and (offset == d.start or any(e.cookie == offset for e in d.entries)):
            batch = [e for e in d.entries if e.cookie > offset]
            if batch or not d.more:
                return [self._overlay_entry(e) for e in batch], d.more
        reply = await self._meta("readdir", m.ReaddirReq(d.ino, offset, READDIR_BATCH))
        d.start, d.entries, d.more = offset, reply.entries, reply.more
        return [self._overlay_entry(e) for e in reply.entries], reply.more

    def _overlay_entry(self, e: m.DirEntry) -> m.DirEntry:
        self._seen(e.attr)
        if e.attr.ino in self._files:
            return m.DirEntry(e.name, e.cookie, self._overlay(e.attr))
        return e

    async def listdir(self, ino: int) -> list[m.DirEntry]:
        """Every entry of a directory (convenience for programs; streams in batches)."""
        out: list[m.DirEntry] = []
        offset, more = 0, True
        while more:
            reply = await self._meta("readdir", m.ReaddirReq(ino, offset, READDIR_BATCH))
            out.extend(reply.entries)
            more = reply.more and bool(reply.entries)
            if reply.entries:
                offset = reply.entries[-1].cookie
        return out

    def releasedir(self, dh: int) -> None:
        self._dirs.pop(dh, None)

    # ------------------------------------------------------------------ xattrs

    async def getxattr(self, ino: int, name: bytes, ctx: m.Ctx = m.Ctx()) -> bytes:
        if not name.startswith(VIRTUAL_XATTR_PREFIX) and self._known_without_xattrs(ino):
            # ls -l asks every entry for ACLs and security labels: answered here, a listing
            # of 10,000 entries does not cost 20,000 round trips.
            raise FsError(errno.ENODATA)
        f = self._files.get(ino)
        if name == CAPABILITY_XATTR and f is not None and f.no_capability:
            # The kernel asks before every write; while the file is open here, the answer
            # only changes through this client (setxattr below), so one round trip will do.
            raise FsError(errno.ENODATA)
        try:
            return (await self._meta("getxattr", m.XattrReq(ino, name, ctx))).value
        except FsError as exc:
            if exc.errno == errno.ENODATA and name == CAPABILITY_XATTR and f is not None:
                f.no_capability = True
            raise

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, ctx: m.Ctx = m.Ctx()) -> None:
        self._attrs.pop(ino, None)
        f = self._files.get(ino)
        if f is not None and name == CAPABILITY_XATTR:
            f.no_capability = False
        await self._meta("setxattr", m.XattrReq(ino, name, ctx, value, flags))

    async def listxattr(self, ino: int) -> list[bytes]:
        if self._known_without_xattrs(ino):
            return []
        return (await self._meta("listxattr", m.InodeReq(ino))).names

    async def removexattr(self, ino: int, name: bytes, ctx: m.Ctx = m.Ctx()) -> None:
        self._attrs.pop(ino, None)
        await self._meta("removexattr", m.XattrReq(ino, name, ctx))

    # ------------------------------------------------------------------ open files

    def _new_handle(self, ino: int) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = HandleState(ino)
        return fh

    def _handle(self, fh: int) -> tuple[HandleState, FileState]:
        try:
            h = self._handles[fh]
            return h, self._files[h.ino]
        except KeyError:
            raise FsError(errno.EBADF, f"file handle {fh} is not open") from None

    def _file_state(self, attr: m.Attr) -> FileState:
        f = self._files.get(attr.ino)
        if f is None:
            f = self._files[attr.ino] = FileState(attr.ino, attr, attr.block_size, self._budget)
        return f

    async def open(self, ino: int, flags: int, ctx: m.Ctx = m.Ctx()) -> tuple[int, bool]:
        """Open a file; returns (handle, whether the kernel may keep its page cache)."""
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            await self.setattr(ino, ctx, size=0)
        reply = await self._meta("open", m.OpenReq(ino, self.session, ctx, flags & ~os.O_TRUNC))
        f = self._file_state(reply.attr)
        f.set_map(reply.attr, reply.blocks)
        f.handles += 1
        keep = self._cached_generation.get(ino) == reply.attr.generation
        self._cached_generation[ino] = reply.attr.generation
        return self._new_handle(ino), keep

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        h, f = self._handle(fh)
        end = min(offset + size, f.size)
        if offset >= end:
            return b""
        # Sequential (from the start, or near where this handle's last read ended): whole
        # blocks, cached, with a readahead window that doubles up to READAHEAD_MAX_BYTES.
        # Otherwise only the bytes asked for: random readers must not pay for whole blocks.
        sequential = offset == 0 or abs(offset - h.last_read_end) <= SEQUENTIAL_SLACK_BYTES
        parts: list[bytes] = []
        pos = offset
        bs = f.block_size
        while pos < end:
            i, boff = divmod(pos, bs)
            n = min(end - pos, bs - boff)
            parts.append(await self._read_piece(f, i, boff, n, sequential))
            pos += n
        h.last_read_end = end
        if sequential:
            limit = max(1, READAHEAD_MAX_BYTES // bs)
            h.readahead_blocks = min(limit, max(1, h.readahead_blocks * 2))
            self._readahead(f, end, h.readahead_blocks)
        else:
            h.readahead_blocks = 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_piece(self, f: FileState, index: int, boff: int, n: int, whole: bool) -> bytes:
        d = f.dirty.get(index)
        if d is not None:
            chunk = bytes(d.data[boff : boff + n])
        else:
            ref = f.blocks.get(index)
            if ref is None:
                return bytes(n)
            try:
                if whole:
                    chunk = (await self.data.read_block(ref))[boff : boff + n]
                else:
                    chunk = await self.data.read_range(ref, boff, n)
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                # The block was replaced and collected since our map was fetched: refresh.
                reply = await self._meta("block_map", m.BlockMapReq(f.ino))
                if reply.blocks and {b.block_id for b in reply.blocks} == {b.block_id for b in f.blocks.values()}:
                    raise FsError(errno.EIO, f"block {ref.block_id} of inode {f.ino} is missing") from None
                f.set_map(reply.attr, reply.blocks)
                return await self._read_piece(f, index, boff, n, whole)
        return chunk if len(chunk) == n else chunk + bytes(n - len(chunk))

    def _readahead(self, f: FileState, end: int, window: int) -> None:
        assert self._nursery is not None
        first = end // f.block_size
        for index in range(first, first + window):
            ref = f.blocks.get(index)
            if ref is None or index in f.dirty or self._prefetches >= MAX_PREFETCHES_IN_FLIGHT:
                continue
            if not self.data.has_or_fetching(ref.block_id):
                self._prefetches += 1
                self._nursery.start_soon(self._prefetch, ref)

    async def _prefetch(self, ref: m.BlockRef) -> None:
        try:
            await self.data.read_block(ref)
        except FsError:
            pass  # the reader will see the error itself if it gets there
        finally:
            self._prefetches -= 1

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        _, f = self._handle(fh)
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
            if len(d.data) == bs and i not in f.flushing:
                self._upload_in_background(f, i)
        f.mtime_ns = now_ns()
        if self._budget.over():
            await self._relieve(f)
        return len(data)

    async def _relieve(self, f: FileState) -> None:
        """Back-pressure: a writer that finds the write-back budget spent waits while its
        own file's buffers drain (commits free them), keeping uploads in flight meanwhile.
        Other files' buffers are drained by their own writers, so the budget is exceeded by
        at most one write per concurrent writer."""
        while self._budget.over() and f.busy():
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
        ref = f.blocks.get(index)
        base = b""
        if ref is not None and not covers:
            base = await self.data.read_block(ref)
        d = f.dirty.get(index)  # re-check: another task may have started one while we read
        return d if d is not None else f.new_dirty(index, base)

    def _upload_in_background(self, f: FileState, index: int) -> None:
        """Write-behind of a full block; its commit waits for a batch, fsync or close."""
        assert self._nursery is not None

        async def run() -> None:
            try:
                await self._upload(f, [index])
                if len(f.uploaded) >= COMMIT_BATCH_BLOCKS:
                    await self._commit(f)
            except FsError as exc:
                log.error("inode %d: write-behind of block %d failed: %s", f.ino, index, exc)
                f.error = f.error or exc.errno

        self._nursery.start_soon(run)

    async def _upload(self, f: FileState, indexes: list[int]) -> None:
        """Store the current content of dirty blocks as new blocks on their replica
        servers; they become part of the file at the next _commit. A server that fails is
        excluded and the block placed again, while live servers remain."""
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
            snaps = {i: (f.dirty[i].data, f.dirty[i].version) for i in indexes}
            for i in indexes:
                f.dirty[i].frozen = True
            # Servers that just failed this client are avoided from the start.
            todo, exclude = indexes, self.data.penalised()
            errors: dict[str, FsError] = {}
            for _attempt in range(WRITE_PLACEMENT_ATTEMPTS):
                # Blocks preallocated at create need no allocation round trip.
                allocations = [f.spare.pop(i) for i in todo if i in f.spare and not exclude]
                rest = [i for i in todo if i not in {a.index for a in allocations}]
                if rest:
                    allocations += await self._allocate(f, rest, exclude, errors)
                retry: list[int] = []

                async def put(a: m.Allocation) -> None:
                    data, version = snaps[a.index]
                    # The request frame and gRPC's buffers per replica (measured: about two
                    # block copies per call while it is sent) count against the write-back
                    # budget while in flight, so the budget bounds the mount's memory, not
                    # only its dirty buffers.
                    in_flight = len(data) * (1 + 2 * len(a.servers))
                    async with self._upload_slots:
                        self._budget.used_bytes += in_flight
                        try:
                            written, failed = await self.data.write_block(
                                a.block_id, a.token, a.servers, data, sync=False
                            )
                        finally:
                            self._budget.used_bytes -= in_flight
                    if failed:
                        retry.append(a.index)
                        errors.update(failed)
                        exclude.extend(s for s in failed if s not in exclude)
                    else:
                        f.uploaded[a.index] = (m.BlockRef(a.index, a.block_id, len(data), written), version)
                        for address in written:
                            f.unsynced.setdefault(address, set()).add(a.block_id)

                async with trio.open_nursery() as nursery:
                    for a in allocations:
                        nursery.start_soon(put, a)
                if not retry:
                    return
                log.warning("inode %d: blocks %s: replica writes failed (%s); placing them elsewhere",
                            f.ino, retry, "; ".join(f"{a}: {e}" for a, e in errors.items()))
                todo = sorted(retry)
            if all(e.errno == errno.ENOSPC for e in errors.values()):
                raise FsError(errno.ENOSPC, "data servers are full")
            raise FsError(errno.EIO, f"inode {f.ino}: blocks {todo} could not be written")
        finally:
            for i in indexes:
                d = f.dirty.get(i)
                if d is not None and d.data is snaps[i][0]:
                    d.frozen = False
                f.flushing.pop(i).set()

    async def _allocate(
        self, f: FileState, indexes: list[int], exclude: list[str], errors: dict[str, FsError]
    ) -> list[m.Allocation]:
        try:
            return (await self._meta("alloc_blocks", m.AllocReq(f.ino, self.session, indexes, exclude))).allocations
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
                return (await self._meta("alloc_blocks", m.AllocReq(f.ino, self.session, indexes, []))).allocations
            except FsError as again:
                if again.errno == errno.EIO and self.data.all_full(self.data.penalised()):
                    raise FsError(errno.ENOSPC, "data servers are full") from None
                raise

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
                reply = await self._meta("commit_blocks", m.CommitReq(f.ino, self.session, refs, size, mtime))
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
                if f.uploaded.get(i) is entry:
                    del f.uploaded[i]
                d = f.dirty.get(i)
                if d is not None and d.version == version:
                    f.drop_dirty(i)
            f.attr = reply.attr
            f.commits += 1
            self._note_generation(f.ino, reply.attr.generation)

    async def _fsync_state(self, f: FileState, durable: bool = False) -> None:
        """Upload and commit everything this client holds for the file (close: the data is
        on all its replica servers, the commit durable). durable=True (fsync): the data
        servers have also synced every block this client wrote to the file, before the
        commit that makes the last of them visible."""
        while f.busy():
            for pending in list(f.flushing.values()):
                await pending.wait()
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
                self._report_bad_replica(block_id, address, "unreachable")
        log.warning("inode %d: sync failed on %s; %d blocks left to re-replication",
                    f.ino, ", ".join(failed), sum(len(pending[a]) for a in failed))
        if lost:
            raise FsError(errno.EIO, f"inode {f.ino}: blocks {lost[:5]} have no durable copy")

    async def flush(self, fh: int) -> None:
        """close(2) of one descriptor: durable on return (close-to-open)."""
        await self._fsync_state(self._handle(fh)[1])

    async def fsync(self, fh: int) -> None:
        f = self._handle(fh)[1]
        commits = f.commits
        await self._fsync_state(f, durable=True)
        if f.commits == commits:
            # Nothing to commit, but metadata changes (create, truncate, chmod) may still be
            # only crash-safe on the metaserver: make them durable as fsync promises.
            await self._meta("sync", m.Empty())

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        f = self._files[h.ino]
        try:
            if f.handles == 1 and f.busy():
                await self._fsync_state(f)
        finally:
            f.handles -= 1
            if f.handles == 0:
                del self._files[h.ino]
                f.drop_all()  # only left over when the last flush failed: that data is lost
            await self._meta("release", m.ReleaseReq(h.ino, self.session))


@asynccontextmanager
async def open_client(meta_address: str, secret: bytes, **options) -> AsyncIterator[Client]:
    """Connect to a cluster; the client's background tasks live in a nursery owned here."""
    client = Client(meta_address, secret, **options)
    async with trio.open_nursery() as nursery:
        await client._start(nursery)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
            nursery.cancel_scope.cancel()
