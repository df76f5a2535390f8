"""fallocate(2) through a real mount, against a local directory as the twin: mode 0 and
FALLOC_FL_KEEP_SIZE give Linux's sizes, FALLOC_FL_PUNCH_HOLE zeroes a range and frees its
whole blocks, and the modes stripefs does not do are EOPNOTSUPP (never ENOSYS, which would
turn fallocate off for the whole mount)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import random

import pytest

from cluster import Cluster, Mount

pytestmark = [pytest.mark.mount]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLOCK = 64 * 1024  # the block size set on the test directory

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """0, or the errno."""
    return 0 if _libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


def test_fallocate_matches_a_local_twin(mount: Mount, tmp_path):
    d = mount / "fa"
    d.mkdir()
    os.setxattr(d, "stripefs.block_size", str(BLOCK).encode())
    twin = tmp_path / "twin"
    twin.mkdir()
    rng = random.Random(5)
    content = rng.randbytes(5 * BLOCK + 1000)
    steps = [
        (0, 10 * BLOCK, 100),  # mode 0 past the end: the size grows
        (0, 0, 4096),  # within: nothing changes
        (FALLOC_FL_KEEP_SIZE, 20 * BLOCK, BLOCK),  # keeps the size
        (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 10),  # inside one block
        (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BLOCK - 10, 3 * BLOCK),  # edges and 2 whole blocks
        (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 9 * BLOCK, 5 * BLOCK),  # past the end
        (FALLOC_FL_PUNCH_HOLE, 0, 10),  # without KEEP_SIZE: EOPNOTSUPP on Linux
    ]
    files = [d / "f", twin / "f"]
    for path in files:
        path.write_bytes(content)
    fds = [os.open(p, os.O_RDWR) for p in files]
    try:
        for mode, offset, length in steps:
            results = [fallocate(fd, mode, offset, length) for fd in fds]
            assert results[0] == results[1], f"mode {mode:#x} {offset}+{length}: {results}"
            sizes = [os.fstat(fd).st_size for fd in fds]
            assert sizes[0] == sizes[1], f"mode {mode:#x} {offset}+{length}: sizes {sizes}"
            assert os.pread(fds[0], sizes[0] + 10, 0) == os.pread(fds[1], sizes[1] + 10, 0)
        assert fallocate(fds[0], FALLOC_FL_ZERO_RANGE, 0, 10) == errno.EOPNOTSUPP
        assert fallocate(fds[0], 0, 0, 10) == 0, "an unsupported mode must not turn fallocate off"
        assert fallocate(fds[0], 0, -1, 10) == errno.EINVAL
    finally:
        for fd in fds:
            os.close(fd)
    # Read through a fresh open too (no page cache of this descriptor's making).
    assert (d / "f").read_bytes() == (twin / "f").read_bytes()


def test_punched_blocks_are_freed(cluster: Cluster, mount: Mount):
    d = mount / "holes"
    d.mkdir()
    os.setxattr(d, "stripefs.block_size", str(BLOCK).encode())
    path = d / "f"
    path.write_bytes(os.urandom(8 * BLOCK))
    assert cluster.status()["blocks"] == 8
    fd = os.open(path, os.O_RDWR)
    try:
        assert fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * BLOCK, 4 * BLOCK) == 0
    finally:
        os.close(fd)
    assert cluster.status()["blocks"] == 4
    data = path.read_bytes()
    assert len(data) == 8 * BLOCK and data[2 * BLOCK : 6 * BLOCK] == bytes(4 * BLOCK)
