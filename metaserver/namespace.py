"""Namespace operations of the metadata core: lookup, attributes, creation and removal of
entries, rename, hard links, symlinks, readdir and statfs, with the errno ext4 gives.

Every operation checks the caller's permission as the kernel would (perm.py), in the
kernel's order, so that errnos come out as on ext4: search permission on a directory
before its entries are looked at, write permission to add or remove one, the sticky bit,
ownership for modes, owners and times. Mounts keep default_permissions too: the kernel
refuses first, and the checks here hold for every other client (the library used
directly) and for what a mount's kernel cannot know (another mount's changes).
"""

from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING, Optional

from stripefs.proto.errors import FsError
from stripefs.proto.messages import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    AttrReply,
    CreateReply,
    Ctx,
    DirChangeReply,
    DirEntry,
    Empty,
    InodeReq,
    LinkReq,
    Looked,
    LookupReq,
    LookupsReply,
    LookupsReq,
    MkdirReq,
    MknodReq,
    ReaddirReply,
    ReaddirReq,
    ReadlinkReply,
    RemoveReq,
    RenameReply,
    RenameReq,
    SetattrReq,
    StatfsReply,
    SymlinkReq,
    UsageReply,
    UsageReq,
)
from stripefs.proto.types import (
    CHECKPOINT_INHERITED_XATTRS, CHECKPOINT_XATTR, NAME_MAX_BYTES, ROOT_INODE, STAGED_XATTR,
)

from . import acl, perm
from .base import DEAD, DIR_SIZE_BYTES, LOCAL, Caller, CoreBase, attr_of, is_dir, is_reg, usage_of, usage_sum
from .store import Row, Tx

if TYPE_CHECKING:
    from stripefs.proto.messages import Allocation

#: statfs block size: what df multiplies block counts by.
STATFS_BLOCK_SIZE_BYTES = 4096
#: There is no inode table to run out of; report plenty.
STATFS_FILES_FREE = 1 << 40

_MKNOD_TYPES = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)
_DOTS = (b".", b"..")
#: How far from the server's clock a time set by a non-owner may be: such a caller may only
#: "touch" (set now), and the FUSE layer sends touch's now as the mount host's time.
TOUCH_SKEW_NS = 300 * 1_000_000_000


class NamespaceOps(CoreBase):
    if TYPE_CHECKING:  # FileOps's (files.py), which MetaCore composes with this
        def _allocate(self, tx: Tx, row: Row, session: int, indexes: list[int], exclude: list[str], now: int,
                      holder: str) -> list[Allocation]: ...

    # ------------------------------------------------------------------ lookups

    def lookup(self, req: LookupReq, caller: Caller = LOCAL) -> AttrReply:
        with self.store.transaction() as tx:
            d = self._dir(tx, req.parent)
            perm.check_search(d, req.ctx)
            if req.name == b".":
                return AttrReply(attr=attr_of(d))
            if req.name == b"..":
                return AttrReply(attr=self._attr(tx, d["parent"]))
            row = tx.one("SELECT ino, cookie FROM dentries WHERE parent = ? AND name = ?", (req.parent, req.name))
            if row is None:
                raise FsError(errno.ENOENT, f"no entry {req.name!r} in {req.parent}")
            child = self._inode(tx, row["ino"])
            attr = attr_of(child)
            if req.want_map and stat.S_ISREG(attr.mode) and perm.allowed(child, req.ctx, perm.READ):
                # The block map an open for reading would give, read tokens included: the
                # same permission check, no open recorded (a prefetcher reads ahead; the
                # reader opens for itself). Inline files have no blocks to fetch ahead.
                blocks = self._block_map(tx, attr.ino, self.now_ns(), str(caller))
                return AttrReply(attr=attr, cookie=row["cookie"], mapped=True, blocks=blocks)
            return AttrReply(attr=attr, cookie=row["cookie"])

    def lookups(self, req: LookupsReq, caller: Caller = LOCAL) -> LookupsReply:
        """Each lookup as `lookup` answers it (each its own transaction, or savepoint of
        the call's batch): one call for many files' names and maps (a prefetcher's), where
        each cost a call's way in and out."""
        replies = []
        for one in req.lookups:
            try:
                replies.append(Looked(reply=self.lookup(one, caller)))
            except FsError as exc:
                replies.append(Looked(errno=exc.errno))
        return LookupsReply(replies)

    def getattr(self, req: InodeReq) -> AttrReply:
        with self.store.transaction() as tx:
            return AttrReply(attr=self._attr(tx, req.ino))

    def readlink(self, req: InodeReq) -> ReadlinkReply:
        with self.store.transaction() as tx:
            row = self._inode(tx, req.ino)
            if not stat.S_ISLNK(row["mode"]):
                raise FsError(errno.EINVAL, f"inode {req.ino} is not a symlink")
            return ReadlinkReply(target=bytes(row["target"]))

    def usage(self, req: UsageReq) -> UsageReply:
        """`du` from the usage counters: the subtree's directories are found through their
        `parent` links (one indexed step per directory, never a row per file) and their
        counters summed. Reading them needs what listing the top directory needs."""
        with self.store.transaction() as tx:
            row = self._inode(tx, req.ino)
            if not is_dir(row):
                return UsageReply(bytes=row["size"], files=1, dirs=0)
            perm.check(row, req.ctx, perm.READ, " (usage)")
            r = tx.one(
                "WITH RECURSIVE tree(ino) AS ("
                " SELECT CAST(? AS BIGINT)"
                " UNION ALL SELECT i.ino FROM inodes i JOIN tree t ON i.parent = t.ino"
                " WHERE i.ino != t.ino AND i.nlink > 0)"  # the root is its own parent
                " SELECT COUNT(*) AS dirs, COALESCE(SUM(i.used_files), 0) AS files,"
                " COALESCE(SUM(i.used_bytes), 0) AS bytes FROM tree t JOIN inodes i ON i.ino = t.ino",
                (req.ino,),
            )
            assert r is not None  # an aggregate always has its row
            return UsageReply(bytes=int(r["bytes"]), files=int(r["files"]), dirs=int(r["dirs"]))

    def readdir(self, req: ReaddirReq) -> ReaddirReply:
        with self.store.transaction() as tx:
            d = self._dir(tx, req.ino)
            # Every page, not only the first: a cookie is no secret. (A listing begun before
            # a chmod that took read permission away fails where the kernel's would go on.)
            perm.check(d, req.ctx, perm.READ, " (list)")
            # Cookies are dentry rowids, never reused: resuming "after cookie X" is right
            # whatever was added or removed since the previous page.
            rows = tx.all(
                "SELECT d.cookie, d.name, i.* FROM dentries d JOIN inodes i ON i.ino = d.ino"
                " WHERE d.parent = ? AND d.cookie > ? ORDER BY d.cookie LIMIT ?",
                (req.ino, req.offset, req.limit + 1),
            )
            entries = [
                DirEntry(name=bytes(r["name"]), cookie=r["cookie"], attr=attr_of(r))
                for r in rows[: req.limit]
            ]
            return ReaddirReply(entries=entries, more=len(rows) > req.limit, generation=d["generation"])

    def statfs(self, req: Empty) -> StatfsReply:
        with self.store.transaction() as tx:
            live = [row for row, state in self._servers(tx, self.now_ns()) if state != DEAD]
            r = self._default_replicas(len(live))
            total = sum(s["capacity_bytes"] for s in live) // r
            free = sum(s["free_bytes"] for s in live) // r
            files = tx.scalar("SELECT COUNT(*) FROM inodes")
        return StatfsReply(
            block_size=STATFS_BLOCK_SIZE_BYTES,
            total_bytes=total,
            free_bytes=min(free, total),
            files=files,
            files_free=STATFS_FILES_FREE,
            name_max=NAME_MAX_BYTES,
        )

    # ------------------------------------------------------------------ setattr

    def setattr(self, req: SetattrReq, caller: Caller = LOCAL) -> AttrReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            row = self._inode(tx, req.ino)
            ctx, owner = req.ctx, row["uid"]
            root = ctx.uid == 0
            sets: dict[str, int] = {}
            if req.mode is not None and perm.only_drops_set_id(row, req.mode) and perm.allowed(row, ctx, perm.WRITE):
                # The kernel dropping the set-user/group-ID bits of a file written by someone
                # other than its owner (file_remove_privs): whoever may write may do that,
                # as a write does it on a local file system.
                sets["mode"] = stat.S_IFMT(row["mode"]) | req.mode
            elif req.mode is not None:
                perm.check_owner(row, ctx, "change the mode")
                mode = req.mode
                if not root and not perm.in_group(ctx, row["gid"]):
                    mode &= ~stat.S_ISGID  # as setattr_prepare: not a member of the group
                sets["mode"] = stat.S_IFMT(row["mode"]) | mode
            # As setattr_prepare: the owner may "change" the owner to itself and the group to
            # one of its own; anything else is root's.
            if req.uid is not None and not (root or ctx.uid == owner == req.uid):
                raise FsError(errno.EPERM, "only root may change the owner")
            if req.gid is not None and not (
                root or (ctx.uid == owner and (req.gid == row["gid"] or perm.in_group(ctx, req.gid)))
            ):
                raise FsError(errno.EPERM, "only root, or the owner to a group of theirs, may change the group")
            if req.uid is not None and req.uid != owner:
                sets["uid"] = req.uid
            if req.gid is not None and req.gid != row["gid"]:
                sets["gid"] = req.gid
            dropped = ctx.set_id_dropped(row["mode"], row["gid"])  # (by a chown, write or truncate)
            if (req.uid is not None or req.gid is not None) and req.mode is None and not is_dir(row) and dropped:
                # chown(2) of a file drops set-user-ID, and set-group-ID where it means a
                # group to run as (group execute) or the caller is not of the group, as
                # Linux's chown_common and setattr_should_drop_sgid.
                sets["mode"] = row["mode"] & ~dropped
            if req.kill_suidgid and req.mode is None and is_reg(row) and dropped:
                # A write or truncate by a caller without CAP_FSETID, or a chown (the mount
                # says so: FUSE_HANDLE_KILLPRIV_V2, docs/client.md). Alone (before a write),
                # only for someone who may write: through a handle its session opened for
                # writing, or by the file's mode; with a truncate or chown, as they allow.
                if all(v is None for v in (req.size, req.uid, req.gid)):
                    if req.session:
                        self._session_exists(tx, req.session, caller)
                        self._check_open(tx, req.session, req.ino, caller, writable=True)
                    else:
                        perm.check(row, ctx, perm.WRITE, " (drop set-user/group-ID)")
                sets["mode"] = row["mode"] & ~dropped
            times = {"atime_ns": (req.atime_now, req.atime_ns), "mtime_ns": (req.mtime_now, req.mtime_ns)}
            if not perm.is_owner(row, ctx) and any(t_now or t is not None for t_now, t in times.values()):
                # Not the owner: only "now" (utimes(NULL), touch: EPERM for explicit times,
                # give or take the mount host's clock, which the FUSE layer sends as now),
                # and only with write permission.
                if any(t is not None and abs(t - now) > TOUCH_SKEW_NS for _, t in times.values()):
                    raise FsError(errno.EPERM, "only the owner or root may set explicit times")
                perm.check(row, ctx, perm.WRITE, " (set times)")
            for column, (t_now, t) in times.items():
                if t_now:
                    sets[column] = now
                elif t is not None:
                    sets[column] = t
            if req.size is not None:
                if is_dir(row):
                    raise FsError(errno.EISDIR, "cannot truncate a directory")
                if not is_reg(row):
                    raise FsError(errno.EINVAL, "only regular files have a size to set")
                if req.session:
                    self._session_exists(tx, req.session, caller)
                    self._check_open(tx, req.session, req.ino, caller, writable=True)
                else:
                    perm.check(row, ctx, perm.WRITE, " (truncate)")
                self._truncate(tx, row, req.size, now)
                sets.setdefault("mtime_ns", now)
            given = (req.mode, req.uid, req.gid, req.size, req.atime_ns, req.mtime_ns)
            # Any setattr changes ctime, even one that sets a field to its current value.
            if any(v is not None for v in given) or req.atime_now or req.mtime_now or "mode" in sets:
                sets["ctime_ns"] = now
            if sets:
                cols = ", ".join(f"{k} = ?" for k in sets)
                tx.run(f"UPDATE inodes SET {cols} WHERE ino = ?", (*sets.values(), req.ino))
            entries = perm.access_acl(row)
            if "mode" in sets and entries is not None:
                # chmod and the access ACL agree: its owner, mask (or group) and other
                # entries take the new bits (posix_acl_chmod).
                tx.run("UPDATE xattrs SET value = ? WHERE ino = ? AND name = ?",
                       (acl.encode(acl.with_mode(entries, sets["mode"])), req.ino, acl.ACCESS))
            return AttrReply(attr=self._attr(tx, req.ino))

    # ------------------------------------------------------------------ creation

    def _new_inode(
        self, tx: Tx, parent: int, name: bytes, mode: int, ctx: Ctx, now: int,
        *, rdev: int = 0, target: bytes | None = None, umask: int = 0,
    ):
        """Create an inode, owned by the caller, and its entry in `parent`; returns the new row.
        A directory's default ACL decides the new inode's ACL and masks its mode (a new
        directory inherits it as its own default); without one, `umask` masks the mode."""
        d = self._dir(tx, parent, for_create=True)
        perm.check_search(d, ctx)
        if name in _DOTS or self._child(tx, parent, name) is not None:
            raise FsError(errno.EEXIST, f"{name!r} exists in {parent}")
        perm.check_change_dir(d, ctx)
        uid, gid = ctx.uid, ctx.gid
        if d["mode"] & stat.S_ISGID:
            # BSD group semantics on a setgid directory, as ext4: the group comes from the
            # directory, and subdirectories carry the bit on.
            gid = d["gid"]
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        default = self._default_acl(tx, d) if target is None else None
        access = None
        if default is not None:
            access, mode = acl.for_new_inode(default, mode)
        else:
            mode &= ~(umask & 0o777)
        new_dir = stat.S_ISDIR(mode)
        if new_dir:
            size = DIR_SIZE_BYTES
        elif target is not None:
            size = len(target)
        else:
            size = 0
        ino = tx.insert(
            "INSERT INTO inodes (mode, uid, gid, rdev, nlink, size, atime_ns, mtime_ns, ctime_ns,"
            " block_size, replicas, parent, target, inline_max)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (mode, uid, gid, rdev, 2 if new_dir else 1, size, now, now, now,
             d["block_size"], d["replicas"], parent if new_dir else None, target, d["inline_max"]),
            "ino",
        )
        tx.run("INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino))
        if access is not None:
            self._put_xattr(tx, ino, acl.ACCESS, acl.encode(access))
        if new_dir and default is not None:
            self._put_xattr(tx, ino, acl.DEFAULT, acl.encode(default))
        if new_dir and d["xattrs"]:
            # A checkpoint directory's mode and marker name hold for what is made under it.
            for name, value in self._xattrs(tx, parent, CHECKPOINT_INHERITED_XATTRS):
                self._put_xattr(tx, ino, name, value)
        row = self._inode(tx, ino)
        self._touch_dir(tx, parent, now, nlink_delta=1 if new_dir else 0, usage=usage_of(row))
        return row

    @staticmethod
    def _xattrs(tx: Tx, ino: int, names: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
        """The stored attributes of `ino` among `names`."""
        marks = ", ".join("?" * len(names))
        return [(bytes(r[0]), bytes(r[1])) for r in tx.all(
            f"SELECT name, value FROM xattrs WHERE ino = ? AND name IN ({marks})", (ino, *names))]

    @staticmethod
    def _default_acl(tx: Tx, directory: Row) -> Optional[acl.Acl]:
        if not directory["xattrs"]:
            return None
        value = tx.scalar("SELECT value FROM xattrs WHERE ino = ? AND name = ?", (directory["ino"], acl.DEFAULT))
        return acl.parse(bytes(value)) if value else None

    def mknod(self, req: MknodReq, caller: Caller = LOCAL) -> CreateReply:
        kind = stat.S_IFMT(req.mode) or stat.S_IFREG  # mknod(2): type 0 means a regular file
        if kind not in _MKNOD_TYPES:
            raise FsError(errno.EINVAL, f"mknod cannot create type {kind:o}")
        rdev = req.rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        with self.store.transaction() as tx:
            now = self.now_ns()
            if req.session:
                self._session_exists(tx, req.session, caller)
            row = self._new_inode(
                tx, req.parent, req.name, kind | (req.mode & 0o7777), req.ctx, now, rdev=rdev, umask=req.umask,
            )
            allocations = []
            staged = req.stage and is_reg(row) and self._xattrs(tx, req.parent, (CHECKPOINT_XATTR,)) == [
                (CHECKPOINT_XATTR, b"async")]
            if staged:
                # Its content is on the creating client's local disk until that client's
                # upload commits it (files.py clears the mark): until then a checkpoint
                # under this directory is not complete.
                self._put_xattr(tx, row["ino"], STAGED_XATTR, b"0")
                row = self._inode(tx, row["ino"])
            if req.session:
                # Open for writing whatever the new mode says, as open(O_CREAT) is.
                self._record_open(tx, req.session, row["ino"], writable=True)
                if req.prealloc_blocks and stat.S_ISREG(row["mode"]):
                    try:
                        allocations = self._allocate(
                            tx, row, req.session, list(range(req.prealloc_blocks)), [], now, str(caller)
                        )
                    except FsError:
                        pass  # no server can take blocks now: the writer will ask (and be told) later
            return CreateReply(attr=attr_of(row), allocations=allocations, parent=self._attr(tx, req.parent),
                               staged=staged, opened_in=req.session,
                               grant=self._open_grant(row["ino"], True, caller) if req.session else b"")

    def mkdir(self, req: MkdirReq) -> AttrReply:
        with self.store.transaction() as tx:
            row = self._new_inode(
                tx, req.parent, req.name, stat.S_IFDIR | (req.mode & 0o7777), req.ctx, self.now_ns(),
                umask=req.umask,
            )
            return AttrReply(attr=attr_of(row), parent=self._attr(tx, req.parent))

    def symlink(self, req: SymlinkReq) -> AttrReply:
        with self.store.transaction() as tx:
            row = self._new_inode(
                tx, req.parent, req.name, stat.S_IFLNK | 0o777, req.ctx, self.now_ns(), target=req.target,
            )
            return AttrReply(attr=attr_of(row), parent=self._attr(tx, req.parent))

    def link(self, req: LinkReq) -> AttrReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            d = self._dir(tx, req.new_parent, for_create=True)
            row = self._inode(tx, req.ino)
            perm.check_search(d, req.ctx)
            # The order of checks is the kernel's: the name first, then the inode.
            if req.new_name in _DOTS or self._child(tx, req.new_parent, req.new_name) is not None:
                raise FsError(errno.EEXIST, f"{req.new_name!r} exists in {req.new_parent}")
            perm.check_change_dir(d, req.ctx)
            if is_dir(row):
                raise FsError(errno.EPERM, "cannot hard-link a directory")
            if row["nlink"] == 0:
                raise FsError(errno.ENOENT, f"inode {req.ino} was unlinked")
            tx.run(
                "INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)",
                (req.new_parent, req.new_name, req.ino),
            )
            tx.run("UPDATE inodes SET nlink = nlink + 1, ctime_ns = ? WHERE ino = ?", (now, req.ino))
            self._touch_dir(tx, req.new_parent, now, usage=usage_of(row))
            return AttrReply(attr=self._attr(tx, req.ino), parent=self._attr(tx, req.new_parent))

    # ------------------------------------------------------------------ removal

    def unlink(self, req: RemoveReq) -> DirChangeReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            d = self._dir(tx, req.parent)
            perm.check_search(d, req.ctx)
            if req.name in _DOTS:
                raise FsError(errno.EISDIR, "cannot unlink . or ..")
            ino = self._child(tx, req.parent, req.name)
            if ino is None:
                raise FsError(errno.ENOENT, f"no entry {req.name!r} in {req.parent}")
            row = self._inode(tx, ino)
            self._may_delete(d, row, req.ctx, isdir=False)
            tx.run("DELETE FROM dentries WHERE parent = ? AND name = ?", (req.parent, req.name))
            self._touch_dir(tx, req.parent, now, usage=usage_of(row, -1))
            self._drop_link(tx, row, now)
            return DirChangeReply(parent=self._attr(tx, req.parent), ino=ino)

    def rmdir(self, req: RemoveReq) -> DirChangeReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            d = self._dir(tx, req.parent)
            perm.check_search(d, req.ctx)
            if req.name == b".":
                raise FsError(errno.EINVAL, "cannot remove .")
            if req.name == b"..":
                raise FsError(errno.ENOTEMPTY, "cannot remove ..")
            ino = self._child(tx, req.parent, req.name)
            if ino is None:
                raise FsError(errno.ENOENT, f"no entry {req.name!r} in {req.parent}")
            row = self._inode(tx, ino)
            self._may_delete(d, row, req.ctx, isdir=True)
            if self._has_entries(tx, ino):
                raise FsError(errno.ENOTEMPTY, f"{req.name!r} is not empty")
            tx.run("DELETE FROM dentries WHERE parent = ? AND name = ?", (req.parent, req.name))
            self._touch_dir(tx, req.parent, now, nlink_delta=-1)
            self._drop_link(tx, row, now)
            return DirChangeReply(parent=self._attr(tx, req.parent), ino=ino)

    @staticmethod
    def _may_delete(directory, victim, ctx: Ctx, *, isdir: bool) -> None:
        """Removing (or replacing) an entry that must be a directory or must not be one:
        write and search permission on its directory, the sticky bit, then the type, as
        may_delete."""
        perm.check_change_dir(directory, ctx)
        perm.check_sticky(directory, victim, ctx)
        if isdir and not is_dir(victim):
            raise FsError(errno.ENOTDIR, f"inode {victim['ino']} is not a directory")
        if isdir and victim["ino"] == ROOT_INODE:
            raise FsError(errno.EBUSY, "cannot remove the root")
        if not isdir and is_dir(victim):
            raise FsError(errno.EISDIR, f"inode {victim['ino']} is a directory")

    @staticmethod
    def _has_entries(tx: Tx, ino: int) -> bool:
        return bool(tx.scalar("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (ino,)))

    # ------------------------------------------------------------------ rename

    def _is_ancestor(self, tx: Tx, ancestor: int, ino: int) -> bool:
        """Whether `ancestor` is `ino` or lies on the path from `ino` up to the root."""
        seen = set()
        while ino not in seen:
            if ino == ancestor:
                return True
            seen.add(ino)
            ino = tx.scalar("SELECT parent FROM inodes WHERE ino = ?", (ino,))
            if ino is None:
                return False
        return False

    def rename(self, req: RenameReq) -> RenameReply:
        # Durable: "write tmp, fsync, rename" is how checkpoints are published.
        with self.store.transaction(durable=True) as tx:
            now = self.now_ns()
            # The kernel walks to the source's directory, then to the destination's.
            d = self._dir(tx, req.parent)
            perm.check_search(d, req.ctx)
            new_d = self._dir(tx, req.new_parent, for_create=True)
            perm.check_search(new_d, req.ctx)
            if req.name in _DOTS or req.new_name in _DOTS:
                raise FsError(errno.EBUSY, "cannot rename . or ..")
            src_ino = self._child(tx, req.parent, req.name)
            if src_ino is None:
                raise FsError(errno.ENOENT, f"no entry {req.name!r} in {req.parent}")
            dst_ino = self._child(tx, req.new_parent, req.new_name)
            if req.flags & RENAME_NOREPLACE and dst_ino is not None:
                raise FsError(errno.EEXIST, f"{req.new_name!r} exists in {req.new_parent}")
            if req.flags & RENAME_EXCHANGE and dst_ino is None:
                raise FsError(errno.ENOENT, f"no entry {req.new_name!r} in {req.new_parent}")
            if src_ino == dst_ino:
                return RenameReply()  # two names of one inode: rename(2) does nothing
            src = self._inode(tx, src_ino)
            dst = self._inode(tx, dst_ino) if dst_ino is not None else None
            src_dir = is_dir(src)
            dst_dir = dst is not None and is_dir(dst)
            cross = req.parent != req.new_parent
            # A directory must not end up inside itself.
            if src_dir and cross and self._is_ancestor(tx, src_ino, req.new_parent):
                raise FsError(errno.EINVAL, "cannot move a directory into its own subtree")
            # Nor may the destination be a directory the source lies in (do_renameat2's trap).
            if dst_dir and cross and dst_ino is not None and self._is_ancestor(tx, dst_ino, req.parent):
                if req.flags & RENAME_EXCHANGE:
                    raise FsError(errno.EINVAL, "cannot move a directory into its own subtree")
                raise FsError(errno.ENOTEMPTY, f"{req.new_name!r} contains the source")
            # Permissions, as vfs_rename: the source may leave, the destination may be
            # taken (or replaced), and a directory changing parent may have its ".." changed.
            self._may_delete(d, src, req.ctx, isdir=src_dir)
            if dst is None:
                perm.check_change_dir(new_d, req.ctx)
            else:
                # The destination must be of the source's type, unless they swap places.
                self._may_delete(new_d, dst, req.ctx, isdir=dst_dir if req.flags & RENAME_EXCHANGE else src_dir)
            if cross:
                if src_dir:
                    perm.check(src, req.ctx, perm.WRITE, " (move a directory)")
                if req.flags & RENAME_EXCHANGE and dst_dir:
                    perm.check(dst, req.ctx, perm.WRITE, " (move a directory)")
            if req.flags & RENAME_EXCHANGE:
                self._exchange(tx, req, src, dst, now)
            else:
                self._move(tx, req, src, dst, now)
            return RenameReply(
                parent=self._attr(tx, req.parent),
                new_parent=self._attr(tx, req.new_parent) if cross else None,
                moved=src_ino, replaced=dst_ino or 0,
            )

    def _move(self, tx: Tx, req: RenameReq, src, dst, now: int) -> None:
        src_ino, src_dir = src["ino"], is_dir(src)
        dst_dir = dst is not None and is_dir(dst)
        cross = req.parent != req.new_parent
        if dst is not None:  # of the source's type: rename checked that (_may_delete)
            if dst_dir and self._has_entries(tx, dst["ino"]):
                raise FsError(errno.ENOTEMPTY, f"{req.new_name!r} is not empty")
            tx.run("DELETE FROM dentries WHERE parent = ? AND name = ?", (req.new_parent, req.new_name))
        tx.run("DELETE FROM dentries WHERE parent = ? AND name = ?", (req.parent, req.name))
        # A new row, so a new cookie: a listing in progress sees the moved entry at
        # most once more, never skips others.
        tx.run(
            "INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)",
            (req.new_parent, req.new_name, src_ino),
        )
        if src_dir:
            tx.run("UPDATE inodes SET parent = ? WHERE ino = ?", (req.new_parent, src_ino))
        tx.run("UPDATE inodes SET ctime_ns = ? WHERE ino = ?", (now, src_ino))
        # Each directory is touched once (one generation step): the source loses a
        # subdirectory if one moves out, the destination gains it and loses a replaced one.
        # The usage counters: the source's entry moves, a replaced one goes.
        moved_out = 1 if src_dir and cross else 0
        replaced = usage_of(dst, -1) if dst is not None else (0, 0)
        if cross:
            self._touch_dir(tx, req.parent, now, nlink_delta=-moved_out, usage=usage_of(src, -1))
            self._touch_dir(tx, req.new_parent, now, nlink_delta=moved_out - (1 if dst_dir else 0),
                            usage=usage_sum(usage_of(src), replaced))
        else:
            self._touch_dir(tx, req.parent, now, nlink_delta=-(1 if dst_dir else 0), usage=replaced)
        if dst is not None:
            self._drop_link(tx, dst, now)

    def _exchange(self, tx: Tx, req: RenameReq, src, dst, now: int) -> None:
        src_dir, dst_dir = is_dir(src), is_dir(dst)
        tx.run(
            "DELETE FROM dentries WHERE (parent = ? AND name = ?) OR (parent = ? AND name = ?)",
            (req.parent, req.name, req.new_parent, req.new_name),
        )
        tx.run_many(
            "INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)",
            [(req.parent, req.name, dst["ino"]), (req.new_parent, req.new_name, src["ino"])],
        )
        if req.parent != req.new_parent:
            if src_dir:
                tx.run("UPDATE inodes SET parent = ? WHERE ino = ?", (req.new_parent, src["ino"]))
            if dst_dir:
                tx.run("UPDATE inodes SET parent = ? WHERE ino = ?", (req.parent, dst["ino"]))
            moved = int(src_dir) - int(dst_dir)  # subdirectories leaving parent for new_parent
            swap = usage_sum(usage_of(src), usage_of(dst, -1))  # what new_parent gains, parent loses
            self._touch_dir(tx, req.parent, now, nlink_delta=-moved, usage=(-swap[0], -swap[1]))
            self._touch_dir(tx, req.new_parent, now, nlink_delta=moved, usage=swap)
        else:
            self._touch_dir(tx, req.parent, now)
        tx.run("UPDATE inodes SET ctime_ns = ? WHERE ino IN (?, ?)", (now, src["ino"], dst["ino"]))
