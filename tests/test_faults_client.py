"""SIGKILL of a mount: everything it had fsynced or closed reads back intact through
another mount; its session expires (short --session-lease-s), the file it held open
after unlinking it is purged, its uploaded but uncommitted blocks become garbage, and
the data servers' disk usage returns to where it was.
"""

from __future__ import annotations

import os
import time

import pytest
from faults import (
    MiB,
    disk_usage,
    fast_cluster,
    pattern,
    sha256,
    sha256_path,
    wait_for,
    wait_fsck_clean,
    wait_replicated,
    write_file,
)

pytestmark = [pytest.mark.mount, pytest.mark.allow_tracebacks, pytest.mark.timeout(150)]

#: Session lease 2 s: expired after 3 silent leases, then a sweep (1 s) and the GC grace
#: (1 s) and a heartbeat; the blocks must be gone well within this.
PURGED_WITHIN_S = 40.0


def within_1pct(usage: int, baseline: int) -> bool:
    return abs(usage - baseline) <= baseline * 0.01


def test_sigkill_of_a_mount(tmp_path):
    c = fast_cluster(tmp_path / "cluster")
    fds: list[int] = []
    try:
        a, b = c.mount(), c.mount()
        d = a.path / "job"
        d.mkdir()
        os.setxattr(d, "stripefs.block_size", str(MiB).encode())
        acked = {}
        for i in range(4):  # closed
            data = pattern(i, 3 * MiB + i * 1000)
            (d / f"closed{i}").write_bytes(data)
            acked[f"closed{i}"] = data
        data = pattern(10, 5 * MiB + 7)  # fsynced, still open at the kill
        fd = os.open(d / "fsynced", os.O_WRONLY | os.O_CREAT, 0o644)
        fds.append(fd)
        os.write(fd, data)
        os.fsync(fd)
        acked["fsynced"] = data
        baseline = disk_usage(c)
        assert baseline > 0
        # Held open after its unlink: an orphan only the dead mount's session keeps.
        write_file(d / "held", pattern(11, 16 * MiB))
        fd = os.open(d / "held", os.O_RDONLY)
        fds.append(fd)
        os.unlink(d / "held")
        # Written, never fsynced or closed: some blocks uploaded, some maybe committed.
        fd = os.open(d / "partial", os.O_WRONLY | os.O_CREAT, 0o644)
        fds.append(fd)
        os.write(fd, pattern(12, 20 * MiB))
        time.sleep(2.0)  # let write-behind upload the full blocks
        assert disk_usage(c) > baseline + 2 * 16 * MiB
        a.proc.kill()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass  # the mount is gone
        fds.clear()
        for rel, data in acked.items():
            assert sha256_path(b / "job" / rel) == sha256(data), rel
        # Whatever of "partial" was committed is a file like any other: remove it.
        os.unlink(b / "job" / "partial")
        wait_for(lambda: c.status()["sessions"] == 1, PURGED_WITHIN_S, "the dead mount's session expired")
        t0 = time.monotonic()
        wait_for(lambda: within_1pct(disk_usage(c), baseline), PURGED_WITHIN_S,
                 f"disk usage back to {baseline}")
        print(f"blocks of the dead mount collected {time.monotonic() - t0:.1f} s after its session expired")
        assert "held" not in os.listdir(b / "job")
        wait_replicated(c)
        wait_fsck_clean(c)
        fresh = c.mount()
        for rel, data in acked.items():
            assert sha256_path(fresh / "job" / rel) == sha256(data), rel
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        c.close()
