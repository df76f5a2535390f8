"""The files of `MNT/.stripefs`: `prefetch`, the prefetch plan of a mount, for programs
that only have plain file APIs (fs/client/prefetch.py does the work), and `cache`, what the
mount's local disk tier holds (fs/client/disktier.py; read-only).

Writing paths to it, one per line, in the order they will be read, adds them to the
writing process's plan: `open(MNT/.stripefs/prefetch, "w")` (O_TRUNC) replaces what that
process planned before, `"a"` adds to it. A path is absolute (it must be under this
mount: EINVAL otherwise) or relative to the mount's root. Lines are taken as they arrive
(a plan of a million paths starts being fetched before it is all written); a last line
without its newline is taken at close. Plans of different processes are served in turn
(the workers of a data loader may each write their own). The files are opened with the
writer's ids.

Reading it shows how far prefetch has got (`PrefetchStatus.lines()`), as it was when the
file was opened: `cat MNT/.stripefs/prefetch`. `cat MNT/.stripefs/cache` likewise shows
the disk tier's counters (`Client.disk_status`), `enabled 0` on a mount without one.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from stripefs.client import Client, Ctx, FsError

#: The control files' names in `.stripefs`.
PREFETCH_NAME = b"prefetch"
CACHE_NAME = b"cache"


@dataclass
class _Handle:
    ctx: Ctx
    writable: bool
    shown: bytes  # what a read returns: the status at open
    partial: bytes = b""  # the start of a line not yet ended


class ControlFiles:
    """The open handles of the control files."""

    def __init__(self, client: Client, mountpoint: str) -> None:
        self.client = client
        self._prefix = os.fsencode(os.path.abspath(mountpoint)).rstrip(b"/") + b"/"
        self._handles: dict[int, _Handle] = {}

    def holds(self, fh: int) -> bool:
        return fh in self._handles

    def open_prefetch(self, fh: int, flags: int, ctx: Ctx) -> None:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable and flags & os.O_TRUNC:
            self.client.prefetch_cancel(self._owner(ctx))
        self._handles[fh] = _Handle(ctx, writable, self.client.prefetch_status().lines().encode())

    def open_cache(self, fh: int, flags: int, ctx: Ctx) -> None:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FsError(errno.EROFS, "the cache file is read-only")
        shown = "".join(f"{name} {value}\n" for name, value in self.client.disk_status().items())
        self._handles[fh] = _Handle(ctx, False, shown.encode())

    def truncate(self, ctx: Ctx) -> None:
        """The file truncated to nothing: the caller's plan goes."""
        self.client.prefetch_cancel(self._owner(ctx))

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self._handles[fh].shown[offset : offset + size]

    def write(self, fh: int, data: bytes) -> int:
        h = self._handles[fh]
        if not h.writable:
            raise FsError(errno.EBADF, "opened for reading")
        text = h.partial + bytes(data)
        lines = text.split(b"\n")
        h.partial = lines.pop()
        self._plan(h, lines)
        return len(data)

    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None and h.partial:
            self._plan(h, [h.partial])

    def _plan(self, h: _Handle, lines: list[bytes]) -> None:
        paths = [self._path(line) for line in lines if line.rstrip(b"\r")]
        if paths:
            self.client.prefetch(paths, owner=self._owner(h.ctx), ctx=h.ctx)

    def _path(self, line: bytes) -> bytes:
        """A written line as a path from the root of the file system."""
        path = line.rstrip(b"\r")
        if not path.startswith(b"/"):
            return b"/" + path
        if path.startswith(self._prefix):
            return path[len(self._prefix) - 1 :]
        raise FsError(errno.EINVAL, f"{os.fsdecode(path)} is not under this mount ({os.fsdecode(self._prefix)})")

    @staticmethod
    def _owner(ctx: Ctx) -> tuple[str, int]:
        return ("pid", ctx.pid)
