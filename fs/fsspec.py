"""stripefs as an fsspec filesystem: `stripefs://HOST:PORT[,HOST:PORT...]/path` for programs
that want a URL rather than a mount (pandas, pyarrow, Hugging Face datasets, dask).

    import fsspec
    with fsspec.open("stripefs://meta1:7000,meta2:7000/data/x.parquet", "rb",
                     credentials="/etc/stripefs/client") as f: ...
    pandas.read_parquet("stripefs://meta1:7000/data/x.parquet",
                        storage_options={"credentials": "/etc/stripefs/client"})

Registered under the `stripefs` protocol through the `fsspec.specs` entry point (pyproject).
The metaservers come from the URL's host part, else `meta=`, else $STRIPEFS_META; the
credential bundle (a client credential, `stripefs credential new --role client`) from
`credentials=`, else $STRIPEFS_CREDENTIALS.

Underneath is the client library (fs/client), no FUSE: one filesystem object is one client
session, run by a trio loop on a thread of its own (`_Portal`); calls from any number of
threads go to it and run concurrently there. The consistency is the library's:
close-to-open (a file written and closed is seen whole by every later open, anywhere),
close durable on all replicas. A forked child (a DataLoader worker) gets a session of its
own on first use. Errors are OSError with the errno the cluster answered
(FileNotFoundError, PermissionError, ...).
"""

from __future__ import annotations

import datetime
import errno
import os
import posixpath
import stat
import threading
import weakref
from typing import Any, Callable, Optional

import trio
from fsspec.core import has_magic
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from stripefs.client import Client, FsError, load_credentials, open_client
from stripefs.client import paths
from stripefs.proto.types import CREDENTIALS_ENV, META_ENV

PROTOCOL = paths.URL_SCHEME
#: How long opening a session (reaching a metaserver) may take before the filesystem
#: object gives up with ETIMEDOUT.
CONNECT_TIMEOUT_S = 60.0
#: How long closing the session at exit may take.
CLOSE_TIMEOUT_S = 10.0


def _oserror(exc: FsError, path: Any = None) -> OSError:
    """The OSError subclass for the errno (FileNotFoundError for ENOENT, ...)."""
    return OSError(exc.errno, exc.message or os.strerror(exc.errno), path) if path is not None \
        else OSError(exc.errno, exc.message or os.strerror(exc.errno))


class _Portal:
    """One client session on a trio loop in a thread of its own; `call` runs a coroutine
    function there from any other thread and returns its result."""

    def __init__(self, meta: str, credentials: str, options: dict) -> None:
        self.pid = os.getpid()
        self.client: Optional[Client] = None
        self._token: Optional[trio.lowlevel.TrioToken] = None
        self._stop: Optional[trio.Event] = None
        self._error: Optional[BaseException] = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(meta, credentials, options),
                                        name="stripefs-fsspec", daemon=True)
        self._thread.start()
        if not self._ready.wait(CONNECT_TIMEOUT_S):
            raise OSError(errno.ETIMEDOUT, f"no stripefs session with {meta} after {CONNECT_TIMEOUT_S:.0f} s")
        if self._error is not None:
            if isinstance(self._error, FsError):
                raise _oserror(self._error) from self._error
            raise self._error

    def _run(self, meta: str, credentials: str, options: dict) -> None:
        async def main() -> None:
            async with open_client(meta, load_credentials(credentials), **options) as client:
                self.client = client
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self._ready.set()
                await self._stop.wait()

        try:
            trio.run(main)
        except BaseException as exc:  # handed to the constructor, or ends the session
            self._error = exc
        finally:
            self.client = None
            self._ready.set()

    def call(self, fn: Callable, *args: Any) -> Any:
        client = self.client
        if client is None:
            raise OSError(errno.ENOTCONN, f"the stripefs session ended: {self._error!r}")
        return trio.from_thread.run(fn, client, *args, trio_token=self._token)

    def close(self) -> None:
        if self._stop is None or self.client is None or os.getpid() != self.pid:
            return
        try:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        except trio.RunFinishedError:
            return
        self._thread.join(CLOSE_TIMEOUT_S)


class StripeFileSystem(AbstractFileSystem):
    """The `stripefs://` protocol. Paths inside it are absolute (`/dir/file`)."""

    protocol = PROTOCOL
    root_marker = "/"

    def __init__(self, meta: Optional[str] = None, credentials: Optional[str] = None, *,
                 writeback_bytes: Optional[int] = None, cache_bytes: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        meta = meta or os.environ.get(META_ENV)
        if not meta:
            raise ValueError(f"stripefs: no metaservers (a stripefs://HOST:PORT/ URL, meta=, or ${META_ENV})")
        credentials = credentials or os.environ.get(CREDENTIALS_ENV)
        if not credentials:
            raise ValueError(f"stripefs: no credential bundle (credentials=DIR or ${CREDENTIALS_ENV})")
        self.meta = meta
        self.credentials = credentials
        self._options = {k: v for k, v in (("writeback_bytes", writeback_bytes), ("cache_bytes", cache_bytes))
                         if v is not None}
        self._portal: Optional[_Portal] = None
        self._portal_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def _call(self, fn: Callable, *args: Any, path: Any = None) -> Any:
        """fn(client, *args) on this filesystem's session; FsError becomes OSError."""
        portal = self._portal
        if portal is None or portal.pid != os.getpid():
            with self._portal_lock:
                portal = self._portal
                if portal is None or portal.pid != os.getpid():
                    portal = self._portal = _Portal(self.meta, self.credentials, self._options)
                    weakref.finalize(self, portal.close)
        try:
            return portal.call(fn, *args)
        except FsError as exc:
            raise _oserror(exc, path) from None

    def close_session(self) -> None:
        """End this filesystem's session now (it ends by itself when the object goes or the
        program exits; a later call opens a new one)."""
        with self._portal_lock:
            portal, self._portal = self._portal, None
        if portal is not None:
            portal.close()

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return paths.normalize(paths.split_url(str(path))[1])

    @staticmethod
    def _get_kwargs_from_urls(path):
        hosts = paths.split_url(str(path))[0]
        return {"meta": hosts} if hosts else {}

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self.meta}{self._strip_protocol(name)}"

    def _info_of(self, path: str, attr) -> dict:
        kind = "directory" if stat.S_ISDIR(attr.mode) else "file" if stat.S_ISREG(attr.mode) else "other"
        return {
            "name": path, "size": attr.size, "type": kind, "mode": attr.mode, "ino": attr.ino,
            "nlink": attr.nlink, "uid": attr.uid, "gid": attr.gid, "mtime": attr.mtime_ns / 1e9,
            "ctime": attr.ctime_ns / 1e9, "islink": stat.S_ISLNK(attr.mode),
        }

    # ------------------------------------------------------------------ reading the tree

    def info(self, path, **kwargs) -> dict:
        """stat, following symbolic links, with the inode's labels (`user.*` xattrs, without
        the prefix) under "labels"."""
        path = self._strip_protocol(path)

        async def go(client):
            attr = await paths.resolve(client, path)
            return attr, (await paths.labels(client, attr.ino) if attr.xattrs else {})

        attr, labels = self._call(go, path=path)
        out = self._info_of(path, attr)
        out["labels"] = labels
        return out

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)

        async def go(client):  # one walk to the path, then the listing by inode
            attr = await paths.resolve(client, path)
            return attr, (await client.listdir(attr.ino) if stat.S_ISDIR(attr.mode) else None)

        attr, listed = self._call(go, path=path)
        if listed is None:
            entries = [self._info_of(path, attr)]
        else:
            entries = [self._info_of(posixpath.join(path, os.fsdecode(e.name)), e.attr) for e in listed]
        return entries if detail else [e["name"] for e in entries]

    def exists(self, path, **kwargs) -> bool:
        path = self._strip_protocol(path)
        return self._call(paths.exists, path, path=path)

    def modified(self, path) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], tz=datetime.timezone.utc)

    def created(self, path) -> datetime.datetime:
        """POSIX keeps no creation time: the inode's last change is the nearest."""
        return datetime.datetime.fromtimestamp(self.info(path)["ctime"], tz=datetime.timezone.utc)

    def du(self, path, total=True, maxdepth=None, withdirs=False, **kwargs):
        """Bytes under `path`: the total comes from the metaserver's directory usage
        counters in one call (fsspec's own walks the tree); per-entry sizes, a depth limit
        or directories' own entries are fsspec's walk."""
        if not (total and maxdepth is None and not withdirs):
            return super().du(path, total=total, maxdepth=maxdepth, withdirs=withdirs, **kwargs)
        path = self._strip_protocol(path)
        return self._call(paths.usage, path, path=path).bytes

    # ------------------------------------------------------------------ changing the tree

    def mkdir(self, path, create_parents=True, **kwargs) -> None:
        path = self._strip_protocol(path)
        if create_parents:
            self._call(paths.makedirs, path, 0o777, path=path)
            return

        async def one(client):
            parent, name = await paths.resolve_parent(client, path)
            await client.mkdir(parent.ino, name, 0o777, None)

        self._call(one, path=path)

    def makedirs(self, path, exist_ok=False) -> None:
        path = self._strip_protocol(path)

        async def go(client):
            await paths.makedirs(client, path, 0o777, exist_ok=exist_ok)

        self._call(go, path=path)

    def rmdir(self, path) -> None:
        path = self._strip_protocol(path)

        async def go(client):
            parent, name = await paths.resolve_parent(client, path)
            await client.rmdir(parent.ino, name)

        self._call(go, path=path)

    def rm_file(self, path) -> None:
        path = self._strip_protocol(path)

        async def go(client):
            parent, name = await paths.resolve_parent(client, path)
            await client.unlink(parent.ino, name)

        self._call(go, path=path)

    def _rm(self, path) -> None:
        self.rm_file(path)

    def rm(self, path, recursive=False, maxdepth=None) -> None:
        """rm [-r] of each path (globs expanded); a directory without `recursive` must be
        empty (ENOTEMPTY otherwise)."""
        if maxdepth is not None:
            return super().rm(path, recursive=recursive, maxdepth=maxdepth)
        targets: list[str] = []
        for p in path if isinstance(path, list) else [path]:
            p = self._strip_protocol(p)
            targets.extend(self.glob(p) if has_magic(p) else [p])
        for p in targets:
            self._call(lambda client, p=p: paths.remove(client, p, recursive=recursive), path=p)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs) -> None:
        """rename(2), atomic; into `path2` when it is an existing directory (shutil.move's
        rule). Lists and globs go through fsspec's copy and delete."""
        if isinstance(path1, list) or isinstance(path2, list) or has_magic(str(path1)):
            return super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)

        async def go(client):
            target = dst
            try:
                if stat.S_ISDIR((await paths.resolve(client, dst)).mode) and dst != src:
                    target = posixpath.join(dst, posixpath.basename(src))
            except FsError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
            await paths.rename(client, src, target)

        self._call(go, path=src)

    def cp_file(self, path1, path2, **kwargs) -> None:
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
        self._call(paths.copy_file, src, dst, path=src)

    def touch(self, path, truncate=True, **kwargs) -> None:
        path = self._strip_protocol(path)

        async def go(client):
            if truncate or not await paths.exists(client, path):
                await paths.write_file(client, path, b"")
            else:
                attr = await paths.resolve(client, path)
                await client.setattr(attr.ino, None, atime_now=True, mtime_now=True)

        self._call(go, path=path)

    def setxattr(self, path, name: str, value: str | bytes) -> None:
        """Set an extended attribute (a label: `user.KEY`)."""
        path = self._strip_protocol(path)
        raw = value.encode() if isinstance(value, str) else value

        async def go(client):
            await client.setxattr((await paths.resolve(client, path)).ino, name.encode(), raw)

        self._call(go, path=path)

    def getxattr(self, path, name: str) -> bytes:
        path = self._strip_protocol(path)

        async def go(client):
            return await client.getxattr((await paths.resolve(client, path)).ino, name.encode())

        return self._call(go, path=path)

    # ------------------------------------------------------------------ whole files and ranges

    def cat_file(self, path, start=None, end=None, **kwargs) -> bytes:
        path = self._strip_protocol(path)

        async def go(client):
            fh, attr = await paths.open_file(client, path, os.O_RDONLY)
            try:
                lo, hi = _range(attr.size, start, end)
                return await paths.read_range(client, fh, lo, hi)
            finally:
                await client.release(fh)

        return self._call(go, path=path)

    def pipe_file(self, path, value, mode="overwrite", **kwargs) -> None:
        path = self._strip_protocol(path)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if mode == "create" else os.O_TRUNC)

        async def go(client):
            fh, _ = await paths.open_file(client, path, flags)
            try:
                if value:
                    await client.write(fh, 0, bytes(value))
            finally:
                await paths.close_file(client, fh)

        self._call(go, path=path)

    def cat_ranges(self, paths_, starts, ends, max_gap=None, on_error="return", **kwargs) -> list:
        """Several ranges at once, all in flight together (one open per file)."""
        names = [self._strip_protocol(p) for p in paths_]
        starts = starts if isinstance(starts, list) else [starts] * len(names)
        ends = ends if isinstance(ends, list) else [ends] * len(names)
        if not len(names) == len(starts) == len(ends):
            raise ValueError("cat_ranges: paths, starts and ends differ in length")
        out: list = [None] * len(names)

        async def go(client):
            opened: dict[str, Any] = {}  # path -> (handle, attributes) or its OSError

            async def open_one(name: str) -> None:
                try:
                    opened[name] = await paths.open_file(client, name, os.O_RDONLY)
                except FsError as exc:
                    opened[name] = _oserror(exc, name)

            async def read_one(i: int) -> None:
                got = opened[names[i]]
                if isinstance(got, OSError):
                    out[i] = got
                    return
                fh, attr = got
                try:
                    out[i] = await paths.read_range(client, fh, *_range(attr.size, starts[i], ends[i]))
                except FsError as exc:
                    out[i] = _oserror(exc, names[i])

            try:
                async with trio.open_nursery() as nursery:
                    for name in set(names):
                        nursery.start_soon(open_one, name)
                async with trio.open_nursery() as nursery:
                    for i in range(len(names)):
                        nursery.start_soon(read_one, i)
            finally:
                for got in opened.values():
                    if not isinstance(got, OSError):
                        await client.release(got[0])

        self._call(go)
        if on_error == "raise":
            for value in out:
                if isinstance(value, Exception):
                    raise value
        return out

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        return StripeFile(self, self._strip_protocol(path), mode, block_size=block_size,
                          autocommit=autocommit, cache_options=cache_options, **kwargs)


def _range(size: int, start: Optional[int], end: Optional[int]) -> tuple[int, int]:
    """[start, end) of a file of `size` bytes by fsspec's rules: None is an end of the
    file, a negative value counts from its end."""
    lo = 0 if start is None else (max(size + start, 0) if start < 0 else min(start, size))
    hi = size if end is None else (max(size + end, 0) if end < 0 else min(end, size))
    return lo, max(lo, hi)


class StripeFile(AbstractBufferedFile):
    """A file opened through the filesystem: one open handle of the client for its whole
    life (the file is opened, created or truncated when this object is made, as open(2)
    does); reads fetch ranges through it, writes go to it a buffer at a time, close is the
    library's close (committed on all replicas on return)."""

    def __init__(self, fs: StripeFileSystem, path: str, mode: str = "rb", **kwargs: Any) -> None:
        flags = {"rb": os.O_RDONLY, "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                 "ab": os.O_WRONLY | os.O_CREAT, "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL}.get(mode)
        if flags is None:
            raise NotImplementedError(f"stripefs: file mode {mode!r} (rb, wb, ab, xb)")
        self.fh, attr = fs._call(paths.open_file, path, flags, path=path)
        try:
            super().__init__(fs, path, mode, size=attr.size if mode == "rb" else None, **kwargs)
        except BaseException:
            fs._call(lambda client: client.release(self.fh))
            raise
        if mode == "ab":
            self.offset = self.loc = attr.size

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs._call(paths.read_range, self.fh, start, min(end, self.size), path=self.path)

    def _initiate_upload(self) -> None:
        """The file was opened (created, truncated) when this object was made."""

    def _upload_chunk(self, final: bool = False) -> bool:
        data = self.buffer.getvalue()

        async def go(client):
            if data:
                await client.write(self.fh, self.offset, data)
            if final:
                await client.flush(self.fh)

        self.fs._call(go, path=self.path)
        return True

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
        finally:
            fh, self.fh = self.fh, None
            if fh is not None:
                self.fs._call(lambda client: client.release(fh), path=self.path)
