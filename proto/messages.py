"""Message types of the stripefs wire, each field commented, each with a `valid()` check.

A message is a dataclass. On the wire it is a msgpack map of its fields (see codec.py);
a field named `data` of type bytes travels raw after the map, so that bulk block bytes
are not copied through msgpack. `valid()` checks every field's type against its
annotation and then the message's own constraints (`_check`), and returns an error
string or None; the RPC glue answers EINVAL to an invalid request before any handler
sees it, so a server never acts on a malformed message.
"""

from __future__ import annotations

import dataclasses
import functools
import stat
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

from .integrity import DIGEST_BYTES, DIGEST_V1_BYTES, known_version
from .types import (
    LOCK_FLOCK,
    LOCK_RECORD,
    LOCK_WAIT_MAX_S,
    MAX_BLOCK_SIZE_BYTES,
    MAX_REPLICAS,
    NAME_MAX_BYTES,
    OFFSET_MAX,
    SYMLINK_MAX_BYTES,
    XATTR_NAME_MAX_BYTES,
    XATTR_SIZE_MAX_BYTES,
)

#: Every integer on the wire fits a signed 64-bit column (SQLite's INTEGER): a larger one
#: (a block id of 2^64-1, say) would be refused by the store later, or worse, half-way.
_I64_MAX = (1 << 63) - 1
_I64_MIN = -(1 << 63)
#: uids and gids are 32-bit, as the kernel's.
ID_MAX = (1 << 32) - 1
#: Supplementary groups a caller may state (Linux's NGROUPS_MAX).
GROUPS_MAX = 65536


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, resolved annotation, required) of each field of a message class, computed
    once: typing.get_type_hints costs hundreds of microseconds a call."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, hints[f.name],
         f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
    )


Checker = Callable[[Any, str], Optional[str]]


@functools.lru_cache(maxsize=None)
def _checker(tp: Any) -> Checker:
    """A function telling why a value does not fit annotation `tp` (or None), built once
    per annotation so that checking a message is a few calls per field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [_checker(arg) for arg in typing.get_args(tp)]

        def check_union(value: Any, path: str) -> Optional[str]:
            errors = [c(value, path) for c in options]
            return None if any(e is None for e in errors) else errors[0]

        return check_union
    if tp is type(None):
        return lambda value, path: None if value is None else f"{path}: expected None"
    if tp is Any:
        return lambda value, path: None
    if origin is list:
        (arg,) = typing.get_args(tp)
        item_check = _checker(arg)

        def check_list(value: Any, path: str) -> Optional[str]:
            if not isinstance(value, list):
                return f"{path}: expected a list"
            for i, item in enumerate(value):
                err = item_check(item, path)
                if err:
                    return f"{err} (item {i})"
            return None

        return check_list
    if isinstance(tp, type) and issubclass(tp, Message):
        return lambda value, path: value.valid() if isinstance(value, tp) else f"{path}: expected {tp.__name__}"
    if tp is int:

        def check_int(value: Any, path: str) -> Optional[str]:
            if type(value) is not int:
                return f"{path}: expected an integer"
            return None if _I64_MIN <= value <= _I64_MAX else f"{path}: integer out of range"

        return check_int
    if tp is float:
        return lambda value, path: (
            None if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{path}: expected a number"
        )
    if tp in (bool, bytes, str):
        what = {bool: "a boolean", bytes: "bytes", str: "a string"}[tp]
        return lambda value, path: None if type(value) is tp else f"{path}: expected {what}"
    raise TypeError(f"unsupported message field type {tp!r}")


Converter = Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


@functools.lru_cache(maxsize=None)
def _converter(tp: Any) -> Converter:
    """How a decoded msgpack value becomes the field's value (nested messages are built;
    anything of the wrong shape is passed through for valid() to reject)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            return _identity
        inner = _converter(args[0])
        return lambda value: None if value is None else inner(value)
    if origin is list:
        inner = _converter(typing.get_args(tp)[0])
        if inner is _identity:
            return _identity
        return lambda value: [inner(v) for v in value] if isinstance(value, list) else value
    if isinstance(tp, type) and issubclass(tp, Message):
        return lambda value: tp.from_wire(value) if isinstance(value, dict) else value
    return _identity


@functools.lru_cache(maxsize=None)
def _plan(cls: type) -> tuple[tuple[str, Checker, Converter, bool], ...]:
    return tuple((name, _checker(tp), _converter(tp), required) for name, tp, required in _fields(cls))


def check_name(name: bytes, what: str = "name") -> Optional[str]:
    """A directory entry name: 1..255 bytes, no '/' or NUL, not '.' or '..'."""
    if not name:
        return f"{what}: empty"
    if len(name) > NAME_MAX_BYTES:
        return f"{what}: longer than {NAME_MAX_BYTES} bytes"
    if b"/" in name or b"\0" in name:
        return f"{what}: contains '/' or NUL"
    return None


class Message:
    """Base of every wire message (subclasses are dataclasses)."""

    #: names of fields that hold a directory entry name, checked by check_name in valid()
    NAME_FIELDS: ClassVar[tuple[str, ...]] = ()

    def valid(self) -> Optional[str]:
        cls: type = type(self)  # (a class hashes; typed as type[Message], mypy thinks not)
        for name, check, _, _ in _plan(cls):
            err = check(getattr(self, name), name)
            if err:
                return f"{type(self).__name__}.{err}"
        for name in self.NAME_FIELDS:
            value = getattr(self, name)
            if value is not None:
                err = check_name(value, name)
                if err:
                    return err
        return self._check()

    def _check(self) -> Optional[str]:
        return None

    def to_wire(self) -> dict:
        cls: type = type(self)
        return {name: _to_wire(getattr(self, name)) for name, _, _ in _fields(cls)}

    @classmethod
    def from_wire(cls, raw: Any) -> "Message":
        """Build from a decoded map. Unknown keys are ignored, missing ones take their
        defaults; a missing required field or a wrong shape raises ValueError."""
        if not isinstance(raw, dict):
            raise ValueError(f"{cls.__name__}: expected a map")
        kwargs = {}
        plan = _plan(cls)  # type: ignore[arg-type]  # (a class hashes)
        for key, _, convert, required in plan:
            if key in raw:
                kwargs[key] = convert(raw[key])
            elif required:
                raise ValueError(f"{cls.__name__}: missing field {key}")
        return cls(**kwargs)


def _to_wire(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, list):
        return [_to_wire(v) for v in value]
    return value


# --------------------------------------------------------------------------- shared records


@dataclass
class Ctx(Message):
    """Who is asking: the caller's credentials as the kernel reported them. The metaserver
    checks access with them (metaserver/perm.py), after the client credential's squash
    rule (proto/credentials.py) has mapped them."""

    uid: int = 0  # effective uid of the calling process
    gid: int = 0  # effective gid of the calling process
    pid: int = 0  # calling process id (for logs only)
    groups: list[int] = field(default_factory=list)  # supplementary groups of the caller

    def _check(self) -> Optional[str]:
        if not (0 <= self.uid <= ID_MAX and 0 <= self.gid <= ID_MAX):
            return "uid/gid: not a 32-bit id"
        if len(self.groups) > GROUPS_MAX or not all(0 <= g <= ID_MAX for g in self.groups):
            return "groups: too many, or not 32-bit ids"
        return None

    def set_id_dropped(self, mode: int, gid: int) -> int:
        """The set-user-ID and set-group-ID bits that a write, truncate or chown by this
        caller drops from a file of `mode` and group `gid` (Linux's should_remove_suid and
        setattr_should_drop_sgid): set-user-ID always, set-group-ID where it means a group
        to run as (group execute) or the caller, not root, is not of the group. The one
        rule for the metaserver, which drops them, and a client that asks it to."""
        of_group = self.uid == 0 or gid == self.gid or gid in self.groups
        drop = mode & stat.S_ISUID
        if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not of_group):
            drop |= stat.S_ISGID
        return drop


@dataclass
class Attr(Message):
    """Attributes of one inode, as stat(2) reports them."""

    ino: int  # inode number, never reused
    mode: int  # file type and permission bits (S_IFMT | 07777)
    nlink: int  # number of hard links (directories: 2 + subdirectories)
    uid: int  # owner
    gid: int  # group
    rdev: int  # device number (character/block special files)
    size: int  # bytes (regular files: logical length; symlinks: target length)
    atime_ns: int  # last access, ns since the epoch
    mtime_ns: int  # last modification of content
    ctime_ns: int  # last change of the inode
    block_size: int  # bytes per block of this file (or of files created in this directory)
    replicas: int  # replica count of this file (directories: for new files; 0 = default)
    generation: int = 0  # files: bumped on every content commit or truncate; directories: on
    #                      every entry change (add, remove, rename). Lets clients revalidate caches.
    xattrs: int = 0  # extended attributes stored (0: getxattr can be answered ENODATA locally)
    inline_max: int = 0  # files: block 0 is kept inline when it holds at most this many bytes;
    #                      directories: the value files created in them inherit


@dataclass
class BlockRef(Message):
    """One block of a file's block map: which immutable stored block holds bytes
    [index*block_size, index*block_size + length) of the file, and where."""

    index: int  # position in the file, in blocks
    block_id: int  # id of the stored block (immutable; a rewrite makes a new id)
    length: int  # valid bytes in the block; the rest up to the file size reads as zeros
    servers: list[str] = field(default_factory=list)  # data server addresses holding a replica
    token: bytes = b""  # block maps: the read token of this block for the caller (proto/auth.py)
    digest: bytes = b""  # digest of the block as written, from its writer (proto/integrity.py);
                         # empty: not recorded (blocks committed before digests were)
    stored: int = 0  # bytes of the block as written, which the digest describes, when a
                     # truncate clamped `length` below that (0: `length`); readers check
                     # what they fetch against the digest, then keep `length` bytes

    def _check(self) -> Optional[str]:
        if len(self.digest) in (0, DIGEST_V1_BYTES) or (len(self.digest) == DIGEST_BYTES
                                                        and known_version(self.digest)):
            return None
        return "digest: not a block digest"


@dataclass
class Allocation(Message):
    index: int  # block position in the file
    block_id: int  # new block id to write
    servers: list[str]  # data servers to write the replicas to, in chain order (the first gets it from the client)
    tokens: list[bytes]  # write tokens, one per server (proto/auth.py): authorize each to store block_id

    def _check(self) -> Optional[str]:
        return None if len(self.tokens) == len(self.servers) else "tokens: not one per server"


@dataclass
class DirEntry(Message):
    """One entry of a directory listing."""

    name: bytes  # entry name
    cookie: int  # offset to resume the listing after this entry; stable while the directory changes
    attr: Attr  # the entry's attributes (readdirplus)


# --------------------------------------------------------------------------- generic replies


@dataclass
class Empty(Message):
    """A request or reply with no fields."""


@dataclass
class AttrReply(Message):
    attr: Attr  # attributes after the operation
    parent: Optional[Attr] = None  # entry changes: the directory's attributes after it
    cookie: int = 0  # lookup: the entry's readdir cookie (where a listing of it resumes)
    mapped: bool = False  # lookup with want_map: `blocks` is the file's block map
    blocks: list[BlockRef] = field(default_factory=list)  # (with read tokens for the caller)


@dataclass
class DirChangeReply(Message):
    parent: Optional[Attr] = None  # the directory's attributes after the change
    ino: int = 0  # unlink, rmdir: the inode the removed entry named


# --------------------------------------------------------------------------- sessions


@dataclass
class SessionOpenReq(Message):
    host: str  # client host name, for status and logs
    mountpoint: str  # where it is mounted (or a label for library users)


@dataclass
class SessionReply(Message):
    session: int  # session id; open files and leases hang off it
    lease_s: float  # renew at least this often, or the session expires
    # A reader's open the metaserver did not record (OpenReply.recorded) of a file with
    # blocks, still open this long after, is recorded then (0: no such open goes unrecorded)
    record_open_after_s: float = 0.0


@dataclass
class SessionReq(Message):
    session: int  # session id from open_session


# --------------------------------------------------------------------------- namespace


@dataclass
class LookupReq(Message):
    NAME_FIELDS = ("name",)
    parent: int  # directory inode
    name: bytes  # entry name
    ctx: Ctx = field(default_factory=Ctx)  # caller (needs search permission on parent)
    #: a regular file `ctx` may read: its block map too, with read tokens for the caller's
    #: session (prefetch: what an open would give, without recording an open)
    want_map: bool = False


#: Lookups one `lookups` call may make.
LOOKUPS_MAX = 256


@dataclass
class LookupsReq(Message):
    """Several lookups in one call (a prefetcher's, with their maps: fs/client/cache.py
    `NameCache.ask_with_map`), each answered as `lookup` would, in its own transaction
    (with SQLite, a savepoint of the call's batch)."""

    lookups: list[LookupReq]

    def _check(self) -> Optional[str]:
        return f"lookups: more than {LOOKUPS_MAX}" if len(self.lookups) > LOOKUPS_MAX else None


@dataclass
class Looked(Message):
    errno: int = 0  # the lookup's error (ENOENT: no such entry), or 0
    reply: Optional[AttrReply] = None  # its reply, when errno is 0


@dataclass
class LookupsReply(Message):
    replies: list[Looked]  # one a lookup, in the request's order


@dataclass
class InodeReq(Message):
    ino: int  # the inode


@dataclass
class SetattrReq(Message):
    """Change attributes; a field left None is not changed."""

    ino: int  # the inode
    ctx: Ctx  # caller
    mode: Optional[int] = None  # new permission bits (07777); the type bits are kept
    uid: Optional[int] = None  # new owner
    gid: Optional[int] = None  # new group
    size: Optional[int] = None  # truncate or extend to this many bytes (regular files)
    atime_ns: Optional[int] = None  # explicit access time
    mtime_ns: Optional[int] = None  # explicit modification time
    atime_now: bool = False  # set atime to the server's now
    mtime_now: bool = False  # set mtime to the server's now
    session: int = 0  # size through a handle this session opened for writing (ftruncate):
                      # the open's permission counts, not the file's mode now
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer
    kill_suidgid: bool = False  # the caller may not keep set-user/group-ID bits: a write or
                                # truncate by someone without CAP_FSETID drops them (with
                                # `session`: a write through a handle opened for writing)

    def _check(self) -> Optional[str]:
        if self.size is not None and self.size < 0:
            return "size: negative"
        if self.mode is not None and not 0 <= self.mode <= 0o7777:
            return "mode: not permission bits"
        if any(v is not None and not 0 <= v <= ID_MAX for v in (self.uid, self.gid)):
            return "uid/gid: not a 32-bit id"
        return None


@dataclass
class MknodReq(Message):
    """Create a regular file, FIFO, socket or device node; optionally open it (create)."""

    NAME_FIELDS = ("name",)
    parent: int  # directory inode
    name: bytes  # new entry name
    mode: int  # type and permission bits
    ctx: Ctx  # caller: becomes the owner
    rdev: int = 0  # device number for S_IFCHR/S_IFBLK
    session: int = 0  # when non-zero, also open the new file for this session (create)
    prealloc_blocks: int = 0  # with session: also allocate blocks 0..n-1 (saves a round trip for small files)
    umask: int = 0  # the caller's umask: masks `mode` unless the directory has a default ACL
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer
    stage: bool = False  # the client can stage the file: mark it staged if the directory is an async checkpoint

    def _check(self) -> Optional[str]:
        if not 0 <= self.mode <= 0o177777:
            return "mode: not a file type and permission bits"
        if self.rdev < 0:
            return "rdev: negative"
        if not 0 <= self.umask <= 0o777:
            return "umask: not permission bits"
        return None if 0 <= self.prealloc_blocks <= 64 else "prealloc_blocks: out of range"


@dataclass
class CreateReply(Message):
    attr: Attr  # the new inode
    allocations: list[Allocation] = field(default_factory=list)  # preallocated blocks (prealloc_blocks)
    parent: Optional[Attr] = None  # the directory's attributes after the create
    staged: bool = False  # (stage) marked staged: its content goes to the client's staging area
    opened_in: int = 0  # (session) the session the new file's open is recorded in
    grant: bytes = b""  # (session) proof of the open for writing, to open it so again (OpenReq.grant)


@dataclass
class MkdirReq(Message):
    NAME_FIELDS = ("name",)
    parent: int  # directory inode
    name: bytes  # new directory name
    mode: int  # permission bits
    ctx: Ctx  # caller: becomes the owner
    umask: int = 0  # the caller's umask: masks `mode` unless the directory has a default ACL
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer

    def _check(self) -> Optional[str]:
        if not 0 <= self.umask <= 0o777:
            return "umask: not permission bits"
        return None if 0 <= self.mode <= 0o7777 else "mode: not permission bits"


@dataclass
class SymlinkReq(Message):
    NAME_FIELDS = ("name",)
    parent: int  # directory inode
    name: bytes  # new entry name
    target: bytes  # what the link points to (not interpreted)
    ctx: Ctx  # caller: becomes the owner
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer

    def _check(self) -> Optional[str]:
        if not self.target or len(self.target) > SYMLINK_MAX_BYTES or b"\0" in self.target:
            return "target: empty, too long or contains NUL"
        return None


@dataclass
class ReadlinkReply(Message):
    target: bytes  # the symlink's target


@dataclass
class LinkReq(Message):
    NAME_FIELDS = ("new_name",)
    ino: int  # existing inode (not a directory)
    new_parent: int  # directory to link into
    new_name: bytes  # new entry name
    ctx: Ctx = field(default_factory=Ctx)  # caller (needs write permission on new_parent)
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer


@dataclass
class RemoveReq(Message):
    """unlink or rmdir."""

    NAME_FIELDS = ("name",)
    parent: int  # directory inode
    name: bytes  # entry to remove
    ctx: Ctx = field(default_factory=Ctx)  # caller (write permission on parent, sticky bit)
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer


#: rename flags, as renameat2(2)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@dataclass
class RenameReq(Message):
    NAME_FIELDS = ("name", "new_name")
    parent: int  # source directory
    name: bytes  # source entry
    new_parent: int  # destination directory
    new_name: bytes  # destination entry
    flags: int = 0  # RENAME_NOREPLACE | RENAME_EXCHANGE
    ctx: Ctx = field(default_factory=Ctx)  # caller (write permission on both parents, sticky bit)
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer

    def _check(self) -> Optional[str]:
        if self.flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            return "flags: unknown bits"
        if self.flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            return "flags: NOREPLACE and EXCHANGE together"
        return None


@dataclass
class RenameReply(Message):
    parent: Optional[Attr] = None  # the source directory's attributes after the rename
    new_parent: Optional[Attr] = None  # the destination directory's (None: the same directory)
    moved: int = 0  # the inode that moved (0: nothing happened, the names were one inode)
    replaced: int = 0  # the inode the destination named before (exchange: now at the source)


@dataclass
class ReaddirReq(Message):
    ino: int  # directory inode
    offset: int = 0  # resume after the entry with this cookie (0 = from the start)
    limit: int = 1000  # at most this many entries
    ctx: Ctx = field(default_factory=Ctx)  # caller (needs read permission on the directory)

    def _check(self) -> Optional[str]:
        return None if 1 <= self.limit <= 100_000 else "limit: out of range"


@dataclass
class ReaddirReply(Message):
    entries: list[DirEntry]  # in cookie order
    more: bool  # False when the listing reached the end
    generation: int = 0  # the directory's generation when this page was read


@dataclass
class XattrReq(Message):
    """get, set or remove one extended attribute."""

    ino: int  # the inode
    name: bytes  # attribute name with its namespace prefix (user., trusted., ...)
    ctx: Ctx = field(default_factory=Ctx)  # caller (user.* as the file's mode; trusted.* root only)
    value: bytes = b""  # new value (set only)
    flags: int = 0  # XATTR_CREATE (1) / XATTR_REPLACE (2) (set only)
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer

    def _check(self) -> Optional[str]:
        if not self.name or b"\0" in self.name:
            return "name: empty or contains NUL"
        if len(self.name) > XATTR_NAME_MAX_BYTES:
            return "name: too long"
        if len(self.value) > XATTR_SIZE_MAX_BYTES:
            return "value: too large"
        if self.flags & ~3:
            return "flags: unknown bits"
        return None


@dataclass
class XattrReply(Message):
    value: bytes  # the attribute's value


@dataclass
class XattrListReply(Message):
    names: list[bytes]  # attribute names


@dataclass
class UsageReq(Message):
    """What a subtree holds, from the metaserver's directory usage counters (no walk)."""

    ino: int  # a directory (or a file: its own size)
    ctx: Ctx = field(default_factory=Ctx)  # caller (needs read permission on the directory)


@dataclass
class UsageReply(Message):
    bytes: int  # sizes of the files, symlinks and other non-directories under it, summed
    files: int  # those entries (a file with two links under it counts twice)
    dirs: int  # directories, itself included


#: Labels one find may ask for together, and the prefix of the names that are labels.
FIND_LABELS_MAX = 16
LABEL_NAME_PREFIX = b"user."


@dataclass
class Label(Message):
    """One label: a user.* extended attribute with this value."""

    name: bytes  # attribute name, user.* (b"user.split")
    value: bytes  # its value, compared byte for byte

    def _check(self) -> Optional[str]:
        if not self.name.startswith(LABEL_NAME_PREFIX) or len(self.name) == len(LABEL_NAME_PREFIX):
            return "name: a label is a user.* attribute"
        if b"\0" in self.name or len(self.name) > XATTR_NAME_MAX_BYTES:
            return "name: contains NUL or too long"
        return None if len(self.value) <= XATTR_SIZE_MAX_BYTES else "value: too large"


@dataclass
class FindReq(Message):
    """Regular files under a directory that carry every one of `labels`, their own or
    inherited from the nearest directory above them that sets the name (metaserver
    labels.py), found through the metaserver's index of labels, page by page."""

    ino: int  # the directory searched (with everything under it)
    labels: list[Label]  # all must hold; at most FIND_LABELS_MAX, each name once
    cursor: list[int] = field(default_factory=list)  # where the last page ended ([]: the start)
    limit: int = 1000  # at most this many entries in the reply
    ctx: Ctx = field(default_factory=Ctx)  # caller: finds only what it could list and read

    def _check(self) -> Optional[str]:
        if not 1 <= len(self.labels) <= FIND_LABELS_MAX:
            return f"labels: 1 to {FIND_LABELS_MAX}"
        if len({label.name for label in self.labels}) != len(self.labels):
            return "labels: a name given twice"
        if len(self.cursor) not in (0, 4):
            return "cursor: not one this server gave"
        if not 1 <= self.limit <= 100_000:
            return "limit: out of range"
        return None


@dataclass
class FindReply(Message):
    """A page of files a find matched, one per name, as three lists of one length (a list
    of messages would cost the wire's per-message work for every file)."""

    paths: list[bytes]  # from the searched directory (b"train/cat/0001.jpg")
    inos: list[int]  # each file's inode
    sizes: list[int]  # and its size
    cursor: list[int]  # pass back for the next page; [] once the search is complete
    # (a page may be empty while the cursor says there is more)

    def _check(self) -> Optional[str]:
        return None if len(self.paths) == len(self.inos) == len(self.sizes) else "paths, inos, sizes: unequal lengths"


@dataclass
class StatfsReply(Message):
    block_size: int  # fundamental block size reported to statfs (bytes)
    total_bytes: int  # capacity summed over live data servers, divided by the default replica count
    free_bytes: int  # free bytes likewise
    files: int  # inodes in use
    files_free: int  # inodes available (a large constant: there is no fixed inode table)
    name_max: int  # longest name


# --------------------------------------------------------------------------- file data


@dataclass
class OpenReq(Message):
    ino: int  # file to open
    session: int  # session id: the open is recorded so that unlink keeps the inode
    ctx: Ctx = field(default_factory=Ctx)  # caller (read/write permission as flags ask)
    flags: int = 0  # open(2) flags (O_TRUNC is applied here)
    # A read-only open may go unrecorded (the metaserver decides: OpenReply.recorded): of a
    # file without blocks (inline, empty, all hole), whose content the reply carries; of
    # one with blocks, which the metaserver keeps for a while after an unlink and which
    # the client records if it is still open after SessionReply.record_open_after_s.
    unrecorded_ok: bool = False
    # An open the client already had, registered again after its session was lost or
    # recorded late (a reader's unrecorded one): the grant that came with it
    # (OpenReply.grant) stands for the permission check (proto/auth.py).
    grant: bytes = b""
    # The generation of the file that the client's block map of it is of (from a lookup
    # with want_map or an earlier open; 0: it has none): if the file's generation is still
    # that, its map has not changed and the reply leaves it out (OpenReply.same_map).
    map_generation: int = 0
    # False: the open only registers one the client has already (again in a new session,
    # or recorded late): it has what it reads by, and the reply carries no block map; it is
    # recorded whatever unrecorded_ok says.
    map_wanted: bool = True


@dataclass
class OpenReply(Message):
    """What reading the file needs, so that a small file is read in this one round trip."""

    attr: Attr  # attributes at open (close-to-open revalidation)
    blocks: list[BlockRef]  # the whole block map
    inline: bool = False  # block 0 is inline: its bytes are `data`
    inline_crc32c: int = 0  # CRC32C of `data`, as committed
    data: bytes = b""  # the inline block 0 (travels raw)
    recorded: bool = True  # the open is recorded (False: nothing to release; see OpenReq)
    opened_in: int = 0  # the session it is recorded in (0: not recorded, or an older metaserver)
    grant: bytes = b""  # proof of this open, to record it later or again as it was (OpenReq.grant)
    # The file's generation is OpenReq.map_generation: `blocks` is empty, the client's map
    # of that generation stands (the same blocks; its replica lists may be older).
    same_map: bool = False


@dataclass
class ReleaseReq(Message):
    ino: int  # file being closed
    session: int  # session that opened it
    rid: int = 0  # request id (proto/services.py `once`): a repeated release must not count twice
    # allocations of this file made in this session that the writer gives up at its last
    # close (blocks allocated ahead it never reached): garbage now, not at the pending timeout
    abandon: list[int] = field(default_factory=list)

    def _check(self) -> Optional[str]:
        return "abandon: too many" if len(self.abandon) > 4096 else None


#: Lock types, as fcntl(2) numbers them on Linux.
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2


@dataclass
class LockReq(Message):
    """Take, change, release or test a lock (metaserver/locks.py). A record lock covers
    [start, end]; a flock lock the whole file. The owner is the caller's: the kernel's lock
    owner id as a signed 64-bit number (a process, or an open file description), or any
    number a library client picks; locks belong to (session, owner)."""

    session: int  # the session the owner lives in (it must have the file open)
    ino: int  # the file
    owner: int  # lock owner within the session (signed 64-bit)
    type: int  # F_RDLCK (shared), F_WRLCK (exclusive) or F_UNLCK (release the range)
    kind: int = LOCK_RECORD  # LOCK_RECORD or LOCK_FLOCK
    start: int = 0  # first byte of the range (record locks)
    end: int = OFFSET_MAX  # last byte of the range, inclusive; OFFSET_MAX: to end of file
    pid: int = 0  # the locking process, as F_GETLK reports it to others
    test: bool = False  # F_GETLK: change nothing, report a conflicting lock

    def _check(self) -> Optional[str]:
        if self.type not in (F_RDLCK, F_WRLCK, F_UNLCK):
            return "type: not F_RDLCK, F_WRLCK or F_UNLCK"
        if self.kind not in (LOCK_RECORD, LOCK_FLOCK):
            return "kind: not LOCK_RECORD or LOCK_FLOCK"
        if not 0 <= self.start <= self.end <= OFFSET_MAX:
            return "start, end: not a byte range"
        if self.kind == LOCK_FLOCK and (self.start, self.end) != (0, OFFSET_MAX):
            return "a flock lock covers the whole file"
        if self.test and self.type == F_UNLCK:
            return "test: of F_RDLCK or F_WRLCK"
        return None


@dataclass
class LockReply(Message):
    granted: bool  # taken (a test: nothing conflicts); else the conflict is described below
    gen: int  # the file's lock generation when answered: what lock_wait waits to change
    type: int = F_UNLCK  # a conflicting lock: its type, range and holder's pid
    start: int = 0
    end: int = 0
    pid: int = 0
    attr: Optional[Attr] = None  # a lock taken: the file's attributes now (the taker
                                 # fetches the block map again only if they changed)


@dataclass
class LockWaitReq(Message):
    """Wait until the locks of a file change from generation `gen` (a LockReply's), or
    `wait_s` passes; the waiter then asks for its lock again."""

    session: int
    ino: int
    gen: int
    wait_s: float = LOCK_WAIT_MAX_S

    def _check(self) -> Optional[str]:
        if not 0 <= self.wait_s <= LOCK_WAIT_MAX_S:
            return f"wait_s: not within [0, {LOCK_WAIT_MAX_S}]"
        return None


@dataclass
class LockWaitReply(Message):
    gen: int  # the generation now (the same: nothing changed within wait_s)


@dataclass
class UnlockOwnersReq(Message):
    """Drop every lock (both kinds) of these owners of the session on the file: a close by
    a process (its record locks), the last close of an open file description (its OFD and
    flock locks)."""

    session: int
    ino: int
    owners: list[int]


@dataclass
class AccessedReq(Message):
    """A file open in the session was read: its atime moves to now if relatime's rules
    say so (metaserver/files.py)."""

    ino: int
    session: int


@dataclass
class PunchReq(Message):
    """Free the blocks of [start, start + length) of a file (FALLOC_FL_PUNCH_HOLE): whole
    blocks only, aligned to the file's block size; they read as zeros after. The client
    zeroes the partial blocks at a hole's edges itself, by writing them."""

    ino: int
    session: int  # a session that has the file open for writing
    start: int
    length: int
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer

    def _check(self) -> Optional[str]:
        if self.start < 0 or self.length <= 0:
            return "start, length: not a byte range"
        return None


@dataclass
class BlockMapReq(Message):
    ino: int  # the file
    session: int = 0  # a session that has the file open (what entitles it to read tokens)


@dataclass
class BlockMapReply(Message):
    attr: Attr  # attributes now
    blocks: list[BlockRef]  # the whole block map
    inline: bool = False  # block 0 is inline: its bytes are `data`
    inline_crc32c: int = 0  # CRC32C of `data`, as committed
    data: bytes = b""  # the inline block 0 (travels raw)


@dataclass
class AllocReq(Message):
    """Ask for new stored blocks (ids, replica servers, write tokens) for some positions of a file."""

    ino: int  # the file
    session: int  # writer's session (for cleaning up after a crashed writer)
    indexes: list[int]  # block positions about to be written
    exclude: list[str] = field(default_factory=list)  # servers that just failed this writer: place elsewhere

    def _check(self) -> Optional[str]:
        if not 1 <= len(self.indexes) <= 4096 or any(i < 0 for i in self.indexes):
            return "indexes: empty, too many or negative"
        return None


@dataclass
class AllocReply(Message):
    allocations: list[Allocation]


@dataclass
class CommitReq(Message):
    """Make written blocks part of the file, atomically."""

    ino: int  # the file
    session: int  # writer's session
    blocks: list[BlockRef]  # blocks now written on all their servers
    size: int  # file size after these writes (the commit never shrinks a file)
    mtime_ns: int  # time of the last write
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer
    unstage: bool = False  # the upload of a staged file: its staged mark goes in the same transaction

    def _check(self) -> Optional[str]:
        if self.size < 0:
            return "size: negative"
        if len(self.blocks) > 4096:
            return "blocks: too many"
        return None


@dataclass
class InlineCommitReq(Message):
    """Make `data` the file's block 0, kept in the metadata store (inline), atomically: the
    close of a small file. A stored block 0 it replaces becomes garbage."""

    ino: int  # the file
    session: int  # writer's session
    size: int  # file size after this write (the commit never shrinks a file)
    mtime_ns: int  # time of the last write
    crc32c: int  # CRC32C of `data`, checked before it is stored
    data: bytes = b""  # block 0's bytes; at most the file's inline_max (travels raw)
    rid: int = 0  # request id (proto/services.py `once`): a retry with it gets the first answer

    def _check(self) -> Optional[str]:
        if self.size < 0:
            return "size: negative"
        if not 0 <= self.crc32c < 1 << 32:
            return "crc32c: out of range"
        return None


# --------------------------------------------------------------------------- data servers


@dataclass
class RegisterReq(Message):
    address: str  # host:port clients use to reach this data server
    node_id: str  # stable id of the data directory (survives restarts)
    capacity_bytes: int  # size of the file system under the data directory
    free_bytes: int  # bytes free there
    blocks: int  # blocks stored


@dataclass
class RegisterReply(Message):
    server_id: int  # this server's id in the registry
    heartbeat_interval_s: float  # send heartbeats this often
    token_key: bytes = b""  # the key of block write tokens (proto/auth.py): to data servers only


@dataclass
class HeartbeatReq(Message):
    server_id: int  # from register
    capacity_bytes: int
    free_bytes: int
    blocks: int
    used_bytes: int = 0  # bytes taken by stored blocks
    corrupt: list[int] = field(default_factory=list)  # blocks found corrupt (copy moved aside) or gone
    verified: list[int] = field(default_factory=list)  # blocks of HeartbeatReply.verify checked since


@dataclass
class ReplicateTask(Message):
    """Make a copy of a block on the server that receives this task."""

    block_id: int  # block to copy
    sources: list[str]  # servers holding a good copy, best first
    token: bytes  # authorizes storing block_id
    read_token: bytes = b""  # authorizes the copying server to read block_id from the sources
    digest: bytes = b""  # the block's digest as committed: a copy that does not match is not stored


@dataclass
class HeartbeatReply(Message):
    delete: list[int]  # block ids this server should delete (garbage)
    reregister: bool = False  # the metaserver does not know this server: register again
    replicate: list[ReplicateTask] = field(default_factory=list)  # copies to make (re-replication)
    block_report: bool = False  # send a full block report (block_report) before the next beat
    verify: list[int] = field(default_factory=list)  # blocks a client found bad here: check them
    #                                                  (found bad: moved aside, reported as corrupt)
    verify_digests: list[bytes] = field(default_factory=list)  # each verify block's committed digest
    #                                          (b"": none recorded); a copy must match it too

    def _check(self) -> Optional[str]:
        if self.verify_digests and len(self.verify_digests) != len(self.verify):
            return "verify_digests: not one per verify block"
        return None


@dataclass
class ReplicatedReq(Message):
    server_id: int
    block_ids: list[int]  # copies made for ReplicateTasks, now stored and verified
    failed: list[int] = field(default_factory=list)  # tasks that could not be done


@dataclass
class BlockReportReq(Message):
    """Every block a data server stores, in chunks; reconciled against the block maps."""

    server_id: int
    block_ids: list[int]  # one chunk of the server's block ids
    first: bool = True  # first chunk of a full report
    last: bool = True  # last chunk: the report is complete

    def _check(self) -> Optional[str]:
        return None if len(self.block_ids) <= 100_000 else "block_ids: chunk too large"


@dataclass
class BadReplicaReq(Message):
    """A client found a replica unreadable: checksum failure, missing, or unreachable."""

    block_id: int
    address: str  # the data server whose copy failed
    reason: str  # "corrupt", "missing" or "unreachable"


@dataclass
class FsckReq(Message):
    repair: bool = False  # fix what can be fixed (default: report only)


@dataclass
class FsckReply(Message):
    problems: list[str]  # one line per problem found
    repaired: list[str]  # one line per repair made (repair=True only)
    inodes: int  # inodes checked
    blocks: int  # blocks checked
    under_replicated: int  # blocks with fewer live replicas than their file asks for
    lost: int  # blocks with no live replica


@dataclass
class DeletedReq(Message):
    server_id: int
    block_ids: list[int]  # garbage blocks now deleted


@dataclass
class ServerStatus(Message):
    server_id: int
    address: str
    state: str  # "up", "suspect" (missed heartbeats) or "dead"
    capacity_bytes: int
    free_bytes: int
    used_bytes: int
    blocks: int
    last_heartbeat_s: float  # seconds since the last heartbeat


@dataclass
class StatusReply(Message):
    servers: list[ServerStatus]
    inodes: int  # inodes in the namespace
    files: int  # regular files
    directories: int
    bytes: int  # logical bytes in regular files
    blocks: int  # stored blocks referenced by files
    sessions: int  # live client sessions
    locks: int = 0  # locks held (record ranges and flock locks), over every session
    under_replicated: int = 0  # blocks with fewer live replicas than their file asks for
    lost: int = 0  # blocks with no live replica
    inline_files: int = 0  # files whose block 0 is kept in the metadata store
    inline_bytes: int = 0  # bytes kept so
    engine: str = ""  # the metadata store's engine: "sqlite" or "postgres"
    metaserver: str = ""  # the answering metaserver's name (host:pid, unique while it runs)
    duties: str = ""  # the metaserver running the background duties (sweep, GC, replication planning)
    duties_address: str = ""  # where the metaserver running the background duties serves
    metaservers: list[str] = field(default_factory=list)  # where every live metaserver of this store serves


@dataclass
class WriteBlockHead(Message):
    """The first message of a write_block stream; the block's chunks follow it, each as a
    head with its CRC32C and leaf hashes (codec.encode_chunk_head) and then its data. The
    receiver stores the block and forwards head and chunks to the next server of the
    chain, which does the same (dataserver/chain.py)."""

    block_id: int  # id allocated by the metaserver
    length: int  # bytes of the block: the chunks add up to it
    chain: list[str]  # servers to store it on, in order: the receiver first, each forwarding to the next
    tokens: list[bytes]  # write tokens, one per server of `chain`, each for that server (proto/auth.py)
    holder: str = ""  # the client the block is written for, stated by a forwarding data server ("" from a client)
    sync: bool = True  # durable (fsynced) before the reply; False: written, synced by sync_blocks later
    hop: int = 0  # servers of the chain before the receiver (0 from a client; logs say which replica failed)

    def _check(self) -> Optional[str]:
        if not 0 <= self.hop < MAX_REPLICAS:
            return "hop: out of range"
        if self.block_id <= 0 or not 0 <= self.length <= MAX_BLOCK_SIZE_BYTES:
            return "block_id/length: out of range"
        if not 1 <= len(self.chain) <= MAX_REPLICAS or len(set(self.chain)) != len(self.chain):
            return "chain: not 1 to %d distinct servers" % MAX_REPLICAS
        if len(self.tokens) != len(self.chain):
            return "tokens: not one per server of the chain"
        if len(self.holder) > 1024 or "\n" in self.holder:
            return "holder: not a credential name"
        return None


@dataclass
class ReplicaError(Message):
    """A server of a write chain that did not store the block."""

    address: str  # the server
    errno: int  # why (EIO: unreachable, or the chain broke before it; EBADMSG: damaged on the way; ENOSPC: full)
    message: str = ""


@dataclass
class WriteBlockReply(Message):
    """What a write chain stored: every server of the chain is in exactly one list."""

    stored: list[str] = field(default_factory=list)  # servers that hold the block now
    failed: list[ReplicaError] = field(default_factory=list)  # servers that do not, and why


@dataclass
class SyncBlocksReq(Message):
    """Make blocks stored with sync=False durable (a client's fsync)."""

    block_ids: list[int]

    def _check(self) -> Optional[str]:
        return None if len(self.block_ids) <= 100_000 else "block_ids: too many"


@dataclass
class GetBlockReq(Message):
    block_id: int  # block to read
    offset: int = 0  # first byte
    length: int = -1  # bytes to read (-1: to the end)
    token: bytes = b""  # the read token from the block map (not needed by admins)
    leaves: bool = False  # also send the leaf hashes stored with the block (range readers)

    def _check(self) -> Optional[str]:
        if self.block_id <= 0 or self.offset < 0 or self.length < -1:
            return "block_id/offset/length: out of range"
        return None


@dataclass
class BlockData(Message):
    data: bytes = b""  # the bytes read, verified against their checksums
    leaves: bytes = b""  # GetBlockReq.leaves: the leaf hashes stored with the block (b"": none)


@dataclass
class DataStatusReply(Message):
    node_id: str
    capacity_bytes: int
    free_bytes: int
    used_bytes: int
    blocks: int


def check_replicas(n: int) -> bool:
    return 0 <= n <= MAX_REPLICAS


__all__ = [name for name in dir() if not name.startswith("_")]
