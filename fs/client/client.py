"""The stripefs client library: the whole file system API as trio coroutines, FUSE-free.

`open_client()` connects to the metaservers (`HOST:PORT[,HOST:PORT...]` or a list: the
client talks to one and moves to another when it fails, transport.py), opens a session and
yields a `Client`. Inodes are ints, names are bytes, errors are FsError(errno). File data
goes straight to the data servers (striped, replicated), or for small files inline to the
metaserver; the metaserver hands out block ids and commits block maps. Caching, write-back
and readahead live here so that programs using the library directly get them too; fs/fuse
only translates.

`Client` composes one object per mechanism:
- session.py, `MetaSession`: the session lease and the retry rules of metadata calls;
- transport.py: how calls reach the metaserver and the data servers (swappable: tests
  drive a client against in-process servers with `LocalTransport`);
- cache.py, `NameCache`: attributes and directory entries known without asking, statahead;
- reader.py and writer.py: the read and write paths; data.py: block I/O;
- locks.py, `Locks`: cluster-wide record and flock locks, and what a close releases;
and keeps the tables of what is open: files (files.py `FileState`), handles, directory
handles.

Who: every call that the metaserver checks permissions for carries a Ctx, the ids of the
caller; a method's `ctx` left None is the client's `identity`, by default this process's
own (effective uid and gid, supplementary groups). fs/fuse passes each request's.

Consistency: close-to-open. `open` fetches the attributes, the whole block map and an
inline block 0; a `flush` (close) or `fsync` returns only after every dirty block is on
all its replicas (or inline) and the metaserver committed the new block map.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import logging
import os
import stat
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Hashable, Iterable, Optional, Sequence, TypeVar, cast

import trio

from stripefs.proto import messages as m
from stripefs.proto import metrics
from stripefs.proto.credentials import Credentials
from stripefs.proto.errors import FsError
from stripefs.proto.services import DATA_METHODS, DATA_SERVICE, META_METHODS, META_SERVICE
from stripefs.proto.types import (FILE_SIZE_MAX_BYTES, LOCK_RECORD, NAME_MAX_BYTES, OFFSET_MAX, RELATIME_AGE_S,
                         SYMLINK_MAX_BYTES)

from .cache import ATTR_TTL_S, ENTRY_TTL_S, READDIR_BATCH, Entry, NameCache, now
from .data import DataPath
from .disktier import DiskTier
from .files import FileState, HandleState, KnownMaps, WritebackBudget
from .locks import Locks
from .prefetch import DEFAULT_PREFETCH_BYTES, Prefetcher, PrefetchStatus
from .reader import Reader
from .session import MetaSession
from .staging import COMMIT_XATTR, PENDING_XATTR, STATUS_XATTR, VIRTUAL_CHECKPOINT_XATTRS, Checkpoints, Stager
from .transport import FailoverTransport, StreamTransport, Transport
from .writer import Writer

log = logging.getLogger("stripefs.client")
T = TypeVar("T")

#: Memory for unflushed writes per client; a writer past it waits for its own flushes.
DEFAULT_WRITEBACK_BYTES = 256 * 1024 * 1024
#: Memory for cached blocks per client.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
#: Local disk a client with a disk tier may fill with staged checkpoint files (staging.py).
DEFAULT_STAGE_BYTES = 10 * 1024**3
#: Blocks allocated together with a create, in a directory where this client's last new
#: file outgrew inline storage: its close then needs no allocation round trip. Elsewhere
#: none: most small files never use one, and an unused allocation is garbage to collect.
PREALLOC_BLOCKS_AT_CREATE = 1
#: fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: Extended attribute the kernel asks for before every write (file capabilities).
CAPABILITY_XATTR = b"security.capability"
#: Virtual layout attributes (stripefs.block_size, ...) always go to the metaserver.
VIRTUAL_XATTR_PREFIX = b"stripefs."


_metrics = metrics.client()


def process_identity() -> m.Ctx:
    """The ids of this process, as the kernel would check them."""
    return m.Ctx(os.geteuid(), os.getegid(), os.getpid(), sorted(set(os.getgroups())))


@dataclass
class DirHandle:
    ino: int
    ctx: m.Ctx  # who opened it: its pages are read as them
    start: int = -1  # cookie the last batch was fetched after (-1: none yet)
    entries: list[m.DirEntry] = field(default_factory=list)  # last batch fetched
    more: bool = True  # the metaserver has entries after the last batch


def entry_names(*names: bytes) -> None:
    """ENAMETOOLONG for a directory entry name over NAME_MAX bytes, as the kernel's own file
    systems answer (the wire would refuse it as malformed: EINVAL)."""
    for name in names:
        if len(name) > NAME_MAX_BYTES:
            raise FsError(errno.ENAMETOOLONG, f"name longer than {NAME_MAX_BYTES} bytes")


class Client:
    """One client session. Create with `open_client()`.

    meta_transport / data_connect replace the network (tests: LocalTransport); disk_tier:
    a DiskTier (disktier.py) keeping blocks read on local disk, owned (closed) by the
    caller; its directory's `stage/` also holds checkpoint files staged for upload, up to
    `stage_bytes` (staging.py). `rpc_loop`: the streams to the servers run on one asyncio
    loop (grpc.aio) instead of gRPC's sync threads, with fewer thread switches a call (the
    mount's choice); not for a process that forks and uses gRPC in the child (a
    DataLoader worker): after grpc.aio, gRPC does not work in a forked child
    (transport.py). `kernel_page_cache`: the reads are answered to a kernel that keeps
    their pages (a FUSE mount), so a block a sequential reader has passed leaves the block
    cache at once whatever the file's size (reader.py, "drop behind")."""

    def __init__(
        self,
        meta_address: str | Sequence[str],
        creds: Optional[Credentials],
        *,
        mountpoint: str = "library",
        writeback_bytes: int = DEFAULT_WRITEBACK_BYTES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
        disk_tier: Optional[DiskTier] = None,
        stage_bytes: int = DEFAULT_STAGE_BYTES,
        meta_transport: Optional[Transport] = None,
        data_connect: Optional[Callable[[str], Transport]] = None,
        identity: Optional[m.Ctx] = None,
        atime: bool = False,
        rpc_loop: bool = False,
        kernel_page_cache: bool = False,
    ) -> None:
        if creds is None and (meta_transport is None or data_connect is None):
            raise ValueError("a client needs credentials (proto/credentials.py) to reach servers")
        checked = cast(Credentials, creds)  # None only with both transports given (above)
        meta = meta_transport or FailoverTransport(meta_address, checked, META_SERVICE, META_METHODS, loop=rpc_loop)
        connect = data_connect or (lambda address: StreamTransport(address, checked, DATA_SERVICE, DATA_METHODS,
                                                                   loop=rpc_loop))
        #: who calls that do not say are made as (default: this process)
        self.identity = identity or process_identity()
        #: move atime on reads (relatime's rules); off by default, as with noatime
        self.atime = atime
        metrics.client().clients.add(self)
        self.session = MetaSession(meta, mountpoint)
        self.session.on_replaced = self._reopen_files
        self._nursery: Optional[trio.Nursery] = None
        self.names = NameCache(self.session.call, self._spawn)
        self.data = DataPath(connect, cache_bytes)
        self.data.on_bad_replica = self._report_bad_replica
        self.data.disk, self.data.spawn = disk_tier, self._spawn
        self._budget = WritebackBudget(writeback_bytes)
        self.reader = Reader(self.data, self._fresh_map, self._spawn,
                             use_once_above=0 if kernel_page_cache else cache_bytes)
        self.writer = Writer(self.data, self.reader, self.session.call, lambda: self.session.id,
                             self._budget, self._spawn, self._committed)
        self.locks = Locks(self.session.call, lambda: self.session.id)
        self.prefetcher = Prefetcher(self, prefetch_bytes)
        self.stager = Stager(self, disk_tier.directory / "stage", stage_bytes) if disk_tier is not None else None
        self.checkpoints = Checkpoints(self)
        self._files: dict[int, FileState] = {}  # open inodes of this client
        #: the last block maps the metaserver gave, for opens to name (OpenReq.map_generation)
        self.maps = KnownMaps()
        self._handles: dict[int, HandleState] = {}  # file handle -> its inode and read state
        self._dirs: dict[int, DirHandle] = {}  # directory handle -> listing state
        self._next_fh = itertools.count(1)
        #: handles whose open of a file with blocks the metaserver did not record, in the
        #: order they were opened, with when: recorded if still open after a while (_record_lingering)
        self._lingering: dict[int, float] = {}
        # inode -> block-map generation the kernel page cache holds (fs/fuse keep_cache)
        self._cached_generation: dict[int, int] = {}

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, fn: Callable, *args: object) -> None:
        assert self._nursery is not None, "the client is not started"
        self._nursery.start_soon(fn, *args)

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        await self.session.start(nursery)
        nursery.start_soon(self._record_lingering)
        if self.stager is not None:
            nursery.start_soon(self.stager.resume)

    async def _reopen_files(self) -> None:
        """A new session: register again the opens of the files we hold open, so that their
        unlinked inodes are kept: one for each open the old session had recorded (each
        recorded handle, and the stager's hold), which the releases will take back one by
        one; none for handles that went unrecorded (they send no release: one recorded for
        them would keep the file until the session ends; _record_lingering records them in
        the new session as in the old). Inodes purged meanwhile are gone; their handles will
        get ENOENT. Locks are not taken again: others may have taken them meanwhile.
        Counted before the first await, as the new session's id is set: a handle closed
        from then on sends its release in the new session, and MetaSession holds it until
        this is done, so that it takes back one of the opens made here."""
        self.locks.session_lost()
        # Asking for no more than an open here was granted: writing (which an open for
        # reading and writing had too), else reading; either entitles us to read tokens.
        # Each shows its grant: the file's mode may not let the opener do so any more (or
        # never did: a file created 0444 is open for writing), as a descriptor need not.
        wanted = [(ino, f.opener or self.identity, os.O_WRONLY if f.writable else os.O_RDONLY, f.grant,
                   f.handles - f.unrecorded) for ino, f in self._files.items()]
        for ino, opener, flags, grant, count in wanted:
            for _ in range(count):
                try:
                    await self.session.call("open", m.OpenReq(ino, self.session.id, opener, flags, grant=grant,
                                                              map_wanted=False))
                except FsError as exc:
                    log.error("inode %d could not be reopened in session %d: %s", ino, self.session.id, exc)
                    break

    async def aclose(self) -> None:
        """Flush what is still written back and end the session (open_client does this on exit)."""
        if self.stager is not None:
            await self.stager.drain()
        for ino, f in list(self._files.items()):
            if not f.busy():
                continue
            try:
                await self.writer.settle(f)
            except FsError as exc:
                log.error("inode %d: unflushed data lost at shutdown: %s", ino, exc)
        await self.session.close()
        self.data.close()
        self.session.transport.close()

    async def _meta(self, name: str, req: m.Message):
        return await self.session.call(name, req)

    def _report_bad_replica(self, block_id: int, address: str, reason: str) -> None:
        assert self._nursery is not None
        self.session.report_soon(self._nursery, "report_bad_replica", m.BadReplicaReq(block_id, address, reason))

    # ------------------------------------------------------------------ attributes

    def _overlay(self, attr: m.Attr) -> m.Attr:
        """attr with this client's uncommitted size and mtime applied."""
        f = self._files.get(attr.ino)
        return f.overlay(attr) if f is not None else attr

    def _committed(self, f: FileState, attr: m.Attr) -> None:
        self.names.attrs.put(attr)
        self._note_generation(f.ino, attr.generation)
        if f.created_in:
            self.names.note_new_file(f.created_in, needs_blocks=f.inline is None)

    def _ctx(self, ctx: Optional[m.Ctx]) -> m.Ctx:
        return self.identity if ctx is None else ctx

    async def lookup_entry(self, parent: int, name: bytes, ctx: Optional[m.Ctx] = None) -> Entry:
        """The entry and how long it stays right (attr None: no such entry)."""
        entry_names(name)
        try:
            e = await self.names.lookup(parent, name, self._ctx(ctx))
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return Entry(None, ENTRY_TTL_S, 0.0)
        if e.attr is not None and e.attr.ino in self._files:
            return Entry(self._overlay(e.attr), e.entry_ttl, e.attr_ttl)
        return e

    async def lookup(self, parent: int, name: bytes, ctx: Optional[m.Ctx] = None) -> m.Attr:
        """The attributes of `name` in directory `parent` (ENOENT if there is none), through the name cache."""
        e = await self.lookup_entry(parent, name, ctx)
        if e.attr is None:
            raise FsError(errno.ENOENT, f"no entry {name!r} in {parent}")
        return e.attr

    async def getattr_entry(self, ino: int) -> Entry:
        """The cached entry of an inode, its attributes asked of the metaserver if they are not fresh."""
        got = self.names.attrs.get(ino)
        if got is not None and stat.S_ISDIR(got[0].mode):
            # With default_permissions the kernel checks the parent directory before every
            # create and unlink, and it drops its cached attributes of a directory whenever
            # an entry changes: without this, each create costs a getattr round trip. Every
            # change this client makes to a directory refreshes or drops its entry here.
            # (Files always ask: the kernel re-reads them after our own unlinks and links.)
            return Entry(got[0], 0.0, got[1])
        t = now()
        try:
            reply = await self._inode_call("getattr", m.InodeReq(ino), ino)
        except FsError as exc:
            f = self._files.get(ino)
            if exc.errno != errno.ENOENT or f is None or not f.unrecorded:
                raise
            # Removed by another mount while open here unrecorded (no blocks: its handles
            # still read all they opened): fstat(2) shows it unlinked, as it would be.
            return Entry(self._overlay(dataclasses.replace(f.attr, nlink=0)), 0.0, 0.0)
        attr = self.names.attrs.put(reply.attr, t)
        return Entry(self._overlay(attr), 0.0, ATTR_TTL_S)

    async def _inode_call(self, name: str, req: m.Message, ino: int):
        """A call about one inode; if the inode is gone (another mount removed it), what
        this client knew of it is forgotten, so the kernel's retry looks its name up anew."""
        try:
            return await self._meta(name, req)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                self.names.attrs.drop(ino)
            raise

    async def getattr(self, ino: int) -> m.Attr:
        """The attributes of an inode (stat(2)), fresh within ATTR_TTL_S."""
        attr = (await self.getattr_entry(ino)).attr
        assert attr is not None
        return attr

    async def setattr(
        self,
        ino: int,
        ctx: Optional[m.Ctx],
        *,
        mode: Optional[int] = None,
        uid: Optional[int] = None,
        gid: Optional[int] = None,
        size: Optional[int] = None,
        atime_ns: Optional[int] = None,
        mtime_ns: Optional[int] = None,
        atime_now: bool = False,
        mtime_now: bool = False,
        fh: Optional[int] = None,
        kill_suidgid: bool = False,
    ) -> m.Attr:
        """Change attributes; `fh`: through this open handle (ftruncate: its open's
        permission counts, not the file's mode now); `kill_suidgid`: the caller may not
        keep set-user/group-ID bits (a truncate without CAP_FSETID: they are dropped)."""
        f = self._files.get(ino)
        if f is not None and f.stage is not None and size is not None and self.stager is not None:
            # A staged file's content is here: its size changes here (the upload commits it).
            await self.stager.truncate(f, size)
            size = None
            if all(v is None for v in (mode, uid, gid, atime_ns, mtime_ns)) and not (atime_now or mtime_now
                                                                                     or kill_suidgid):
                return await self.getattr(ino)
        if f is not None and (size is not None or mtime_ns is not None or mtime_now):
            # Settle buffered writes first: a truncate must not race with uploads of blocks
            # it removes, and a later commit would overwrite an explicit mtime (cp -a, touch).
            await self.writer.settle(f)
        h = self._handles.get(fh) if fh is not None else None
        session = self.session.id if (size is not None or kill_suidgid) and h is not None and h.writable else 0
        req = m.SetattrReq(ino, self._ctx(ctx), mode, uid, gid, size, atime_ns, mtime_ns, atime_now, mtime_now,
                           session, kill_suidgid=kill_suidgid)
        self.names.attrs.drop(ino)
        t = now()
        attr = (await self._meta("setattr", req)).attr
        if size is not None:
            self._note_generation(ino, attr.generation)
            f = self._files.get(ino)
            if f is not None:
                return self._overlay(await self._refetch_map(f))
        self.names.attrs.put(attr, t)
        return self._overlay(attr)

    def _note_generation(self, ino: int, generation: int) -> None:
        """Our own content change moved the generation by one: the page cache, which saw
        the change go through it, is still right. Anything else: drop it at next open."""
        if self._cached_generation.get(ino) == generation - 1:
            self._cached_generation[ino] = generation
        else:
            self._cached_generation.pop(ino, None)

    # ------------------------------------------------------------------ namespace

    async def mknod(self, parent: int, name: bytes, mode: int, ctx: Optional[m.Ctx], rdev: int = 0,
                    umask: int = 0) -> m.Attr:
        """`umask` masks the mode unless the directory has a default ACL (which decides
        instead), as the kernel's umask does on a local file system; so too for create
        and mkdir."""
        entry_names(name)
        t = now()
        reply = await self._meta("mknod", m.MknodReq(parent, name, mode, self._ctx(ctx), rdev, umask=umask))
        self.names.added(parent, name, reply.attr, reply.parent, t)
        return reply.attr

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: Optional[m.Ctx], umask: int = 0, *, stage: bool = True) -> tuple[int, m.Attr]:
        """Create a regular file and open it, in one metadata round trip. In an async
        checkpoint directory, with a staging area (and `stage`), it is staged (staging.py)."""
        entry_names(name)
        ctx = self._ctx(ctx)
        prealloc = PREALLOC_BLOCKS_AT_CREATE if self.names.new_files_need_blocks(parent) else 0
        req = m.MknodReq(parent, name, (mode & 0o7777) | stat.S_IFREG, ctx, 0, self.session.id, prealloc, umask,
                         stage=stage and self.stager is not None)
        t = now()
        try:
            reply = await self._meta("mknod", req)
        except FsError as exc:
            if exc.errno == errno.EEXIST:
                self.names.distrust(parent, name)  # a name our listing did not know
            raise
        attr = reply.attr
        self.names.added(parent, name, attr, reply.parent, t)
        f = self._file_state(attr)
        f.set_map(attr, [])
        f.spare = {a.index: a for a in reply.allocations}
        f.created_in = parent
        f.no_capability = True  # a new file has no xattrs
        f.handles += 1
        f.opened(ctx, True, reply.grant)
        self._cached_generation[attr.ino] = attr.generation
        if reply.staged and self.stager is not None:
            await self.stager.begin(f, ctx)
        return self._new_handle(attr.ino, writable=True), attr

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Optional[m.Ctx], umask: int = 0) -> m.Attr:
        """mkdir(2) of `name` in `parent` with `mode` less `umask`, as `ctx`; the new directory's attributes."""
        entry_names(name)
        t = now()
        reply = await self._meta("mkdir", m.MkdirReq(parent, name, mode, self._ctx(ctx), umask))
        self.names.added(parent, name, reply.attr, reply.parent, t)
        self.names.new_directory(reply.attr, t)
        return reply.attr

    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: Optional[m.Ctx]) -> m.Attr:
        """symlink(2): `name` in `parent` pointing at `target`; the link's attributes."""
        entry_names(name)
        if len(target) > SYMLINK_MAX_BYTES:
            raise FsError(errno.ENAMETOOLONG, f"symlink target longer than {SYMLINK_MAX_BYTES} bytes")
        t = now()
        reply = await self._meta("symlink", m.SymlinkReq(parent, name, target, self._ctx(ctx)))
        self.names.added(parent, name, reply.attr, reply.parent, t)
        return reply.attr

    async def readlink(self, ino: int) -> bytes:
        """readlink(2): the target of a symbolic link."""
        return (await self._meta("readlink", m.InodeReq(ino))).target

    async def link(self, ino: int, new_parent: int, new_name: bytes, ctx: Optional[m.Ctx] = None) -> m.Attr:
        """link(2): a new name for inode `ino` in `new_parent`; its attributes (nlink counted)."""
        entry_names(new_name)
        t = now()
        reply = await self._meta("link", m.LinkReq(ino, new_parent, new_name, self._ctx(ctx)))
        self.names.added(new_parent, new_name, reply.attr, reply.parent, t)
        return self._overlay(reply.attr)

    async def unlink(self, parent: int, name: bytes, ctx: Optional[m.Ctx] = None) -> None:
        """unlink(2) of `name` in `parent` (open handles keep an unlinked file readable)."""
        entry_names(name)
        await self._record_before_removal(parent, name)
        t = now()
        reply = await self._meta("unlink", m.RemoveReq(parent, name, self._ctx(ctx)))
        self.names.attrs.drop(reply.ino)  # its link count and ctime changed
        self.names.removed(parent, name, reply.parent, t)

    async def remove_tree(self, parent: int, name: bytes, ctx: Optional[m.Ctx] = None) -> None:
        """rm -r of entry `name` of `parent`: a directory with what is under it, or one file."""
        attr = await self.lookup(parent, name, ctx)
        if not stat.S_ISDIR(attr.mode):
            await self.unlink(parent, name, ctx)
            return
        while entries := await self.listdir(attr.ino, ctx):
            for e in entries:
                await self.remove_tree(attr.ino, e.name, ctx)
        await self.rmdir(parent, name, ctx)

    async def rmdir(self, parent: int, name: bytes, ctx: Optional[m.Ctx] = None) -> None:
        """rmdir(2) of the empty directory `name` in `parent`."""
        entry_names(name)
        t = now()
        reply = await self._meta("rmdir", m.RemoveReq(parent, name, self._ctx(ctx)))
        self.names.attrs.drop(reply.ino)
        self.names.listings.drop(reply.ino)
        self.names.removed(parent, name, reply.parent, t)

    async def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0,
        ctx: Optional[m.Ctx] = None,
    ) -> None:
        """rename(2)/renameat2(2) with `flags` RENAME_NOREPLACE or RENAME_EXCHANGE; atomic and durable."""
        entry_names(name, new_name)
        if not flags & m.RENAME_EXCHANGE:
            await self._record_before_removal(new_parent, new_name)  # (the name it may replace)
        t = now()
        try:
            req = m.RenameReq(parent, name, new_parent, new_name, flags, self._ctx(ctx))
            reply = await self._meta("rename", req)
        except FsError:
            self.names.distrust(parent, name)
            self.names.distrust(new_parent, new_name)
            raise
        if reply.moved:
            self.names.renamed(parent, name, new_parent, new_name, reply, flags & m.RENAME_EXCHANGE != 0, t)

    async def statfs(self) -> m.StatfsReply:
        """statfs(2) of the cluster: capacity and use over its data servers, inode counts."""
        return await self._meta("statfs", m.Empty())

    async def block_map(self, ino: int) -> m.BlockMapReply:
        """File `ino`'s attributes and blocks, each with its replicas' servers (what
        `stripefs info` shows). An admin's session asks for it directly; a client's opens
        the file for reading first, which is what entitles a session to it."""
        try:
            return await self._meta("block_map", m.BlockMapReq(ino, self.session.id))
        except FsError as exc:
            if exc.errno != errno.EBADF:
                raise
        fh, _, _ = await self.open(ino, os.O_RDONLY)
        try:
            await self._record(fh)  # (a reader's open of a file without blocks may not be)
            return await self._meta("block_map", m.BlockMapReq(ino, self.session.id))
        finally:
            await self.release(fh)

    async def usage(self, ino: int, ctx: Optional[m.Ctx] = None) -> m.UsageReply:
        """Bytes, files and directories under directory `ino` (a file: its own size), from
        the metaserver's usage counters: one call whatever the subtree holds."""
        return await self._meta("usage", m.UsageReq(ino, self._ctx(ctx)))

    async def find(self, ino: int, labels: list[m.Label], cursor: Sequence[int] = (), limit: int = 1000,
                   ctx: Optional[m.Ctx] = None) -> m.FindReply:
        """One page of the regular files under directory `ino` whose labels are all of
        `labels` (own or inherited), from the metaserver's label index; pass the reply's
        cursor back for the next page, until it is empty. Paths are from `ino`."""
        return await self._meta("find", m.FindReq(ino, labels, list(cursor), limit, self._ctx(ctx)))

    async def status(self) -> m.StatusReply:
        """The cluster's state, as `stripefs status` shows it."""
        return await self._meta("status", m.Empty())

    # ------------------------------------------------------------------ directories

    def opendir(self, ino: int, ctx: Optional[m.Ctx] = None) -> int:
        """opendir(3) of directory `ino` as `ctx`: a handle for readdir and releasedir."""
        dh = next(self._next_fh)
        self._dirs[dh] = DirHandle(ino, self._ctx(ctx))
        return dh

    def dir_inode(self, dh: int) -> int:
        """The directory inode a readdir handle lists."""
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
        t = now()
        reply = await self._meta("readdir", m.ReaddirReq(d.ino, offset, READDIR_BATCH, d.ctx))
        self.names.listed(d.ino, offset, reply, t)
        d.start, d.entries, d.more = offset, reply.entries, reply.more
        return [self._overlay_entry(e) for e in reply.entries], reply.more

    def _overlay_entry(self, e: m.DirEntry) -> m.DirEntry:
        if e.attr.ino in self._files:
            return m.DirEntry(e.name, e.cookie, self._overlay(e.attr))
        return e

    async def listdir(self, ino: int, ctx: Optional[m.Ctx] = None, *, remember: bool = True) -> list[m.DirEntry]:
        """Every entry of a directory (convenience for programs; streams in batches).
        remember=False: the name cache is not told (a listing the kernel never sees must
        not count as attributes it was handed: open compares with those, close-to-open)."""
        ctx = self._ctx(ctx)
        out: list[m.DirEntry] = []
        offset, more = 0, True
        while more:
            t = now()
            reply = await self._meta("readdir", m.ReaddirReq(ino, offset, READDIR_BATCH, ctx))
            if remember:
                self.names.listed(ino, offset, reply, t)
            out.extend(reply.entries)
            more = reply.more and bool(reply.entries)
            if reply.entries:
                offset = reply.entries[-1].cookie
        return out

    def releasedir(self, dh: int) -> None:
        """Forget a directory handle (closedir(3))."""
        self._dirs.pop(dh, None)

    # ------------------------------------------------------------------ xattrs

    def _known_without_xattrs(self, ino: int) -> bool:
        got = self.names.attrs.get(ino)
        return got is not None and got[0].xattrs == 0

    async def getxattr(self, ino: int, name: bytes, ctx: Optional[m.Ctx] = None) -> bytes:
        """getxattr(2): one extended attribute's value (ENODATA if unset)."""
        if name in VIRTUAL_CHECKPOINT_XATTRS:
            status = await self.checkpoints.status(ino, self._ctx(ctx))
            if name == PENDING_XATTR:
                return str(status["pending_bytes"]).encode()
            if name == STATUS_XATTR:
                return json.dumps(status, sort_keys=True).encode()
            return b"1" if status["commit_asked"] else b"0"
        f = self._files.get(ino)
        if not name.startswith(VIRTUAL_XATTR_PREFIX) and self._known_without_xattrs(ino):
            # ls -l asks every entry for ACLs and security labels: answered here, a listing
            # of 10,000 entries does not cost 20,000 round trips.
            if name == CAPABILITY_XATTR and f is not None:
                f.no_capability = True
            raise FsError(errno.ENODATA)
        if name == CAPABILITY_XATTR and f is not None and f.no_capability:
            # The kernel asks before every write; while the file is open here, the answer
            # only changes through this client (setxattr below), so one round trip will do.
            raise FsError(errno.ENODATA)
        try:
            return (await self._meta("getxattr", m.XattrReq(ino, name, self._ctx(ctx)))).value
        except FsError as exc:
            if exc.errno == errno.ENODATA and name == CAPABILITY_XATTR and f is not None:
                f.no_capability = True
            raise

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0,
                       ctx: Optional[m.Ctx] = None) -> None:
        """setxattr(2) with XATTR_CREATE/XATTR_REPLACE `flags`; `stripefs.*` names set a
        directory's layout or checkpoint mode; stripefs.checkpoint.commit asks for a
        checkpoint directory's marker (staging.py)."""
        if name in VIRTUAL_CHECKPOINT_XATTRS:
            if name != COMMIT_XATTR:
                raise FsError(errno.EPERM, f"{name!r} is read-only")
            await self.checkpoints.commit(ino, self._ctx(ctx))
            return
        self.names.attrs.forget(ino)
        f = self._files.get(ino)
        if f is not None and name == CAPABILITY_XATTR:
            f.no_capability = False
        try:
            await self._meta("setxattr", m.XattrReq(ino, name, self._ctx(ctx), value, flags))
        finally:
            self.names.attrs.forget(ino)  # what was fetched during the call may predate it

    async def listxattr(self, ino: int) -> list[bytes]:
        """listxattr(2): the names of an inode's extended attributes."""
        if self._known_without_xattrs(ino):
            return []
        return (await self._meta("listxattr", m.InodeReq(ino))).names

    async def removexattr(self, ino: int, name: bytes, ctx: Optional[m.Ctx] = None) -> None:
        """removexattr(2) (ENODATA if unset)."""
        self.names.attrs.forget(ino)
        try:
            await self._meta("removexattr", m.XattrReq(ino, name, self._ctx(ctx)))
        finally:
            self.names.attrs.forget(ino)

    # ------------------------------------------------------------------ open files

    def _new_handle(self, ino: int, writable: bool, recorded: bool = True) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = HandleState(ino, writable, recorded=recorded)
        return fh

    async def _record(self, fh: int) -> None:
        """Have the metaserver record the open of a handle it did not record
        (OpenReq.unrecorded_ok): what locks through it need, and a removal here of the
        file's last name (an open file outlives its names)."""
        self._lingering.pop(fh, None)
        h = self._handles.get(fh)
        if h is None or h.recorded:
            return  # (closed meanwhile: nothing to record)
        f = self._files[h.ino]
        req = m.OpenReq(h.ino, self.session.id, self._ctx(f.opener), os.O_RDONLY, grant=f.grant, map_wanted=False)
        reply = await self._inode_call("open", req, h.ino)
        if self._handles.get(fh) is not h or h.recorded:
            self.session.release_soon(h.ino)  # closed meanwhile, or recorded by another task
            return
        f.opened(req.ctx, False, reply.grant)
        h.recorded = True
        f.unrecorded -= 1

    def _unrecorded_handles(self, ino: int) -> list[int]:
        """The handles here on `ino` whose opens the metaserver did not record."""
        return [fh for fh, h in self._handles.items() if h.ino == ino and not h.recorded]

    async def _record_lingering(self) -> None:
        """Record the opens of handles that went unrecorded on files with blocks and are
        still open `record_open_after_s` after (the metaserver keeps such a file after an
        unlink elsewhere only a few times that long: base.py `_purge_if_free`). A sample
        read and closed within it costs the metaserver no write and no release."""
        while True:
            after = self.session.record_open_after_s
            await trio.sleep(max(after / 4, 0.05) if after else 1.0)
            due = now() - after
            for fh, t in list(self._lingering.items()):
                if t > due:
                    break  # (in the order they were opened)
                del self._lingering[fh]
                self._spawn(self._record_lingering_one, fh)

    async def _record_lingering_one(self, fh: int) -> None:
        try:
            await self._record(fh)
        except FsError as exc:
            # Removed elsewhere and purged already (this client was slower than the wait,
            # or a metaserver's clock was far ahead): the handle still reads the blocks
            # it has, and those the data servers keep for the GC grace.
            log.warning("file handle %d: open not recorded in time: %s", fh, exc)

    async def _fresh_map(self, f: FileState) -> m.BlockMapReply:
        """An open file's attributes and block map, asked anew. The metaserver gives a
        session a file's map only while it holds the file open: if every handle here on it
        went unrecorded, one is recorded first."""
        if f.unrecorded and f.unrecorded >= f.handles:
            fh = next(iter(self._unrecorded_handles(f.ino)), None)
            if fh is not None:
                try:
                    await self._record(fh)
                except FsError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    # Removed elsewhere and purged before this client recorded the open
                    # (it was stopped longer than the metaserver's wait): what the handle
                    # had not read yet is lost to it.
                    log.error("inode %d: purged before its open here was recorded; %s", f.ino, exc)
                    raise FsError(errno.EIO, f"inode {f.ino} was removed elsewhere and purged") from None
        reply = await self._meta("block_map", m.BlockMapReq(f.ino, self.session.id))
        self.maps.learn(reply.attr, reply.blocks)
        return reply

    async def _record_before_removal(self, parent: int, name: bytes) -> None:
        """`name` of `parent` is about to go (unlink, or replaced by a rename): if it is
        the name of a file open here unrecorded, its opens are recorded first, so that the
        file stays for them as a local file system keeps it."""
        ino = self.names.ino_of(parent, name)
        f = self._files.get(ino) if ino is not None else None
        if f is None or not f.unrecorded:
            return
        for fh in self._unrecorded_handles(f.ino):
            try:
                await self._record(fh)
            except FsError as exc:
                # Gone already (removed elsewhere; the name may lead to another file now):
                # the removal goes on, and the handle reads what it opened, as it would.
                log.info("inode %d: open not recorded before a removal: %s", ino, exc)

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

    async def open(self, ino: int, flags: int, ctx: Optional[m.Ctx] = None) -> tuple[int, bool, bool]:
        """Open a file; returns (handle, whether the kernel may keep its page cache, whether
        the attributes changed from the ones last handed out: close-to-open, the kernel
        must then forget its copy, or it reads up to an old size)."""
        ctx = self._ctx(ctx)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        staged = self._files.get(ino)
        if writable and staged is not None and self.stager is not None:
            await self.stager.settled(staged)  # closed and queued: written as anywhere else after
        if flags & os.O_TRUNC and writable:
            # As the kernel's truncate at open: a caller other than root loses set-ID bits.
            await self.setattr(ino, ctx, size=0, kill_suidgid=ctx.uid != 0)
        t = now()
        # A reader's open need not be recorded if the file has no blocks (the metaserver
        # decides; with atime on, each handle's first read reports on its open). Only the
        # first open of a file here: a later one may be what keeps a staged file's open
        # for its upload when the writer's goes (release).
        unrecorded_ok = not writable and not flags & os.O_TRUNC and not self.atime and ino not in self._files
        # A reader's open names the map this client holds of the file, if any: unchanged, it
        # does not come again (KnownMaps).
        offered = self.maps.offer(ino) if not writable and not flags & os.O_TRUNC else None
        req = m.OpenReq(ino, self.session.id, ctx, flags & ~os.O_TRUNC, unrecorded_ok=unrecorded_ok,
                        map_generation=offered[0] if offered is not None else 0)
        reply = await self._inode_call("open", req, ino)
        if reply.same_map:
            if offered is None or reply.attr.generation != offered[0]:
                raise FsError(errno.EIO, f"inode {ino}: the metaserver left out a block map not named")
            reply.blocks = offered[1]
            self.maps.reused += 1
        else:
            self.maps.learn(reply.attr, reply.blocks)
        if reply.attr.nlink == 0 and ino not in self._files:
            # Removed since its name was looked up (another mount replaced it), and kept
            # only by someone's open, or by a release of ours still on its way: a name that
            # leads here is stale. ENOENT makes fs/fuse answer ESTALE, and the kernel looks
            # the name up again; a file open here is still opened (/proc/PID/fd).
            if reply.recorded:
                self.session.release_soon(ino)
            self.names.attrs.drop(ino)
            raise FsError(errno.ENOENT, f"inode {ino} was removed")
        known = self.names.attrs.last(ino)
        changed = known is not None and (known.size, known.mtime_ns, known.ctime_ns) != (
            reply.attr.size, reply.attr.mtime_ns, reply.attr.ctime_ns)
        self.names.attrs.put(reply.attr, t)
        f = self._file_state(reply.attr)
        f.set_map(reply.attr, reply.blocks, reply)
        self.prefetcher.opened(ino)
        f.handles += 1
        f.unrecorded += not reply.recorded
        f.opened(ctx, writable, reply.grant)
        keep = self._cached_generation.get(ino) == reply.attr.generation
        self._cached_generation[ino] = reply.attr.generation
        fh = self._new_handle(ino, writable, reply.recorded)
        if not reply.recorded and reply.blocks:
            self._lingering[fh] = now()
        return fh, keep, changed

    async def kill_suidgid(self, fh: int) -> None:
        """A caller other than root writes through `fh`: the file's set-user-ID bit, and its
        set-group-ID bit where group execute is set, go first, as a write drops them on a
        local file system. No round trip unless the file, as last seen, has one of them (the
        metaserver decides which go, with the opener's groups)."""
        h, f = self._handle(fh)
        attr, ctx = self.names.attrs.last(h.ino) or f.attr, self._ctx(f.opener)
        if ctx.set_id_dropped(attr.mode, attr.gid):
            await self.setattr(h.ino, ctx, fh=fh, kill_suidgid=True)

    def inode_of(self, fh: int) -> Optional[int]:
        """The inode an open handle is of (None: not open)."""
        h = self._handles.get(fh)
        return h.ino if h is not None else None

    def no_capability(self, ino: int) -> bool:
        """Whether `ino` is open here and known to have no security.capability (getxattr
        answers that without a round trip; a mount can answer it without calling here)."""
        f = self._files.get(ino)
        return f is not None and f.no_capability

    def direct_staged(self, fh: int, attach: Callable[[int], T]) -> Optional[T]:
        """If the handle's file is staged and still being written (staging.py): `attach`
        (the mount's FUSE passthrough) is given the descriptor of its local copy, which the
        kernel reads and writes directly from then on, and its result returned; else None."""
        f = self._handle(fh)[1]
        return self.stager.direct(f, attach) if self.stager is not None else None

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        """pread(2) on a handle: up to `size` bytes at `offset` (fewer only at the end of the file)."""
        h, f = self._handle(fh)
        self._accessed(h, f)
        if f.stage is not None and self.stager is not None:
            data = await self.stager.read(f, offset, size)
        else:
            data = await self.reader.read(h, f, offset, size)  # type: ignore[assignment]
        _metrics.read_bytes.inc(len(data))
        return data

    async def read_view(self, fh: int, offset: int, size: int) -> bytes | memoryview | list[bytes | memoryview]:
        """read, but what cached blocks hold comes back as views into the cache, and a read
        spanning buffers as the list of them: for a caller that copies it out at once (the
        FUSE reply, one writev), one copy of every byte read less."""
        h, f = self._handle(fh)
        self._accessed(h, f)
        if f.stage is not None and self.stager is not None:
            return await self.read(fh, offset, size)
        data = await self.reader.read(h, f, offset, size, view=True)
        _metrics.read_bytes.inc(sum(map(len, data)) if isinstance(data, list) else len(data))
        return data

    def _accessed(self, h: HandleState, f: FileState) -> None:
        """With atime on: the first read through a handle tells the metaserver, in the
        background, when relatime's rules may move atime (the metaserver decides)."""
        if not self.atime or h.accessed:
            return
        h.accessed = True
        a = f.attr
        if a.atime_ns <= max(a.mtime_ns, a.ctime_ns) or time.time_ns() - a.atime_ns > RELATIME_AGE_S * 10**9:
            self.names.attrs.drop(f.ino)
            assert self._nursery is not None  # (a handle exists only on a started client)
            self.session.report_soon(self._nursery, "accessed", m.AccessedReq(f.ino, self.session.id))

    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        """pwrite(2) on a handle: buffered (write-back) until close, fsync or memory pressure; returns the count."""
        f = self._handle(fh)[1]
        if f.stage is not None and self.stager is not None:
            n = await self.stager.write(f, offset, data)
        else:
            n = await self.writer.write(f, offset, data)
        _metrics.written_bytes.inc(n)
        return n

    async def flush(self, fh: int) -> None:
        """close(2) of one descriptor: the data is committed on return (close-to-open);
        a staged file's is in the staging area (staging.py)."""
        f = self._handle(fh)[1]
        if f.stage is not None and self.stager is not None:
            f.refresh_stage()  # (its bytes are in the local copy; the last release reports them)
            return
        await self.writer.settle(f)

    async def fsync(self, fh: int) -> None:
        """fsync(2): every byte written through this inode is on its replicas' disks and its metadata durable."""
        f = self._handle(fh)[1]
        if f.stage is not None and self.stager is not None:
            await self.stager.fsync(f)  # durable on local disk; its upload makes it so on its servers
            return
        commits = f.commits
        await self.writer.settle(f, durable=True)
        if f.commits == commits:
            # Nothing to commit, but metadata changes (create, truncate, chmod) may still be
            # only crash-safe on the metaserver: make them durable as fsync promises.
            await self._meta("sync", m.Empty())

    async def release(self, fh: int) -> None:
        """The last close of a handle. The metaserver hears of it in the background
        (session.py): the caller does not wait for a round trip, unless locks were taken
        through the handle (they go first)."""
        h = self._handles.pop(fh, None)
        if h is None:
            return
        self._lingering.pop(fh, None)
        f = self._files[h.ino]
        self.reader.closed(h, f)
        try:
            if (f.handles == 1 or self.locks.taken_through(fh)) and f.busy():
                await self.writer.settle(f)
        finally:
            try:
                await self.locks.handle_closed(fh, h.ino)
            except FsError as exc:
                log.error("inode %d: locks of a closed handle not released (they go with the session): %s",
                          h.ino, exc)
            if f.stage is not None and f.handles == 2 and not f.stage.queued and self.stager is not None:
                # Only the stager's hold is left after this one: it takes over this
                # handle's open on the metaserver for the upload, which it then queues.
                f.handles -= 1
                await self.stager.closed(f)
            else:
                self._drop_handle(f, h.recorded)

    def _drop_handle(self, f: FileState, recorded: bool = True) -> None:
        """One open of `f` here is gone (a recorded one is one on the metaserver, told soon)."""
        f.handles -= 1
        f.unrecorded -= not recorded
        abandon: tuple[int, ...] = ()
        if f.handles == 0:
            del self._files[f.ino]
            f.drop_all()  # only left over when the last flush failed: that data is lost
            # Blocks allocated ahead that the file never reached (writer.py): garbage now,
            # with the release, not at the metaserver's pending timeout.
            abandon = tuple(a.block_id for a in f.spare.values())
            f.spare.clear()
        if recorded:
            self.session.release_soon(f.ino, abandon=abandon)

    async def _reopen_staged(self, ino: int, opener: m.Ctx, grant: bytes) -> FileState:
        """Open, for writing as `opener` (with the grant its create or open came with), a
        staged file an earlier client left (staging.py)."""
        reply = await self._inode_call("open", m.OpenReq(ino, self.session.id, opener, os.O_WRONLY, grant=grant), ino)
        f = self._file_state(reply.attr)
        f.set_map(reply.attr, reply.blocks, reply)
        f.handles += 1
        f.opened(opener, True, reply.grant)
        return f

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2). Mode 0 makes the file at least offset + length bytes long (as
        ftruncate would: stripefs reserves no space it could not honour, so later writes
        can still meet ENOSPC); FALLOC_FL_KEEP_SIZE alone changes nothing; with
        FALLOC_FL_PUNCH_HOLE the range reads as zeros after, its whole blocks freed. Other
        modes are EOPNOTSUPP."""
        h, f = self._handle(fh)
        if not h.writable:
            raise FsError(errno.EBADF, "fallocate needs a descriptor open for writing")
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL, "fallocate: offset < 0 or length <= 0")
        if offset + length > FILE_SIZE_MAX_BYTES:
            raise FsError(errno.EFBIG, f"{offset + length} bytes exceed the largest file")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise FsError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} is not supported")
        if f.stage is not None:
            f.refresh_stage()  # (the kernel may have written the local copy itself)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if f.stage is not None:
                raise FsError(errno.EOPNOTSUPP, "no holes in a staged checkpoint file")
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise FsError(errno.EOPNOTSUPP, "FALLOC_FL_PUNCH_HOLE goes with FALLOC_FL_KEEP_SIZE")
            await self._punch_hole(f, offset, min(offset + length, f.size))
        elif not mode & FALLOC_FL_KEEP_SIZE and offset + length > f.size:
            await self.setattr(h.ino, None, size=offset + length, fh=fh)

    async def _punch_hole(self, f: FileState, start: int, end: int) -> None:
        """Zeroes [start, end) of a file (end <= its size): the blocks it covers whole (the
        last one counts as whole when the hole reaches the end of the file) leave the
        block map; the partial ones at the edges are written with zeros."""
        if start >= end:
            return
        await self.writer.settle(f)
        bs = f.block_size
        first = -(-start // bs)  # the first block that starts inside the hole
        last = -(-end // bs) if end >= f.size else end // bs  # past the last block wholly inside
        if first >= last:
            await self._write_zeros(f, start, end)
        else:
            await self._write_zeros(f, start, first * bs)
            await self._write_zeros(f, last * bs, end)
        await self.writer.settle(f)
        if first < last:
            await self._meta("punch_hole", m.PunchReq(f.ino, self.session.id, first * bs, (last - first) * bs))
            self._note_generation(f.ino, (await self._refetch_map(f)).generation)

    async def _write_zeros(self, f: FileState, start: int, end: int) -> None:
        """Zeros over [start, end), within one block; nothing where the file has no data
        there (a block never written already reads as zeros)."""
        if start >= end:
            return
        index = start // f.block_size
        if f.blocks.get(index) is None and index not in f.dirty and not (index == 0 and f.inline):
            return
        await self.writer.write(f, start, bytes(end - start))

    # ------------------------------------------------------------------ locks

    async def lock(self, fh: int, type: int, *, kind: int = LOCK_RECORD, start: int = 0, end: int = OFFSET_MAX,
                   owner: Optional[int] = None, pid: Optional[int] = None, wait: bool = False) -> bool:
        """Take (m.F_RDLCK, m.F_WRLCK) or release (m.F_UNLCK) a cluster-wide lock on bytes
        [start, end] of an open file (kind LOCK_FLOCK: the whole file). The owner is the
        handle unless named (fs/fuse passes the kernel's: a process, or an open file
        description); `pid` is what F_GETLK shows others. EAGAIN when another owner holds
        a conflicting lock, unless `wait`: then it returns once the lock is taken.

        Locks order data too, as NFS's do: what this client wrote is committed before a
        lock of it is released, and taking a lock fetches the file's block map again, so
        what another client wrote before it released the lock is what is read here. True
        when that found the file changed (fs/fuse then drops the kernel's cached pages)."""
        h, f = self._handle(fh)
        if kind == LOCK_RECORD and type == m.F_WRLCK and not h.writable:
            raise FsError(errno.EBADF, "a write lock needs a descriptor open for writing")
        if type == m.F_UNLCK and f.busy():
            await self.writer.settle(f)
        if type != m.F_UNLCK:
            await self._record(fh)  # (a lock is taken through a recorded open)
        t = now()
        attr = await self.locks.set(fh, h.ino, fh if owner is None else owner, type, kind=kind, start=start,
                                    end=end, pid=(self.identity.pid or os.getpid()) if pid is None else pid,
                                    wait=wait)
        return attr is not None and await self._revalidate(f, attr, t)

    async def _revalidate(self, f: FileState, attr: m.Attr, t: float) -> bool:
        """Attributes of an open file fresh from the metaserver: its block map is fetched
        again if its content changed since we last knew it (then True)."""
        self.names.attrs.put(attr, t)
        before = f.attr.generation
        if attr.generation == before:
            return False
        generation = (await self._refetch_map(f)).generation
        self._cached_generation[f.ino] = generation
        return generation != before

    async def _refetch_map(self, f: FileState) -> m.Attr:
        """Fetch an open file's attributes and block map again (its content changed, here
        or elsewhere); the attributes, now also the cached ones."""
        t = now()
        reply = await self._fresh_map(f)
        f.set_map(reply.attr, reply.blocks, reply)
        self.names.attrs.put(reply.attr, t)
        return reply.attr

    # ------------------------------------------------------------------ prefetch

    def prefetch(self, paths: Iterable[str | bytes], *, owner: Hashable = None, replace: bool = False,
                 ctx: Optional[m.Ctx] = None) -> int:
        """Say in which order files will be read (paths from the root, a data loader's
        sampler order): the client fetches them ahead of the reads, many at once, within
        its prefetch memory (prefetch.py). Added to `owner`'s plan, or replacing it;
        plans of different owners are served in turn. Returns the paths `owner`'s plan
        waits with. The files are looked up as `ctx` (who may not read one gets nothing
        fetched for it). What readers see is unchanged: only when the bytes arrive."""
        return self.prefetcher.plan(owner, paths, self._ctx(ctx), replace=replace)

    def prefetch_cancel(self, owner: Hashable = None, *, every: bool = False) -> None:
        """Forget `owner`'s plan (all of them with `every`) and what it fetched unread."""
        if every:
            self.prefetcher.cancel_all()
        else:
            self.prefetcher.cancel(owner)

    def disk_status(self) -> dict[str, int]:
        """The local disk tier's counters (`enabled` 0 without one): bytes and blocks kept,
        the limit, hits, misses, blocks found damaged and fetched again, blocks being written."""
        d = self.data.disk
        if d is None:
            return {"enabled": 0}
        staged = {f"stage_{k}": v for k, v in self.stager.status().items()} if self.stager is not None else {}
        return {"enabled": 1, "kept_bytes": d.used_bytes, "blocks": len(d), "limit_bytes": d.limit_bytes,
                "hits": d.hits, "misses": d.misses, "corrupt": d.corrupt, "writing": d.writing, **staged}

    def prefetch_status(self) -> PrefetchStatus:
        """How far prefetch has got: paths waiting, files and bytes fetched, read, dropped."""
        return self.prefetcher.status()

    async def test_lock(self, fh: int, type: int, *, kind: int = LOCK_RECORD, start: int = 0,
                        end: int = OFFSET_MAX, owner: Optional[int] = None) -> Optional[m.LockReply]:
        """F_GETLK: the lock of another owner that [start, end] of `type` would conflict
        with (type, start, end, pid), or None."""
        h = self._handle(fh)[0]
        await self._record(fh)
        return await self.locks.test(h.ino, fh if owner is None else owner, type, start, end, kind)

    async def unlock_owner(self, fh: int, owner: int) -> None:
        """`owner` closed a descriptor of fh's file: its record locks on the file go, after
        what was written is committed."""
        h = self._handles.get(fh)
        if h is not None and self.locks.may_hold(h.ino, owner):
            f = self._files[h.ino]
            if f.busy():
                await self.writer.settle(f)
            await self.locks.owner_closed(h.ino, owner)


@asynccontextmanager
async def open_client(meta_address: str | Sequence[str], creds: Credentials, **options) -> AsyncIterator[Client]:
    """Connect to a cluster with a client credential bundle (stripefs.proto.credentials.load_credentials);
    `meta_address`: the metaservers, `HOST:PORT[,HOST:PORT...]` or a list (ValueError if
    malformed). The client's background tasks live in a nursery owned here."""
    client = Client(meta_address, creds, **options)
    async with trio.open_nursery() as nursery:
        await client._start(nursery)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
            nursery.cancel_scope.cancel()
