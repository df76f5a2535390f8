"""Checkpoints through tiers: files created in an asynchronous checkpoint directory are
written to the client's local disk and uploaded in the background; a checkpoint
directory gets its success marker once everything under it is durable.

A directory whose `stripefs.checkpoint` attribute is `async` (subdirectories made in it
inherit it) stages the files created in it, when the creating client has a staging area
(its disk tier's directory, `DIR/stage`; without one, such files are written as anywhere
else):
- The create asks to stage (MknodReq.stage); the metaserver marks the file
  `stripefs.staged` in the create's transaction. The mark, not any client's memory, is
  what says a file is not whole yet, so a commit on any client sees it.
- Writes go to `DIR/stage/INO` (pwrite in a worker thread: the trio thread never waits
  for the disk); reads through this client come from it; fsync makes it durable on the
  local disk only. A writer waits while the staging area holds `limit_bytes` and uploads
  are under way to free it (the bound is exceeded only by files still open when it is
  reached). Each close reports the bytes staged on the mark.
- The last close records the file (`DIR/stage/INO.json`: size, mtime, the opener, the boot)
  and queues its upload: each block read back from the staged file and placed on its R
  servers through the write path (writer.py `place`), synced there, then one commit of
  the whole block map that also removes the mark (CommitReq.unstage). So other clients
  see the file as created (empty) until that commit, then whole; never a part of it.
  Until then the stager holds the file open in the session, as a handle of its own.
- An open for writing of a file whose upload is queued waits for the upload, then
  writes as anywhere else; a file stays staged only for the creating open and the opens
  that join it while it is still being written.
- A client that stops (SIGKILL) leaves the staged files and their records: the next
  client on the same directory uploads every recorded file, if the machine has not
  restarted since (the page cache had not yet written them to disk); after a restart
  they are discarded, as are files that were never closed: their marks stay, so no
  checkpoint holding them is ever committed (`setfattr -x stripefs.staged FILE` gives
  such a file up by hand).

Commit (Checkpoints below): `setxattr(DIR, "stripefs.checkpoint.commit")` on a checkpoint
directory creates `.MARKER.commit` in it at once (so permission errors come back to the
caller) and returns; this client then waits until no file under DIR is marked staged, on
any client, writes what the checkpoint holds into that file, syncs it and renames it to
the marker (`stripefs.checkpoint.marker`, default `_COMMITTED`): loading code that waits
for the marker never sees a part of a checkpoint. Then retention: a parent with
`stripefs.checkpoint.keep=K` keeps its newest K committed checkpoint directories (by
their markers' mtimes) and removes the older committed ones; uncommitted ones are left.
`stripefs.checkpoint.pending` reads the bytes staged under a directory, and
`stripefs.checkpoint.status` the whole state as JSON (`stripefs checkpoint wait` polls it).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import trio

from stripefs.proto import messages as m
from stripefs.proto.errors import FsError
from stripefs.proto.types import (
    CHECKPOINT_KEEP_XATTR,
    CHECKPOINT_MARKER_DEFAULT,
    CHECKPOINT_MARKER_XATTR,
    CHECKPOINT_XATTR,
    STAGED_XATTR,
)

from .files import FileState
from .together import at_once

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("stripefs.client")
T = TypeVar("T")

#: Virtual attributes of a checkpoint directory, answered by the client.
PENDING_XATTR = b"stripefs.checkpoint.pending"  # bytes staged under it, on any client
STATUS_XATTR = b"stripefs.checkpoint.status"  # JSON: pending bytes and files, committed, commit asked
COMMIT_XATTR = b"stripefs.checkpoint.commit"  # set (any value): write the marker once durable
VIRTUAL_CHECKPOINT_XATTRS = (PENDING_XATTR, STATUS_XATTR, COMMIT_XATTR)
#: Staged files uploaded at once (their blocks share the writer's upload slots).
UPLOADS_IN_FLIGHT = 4
#: Blocks allocated together for an upload (an allocation expires if unused for long).
UPLOAD_BATCH_BLOCKS = 16
#: Most blocks one commit takes (CommitReq): a larger staged file is committed in parts,
#: only the last one removing its mark.
COMMIT_MAX_BLOCKS = 4096
#: An upload that failed (no server could take a block, the metaserver away) is tried
#: again after this long, doubling up to UPLOAD_RETRY_MAX_S.
UPLOAD_RETRY_S = 1.0
#: How long a closed file's upload waits at most while other staged files of this client
#: are still being written: the upload's reads, checksums and sends would take the CPU
#: from those writers, whose closes the training waits for (a checkpoint's ranks close
#: together), while the upload gains little by starting a moment sooner.
UPLOAD_YIELD_S = 2.0
#: ... and until no staged file here has closed for this long: a checkpoint's last close is
#: followed by its commit (the marker asked for, rank 0's work), which the training also
#: waits for, and which the uploads' hashing would slow (they share the mount's GIL).
UPLOAD_QUIET_S = 0.25
UPLOAD_RETRY_MAX_S = 30.0
#: A commit waiting for staged files looks again after this long, doubling up to the max.
COMMIT_POLL_S = 0.05
COMMIT_POLL_MAX_S = 2.0


def boot_id() -> str:
    """This machine's boot: staged data written before a restart may not be on disk."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class Staged:
    """One staged file of this client."""

    ino: int
    fd: int
    opener: m.Ctx
    size: int = 0
    mtime_ns: int = 0
    reported: int = 0  # bytes last reported on the file's mark
    queued: bool = False  # closed: its upload is queued or under way
    uploaded: trio.Event = field(default_factory=trio.Event)
    #: The kernel reads and writes the local copy itself (the mount's FUSE passthrough):
    #: its size and mtime are the copy's, read by refresh().
    direct: bool = False
    seen_mtime_ns: int = 0  # the copy's mtime when refresh() last looked

    def refresh(self) -> None:
        """With direct writes, take the size and mtime from the local copy: an fstat of a
        file open here, which reads no disk (inode attributes are in memory)."""
        if not self.direct:
            return
        st = os.fstat(self.fd)
        self.size = st.st_size
        if st.st_mtime_ns != self.seen_mtime_ns:
            self.seen_mtime_ns = st.st_mtime_ns
            self.mtime_ns = max(self.mtime_ns, st.st_mtime_ns)


class Stager:
    """The staging area of one client (see the module docstring)."""

    def __init__(self, client: Client, directory: str | os.PathLike, limit_bytes: int) -> None:
        self.client = client
        self.directory = Path(directory)
        self.limit_bytes = limit_bytes
        self.uploaded_files = self.uploaded_bytes = self.failed_uploads = 0
        self.direct_files = 0  # files whose local copy the kernel wrote itself
        self.files: dict[int, FileState] = {}
        self._room = trio.Event()  # set when an upload frees room
        self._largest = 0  # bytes of the largest file closed here
        self._closed = trio.Event()  # set when a staged file is closed
        self._last_close = 0.0  # trio time of the last close of a staged file
        self._waiting_for_room = 0  # writers waiting for an upload to free room
        self._slots = trio.CapacityLimiter(UPLOADS_IN_FLIGHT)
        self._boot = boot_id()
        #: set once resume() has swept what a previous client left: a file staged before
        #: that would have no record yet and be swept with them.
        self._swept = trio.Event()
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def used_bytes(self) -> int:
        """Bytes of staged files on local disk."""
        total = 0
        for f in self.files.values():
            if f.stage is not None:
                f.stage.refresh()
                total += f.stage.size
        return total

    async def _wait_for_room(self, growth: int) -> None:
        """Wait while `growth` more bytes would pass the bound and uploads under way can
        free room (the bound is exceeded only by files still open when it is reached)."""
        while self.used_bytes + growth > self.limit_bytes and any(
                g.stage is not None and g.stage.queued for g in self.files.values()):
            self._waiting_for_room += 1
            try:
                await self._room.wait()
            finally:
                self._waiting_for_room -= 1

    def _data(self, ino: int) -> Path:
        return self.directory / str(ino)

    def _record(self, ino: int) -> Path:
        return self.directory / f"{ino}.json"

    # ------------------------------------------------------------------ writing

    async def begin(self, f: FileState, opener: m.Ctx) -> None:
        """The file `f`, just created and marked staged, is written here from now on; if
        the staging area cannot take it, its mark goes and it is written as anywhere else.
        A new file first waits for room for as many bytes as the largest file staged here
        so far (a checkpoint's shards are alike in size): one the kernel writes directly
        (`direct`) is not stopped once it is open, whatever it grows to. The first files
        of a new client wait until what a previous one left is swept (resume)."""
        await self._swept.wait()
        await self._wait_for_room(max(1, self._largest))
        try:
            fd = await trio.to_thread.run_sync(os.open, self._data(f.ino), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            log.warning("inode %d: not staged (%s): written to the data servers directly", f.ino, exc)
            await self.client._meta("commit_blocks", m.CommitReq(f.ino, self.client.session.id, [], 0,
                                                                 time.time_ns(), unstage=True))
            return
        f.stage = Staged(f.ino, fd, opener, mtime_ns=time.time_ns())
        f.handles += 1  # the stager's own hold, until the upload commits
        self.files[f.ino] = f

    async def write(self, f: FileState, offset: int, data: bytes | memoryview) -> int:
        s = f.stage
        assert s is not None
        await self._wait_for_room(max(0, offset + len(data) - s.size))
        n = await _local(os.pwrite, s.fd, data, offset)
        s.size = max(s.size, offset + n)
        f.size = s.size
        s.mtime_ns = f.mtime_ns = time.time_ns()
        return n

    async def read(self, f: FileState, offset: int, size: int) -> bytes:
        s = f.stage
        assert s is not None
        s.refresh()
        n = min(size, s.size - offset)
        return await _local(os.pread, s.fd, n, offset) if n > 0 else b""

    async def truncate(self, f: FileState, size: int) -> None:
        s = f.stage
        assert s is not None
        await _local(os.ftruncate, s.fd, size)
        s.size = f.size = size
        s.mtime_ns = f.mtime_ns = time.time_ns()

    async def fsync(self, f: FileState) -> None:
        """fsync of a staged file: durable on the local disk (the upload makes it durable
        on its servers; `stripefs checkpoint wait` waits for that)."""
        assert f.stage is not None
        await _local(os.fdatasync, f.stage.fd)

    async def _report(self, f: FileState) -> None:
        """The bytes staged are reported on the file's mark (what `stripefs.checkpoint.
        pending` sums on other clients): at the last close, before the upload is queued
        (which clears the mark), not at each close(2), which would wait for it."""
        s = f.stage
        assert s is not None
        if s.size == s.reported:
            return
        try:
            await self.client._meta("setxattr", m.XattrReq(f.ino, STAGED_XATTR, s.opener, str(s.size).encode()))
            s.reported = s.size
        except FsError as exc:  # (a file its owner made read-only: the mark stays, unsized)
            log.debug("inode %d: staged bytes not reported: %s", f.ino, exc)

    async def closed(self, f: FileState) -> None:
        """The last handle of a staged file closed: record it and queue its upload."""
        s = f.stage
        assert s is not None and not s.queued
        f.refresh_stage()
        s.queued = True
        self._largest = max(self._largest, s.size)
        self._closed.set()
        self._closed = trio.Event()
        self._last_close = trio.current_time()
        await self._report(f)
        record = json.dumps({"ino": f.ino, "size": s.size, "mtime_ns": s.mtime_ns, "boot": self._boot,
                             "opener": dataclasses.asdict(s.opener), "grant": f.grant.hex()})
        try:
            await trio.to_thread.run_sync(_write_record, self._record(f.ino), record)
        except OSError as exc:  # (the upload goes on; only a restart would not find it)
            log.warning("inode %d: staging record not written (%s)", f.ino, exc)
        self.client._spawn(self._upload_soon, f)

    def direct(self, f: FileState, attach: Callable[[int], T]) -> Optional[T]:
        """If `f` is staged and still being written: `attach(fd)` (the mount's FUSE
        passthrough) with the descriptor of its local copy, which the kernel then reads and
        writes directly, and its result; else None. If attach raises, nothing changes."""
        s = f.stage
        if s is None or s.queued:
            return None
        result = attach(s.fd)
        if not s.direct:
            s.direct = True
            self.direct_files += 1
        return result

    async def settled(self, f: FileState) -> None:
        """Wait until a queued staged file is uploaded (an open for writing does)."""
        s = f.stage
        if s is not None and s.queued:
            await s.uploaded.wait()

    # ------------------------------------------------------------------ uploads

    async def _upload_soon(self, f: FileState) -> None:
        """Upload a closed staged file, trying again while that fails for want of servers."""
        await self._yield_to_writers()
        delay = UPLOAD_RETRY_S
        while f.stage is not None:
            try:
                async with self._slots:
                    await self._upload(f)
                return
            except FsError as exc:
                if exc.errno in (errno.ENOENT, errno.ESTALE, errno.EACCES, errno.EPERM, errno.EBADF):
                    log.error("inode %d: staged upload given up (%s); its mark stays", f.ino, exc)
                    self._forget(f)
                    return
                self.failed_uploads += 1
                log.warning("inode %d: staged upload failed (%s); again in %.0f s", f.ino, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, UPLOAD_RETRY_MAX_S)

    async def _yield_to_writers(self) -> None:
        """Wait, UPLOAD_YIELD_S at most, until no staged file here is being written and
        none has closed for UPLOAD_QUIET_S (no wait while a writer waits for room: the
        uploads make it)."""
        with trio.move_on_after(UPLOAD_YIELD_S):
            while not self._waiting_for_room:
                if any(g.stage is not None and not g.stage.queued for g in self.files.values()):
                    await self._closed.wait()
                elif (quiet := self._last_close + UPLOAD_QUIET_S - trio.current_time()) > 0:
                    await trio.sleep(quiet)
                else:
                    return

    async def _upload(self, f: FileState) -> None:
        s = f.stage
        assert s is not None
        bs, size = f.block_size, s.size
        nblocks = math.ceil(size / bs)
        refs: list[m.BlockRef] = []

        async def content(i: int) -> list:
            return [await trio.to_thread.run_sync(os.pread, s.fd, min(bs, size - i * bs), i * bs)]

        writer = self.client.writer
        for first in range(0, nblocks, UPLOAD_BATCH_BLOCKS):
            batch = list(range(first, min(nblocks, first + UPLOAD_BATCH_BLOCKS)))
            await writer.place(f.ino, batch, content, refs.append, f.spare, sync=True)
        refs.sort(key=lambda r: r.index)
        parts = [refs[i:i + COMMIT_MAX_BLOCKS] for i in range(0, len(refs), COMMIT_MAX_BLOCKS)] or [[]]
        session = self.client.session.id
        reply = None
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            part_size = size if last else (part[-1].index + 1) * bs
            reply = await self.client._meta(
                "commit_blocks", m.CommitReq(f.ino, session, part, part_size, s.mtime_ns, unstage=last))
        assert reply is not None
        f.blocks = {r.index: r for r in refs}
        f.attr = reply.attr
        self.uploaded_files += 1
        self.uploaded_bytes += size
        self.client._committed(f, reply.attr)
        self._forget(f)

    def _forget(self, f: FileState) -> None:
        """The staged file is uploaded (or given up): its local copy and record go, and the
        stager's hold on the open file with them."""
        s = f.stage
        if s is None:
            return
        f.stage = None
        self.files.pop(f.ino, None)
        os.close(s.fd)
        self.client._spawn(trio.to_thread.run_sync, self._discard, f.ino)  # (unlinking a large file takes a while)
        s.uploaded.set()
        self._room.set()
        self._room = trio.Event()
        self.client._drop_handle(f)

    # ------------------------------------------------------------------ restart

    async def resume(self) -> None:
        """Queue the uploads a previous client on this directory left (module docstring).
        Files staged by this client wait for the sweep (begin)."""
        try:
            records = await trio.to_thread.run_sync(self._records)
        except OSError as exc:  # (an unreadable staging directory: its files stay where they are)
            log.error("staging directory %s not swept (%s): nothing resumed", self.directory, exc)
            records = []
        finally:
            self._swept.set()
        for record in records:
            ino, size, opener = int(record["ino"]), int(record["size"]), m.Ctx(**record["opener"])
            try:
                f = await self.client._reopen_staged(ino, opener, bytes.fromhex(record.get("grant", "")))
            except FsError as exc:
                log.warning("inode %d: staged upload not resumed (%s): discarded", ino, exc)
                await trio.to_thread.run_sync(self._discard, ino)
                continue
            fd = await trio.to_thread.run_sync(os.open, self._data(ino), os.O_RDWR)
            f.stage = Staged(ino, fd, opener, size, int(record["mtime_ns"]), queued=True)
            f.size = size
            self.files[ino] = f
            log.info("inode %d: resuming the upload of %d staged bytes", ino, size)
            self.client._spawn(self._upload_soon, f)

    def _records(self) -> list[dict]:
        """The staging records a previous client left whose data can be uploaded; the rest
        discarded (module docstring). In a worker thread."""
        records = {p.stem: p for p in self.directory.glob("*.json")}
        for p in sorted(self.directory.iterdir()):
            if p.suffix == ".tmp" or (p.suffix == "" and p.name not in records):
                log.warning("staged file %s was never closed: discarded (its checkpoint stays uncommitted)", p.name)
                p.unlink(missing_ok=True)
        out = []
        for name, p in records.items():
            try:
                record = json.loads(p.read_text())
                ino, size = int(record["ino"]), int(record["size"])
                m.Ctx(**record["opener"])
                int(record["mtime_ns"])
                bytes.fromhex(record.get("grant", ""))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("staging record %s unreadable (%s): discarded", p, exc)
                p.unlink(missing_ok=True)
                if name.isdigit():
                    self._data(int(name)).unlink(missing_ok=True)
                continue
            data = self._data(ino)
            if record.get("boot") != self._boot or not data.exists() or data.stat().st_size != size:
                log.warning("inode %d: staged data from before a restart (or damaged) discarded; its mark stays", ino)
                self._discard(ino)
                continue
            out.append(record)
        return out

    def _discard(self, ino: int) -> None:
        self._data(ino).unlink(missing_ok=True)
        self._record(ino).unlink(missing_ok=True)

    async def drain(self) -> None:
        """Wait for every closed staged file's upload (an unmount); one that cannot finish
        now is left for the next client on this directory."""
        for f in list(self.files.values()):
            s = f.stage
            if s is not None and s.queued:
                with trio.move_on_after(UPLOAD_RETRY_MAX_S):
                    await s.uploaded.wait()
        for f in list(self.files.values()):
            if f.stage is not None:
                os.close(f.stage.fd)

    def status(self) -> dict[str, int]:
        return {"staged_files": len(self.files), "staged_bytes": self.used_bytes, "limit": self.limit_bytes,
                "uploaded_files": self.uploaded_files, "uploaded_bytes": self.uploaded_bytes,
                "failed_uploads": self.failed_uploads, "direct_files": self.direct_files}


@dataclass
class Scan:
    """What a checkpoint directory's subtree holds."""

    files: int = 0
    bytes: int = 0
    pending_files: int = 0  # marked staged
    pending_bytes: int = 0  # staged bytes of those, as their stagers reported


class Checkpoints:
    """Commit, status and retention of checkpoint directories (module docstring): any
    client may do these, with or without a staging area of its own."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._committing: set[int] = set()  # directories whose marker this client will write

    async def _xattr(self, ino: int, name: bytes, ctx: Optional[m.Ctx] = None) -> Optional[bytes]:
        try:
            return (await self.client._meta("getxattr", m.XattrReq(ino, name, ctx or self.client.identity))).value
        except FsError as exc:
            if exc.errno == errno.ENODATA:
                return None
            raise

    async def _checkpoint_dir(self, ino: int, ctx: m.Ctx) -> bytes:
        """The marker name of checkpoint directory `ino` (EINVAL if it is not one)."""
        attr, mode, marker = await at_once(lambda: self.client.getattr(ino),
                                            lambda: self._xattr(ino, CHECKPOINT_XATTR, ctx),
                                            lambda: self._xattr(ino, CHECKPOINT_MARKER_XATTR, ctx))
        if not stat.S_ISDIR(attr.unwrap().mode) or mode.unwrap() is None:
            raise FsError(errno.EINVAL, f"inode {ino} is not a checkpoint directory (set {CHECKPOINT_XATTR.decode()})")
        return marker.unwrap() or CHECKPOINT_MARKER_DEFAULT

    async def scan(self, ino: int, ctx: Optional[m.Ctx] = None) -> Scan:
        """Walk a directory's subtree (as `ctx`): files, bytes, and those still staged anywhere."""
        out = Scan()
        stager = self.client.stager
        todo = [ino]
        while todo:
            for e in await self.client.listdir(todo.pop(), ctx, remember=False):
                if stat.S_ISDIR(e.attr.mode):
                    todo.append(e.attr.ino)
                    continue
                out.files += 1
                local = stager.files.get(e.attr.ino) if stager is not None else None
                if local is not None and local.stage is not None:
                    out.pending_files += 1
                    out.pending_bytes += local.stage.size
                    out.bytes += local.stage.size
                    continue
                out.bytes += e.attr.size
                if stat.S_ISREG(e.attr.mode) and e.attr.xattrs:
                    mark = await self._xattr(e.attr.ino, STAGED_XATTR, ctx)
                    if mark is not None:
                        out.pending_files += 1
                        out.pending_bytes += int(mark) if mark.strip().isdigit() else 0
        return out

    async def status(self, ino: int, ctx: Optional[m.Ctx] = None) -> dict:
        """A checkpoint directory's state, as `ctx` may see it (stripefs.checkpoint.status)."""
        ctx = ctx or self.client.identity
        marker = await self._checkpoint_dir(ino, ctx)
        scan = await self.scan(ino, ctx)
        committed = await self._entry(ino, marker, ctx) is not None
        return {"pending_bytes": scan.pending_bytes, "pending_files": scan.pending_files,
                "files": scan.files, "bytes": scan.bytes, "committed": committed,
                "commit_asked": committed or ino in self._committing
                or await self._entry(ino, _commit_name(marker), ctx) is not None}

    async def _entry(self, parent: int, name: bytes, ctx: m.Ctx) -> Optional[m.Attr]:
        return (await self.client.lookup_entry(parent, name, ctx)).attr

    async def commit(self, ino: int, ctx: m.Ctx) -> None:
        """Ask for the marker of checkpoint directory `ino` (returns at once)."""
        marker = await self._checkpoint_dir(ino, ctx)
        if ino in self._committing:
            return  # this client is about it
        tmp = _commit_name(marker)
        done, asked = await at_once(lambda: self._entry(ino, marker, ctx), lambda: self._entry(ino, tmp, ctx))
        if done.unwrap() is not None:
            return  # committed
        if asked.unwrap() is None:
            fh, _ = await self.client.create(ino, tmp, 0o644, os.O_WRONLY, ctx, stage=False)
            await self.client.release(fh)
        self._committing.add(ino)
        self.client._spawn(self._commit_when_durable, ino, marker, ctx)

    async def _commit_when_durable(self, ino: int, marker: bytes, ctx: m.Ctx) -> None:
        client = self.client
        tmp = _commit_name(marker)
        try:
            delay = COMMIT_POLL_S
            while True:
                scan = await self.scan(ino, ctx)
                if not scan.pending_files:
                    break
                await trio.sleep(delay)
                delay = min(delay * 2, COMMIT_POLL_MAX_S)
            body = json.dumps({"committed_ns": time.time_ns(), "files": scan.files - 1, "bytes": scan.bytes},
                              sort_keys=True).encode() + b"\n"
            attr = await client.lookup(ino, tmp, ctx)
            fh, _, _ = await client.open(attr.ino, os.O_WRONLY | os.O_TRUNC, ctx)
            try:
                await client.write(fh, 0, body)
                await client.fsync(fh)
            finally:
                await client.release(fh)
            await client.rename(ino, tmp, ino, marker, ctx=ctx)
            await client._meta("sync", m.Empty())  # the rename durable, as the marker promises
            log.info("checkpoint directory %d committed: %d files, %d bytes", ino, scan.files - 1, scan.bytes)
            await self._retain(ino, marker, ctx)
        except FsError as exc:
            log.error("checkpoint directory %d: marker not written: %s", ino, exc)
        finally:
            self._committing.discard(ino)

    async def _retain(self, ino: int, marker: bytes, ctx: m.Ctx) -> None:
        """A parent with stripefs.checkpoint.keep=K keeps its newest K committed checkpoints."""
        client = self.client
        parent = (await client._meta("lookup", m.LookupReq(ino, b"..", ctx))).attr.ino
        keep = await self._xattr(parent, CHECKPOINT_KEEP_XATTR, ctx)
        if keep is None:
            return
        committed = []
        for e in await client.listdir(parent, ctx):
            if stat.S_ISDIR(e.attr.mode):
                done = await self._entry(e.attr.ino, marker, ctx)
                if done is not None:
                    committed.append((done.mtime_ns, e.name))
        committed.sort()
        for _, name in committed[:max(0, len(committed) - int(keep))]:
            log.info("checkpoint retention (keep %s): removing %r", keep.decode(), name)
            await client.remove_tree(parent, name, ctx)


async def _local(fn: Callable[..., T], *args: Any) -> T:
    """A call on the staging area's disk, in a worker thread; its OSError as an FsError
    (a full local disk is the writer's ENOSPC)."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except OSError as exc:
        raise FsError(exc.errno or errno.EIO, f"staging area: {exc.strerror}") from None


def _write_record(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def _commit_name(marker: bytes) -> bytes:
    """The marker's name while it is written (renamed to the marker when complete)."""
    return b"." + marker + b".commit"
