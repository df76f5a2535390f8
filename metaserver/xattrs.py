"""Extended attributes of the metadata core, and the virtual layout attributes.

Namespaces follow Linux: user.* only on regular files and directories, read and written
as the file's mode allows (perm.py), trusted.* and security.* written by root only. POSIX
ACLs are system.posix_acl_access and system.posix_acl_default (acl.py): anyone may read
them, the owner or root set them; setting an access ACL sets the mode's bits from it, and
one the mode bits say all of is not stored (as ext4). The
layout attributes (stripefs.block_size, stripefs.replicas, stripefs.inline_max) are views
of inode columns: set on a directory they decide the layout of files created under it
later. The checkpoint attributes (stripefs.checkpoint, .marker, .keep on directories,
stripefs.staged on files: proto/types.py) are stored ones with their own value rules; a
file's staged mark is set by a staging create and cleared by its upload's commit
(namespace.py, files.py), and is never listed (a copy must not look unfinished).
"""

from __future__ import annotations

import errno
import stat

from stripefs.proto.errors import FsError
from stripefs.proto.messages import Ctx, Empty, InodeReq, XattrListReply, XattrReply, XattrReq
from stripefs.proto.types import (
    CHECKPOINT_KEEP_XATTR,
    CHECKPOINT_MARKER_XATTR,
    CHECKPOINT_MODES,
    CHECKPOINT_STORED_XATTRS,
    CHECKPOINT_XATTR,
    LAYOUT_XATTR_BLOCK_SIZE,
    LAYOUT_XATTR_INLINE_MAX,
    LAYOUT_XATTR_REPLICAS,
    MAX_BLOCK_SIZE_BYTES,
    MAX_INLINE_BYTES,
    MAX_REPLICAS,
    MIN_BLOCK_SIZE_BYTES,
    NAME_MAX_BYTES,
    STAGED_XATTR,
)
from . import acl, perm
from .base import XATTR_REPLACE, CoreBase, is_dir, is_reg
from .store import Row, Tx

_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
_ACL_NAMES = (acl.ACCESS, acl.DEFAULT)
_LAYOUT = {
    LAYOUT_XATTR_BLOCK_SIZE: "block_size",
    LAYOUT_XATTR_REPLICAS: "replicas",
    LAYOUT_XATTR_INLINE_MAX: "inline_max",
}
#: Layout fields that describe stored blocks, so cannot change on a file that has some.
_BLOCK_LAYOUT = ("block_size", "replicas")


def _check_access(row: Row, name: bytes, ctx: Ctx, write: bool) -> None:
    """Namespace and permission rules for a stored attribute, as Linux's xattr_permission."""
    if name in CHECKPOINT_STORED_XATTRS:
        _check_checkpoint_access(row, name, ctx, write)
        return
    if not name.startswith(_NAMESPACES):
        raise FsError(errno.EOPNOTSUPP, f"unsupported xattr namespace in {name!r}")
    if name in _ACL_NAMES:
        if write:
            acl.check_settable(name, row["mode"])
            perm.check_owner(row, ctx, "change an ACL")
        return
    if name.startswith(b"system."):
        # No other system.* attributes: nothing is there to read.
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


def _check_checkpoint_access(row: Row, name: bytes, ctx: Ctx, write: bool) -> None:
    """The checkpoint attributes: anyone may read them; writing one takes what writing a
    user.* attribute of the inode takes. The directory ones are for directories, the staged
    mark for regular files."""
    wants_dir = name != STAGED_XATTR
    if (is_dir(row) if wants_dir else is_reg(row)):
        if write:
            _check_access(row, b"user." + name, ctx, write)
        return
    if write:
        raise FsError(errno.EINVAL, f"{name!r} applies to {'directories' if wants_dir else 'regular files'}")
    raise FsError(errno.ENODATA, f"no attribute {name!r}")


def _check_checkpoint_value(name: bytes, value: bytes) -> None:
    if name == CHECKPOINT_XATTR:
        if value not in CHECKPOINT_MODES:
            raise FsError(errno.EINVAL, f"{name.decode()}: one of {b', '.join(CHECKPOINT_MODES).decode()}")
    elif name == CHECKPOINT_MARKER_XATTR:
        if not 0 < len(value) <= NAME_MAX_BYTES or b"/" in value or b"\0" in value or value in (b".", b".."):
            raise FsError(errno.EINVAL, f"{name.decode()}: a file name")
    else:  # keep, staged: decimal counts
        text = value.strip()
        if not text.isdigit() or (name == CHECKPOINT_KEEP_XATTR and int(text) < 1):
            raise FsError(errno.EINVAL, f"{name.decode()}: expected a decimal number"
                          + (" of at least 1" if name == CHECKPOINT_KEEP_XATTR else ""))


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
            rows = tx.all("SELECT name FROM xattrs WHERE ino = ? AND name <> ? ORDER BY name", (req.ino, STAGED_XATTR))
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
                if req.name == acl.ACCESS:
                    self._set_access_acl(tx, row, req)
                elif req.name == acl.DEFAULT and not req.value:
                    self._drop_xattr(tx, req.ino, req.name)
                elif req.name in CHECKPOINT_STORED_XATTRS:
                    _check_checkpoint_value(req.name, req.value)
                    # A staged mark is reported on (its bytes), never made: a copy of a
                    # file must not look unfinished.
                    flags = req.flags | (XATTR_REPLACE if req.name == STAGED_XATTR else 0)
                    self._put_xattr(tx, req.ino, req.name, req.value, flags)
                else:
                    if req.name == acl.DEFAULT:
                        acl.parse(req.value)  # EINVAL unless a valid ACL
                    self._put_xattr(tx, req.ino, req.name, req.value, req.flags)
            tx.run("UPDATE inodes SET ctime_ns = ? WHERE ino = ?", (now, req.ino))
            return Empty()

    def _set_access_acl(self, tx: Tx, row: Row, req: XattrReq) -> None:
        """The mode's bits follow the ACL (posix_acl_update_mode: set-group-ID goes unless
        the caller is root or of the file's group); an ACL the mode says all of is not
        kept, an empty value removes it."""
        if not req.value:
            self._drop_xattr(tx, row["ino"], req.name)
            return
        entries = acl.parse(req.value)
        mode = (row["mode"] & ~0o777) | acl.mode_bits(entries)
        if req.ctx.uid != 0 and not perm.in_group(req.ctx, row["gid"]):
            mode &= ~stat.S_ISGID
        tx.run("UPDATE inodes SET mode = ? WHERE ino = ?", (mode, row["ino"]))
        if acl.is_minimal(entries):
            self._drop_xattr(tx, row["ino"], req.name, missing_ok=True)
        else:
            self._put_xattr(tx, row["ino"], req.name, acl.encode(entries), req.flags)

    def removexattr(self, req: XattrReq) -> Empty:
        with self.store.transaction() as tx:
            row = self._inode(tx, req.ino)
            if req.name in _LAYOUT:
                raise FsError(errno.EINVAL, f"{req.name!r} cannot be removed; set it instead")
            # Other system.* names have nothing stored to remove: answer as a read would.
            write = req.name in _ACL_NAMES or not req.name.startswith(b"system.")
            _check_access(row, req.name, req.ctx, write=write)
            self._drop_xattr(tx, req.ino, req.name)
            tx.run("UPDATE inodes SET ctime_ns = ? WHERE ino = ?", (self.now_ns(), req.ino))
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
