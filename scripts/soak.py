"""Soak run: a cluster of real processes (tests/cluster.py) with a mixed workload running
through a FUSE mount from several worker processes for N minutes, while random faults are
injected one at a time: data server SIGKILL and restart, data server SIGSTOP/SIGCONT,
flipped bytes in a stored block file, metaserver SIGKILL and restart, mount SIGKILL and
remount. Workers record every acknowledged write, rename and unlink (tests/faults.py
Workload). At the end every fault is healed, repair is given its time, every
acknowledged byte is read back through a fresh mount and `stripefs fsck` is run.

Exit status: 0 when nothing acknowledged was lost or corrupt and fsck is clean, 1
otherwise. Run through scripts/soak, which installs what is missing first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from cluster import Cluster, Mount, unmount  # noqa: E402
from faults import (  # noqa: E402
    MiB,
    fast_cluster,
    flip_random_block,
    fsck_json,
    load_report,
    pause,
    replication_healthy,
    resume,
    wait_for,
)

#: Relative weights of the fault kinds.
FAULT_WEIGHTS = {"data_kill": 3, "data_stop": 2, "flip": 2, "meta_kill": 3, "mount_kill": 1}
#: Seconds between the end of one fault and the start of the next, drawn uniformly.
FAULT_GAP_S = (2.0, 8.0)
#: How long a killed data server stays down: sometimes less, sometimes more than the
#: 3 s after which it is declared dead and its blocks re-replicated.
DATA_DOWN_S = (0.5, 8.0)
#: How long a data server stays stopped (hung).
DATA_STOP_S = (1.0, 8.0)
#: How long the metaserver stays down.
META_DOWN_S = (0.0, 2.0)
#: After the run: time allowed for repair (R replicas, fsck clean).
REPAIR_TIMEOUT_S = 180.0
#: A worker must stop this long after being told (one metadata call waits up to 30 s).
WORKER_STOP_S = 120.0
WRITERS = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="how long the workload runs under faults")
    p.add_argument("--state", help="directory for the cluster's state and logs (default: a temporary "
                   "one, removed after a successful run)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    p.add_argument("--writers", type=int, default=WRITERS, help="writer worker processes")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p.parse_args(argv)


class Soak:
    def __init__(self, args: argparse.Namespace, state: Path) -> None:
        self.args = args
        self.state = state
        self.seed = args.seed if args.seed is not None else int(time.time())
        self.rng = random.Random(self.seed)
        self.faults: dict[str, int] = {k: 0 for k in FAULT_WEIGHTS}
        self.events: list[str] = []
        self.cluster: Cluster | None = None
        self.mount: Mount | None = None
        self.workers: list[tuple[subprocess.Popen, Path, Path, str]] = []
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:7.1f} s  {text}"
        self.events.append(line)
        print(line, flush=True)

    # ------------------------------------------------------------------ setup

    def start(self) -> None:
        self.cluster = fast_cluster(
            self.state / "cluster",
            data_flags=["--scrub-rate-mib-s", "32", "--scrub-interval-s", "20"],
        )
        self.mount = self.cluster.mount(self.state / "mnt")
        stop = self.state / "stop"
        stop.unlink(missing_ok=True)
        specs = [(f"w{k}", ["--seed", str(self.seed * 100 + k)]) for k in range(self.args.writers)]
        # A reader of a fixed data set, alongside the writers' own read-back checks.
        specs.append(("reader", ["--seed", str(self.seed * 100 + 99), "--weights", "read=1",
                                 "--dataset-files", "6", "--dataset-mib", "8"]))
        for name, extra in specs:
            root = self.mount.path / name
            root.mkdir()
            os.setxattr(root, "stripefs.block_size", str(MiB).encode())
            out = self.state / f"{name}.json"
            proc = subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "tests" / "faults.py"), "workload", "--root", str(root),
                 "--out", str(out), "--stop-file", str(stop),
                 "--max-seconds", str(self.args.minutes * 60 + WORKER_STOP_S), "--big-mib", "4", *extra],
                stdin=subprocess.DEVNULL, stdout=open(self.state / f"{name}.out", "wb"), stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
            self.workers.append((proc, out, stop, name))
        self.note(f"cluster up at {self.cluster.meta_addr}, {len(specs)} workers, seed {self.seed}")

    # ------------------------------------------------------------------ faults

    def inject(self, kind: str) -> None:
        c, rng = self.cluster, self.rng
        assert c is not None and self.mount is not None
        if kind == "data_kill":
            i = rng.randrange(len(c.data))
            c.kill_data(i, signal.SIGKILL)
            down = rng.uniform(*DATA_DOWN_S)
            self.note(f"data-{i} SIGKILL, down {down:.1f} s")
            time.sleep(down)
            c.start_data(i)
        elif kind == "data_stop":
            i = rng.randrange(len(c.data))
            hung = rng.uniform(*DATA_STOP_S)
            self.note(f"data-{i} SIGSTOP for {hung:.1f} s")
            pause(c.data[i])
            try:
                time.sleep(hung)
            finally:
                resume(c.data[i])
        elif kind == "flip":
            hit = flip_random_block(c, rng)
            self.note(f"flipped a byte in block {hit[1]} on data-{hit[0]}" if hit else "flip: no block yet")
            if not hit:
                return
        elif kind == "meta_kill":
            down = rng.uniform(*META_DOWN_S)
            self.note(f"metaserver SIGKILL, down {down:.1f} s")
            c.meta.kill()
            time.sleep(down)
            c.start_meta(listen=c.meta_addr)
        elif kind == "mount_kill":
            self.note("mount SIGKILL, remount")
            path = self.mount.path
            self.mount.proc.kill()
            time.sleep(rng.uniform(0.0, 2.0))
            self.mount.close()
            self.mount = c.mount(path)
        self.faults[kind] += 1

    def wait_all_up(self) -> None:
        c = self.cluster
        assert c is not None
        for p in c.data:
            resume(p)
        for i, p in enumerate(c.data):
            if not p.running():
                c.start_data(i)
        c.wait_servers_up(len(c.data), timeout=60)

    def run(self) -> None:
        end = self.t0 + self.args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(self.rng.uniform(*FAULT_GAP_S), max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            dead = [name for p, _, _, name in self.workers if p.poll() is not None]
            if dead:
                self.note(f"workers ended early: {dead}")
                break
            kind = self.rng.choices(list(FAULT_WEIGHTS), list(FAULT_WEIGHTS.values()))[0]
            self.inject(kind)
            # One fault at a time: with R=2, two servers down at once may lose data legitimately.
            self.wait_all_up()

    # ------------------------------------------------------------------ verification

    def finish(self) -> dict:
        c = self.cluster
        assert c is not None
        summary: dict = {"seed": self.seed, "minutes": self.args.minutes, "faults": self.faults}
        stop = self.state / "stop"
        stop.touch()
        reports = {}
        for proc, out, _, name in self.workers:
            try:
                proc.wait(WORKER_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.note(f"worker {name} hung; killed")
            if proc.returncode == 0 and out.exists():
                reports[name] = load_report(out)
            else:
                self.note(f"worker {name} exited {proc.returncode} without a report")
        self.note("workload stopped; waiting for repair")
        self.wait_all_up()
        t = time.monotonic()
        try:
            wait_for(lambda: replication_healthy(c), REPAIR_TIMEOUT_S, "R replicas", interval_s=1.0)
            summary["repair_s"] = round(time.monotonic() - t, 1)
        except AssertionError as exc:
            summary["repair_s"] = None
            self.note(str(exc))
        fresh = c.mount()
        ops: dict[str, int] = {}
        failed: dict[str, int] = {}
        problems: list[str] = []
        verified = files = written = read = 0
        for name, (ledger, doc) in reports.items():
            for k, v in doc["ops"].items():
                ops[k] = ops.get(k, 0) + v
            for k, v in doc["failed"].items():
                failed[k] = failed.get(k, 0) + v
            problems += [f"{name}: corrupt read: {x}" for x in doc["corrupt"]]
            got, bad = ledger.verify(fresh.path / name)
            verified += got
            files += len(ledger.files)
            written += doc["bytes_written"]
            read += doc["bytes_read"]
            problems += [f"{name}: {x}" for x in bad]
        missing_reports = sorted({n for *_, n in self.workers} - set(reports))
        problems += [f"{n}: no report" for n in missing_reports]
        rc, doc = fsck_json(c)
        deadline = time.monotonic() + 60
        while rc != 0 and time.monotonic() < deadline:  # repair may still be settling
            time.sleep(2)
            rc, doc = fsck_json(c)
        summary.update({
            "operations": ops, "operations_total": sum(ops.values()), "failed_operations": failed,
            "files_verified": files, "bytes_verified": verified, "bytes_written": written,
            "bytes_read_checked": read, "lost_or_corrupt": problems,
            "fsck_clean": rc == 0, "fsck": doc if rc != 0 else {"clean": True},
            "status": c.status(),
        })
        return summary

    def close(self) -> None:
        (self.state / "stop").touch()
        for proc, *_ in self.workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.cluster is not None:
            for p in self.cluster.data:
                resume(p)
            self.cluster.close()
        if self.mount is not None:
            unmount(self.mount.path)


def print_summary(s: dict) -> None:
    print("\n==== soak summary ====")
    print(f"seed {s['seed']}, {s['minutes']} min under faults")
    print(f"operations: {s['operations_total']} {json.dumps(s['operations'], sort_keys=True)}")
    print(f"operations failed (outcome unknown, not acknowledged): {json.dumps(s['failed_operations'], sort_keys=True)}")
    print(f"faults injected: {sum(s['faults'].values())} {json.dumps(s['faults'], sort_keys=True)}")
    print(f"bytes written {s['bytes_written']}, read back and checked during the run {s['bytes_read_checked']}")
    print(f"verified at the end: {s['files_verified']} files, {s['bytes_verified']} bytes")
    print(f"repair after the run: {s['repair_s']} s")
    print(f"fsck: {'clean' if s['fsck_clean'] else json.dumps(s['fsck'])[:2000]}")
    lost = s["lost_or_corrupt"]
    print(f"lost or corrupt: {len(lost)}")
    for line in lost[:50]:
        print(f"  {line}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("scripts/soak needs root and /dev/fuse (it mounts stripefs)", file=sys.stderr)
        return 2
    made_state = args.state is None
    state = Path(args.state or tempfile.mkdtemp(prefix="stripefs-soak-")).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if (state / "cluster").exists():
        print(f"{state}/cluster exists: give an empty --state", file=sys.stderr)
        return 2
    soak = Soak(args, state)
    summary = None
    try:
        soak.start()
        soak.run()
        summary = soak.finish()
    except KeyboardInterrupt:
        soak.note("interrupted")
    finally:
        soak.close()
    if summary is None:
        print(f"soak did not finish; state and logs in {state}", file=sys.stderr)
        return 1
    ok = not summary["lost_or_corrupt"] and summary["fsck_clean"]
    summary["ok"] = ok
    (state / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print_summary(summary)
    if ok and made_state:
        shutil.rmtree(state, ignore_errors=True)
    elif not ok:
        print(f"state and logs kept in {state}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
