"""Full disks: three data servers on 64 MiB tmpfs each. Writing until the cluster is
full gives the application ENOSPC (from write, fsync or close), never a success for data
that was not stored; every file closed successfully reads back intact; after deletions
are collected, writing works again.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from faults import MiB, fast_cluster, pattern, sha256, sha256_path, wait_for, wait_fsck_clean, write_file

pytestmark = [pytest.mark.mount, pytest.mark.allow_tracebacks, pytest.mark.timeout(180)]

DISK_MIB = 64
FILE_BYTES = 4 * MiB
#: Room for 3 x 64 MiB / R=2 = 96 MiB of files: more attempts than that must fail.
MAX_FILES = 40


@pytest.fixture
def small_disks(tmp_path):
    base = tmp_path / "cluster"
    mounted = []
    try:
        for i in range(3):
            d = base / f"data-{i}"
            d.mkdir(parents=True)
            res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(d)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
            mounted.append(d)
        yield base
    finally:
        for d in mounted:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(d) -> tuple[dict[str, bytes], OSError]:
    """Writes 4 MiB files into `d` until one fails; the acknowledged ones and the error."""
    os.setxattr(d, "stripefs.block_size", str(MiB).encode())
    written: dict[str, bytes] = {}
    for i in range(MAX_FILES):
        data = pattern(i, FILE_BYTES)
        try:
            write_file(d / f"f{i}", data, fsync=i % 2 == 0)
        except OSError as exc:
            return written, exc
        written[f"f{i}"] = data
    raise AssertionError(f"{MAX_FILES} x {FILE_BYTES} bytes fit on 3 x {DISK_MIB} MiB with R=2")


def test_full_cluster_gives_enospc_even_before_heartbeats_tell(small_disks):
    # Heartbeats (which carry free space) every 5 s: the disks fill between two of them.
    c = fast_cluster(small_disks, data_flags=["--heartbeat-interval-s", "5"],
                     meta_flags=["--server-suspect-after-s", "12", "--server-dead-after-s", "30"])
    try:
        m = c.mount()
        (m.path / "fill").mkdir()
        _, failure = fill(m.path / "fill")
        assert failure.errno == errno.ENOSPC, failure
    finally:
        c.close()


def test_full_cluster_fails_writes_and_is_writable_again_after_deleting(small_disks):
    c = fast_cluster(small_disks)
    try:
        m = c.mount()
        d = m.path / "fill"
        d.mkdir()
        written, failure = fill(d)
        assert failure.errno == errno.ENOSPC, failure
        assert len(written) >= 10, len(written)  # most of the space is usable
        print(f"{len(written)} files of 4 MiB stored, then {failure!r}")
        for name, data in written.items():
            assert sha256_path(d / name) == sha256(data), name
        # Delete half; once the blocks are collected, there is room again.
        names = sorted(written)
        for name in names[::2]:
            os.unlink(d / name)
            del written[name]
        os.unlink(d / f"f{len(names)}")  # the file whose write failed

        def fits() -> bool:
            try:
                write_file(d / "again", pattern(999, FILE_BYTES))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return False
            return True

        wait_for(fits, 60, "a write succeeds after deleting", interval_s=1.0)
        written["again"] = pattern(999, FILE_BYTES)
        fresh = c.mount()
        for name, data in written.items():
            assert sha256_path(fresh / "fill" / name) == sha256(data), name
        wait_fsck_clean(c)
    finally:
        c.close()
