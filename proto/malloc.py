"""glibc's allocator, tuned per role (mallopt(3)): one place for the parameters and the
calls. Where the C library is not glibc nothing is tuned (logged).

- A data server keeps what it frees for reuse (`for_data_server`): its mmap threshold is
  fixed at DATA_MMAP_THRESHOLD (chunk- and block-sized buffers come from its heaps) and
  its heaps are not trimmed below DATA_TRIM_THRESHOLD of free space. By default glibc
  mapped a fresh buffer for each chunk read off the disk or the network (its adaptive
  threshold aside) and handed freed heap tops back, so every chunk landed on pages the
  process had never touched: a fault and the kernel's zeroing each (~2.3 us a 4 KiB page
  here, 0.6 s a GiB), and on these virtual machines the host's backing, each time
  (docs/dataserver.md, "Memory").
- The mount holds glibc to MOUNT_ARENAS arenas (`for_mount`, called before the mount
  starts any thread): by default up to 8 per core, each keeping what was freed in it, and
  the mount's resident size grew to several times its write-back budget. One arena
  (2026-12-08, 3 alternations of workload 9 at R = 1): 150 KiB samples 1-18% fewer a
  second and the mount 3-17% more CPU a sample in each; checkpoints unchanged: not kept.
  Its mmap threshold is left to adapt, and what glibc holds free is handed back once the
  mount is idle or a spell of reads ends (`trim`, called by fs/fuse/memory.py): a 1 GiB
  read left ~300 MiB free and resident in the heaps (fragments below the heap tops) under
  the next burst of writes. The data servers' setting, measured
  for the mount again with the trim (2026-12-06): a fresh mount's 1 GiB write took 68-71
  thousand minor faults instead of 121-208 thousand and ~5% less CPU, but after a read and
  its trim the mount stayed at 129-153 MiB resident instead of 81-93 and the next write
  peaked at 384-410 MiB instead of 338-349 (the bound is the write-back budget + 100 MiB):
  not kept. Fixed at 256 KiB, the threshold made every new buffer pay its page faults
  (a 1 GiB write 176 -> 124 MB/s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Optional

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


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc or not
    except (OSError, AttributeError) as exc:  # not glibc: nothing to tune
        log.info("malloc tuning not applied: %s", exc)
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and later
        libc.mallinfo2.restype = _Mallinfo2
    return libc


def tune(settings: dict[int, int]) -> None:
    """mallopt(param, value) for each setting; logged, not raised, if it cannot be done."""
    libc = _libc()
    if libc is None:
        return
    for param, value in settings.items():
        if not libc.mallopt(param, value):
            log.info("mallopt(%d, %d) refused", param, value)


def for_mount() -> None:
    tune({M_ARENA_MAX: MOUNT_ARENAS})


def for_data_server() -> None:
    tune({M_MMAP_THRESHOLD: DATA_MMAP_THRESHOLD, M_TRIM_THRESHOLD: DATA_TRIM_THRESHOLD})


def free_bytes() -> int:
    """Bytes glibc holds free in its heaps, resident or not (mallinfo2's fordblks); 0
    where that cannot be known (not glibc, or older than 2.33)."""
    fn = getattr(_libc(), "mallinfo2", None)
    return 0 if fn is None else int(fn().fordblks)


def trim(above_bytes: int = 0) -> int:
    """Hand every whole free page of every heap back to the system (malloc_trim(0)) when
    glibc holds more than `above_bytes` free (`free_bytes`); what it held. Blocking (it
    walks the heaps under their locks): run it off an event loop."""
    libc = _libc()
    free = free_bytes()
    if libc is not None and free > above_bytes:
        libc.malloc_trim(0)
    return free
