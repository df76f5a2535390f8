"""glibc's allocator, tuned per role (mallopt(3)): one place for the parameters and the
call. Where the C library is not glibc nothing is tuned (logged).

- The mount holds glibc to MOUNT_ARENAS arenas (`for_mount`): by default up to 8 per core,
  each keeping what was freed in it, and the mount's resident size grew to several times
  its write-back budget. Its mmap threshold is left to adapt: fixed at 256 KiB (every
  block-sized buffer mmapped and returned on free) it bounded the resident size no better
  and every new buffer paid its page faults, 1.2 ms a MiB written here (a 1 GiB
  checkpoint write 124 -> 176 MB/s without it, peak RSS 285 MiB).
- A data server keeps what it frees for reuse (`for_data_server`): its mmap threshold is
  fixed at DATA_MMAP_THRESHOLD (block-sized buffers come from its heaps) and its heaps are
  not trimmed below DATA_TRIM_THRESHOLD of free space. By default glibc mapped a fresh
  buffer for each chunk read off the disk or the network (its adaptive threshold aside)
  and handed freed heap tops back, so every chunk landed on pages the process had never
  touched: a fault, the kernel's zeroing, and on these virtual machines the host's
  backing, each time (docs/dataserver.md, "Memory"). Not for the mount: there the same
  setting held ~15-20 MiB more at the peak of a checkpoint write, whose resident size
  is bounded (docs/client.md, "Memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("stripefs.malloc")

#: mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: malloc arenas of the mount process.
MOUNT_ARENAS = 4
#: A data server's buffers up to this size come from its heaps, not from mmap.
DATA_MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free space a data server's heap keeps before it is handed back.
DATA_TRIM_THRESHOLD = 256 * 1024 * 1024


def tune(settings: dict[int, int]) -> None:
    """mallopt(param, value) for each setting; logged, not raised, if it cannot be done."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        for param, value in settings.items():
            if not libc.mallopt(param, value):
                log.info("mallopt(%d, %d) refused", param, value)
    except (OSError, AttributeError) as exc:  # not glibc: nothing to tune
        log.info("malloc tuning not applied: %s", exc)


def for_mount() -> None:
    tune({M_ARENA_MAX: MOUNT_ARENAS})


def for_data_server() -> None:
    tune({M_MMAP_THRESHOLD: DATA_MMAP_THRESHOLD, M_TRIM_THRESHOLD: DATA_TRIM_THRESHOLD})
