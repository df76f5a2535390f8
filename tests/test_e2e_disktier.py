"""The local disk tier end to end: a mount with `--cache-dir` and a memory cache far smaller
than the data reads a second epoch from local disk (shown with every data server stopped),
keeps it across a remount, finds a damaged block file by its checksum and fetches the
block again, reads a file another mount changed as it is now, stays within its size,
refuses a second mount of the same directory, and is filled by `stripefs warmup`."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cluster import Cluster

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

SAMPLE = 600_000
FILES = 8


def counters(mnt: Path) -> dict[str, int]:
    out = {}
    for line in (mnt / ".stripefs" / "cache").read_text().splitlines():
        name, _, value = line.partition(" ")
        out[name] = int(value)
    return out


def read_cold(path: Path) -> bytes:
    """The file's bytes, then its pages dropped from the kernel's cache: the next read
    asks the mount again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return data
    finally:
        os.close(fd)


def settle(mnt: Path, blocks: int) -> dict[str, int]:
    """Wait for the background writes of the tier to have kept `blocks` blocks."""
    deadline = time.monotonic() + 30
    while (c := counters(mnt))["blocks"] < blocks:
        assert time.monotonic() < deadline, c
        time.sleep(0.05)
    return c


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path / "c", dataservers=2) as c:
        yield c


def tier_args(d: Path, size: str = "64M") -> list[str]:
    return ["--cache-mib", "1", "--cache-dir", str(d), "--cache-size", size]


# These stop every data server under a mount's open streams: the servers' gRPC may log a
# traceback of a stream cut at shutdown (as in the fault tests), which is not the tier's.
@pytest.mark.allow_tracebacks
def test_second_epoch_from_disk_across_a_remount_and_checked(cluster, tmp_path):
    cache = tmp_path / "tier"
    writer = cluster.mount()
    made = {}
    (writer / "ds").mkdir()
    for i in range(FILES):
        made[f"ds/f{i}"] = os.urandom(SAMPLE)
        (writer / f"ds/f{i}").write_bytes(made[f"ds/f{i}"])
    reader = cluster.mount(args=tier_args(cache))
    # Epoch 1: from the data servers, kept on local disk as it goes.
    for rel, data in made.items():
        assert read_cold(reader / rel) == data
    first = settle(reader.path, FILES)
    assert first["kept_bytes"] == FILES * SAMPLE and first["hits"] == 0, first
    # Epoch 2 with every data server stopped: the 1 MiB memory cache holds one block at
    # most, so all but that come from the disk tier.
    for i in range(len(cluster.data)):
        cluster.kill_data(i)
    for rel, data in made.items():
        assert read_cold(reader / rel) == data
    assert counters(reader.path)["hits"] >= FILES - 1
    # A remount finds what is kept.
    reader.close()
    cluster.mounts.remove(reader)
    reader = cluster.mount(reader.path, args=tier_args(cache))
    kept = counters(reader.path)
    assert kept["blocks"] == FILES and kept["hits"] == 0, kept
    for rel, data in made.items():
        assert read_cold(reader / rel) == data
    assert counters(reader.path)["hits"] == FILES
    # A damaged block file: found by its checksum, removed, the block fetched again.
    for i in range(len(cluster.data)):
        cluster.start_data(i)
    cluster.wait_servers_up(len(cluster.data))
    damaged = next((cache / "blocks").glob("*/*"))
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    damaged.write_bytes(bytes(raw))
    for rel, data in made.items():
        assert read_cold(reader / rel) == data
    after = counters(reader.path)
    assert after["corrupt"] == 1, after
    assert settle(reader.path, FILES)["blocks"] == FILES  # kept again, whole
    # A file changed on the other mount is read as it is now (its new block), and the
    # tier keeps the new block beside the old one, which nobody asks for again.
    new = os.urandom(SAMPLE)
    (writer / "ds/f0").write_bytes(new)
    assert read_cold(reader / "ds/f0") == new
    assert settle(reader.path, FILES + 1)["blocks"] == FILES + 1


def test_the_tier_stays_within_its_size_and_a_directory_has_one_mount(cluster, tmp_path):
    cache = tmp_path / "tier"
    writer = cluster.mount()
    (writer / "ds").mkdir()
    made = {}
    for i in range(FILES):
        made[i] = os.urandom(SAMPLE)
        (writer / f"ds/f{i}").write_bytes(made[i])
    reader = cluster.mount(args=tier_args(cache, size=str(3 * SAMPLE)))
    for i in range(FILES):
        assert read_cold(reader / f"ds/f{i}") == made[i]
    settle(reader.path, 3)
    deadline = time.monotonic() + 30
    while (c := counters(reader.path))["writing"]:  # the last writes land, and evict
        assert time.monotonic() < deadline, c
        time.sleep(0.05)
    assert c["kept_bytes"] <= 3 * SAMPLE and c["blocks"] == 3, c
    on_disk = sum(f.stat().st_size for f in (cache / "blocks").glob("*/*"))
    assert on_disk <= 3 * SAMPLE + 3 * 64, on_disk  # (64: ample for each file's header)
    # (Which three are kept depends on the order the background writes land in; the LRU
    # order itself: test_disktier.py.)
    # A second mount of the same cache directory is refused, and says why.
    other = tmp_path / "other"
    other.mkdir()
    res = subprocess.run(cluster.cli("mount", cluster.meta_addr, str(other), "--credentials", str(cluster.client),
                                     *tier_args(cache)), capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert not os.path.ismount(other)


@pytest.mark.allow_tracebacks
def test_warmup_fills_the_tier_ahead_of_a_job(cluster, tmp_path):
    writer = cluster.mount()
    (writer / "ds" / "sub").mkdir(parents=True)
    made = {}
    for i in range(FILES):
        rel = f"ds/sub/f{i}" if i % 2 else f"ds/f{i}"
        made[rel] = os.urandom(SAMPLE)
        (writer / rel).write_bytes(made[rel])
    reader = cluster.mount(args=tier_args(tmp_path / "tier"))
    res = subprocess.run(cluster.cli("warmup", str(reader / "ds"), "--json"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["files"] == FILES and doc["bytes"] == FILES * SAMPLE and doc["failed"] == [], doc
    assert doc["tiers"][str(reader.path)]["enabled"] == 1
    settle(reader.path, FILES)
    for i in range(len(cluster.data)):
        cluster.kill_data(i)
    for rel, data in made.items():
        assert read_cold(reader / rel) == data  # the job: every block from local disk ...
    assert counters(reader.path)["hits"] >= FILES - 1  # (... but one, if the 1 MiB memory cache kept it)
    # Outside a mount: refused, saying why.
    res = subprocess.run(cluster.cli("warmup", str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "not inside a stripefs mount" in res.stderr
