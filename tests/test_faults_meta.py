"""SIGKILL of the metaserver at random instants of a mixed workload (creates with writes
and fsync, checkpoint-style write+fsync+rename, renames, unlinks, mkdirs, reads) running
in another process through a real mount; the metaserver is restarted on the same address
each time. No operation may fail (calls in flight are retried, those that change state
with their request ids: none runs twice); everything acknowledged must be there
afterwards, read through the same mount (never remounted) and a fresh one, and
`stripefs fsck` must be clean.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
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


def stop_workloads(procs: list) -> None:
    """Tells every workload of start_workload to stop, and kills one that does not."""
    for p, _, stop in procs:
        stop.touch()
        if p.poll() is None:
            try:
                p.wait(OP_BOUND_S)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_call_whose_reply_was_lost_is_not_applied_twice(tmp_path):
    """The metaserver commits a create (made durable) and dies before its reply leaves
    (STRIPEFS_FAULTS kill-after-once, metaserver/core.py), again and again; each time the
    client retries on the restarted metaserver with the same request id and gets the first
    answer. A program creating files with O_EXCL, renaming and unlinking them sees no error
    (a second run would be EEXIST or ENOENT, a refused retry EIO) and the namespace holds
    exactly what it did."""
    c = fast_cluster(tmp_path / "cluster", meta_prefix=["env", "STRIPEFS_FAULTS=kill-after-once=3"])
    try:
        m = c.mount()
        root = m.path / "once"
        root.mkdir()
        stop = threading.Event()
        restarts = []

        def restart_when_dead() -> None:
            while not stop.is_set():
                if c.meta is not None and not c.meta.running():
                    c.start_meta(listen=c.meta_addr)  # armed again: it dies again later
                    restarts.append(time.monotonic())
                time.sleep(0.05)

        watcher = threading.Thread(target=restart_when_dead, daemon=True)
        watcher.start()
        try:
            for i in range(30):
                fd = os.open(root / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(fd, f"file {i}".encode())
                os.close(fd)
                os.rename(root / f"f{i}", root / f"g{i}")
                if i % 3 == 0:
                    os.unlink(root / f"g{i}")
            # Still restarted meanwhile: the closes' releases (`once` calls too) may kill it.
            expected = sorted(f"g{i}" for i in range(30) if i % 3)
            assert sorted(os.listdir(root)) == expected
        finally:
            stop.set()
            watcher.join()
        assert len(restarts) >= 10, f"the metaserver died only {len(restarts)} times"
        c.meta_prefix = []
        c.restart_meta()
        fresh = c.mount()
        assert sorted(os.listdir(fresh.path / "once")) == expected
        for name in expected:
            assert (fresh.path / "once" / name).read_bytes() == f"file {name[1:]}".encode()
        wait_fsck_clean(c)
    finally:
        c.close()


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
            # No call fails: idempotent ones and `once` ones (their request ids) are retried
            # on the restarted metaserver, and none is applied twice (the ledger below).
            assert not doc["failed"], doc["failed"]
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
        stop_workloads(procs)
        c.close()
