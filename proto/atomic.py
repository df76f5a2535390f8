"""Small files other processes watch (ready files with a bound address, pid files): written
whole or not at all, so a watcher never reads half of one."""

from __future__ import annotations

import os


def write_atomically(path: str, text: str) -> None:
    """`text` into `path` through a temporary file in the same directory, fsynced, then
    renamed over it."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
