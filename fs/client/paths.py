"""Paths over the inode API: what a program without a mount (fsspec, `stripefs cp`) needs
to name files as `/a/b/c` rather than as (parent inode, name).

Every function takes a started `Client` and walks from the root one lookup at a time,
through the client's name cache (so a second walk of the same directories costs no round
trip while the entries are fresh). Symbolic links are followed as the kernel follows them,
in the middle of a path always and at its end when `follow` is set, at most SYMLOOP_MAX of
them (ELOOP). A path is absolute or taken from the root; `.` and `..` are resolved
lexically first (as a URL's path is). Errors are FsError(errno), as everywhere in the
library: ENOENT, ENOTDIR, EEXIST, EISDIR, ELOOP, EACCES.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import stat
from typing import TYPE_CHECKING, AsyncIterator, Mapping, NamedTuple, Optional


from stripefs.proto import messages as m
from stripefs.proto.errors import FsError
from stripefs.proto.types import ROOT_INODE

from .together import at_once

if TYPE_CHECKING:
    from .client import Client

#: Symbolic links followed in one walk before ELOOP (Linux's SYMLOOP_MAX / MAXSYMLINKS).
SYMLOOP_MAX = 40
#: Extended attributes that are labels (the user namespace: `setfattr -n user.split -v train`).
LABEL_PREFIX = m.LABEL_NAME_PREFIX
#: Files one `find` call of the metaserver returns at most.
FIND_PAGE = 5000
#: Bytes moved by one read or write call of `read_file`/`write_file`/`copy_file`.
COPY_CHUNK_BYTES = 4 * 1024 * 1024
#: Calls one `stat_many`/`labels` keeps in flight.
PARALLEL_CALLS = 32


#: The scheme of cluster URLs: `stripefs://HOST:PORT[,HOST:PORT...]/path`.
URL_SCHEME = "stripefs"


def split_url(path: str) -> tuple[str, str]:
    """(metaservers or "", path) of `stripefs://HOSTS/path`, `stripefs:///path`,
    `stripefs::path` or a plain path (fsspec's URLs, `stripefs cp`'s arguments)."""
    if path.startswith(URL_SCHEME + "://"):
        rest = path[len(URL_SCHEME) + 3:]
        hosts, slash, tail = rest.partition("/")
        return hosts, "/" + tail if slash else "/"
    if path.startswith(URL_SCHEME + "::"):
        return "", path[len(URL_SCHEME) + 2:]
    return "", path


def normalize(path: str) -> str:
    """`/`-rooted, no `.`, `..`, `//` or trailing `/`: the form every function here takes."""
    p = posixpath.normpath("/" + path.lstrip("/"))
    return "/" + p.lstrip("/")  # normpath keeps a leading "//"


def split(path: str) -> tuple[str, str]:
    """(parent, name) of a normalized path other than `/`."""
    path = normalize(path)
    if path == "/":
        raise FsError(errno.EINVAL, "the root has no parent")
    parent, name = posixpath.split(path)
    return parent, name


async def resolve(client: Client, path: str, *, follow: bool = True, ctx: Optional[m.Ctx] = None) -> m.Attr:
    """The attributes of what `path` names."""
    return await _walk(client, normalize(path), follow, ctx, [0])


async def _walk(client: Client, path: str, follow: bool, ctx: Optional[m.Ctx], hops: list[int],
                base: Optional[m.Attr] = None) -> m.Attr:
    attr = base if base is not None else await client.getattr(ROOT_INODE)
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if not stat.S_ISDIR(attr.mode):
            raise FsError(errno.ENOTDIR, f"{'/'.join(parts[:i]) or '/'} is not a directory")
        parent = attr
        attr = await client.lookup(parent.ino, os.fsencode(part), ctx)
        last = i == len(parts) - 1
        if stat.S_ISLNK(attr.mode) and (follow or not last):
            hops[0] += 1
            if hops[0] > SYMLOOP_MAX:
                raise FsError(errno.ELOOP, f"more than {SYMLOOP_MAX} symbolic links in {path}")
            target = os.fsdecode(await client.readlink(attr.ino))
            if target.startswith("/"):
                attr = await _walk(client, normalize(target), True, ctx, hops)
            else:
                attr = await _walk(client, normalize(target).lstrip("/"), True, ctx, hops, parent)
    return attr


async def resolve_parent(client: Client, path: str, ctx: Optional[m.Ctx] = None) -> tuple[m.Attr, bytes]:
    """The directory that holds `path`'s last component, and that component."""
    parent, name = split(path)
    attr = await resolve(client, parent, ctx=ctx)
    if not stat.S_ISDIR(attr.mode):
        raise FsError(errno.ENOTDIR, f"{parent} is not a directory")
    return attr, os.fsencode(name)


async def exists(client: Client, path: str, ctx: Optional[m.Ctx] = None) -> bool:
    try:
        await resolve(client, path, ctx=ctx)
        return True
    except FsError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise


async def makedirs(client: Client, path: str, mode: int = 0o777, *, exist_ok: bool = True,
                   ctx: Optional[m.Ctx] = None) -> m.Attr:
    """mkdir -p: every missing directory of `path`; EEXIST if the last one exists and
    not `exist_ok` (or if something other than a directory is in the way)."""
    path = normalize(path)
    attr = await client.getattr(ROOT_INODE)
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        name = os.fsencode(part)
        last = i == len(parts) - 1
        try:
            attr = await client.mkdir(attr.ino, name, mode, ctx)
            continue
        except FsError as exc:
            if exc.errno != errno.EEXIST:
                raise
            if last and not exist_ok:
                raise
        attr = await _walk(client, part, True, ctx, [0], attr)
        if not stat.S_ISDIR(attr.mode):
            raise FsError(errno.EEXIST, f"{'/' + '/'.join(parts[:i + 1])} exists and is not a directory")
    return attr


async def listdir(client: Client, path: str, ctx: Optional[m.Ctx] = None) -> list[m.DirEntry]:
    """The entries of a directory with their attributes (one readdirplus stream)."""
    attr = await resolve(client, path, ctx=ctx)
    if not stat.S_ISDIR(attr.mode):
        raise FsError(errno.ENOTDIR, f"{path} is not a directory")
    return await client.listdir(attr.ino, ctx)


async def walk(client: Client, path: str, ctx: Optional[m.Ctx] = None) -> AsyncIterator[tuple[str, list[m.DirEntry]]]:
    """(directory, its entries) for `path` and every directory under it, parents first;
    symbolic links are not followed into."""
    stack = [normalize(path)]
    while stack:
        top = stack.pop()
        entries = await listdir(client, top, ctx)
        yield top, entries
        stack.extend(posixpath.join(top, os.fsdecode(e.name)) for e in reversed(entries)
                     if stat.S_ISDIR(e.attr.mode))


async def usage(client: Client, path: str, ctx: Optional[m.Ctx] = None) -> m.UsageReply:
    """`du` of `path` (symbolic links followed), from the metaserver's usage counters."""
    return await client.usage((await resolve(client, path, ctx=ctx)).ino, ctx)


async def labels(client: Client, ino: int, ctx: Optional[m.Ctx] = None) -> dict[str, str]:
    """The labels of one inode: its `user.*` extended attributes, without the prefix
    (values that are not UTF-8 are decoded with replacement characters)."""
    names = [n for n in await client.listxattr(ino) if n.startswith(LABEL_PREFIX)]
    out: dict[str, str] = {}
    got = await at_once(*(functools.partial(client.getxattr, ino, name, ctx) for name in names))
    for name, value in zip(names, got):
        try:
            text = value.unwrap().decode(errors="replace")
        except FsError as exc:
            if exc.errno == errno.ENODATA:  # removed since it was listed
                continue
            raise  # (itself, EACCES say: not inside an ExceptionGroup)
        out[name[len(LABEL_PREFIX):].decode(errors="replace")] = text
    return dict(sorted(out.items()))


def label_list(labels: Mapping[str, str | bytes]) -> list[m.Label]:
    """{"split": "train"} as the labels a find asks for (`user.split` = b"train")."""
    out = []
    for key, value in labels.items():
        name = key.encode() if key.encode().startswith(LABEL_PREFIX) else LABEL_PREFIX + key.encode()
        out.append(m.Label(name=name, value=value.encode() if isinstance(value, str) else value))
    return out


class Found(NamedTuple):
    """A file a find matched, under one of its names."""

    path: str  # from the root: /datasets/train/cat/0001.jpg
    ino: int
    size: int


async def find(client: Client, path: str, labels: Mapping[str, str | bytes], ctx: Optional[m.Ctx] = None,
               ) -> AsyncIterator[Found]:
    """Found(path, inode, size) of every regular file under directory `path` whose labels
    (`user.*` attributes, a directory's applying to what is under it unless set again
    below) are all `labels`, e.g. {"split": "train", "class": "cat"}, as the metaserver's
    label index finds them, a page at a time (metaserver/labels.py). Symbolic links are not
    followed below `path`; a file with several names comes once per name."""
    want = label_list(labels)
    top = await resolve(client, path, ctx=ctx)
    if not stat.S_ISDIR(top.mode):
        raise FsError(errno.ENOTDIR, f"{path}: not a directory")
    base = normalize(path).rstrip("/") + "/"
    cursor: list[int] = []
    while True:
        page = await client.find(top.ino, want, cursor, FIND_PAGE, ctx)
        for rel, ino, size in zip(page.paths, page.inos, page.sizes):
            yield Found(base + os.fsdecode(rel), ino, size)
        if not page.cursor:
            return
        cursor = page.cursor


async def remove(client: Client, path: str, *, recursive: bool = False, ctx: Optional[m.Ctx] = None) -> None:
    """rm (a file, a symlink or, with `recursive`, a directory and what is under it);
    rmdir of an empty directory without it. The link itself is removed, never its target."""
    parent, name = await resolve_parent(client, path, ctx)
    attr = await client.lookup(parent.ino, name, ctx)
    if not stat.S_ISDIR(attr.mode):
        await client.unlink(parent.ino, name, ctx)
    elif recursive:
        await client.remove_tree(parent.ino, name, ctx)
    else:
        await client.rmdir(parent.ino, name, ctx)


async def rename(client: Client, src: str, dst: str, ctx: Optional[m.Ctx] = None) -> None:
    """rename(2): atomic, replaces a file (or an empty directory) at `dst`."""
    sp, sn = await resolve_parent(client, src, ctx)
    dp, dn = await resolve_parent(client, dst, ctx)
    await client.rename(sp.ino, sn, dp.ino, dn, ctx=ctx)


async def open_file(client: Client, path: str, flags: int, mode: int = 0o666,
                    ctx: Optional[m.Ctx] = None) -> tuple[int, m.Attr]:
    """open(2) by path: (handle, attributes at open). O_CREAT creates the file when it is
    missing (O_EXCL: EEXIST if it is not); O_TRUNC empties it; a directory is EISDIR."""
    if flags & os.O_CREAT:
        parent, name = await resolve_parent(client, path, ctx)
        try:
            fh, attr = await client.create(parent.ino, name, mode, flags, ctx)
            return fh, attr
        except FsError as exc:
            if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
    attr = await resolve(client, path, ctx=ctx)
    if stat.S_ISDIR(attr.mode):
        raise FsError(errno.EISDIR, f"{path} is a directory")
    fh, _, _ = await client.open(attr.ino, flags & ~(os.O_CREAT | os.O_EXCL), ctx)
    if flags & os.O_TRUNC:
        attr = await client.getattr(attr.ino)
    return fh, attr


async def close_file(client: Client, fh: int) -> None:
    """close(2): what was written is committed (close-to-open), then the handle goes."""
    try:
        await client.flush(fh)
    finally:
        await client.release(fh)


async def read_file(client: Client, path: str, start: int = 0, end: Optional[int] = None,
                    ctx: Optional[m.Ctx] = None) -> bytes:
    """Bytes [start, end) of a file (end None: to its end), in one open."""
    fh, attr = await open_file(client, path, os.O_RDONLY, ctx=ctx)
    try:
        return await read_range(client, fh, start, attr.size if end is None else end)
    finally:
        await client.release(fh)


async def read_range(client: Client, fh: int, start: int, end: int) -> bytes:
    """Bytes [start, end) through an open handle, COPY_CHUNK_BYTES a call with the calls in
    flight together (the reader fetches the blocks behind each in parallel); short at
    the end of the file."""
    if end <= start:
        return b""
    offsets = range(start, end, COPY_CHUNK_BYTES)
    got = await at_once(*(functools.partial(client.read, fh, offset, min(COPY_CHUNK_BYTES, end - offset))
                          for offset in offsets))
    out = bytearray()
    for offset, result in zip(offsets, got):
        piece = result.unwrap()  # (an error as itself: EIO, not an ExceptionGroup)
        out += piece
        if len(piece) < min(COPY_CHUNK_BYTES, end - offset):
            break  # the end of the file
    return bytes(out)


async def write_file(client: Client, path: str, data: bytes, mode: int = 0o666, ctx: Optional[m.Ctx] = None) -> m.Attr:
    """Create or replace the content of a file with `data`; durable for readers (committed)
    on return, as after close(2)."""
    fh, attr = await open_file(client, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode, ctx)
    try:
        view = memoryview(data)
        for offset in range(0, len(view), COPY_CHUNK_BYTES):
            await client.write(fh, offset, view[offset:offset + COPY_CHUNK_BYTES])
    finally:
        await close_file(client, fh)
    return await client.getattr(attr.ino)


async def copy_file(client: Client, src: str, dst: str, ctx: Optional[m.Ctx] = None) -> None:
    """cp SRC DST inside the cluster, through this client (a chunk at a time)."""
    sfh, sattr = await open_file(client, src, os.O_RDONLY, ctx=ctx)
    try:
        dfh, _ = await open_file(client, dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IMODE(sattr.mode), ctx)
        try:
            offset = 0
            while True:
                chunk = await client.read(sfh, offset, COPY_CHUNK_BYTES)
                if not chunk:
                    break
                await client.write(dfh, offset, chunk)
                offset += len(chunk)
        finally:
            await close_file(client, dfh)
    finally:
        await client.release(sfh)
