"""Where FUSE mounts are, waiting for one to come up, and unmounting one: the one place
for `stripefs mount`/`umount`, scripts/up and scripts/down (through `stripefs umount`),
the test harness (tests/cluster.py) and the benchmark (MooseFS's mounts too).

The kernel's mount table (/proc/self/mountinfo) is read rather than the mount point
stat'ed: a mount whose FUSE process died still counts as mounted, and stat on it fails
(ENOTCONN). An unmount is `fusermount3 -u`, retried while the mount is busy (a process
that still has a file open there, a shell cd'ed into it), then `fusermount3 -u -z` (lazy:
detached now, gone when its last user lets go) as the last resort.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Callable, Optional

#: How many times an unmount is tried before it detaches lazily, and the pause between.
UNMOUNT_ATTEMPTS = 10
UNMOUNT_PAUSE_S = 0.2
#: How often a wait for a mount to come up looks.
MOUNT_POLL_S = 0.05

#: The escapes of the mount table's fields (blank, tab, newline, backslash as octal).
_ESCAPES = (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\"))


def mount_points() -> list[str]:
    """Every mount point of this process's mount namespace, as absolute paths."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ")[4]
            for escaped, char in _ESCAPES:
                point = point.replace(escaped, char)
            points.append(point)
    return points


def _as_listed(path: os.PathLike | str) -> str:
    """`path` as the mount table lists it: absolute, its parent's symbolic links resolved
    (not the path itself: a mount whose process died cannot be looked into)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def is_mounted(path: os.PathLike | str) -> bool:
    return _as_listed(path) in mount_points()


def mounted_under(directory: os.PathLike | str) -> list[str]:
    """The mount points inside `directory` (not itself)."""
    top = os.path.realpath(directory).rstrip("/") + "/"
    return [p for p in mount_points() if p.startswith(top)]


def unmount(path: os.PathLike | str, attempts: int = UNMOUNT_ATTEMPTS) -> str:
    """Unmounts `path`: "unmounted", "lazily" (still busy after `attempts`: detached,
    released by the kernel when its last user lets go), "not mounted", or "failed"."""
    path = _as_listed(path)
    for attempt in range(max(1, attempts)):
        if path not in mount_points():
            return "not mounted" if attempt == 0 else "unmounted"
        if subprocess.run(["fusermount3", "-u", path], capture_output=True).returncode == 0:
            return "unmounted"
        time.sleep(UNMOUNT_PAUSE_S)
    if path not in mount_points():
        return "unmounted"
    lazy = subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    return "lazily" if lazy.returncode == 0 else "failed"


def wait_mounted(path: os.PathLike | str, alive: Callable[[], bool], timeout_s: float) -> Optional[str]:
    """Waits until `path` is a mount point; None then, else why not (its process, as
    `alive` tells, ended first; or `timeout_s` passed)."""
    deadline = time.monotonic() + timeout_s
    while not os.path.ismount(path):
        if not alive():
            return f"the mount process exited before {path} was mounted"
        if time.monotonic() > deadline:
            return f"{path} not mounted after {timeout_s:g} s"
        time.sleep(MOUNT_POLL_S)
    return None
