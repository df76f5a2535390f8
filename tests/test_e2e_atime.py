"""File times through real mounts: atime is left alone by default (noatime), and with
`-o atime` a read moves it by relatime's rules (when it is not newer than mtime or ctime),
as ext4's default does; nanosecond times and UTIME_OMIT / UTIME_NOW as utimensat sets them."""

from __future__ import annotations

import os
import time

import pytest

from cluster import Cluster

pytestmark = [pytest.mark.mount]


def _written_long_ago(path) -> int:
    path.write_bytes(b"some data")
    old = 1_600_000_000_123_456_789
    os.utime(path, ns=(old, old))  # atime = mtime, both in the past: relatime moves it
    return old


def test_reads_move_atime_with_the_atime_option_only(cluster: Cluster):
    plain = cluster.mount()
    cluster.mount_args = ["-o", "atime"]
    with_atime = cluster.mount()
    old = _written_long_ago(plain / "f")

    (plain / "f").read_bytes()
    time.sleep(0.5)
    assert os.stat(plain / "f").st_atime_ns == old  # noatime: nothing moved

    (with_atime / "f").read_bytes()
    deadline = time.monotonic() + 10
    while os.stat(with_atime / "f").st_atime_ns == old and time.monotonic() < deadline:
        time.sleep(0.2)  # told in the background; attributes are trusted for 1 s
    moved = os.stat(with_atime / "f").st_atime_ns
    assert moved > time.time_ns() - 60 * 10**9
    assert os.stat(with_atime / "f").st_mtime_ns == old  # a read moves only atime

    # Newer than mtime now: relatime leaves it until a change or a day passes.
    fd = os.open(with_atime / "f", os.O_RDONLY)
    try:
        os.pread(fd, 4, 0)
    finally:
        os.close(fd)
    time.sleep(1.5)
    assert os.stat(with_atime / "f").st_atime_ns == moved


def test_utimensat_nanoseconds_omit_and_now(mount):
    path = mount / "t"
    path.write_bytes(b"x")
    os.utime(path, ns=(1_000_000_001, 2_000_000_002))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    # UTIME_OMIT for atime, UTIME_NOW for mtime, through utimensat itself.
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    times = (Timespec * 2)(Timespec(0, UTIME_OMIT), Timespec(0, UTIME_NOW))
    AT_FDCWD = -100
    assert libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) == 0, os.strerror(ctypes.get_errno())
    st = os.stat(path)
    assert st.st_atime_ns == 1_000_000_001
    assert abs(st.st_mtime_ns - time.time_ns()) < 60 * 10**9
