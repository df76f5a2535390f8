"""SIGKILL of the metaserver at random instants of a mixed workload (creates with writes
and fsync, checkpoint-style write+fsync+rename, renames, unlinks, mkdirs, reads) running
in another process through a real mount; the metaserver is restarted on the same address
each time. Operations in flight may fail with EIO; everything acknowledged must be there
afterwards, read through the same mount (never remounted) and a fresh one, and
`stripefs fsck` must be clean.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults import MiB, fast_cluster, load_report, pattern, wait_fsck_clean, wait_replicated, write_file

pytestmark = [pytest.mark.mount, pytest.mark.allow_tracebacks, pytest.mark.timeout(240)]

KILLS = 20
#: Time the metaserver runs between its restart and the next kill, drawn uniformly.
UP_BETWEEN_KILLS_S = (0.2, 1.5)
#: Time it stays down after a kill, drawn uniformly (calls pile up meanwhile).
DOWN_S = (0.0, 0.5)
#: The workload must end this long after being told to (a metadata call waits up to 30 s).
OP_BOUND_S = 70.0
FAULTS_PY = Path(__file__).resolve().parent / "faults.py"


def start_workload(root: Path, tmp: Path, seed: int) -> tuple[subprocess.Popen, Path, Path]:
    out, stop = tmp / f"workload-{seed}.json", tmp / f"workload-{seed}.stop"
    proc = subprocess.Popen(
        [sys.executable, str(FAULTS_PY), "workload", "--root", str(root), "--seed", str(seed),
         "--out", str(out), "--stop-file", str(stop), "--max-seconds", "200", "--big-mib", "2"],
    )
    return proc, out, stop


def test_metaserver_sigkill_during_mixed_workload(tmp_path):
    c = fast_cluster(tmp_path / "cluster")
    procs = []
    try:
        m = c.mount()
        rng = random.Random(1234)
        for seed in (1, 2):
            root = m.path / f"w{seed}"
            root.mkdir()
            os.setxattr(root, "stripefs.block_size", str(MiB).encode())
            procs.append(start_workload(root, tmp_path, seed))
        t_start = time.monotonic()
        time.sleep(1.0)
        down = []
        for _ in range(KILLS):
            time.sleep(rng.uniform(*UP_BETWEEN_KILLS_S))
            c.meta.kill()
            t0 = time.monotonic()
            time.sleep(rng.uniform(*DOWN_S))
            c.start_meta(listen=c.meta_addr)
            down.append(time.monotonic() - t0)
            assert all(p.poll() is None for p, _, _ in procs), "a workload ended by itself"
        time.sleep(1.0)
        for _, _, stop in procs:
            stop.touch()
        for p, _, _ in procs:
            assert p.wait(OP_BOUND_S) == 0, "workload failed or hung after the metaserver came back"
        print(f"{KILLS} kills in {time.monotonic() - t_start:.0f} s, down {min(down):.2f}-{max(down):.2f} s each")
        fresh = c.mount()
        for seed, (_, out, _) in zip((1, 2), procs):
            ledger, doc = load_report(out)
            print(f"workload {seed}: ops {doc['ops']}, failures {doc['failed']}")
            assert not doc["corrupt"], doc["corrupt"]
            assert sum(doc["ops"].values()) > KILLS
            # EIO (outcome unknown) is the only acceptable failure.
            assert set(doc["failed"]) <= {"EIO"}, doc["failed"]
            root = m.path / f"w{seed}"
            # The mount keeps working without a remount.
            data = pattern(10_000 + seed, 300_000)
            write_file(root / "after", data)
            ledger.wrote("after", data)
            os.rename(root / "after", root / "after.renamed")
            ledger.renamed("after", "after.renamed")
            verified, problems = ledger.verify(root)
            assert not problems, problems[:20]
            verified2, problems = ledger.verify(fresh.path / f"w{seed}")
            assert not problems, problems[:20]
            assert verified == verified2 and len(ledger.files) > 10
        wait_replicated(c)
        wait_fsck_clean(c)
    finally:
        for p, _, stop in procs:
            stop.touch()
            if p.poll() is None:
                try:
                    p.wait(OP_BOUND_S)
                except subprocess.TimeoutExpired:
                    p.kill()
        c.close()
