"""Extended attributes of the metadata core, and the virtual layout attributes.

Namespaces follow Linux: user.* only on regular files and directories, read and written
as the file's mode allows (perm.py), trusted.* and security.* written by root only, system.posix_acl_* not supported yet (no ACLs). The
layout attributes (stripefs.block_size, stripefs.replicas, stripefs.inline_max) are views
of inode columns: set on a directory they decide the layout of files created under it
later.
"""

from __future__ import annotations

import errno
import stat
from sqlite3 import Row

from proto.errors import FsError
from proto.messages import Ctx, Empty, InodeReq, XattrListReply, XattrReply, XattrReq
from proto.types import (
    LAYOUT_XATTR_BLOCK_SIZE,
    LAYOUT_XATTR_INLINE_MAX,
    LAYOUT_XATTR_REPLICAS,
    MAX_BLOCK_SIZE_BYTES,
    MAX_INLINE_BYTES,
    MAX_REPLICAS,
    MIN_BLOCK_SIZE_BYTES,
)
from . import perm
from .base import CoreBase, is_dir, is_reg
from .store import Tx

#: Total bytes of names and values one inode may carry.
XATTR_TOTAL_MAX_BYTES = 1024 * 1024

XATTR_CREATE = 1
XATTR_REPLACE = 2

_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_LAYOUT = {
    LAYOUT_XATTR_BLOCK_SIZE: "block_size",
    LAYOUT_XATTR_REPLICAS: "replicas",
    LAYOUT_XATTR_INLINE_MAX: "inline_max",
}
#: Layout fields that describe stored blocks, so cannot change on a file that has some.
_BLOCK_LAYOUT = ("block_size", "replicas")


def _check_access(row: Row, name: bytes, ctx: Ctx, write: bool) -> None:
    """Namespace and permission rules for a stored attribute, as Linux's xattr_permission."""
    if not name.startswith(_NAMESPACES):
        raise FsError(errno.EOPNOTSUPP, f"unsupported xattr namespace in {name!r}")
    if name.startswith(b"system."):
        # No ACLs and no other system.* attributes yet: nothing is there to read.
        if write:
            raise FsError(errno.EOPNOTSUPP, f"{name!r} is not supported")
        raise FsError(errno.ENODATA, f"no attribute {name!r}")
    if name.startswith((b"trusted.", b"security.")) and ctx.uid != 0:
        if write:
            raise FsError(errno.EPERM, f"only root may change {name!r}")
        if name.startswith(b"trusted."):
            raise FsError(errno.ENODATA, f"no attribute {name!r}")  # hidden from non-root
    if name.startswith(b"user.") and not (is_reg(row) or is_dir(row)):
        # user.* on symlinks and devices would let anyone label files they cannot write.
        raise FsError(errno.EPERM if write else errno.ENODATA, "user.* only on files and directories")
    if name.startswith(b"user."):
        if write and is_dir(row) and row["mode"] & stat.S_ISVTX and not perm.is_owner(row, ctx):
            raise FsError(errno.EPERM, "user.* of a sticky directory: only its owner or root")
        perm.check(row, ctx, perm.WRITE if write else perm.READ, f" (attribute {name[:64]!r})")


def _parse_layout(field: str, value: bytes) -> int:
    try:
        text = value.decode("ascii").strip()
        if not text.isdigit():
            raise ValueError(text)
        n = int(text)
    except (UnicodeDecodeError, ValueError):
        raise FsError(errno.EINVAL, f"{field}: expected a decimal number") from None
    if field == "block_size":
        if not (MIN_BLOCK_SIZE_BYTES <= n <= MAX_BLOCK_SIZE_BYTES and n & (n - 1) == 0):
            raise FsError(
                errno.EINVAL,
                f"block_size: a power of two in [{MIN_BLOCK_SIZE_BYTES}, {MAX_BLOCK_SIZE_BYTES}]",
            )
    elif field == "inline_max":
        if not 0 <= n <= MAX_INLINE_BYTES:
            raise FsError(errno.EINVAL, f"inline_max: 0..{MAX_INLINE_BYTES}")
    elif not 0 <= n <= MAX_REPLICAS:
        raise FsError(errno.EINVAL, f"replicas: 0..{MAX_REPLICAS}")
    return n


class XattrOps(CoreBase):
    def getxattr(self, req: XattrReq) -> XattrReply:
        with self.store.transaction() as tx:
            row = self._inode(tx, req.ino)
            field = _LAYOUT.get(req.name)
            if field is not None:
                return XattrReply(value=str(row[field]).encode())
            _check_access(row, req.name, req.ctx, write=False)
            value = tx.scalar("SELECT value FROM xattrs WHERE ino = ? AND name = ?", (req.ino, req.name))
            if value is None:
                raise FsError(errno.ENODATA, f"no attribute {req.name!r}")
            return XattrReply(value=bytes(value))

    def listxattr(self, req: InodeReq) -> XattrListReply:
        with self.store.transaction() as tx:
            self._inode(tx, req.ino)
            rows = tx.all("SELECT name FROM xattrs WHERE ino = ? ORDER BY name", (req.ino,))
            return XattrListReply(names=[bytes(r[0]) for r in rows])

    def setxattr(self, req: XattrReq) -> Empty:
        with self.store.transaction() as tx:
            now = self.now_ns()
            row = self._inode(tx, req.ino)
            field = _LAYOUT.get(req.name)
            if field is not None:
                self._set_layout(tx, row, field, req)
            else:
                _check_access(row, req.name, req.ctx, write=True)
                old = tx.one(
                    "SELECT length(name) + length(value) FROM xattrs WHERE ino = ? AND name = ?",
                    (req.ino, req.name),
                )
                if old is not None and req.flags & XATTR_CREATE:
                    raise FsError(errno.EEXIST, f"attribute {req.name!r} exists")
                if old is None and req.flags & XATTR_REPLACE:
                    raise FsError(errno.ENODATA, f"no attribute {req.name!r}")
                total = tx.scalar(
                    "SELECT COALESCE(SUM(length(name) + length(value)), 0) FROM xattrs WHERE ino = ?",
                    (req.ino,),
                )
                total += len(req.name) + len(req.value) - (old[0] if old is not None else 0)
                if total > XATTR_TOTAL_MAX_BYTES:
                    raise FsError(errno.ENOSPC, f"attributes of inode {req.ino} exceed 1 MiB")
                tx.run(
                    "INSERT INTO xattrs (ino, name, value) VALUES (?, ?, ?)"
                    " ON CONFLICT (ino, name) DO UPDATE SET value = excluded.value",
                    (req.ino, req.name, req.value),
                )
                if old is None:
                    tx.run("UPDATE inodes SET xattrs = xattrs + 1 WHERE ino = ?", (req.ino,))
            tx.run("UPDATE inodes SET ctime_ns = ? WHERE ino = ?", (now, req.ino))
            return Empty()

    def removexattr(self, req: XattrReq) -> Empty:
        with self.store.transaction() as tx:
            row = self._inode(tx, req.ino)
            if req.name in _LAYOUT:
                raise FsError(errno.EINVAL, f"{req.name!r} cannot be removed; set it instead")
            # system.* has nothing stored to remove: answer as a read would (ENODATA).
            _check_access(row, req.name, req.ctx, write=not req.name.startswith(b"system."))
            cur = tx.run("DELETE FROM xattrs WHERE ino = ? AND name = ?", (req.ino, req.name))
            if cur.rowcount == 0:
                raise FsError(errno.ENODATA, f"no attribute {req.name!r}")
            tx.run("UPDATE inodes SET ctime_ns = ?, xattrs = xattrs - 1 WHERE ino = ?", (self.now_ns(), req.ino))
            return Empty()

    def _set_layout(self, tx: Tx, row: Row, field: str, req: XattrReq) -> None:
        ino = row["ino"]
        perm.check_owner(row, req.ctx, "change the layout")
        if is_reg(row):
            # The layout of stored blocks cannot change under them (inline_max only decides
            # where later commits put block 0).
            if field in _BLOCK_LAYOUT and tx.scalar("SELECT 1 FROM blocks WHERE ino = ? LIMIT 1", (ino,)):
                raise FsError(errno.EBUSY, f"inode {ino} already has blocks")
        elif not stat.S_ISDIR(row["mode"]):
            raise FsError(errno.EINVAL, "layout applies to directories and regular files")
        value = _parse_layout(field, req.value)
        tx.run(f"UPDATE inodes SET {field} = ? WHERE ino = ?", (value, ino))
