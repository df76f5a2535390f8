"""The work behind `stripefs du`, `info`, `cp` and `top` (fs/cli.py parses and shows):
where a path argument lives (in a FUSE mount of a cluster, a `stripefs:` URL, a local
file), what the client library says about it, copies in parallel, and operation rates
between two scrapes of the roles' metrics.

Everything here goes through the library (fs/client, fs/client/paths.py), never through
a mount: a path inside a mount only says which cluster and which path in it. `warmup` is
the exception: it fills a mount's own caches, so it reads through that mount.
"""

from __future__ import annotations

import datetime
import errno
import os
import posixpath
import re
import stat
import time
import urllib.error
import urllib.request
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import trio

from stripefs.client import Client, Credentials, FsError, open_client
from stripefs.client import paths
from stripefs.proto import messages as m
from stripefs.proto.errors import errno_name
from stripefs.proto.rpc import parse_addresses

#: /proc/self/mountinfo's file system type and source of a stripefs mount (fs/fuse/mount.py).
MOUNT_FSTYPE = "fuse.stripefs"
SOURCE_PREFIX = paths.URL_SCHEME + ":"
#: Files `stripefs cp` copies at once, by default.
DEFAULT_COPY_JOBS = 8
#: Files `stripefs warmup` reads at once, by default, and the size of each read.
DEFAULT_WARMUP_JOBS = 8
WARMUP_READ_BYTES = 4 * 1024 * 1024
#: How long one metrics scrape may take.
SCRAPE_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------- where a path is


@dataclass(frozen=True)
class Place:
    """What a path argument names: a path on a cluster (`meta` set) or a local path."""

    arg: str  # as the user wrote it (what messages show)
    path: str  # on the cluster: normalized, from its root; here: as given
    meta: Optional[str] = None  # the cluster's metaservers, HOST:PORT[,HOST:PORT...]; None: local

    @property
    def local(self) -> bool:
        return self.meta is None

    def child(self, rel: str) -> "Place":
        """`rel` (a relative `/`-separated path) under this place."""
        join = os.path.join if self.local else posixpath.join
        return replace(self, arg=os.path.join(self.arg, rel), path=join(self.path, rel))


def _unescape(text: str) -> str:
    """mountinfo's fields with blanks, tabs, newlines and backslashes escaped as octal."""
    return re.sub(r"\\([0-7]{3})", lambda mo: chr(int(mo.group(1), 8)), text)


def stripefs_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, metaservers) of every stripefs FUSE mount here, deepest first."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 3:
            continue
        fstype, source = fields[sep + 1], _unescape(fields[sep + 2])
        if fstype == MOUNT_FSTYPE and source.startswith(SOURCE_PREFIX):
            out.append((_unescape(fields[4]), source[len(SOURCE_PREFIX):]))
    return sorted(out, key=lambda mount: len(mount[0]), reverse=True)


def mount_of(path: str, mounts: Optional[list[tuple[str, str]]] = None) -> Optional[tuple[str, str, str]]:
    """(mount point, its metaservers, the path as found under it: absolute, or with its
    links resolved) of the stripefs mount `path` is inside, or None."""
    absolute = os.path.abspath(path)
    found = mounts if mounts is not None else stripefs_mounts()
    for candidate in (absolute, os.path.realpath(absolute)):
        for point, meta in found:
            if candidate == point or candidate.startswith(point.rstrip("/") + "/"):
                return point, meta, candidate
    return None


def place_of(arg: str, default_meta: Callable[[], str], *, bare_is_cluster: bool,
             mounts: Optional[list[tuple[str, str]]] = None) -> Place:
    """`stripefs://HOSTS/path` (HOSTS empty: the default cluster), `stripefs:/path` (the
    default cluster), a path inside a stripefs mount (its cluster), else a cluster path of
    the default cluster (`bare_is_cluster`) or a local path. `default_meta` is asked only
    when the default cluster is named."""
    if arg.startswith(SOURCE_PREFIX):
        hosts, path = paths.split_url(arg)
        if path == arg:  # stripefs:/path
            path = arg[len(SOURCE_PREFIX):]
        return Place(arg, paths.normalize(path), hosts or default_meta())
    found = mount_of(arg, mounts)
    if found is not None:
        point, meta, candidate = found
        return Place(arg, paths.normalize(candidate[len(point):]), meta)
    if bare_is_cluster:
        return Place(arg, paths.normalize(arg), default_meta())
    return Place(arg, arg)


class Clients:
    """One library session per cluster named, opened on first use, closed with `stack`."""

    def __init__(self, stack: AsyncExitStack, credentials: Callable[[], Credentials]) -> None:
        self._stack = stack
        self._credentials = credentials
        self._open: dict[str, Client] = {}
        self._lock = trio.Lock()

    async def get(self, meta: str) -> Client:
        key = ",".join(parse_addresses(meta))  # ValueError: not HOST:PORT[,...]
        async with self._lock:
            if key not in self._open:
                self._open[key] = await self._stack.enter_async_context(open_client(key, self._credentials()))
            return self._open[key]


def errno_text(exc: BaseException) -> str:
    """`No such file or directory [ENOENT]` of an FsError or OSError; str() of others."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} [{errno_name(code)}]"
    return str(exc)


def _fs_error(exc: OSError) -> FsError:
    return FsError(exc.errno or errno.EIO, exc.strerror or str(exc))


# ---------------------------------------------------------------------------- du and info


def usage_dict(u: m.UsageReply) -> dict[str, int]:
    return {"bytes": u.bytes, "files": u.files, "dirs": u.dirs}


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket", stat.S_IFCHR: "char device", stat.S_IFBLK: "block device"}


def kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "unknown")


def when(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="seconds")


async def info(client: Client, path: str) -> dict[str, Any]:
    """What `stripefs info` shows of one path (symbolic links followed): the inode, its
    labels, and a file's blocks with each replica's server and state, or a directory's usage."""
    attr = await paths.resolve(client, path)
    out: dict[str, Any] = {"path": path}
    reply = await client.block_map(attr.ino) if stat.S_ISREG(attr.mode) else None
    if reply is not None:
        attr = reply.attr
    out.update({
        "ino": attr.ino, "type": kind_of(attr.mode), "mode": f"{stat.S_IMODE(attr.mode):04o}", "uid": attr.uid,
        "gid": attr.gid, "nlink": attr.nlink, "size": attr.size, "block_size": attr.block_size,
        "replicas": attr.replicas, "inline_max": attr.inline_max, "generation": attr.generation,
        "atime_ns": attr.atime_ns, "mtime_ns": attr.mtime_ns, "ctime_ns": attr.ctime_ns,
        "labels": await paths.labels(client, attr.ino) if attr.xattrs else {},
    })
    if stat.S_ISDIR(attr.mode):
        out["usage"] = usage_dict(await client.usage(attr.ino))
    if reply is not None:
        states = {s.address: s.state for s in (await client.status()).servers}
        out["inline"] = reply.inline
        out["blocks"] = [
            {"index": b.index, "block_id": b.block_id, "length": b.length,
             "replicas": [{"address": a, "state": states.get(a, "unknown")} for a in b.servers]}
            for b in sorted(reply.blocks, key=lambda b: b.index)
        ]
    return out


# ---------------------------------------------------------------------------- cp


@dataclass
class CopyReport:
    files: int = 0  # files copied whole
    bytes: int = 0  # bytes copied (of every file, including those that failed midway)
    seconds: float = 0.0
    failed: list[dict[str, Optional[str]]] = field(default_factory=list)  # {"src", "dst", "error"}

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "seconds": round(self.seconds, 3), "failed": self.failed}


@dataclass
class _Node:
    kind: str  # "file", "directory", "symlink" or another kind_of()
    size: int = 0
    mode: int = 0o644
    target: str = ""  # symlinks


class _Copier:
    """cp SRC... DST over the library: the plan first (what is where), then directories
    and symbolic links, then the files, `jobs` of them at a time."""

    def __init__(self, clients: Clients, *, recursive: bool, jobs: int,
                 on_plan: Callable[[int, int], None], on_bytes: Callable[[int], None],
                 on_error: Callable[[str], None]) -> None:
        self.clients = clients
        self.recursive = recursive
        self.jobs = max(1, jobs)
        self.on_plan, self.on_bytes, self.on_error = on_plan, on_bytes, on_error
        self.report = CopyReport()
        self.dirs: list[tuple[Place, int]] = []
        self.links: list[tuple[Place, Place, str]] = []
        self.files: list[tuple[Place, Place, _Node]] = []

    def fail(self, src: Optional[Place], dst: Optional[Place], exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else errno_text(exc)
        who = " -> ".join(p.arg for p in (src, dst) if p is not None)
        self.report.failed.append({"src": src.arg if src else None, "dst": dst.arg if dst else None, "error": text})
        self.on_error(f"{who}: {text}")

    async def node(self, place: Place, *, follow: bool = True) -> _Node:
        """FsError(ENOENT, ...) if nothing is there."""
        if place.local:
            try:
                st = await trio.to_thread.run_sync(os.stat if follow else os.lstat, place.path)
            except OSError as exc:
                raise _fs_error(exc) from None
            mode, size = st.st_mode, st.st_size
        else:
            client = await self.clients.get(place.meta or "")
            attr = await paths.resolve(client, place.path, follow=follow)
            mode, size = attr.mode, attr.size
        return _Node(kind_of(mode), size, stat.S_IMODE(mode))

    async def run(self, sources: list[Place], dst: Place) -> CopyReport:
        started = time.monotonic()
        try:
            target = await self.node(dst)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise FsError(exc.errno, f"{dst.arg}: {errno_text(exc)}") from None
            target = None
        into = target is not None and target.kind == "directory"
        if len(sources) > 1 and not into:
            raise FsError(errno.ENOTDIR, f"{dst.arg} is not a directory (copying several sources needs one)")
        for src in sources:
            try:
                await self.plan(src, dst.child(_basename(src)) if into else dst)
            except (FsError, ValueError) as exc:
                self.fail(src, None, exc)
        await self.make_tree()
        self.on_plan(len(self.files), sum(node.size for _, _, node in self.files))
        send, receive = trio.open_memory_channel[tuple[Place, Place, _Node]](len(self.files))
        for item in self.files:
            send.send_nowait(item)
        send.close()
        async with trio.open_nursery() as nursery:
            for _ in range(min(self.jobs, len(self.files))):
                nursery.start_soon(self.worker, receive.clone())
        self.report.seconds = time.monotonic() - started
        return self.report

    async def plan(self, src: Place, dst: Place) -> None:
        node = await self.node(src)
        if node.kind == "file":
            self.files.append((src, dst, node))
            return
        if node.kind != "directory":
            self.fail(src, None, f"not a regular file or a directory ({node.kind}): not copied")
            return
        if not self.recursive:
            self.fail(src, None, "is a directory: not copied (use -r)")
            return
        self.dirs.append((dst, node.mode))
        if src.local:
            await trio.to_thread.run_sync(self._plan_local_tree, src, dst)
        else:
            client = await self.clients.get(src.meta or "")
            async for top, entries in paths.walk(client, src.path):
                rel = posixpath.relpath(top, src.path)
                for e in entries:
                    name = os.fsdecode(e.name)
                    sub = name if rel == "." else posixpath.join(rel, name)
                    target = os.fsdecode(await client.readlink(e.attr.ino)) if stat.S_ISLNK(e.attr.mode) else ""
                    self._add(src, dst, sub, e.attr.mode, e.attr.size, target)

    def _add(self, src: Place, dst: Place, sub: str, mode: int, size: int, target: str) -> None:
        """Entry `sub` of a directory being copied, into the plan by its type (`target`: a
        symbolic link's)."""
        if stat.S_ISDIR(mode):
            self.dirs.append((dst.child(sub), stat.S_IMODE(mode)))
        elif stat.S_ISLNK(mode):
            self.links.append((src.child(sub), dst.child(sub), target))
        elif stat.S_ISREG(mode):
            self.files.append((src.child(sub), dst.child(sub), _Node("file", size, stat.S_IMODE(mode))))
        else:
            self.fail(src.child(sub), None, f"not a regular file or a directory ({kind_of(mode)}): not copied")

    def _plan_local_tree(self, src: Place, dst: Place) -> None:
        """(on a thread) every entry under a local directory; links are not followed."""
        for top, dirnames, filenames in os.walk(src.path, onerror=lambda exc: self.fail(src, None, exc)):
            rel = os.path.relpath(top, src.path)
            for name in dirnames + filenames:
                sub = name if rel == "." else os.path.join(rel, name)
                path = os.path.join(top, name)
                try:
                    st = os.lstat(path)
                    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
                    self._add(src, dst, sub, st.st_mode, st.st_size, target)
                except OSError as exc:
                    self.fail(src.child(sub), None, exc)

    async def make_tree(self) -> None:
        """The directories (parents first: the order of the plan), then the symbolic links."""
        for place, mode in self.dirs:
            try:
                if place.local:
                    await trio.to_thread.run_sync(lambda: os.makedirs(place.path, mode | 0o700, exist_ok=True))
                else:
                    await paths.makedirs(await self.clients.get(place.meta or ""), place.path, mode | 0o700)
            except (FsError, OSError) as exc:
                self.fail(None, place, exc)
        for src, dst, target in self.links:
            try:
                if dst.local:
                    await trio.to_thread.run_sync(os.symlink, target, dst.path)
                else:
                    client = await self.clients.get(dst.meta or "")
                    parent, name = await paths.resolve_parent(client, dst.path)
                    await client.symlink(parent.ino, name, os.fsencode(target), None)
            except (FsError, OSError) as exc:
                self.fail(src, dst, exc)

    async def worker(self, receive: trio.MemoryReceiveChannel) -> None:
        async with receive:
            async for src, dst, node in receive:
                try:
                    await self.copy_file(src, dst, node.mode)
                    self.report.files += 1
                except (FsError, OSError) as exc:
                    self.fail(src, dst, exc)

    async def copy_file(self, src: Place, dst: Place, mode: int) -> None:
        """One file, COPY_CHUNK_BYTES at a time (never whole in memory)."""
        read, close_reader = await self._reader(src)
        try:
            write, close_writer = await self._writer(dst, mode)
            try:
                offset = 0
                while True:
                    chunk = await read(offset, paths.COPY_CHUNK_BYTES)
                    if not chunk:
                        break
                    await write(offset, chunk)
                    offset += len(chunk)
                    self.report.bytes += len(chunk)
                    self.on_bytes(len(chunk))
            finally:
                await close_writer()
        finally:
            await close_reader()

    async def _reader(self, place: Place):
        if place.local:
            fd = await trio.to_thread.run_sync(os.open, place.path, os.O_RDONLY)

            async def read_local(offset: int, size: int) -> bytes:
                return await trio.to_thread.run_sync(os.pread, fd, size, offset)

            return read_local, lambda: trio.to_thread.run_sync(os.close, fd)
        client = await self.clients.get(place.meta or "")
        fh, _ = await paths.open_file(client, place.path, os.O_RDONLY)

        async def read_remote(offset: int, size: int) -> bytes:
            return await client.read(fh, offset, size)

        return read_remote, lambda: client.release(fh)

    async def _writer(self, place: Place, mode: int):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if place.local:
            fd = await trio.to_thread.run_sync(os.open, place.path, flags, mode)

            def write_all(offset: int, data: bytes) -> None:
                view = memoryview(data)
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n

            async def write_local(offset: int, data: bytes) -> None:
                await trio.to_thread.run_sync(write_all, offset, data)

            return write_local, lambda: trio.to_thread.run_sync(os.close, fd)
        client = await self.clients.get(place.meta or "")
        fh, _ = await paths.open_file(client, place.path, flags, mode)

        async def write_remote(offset: int, data: bytes) -> None:
            await client.write(fh, offset, data)

        return write_remote, lambda: paths.close_file(client, fh)


def _basename(place: Place) -> str:
    if place.local:
        return os.path.basename(os.path.normpath(os.path.abspath(place.path)))
    return posixpath.basename(place.path)


async def copy(clients: Clients, sources: list[Place], dst: Place, *, recursive: bool = False,
               jobs: int = DEFAULT_COPY_JOBS, on_plan: Callable[[int, int], None] = lambda files, size: None,
               on_bytes: Callable[[int], None] = lambda n: None,
               on_error: Callable[[str], None] = lambda text: None) -> CopyReport:
    """cp [-r] SRC... DST: DST an existing directory means into it. Every source that
    fails is in the report's `failed` (and told to on_error) while the others go on;
    FsError only if DST cannot take several sources."""
    copier = _Copier(clients, recursive=recursive, jobs=jobs, on_plan=on_plan, on_bytes=on_bytes, on_error=on_error)
    return await copier.run(sources, dst)


# ---------------------------------------------------------------------------- top

Samples = dict[tuple[str, frozenset], float]


def scrape(address: str, timeout: float = SCRAPE_TIMEOUT_S) -> Samples:
    """Every sample of a role's Prometheus endpoint (HOST:PORT or a URL); OSError or
    ValueError when it cannot be had."""
    from prometheus_client.parser import text_string_to_metric_families

    url = address if "://" in address else f"http://{address}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode()
    except urllib.error.URLError as exc:  # its reason says more than its str
        raise OSError(f"{url}: {exc.reason}") from None
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _by(samples: Samples, name: str, keys: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            d = dict(labels)
            key = tuple(d.get(k, "") for k in keys)
            out[key] = out.get(key, 0.0) + v
    return out


#: (kind, calls counter, latency histogram, the labels that name a row)
_OPS = (
    ("rpc", "stripefs_rpc_requests_total", "stripefs_rpc_seconds", ("service", "method")),
    ("fuse", "stripefs_fuse_ops_total", "stripefs_fuse_op_seconds", ("op",)),
    ("meta-call", "stripefs_client_meta_calls_total", "stripefs_client_meta_call_seconds", ("method",)),
)
_READ = ("stripefs_client_read_bytes_total", "stripefs_data_read_bytes_total")
_WRITTEN = ("stripefs_client_written_bytes_total", "stripefs_data_written_bytes_total")


def rates(before: Samples, after: Samples, seconds: float) -> dict[str, Any]:
    """Operation rates of one role between two scrapes `seconds` apart: per RPC method,
    FUSE operation and client metadata call (ops/s, errors/s, mean latency from the
    histogram's sum and count), bytes/s read and written, the block cache's hit ratio."""
    def delta(a: float, b: float) -> float:
        return max(0.0, b - a)  # a counter that went back: the process restarted

    seconds = max(seconds, 1e-9)
    ops: list[dict[str, Any]] = []
    for kind, calls, hist, keys in _OPS:
        b_calls, a_calls = _by(before, calls, keys + ("result",)), _by(after, calls, keys + ("result",))
        b_sum, a_sum = _by(before, hist + "_sum", keys), _by(after, hist + "_sum", keys)
        b_count, a_count = _by(before, hist + "_count", keys), _by(after, hist + "_count", keys)
        totals: dict[tuple[str, ...], list[float]] = {}
        for key, v in a_calls.items():
            d = delta(b_calls.get(key, 0.0), v)
            row = totals.setdefault(key[:-1], [0.0, 0.0])
            row[0] += d
            if key[-1] != "ok":
                row[1] += d
        for key, (n, errors) in sorted(totals.items()):
            if n <= 0:
                continue
            count = delta(b_count.get(key, 0.0), a_count.get(key, 0.0))
            total_s = delta(b_sum.get(key, 0.0), a_sum.get(key, 0.0))
            ops.append({"kind": kind, "name": ".".join(k for k in key if k), "ops_per_s": round(n / seconds, 3),
                        "errors_per_s": round(errors / seconds, 3),
                        "mean_ms": round(total_s / count * 1000, 3) if count > 0 else None})
    ops.sort(key=lambda row: -float(row["ops_per_s"]))

    def total(samples: Samples, names: tuple[str, ...]) -> float:
        return sum(v for (n, _), v in samples.items() if n in names)

    hits = delta(total(before, ("stripefs_client_block_cache_hits_total",)),
                 total(after, ("stripefs_client_block_cache_hits_total",)))
    misses = delta(total(before, ("stripefs_client_block_cache_misses_total",)),
                   total(after, ("stripefs_client_block_cache_misses_total",)))
    return {
        "ops": ops,
        "read_bytes_per_s": round(delta(total(before, _READ), total(after, _READ)) / seconds, 1),
        "written_bytes_per_s": round(delta(total(before, _WRITTEN), total(after, _WRITTEN)) / seconds, 1),
        "cache_hit_ratio": round(hits / (hits + misses), 4) if hits + misses > 0 else None,
    }


# ---------------------------------------------------------------------------- warmup


@dataclass
class WarmupReport:
    files: int = 0  # files read whole
    bytes: int = 0
    seconds: float = 0.0
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path", "error"}
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)  # mount point -> its .stripefs/cache

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "seconds": round(self.seconds, 3), "failed": self.failed,
                "tiers": self.tiers}


def tier_counters(mount: str) -> dict[str, int]:
    """A mount's `.stripefs/cache` counters (fs/fuse/control.py)."""
    out = {}
    with open(os.path.join(mount, ".stripefs", "cache")) as f:
        for line in f:
            name, _, value = line.partition(" ")
            out[name] = int(value)
    return out


def warmup(args: list[str], jobs: int = DEFAULT_WARMUP_JOBS, *, on_plan: Callable[[int, int], None] = lambda f, b: None,
           on_bytes: Callable[[int], None] = lambda n: None, on_error: Callable[[str], None] = lambda t: None,
           ) -> WarmupReport:
    """Read every file under `args` (paths inside stripefs mounts) through its mount, `jobs`
    at once, so that the mount's caches (its disk tier, `--cache-dir`) hold their blocks;
    each file's pages are dropped from the kernel's cache after it is read (the point is
    the mount's tier, not this machine's memory). ValueError for a path outside a mount."""
    import concurrent.futures

    report = WarmupReport()
    mounts = stripefs_mounts()
    files: list[tuple[str, int]] = []
    for arg in args:
        found = mount_of(arg, mounts)
        if found is None:
            raise ValueError(f"{arg} is not inside a stripefs mount")
        point = found[0]
        report.tiers.setdefault(point, {})
        try:
            st = os.stat(arg)
        except OSError as exc:
            report.failed.append({"path": arg, "error": errno_text(exc)})
            on_error(f"{arg}: {errno_text(exc)}")
            continue
        if stat.S_ISREG(st.st_mode):
            files.append((arg, st.st_size))
            continue
        for top, dirs, names in os.walk(arg, onerror=lambda exc: on_error(f"{exc.filename}: {errno_text(exc)}")):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(top, name)
                try:
                    st = os.lstat(path)
                except OSError as exc:
                    on_error(f"{path}: {errno_text(exc)}")
                    continue
                if stat.S_ISREG(st.st_mode):
                    files.append((path, st.st_size))
    on_plan(len(files), sum(size for _, size in files))

    def read(path: str) -> int:
        done = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while chunk := os.read(fd, WARMUP_READ_BYTES):
                done += len(chunk)
                on_bytes(len(chunk))
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return done

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(read, path): path for path, _ in files}
        for future in concurrent.futures.as_completed(futures):
            try:
                report.bytes += future.result()
                report.files += 1
            except OSError as exc:
                report.failed.append({"path": futures[future], "error": errno_text(exc)})
                on_error(f"{futures[future]}: {errno_text(exc)}")
    report.seconds = time.monotonic() - t0
    for point in report.tiers:
        try:
            report.tiers[point] = tier_counters(point)
        except (OSError, ValueError):
            report.tiers[point] = {}
    return report
