"""Access checks with the caller's uid and groups, as Linux's generic_permission and the
VFS rules around it (may_delete's sticky bit, setattr_prepare's ownership rules).

The metaserver makes them for every client, so a program using the library directly is
held to what a process on a mount is (mounts also keep default_permissions: the kernel
checks first and most refusals never reach us). Who the caller is comes from the request's
Ctx, which a client credential is trusted to state (NFS's AUTH_SYS), after the
credential's own squash rule (proto/credentials.py) has mapped it; see docs/security.md.

POSIX ACLs decide where an inode has an access ACL (its row carries it: base.py; the rules
are acl.py's), else the mode bits; root (uid 0, unless squashed) passes read and write
checks on anything and search/execute checks on directories and on files with any x bit.
"""

from __future__ import annotations

import errno
import stat

import functools
from typing import Optional

from stripefs.proto.errors import FsError
from stripefs.proto.messages import Ctx

from . import acl
from .store import Row

#: What a check asks for, as the kernel's MAY_READ / MAY_WRITE / MAY_EXEC.
READ, WRITE, EXEC = 4, 2, 1


def in_group(ctx: Ctx, gid: int) -> bool:
    return gid == ctx.gid or gid in ctx.groups


@functools.lru_cache(maxsize=4096)
def _parsed(value: bytes) -> acl.Acl:
    return acl.parse(value)


def access_acl(row: Row) -> Optional[acl.Acl]:
    """The inode's access ACL, if its row carries one."""
    try:
        value = row["acl"]
    except IndexError:  # a row selected without it: the mode bits decide
        return None
    return _parsed(bytes(value)) if value else None


def allowed(row: Row, ctx: Ctx, want: int) -> bool:
    """Whether `ctx` may `want` (READ | WRITE | EXEC) the inode `row`."""
    mode = row["mode"]
    if ctx.uid == 0:
        return not want & EXEC or stat.S_ISDIR(mode) or bool(mode & 0o111)
    entries = access_acl(row)
    if entries is not None:
        return acl.allows(entries, row["uid"], row["gid"], ctx.uid, {ctx.gid, *ctx.groups}, want)
    if ctx.uid == row["uid"]:
        bits = mode >> 6
    elif in_group(ctx, row["gid"]):
        bits = mode >> 3
    else:
        bits = mode
    return want & ~bits & 7 == 0


def only_drops_set_id(row: Row, mode: int) -> bool:
    """Whether `mode` is the inode's mode with some of its set-user-ID and set-group-ID
    bits cleared and nothing else changed."""
    set_id = stat.S_ISUID | stat.S_ISGID
    current = stat.S_IMODE(row["mode"])
    return mode != current and mode & ~set_id == current & ~set_id and mode & set_id & ~current == 0


def check(row: Row, ctx: Ctx, want: int, what: str = "") -> None:
    """FsError(EACCES) unless `ctx` may `want` the inode."""
    if not allowed(row, ctx, want):
        raise FsError(errno.EACCES, f"uid {ctx.uid} may not {_verbs(want)} inode {row['ino']}{what}")


def check_search(directory: Row, ctx: Ctx) -> None:
    check(directory, ctx, EXEC, " (search)")


def check_change_dir(directory: Row, ctx: Ctx) -> None:
    """Adding or removing an entry: write and search permission on the directory."""
    check(directory, ctx, WRITE | EXEC, " (change entries)")


def check_sticky(directory: Row, victim: Row, ctx: Ctx) -> None:
    """In a sticky directory only the owner of an entry, of the directory, or root may
    remove or replace it (EPERM, as may_delete)."""
    if directory["mode"] & stat.S_ISVTX and ctx.uid not in (0, directory["uid"], victim["uid"]):
        raise FsError(errno.EPERM, f"inode {victim['ino']} is in a sticky directory and not the caller's")


def is_owner(row: Row, ctx: Ctx) -> bool:
    """The owner or root: who may change modes, explicit times and layouts."""
    return ctx.uid == 0 or ctx.uid == row["uid"]


def check_owner(row: Row, ctx: Ctx, what: str) -> None:
    if not is_owner(row, ctx):
        raise FsError(errno.EPERM, f"only the owner or root may {what}")


#: The kernel's __FMODE_EXEC, in the flags of the open that execve(2) makes.
FMODE_EXEC = 0x20


def open_wants(flags: int) -> int:
    """What open(2) with these flags needs: read and/or write (O_TRUNC writes); execve's
    open needs execute permission instead of read."""
    acc = flags & 3  # O_ACCMODE
    want = READ if acc in (0, 2) else 0  # O_RDONLY, O_RDWR
    if flags & FMODE_EXEC:
        want = EXEC
    if acc in (1, 2) or flags & 0o1000:  # O_WRONLY, O_RDWR, O_TRUNC
        want |= WRITE
    return want


def _verbs(want: int) -> str:
    return "/".join(v for bit, v in ((READ, "read"), (WRITE, "write"), (EXEC, "search")) if want & bit)
