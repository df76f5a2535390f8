"""The pyfuse3 adapter: each handler builds the call, calls stripefs.client, maps the result.

This is the only place that raises pyfuse3.FUSEError. An unexpected exception in a handler
is logged and becomes EIO; it never takes the mount down.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import time
from typing import Any, Callable

import pyfuse3
import trio

from stripefs.client import (ATTR_TTL_S, CAPABILITY_XATTR, ENTRY_TTL_S, F_RDLCK, F_UNLCK, F_WRLCK, LOCK_FLOCK, OFFSET_MAX,
                             ROOT_INODE, Attr, Client, Ctx, Entry, FsError, metrics, signed64)

from .control import ControlFiles
from .memory import DataActivity
from .passthrough import Passthrough
from .queries import CONTROL_NAME, VIRTUAL_BASE, Node, Queries

log = logging.getLogger("stripefs.fuse")
_metrics = metrics.fuse()

#: How long the kernel may trust attributes and directory entries: the client's own
#: lifetimes (fs/client/cache.py), so nothing is trusted longer here than there.
ATTR_TIMEOUT_S = ATTR_TTL_S
ENTRY_TIMEOUT_S = ENTRY_TTL_S
#: "." and ".." come first in a listing, at offsets 0 and 1.
DOT_ENTRIES = 2
#: How long the supplementary groups read for a process are reused (a process's groups
#: rarely change; pids are reused far more slowly than this).
GROUPS_TTL_S = 1.0
#: Processes whose groups are remembered at most.
GROUPS_CACHED_MAX = 4096


#: flock(2) operations as lock types.
FLOCK_TYPES = {fcntl.LOCK_SH: F_RDLCK, fcntl.LOCK_EX: F_WRLCK, fcntl.LOCK_UN: F_UNLCK}


def lock_end(start: int, length: int) -> int:
    """The last byte of a kernel lock range (length 0: to the end of the file)."""
    return OFFSET_MAX if length == 0 else min(start + length - 1, OFFSET_MAX)


async def drop_page_cache(inode: int) -> None:
    """The file changed on another client: the kernel's cached pages of it go (a lock was
    just taken; fs/client Client.lock). In a thread: the kernel may wait for pages that a
    read in progress holds, and that read is answered on this trio thread."""
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
    except OSError as exc:
        log.warning("inode %d: could not drop the kernel's cached pages: %s", inode, exc)


def forget_attributes(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=True)
    except OSError as exc:
        log.warning("inode %d: could not drop the kernel's attributes: %s", inode, exc)


def errno_boundary(fn: Callable) -> Callable:
    """Turn FsError into FUSEError and anything unexpected into a logged EIO; count each
    request and its time (proto/metrics.py: stripefs_fuse_ops, stripefs_fuse_op_seconds)."""
    labels = (fn.__name__,)

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            result = await fn(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            _metrics.observe(labels, OSError(exc.errno, ""), started)
            raise
        except FsError as exc:
            _metrics.observe(labels, exc, started)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:  # noqa: BLE001 - the mount must survive its own bugs
            log.exception("%s failed", fn.__name__)
            _metrics.observe(labels, FsError(errno.EIO), started)
            raise pyfuse3.FUSEError(errno.EIO) from None
        _metrics.observe(labels, None, started)
        return result

    return wrapper


def stale_if_gone(exc: FsError) -> FsError:
    """An inode the kernel reached through a cached entry is gone (another mount removed
    or replaced it). ESTALE makes the kernel look the name up again and retry, so the
    caller sees the new file, or ENOENT, instead of a spurious error."""
    return FsError(errno.ESTALE, exc.message) if exc.errno == errno.ENOENT else exc


def entry(attr: Attr, entry_timeout: float = ENTRY_TIMEOUT_S, attr_timeout: float = ATTR_TIMEOUT_S) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = entry_timeout
    e.attr_timeout = attr_timeout
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = min(attr.block_size, 1 << 20) or 4096
    e.st_blocks = (attr.size + 511) // 512
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


class Groups:
    """The supplementary groups of the process behind a request, which FUSE does not send
    (the metaserver checks access with them, as the kernel did): read from
    /proc/PID/status, an in-memory file, and reused for GROUPS_TTL_S."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[float, int, int, list[int]]] = {}

    def of(self, pid: int, uid: int, gid: int) -> list[int]:
        t = time.monotonic()
        hit = self._known.get(pid)
        if hit is not None and hit[0] > t and hit[1:3] == (uid, gid):
            return hit[3]
        groups = self._read(pid)
        if len(self._known) >= GROUPS_CACHED_MAX:
            self._known.clear()
        self._known[pid] = (t + GROUPS_TTL_S, uid, gid, groups)
        return groups

    @staticmethod
    def _read(pid: int) -> list[int]:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
            start = status.index(b"\nGroups:") + 8
            return sorted({int(g) for g in status[start:status.index(b"\n", start)].split()})
        except (OSError, ValueError):
            return []  # the process is gone (or not ours to see): its primary group only


_groups = Groups()


def ctx_of(ctx: pyfuse3.RequestContext) -> Ctx:
    return Ctx(ctx.uid, ctx.gid, ctx.pid, _groups.of(ctx.pid, ctx.uid, ctx.gid))


class StripeOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    # POSIX ACLs: the kernel checks them (default_permissions) as it checks modes, with the
    # ACLs it reads through getxattr; it sends modes unmasked with the caller's umask
    # (FUSE_CAP_DONT_MASK, scripts/pyfuse3-stripefs.patch), which the metaserver applies
    # unless a default ACL of the directory decides instead.
    enable_acl = True

    def __init__(self, client: Client, mountpoint: str = "/") -> None:
        super().__init__()
        self.client = client
        #: the read-only tree under MNT/.stripefs (queries.py)
        self.queries = Queries(client)
        #: its files: the prefetch plan, the disk tier's counters (control.py)
        self.controls = ControlFiles(client, mountpoint)
        #: open listings of virtual directories: handle -> the entries it began with
        self._listings: dict[int, list[tuple[bytes, Node]]] = {}
        self._next_listing = VIRTUAL_BASE
        #: the kernel reads and writes staged files' local copies itself (passthrough.py)
        self.passthrough = Passthrough(client, enabled=client.stager is not None)
        #: READ and WRITE requests of files answered so far, for the memory hand-back (memory.py)
        self.activity = DataActivity()

    def _virtual(self, *inodes: int) -> bool:
        return any(self.queries.is_virtual(i) for i in inodes)

    def _read_only(self, *inodes: int) -> None:
        """EROFS for a change under .stripefs (its tree is a view)."""
        if self._virtual(*inodes):
            raise FsError(errno.EROFS, "the .stripefs tree is read-only")

    def _capability_known(self, ino: int) -> None:
        """Tell pyfuse3 what the client knows of `ino`'s security.capability: while it is
        known absent, pyfuse3 answers the getxattr the kernel sends before every write(2)
        itself, without a call into this mount's Python."""
        pyfuse3.no_capability(ino, self.client.no_capability(ino))

    def _in_view(self, parent_inode: int, name: bytes) -> bool:
        return self._virtual(parent_inode) or (parent_inode == ROOT_INODE and name == CONTROL_NAME)

    @errno_boundary
    async def lookup(self, parent_inode, name, ctx):
        if self._in_view(parent_inode, name):
            node = await self.queries.lookup(parent_inode, name, ctx_of(ctx))
            # A query's own directory is per caller: the kernel must ask again each time.
            timeout = 0.0 if parent_inode == self.queries.query_dir.ino else ENTRY_TIMEOUT_S
            if node is None:
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0
                negative.entry_timeout = 0.0
                return negative
            return entry(self.queries.attr(node), entry_timeout=timeout)
        e: Entry = await self.client.lookup_entry(parent_inode, name, ctx_of(ctx))
        if e.attr is not None:
            return entry(e.attr, e.entry_ttl, e.attr_ttl)
        # A negative entry the kernel may cache for what is left of its lifetime: create-
        # heavy workloads look every new name up first. A create through this mount
        # replaces it at once; another mount's create is seen within ENTRY_TIMEOUT_S.
        negative = pyfuse3.EntryAttributes()
        negative.st_ino = 0
        negative.entry_timeout = e.entry_ttl
        return negative

    @errno_boundary
    async def getattr(self, inode, ctx):
        if self._virtual(inode):
            return entry(self.queries.attr(self.queries.get(inode)))
        try:
            e: Entry = await self.client.getattr_entry(inode)
        except FsError as exc:
            raise stale_if_gone(exc) from None
        assert e.attr is not None
        return entry(e.attr, attr_timeout=e.attr_ttl)

    @errno_boundary
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == self.queries.prefetch_file.ino and fields.update_size and attr.st_size == 0:
            # truncate(1) of the prefetch file: the caller's plan goes, as with O_TRUNC.
            self.controls.truncate(ctx_of(ctx))
            return entry(self.queries.attr(self.queries.prefetch_file))
        self._read_only(inode)
        kwargs: dict[str, Any] = {}
        if fields.update_mode:
            kwargs["mode"] = attr.st_mode & 0o7777
        if fields.update_uid:
            kwargs["uid"] = attr.st_uid
        if fields.update_gid:
            kwargs["gid"] = attr.st_gid
        if fields.update_size:
            kwargs["size"] = attr.st_size
        if fields.update_atime:
            kwargs["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kwargs["mtime_ns"] = attr.st_mtime_ns
        # FUSE_HANDLE_KILLPRIV_V2 (mount.py): a truncate by a caller without CAP_FSETID
        # drops set-user/group-ID here, not in the kernel (a chown: on the metaserver).
        return entry(await self.client.setattr(inode, ctx_of(ctx), fh=fh, kill_suidgid=fields.kill_suidgid,
                                               **kwargs))

    @errno_boundary
    async def readlink(self, inode, ctx):
        if self._virtual(inode):
            return self.queries.readlink(inode)
        return await self.client.readlink(inode)

    @errno_boundary
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._read_only(parent_inode)
        return entry(await self.client.mknod(parent_inode, name, mode, ctx_of(ctx), rdev, umask=ctx.umask))

    @errno_boundary
    async def mkdir(self, parent_inode, name, mode, ctx):
        self._read_only(parent_inode)
        return entry(await self.client.mkdir(parent_inode, name, mode & 0o7777, ctx_of(ctx), umask=ctx.umask))

    @errno_boundary
    async def symlink(self, parent_inode, name, target, ctx):
        self._read_only(parent_inode)
        return entry(await self.client.symlink(parent_inode, name, target, ctx_of(ctx)))

    @errno_boundary
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._read_only(inode, new_parent_inode)
        return entry(await self.client.link(inode, new_parent_inode, new_name, ctx_of(ctx)))

    @errno_boundary
    async def unlink(self, parent_inode, name, ctx):
        self._read_only(parent_inode)
        await self.client.unlink(parent_inode, name, ctx_of(ctx))

    @errno_boundary
    async def rmdir(self, parent_inode, name, ctx):
        self._read_only(parent_inode)
        await self.client.rmdir(parent_inode, name, ctx_of(ctx))

    @errno_boundary
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._read_only(parent_inode_old, parent_inode_new)
        await self.client.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx_of(ctx))

    @errno_boundary
    async def opendir(self, inode, ctx):
        if self._virtual(inode):
            node = await self.queries.opendir(inode)
            fh = self._next_listing
            self._next_listing += 1
            self._listings[fh] = [(b".", node), (b"..", node), *self.queries.listing(node)]
            return fh
        attr = await self.client.getattr(inode)
        if attr.mode & 0o170000 != 0o040000:
            raise FsError(errno.ENOTDIR)
        return self.client.opendir(inode, ctx_of(ctx))

    @errno_boundary
    async def readdir(self, fh, start_id, token):
        listing = self._listings.get(fh)
        if listing is not None:  # a virtual directory: the entries its opendir saw
            for i in range(start_id, len(listing)):
                name, node = listing[i]
                if not pyfuse3.readdir_reply(token, name, entry(self.queries.attr(node)), i + 1):
                    return
            return
        # Offsets: 1 after ".", 2 after "..", then the metaserver's entry cookie + 2.
        if start_id < 2:
            attr = entry(await self.client.getattr(self.client.dir_inode(fh)))
            for name, next_id in ((b".", 1), (b"..", 2))[start_id:]:
                if not pyfuse3.readdir_reply(token, name, attr, next_id):
                    return
            start_id = 2
        offset = start_id - DOT_ENTRIES
        while True:
            entries, more = await self.client.readdir(fh, offset)
            for e in entries:
                if not pyfuse3.readdir_reply(token, e.name, entry(e.attr), e.cookie + DOT_ENTRIES):
                    return
                offset = e.cookie
            if not more or not entries:
                return

    async def releasedir(self, fh):
        if self._listings.pop(fh, None) is None:
            self.client.releasedir(fh)

    @errno_boundary
    async def open(self, inode, flags, ctx):
        if inode in (self.queries.prefetch_file.ino, self.queries.cache_file.ino):
            fh = self._next_listing
            self._next_listing += 1
            if inode == self.queries.prefetch_file.ino:
                self.controls.open_prefetch(fh, flags, ctx_of(ctx))
            else:
                self.controls.open_cache(fh, flags, ctx_of(ctx))
            # direct_io: reads are answered here whatever the file's size says (0).
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        self._read_only(inode)  # (the prefetch file aside, nothing under .stripefs is a file)
        # libfuse asks for atomic_o_trunc: O_TRUNC arrives here, not as a separate setattr.
        try:
            fh, keep, attrs_changed = await self.client.open(inode, flags, ctx_of(ctx))
        except FsError as exc:
            raise stale_if_gone(exc) from None
        if attrs_changed:
            # Another client changed the file: the kernel's attributes of it (its size
            # above all, which bounds what it reads) go. Attributes only: nothing waits.
            forget_attributes(inode)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, backing_id=self.passthrough.opened(inode, fh))

    @errno_boundary
    async def create(self, parent_inode, name, mode, flags, ctx):
        self._read_only(parent_inode)
        fh, attr = await self.client.create(parent_inode, name, mode, flags, ctx_of(ctx), umask=ctx.umask)
        self._capability_known(attr.ino)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, backing_id=self.passthrough.created(attr, fh)), entry(attr)

    @errno_boundary
    async def read(self, fh, off, size):
        if self.controls.holds(fh):
            return self.controls.read(fh, off, size)
        self.activity.read(size)
        # pyfuse3 copies the reply into the kernel's buffer before anything else runs.
        return await self.client.read_view(fh, off, size)

    @errno_boundary
    async def write(self, fh, off, buf):
        if self.controls.holds(fh):
            return self.controls.write(fh, buf)
        self.activity.write()
        return await self.client.write(fh, off, buf)

    @errno_boundary
    async def kill_suidgid(self, fh):
        # Before a write by a caller other than root (FUSE_HANDLE_KILLPRIV_V2, mount.py).
        if not self.controls.holds(fh):
            await self.client.kill_suidgid(fh)

    @errno_boundary
    async def flush(self, fh):
        if self.controls.holds(fh):
            return
        await self.client.flush(fh)

    # Locks: pyfuse3 with the stripefs additions (scripts/pyfuse3-stripefs.patch) passes the
    # kernel's lock requests on, with its lock owner: a process for fcntl record locks, an
    # open file description for OFD and flock locks. Lengths are the kernel's (0: to the
    # end of the file); the client speaks inclusive ranges.

    @errno_boundary
    async def getlk(self, inode, fh, lock_owner, type, start, length, pid):
        conflict = await self.client.test_lock(fh, type, start=start, end=lock_end(start, length),
                                               owner=signed64(lock_owner))
        if conflict is None:
            return F_UNLCK, start, length, pid
        length = 0 if conflict.end == OFFSET_MAX else conflict.end - conflict.start + 1
        return conflict.type, conflict.start, length, conflict.pid

    @errno_boundary
    async def setlk(self, inode, fh, lock_owner, type, start, length, pid, wait):
        if await self.client.lock(fh, type, start=start, end=lock_end(start, length), owner=signed64(lock_owner),
                                  pid=pid, wait=wait):
            await drop_page_cache(inode)

    @errno_boundary
    async def flock(self, inode, fh, lock_owner, op):
        type = FLOCK_TYPES.get(op & ~fcntl.LOCK_NB)
        if type is None:
            raise FsError(errno.EINVAL, f"flock operation {op}")
        if await self.client.lock(fh, type, kind=LOCK_FLOCK, owner=signed64(lock_owner),
                                  wait=not op & fcntl.LOCK_NB):
            await drop_page_cache(inode)

    @errno_boundary
    async def release_lock_owner(self, fh, lock_owner):
        await self.client.unlock_owner(fh, signed64(lock_owner))

    @errno_boundary
    async def fallocate(self, fh, mode, offset, length):
        # The kernel drops its cached pages of a punched hole, and sets the new size, itself.
        await self.client.fallocate(fh, mode, offset, length)

    @errno_boundary
    async def fsync(self, fh, datasync):
        if not self.controls.holds(fh):
            await self.client.fsync(fh)

    @errno_boundary
    async def release(self, fh):
        if self.controls.holds(fh):
            self.controls.release(fh)
            return
        ino = self.client.inode_of(fh)
        try:
            await self.client.release(fh)
        finally:
            self.activity.released()
            self.passthrough.released(fh)
            if ino is not None:
                self._capability_known(ino)

    async def fsyncdir(self, fh, datasync):
        pass  # every namespace change is already durable when it returns

    async def forget(self, inode_list):
        pass  # inodes live on the metaserver; nothing to drop here

    @errno_boundary
    async def getxattr(self, inode, name, ctx):
        if self._virtual(inode):
            raise FsError(errno.ENODATA)
        try:
            return await self.client.getxattr(inode, name, ctx_of(ctx))
        finally:
            if name == CAPABILITY_XATTR:
                self._capability_known(inode)

    @errno_boundary
    async def setxattr(self, inode, name, value, ctx):
        self._read_only(inode)
        try:
            await self.client.setxattr(inode, name, value, 0, ctx_of(ctx))
        finally:
            if name == CAPABILITY_XATTR:
                self._capability_known(inode)

    @errno_boundary
    async def listxattr(self, inode, ctx):
        if self._virtual(inode):
            return []
        return await self.client.listxattr(inode)

    @errno_boundary
    async def removexattr(self, inode, name, ctx):
        self._read_only(inode)
        await self.client.removexattr(inode, name, ctx_of(ctx))

    @errno_boundary
    async def statfs(self, ctx):
        s = await self.client.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.block_size
        out.f_frsize = s.block_size
        out.f_blocks = s.total_bytes // s.block_size
        out.f_bfree = s.free_bytes // s.block_size
        out.f_bavail = out.f_bfree
        out.f_files = s.files + s.files_free
        out.f_ffree = s.files_free
        out.f_favail = s.files_free
        out.f_namemax = s.name_max
        return out
