"""Checkpoints through tiers end to end (fs/client/staging.py): files created in an async
checkpoint directory close at local-disk speed while every data server is hung, read back
on their own mount at once, are empty on another mount until their upload commits, then
whole; the success marker is written only once everything under the directory is durable
(asked on one mount, staged on another); a mount SIGKILLed mid-upload leaves no marker,
and its next run on the same directory uploads what it had staged; retention keeps the
newest K committed checkpoints; `stripefs checkpoint` reports and waits."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cluster import REPO_ROOT, Cluster, cli, unmount
from faults import pause, resume, wait_fsck_clean

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

MiB = 1024 * 1024


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path / "c", dataservers=2) as c:
        yield c


def tier(d: Path) -> list[str]:
    return ["--cache-dir", str(d), "--cache-size", "64M"]


def status(directory: Path) -> dict:
    return json.loads(os.getxattr(directory, "stripefs.checkpoint.status"))


def wait_for(what, timeout: float = 90.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(interval)
    return got


def checkpoint_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli("checkpoint", *args), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def save(directory: Path, shards: dict[str, bytes]) -> None:
    for name, data in shards.items():
        with open(directory / name, "wb") as f:
            f.write(data)


@pytest.mark.allow_tracebacks  # data servers hung under open streams
def test_marker_only_once_every_shard_is_durable(cluster, tmp_path):
    """Shards staged on two mounts (two nodes), the commit asked on a third."""
    a = cluster.mount(args=tier(tmp_path / "tier-a"))
    b = cluster.mount()
    a2 = cluster.mount(args=tier(tmp_path / "tier-a2"))
    os.mkdir(a / "ckpt")
    os.setxattr(a / "ckpt", "stripefs.checkpoint", b"async")
    step = a / "ckpt" / "step-1"
    os.mkdir(step)  # inherits the mode
    assert os.getxattr(step, "stripefs.checkpoint") == b"async"
    shards = {"rank0.pt": os.urandom(9 * MiB + 123), "rank1.pt": os.urandom(100_000), "empty": b""}
    for p in cluster.data:
        pause(p)
    try:
        t = time.monotonic()
        save(step, {k: v for k, v in shards.items() if k != "rank1.pt"})  # every data server hung:
        save(a2 / "ckpt/step-1", {"rank1.pt": shards["rank1.pt"]})        # closes return from staging
        staged_s = time.monotonic() - t
        for name, data in shards.items():
            mine = (a2 if name == "rank1.pt" else a) / "ckpt/step-1" / name
            assert mine.read_bytes() == data  # the mount that staged it reads it
            assert mine.stat().st_size == len(data)
            assert (b / "ckpt/step-1" / name).stat().st_size == 0  # elsewhere: as created
        # Another mount sees what is pending by the marks (the empty file needed no server).
        st = wait_for(lambda: (s := status(b / "ckpt/step-1"))["pending_files"] == 2 and s)
        assert st["pending_bytes"] == sum(map(len, shards.values())) and st["files"] == 3, st
        assert int(os.getxattr(step, "stripefs.checkpoint.pending")) == st["pending_bytes"]
        os.setxattr(b / "ckpt/step-1", "stripefs.checkpoint.commit", b"1")  # returns at once
        assert status(b / "ckpt/step-1")["commit_asked"]
        time.sleep(1.5)
        assert not (step / "_COMMITTED").exists() and not (b / "ckpt/step-1/_COMMITTED").exists()
        assert staged_s < 30, staged_s  # (no speed asserted: only that nothing waited for the servers)
    finally:
        for p in cluster.data:
            resume(p)
    res = checkpoint_cli("wait", "--committed", "--timeout", "120", "--json", str(b / "ckpt/step-1"))
    assert res.returncode == 0, res.stdout + res.stderr
    done = json.loads(res.stdout)
    assert done["committed"] and done["pending_files"] == 0, done
    marker = json.loads((b / "ckpt/step-1/_COMMITTED").read_text())
    assert marker["files"] == 3 and marker["bytes"] == sum(map(len, shards.values())), marker
    for name, data in shards.items():  # whole on the other mount, and on a fresh one
        assert hashlib.sha256((b / "ckpt/step-1" / name).read_bytes()).digest() == hashlib.sha256(data).digest()
    c = cluster.mount()
    for name, data in shards.items():
        assert (c / "ckpt/step-1" / name).read_bytes() == data
    for t in ("tier-a", "tier-a2"):
        wait_for(lambda: not os.listdir(tmp_path / t / "stage"))  # uploaded: nothing left staged
    assert "stripefs.staged" not in os.listxattr(b / "ckpt/step-1/rank0.pt")
    wait_fsck_clean(cluster)


@pytest.mark.allow_tracebacks  # a mount killed, data servers hung under open streams
def test_a_mount_killed_mid_upload_never_yields_a_marker_and_resumes(cluster, tmp_path):
    stage = tmp_path / "tier-a"
    a = cluster.mount(args=tier(stage))
    b = cluster.mount()
    step = a / "step-7"
    os.mkdir(step)
    os.setxattr(step, "stripefs.checkpoint", b"async")
    shards = {f"rank{i}.pt": os.urandom(5 * MiB + i) for i in range(3)}
    for p in cluster.data:
        pause(p)
    try:
        save(step, shards)
        os.setxattr(step, "stripefs.checkpoint.commit", b"1")
        time.sleep(0.5)
        a.proc.signal(signal.SIGKILL)
        a.proc.wait_exit(10)
        unmount(a.path)
    finally:
        for p in cluster.data:
            resume(p)
    time.sleep(2)
    on_b = b / "step-7"
    assert not (on_b / "_COMMITTED").exists()
    st = status(on_b)
    assert st["pending_files"] == 3 and not st["committed"], st
    for name in shards:
        assert (on_b / name).stat().st_size == 0  # never partly
    # The next mount on the same staging directory uploads what was staged.
    cluster.mount(a.path, args=tier(stage))
    wait_for(lambda: status(on_b)["pending_files"] == 0)
    for name, data in shards.items():
        assert (on_b / name).read_bytes() == data
    assert not (on_b / "_COMMITTED").exists()  # the commit was asked of the mount that died
    res = checkpoint_cli("commit", "--wait", "--timeout", "60", str(on_b))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "committed" in res.stdout
    wait_for(lambda: (on_b / "_COMMITTED").exists())  # (the kernel's negative entry ages out)
    wait_fsck_clean(cluster)


def test_retention_and_marker_name_and_sync_directories(cluster, tmp_path):
    a = cluster.mount(args=tier(tmp_path / "tier-a"))
    root = a / "run"
    os.mkdir(root)
    os.setxattr(root, "stripefs.checkpoint", b"async")
    os.setxattr(root, "stripefs.checkpoint.marker", b"DONE")
    os.setxattr(root, "stripefs.checkpoint.keep", b"2")
    os.mkdir(root / "scratch")  # never committed: retention leaves it
    for k in range(4):
        step = root / f"step-{k}"
        os.mkdir(step)
        save(step, {"model.pt": os.urandom(MiB + k)})
        os.setxattr(step, "stripefs.checkpoint.commit", b"")
        wait_for(lambda: (step / "DONE").exists())
    wait_for(lambda: sorted(os.listdir(root)) == ["scratch", "step-2", "step-3"])
    assert (root / "step-3/model.pt").stat().st_size == MiB + 3
    # A sync directory: written as anywhere else, committed at once.
    sync = a / "sync"
    os.mkdir(sync)
    os.setxattr(sync, "stripefs.checkpoint", b"sync")
    save(sync, {"x": b"abc"})
    assert status(sync)["pending_files"] == 0
    res = checkpoint_cli("commit", "--wait", "--timeout", "60", str(sync))
    assert res.returncode == 0 and (sync / "_COMMITTED").exists(), res.stdout + res.stderr
    # Not a checkpoint directory, bad values, read-only attributes: clear errors.
    os.mkdir(a / "plain")
    with pytest.raises(OSError) as e:
        os.setxattr(a / "plain", "stripefs.checkpoint.commit", b"1")
    assert e.value.errno == 22
    with pytest.raises(OSError) as e:
        os.setxattr(root, "stripefs.checkpoint", b"later")
    assert e.value.errno == 22
    with pytest.raises(OSError) as e:
        os.setxattr(root, "stripefs.checkpoint.pending", b"0")
    assert e.value.errno == 1
    res = checkpoint_cli("status", str(a / "plain"))
    assert res.returncode != 0 and "not a checkpoint directory" in res.stderr, res.stderr


@pytest.mark.allow_tracebacks  # data servers hung under open streams
def test_a_full_staging_area_makes_writers_wait(cluster, tmp_path):
    a = cluster.mount(args=tier(tmp_path / "tier-a") + ["--stage-size", "8M"])
    step = a / "s"
    os.mkdir(step)
    os.setxattr(step, "stripefs.checkpoint", b"async")
    first, second = os.urandom(6 * MiB), os.urandom(6 * MiB)
    for p in cluster.data:
        pause(p)
    done = threading.Event()
    try:
        save(step, {"first": first})  # fits: closes at once, its upload hangs
        writer = threading.Thread(target=lambda: (save(step, {"second": second}), done.set()), daemon=True)
        writer.start()
        assert not done.wait(2.0)  # 12 MiB would exceed 8: waits for the first's upload
        cache = dict(line.split() for line in (a / ".stripefs/cache").read_text().splitlines())
        assert int(cache["stage_staged_bytes"]) <= 8 * MiB, cache
    finally:
        for p in cluster.data:
            resume(p)
    assert done.wait(120)
    writer.join(10)
    wait_for(lambda: status(step)["pending_files"] == 0)
    assert (step / "first").read_bytes() == first and (step / "second").read_bytes() == second


def kernel_has_passthrough() -> bool:
    """FUSE passthrough came with Linux 6.9."""
    release = os.uname().release.split("-")[0].split(".")
    return tuple(int(x) for x in release[:2]) >= (6, 9)


def cache_counters(mountpoint: Path) -> dict[str, str]:
    return dict(line.split() for line in (mountpoint / ".stripefs/cache").read_text().splitlines())


@pytest.mark.allow_tracebacks  # data servers hung under open streams
def test_the_kernel_writes_staged_files_itself(cluster, tmp_path):
    """With FUSE passthrough (fs/fuse/passthrough.py) a staged file's reads and writes go
    between the writer and its local copy without this mount; what the mount still
    answers (stat, a second open, ftruncate, fsync, close) sees what was written."""
    a = cluster.mount(args=tier(tmp_path / "tier-a"))
    b = cluster.mount()
    step = a / "s"
    os.mkdir(step)
    os.setxattr(step, "stripefs.checkpoint", b"async")
    data = os.urandom(5 * MiB + 7)
    for p in cluster.data:
        pause(p)
    try:
        with open(step / "x", "wb") as f:
            f.write(data[:3 * MiB])
            f.flush()
            os.posix_fallocate(f.fileno(), 0, 4096)  # the mount must see the size the kernel wrote
            assert os.stat(step / "x").st_size == 3 * MiB
            with open(step / "x", "rb") as r:  # an open that joins the writer's
                assert r.read() == data[:3 * MiB]
            f.write(data[3 * MiB:])
            f.flush()
            os.fsync(f.fileno())
            f.truncate(len(data) + 100)
            f.truncate(len(data))
            assert os.fstat(f.fileno()).st_size == len(data)
            mtime = os.fstat(f.fileno()).st_mtime_ns
        assert (step / "x").read_bytes() == data  # its upload hangs: read from the local copy
        assert os.stat(step / "x").st_size == len(data)
        assert os.stat(b / "s" / "x").st_size == 0  # another mount: as created, until the upload
        direct = int(cache_counters(a)["stage_direct_files"])
        assert direct == (1 if kernel_has_passthrough() else 0)
    finally:
        for p in cluster.data:
            resume(p)
    wait_for(lambda: status(step)["pending_files"] == 0)
    assert (b / "s" / "x").read_bytes() == data
    assert os.stat(b / "s" / "x").st_mtime_ns == mtime
    with open(step / "x", "r+b") as f:  # uploaded: an open for writing writes to the servers
        f.write(b"new")
    assert (b / "s" / "x").read_bytes() == b"new" + data[3:]
    assert int(cache_counters(a)["stage_direct_files"]) == direct
