"""Smoke test of the benchmark (scripts/bench.py): with --quick sizes it brings up a real
cluster, runs every workload once and tears everything down, and its table and JSON have
the promised shape. Never asserts a speed: only that figures exist and are positive."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "scripts" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("stripefs_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(10)
def test_arguments():
    bench = load_bench()
    args = bench.parse_args(["--quick", "--only", "2,1", "--replicas", "2"])
    assert (args.runs, args.only, args.replicas) == (1, [1, 2], [2])
    assert bench.parse_args([]).runs == 3
    assert bench.parse_args(["--only", "7"]).only == [7]  # the metadata engines, alone
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "7,1"])
    assert bench.parse_args(["--only", "8"]).only == [8]  # label queries, alone
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "8,7"])
    assert bench.parse_args(["--only", "9,4"]).only == [4, 9]  # the training epoch
    assert bench.parse_args(["--epoch-compute", "0.01,0.02"]).epoch_compute == [0.01, 0.02]
    assert bench.parse_args(["--only", "11,10"]).only == [10, 11]  # large samples, checkpoints
    assert bench.parse_args(["--large-epoch-compute", "0.01,0.2"]).large_epoch_compute == [0.01, 0.2]
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "12"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--epoch-compute", "0.01"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--large-epoch-compute", "0.01,0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--replicas", "4"])


@pytest.mark.timeout(10)
def test_epoch_compute_is_calibrated_only_against_moosefs_and_when_not_given(tmp_path):
    bench = load_bench()

    def calibrated(*argv: str) -> set[int]:
        return bench.Bench(bench.parse_args(["--work-dir", str(tmp_path), *argv])).to_calibrate

    assert calibrated("--peer", "moosefs") == {9, 10}
    assert calibrated("--peer", "moosefs", "--epoch-compute", "0.01,0.02") == {10}
    assert calibrated("--peer", "moosefs", "--large-epoch-compute", "0.01,0.2") == {9}
    assert calibrated() == set()  # no peer: the fixed times
    assert calibrated("--peer", "moosefs", "--quick") == set()  # not a measurement
    # What was calibrated is named under the table.
    doc = {"config": {"peer": "moosefs", "runs": 1, "quick": False, "caches_dropped": True, "elapsed_s": 1.0,
                      "epoch_calibration": {"150k": {"moosefs_batch_s": 0.0172, "compute_s": 0.0129}}},
           "results": []}
    assert "150k 12.9 ms (MooseFS 17.2 ms)" in bench.table(doc)


@pytest.mark.timeout(60)
def test_cpu_seconds_counts_a_process_and_those_under_it():
    """Workload 9's CPU a sample (Target.role_pids): the time of a process's children is
    counted while they live, and nothing else's."""
    bench = load_bench()
    burner = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\n"
              "print('burnt', flush=True)\ntime.sleep(60)\n")
    parent = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {burner!r}])\n"
    p = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "burnt"  # (the grandchild's, through its parent's pipe)
        used = bench.cpu_seconds({"parent": [p.pid], "none": []})
        assert 0.28 <= used["parent"] < 3.0, used  # the grandchild's 0.3 s and two interpreters' start
        assert used["none"] == 0.0
        assert bench.cpu_seconds({}) == {}
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_run_prints_table_and_json(tmp_path):
    out_json = tmp_path / "bench.json"
    work = tmp_path / "work"
    res = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--replicas", "1", "--json", str(out_json),
         "--work-dir", str(work)],
        capture_output=True, text=True, timeout=230, cwd=REPO_ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]

    # The machine comes first, then the table.
    assert "CPUs" in res.stdout and "GiB free" in res.stdout
    assert "| workload | R | target | value | unit | × raw | × peer |" in res.stdout

    doc = json.loads(out_json.read_text())
    for key in ("nproc", "memory_gib", "kernel", "disk_free_gib", "date"):
        assert key in doc["machine"]
    assert doc["config"]["quick"] is True and doc["config"]["runs"] == 1
    rows = doc["results"]
    for row in rows:
        assert set(row) >= {"workload", "metric", "label", "unit", "replicas", "target", "value",
                            "runs", "ratio_raw", "ratio_peer"}
        assert row["replicas"] == 1 and len(row["runs"]) == 1
        assert math.isfinite(row["value"]) and row["value"] > 0
        assert row["ratio_peer"] is None  # no peer in this run
    got = {(row["metric"], row["target"]) for row in rows}
    mount_metrics = ["ckpt_write", "ckpt_read", "shard_write", "shard_write_slowest", "shard_read",
                     "shard_read_slowest", "shard_read_mounts", "shard_read_mounts_slowest",
                     "dataset_write", "dataset_read", "create", "stat",
                     "unlink", "ls_l", "create_par", "stat_par", "unlink_par", "lock_unlock", "random_read",
                     "epoch_16k_util", "epoch_16k_rate", "epoch_150k_util", "epoch_150k_rate",
                     "epoch_2m_util", "epoch_2m_rate", "epoch_140m_util", "epoch_140m_rate",
                     "ckpt_save_blocked_s", "ckpt_restore_mbs"]
    expected = {(m, t) for m in mount_metrics for t in ("raw", "stripefs")}
    expected |= {("ckpt_write", "stripefs-lib"), ("ckpt_read", "stripefs-lib"),
                 ("mount_peak_rss", "stripefs"), ("ckpt_local_disk_s", "raw")}
    # The training epochs with the sampler hint (MNT/.stripefs/prefetch): stripefs only.
    expected |= {(f"epoch_{size}_{what}_hint", "stripefs") for size in ("16k", "150k", "2m", "140m")
                 for what in ("util", "rate")}
    # The 150 KiB epoch again, its samples inline (stripefs.inline_max on their directory).
    expected |= {("epoch_150k_util_inline", "stripefs"), ("epoch_150k_rate_inline", "stripefs")}
    # The tiered checkpoint save (the stripefs.checkpoint attributes): stripefs only; the
    # one variant allowed to fail, and only for want of the attributes in the mount.
    failures = doc["config"]["failures"]
    if failures:
        assert len(failures) == 1 and "tiered" in failures[0] and "does not support it yet" in failures[0], failures
    else:
        expected |= {("ckpt_save_blocked_tiered_s", "stripefs"), ("ckpt_durable_tiered_s", "stripefs")}
    assert got == expected
    for row in rows:
        if row["target"] != "raw" and row["metric"] != "mount_peak_rss":
            assert row["ratio_raw"] is not None and row["ratio_raw"] > 0
    # Seconds: the ratio is the reference's time over this one's; the tiered save's is to
    # the same bytes written to local disk without fsync, not to the raw synchronous save.
    row_of = {(row["metric"], row["target"]): row for row in rows}

    def raw_ratio(metric: str, raw_metric: str) -> float:
        return row_of[raw_metric, "raw"]["value"] / row_of[metric, "stripefs"]["value"]

    assert row_of["ckpt_save_blocked_s", "stripefs"]["ratio_raw"] == pytest.approx(
        raw_ratio("ckpt_save_blocked_s", "ckpt_save_blocked_s"))
    if ("ckpt_save_blocked_tiered_s", "stripefs") in row_of:
        assert row_of["ckpt_save_blocked_tiered_s", "stripefs"]["ratio_raw"] == pytest.approx(
            raw_ratio("ckpt_save_blocked_tiered_s", "ckpt_local_disk_s"))

    # Torn down: no mount left under the work directory, and the directory removed.
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    assert not any(work.iterdir())


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_metadata_engines_run_prints_its_tables():
    """Workload 7 (scripts/bench_meta.py): a cluster per configuration (SQLite; PostgreSQL
    with one and with two metaservers), all measured and torn down."""
    res = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "7"],
        capture_output=True, text=True, timeout=290, cwd=REPO_ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| ")]
    engines = {(cells[0].strip(), cells[1].strip()) for cells in rows if cells[0].strip() in ("sqlite", "postgres")}
    assert engines == {("sqlite", "1"), ("postgres", "1"), ("postgres", "2")}
    for cells in rows:
        if cells[0].strip() in ("sqlite", "postgres"):
            values = [float(c.replace(",", "")) for c in cells[1:]]
            assert all(v >= 0 for v in values) and values[:3] != [0, 0, 0], cells


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_label_queries_run_prints_its_table():
    """Workload 8 (scripts/bench_labels.py): a labelled dataset made, every query run and
    its count checked against the dataset's rule (the script fails otherwise)."""
    res = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "8"],
        capture_output=True, text=True, timeout=290, cwd=REPO_ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| ")]
    queries = [cells for cells in rows if "=" in cells[0]]
    assert len(queries) == 5, res.stdout
    for cells in queries:
        count, first, _, rate = (c.strip() for c in cells[1:])
        assert int(count.replace(",", "")) > 0 and float(first) >= 0 and float(rate.replace(",", "")) > 0, cells
