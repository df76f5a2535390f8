"""Garbage collection against real processes: the data servers' disk usage (block files
under data-*/blocks, plus tmp/) returns to within 1% of its baseline after writing and
deleting 1 GiB through a mount, and after interrupted writers: an application killed
mid-file (the kernel closes its file, the mount commits what it had; the file is then
deleted), and a client-library writer SIGKILLed with blocks uploaded but not committed
(collected once its session expires, with nothing deleted by anyone).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from cluster import REPO_ROOT
from faults import MiB, disk_usage, fast_cluster, pattern, wait_for, wait_fsck_clean, write_file

pytestmark = [pytest.mark.mount, pytest.mark.allow_tracebacks, pytest.mark.timeout(240)]

GiB = 1024 * MiB
#: Deleted blocks are handed out after the 1 s GC grace, at most 1000 per heartbeat.
COLLECTED_WITHIN_S = 60.0


def within_1pct(usage: int, baseline: int) -> bool:
    return abs(usage - baseline) <= baseline * 0.01


def wait_usage(c, baseline: int, what: str) -> float:
    t0 = time.monotonic()
    wait_for(lambda: within_1pct(disk_usage(c), baseline), COLLECTED_WITHIN_S,
             f"disk usage back within 1% of {baseline} after {what}", interval_s=0.5)
    return time.monotonic() - t0


@pytest.fixture
def gc_cluster(tmp_path):
    c = fast_cluster(tmp_path / "cluster")
    try:
        yield c
    finally:
        c.close()


def test_usage_returns_after_writing_and_deleting_1gib(gc_cluster):
    c = gc_cluster
    m = c.mount()
    (m.path / "keep").mkdir()
    for i in range(4):  # a baseline that is not zero, so 1% means something
        write_file(m.path / "keep" / f"k{i}", pattern(i, 16 * MiB))
    baseline = disk_usage(c)
    tree = m.path / "tree"
    for i in range(16):
        (tree / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        write_file(tree / f"d{i % 4}" / f"f{i}", pattern(100 + i, GiB // 16), fsync=False)
    assert disk_usage(c) >= baseline + 2 * GiB * 0.99  # R=2
    subprocess.run(["rm", "-r", str(tree)], check=True, timeout=60)
    took = wait_usage(c, baseline, "rm -r of 1 GiB")
    print(f"2 GiB of replicas collected {took:.1f} s after rm -r")
    wait_fsck_clean(c)


def test_usage_returns_after_an_application_killed_mid_file(gc_cluster):
    c = gc_cluster
    m = c.mount()
    baseline = disk_usage(c)
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys\n"
         "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n"
         "chunk = os.urandom(1 << 20)\n"
         "while True:\n"
         "    os.write(fd, chunk)\n",
         str(m.path / "victim")],
    )
    wait_for(lambda: disk_usage(c) > baseline + 64 * MiB, 30, "the writer's blocks stored")
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    # The kernel closed its file: the mount flushed what it had (a file like any other).
    wait_for(lambda: (m.path / "victim").stat().st_size > 0, 30, "the killed writer's file flushed")
    os.unlink(m.path / "victim")
    wait_usage(c, baseline, "deleting a killed writer's file")
    wait_fsck_clean(c)


LIBRARY_WRITER = """
import sys, trio
from stripefs.client import open_client
from stripefs.proto.credentials import load_credentials
from stripefs.proto.messages import Ctx

async def main(meta, credentials, blocks):
    async with open_client(meta, load_credentials(credentials)) as c:
        fh, attr = await c.create(1, b"uncommitted", 0o644, 0, Ctx())
        piece = bytes(range(256)) * 4096  # 1 MiB
        for i in range(blocks * 4):
            await c.write(fh, i * len(piece), piece)
        await trio.sleep(3)  # write-behind uploads the full blocks; no commit yet
        print("uploaded", flush=True)
        await trio.sleep(3600)

trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
"""


def test_uncommitted_blocks_of_a_sigkilled_writer_are_collected(gc_cluster):
    c = gc_cluster
    m = c.mount()
    d = m.path / "small"
    d.mkdir()
    baseline = disk_usage(c)
    # 4 MiB blocks (the default) x 10, fewer than a commit batch: uploaded, not committed.
    writer = subprocess.Popen(
        [sys.executable, "-c", LIBRARY_WRITER, c.meta_addr, str(c.client), "10"],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )
    try:
        line = writer.stdout.readline() if writer.stdout else ""
        assert line.strip() == "uploaded", line
        stored = disk_usage(c) - baseline
        assert stored >= 2 * 32 * MiB, stored
        assert os.stat(m.path / "uncommitted").st_size == 0  # nothing committed
    finally:
        writer.kill()
        writer.wait()
    took = wait_usage(c, baseline, "a SIGKILLed writer's session expired")
    print(f"{stored} bytes of uncommitted blocks collected {took:.1f} s after the kill")
    os.unlink(m.path / "uncommitted")
    wait_fsck_clean(c)
