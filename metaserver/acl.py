"""POSIX ACLs (POSIX.1e draft 17, as Linux keeps them): the xattr format, the checks the
kernel makes of an ACL that is set, the access check, and how an ACL and the mode bits
follow each other (chmod, setfacl, inheritance at create).

The format of `system.posix_acl_access` / `system.posix_acl_default`: a little-endian u32
version (2), then 8-byte entries: u16 tag, u16 permissions (rwx), u32 id (named users and
groups only), sorted by tag then id. The access ACL of an inode is kept in its `acl`
column, so an access check has it at hand with the inode's row; a directory's default ACL
is a stored xattr, read only when an entry is created in it.
"""

from __future__ import annotations

import errno
import stat
import struct
from dataclasses import dataclass
from typing import Optional

from stripefs.proto.errors import FsError

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
#: The kernel's limit on entries (what fits an xattr of 64 KiB is more; ext4 stores ~500).
MAX_ENTRIES = 1024
#: The id an entry without one carries in the xattr (ACL_UNDEFINED_ID).
UNDEFINED_ID = 0xFFFFFFFF


@dataclass(frozen=True)
class Entry:
    tag: int
    perm: int
    id: int = UNDEFINED_ID


Acl = tuple[Entry, ...]


def parse(value: bytes) -> Acl:
    """The ACL in an xattr value, checked as the kernel checks one that is set
    (posix_acl_valid): EINVAL for anything else."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise FsError(errno.EINVAL, "not a POSIX ACL: bad length")
    if _HEADER.unpack_from(value)[0] != VERSION:
        raise FsError(errno.EINVAL, "not a POSIX ACL of version 2")
    count = (len(value) - _HEADER.size) // _ENTRY.size
    if count > MAX_ENTRIES:
        raise FsError(errno.EINVAL, f"more than {MAX_ENTRIES} ACL entries")
    entries = []
    for i in range(count):
        tag, perm, id_ = _ENTRY.unpack_from(value, _HEADER.size + i * _ENTRY.size)
        if perm & ~7:
            raise FsError(errno.EINVAL, "ACL permissions other than rwx")
        entries.append(Entry(tag, perm, id_ if tag in (USER, GROUP) else UNDEFINED_ID))
    acl = tuple(entries)
    _check(acl)
    return acl


def _check(acl: Acl) -> None:
    seen = {USER_OBJ: 0, GROUP_OBJ: 0, MASK: 0, OTHER: 0}
    named = 0
    last: tuple[int, int] = (0, -1)
    for e in acl:
        if e.tag not in (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER):
            raise FsError(errno.EINVAL, f"unknown ACL tag {e.tag:#x}")
        key = (e.tag, e.id if e.tag in (USER, GROUP) else -1)
        if key <= last:
            raise FsError(errno.EINVAL, "ACL entries out of order or repeated")
        last = key
        if e.tag in seen:
            seen[e.tag] += 1
        else:
            named += 1
    if seen[USER_OBJ] != 1 or seen[GROUP_OBJ] != 1 or seen[OTHER] != 1 or (named and not seen[MASK]):
        raise FsError(errno.EINVAL, "an ACL needs one owner, group and other entry, and a mask with named ones")


def encode(acl: Acl) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(e.tag, e.perm, e.id) for e in acl)


def _find(acl: Acl, tag: int) -> Optional[Entry]:
    return next((e for e in acl if e.tag == tag), None)


def is_minimal(acl: Acl) -> bool:
    """Only the owner, group and other entries: the mode bits say all of it (such an ACL
    is not stored; setting one only sets the mode, as on ext4)."""
    return len(acl) == 3


def mode_bits(acl: Acl) -> int:
    """The rwx bits of the mode that go with an access ACL: owner, mask (or group), other."""
    group = _find(acl, MASK) or _find(acl, GROUP_OBJ)
    assert group is not None
    return (_find(acl, USER_OBJ).perm << 6) | (group.perm << 3) | _find(acl, OTHER).perm  # type: ignore[union-attr]


def with_mode(acl: Acl, mode: int) -> Acl:
    """The access ACL after chmod(mode): the owner, mask (or group, without a mask) and
    other entries take the mode's bits (posix_acl_chmod)."""
    group_tag = MASK if _find(acl, MASK) else GROUP_OBJ
    bits = {USER_OBJ: (mode >> 6) & 7, group_tag: (mode >> 3) & 7, OTHER: mode & 7}
    return tuple(Entry(e.tag, bits[e.tag], e.id) if e.tag in bits else e for e in acl)


def for_new_inode(default: Acl, mode: int) -> tuple[Optional[Acl], int]:
    """What an inode created with `mode` in a directory with this default ACL gets: its
    access ACL (None when minimal) and its mode (posix_acl_create_masq: the default ACL
    masked by the mode's bits; no umask applies)."""
    masked: list[Entry] = []
    group_masked = _find(default, MASK) is not None
    for e in default:
        if e.tag == USER_OBJ:
            e = Entry(e.tag, e.perm & (mode >> 6) & 7, e.id)
        elif e.tag == OTHER:
            e = Entry(e.tag, e.perm & mode & 7, e.id)
        elif e.tag == MASK or (e.tag == GROUP_OBJ and not group_masked):
            e = Entry(e.tag, e.perm & (mode >> 3) & 7, e.id)
        masked.append(e)
    acl = tuple(masked)
    new_mode = (mode & ~0o777) | mode_bits(acl)
    return (None if is_minimal(acl) else acl), new_mode


def allows(acl: Acl, owner: int, group: int, uid: int, gids: set[int], want: int) -> bool:
    """The access check of POSIX.1e (the kernel's posix_acl_permission), for a caller
    that is not root: the owner entry, else a named user, else every group entry that
    matches (one that grants is enough), else other; named and group entries are limited
    by the mask."""
    mask = _find(acl, MASK)
    limit = mask.perm if mask is not None else 7
    if uid == owner:
        return want & ~_find(acl, USER_OBJ).perm & 7 == 0  # type: ignore[union-attr]
    for e in acl:
        if e.tag == USER and e.id == uid:
            return want & ~(e.perm & limit) & 7 == 0
    matched = False
    for e in acl:
        if (e.tag == GROUP_OBJ and group in gids) or (e.tag == GROUP and e.id in gids):
            matched = True
            perm = e.perm & limit
            if want & ~perm & 7 == 0:
                return True
    if matched:
        return False
    return want & ~_find(acl, OTHER).perm & 7 == 0  # type: ignore[union-attr]


def check_settable(name: bytes, mode: int) -> None:
    """Where an ACL may be set: not on symlinks; a default ACL only on directories."""
    if stat.S_ISLNK(mode):
        raise FsError(errno.EOPNOTSUPP, "symlinks have no ACLs")
    if name == DEFAULT and not stat.S_ISDIR(mode):
        raise FsError(errno.EACCES, "a default ACL is only for directories")
