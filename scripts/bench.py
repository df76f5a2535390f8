"""The stripefs benchmark: the workloads of AI training, side by side in one run, on the raw
local disk, a stripefs mount, the stripefs client library without FUSE, and (optionally)
a MooseFS mount, on this machine.

It owns the whole life of what it measures: a fresh stripefs cluster (one metaserver, three
data servers, a FUSE mount) and, with `--peer moosefs`, a MooseFS cluster (one master, three
chunk servers, mfsmount) inside a network namespace it creates, all under one temporary
work directory on the same file system as the raw-disk scratch directory. Everything is
torn down on the way out, whatever happened (see `Bench.close`).

Replication R is a property of a directory: `stripefs.replicas` on stripefs, the goal
(`mfssetgoal`) on MooseFS. Each R in `--replicas` gets its own directory on each system.

Ratios are speed ratios: target / reference for rates, reference / target for times, so
more than 1 always means "faster than the reference". Reported figures are the median of
`--runs` runs. Run it through `scripts/bench`; `docs/benchmark.md` describes the workloads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import importlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from stripefs import mounts

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000  # MB/s figures are decimal, as dd and fio print them
MiB = 1 << 20
KiB = 1 << 10

#: How long a MooseFS daemon may take to come up, or all chunk servers to register.
peer_start_timeout_s = 30.0
#: How long a MooseFS daemon may take to exit after SIGTERM (the master saves metadata).
peer_stop_grace_s = 30.0
#: Mount and unmount deadlines.
mount_timeout_s = 30.0
#: The file name the checkpoint workloads share (workloads 1, 2 and 6).
CKPT_NAME = "ckpt.bin"
#: Seed of the shuffled read order and the random offsets, the same for every target.
SHUFFLE_SEED = 20240611
#: Workload 11: the marker that says a checkpoint directory is complete (the synchronous
#: save writes it; stripefs's tiered save writes it once every shard is durable) ...
CKPT_MARKER = "_COMMITTED"
#: ... and the directory attributes of the tiered save: its mode, set before the shards are
#: written; its commit, set once they are closed; the bytes not yet durable, read-only.
CKPT_MODE_XATTR = "stripefs.checkpoint"
CKPT_COMMIT_XATTR = "stripefs.checkpoint.commit"
CKPT_PENDING_XATTR = "stripefs.checkpoint.pending"
#: How often the tiered save's marker is looked for, and for how long at most.
ckpt_durable_poll_s = 0.05
ckpt_durable_timeout_s = 600.0


@dataclass(frozen=True)
class Sizes:
    """The size of every workload; `QUICK` is for the smoke test."""

    ckpt_bytes: int = 1 << 30
    io_bytes: int = 1 * MiB
    shards: int = 4
    shard_bytes: int = 256 * MiB
    dataset_files: int = 10_000
    dataset_dirs: int = 100
    sample_bytes: int = 16 * KiB
    meta_files: int = 10_000
    meta_procs: int = 8  # the parallel variant: this many processes, one directory each,
    #                      meta_files / meta_procs files each
    random_io_bytes: int = 4 * KiB
    random_reads: int = 20_000  # at most this many random reads ...
    random_read_s: float = 10.0  # ... or for at most this long, whichever comes first
    lock_pairs: int = 2_000  # fcntl lock + unlock pairs on one file
    # Workload 9, a training epoch: a dataset per sample size (16 KiB, 150 KiB) ...
    epoch_files_16k: int = 8_000
    epoch_files_150k: int = 4_000
    epoch_dirs: int = 100
    # ... read in batches by data-loader worker processes, each at most this many batches
    # ahead of the trainer (PyTorch's DataLoader: num_workers, prefetch_factor) ...
    epoch_batch: int = 32
    epoch_workers: int = 8
    epoch_prefetch_factor: int = 2
    # ... while the trainer spends this long on each batch (simulated accelerator compute;
    # chosen so that MooseFS's reads are the bottleneck: docs/benchmark.md, workload 9; with
    # --peer moosefs each run calibrates it instead: EPOCH_CALIBRATION_SHARE).
    epoch_compute_16k_s: float = 0.011
    epoch_compute_150k_s: float = 0.025
    # Workload 10, training epochs of large samples as MLPerf Storage (DLIO) has them: one
    # sample a file, about 2 MiB (CosmoFlow) and 140 MiB (U-Net3D), in epoch_dirs directories,
    # read by workload 9's data loader with batches of their own ...
    epoch_files_2m: int = 400
    epoch_files_140m: int = 12
    epoch_batch_2m: int = 4
    epoch_batch_140m: int = 1
    # ... and compute per batch, chosen so that MooseFS's reads are the bottleneck: about
    # half the time its 8 workers took to load a batch on this machine when busy (40 ms,
    # 581 ms), so that it stays below 90 % when quieter too (docs/benchmark.md, workload 10).
    epoch_compute_2m_s: float = 0.020
    epoch_compute_140m_s: float = 0.300
    # Workload 11, a sharded checkpoint saved and restored (DLIO's checkpointing): one shard
    # a rank, written and read in io_bytes pieces.
    ckpt_ranks: int = 8
    ckpt_shard_bytes: int = 64 * MiB


FULL = Sizes()
#: With --peer moosefs (and no --epoch-compute / --large-epoch-compute), the compute per
#: batch of workloads 9 and 10 is set at the start of the run to this share of the time
#: MooseFS's workers take to load a batch when there is no compute at all: its reads are then
#: the bottleneck (utilisation about this share) on a quiet machine and a busy one alike,
#: where a fixed time chosen once drifts above 90 % as the machine's state moves.
EPOCH_CALIBRATION_SHARE = 0.75
#: The compute per batch of the calibrating epoch (as good as none).
EPOCH_CALIBRATION_COMPUTE_S = 0.0001
#: Workload 9 on stripefs also reads the samples of this tag from a directory whose
#: `stripefs.inline_max` is EPOCH_INLINE_MAX (the default, 64 KiB, is below a 150 KiB
#: sample): each sample's bytes are then kept by the metaserver and come with the open, as
#: a 16 KiB sample's do, instead of from a data server (Lustre's data-on-MDT).
EPOCH_INLINE_TAG = "150k"
EPOCH_INLINE_MAX = 256 * KiB
QUICK = Sizes(
    ckpt_bytes=8 * MiB, shard_bytes=2 * MiB, dataset_files=200, dataset_dirs=10,
    meta_files=200, random_reads=500, random_read_s=2.0, lock_pairs=50,
    epoch_files_16k=256, epoch_files_150k=256, epoch_dirs=8, epoch_batch=8,
    epoch_compute_16k_s=0.001, epoch_compute_150k_s=0.001,
    epoch_files_2m=16, epoch_files_140m=1, epoch_compute_2m_s=0.001, epoch_compute_140m_s=0.001,
    ckpt_shard_bytes=2 * MiB,
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    workload: int
    lower_is_better: bool = False
    #: The metric whose raw and peer figures this one's ratios are against (a variant only
    #: stripefs runs: workload 9 with the sampler hint), when not this one.
    reference: Optional[str] = None
    #: The metric whose raw figure this one's raw ratio is against, when not `reference`
    #: (workload 11's tiered save: against the same bytes written to local disk unsynced).
    raw_reference: Optional[str] = None
    #: Measured on the raw disk alone, as a reference: shown in each R's block where its
    #: workload ran (there is no stripefs or peer figure to show it with).
    raw_only: bool = False


METRICS = [
    Metric("ckpt_write", "checkpoint write", "MB/s", 1),
    Metric("mount_peak_rss", "mount peak RSS during checkpoint write", "MiB", 1, lower_is_better=True),
    Metric("ckpt_read", "checkpoint read, cold", "MB/s", 2),
    Metric("shard_write", "sharded write, aggregate", "MB/s", 3),
    Metric("shard_write_slowest", "sharded write, slowest rank", "MB/s", 3),
    Metric("shard_read", "sharded read cold, aggregate", "MB/s", 3),
    Metric("shard_read_slowest", "sharded read cold, slowest rank", "MB/s", 3),
    Metric("shard_read_mounts", "sharded read cold, 4 mounts, aggregate", "MB/s", 3),
    Metric("shard_read_mounts_slowest", "sharded read cold, 4 mounts, slowest rank", "MB/s", 3),
    Metric("dataset_write", "dataset write", "files/s", 4),
    Metric("dataset_read", "dataset read, cold, shuffled", "files/s", 4),
    Metric("create", "create", "ops/s", 5),
    Metric("stat", "stat, cold", "ops/s", 5),
    Metric("unlink", "unlink", "ops/s", 5),
    Metric("ls_l", "ls -l, cold", "s", 5, lower_is_better=True),
    Metric("create_par", "create, 8 processes", "ops/s", 5),
    Metric("stat_par", "stat, cold, 8 processes", "ops/s", 5),
    Metric("unlink_par", "unlink, 8 processes", "ops/s", 5),
    Metric("lock_unlock", "fcntl lock + unlock, uncontended", "pairs/s", 5),
    Metric("random_read", "random 4 KiB reads, cold", "IOPS", 6),
    Metric("epoch_16k_util", "training epoch 16 KiB, accelerator utilisation", "%", 9),
    Metric("epoch_16k_util_hint", "training epoch 16 KiB, with sampler hint, utilisation", "%", 9,
           reference="epoch_16k_util"),
    Metric("epoch_16k_rate", "training epoch 16 KiB", "samples/s", 9),
    Metric("epoch_16k_rate_hint", "training epoch 16 KiB, with sampler hint", "samples/s", 9,
           reference="epoch_16k_rate"),
    Metric("epoch_150k_util", "training epoch 150 KiB, accelerator utilisation", "%", 9),
    Metric("epoch_150k_util_hint", "training epoch 150 KiB, with sampler hint, utilisation", "%", 9,
           reference="epoch_150k_util"),
    Metric("epoch_150k_rate", "training epoch 150 KiB", "samples/s", 9),
    Metric("epoch_150k_rate_hint", "training epoch 150 KiB, with sampler hint", "samples/s", 9,
           reference="epoch_150k_rate"),
    # stripefs only: the 150 KiB samples in a directory whose stripefs.inline_max holds them
    # (EPOCH_INLINE_MAX: their bytes kept by the metaserver, as Lustre's data-on-MDT).
    Metric("epoch_150k_util_inline", "training epoch 150 KiB, inline_max 256 KiB, utilisation", "%", 9,
           reference="epoch_150k_util"),
    Metric("epoch_150k_rate_inline", "training epoch 150 KiB, inline_max 256 KiB", "samples/s", 9,
           reference="epoch_150k_rate"),
    # CPU time of the file system's own processes over the epoch (no hint), per sample read:
    # where a small sample's cost lies, stripefs's Python against MooseFS's C (role_pids).
    Metric("epoch_16k_cpu_mount", "training epoch 16 KiB, CPU a sample: mount", "ms", 9, lower_is_better=True),
    Metric("epoch_16k_cpu_meta", "training epoch 16 KiB, CPU a sample: metadata server", "ms", 9,
           lower_is_better=True),
    Metric("epoch_16k_cpu_data", "training epoch 16 KiB, CPU a sample: data servers", "ms", 9, lower_is_better=True),
    Metric("epoch_150k_cpu_mount", "training epoch 150 KiB, CPU a sample: mount", "ms", 9, lower_is_better=True),
    Metric("epoch_150k_cpu_meta", "training epoch 150 KiB, CPU a sample: metadata server", "ms", 9,
           lower_is_better=True),
    Metric("epoch_150k_cpu_data", "training epoch 150 KiB, CPU a sample: data servers", "ms", 9,
           lower_is_better=True),
    Metric("epoch_150k_inline_cpu_mount", "training epoch 150 KiB, inline_max 256 KiB, CPU a sample: mount", "ms", 9,
           lower_is_better=True, reference="epoch_150k_cpu_mount"),
    Metric("epoch_150k_inline_cpu_meta", "training epoch 150 KiB, inline_max 256 KiB, CPU a sample: metadata server",
           "ms", 9, lower_is_better=True, reference="epoch_150k_cpu_meta"),
    Metric("epoch_2m_util", "training epoch 2 MiB, accelerator utilisation", "%", 10),
    Metric("epoch_2m_util_hint", "training epoch 2 MiB, with sampler hint, utilisation", "%", 10,
           reference="epoch_2m_util"),
    Metric("epoch_2m_rate", "training epoch 2 MiB", "samples/s", 10),
    Metric("epoch_2m_rate_hint", "training epoch 2 MiB, with sampler hint", "samples/s", 10,
           reference="epoch_2m_rate"),
    Metric("epoch_140m_util", "training epoch 140 MiB, accelerator utilisation", "%", 10),
    Metric("epoch_140m_util_hint", "training epoch 140 MiB, with sampler hint, utilisation", "%", 10,
           reference="epoch_140m_util"),
    Metric("epoch_140m_rate", "training epoch 140 MiB", "samples/s", 10),
    Metric("epoch_140m_rate_hint", "training epoch 140 MiB, with sampler hint", "samples/s", 10,
           reference="epoch_140m_rate"),
    Metric("ckpt_save_blocked_s", "checkpoint save, 8 ranks, fsync, blocked", "s", 11, lower_is_better=True),
    Metric("ckpt_local_disk_s", "checkpoint save, 8 ranks, local disk, no fsync", "s", 11,
           lower_is_better=True, raw_only=True),
    Metric("ckpt_save_blocked_tiered_s", "checkpoint save, 8 ranks, tiered, blocked", "s", 11,
           lower_is_better=True, reference="ckpt_save_blocked_s", raw_reference="ckpt_local_disk_s"),
    Metric("ckpt_durable_tiered_s", "checkpoint save, 8 ranks, tiered, until durable", "s", 11,
           lower_is_better=True, reference="ckpt_save_blocked_s"),
    Metric("ckpt_restore_mbs", "checkpoint restore, 8 ranks, cold, aggregate", "MB/s", 11),
]
METRIC_BY_KEY = {m.key: m for m in METRICS}
ALL_WORKLOADS = (1, 2, 3, 4, 5, 6, 9, 10, 11)
#: Workload 7 runs alone, on clusters of its own: the metadata engines (scripts/bench_meta.py).
META_ENGINES_WORKLOAD = 7
#: Workload 8 runs alone too: label queries over a labelled dataset (scripts/bench_labels.py).
LABELS_WORKLOAD = 8
#: The workloads that run alone, and the script each is.
ALONE_WORKLOADS = {META_ENGINES_WORKLOAD: "bench_meta", LABELS_WORKLOAD: "bench_labels"}
#: Workloads the client library runs (it has no processes, directories of samples or ls).
LIB_WORKLOADS = (1, 2)

RAW, STRIPEFS, LIB, PEER = "raw", "stripefs", "stripefs-lib", "moosefs"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """Something the benchmark needs could not be set up; the message says what."""


# ---------------------------------------------------------------------- machine helpers


def drop_caches() -> bool:
    """Writes dirty pages back and empties the page, dentry and inode caches; False when
    not allowed (not root), which the report then says."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def alone(prefix: str, postgres: bool) -> Iterator[tuple[Path, Any]]:
    """(work directory, private PostgreSQL or None) of a workload that runs alone (7, 8):
    SIGTERM tears down as Ctrl-C does; PostgreSQL is stopped and the directory removed on
    the way out (left in place, and said so, if a mount under it is still there)."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    pg = None

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        if postgres:
            sys.path.insert(0, str(REPO_ROOT / "tests"))
            from pg import Postgres

            pg = Postgres.temporary()
            pg.start()
        yield work, pg
    finally:
        if pg is not None:
            pg.close()
        left = mounts.mounted_under(work)
        if left:
            log(f"still mounted, so {work} is left in place: {', '.join(left)}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def wait_mounted(path: Path, alive: Callable[[], bool], what: str, logs: str = "") -> None:
    problem = mounts.wait_mounted(path, alive, mount_timeout_s)
    if problem is not None:
        raise BenchError(f"{what}: {problem}\n{logs}")


def peak_rss_reset(pid: int) -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0), so the peak read afterwards
    # belongs to the workload, not to the mount's whole life.
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    """For each group of processes: the user and system CPU seconds used so far by its
    processes (all their threads) and by every live process under them. One pass over
    /proc for all the groups (none when there are none)."""
    if not groups:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # (the name may hold spaces)
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry))
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick

    def tree(pids: list[int]) -> float:
        total, todo, seen = 0.0, list(pids), set()
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.add(pid)
                total += used.get(pid, 0.0)
                todo.extend(children.get(pid, ()))
        return total

    return {name: tree(pids) for name, pids in groups.items()}


def machine_info(work_dir: Path) -> dict:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usage = shutil.disk_usage(work_dir)
    fs_dev = subprocess.run(["df", "--output=source,fstype", str(work_dir)], capture_output=True,
                            text=True).stdout.splitlines()[-1].split()
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "work_dir": str(work_dir),
        "file_system": " ".join(fs_dev),
        "disk_free_gib": round(usage.free / (1 << 30), 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "stripefs_commit": commit,
    }


# ---------------------------------------------------------------------- workloads on paths
#
# Each function does one timed thing on a path and returns seconds (or a small dict);
# the caller turns it into a rate. They run in the bench process or in spawned worker
# processes, so they import nothing heavy.


def write_file(path: str, size: int, io_bytes: int, fsync: bool = True) -> float:
    buf = memoryview(os.urandom(io_bytes))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            n = os.write(fd, buf[: min(io_bytes, left)])
            left -= n
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def read_file(path: str, io_bytes: int, expect: int) -> float:
    buf = bytearray(io_bytes)
    got = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            got += n
    elapsed = time.perf_counter() - t0
    if got != expect:
        raise BenchError(f"{path}: read {got} bytes, expected {expect}")
    return elapsed


def shard_worker(kind: str, path: str, final: str, size: int, io_bytes: int, barrier, results) -> None:
    """One rank of a sharded checkpoint: waits for the others, then writes its shard
    (`write`: under the temporary name `path`, fsync, rename to `final`, as workload 3's
    ranks; `save`: as `final`, fsync; `save-nofsync`: as `final`, closed unsynced, as
    workload 11's ranks) or reads it (`read`); reports (start, end) on the monotonic clock,
    which is the same for every process of the machine."""
    try:
        barrier.wait()
        start = time.monotonic()
        if kind == "write":
            write_file(path, size, io_bytes)
            os.rename(path, final)
        elif kind in ("save", "save-nofsync"):
            write_file(final, size, io_bytes, fsync=kind == "save")
        else:
            read_file(final, io_bytes, size)
        results.put(("ok", start, time.monotonic()))
    except BaseException as exc:  # reported to the parent, which fails the workload
        results.put(("error", repr(exc), 0.0))


def run_together(target: Callable, arg_lists: list[tuple],
                 alongside: Optional[Callable[[], None]] = None) -> list[tuple[float, float]]:
    """Runs target(*args, barrier, results) in one process per entry of arg_lists, started
    together behind a barrier; returns each process's (start, end) on the monotonic clock.
    A process that failed fails the workload. With `alongside`, the bench process passes
    the barrier too and runs alongside() while they run (the trainer of workload 9); if it
    fails, the processes are killed."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(arg_lists) + (alongside is not None))
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for args in arg_lists]
    for p in procs:
        p.start()
    done = False
    try:
        if alongside is not None:
            barrier.wait(timeout=120)
            alongside()
        spans = [results.get(timeout=3600) for _ in procs]
        done = True
    finally:
        for p in procs:
            if not done and alongside is not None:
                p.kill()  # waiting for the failed trainer's next slot: never coming
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [s[1] for s in spans if s[0] != "ok"]
    if errors:
        raise BenchError(f"{target.__name__} failed: {errors[0]}")
    return [(s[1], s[2]) for s in spans]


def shard_spans(kind: str, directory: Path | list[Path], sizes: Sizes) -> list[tuple[float, float]]:
    """`sizes.shards` ranks of shard_worker doing `kind` together; each rank's (start, end).
    `directory`: the shards' directory, or one per rank (the same directory through
    different mounts)."""
    dirs = directory if isinstance(directory, list) else [directory] * sizes.shards
    return run_together(shard_worker, [
        (kind, str(dirs[rank] / f"shard-{rank}.tmp"), str(dirs[rank] / f"shard-{rank}.pt"),
         sizes.shard_bytes, sizes.io_bytes)
        for rank in range(sizes.shards)
    ])


def run_shards(kind: str, directory: Path | list[Path], sizes: Sizes) -> tuple[float, float]:
    """Aggregate MB/s (all bytes over first start to last end) and the slowest rank's MB/s
    of shard_spans."""
    spans = shard_spans(kind, directory, sizes)
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    slowest = max(end - start for start, end in spans)
    total = sizes.shards * sizes.shard_bytes
    return total / wall / MB, sizes.shard_bytes / slowest / MB


def ckpt_shards(s: Sizes) -> Sizes:
    """Workload 11's checkpoint as workload 3's helpers (shard_spans, run_shards) take it."""
    return dataclasses.replace(s, shards=s.ckpt_ranks, shard_bytes=s.ckpt_shard_bytes)


def ckpt_save(step: Path, kind: str, sizes: Sizes, begin: Callable[[Path], None] = Path.mkdir,
              commit: Callable[[Path], None] = lambda step: None) -> float:
    """One save of workload 11 into the new directory `step`: begin(step) (make it), the
    ranks writing their shards together (shard_worker's `save` or `save-nofsync`), then,
    once every rank has closed its shard, commit(step); begin and commit run in this
    process, as a trainer's rank 0 would run them. Seconds the
    training is blocked: begin, the ranks' first start to last close, commit; not the
    ranks' process start-up and exit, which a trainer's long-lived ranks do not pay."""
    t0 = time.monotonic()
    begin(step)
    began = time.monotonic() - t0
    spans = shard_spans(kind, step, ckpt_shards(sizes))
    t0 = time.monotonic()
    commit(step)
    return began + max(end for _, end in spans) - min(start for start, _ in spans) + time.monotonic() - t0


def commit_marker(step: Path) -> None:
    """The synchronous save's commit: an empty marker, fsync'd under a temporary name and
    renamed into place, so that it exists only whole."""
    tmp = step / (CKPT_MARKER + ".tmp")
    write_file(str(tmp), 0, 1)
    os.rename(tmp, step / CKPT_MARKER)


def set_xattr(path: Path, name: str, value: bytes) -> None:
    """setxattr, its error naming the attribute (a mount may support one and not another)."""
    try:
        os.setxattr(path, name, value)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror} (setxattr {name})", str(path)) from None


def begin_tiered(step: Path) -> None:
    """The tiered save's start: the directory, marked for an asynchronous checkpoint, so
    that its shards close once in the mount's local staging area."""
    step.mkdir()
    set_xattr(step, CKPT_MODE_XATTR, b"async")


def commit_tiered(step: Path) -> None:
    """The tiered save's commit: returns at once; the mount writes the marker once every
    shard is durable on the directory's R data servers."""
    set_xattr(step, CKPT_COMMIT_XATTR, b"1")


def wait_committed(step: Path) -> float:
    """Seconds until the tiered save's marker exists, looked for every ckpt_durable_poll_s."""
    t0 = time.monotonic()
    # A listing, not a lookup: the kernel may keep a negative entry for the marker's name
    # for up to the mount's entry timeout, and the mount creates the marker itself, not
    # through the kernel; a listing is asked of the mount every time.
    while CKPT_MARKER not in os.listdir(step):
        if time.monotonic() - t0 > ckpt_durable_timeout_s:
            pending = int(os.getxattr(step, CKPT_PENDING_XATTR))
            raise BenchError(f"{step}: no {CKPT_MARKER} after {ckpt_durable_timeout_s:.0f} s, "
                             f"{pending} bytes not yet durable")
        time.sleep(ckpt_durable_poll_s)
    return time.monotonic() - t0


def meta_worker(phase: str, names: list[str], barrier, results) -> None:
    """One process of the parallel metadata workload: one phase over its own names."""
    try:
        barrier.wait()
        start = time.monotonic()
        for p in names:
            if phase == "create":
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            elif phase == "stat":
                os.stat(p)
            else:
                os.unlink(p)
        results.put(("ok", start, time.monotonic()))
    except BaseException as exc:  # reported to the parent, which fails the workload
        results.put(("error", repr(exc), 0.0))


def run_parallel(phase: str, groups: list[list[str]]) -> float:
    """Aggregate ops/s of one phase run by one process per group of names, started together."""
    spans = run_together(meta_worker, [(phase, names) for names in groups])
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return sum(len(g) for g in groups) / wall


def lock_pairs(path: Path, pairs: int) -> float:
    """A write lock on the whole file then its release, `pairs` times, with nobody else
    holding or wanting it (what SQLite or filelock pay per transaction); pairs/s."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(pairs):
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(fd, fcntl.LOCK_UN)
        secs = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return pairs / secs


def dataset_paths(directory: Path, sizes: Sizes) -> list[Path]:
    per_dir = -(-sizes.dataset_files // sizes.dataset_dirs)
    return [directory / f"d{i // per_dir:03d}" / f"sample-{i:05d}.bin" for i in range(sizes.dataset_files)]


def dataset_write(directory: Path, sizes: Sizes, xattrs: Optional[dict[str, bytes]] = None) -> float:
    """Writes the dataset (`xattrs` set on its directory first); the seconds it took."""
    sample = os.urandom(sizes.sample_bytes)
    paths = dataset_paths(directory, sizes)
    t0 = time.perf_counter()
    directory.mkdir()
    for name, value in (xattrs or {}).items():
        set_xattr(directory, name, value)
    made: set[Path] = set()
    for p in paths:
        if p.parent not in made:
            p.parent.mkdir()
            made.add(p.parent)
        with open(p, "wb") as f:
            f.write(sample)
    return time.perf_counter() - t0


def dataset_read(directory: Path, sizes: Sizes) -> float:
    paths = dataset_paths(directory, sizes)
    random.Random(SHUFFLE_SEED).shuffle(paths)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            if len(f.read()) != sizes.sample_bytes:
                raise BenchError(f"{p}: short sample")
    return time.perf_counter() - t0


def random_reads(path: Path, sizes: Sizes, file_bytes: int) -> float:
    """IOPS of single-threaded 4 KiB preads at aligned random offsets."""
    rng = random.Random(SHUFFLE_SEED)
    slots = file_bytes // sizes.random_io_bytes
    fd = os.open(path, os.O_RDONLY)
    try:
        # Kernel readahead would turn each 4 KiB read into a bigger one; this workload is
        # about the latency of one small read, on every target alike.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + sizes.random_read_s
        while done < sizes.random_reads:
            os.pread(fd, sizes.random_io_bytes, rng.randrange(slots) * sizes.random_io_bytes)
            done += 1
            if done % 64 == 0 and time.perf_counter() > deadline:
                break
        return done / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def epoch_worker(batches: list[list[str]], sample_bytes: int, io_bytes: int, slots, ready, barrier,
                 results) -> None:
    """One data-loader worker of the training epoch (workloads 9 and 10): its batches in
    order, each started only with a slot from the trainer (`slots`, a semaphore: the trainer
    gives `epoch_prefetch_factor` to begin with and one more as it takes each of this
    worker's batches); every sample opened, read whole (in `io_bytes` pieces) and closed.
    Puts ("ok", when) on `ready` as each batch is loaded, ("error", why) if one could not be."""
    try:
        barrier.wait()
        start = time.monotonic()
        for batch in batches:
            slots.acquire()
            for p in batch:
                read_file(p, io_bytes, sample_bytes)
            ready.put(("ok", time.monotonic()))
        results.put(("ok", start, time.monotonic()))
    except BaseException as exc:  # reported to the trainer and the parent: the epoch fails
        ready.put(("error", repr(exc)))
        results.put(("error", repr(exc), 0.0))


def write_prefetch_plan(control: Path, order: list[str]) -> None:
    """The sampler hint: the whole read order, one absolute path a line, into the mount's
    prefetch control file."""
    try:
        with open(control, "w", encoding="utf-8") as f:
            f.write("".join(p + "\n" for p in order))
    except OSError as exc:
        raise BenchError(f"the mount has no prefetch control file: {exc}") from None


def run_epoch(paths: list[Path], sample_bytes: int, compute_s: float, sizes: Sizes,
              hint: Optional[Path] = None) -> tuple[float, float]:
    """One training epoch over `paths` (workloads 9 and 10), as a PyTorch DataLoader with
    `epoch_workers` worker processes runs it: the shuffled order cut into batches, batch k
    loaded by worker k % workers, at most `epoch_prefetch_factor` batches per worker loaded
    ahead of the trainer. The trainer (this process) takes batches 0, 1, 2, ... and sleeps
    `compute_s` on each. The clock starts when every worker is up; with `hint` (a prefetch
    control file), the trainer first writes the whole read order there, on the clock, and
    only then lets the workers start. Returns (accelerator utilisation in %: the compute's
    share of the wall time to the end of the last batch's compute, samples/s)."""
    order = [str(p) for p in paths]
    random.Random(SHUFFLE_SEED).shuffle(order)
    batches = [order[i: i + sizes.epoch_batch] for i in range(0, len(order), sizes.epoch_batch)]
    workers = sizes.epoch_workers
    ctx = multiprocessing.get_context("spawn")
    slots = [ctx.Semaphore(0) for _ in range(workers)]
    ready = [ctx.Queue() for _ in range(workers)]
    wall: list[float] = []

    def trainer() -> None:
        t0 = time.monotonic()
        if hint is not None:
            write_prefetch_plan(hint, order)
            log(f"  sampler hint: {len(order)} paths written in {time.monotonic() - t0:.2f} s")
        for s in slots:
            for _ in range(sizes.epoch_prefetch_factor):
                s.release()
        for k in range(len(batches)):
            status, value = ready[k % workers].get(timeout=3600)
            if status != "ok":
                raise BenchError(f"epoch_worker failed: {value}")
            slots[k % workers].release()
            time.sleep(compute_s)
        wall.append(time.monotonic() - t0)

    # Small samples in one read, as a whole-file read() makes them; large ones in
    # io_bytes pieces, so that 8 workers do not each hold a 140 MiB sample at once.
    io_bytes = min(sample_bytes, sizes.io_bytes)
    run_together(epoch_worker, [(batches[w::workers], sample_bytes, io_bytes, slots[w], ready[w])
                                for w in range(workers)], alongside=trainer)
    return 100 * len(batches) * compute_s / wall[0], len(order) / wall[0]


def epoch_datasets(s: Sizes, workload: int) -> list[tuple[str, Sizes, float]]:
    """The two sample sizes of workload 9 (16 KiB, 150 KiB) or 10 (2 MiB, 140 MiB): (metric
    tag, the dataset as workload 4's helpers dataset_paths and dataset_write take it and
    run_epoch its batch size, compute seconds per batch)."""
    kinds = {
        9: (("16k", s.epoch_files_16k, 16 * KiB, s.epoch_batch, s.epoch_compute_16k_s),
            ("150k", s.epoch_files_150k, 150 * KiB, s.epoch_batch, s.epoch_compute_150k_s)),
        10: (("2m", s.epoch_files_2m, 2 * MiB, s.epoch_batch_2m, s.epoch_compute_2m_s),
             ("140m", s.epoch_files_140m, 140 * MiB, s.epoch_batch_140m, s.epoch_compute_140m_s)),
    }
    return [(tag, dataclasses.replace(s, dataset_files=files, dataset_dirs=s.epoch_dirs, sample_bytes=sample,
                                      epoch_batch=batch), compute_s)
            for tag, files, sample, batch, compute_s in kinds[workload]]


# ---------------------------------------------------------------------- client library


def lib_job(kind: str, meta_addr: str, credentials: str, dir_names: list[str], name: str,
            size: int, io_bytes: int, results) -> None:
    """Workload 1 or 2 through stripefs.client in trio, in a process of its own (a fresh client,
    and no gRPC threads left in the bench process that spawns the shard workers)."""
    try:
        import errno

        import trio

        from stripefs.client import Ctx, FsError, open_client
        from stripefs.proto.credentials import load_credentials
        from stripefs.proto.types import ROOT_INODE

        root = Ctx(0, 0, 0)

        async def main() -> float:
            # This process does not fork: its streams may run on the asyncio loop, as a
            # mount's do (fs/client/transport.py; the library's default is gRPC's threads).
            async with open_client(meta_addr, load_credentials(credentials), rpc_loop=True) as client:
                ino = ROOT_INODE
                for d in dir_names:
                    ino = (await client.lookup(ino, d.encode())).ino
                if kind == "write":
                    try:
                        await client.unlink(ino, name.encode(), root)
                    except FsError as exc:
                        if exc.errno != errno.ENOENT:
                            raise
                    buf = os.urandom(io_bytes)
                    t0 = time.perf_counter()
                    fh, _ = await client.create(ino, name.encode(), 0o644, os.O_WRONLY, root)
                    for off in range(0, size, io_bytes):
                        await client.write(fh, off, buf[: min(io_bytes, size - off)])
                    await client.flush(fh)
                    await client.release(fh)
                    return time.perf_counter() - t0
                t0 = time.perf_counter()
                file_ino = (await client.lookup(ino, name.encode())).ino
                fh, _, _ = await client.open(file_ino, os.O_RDONLY)
                got = 0
                while piece := await client.read(fh, got, io_bytes):
                    got += len(piece)
                await client.release(fh)
                elapsed = time.perf_counter() - t0
                if got != size:
                    raise BenchError(f"library read {got} bytes, expected {size}")
                return elapsed

        results.put(("ok", trio.run(main)))
    except BaseException as exc:
        results.put(("error", repr(exc)))


def in_process(target: Callable, args: tuple, what: str, timeout_s: float = 3600) -> Any:
    """target(*args, results) in a fresh (spawned) process, which puts ("ok", value) or
    ("error", why) on `results`; the value, or BenchError naming `what`."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, results))
    p.start()
    try:
        status, value = results.get(timeout=timeout_s)
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
            p.join()
    if status != "ok":
        raise BenchError(f"{what} failed: {value}")
    return value


def run_lib(kind: str, meta_addr: str, credentials: Path, dir_names: list[str], name: str,
            sizes: Sizes) -> float:
    return in_process(lib_job, (kind, meta_addr, str(credentials), dir_names, name, sizes.ckpt_bytes,
                                sizes.io_bytes), f"client library {kind}")


# ---------------------------------------------------------------------- targets


class Target:
    """A place the workloads run: a directory per R, and a way to make the next read cold."""

    name = ""

    def directory(self, replicas: int) -> Path:
        raise NotImplementedError

    def cold(self) -> None:
        """Empties every cache between the workload and the disk."""
        drop_caches()

    def mount_pid(self) -> Optional[int]:
        return None

    def role_pids(self) -> dict[str, list[int]]:
        """The process ids of the file system's mount ("mount"), metadata server(s) ("meta")
        and data servers ("data"); none for the local disk."""
        return {}

    def more_mounts(self, count: int) -> list[Path]:
        """`count` more mounts of the same file system (fresh processes), as the roots that
        stand for this target's mount point; dropped by drop_more_mounts."""
        return [self.root] * count

    def drop_more_mounts(self) -> None:
        pass

    @property
    def root(self) -> Path:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RawTarget(Target):
    name = RAW

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir()

    def directory(self, replicas: int) -> Path:
        return self.base  # a local disk has one copy whatever R is

    @property
    def root(self) -> Path:
        return self.base


class StripefsTarget(Target):
    """A fresh local cluster (tests/cluster.py starts the real CLI's processes) and its mount."""

    name = STRIPEFS

    def __init__(self, base: Path, replicas: list[int]) -> None:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from cluster import Cluster  # the harness the end-to-end tests use

        self.cluster = Cluster(base, dataservers=3)
        #: More flags of the mount `cold` brings up: none, except inside `staging`.
        self.mount_args: list[str] = []
        try:
            self.mnt = base / "mnt"
            self.mount = self.cluster.mount(self.mnt, timeout=mount_timeout_s)
            for r in replicas:
                d = self.mnt / f"r{r}"
                d.mkdir()
                os.setxattr(d, "stripefs.replicas", str(r).encode())
                got = os.getxattr(d, "stripefs.replicas")
                if got != str(r).encode():
                    raise BenchError(f"{d}: stripefs.replicas reads back {got!r}, set {r}")
        except BaseException:
            self.cluster.close()
            raise

    def directory(self, replicas: int) -> Path:
        return self.mnt / f"r{replicas}"

    def cold(self) -> None:
        # A new mount process: no client block cache, no kernel page or attribute cache.
        self.mount.close()
        self.cluster.mounts.remove(self.mount)
        drop_caches()
        self.mount = self.cluster.mount(self.mnt, timeout=mount_timeout_s, args=self.mount_args)

    @contextlib.contextmanager
    def staging(self) -> Iterator[None]:
        """The mount with a local disk tier (`--cache-dir`, under the work directory) while
        the block runs: workload 11's tiered save stages its shards there. Only then: the
        tier changes what every read costs (the blocks read are written to it), so every
        other workload runs on a mount without one. In and out through `cold`; the tier is
        removed on the way out, so that each run starts without one."""
        cache = self.cluster.base / "cache"
        self.mount_args = ["--cache-dir", str(cache)]
        try:
            self.cold()
            yield
        finally:
            self.mount_args = []
            self.cold()
            shutil.rmtree(cache, ignore_errors=True)

    def mount_pid(self) -> Optional[int]:
        return self.mount.proc.pid

    def role_pids(self) -> dict[str, list[int]]:
        c = self.cluster
        return {"mount": [self.mount.proc.pid], "meta": [p.pid for p in c.metas or [c.meta]],
                "data": [d.pid for d in c.data if d.running()]}

    @property
    def root(self) -> Path:
        return self.mnt

    def more_mounts(self, count: int) -> list[Path]:
        self.extra = [self.cluster.mount(self.mnt.parent / f"mnt-{k}", timeout=mount_timeout_s)
                      for k in range(count)]
        return [m.path for m in self.extra]

    def drop_more_mounts(self) -> None:
        for m in getattr(self, "extra", []):
            m.close()
            self.cluster.mounts.remove(m)
        self.extra = []

    def close(self) -> None:
        self.cluster.close()


class MooseFSTarget(Target):
    """1 master, 3 chunk servers and mfsmount, all in a network namespace created here.

    MooseFS refuses chunk servers on loopback addresses, so the namespace gets a veth end
    with an address from TEST-NET-1 (192.0.2.0/24, documentation only, never routed). Every
    MooseFS process runs with `nsenter --net` only: it shares the mount namespace, so the
    FUSE mount is visible to the benchmark, while its sockets live in the namespace, where
    traffic to its own address goes over the namespace's loopback, as stripefs's does on the
    host's. The host end of the veth has no address: nothing changes in the host's routes.
    """

    name = PEER
    master_port = 9421
    cs_port_base = 9422

    def __init__(self, base: Path, replicas: list[int]) -> None:
        self.base = base
        base.mkdir()
        tag = f"{os.getpid() % 100000}"
        self.netns = f"sfbench{tag}"
        self.veth_host, self.veth_ns = f"sfb{tag}h", f"sfb{tag}n"
        self.ip = "192.0.2.2"
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.mount_proc: Optional[subprocess.Popen] = None
        self.mounts: dict[Path, subprocess.Popen] = {}  # every mfsmount running, by mount point
        self.mnt = base / "mnt"
        self.netns_made = False
        self.veth_made = False
        try:
            self._check_installed()
            self._make_netns()
            self._start_master()
            for i in range(3):
                self._start_chunkserver(i)
            self._wait_chunkservers(3)
            self._mount()
            for r in replicas:
                d = self.mnt / f"r{r}"
                d.mkdir()
                self._in_ns(["mfssetgoal", "-r", str(r), str(d)])
                # Deleted files would otherwise sit in the trash for a day, holding space.
                self._in_ns(["mfssettrashtime", "-r", "0", str(d)])
                out = self._in_ns(["mfsgetgoal", str(d)])
                if not out.strip().endswith(f": {r}"):
                    raise BenchError(f"mfsgetgoal {d} says {out.strip()!r}, wanted goal {r}")
        except BaseException:
            self.close()
            raise

    # -- setup

    @staticmethod
    def ensure_installed() -> None:
        """Installs Debian's MooseFS packages when a program is missing (root, apt-get)."""
        needed = {"mfsmaster": "moosefs-master", "mfschunkserver": "moosefs-chunkserver",
                  "mfsmount": "moosefs-client"}
        missing = sorted({pkg for prog, pkg in needed.items() if shutil.which(prog) is None})
        if not missing:
            return
        if shutil.which("apt-get") is None:
            raise BenchError(f"--peer moosefs needs {', '.join(missing)} and this is not a Debian system")
        if os.geteuid() != 0:
            raise BenchError(f"--peer moosefs needs {', '.join(missing)}: run as root to install them")
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
            res = subprocess.run(argv, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{res.stdout}{res.stderr}")

    def _check_installed(self) -> None:
        if os.geteuid() != 0:
            raise BenchError("--peer moosefs needs root (network namespace, FUSE mount)")
        for prog in ("ip", "nsenter", "mfsmaster", "mfschunkserver", "mfsmount", "mfssetgoal"):
            if shutil.which(prog) is None:
                raise BenchError(f"--peer moosefs: {prog} is not installed")
        if not Path("/var/lib/mfs/metadata.mfs.empty").exists():
            raise BenchError("--peer moosefs: /var/lib/mfs/metadata.mfs.empty is missing "
                             "(it comes with moosefs-master)")

    def _ip(self, *args: str) -> None:
        res = subprocess.run(["ip", *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")

    def _make_netns(self) -> None:
        self._ip("netns", "add", self.netns)
        self.netns_made = True
        self._ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        self.veth_made = True
        self._ip("link", "set", self.veth_ns, "netns", self.netns)
        self._ip("link", "set", self.veth_host, "up")
        self._ip("-n", self.netns, "link", "set", "lo", "up")
        self._ip("-n", self.netns, "addr", "add", f"{self.ip}/30", "dev", self.veth_ns)
        self._ip("-n", self.netns, "link", "set", self.veth_ns, "up")

    def _ns_argv(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns}", *argv]

    def _in_ns(self, argv: list[str]) -> str:
        res = subprocess.run(self._ns_argv(argv), capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed ({res.returncode}): {res.stdout}{res.stderr}")
        return res.stdout

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = self.base / f"{name}.out"
        with open(out, "ab") as f:
            # nsenter execs the daemon, so the pid is the daemon's.
            p = subprocess.Popen(self._ns_argv(argv), stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p, out))
        return p

    def _tail(self, path: Path, lines: int = 30) -> str:
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            text = ["(missing)"]
        return f"---- {path} ----\n" + "\n".join(text)

    def _wait_for_text(self, proc: subprocess.Popen, out: Path, text: str, count: int = 1) -> None:
        deadline = time.monotonic() + peer_start_timeout_s
        while True:
            try:
                seen = out.read_text(errors="replace").count(text)
            except FileNotFoundError:
                seen = 0
            if seen >= count:
                return
            if proc.poll() is not None:
                raise BenchError(f"MooseFS daemon exited with {proc.returncode}\n{self._tail(out)}")
            if time.monotonic() > deadline:
                raise BenchError(f"MooseFS: no {text!r} after {peer_start_timeout_s}s\n{self._tail(out)}")
            time.sleep(0.1)

    def _start_master(self) -> None:
        d = self.base / "master"
        d.mkdir()
        shutil.copy("/var/lib/mfs/metadata.mfs.empty", d / "metadata.mfs")
        exports = self.base / "mfsexports.cfg"
        exports.write_text("* / rw,alldirs,admin,maproot=0:0\n")
        cfg = self.base / "mfsmaster.cfg"
        # NICE_LEVEL 0 (MooseFS defaults to -19): both systems compete for the CPU on the
        # same terms as the benchmark itself and whatever else runs on the machine.
        cfg.write_text(
            "WORKING_USER = root\nWORKING_GROUP = root\n"
            f"DATA_PATH = {d}\nEXPORTS_FILENAME = {exports}\nNICE_LEVEL = 0\n"
            f"MATOML_LISTEN_HOST = {self.ip}\nMATOCS_LISTEN_HOST = {self.ip}\n"
            f"MATOCL_LISTEN_HOST = {self.ip}\nMATOCL_LISTEN_PORT = {self.master_port}\n"
        )
        p = self._spawn("mfsmaster", ["mfsmaster", "-c", str(cfg), "-f"])
        self._wait_for_text(p, self.base / "mfsmaster.out", "mfsmaster daemon initialized properly")

    def _start_chunkserver(self, i: int) -> None:
        d = self.base / f"cs{i}"
        (d / "data").mkdir(parents=True)
        (d / "hdd").mkdir()
        hdd = d / "mfshdd.cfg"
        hdd.write_text(f"{d / 'hdd'}\n")
        cfg = d / "mfschunkserver.cfg"
        cfg.write_text(
            "WORKING_USER = root\nWORKING_GROUP = root\n"
            f"DATA_PATH = {d / 'data'}\nHDD_CONF_FILENAME = {hdd}\nNICE_LEVEL = 0\n"
            f"MASTER_HOST = {self.ip}\nBIND_HOST = {self.ip}\nMASTER_RECONNECTION_DELAY = 1\n"
            f"CSSERV_LISTEN_HOST = {self.ip}\nCSSERV_LISTEN_PORT = {self.cs_port_base + i}\n"
        )
        self._spawn(f"mfschunkserver-{i}", ["mfschunkserver", "-c", str(cfg), "-f"])

    def _wait_chunkservers(self, n: int) -> None:
        name, master, out = self.procs[0]
        try:
            self._wait_for_text(master, out, "chunkserver register end", n)
        except BenchError as exc:
            tails = "\n".join(self._tail(o) for _, _, o in self.procs[1:])
            raise BenchError(f"{exc}\n{tails}") from None

    def _mount(self) -> None:
        self.mount_proc = self._mfsmount(self.mnt)

    def _mfsmount(self, mnt: Path) -> subprocess.Popen:
        mnt.mkdir(exist_ok=True)
        out = self.base / f"{mnt.name}.mfsmount.out"
        with open(out, "ab") as f:
            p = subprocess.Popen(
                self._ns_argv(["mfsmount", str(mnt), "-f", "-H", self.ip,
                               "-P", str(self.master_port), "-o", "mfsnice=0"]),
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.mounts[mnt] = p
        wait_mounted(mnt, lambda: p.poll() is None, "mfsmount", self._tail(out))
        return p

    def _unmount(self, mnt: Optional[Path] = None) -> None:
        mnt = mnt or self.mnt
        p = self.mounts.pop(mnt, None)
        if mnt == self.mnt:
            self.mount_proc = None
        if p is None:
            return
        mounts.unmount(mnt, attempts=50)
        try:
            p.wait(timeout=mount_timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    @property
    def root(self) -> Path:
        return self.mnt

    def more_mounts(self, count: int) -> list[Path]:
        extra = [self.mnt.parent / f"mnt-{k}" for k in range(count)]
        for mnt in extra:
            self._mfsmount(mnt)
        return extra

    def drop_more_mounts(self) -> None:
        for mnt in [m for m in self.mounts if m != self.mnt]:
            self._unmount(mnt)

    # -- Target

    def directory(self, replicas: int) -> Path:
        return self.mnt / f"r{replicas}"

    def cold(self) -> None:
        # mfsmount keeps its own read buffers: a new mount process starts with none.
        self._unmount()
        drop_caches()
        self._mount()

    def mount_pid(self) -> Optional[int]:
        return self.mount_proc.pid if self.mount_proc else None

    def role_pids(self) -> dict[str, list[int]]:
        return {"mount": [self.mount_proc.pid] if self.mount_proc else [],
                "meta": [p.pid for name, p, _ in self.procs if name == "mfsmaster"],
                "data": [p.pid for name, p, _ in self.procs if name.startswith("mfschunkserver")]}

    def close(self) -> None:
        errors = []
        for mnt in list(self.mounts):
            try:
                self._unmount(mnt)
            except Exception as exc:
                errors.append(exc)
        # Chunk servers first, the master last: it saves its metadata on the way out.
        for name, p, _ in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + peer_stop_grace_s
        for name, p, _ in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} still running after {peer_stop_grace_s}s: killing it")
                p.kill()
                p.wait()
        self.procs.clear()
        if self.veth_made:
            # Deleting one end deletes the pair; it may already be gone with the namespace.
            subprocess.run(["ip", "link", "del", self.veth_host], capture_output=True)
            self.veth_made = False
        if self.netns_made:
            res = subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, text=True)
            if res.returncode != 0:
                errors.append(BenchError(f"ip netns del {self.netns}: {res.stderr.strip()}"))
            self.netns_made = False
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------- the run


@dataclass
class Sample:
    run: int
    replicas: int
    target: str
    metric: str
    value: float


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        if args.epoch_compute:
            self.sizes = dataclasses.replace(self.sizes, epoch_compute_16k_s=args.epoch_compute[0],
                                             epoch_compute_150k_s=args.epoch_compute[1])
        if args.large_epoch_compute:
            self.sizes = dataclasses.replace(self.sizes, epoch_compute_2m_s=args.large_epoch_compute[0],
                                             epoch_compute_140m_s=args.large_epoch_compute[1])
        #: Epoch workloads (9, 10) whose compute per batch is measured on MooseFS in this run
        #: (calibrate_epochs), and what was measured: tag -> MooseFS's batch time, compute.
        self.to_calibrate: set[int] = set()
        if args.peer == "moosefs" and not args.quick:
            self.to_calibrate = {w for w, given in ((9, args.epoch_compute), (10, args.large_epoch_compute))
                                 if not given}
        self.calibration: dict[str, dict[str, float]] = {}
        self.replicas: list[int] = args.replicas
        self.workloads: list[int] = args.only
        self.samples: list[Sample] = []
        self.caches_dropped = True
        #: What failed without failing the run (a variant the mount cannot run yet), said in
        #: the report.
        self.failures: list[str] = []
        parent = Path(args.work_dir) if args.work_dir else Path("/var/tmp")
        parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="stripefs-bench-", dir=parent))
        self.targets: list[Target] = []
        self.raw: Optional[RawTarget] = None
        self.sfs: Optional[StripefsTarget] = None
        self.peer: Optional[MooseFSTarget] = None

    # -- setup and teardown

    def start(self) -> None:
        self.raw = RawTarget(self.work / "raw")
        log(f"starting a stripefs cluster (1 metaserver, 3 data servers, a mount) in {self.work / 'stripefs'}")
        self.sfs = StripefsTarget(self.work / "stripefs", self.replicas)
        self.targets = [self.raw, self.sfs]
        if self.args.peer == "moosefs":
            log(f"starting a MooseFS cluster (1 master, 3 chunk servers, mfsmount) in {self.work / 'moosefs'}")
            self.peer = MooseFSTarget(self.work / "moosefs", self.replicas)
            self.targets.append(self.peer)

    def close(self) -> None:
        """Unmounts and stops everything, then removes the work directory, never crossing
        into a mount that could not be removed."""
        for t in reversed(self.targets):
            try:
                t.close()
            except Exception as exc:
                log(f"teardown of {t.name}: {exc}")
        self.targets = []
        left = mounts.mounted_under(self.work)
        if left:
            log(f"still mounted, so {self.work} is left in place: {', '.join(left)}")
        elif self.args.keep:
            log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- measuring

    def record(self, run: int, r: int, target: str, metric: str, value: float) -> None:
        if target == RAW:
            r = self.replicas[0]  # R means nothing to a local disk; results() looks it up here
        self.samples.append(Sample(run, r, target, metric, value))
        m = METRIC_BY_KEY[metric]
        log(f"  run {run + 1} R={r} {m.label:<40} {target:<13} {fmt(value)} {m.unit}")

    def cold(self, target: Target) -> None:
        target.cold()
        if not drop_caches():
            self.caches_dropped = False

    def fs_targets(self, r: int, first_r: bool) -> list[Target]:
        # The raw disk does not depend on R: it is measured once per run.
        return [t for t in self.targets if first_r or t is not self.raw]

    def ensure_ckpt(self, target: Target, r: int) -> Path:
        path = target.directory(r) / CKPT_NAME
        if not path.exists() or path.stat().st_size != self.sizes.ckpt_bytes:
            write_file(str(path), self.sizes.ckpt_bytes, self.sizes.io_bytes)
        return path

    def run_once(self, run: int) -> None:
        s = self.sizes
        # Workload 5 makes empty files, which have no blocks and so no replicas: once per run.
        meta_r = max(self.replicas)
        for i, r in enumerate(self.replicas):
            first_r = i == 0
            targets = self.fs_targets(r, first_r)
            if 1 in self.workloads:
                for t in targets:
                    path = t.directory(r) / CKPT_NAME
                    pid = t.mount_pid()
                    if pid:
                        peak_rss_reset(pid)
                    secs = write_file(str(path), s.ckpt_bytes, s.io_bytes)
                    self.record(run, r, t.name, "ckpt_write", s.ckpt_bytes / secs / MB)
                    if pid and (peak := peak_rss_mib(pid)) is not None:
                        self.record(run, r, t.name, "mount_peak_rss", peak)
                secs = self.lib("write", r)
                self.record(run, r, LIB, "ckpt_write", s.ckpt_bytes / secs / MB)
            if 2 in self.workloads:
                for t in targets:
                    path = self.ensure_ckpt(t, r)
                    self.cold(t)
                    secs = read_file(str(path), s.io_bytes, s.ckpt_bytes)
                    self.record(run, r, t.name, "ckpt_read", s.ckpt_bytes / secs / MB)
                if 1 not in self.workloads:
                    self.lib("write", r)
                self.cold(self.raw)  # a fresh client process below; only the page cache to drop
                secs = self.lib("read", r)
                self.record(run, r, LIB, "ckpt_read", s.ckpt_bytes / secs / MB)
            if 6 in self.workloads:
                for t in targets:
                    path = self.ensure_ckpt(t, r)
                    self.cold(t)
                    self.record(run, r, t.name, "random_read", random_reads(path, s, s.ckpt_bytes))
            for t in targets:  # checkpoints are big: make room before the next workloads
                (t.directory(r) / CKPT_NAME).unlink(missing_ok=True)
            if 3 in self.workloads:
                for t in targets:
                    d = t.directory(r) / f"shards-{run}"
                    d.mkdir()
                    agg, slow = run_shards("write", d, s)
                    self.record(run, r, t.name, "shard_write", agg)
                    self.record(run, r, t.name, "shard_write_slowest", slow)
                    self.cold(t)
                    agg, slow = run_shards("read", t.directory(r) / f"shards-{run}", s)
                    self.record(run, r, t.name, "shard_read", agg)
                    self.record(run, r, t.name, "shard_read_slowest", slow)
                    # Then each rank through a mount of its own, as 4 training nodes would.
                    self.cold(t)
                    rel = t.directory(r).relative_to(t.root) / f"shards-{run}"
                    try:
                        roots = t.more_mounts(s.shards)
                        agg, slow = run_shards("read", [root / rel for root in roots], s)
                    finally:
                        t.drop_more_mounts()
                    self.record(run, r, t.name, "shard_read_mounts", agg)
                    self.record(run, r, t.name, "shard_read_mounts_slowest", slow)
                    shutil.rmtree(t.directory(r) / f"shards-{run}")
            if 4 in self.workloads:
                for t in targets:
                    # Left in place after: removing 10,000 files is not what is measured.
                    d = t.directory(r) / f"dataset-{run}"
                    secs = dataset_write(d, s)
                    self.record(run, r, t.name, "dataset_write", s.dataset_files / secs)
                    self.cold(t)
                    secs = dataset_read(t.directory(r) / f"dataset-{run}", s)
                    self.record(run, r, t.name, "dataset_read", s.dataset_files / secs)
            for w in (9, 10):
                if w in self.workloads:
                    self.calibrate_epochs(r, w)
                    for t in targets:
                        self.epoch(run, r, t, w)
            if 11 in self.workloads:
                for t in targets:
                    self.checkpoint(run, r, t)
            if 5 in self.workloads and r == meta_r:
                for t in self.targets:
                    self.metadata(run, r, t)

    def metadata(self, run: int, r: int, t: Target) -> None:
        n = self.sizes.meta_files
        d = t.directory(r) / f"meta-{run}"
        d.mkdir()
        names = [str(d / f"f{i:05d}") for i in range(n)]
        t0 = time.perf_counter()
        for p in names:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        self.record(run, r, t.name, "create", n / (time.perf_counter() - t0))
        self.cold(t)
        t0 = time.perf_counter()
        for p in names:
            os.stat(p)
        self.record(run, r, t.name, "stat", n / (time.perf_counter() - t0))
        self.cold(t)
        t0 = time.perf_counter()
        res = subprocess.run(["ls", "-l", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        secs = time.perf_counter() - t0
        if res.returncode != 0:
            raise BenchError(f"ls -l {d} failed: {res.stderr.decode(errors='replace')}")
        self.record(run, r, t.name, "ls_l", secs)
        t0 = time.perf_counter()
        for p in names:
            os.unlink(p)
        self.record(run, r, t.name, "unlink", n / (time.perf_counter() - t0))
        self.record(run, r, t.name, "lock_unlock", lock_pairs(d / "lock", self.sizes.lock_pairs))
        os.rmdir(d)
        # The same from several processes at once, each in a directory of its own.
        procs = self.sizes.meta_procs
        groups = []
        for k in range(procs):
            dk = t.directory(r) / f"meta-{run}-p{k}"
            dk.mkdir()
            groups.append([str(dk / f"f{i:05d}") for i in range(n // procs)])
        self.record(run, r, t.name, "create_par", run_parallel("create", groups))
        self.cold(t)
        self.record(run, r, t.name, "stat_par", run_parallel("stat", groups))
        self.record(run, r, t.name, "unlink_par", run_parallel("unlink", groups))
        for k in range(procs):
            os.rmdir(t.directory(r) / f"meta-{run}-p{k}")

    def epoch_dataset(self, t: Target, r: int, tag: str, ds: Sizes,
                      xattrs: Optional[dict[str, bytes]] = None) -> list[Path]:
        """The paths of an epoch's dataset on `t` (in a directory of its own for each `tag`,
        with `xattrs`), written the first time it is asked for."""
        d = t.directory(r) / f"epoch-{tag}"
        if not d.exists():
            secs = dataset_write(d, ds, xattrs)
            log(f"  wrote {ds.dataset_files} samples of {ds.sample_bytes} bytes on {t.name} in {secs:.1f} s"
                + "".join(f" ({k} {v.decode()})" for k, v in (xattrs or {}).items()))
        return dataset_paths(d, ds)

    def calibrate_epochs(self, r: int, workload: int) -> None:
        """Once a bench run, before the first epochs of `workload` (9 or 10) on any target:
        each sample size's compute per batch set to EPOCH_CALIBRATION_SHARE of MooseFS's
        batch time in a cold epoch with no compute (the same dataset, loader and order as
        the measured epochs, which then reuse the dataset)."""
        if workload not in self.to_calibrate or self.peer is None:
            return
        self.to_calibrate.discard(workload)
        for tag, ds, _ in epoch_datasets(self.sizes, workload):
            paths = self.epoch_dataset(self.peer, r, tag, ds)
            self.cold(self.peer)
            _, rate = run_epoch(paths, ds.sample_bytes, EPOCH_CALIBRATION_COMPUTE_S, ds)
            batch_s = ds.epoch_batch / rate
            compute_s = round(EPOCH_CALIBRATION_SHARE * batch_s, 4)
            self.sizes = dataclasses.replace(self.sizes, **{f"epoch_compute_{tag}_s": compute_s})
            self.calibration[tag] = {"moosefs_batch_s": round(batch_s, 4), "compute_s": compute_s}
            log(f"  epoch {tag}: MooseFS loads a batch in {batch_s * 1e3:.1f} ms with no compute (R={r});"
                f" compute per batch {compute_s * 1e3:.1f} ms ({EPOCH_CALIBRATION_SHARE:.0%} of it)")

    def epoch(self, run: int, r: int, t: Target, workload: int) -> None:
        """Workload 9 or 10 on one target: for each sample size, one epoch from cold over a
        dataset written the first time (the runs after reuse it), with the CPU time the file
        system's processes spent on it per sample where there are metrics for it (workload
        9); on stripefs, another from cold with the sampler hint, which fails alone
        (reported) if the mount cannot take it, and for the samples of EPOCH_INLINE_TAG one
        more from cold over a copy of the dataset in a directory that keeps them inline."""
        for tag, ds, compute_s in epoch_datasets(self.sizes, workload):
            paths = self.epoch_cold(run, r, t, tag, ds, compute_s, "")
            if t is not self.sfs:
                continue
            self.cold(t)
            try:
                util, rate = run_epoch(paths, ds.sample_bytes, compute_s, ds,
                                       hint=t.root / ".stripefs" / "prefetch")
                self.record(run, r, t.name, f"epoch_{tag}_util_hint", util)
                self.record(run, r, t.name, f"epoch_{tag}_rate_hint", rate)
            except BenchError as exc:
                self.failures.append(f"run {run + 1} R={r} {METRIC_BY_KEY[f'epoch_{tag}_rate_hint'].label}: {exc}")
                log(f"  FAILED: {self.failures[-1]}")
            if tag == EPOCH_INLINE_TAG:
                self.epoch_cold(run, r, t, tag, ds, compute_s, "_inline",
                                {"stripefs.inline_max": str(EPOCH_INLINE_MAX).encode()})

    def epoch_cold(self, run: int, r: int, t: Target, tag: str, ds: Sizes, compute_s: float, variant: str,
                   xattrs: Optional[dict[str, bytes]] = None) -> list[Path]:
        """One epoch from cold without the hint, over the dataset of `tag` + `variant` (its
        directory with `xattrs`): utilisation, samples/s and, where there are metrics for
        it, the CPU the file system's processes spent a sample. The dataset's paths."""
        paths = self.epoch_dataset(t, r, tag + variant, ds, xattrs)
        self.cold(t)
        # The roles whose CPU this epoch reports (--quick: too few clock ticks to count).
        cpu_key = f"epoch_{tag}{variant}_cpu_{{}}"
        roles = {} if self.args.quick else {
            role: pids for role, pids in t.role_pids().items() if cpu_key.format(role) in METRIC_BY_KEY}
        before = cpu_seconds(roles)
        util, rate = run_epoch(paths, ds.sample_bytes, compute_s, ds)
        self.record(run, r, t.name, f"epoch_{tag}_util{variant}", util)
        self.record(run, r, t.name, f"epoch_{tag}_rate{variant}", rate)
        for role, used in cpu_seconds(roles).items():
            self.record(run, r, t.name, cpu_key.format(role), (used - before[role]) / len(paths) * 1e3)
        return paths

    def checkpoint(self, run: int, r: int, t: Target) -> None:
        """Workload 11 on one target, in a parent directory of checkpoints removed after: on
        the raw disk first the local-disk figure (the ranks' shards closed unsynced); then
        the synchronous save (shards fsync'd, then the marker) and, cold, its restore; on
        stripefs last the tiered save."""
        s = self.sizes
        parent = t.directory(r) / f"ckpts-{run}"
        parent.mkdir()
        if t is self.raw:
            self.record(run, r, t.name, "ckpt_local_disk_s", ckpt_save(parent / "local", "save-nofsync", s))
            os.sync()  # its write-back is not on the next save's clock
        step = parent / "step-0"
        self.record(run, r, t.name, "ckpt_save_blocked_s", ckpt_save(step, "save", s, commit=commit_marker))
        self.cold(t)
        self.record(run, r, t.name, "ckpt_restore_mbs", run_shards("read", step, ckpt_shards(s))[0])
        if t is self.sfs:
            self.tiered_checkpoint(run, r, parent / "step-1")
        shutil.rmtree(parent)

    def tiered_checkpoint(self, run: int, r: int, step: Path) -> None:
        """Workload 11's tiered save on stripefs, through a mount with a staging area: the
        ranks' shards closed unsynced into a directory marked for it, the commit, and the
        wait until the mount says every shard is durable. Checked after through a mount
        without the staging area. Fails alone (reported) while the mount does not support
        the checkpoint attributes (EOPNOTSUPP)."""
        assert self.sfs is not None
        s = self.sizes
        with self.sfs.staging():
            try:
                blocked = ckpt_save(step, "save-nofsync", s, begin=begin_tiered, commit=commit_tiered)
                durable = blocked + wait_committed(step)
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self.failures.append(f"run {run + 1} R={r} {METRIC_BY_KEY['ckpt_save_blocked_tiered_s'].label}: "
                                     f"the mount does not support it yet: {exc}")
                log(f"  FAILED: {self.failures[-1]}")
                return
        for rank in range(s.ckpt_ranks):
            size = (step / f"shard-{rank}.pt").stat().st_size
            if size != s.ckpt_shard_bytes:
                raise BenchError(f"{step}: the tiered save's shard {rank} has {size} bytes, "
                                 f"expected {s.ckpt_shard_bytes}")
        self.record(run, r, STRIPEFS, "ckpt_save_blocked_tiered_s", blocked)
        self.record(run, r, STRIPEFS, "ckpt_durable_tiered_s", durable)

    def lib(self, kind: str, r: int) -> float:
        assert self.sfs is not None
        return run_lib(kind, self.sfs.cluster.meta_addr, self.sfs.cluster.client,
                       [f"r{r}"], "lib-" + CKPT_NAME, self.sizes)

    # -- reporting

    def results(self) -> list[dict]:
        """One row per (R, metric, target) with the median; the raw disk, measured once per
        run (under the first R), is repeated in each R's block as the reference."""
        groups: dict[tuple[int, str, str], list[float]] = {}
        for smp in self.samples:
            groups.setdefault((smp.replicas, smp.metric, smp.target), []).append(smp.value)
        first_r = self.replicas[0]
        ran = {(smp.replicas, METRIC_BY_KEY[smp.metric].workload) for smp in self.samples if smp.target != RAW}
        rows = []
        for r in self.replicas:
            for m in METRICS:
                def runs_of(target: str, key: str = m.key) -> Optional[list[float]]:
                    return groups.get((first_r if target == RAW else r, key, target))

                if not (any(runs_of(t) for t in (STRIPEFS, LIB, PEER)) or (m.raw_only and (r, m.workload) in ran)):
                    continue  # e.g. workload 5, which runs under one R only
                raw = runs_of(RAW, m.raw_reference or m.reference or m.key)
                peer = runs_of(PEER, m.reference or m.key)
                raw_med = statistics.median(raw) if raw else None
                peer_med = statistics.median(peer) if peer else None
                for target in (RAW, STRIPEFS, LIB, PEER):
                    runs = runs_of(target)
                    if not runs:
                        continue
                    value = statistics.median(runs)
                    comparable = m.key != "mount_peak_rss"
                    rows.append({
                        "workload": m.workload, "metric": m.key, "label": m.label, "unit": m.unit,
                        "replicas": r, "target": target, "value": value, "runs": runs,
                        "ratio_raw": ratio(m, value, raw_med) if comparable and target != RAW else None,
                        "ratio_peer": ratio(m, value, peer_med) if comparable and target != PEER else None,
                    })
        return rows

    def writeback_limit_mib(self) -> Optional[float]:
        try:
            from stripefs.client import client as client_mod

            return getattr(client_mod, "DEFAULT_WRITEBACK_BYTES") / MiB
        except Exception:
            return None

    def report(self, machine: dict, elapsed_s: float) -> dict:
        doc = {
            "machine": machine,
            "config": {
                "quick": self.args.quick, "runs": self.args.runs, "replicas": self.replicas,
                "workloads": self.workloads, "peer": self.args.peer,
                "sizes": dataclasses.asdict(self.sizes),
                "caches_dropped": self.caches_dropped,
                "epoch_calibration": self.calibration,
                "failures": self.failures,
                "stripefs_writeback_limit_mib": self.writeback_limit_mib(),
                "elapsed_s": round(elapsed_s, 1),
            },
            "results": self.results(),
        }
        if self.peer is not None or self.args.peer:
            res = subprocess.run(["mfsmaster", "-v"], capture_output=True, text=True)
            doc["config"]["peer_version"] = (res.stdout or res.stderr).strip()
        return doc


def ratio(m: Metric, value: float, ref: Optional[float]) -> Optional[float]:
    if ref is None or value <= 0 or ref <= 0:
        return None
    return ref / value if m.lower_is_better else value / ref


def fmt(x: Optional[float]) -> str:
    if x is None:
        return ""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def machine_lines(machine: dict) -> list[str]:
    return [
        f"date {machine['date']}, host {machine['host']}, stripefs {machine['stripefs_commit']}",
        f"{machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB memory, "
        f"kernel {machine['kernel']}, Python {machine['python']}",
        f"work dir {machine['work_dir']} on {machine['file_system']}, {machine['disk_free_gib']} GiB free, "
        f"load average {' '.join(map(str, machine['load_avg']))}",
    ]


def table(doc: dict) -> str:
    cfg = doc["config"]
    peer = cfg["peer"]
    lines = [
        f"| workload | R | target | value | unit | × raw | × {peer or 'peer'} |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for row in doc["results"]:
        lines.append(
            f"| {row['workload']} {row['label']} | {row['replicas']} | {row['target']} | {fmt(row['value'])} "
            f"| {row['unit']} | {fmt(row['ratio_raw'])} | {fmt(row['ratio_peer'])} |"
        )
    notes = [
        f"median of {cfg['runs']} run(s); ratios are speed ratios (>1: faster than the reference; "
        "inverted for seconds); MB = 10^6 bytes",
    ]
    if cfg.get("stripefs_writeback_limit_mib"):
        notes.append(f"stripefs write-back limit {cfg['stripefs_writeback_limit_mib']:.0f} MiB")
    if cfg.get("peer_version"):
        notes.append(cfg["peer_version"])
    if cfg.get("epoch_calibration"):
        notes.append("epoch compute per batch calibrated on MooseFS (its batch time with no compute x "
                     f"{EPOCH_CALIBRATION_SHARE}): " + ", ".join(
                         f"{tag} {c['compute_s'] * 1e3:.1f} ms (MooseFS {c['moosefs_batch_s'] * 1e3:.1f} ms)"
                         for tag, c in cfg["epoch_calibration"].items()))
    if cfg["quick"]:
        notes.append("QUICK sizes: not a measurement")
    if not cfg["caches_dropped"]:
        notes.append("page cache NOT dropped (not root): cold reads are not cold")
    notes += [f"FAILED {f}" for f in cfg.get("failures", [])]
    notes.append(f"took {cfg['elapsed_s']:.0f} s")
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark stripefs against the raw local disk and, optionally, MooseFS.",
    )
    p.add_argument("--peer", choices=["moosefs"], help="also run every workload on a local MooseFS cluster")
    p.add_argument("--runs", type=int, help="runs of every workload; the median is reported (default 3, 1 with --quick)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke test, not a measurement")
    p.add_argument("--only", default=",".join(map(str, ALL_WORKLOADS)), metavar="WORKLOADS",
                   help="comma-separated workload numbers 1-6 and 9-11 (default: all); 7 alone: the metadata"
                        " engines side by side (scripts/bench_meta.py, which takes its own flags after --);"
                        " 8 alone: label queries (scripts/bench_labels.py, likewise)")
    p.add_argument("--replicas", default="1,2", metavar="R,...", help="replication factors to run (default 1,2)")
    p.add_argument("--epoch-compute", metavar="S16K,S150K",
                   help="workload 9: simulated accelerator compute per batch, in seconds, for the 16 KiB"
                        f" and the 150 KiB samples (default {FULL.epoch_compute_16k_s},{FULL.epoch_compute_150k_s};"
                        f" {QUICK.epoch_compute_16k_s},{QUICK.epoch_compute_150k_s} with --quick;"
                        f" with --peer moosefs: {EPOCH_CALIBRATION_SHARE} x MooseFS's batch time, measured first)")
    p.add_argument("--large-epoch-compute", metavar="S2M,S140M",
                   help="workload 10: simulated accelerator compute per batch, in seconds, for the 2 MiB"
                        f" and the 140 MiB samples (default {FULL.epoch_compute_2m_s},{FULL.epoch_compute_140m_s};"
                        f" {QUICK.epoch_compute_2m_s},{QUICK.epoch_compute_140m_s} with --quick;"
                        " with --peer moosefs: calibrated as --epoch-compute)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="where the temporary clusters and the raw-disk scratch directory go (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) after the run")
    args = p.parse_args(argv)
    try:
        args.only = sorted({int(x) for x in args.only.split(",") if x.strip()})
        args.replicas = [int(x) for x in args.replicas.split(",") if x.strip()]
        for name in ("epoch_compute", "large_epoch_compute"):
            if getattr(args, name) is not None:
                setattr(args, name, [float(x) for x in getattr(args, name).split(",")])
    except ValueError:
        p.error("--only, --replicas, --epoch-compute and --large-epoch-compute take comma-separated numbers")
    if len(args.only) == 1 and args.only[0] in ALONE_WORKLOADS:
        return args
    if not args.only or any(w not in ALL_WORKLOADS for w in args.only):
        p.error("--only takes workload numbers 1-6 and 9-11, or 7 or 8 alone")
    if args.epoch_compute is not None and (len(args.epoch_compute) != 2 or min(args.epoch_compute) <= 0):
        p.error("--epoch-compute takes two positive numbers of seconds: 16 KiB samples, 150 KiB samples")
    if args.large_epoch_compute is not None and (len(args.large_epoch_compute) != 2
                                                 or min(args.large_epoch_compute) <= 0):
        p.error("--large-epoch-compute takes two positive numbers of seconds: 2 MiB samples, 140 MiB samples")
    if not args.replicas or any(not 1 <= r <= 3 for r in args.replicas):
        p.error("--replicas takes numbers 1-3 (there are 3 data servers)")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parse_args(own)
    if len(args.only) == 1 and args.only[0] in ALONE_WORKLOADS:
        script = importlib.import_module(ALONE_WORKLOADS[args.only[0]])
        return script.main((["--quick"] if args.quick else []) + rest)
    if os.geteuid() != 0:
        log("note: not root: the page cache cannot be dropped and FUSE mounts may fail")
    if args.peer == "moosefs":
        MooseFSTarget.ensure_installed()

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    machine = machine_info(bench.work)
    print("\n".join(machine_lines(machine)), flush=True)
    t0 = time.monotonic()
    try:
        bench.start()
        for run in range(args.runs):
            log(f"run {run + 1} of {args.runs}")
            bench.run_once(run)
        doc = bench.report(machine, time.monotonic() - t0)
    finally:
        bench.close()
    print()
    print(table(doc), end="", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted; everything was torn down")
        sys.exit(130)
