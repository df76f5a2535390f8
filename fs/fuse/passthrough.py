"""FUSE passthrough for staged checkpoint files: the kernel reads and writes their local
copy itself, with no request to this mount for each read or write.

A file created in an asynchronous checkpoint directory on a mount with a staging area is
written to a local file first (fs/client/staging.py). Through this mount its bytes would
cross the FUSE device twice and the mount's Python once; with passthrough (Linux 6.9 and
later) the create's reply names that local file as the open file's backing file, and the
kernel writes it as it would any local file: a checkpoint save then blocks training about
as long as writing it to the local disk does (docs/client.md, "Checkpoints through tiers").
The stager reads the copy's size and mtime from the copy itself (`Staged.direct`).

The kernel's rules (fs/fuse/iomode.c): while one open file of an inode is in passthrough
mode, every other open of that inode must be too, with the same backing file, or the
open fails (EIO). So the backing id registered at the create is kept while any handle
opened through it is open, and every open of the inode meanwhile joins it; a staged file
stays staged for exactly those opens (staging.py), and its upload starts only after the
last of them closes. A file not created here through passthrough never gets it later.

Writes the kernel makes itself never reach this mount, which drops set-user/group-ID bits
on write (FUSE_HANDLE_KILLPRIV_V2, ops.py): a file created with either bit is written
by the mount. (A bit set by chmod while the file is open keeps; docs/client.md.)

Where the kernel refuses (older than 6.9, or a staging area on a stacked file system such
as overlayfs: the backing file may not be on one, pyfuse3.enable_passthrough's depth 1),
the first refusal is logged and the mount writes staged files itself, as before.
"""

from __future__ import annotations

import logging
import stat

import pyfuse3

from stripefs.client import Attr, Client

log = logging.getLogger("stripefs.fuse")


class Passthrough:
    """The backing files this mount has given the kernel, by inode and by handle."""

    def __init__(self, client: Client, enabled: bool) -> None:
        self.client = client
        self.enabled = enabled
        self._inodes: dict[int, list[int]] = {}  # inode -> [backing id, handles opened through it]
        self._handles: dict[int, int] = {}  # handle -> inode

    def created(self, attr: Attr, fh: int) -> int:
        """The backing id for a handle just created (0: none, the mount serves it)."""
        ino = attr.ino
        if not self.enabled or attr.mode & (stat.S_ISUID | stat.S_ISGID):
            return 0
        try:
            backing_id = self.client.direct_staged(fh, pyfuse3.backing_open)
        except OSError as exc:
            log.warning("FUSE passthrough refused (%s): this mount writes staged files itself", exc)
            self.enabled = False
            return 0
        if backing_id is None:
            return 0
        self._inodes[ino] = [backing_id, 0]
        return self._joined(ino, fh)

    def opened(self, ino: int, fh: int) -> int:
        """The backing id for a handle just opened: the inode's, while it has one."""
        return self._joined(ino, fh) if ino in self._inodes else 0

    def _joined(self, ino: int, fh: int) -> int:
        entry = self._inodes[ino]
        entry[1] += 1
        self._handles[fh] = ino
        return entry[0]

    def released(self, fh: int) -> None:
        """A handle is closed; the last one through a backing id gives the id back (the
        kernel already keeps the file for the opens it has)."""
        ino = self._handles.pop(fh, None)
        if ino is None:
            return
        entry = self._inodes[ino]
        entry[1] -= 1
        if entry[1] == 0:
            del self._inodes[ino]
            try:
                pyfuse3.backing_close(entry[0])
            except OSError as exc:  # (an id the kernel no longer has: nothing to give back)
                log.warning("inode %d: backing id %d not closed: %s", ino, entry[0], exc)
