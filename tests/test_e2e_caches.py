"""Every client cache is invalidated as close-to-open promises: a second mount sees a
change made and closed in the first within the attribute/entry timeout (about 1 s)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cluster import Cluster
from faults import block_files, process_resident_kib, resident_bytes
from test_metrics import metrics_address, scrape, value

pytestmark = pytest.mark.mount


#: The kernel's attribute and entry timeout (fs/fuse/ops.py) plus scheduling slack.
TIMEOUT_S = 1.0 + 2.0


def eventually(check, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except FileNotFoundError:
            result = False
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_negative_entry_cache_expires(mount_pair_dirs):
    a, b = mount_pair_dirs
    assert not os.path.exists(b / "late")  # b caches the negative entry
    (a / "late").write_bytes(b"here")
    assert eventually(lambda: (b / "late").read_bytes() == b"here")


def test_page_cache_dropped_when_another_mount_rewrites(mount_pair_dirs):
    a, b = mount_pair_dirs
    (a / "f").write_bytes(b"1" * 100_000)
    assert (b / "f").read_bytes() == b"1" * 100_000  # b's page cache now holds it
    assert (b / "f").read_bytes() == b"1" * 100_000  # kept across opens: unchanged
    (a / "f").write_bytes(b"2" * 100_000)  # same size, new content
    assert eventually(lambda: (b / "f").read_bytes() == b"2" * 100_000)


def test_page_cache_kept_for_own_writes(mount_pair_dirs):
    a, _ = mount_pair_dirs
    with open(a / "g", "wb") as f:
        f.write(b"x" * 10_000)
    with open(a / "g", "r+b") as f:
        f.seek(5000)
        f.write(b"y")
    data = (a / "g").read_bytes()
    assert data[5000:5001] == b"y" and len(data) == 10_000


def test_append_seen_by_other_mount(mount_pair_dirs):
    a, b = mount_pair_dirs
    (a / "log").write_bytes(b"first\n")
    assert (b / "log").read_bytes() == b"first\n"
    with open(a / "log", "ab") as f:
        f.write(b"second\n")
    assert eventually(lambda: (b / "log").read_bytes() == b"first\nsecond\n")


def test_recreate_after_delete_seen_by_other_mount(mount_pair_dirs):
    a, b = mount_pair_dirs
    (a / "r").write_bytes(b"old")
    assert (b / "r").read_bytes() == b"old"
    os.unlink(a / "r")
    (a / "r").write_bytes(b"new!")
    assert eventually(lambda: (b / "r").read_bytes() == b"new!")


def test_attributes_follow_other_mount(mount_pair_dirs):
    a, b = mount_pair_dirs
    (a / "m").write_bytes(b"z")
    assert os.stat(b / "m").st_mode & 0o777 == 0o644
    os.chmod(a / "m", 0o600)
    assert eventually(lambda: os.stat(b / "m").st_mode & 0o777 == 0o600)


def test_replaced_file_opens_at_once_in_other_mount(mount_pair_dirs):
    """A rename over a file in one mount: the other mount's cached entry points at the
    removed inode; ESTALE makes its kernel look the name up again instead of failing."""
    a, b = mount_pair_dirs
    (a / "v").write_bytes(b"v1")
    assert (b / "v").read_bytes() == b"v1"  # b caches the entry v -> old inode
    (a / "v.tmp").write_bytes(b"v2")
    os.rename(a / "v.tmp", a / "v")  # the old inode is purged
    assert (b / "v").read_bytes() == b"v2"  # at once, not after the entry timeout
    assert os.stat(b / "v").st_size == 2


def test_xattr_set_in_other_mount_seen_within_timeout(mount_pair_dirs):
    """getxattr is answered locally while the inode's attributes (fresh for about 1 s) say
    it has no xattrs: a label set by another mount shows up once they expire."""
    a, b = mount_pair_dirs
    (a / "x").write_bytes(b"")
    assert os.listxattr(b / "x") == []  # b now knows x as having no xattrs
    os.setxattr(a / "x", "user.label", b"cat")
    assert eventually(lambda: os.getxattr(b / "x", "user.label") == b"cat" if _has(b / "x") else False)
    os.setxattr(b / "x", "user.more", b"1")  # and through b itself, at once
    assert os.getxattr(b / "x", "user.more") == b"1"


def _has(path) -> bool:
    try:
        os.getxattr(path, "user.label")
        return True
    except OSError:
        return False


def test_names_over_name_max_are_enametoolong(mount_pair_dirs):
    """A 256-byte name gets ENAMETOOLONG from every call that takes one, as on ext4
    (pjdfstest's */02 cases), and a 255-byte one works."""
    import errno

    a, _ = mount_pair_dirs
    long, ok = "x" * 256, "y" * 255
    (a / ok).write_bytes(b"ok")
    calls = [
        lambda: open(a / long, "w"),
        lambda: os.stat(a / long),
        lambda: os.mkdir(a / long),
        lambda: os.mkfifo(a / long),
        lambda: os.symlink("t", a / long),
        lambda: os.link(a / ok, a / long),
        lambda: os.rename(a / ok, a / long),
        lambda: os.unlink(a / long),
        lambda: os.rmdir(a / long),
        lambda: os.chmod(a / long, 0o644),
        lambda: os.truncate(a / long, 0),
        lambda: os.symlink("t" * 4096, a / "s"),
    ]
    for call in calls:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.ENAMETOOLONG, (call, info.value)
    assert (a / ok).read_bytes() == b"ok"


def test_data_servers_keep_no_page_cache_of_the_blocks_they_store(module_cluster, mount_pair_dirs):
    """Drop-behind (docs/dataserver.md): once close returns, every replica of the file's
    blocks is on its data server's disk and out of that machine's page cache."""
    a, _ = mount_pair_dirs
    dirs = [module_cluster.base / f"data-{i}" for i in range(len(module_cluster.data))]
    before = {p for d in dirs for p in block_files(d).values()}
    data = os.urandom(9 * 1024 * 1024)  # three blocks, the last partial
    (a / "stored").write_bytes(data)
    stored = {p for d in dirs for p in block_files(d).values()} - before
    assert len(stored) >= 3
    assert {p: resident_bytes(p) for p in stored} == {p: 0 for p in stored}
    assert (a / "stored").read_bytes() == data


def test_a_mount_keeps_no_copy_of_what_the_kernel_caches_once_a_file_is_read_and_closed(tmp_path):
    """Files read whole and closed leave the mount's block cache (the kernel's page cache
    holds what was read), a small file's only block included, so a shuffled epoch does not
    fill the mount's memory with copies, each on fresh pages; a block its reader stopped
    inside stays for a reader that goes on. (Before: a 3,000 x 150 KiB epoch left the
    mount at ~400 MB resident, ~30 page faults a sample.)"""
    with Cluster(tmp_path / "c", dataservers=1) as c:
        writer = c.mount()
        samples = {f"s{i:02d}": os.urandom(200_000) for i in range(20)}  # a block each, not inline
        for name, data in samples.items():
            (writer.path / name).write_bytes(data)
        big = os.urandom(9 * 1024 * 1024)  # blocks of 4 MiB
        (writer.path / "big").write_bytes(big)
        reader = c.mount(args=["--metrics-listen", "127.0.0.1:0"])
        address = metrics_address(c.logs_dir / "mount-2.log")

        def cached() -> float:
            return value(scrape(address), "stripefs_client_block_cache_bytes")

        for name, data in samples.items():
            assert (reader.path / name).read_bytes() == data
        assert cached() == 0
        # Read again: from the kernel's page cache, or fetched again, never wrong.
        for name, data in samples.items():
            assert (reader.path / name).read_bytes() == data
        with open(reader.path / "big", "rb") as f:
            assert f.read(100_000) == big[:100_000]
        assert cached() >= 4 * 1024 * 1024  # the first block, which its reader stopped inside
        assert (reader.path / "big").read_bytes() == big
        assert cached() == 0


def _resident_mib(pid: int) -> float:
    return process_resident_kib(pid) / 1024


def _read_384_mib_through_a_fresh_mount(c: Cluster, *reader_args: str) -> tuple[Path, int, float, float]:
    """A 384 MiB file (96 blocks) written through one mount and read whole, cold, through a
    fresh one (mount-2, with `reader_args`) that has made its first write first (its own
    buffers made): (the reading mount's path, its pid, its resident MiB before the read,
    and after it)."""
    piece = os.urandom(1 << 20)
    with open(c.mount().path / "big", "wb") as f:
        for _ in range(384):
            f.write(piece)
    reader = c.mount(args=reader_args)
    pid = reader.proc.pid
    (reader.path / "small").write_bytes(b"x")
    before = _resident_mib(pid)
    with open(reader.path / "big", "rb", buffering=0) as f:
        assert all(chunk == piece for chunk in iter(lambda: f.read(1 << 20), b""))
        assert f.tell() == 384 << 20
    return reader.path, pid, before, _resident_mib(pid)


def test_an_idle_mount_hands_back_the_memory_its_reads_freed(tmp_path):
    """A cold read through a mount fills its block cache ahead of the reader and lets the
    blocks go behind it; glibc keeps the freed buffers as fragments of its heaps, resident.
    Once the mount has answered no read, write or release for a second it hands them back
    (fs/fuse/memory.py, proto/malloc.py `trim`), so the next burst (a checkpoint write, say)
    starts from what the mount holds, not from the last burst's peak. (Before: a 1 GiB read
    left the mount at 385-468 MiB resident with its block cache empty, 81-93 once trimmed;
    here, 384 MiB read, it stayed 69-89 MiB above where it started, 15 s later.) Trimmed,
    it ends 2-34 MiB above where it started in 57 runs here beside other tests, and CI saw
    49 once: what stays is memory in use by the C libraries (gRPC's, TLS's; Python's own
    allocations were 26.3-26.5 MB at every trim, tracemalloc), not what glibc holds free,
    so the trim is checked by its count, and the resident size against a bound between
    the two."""
    with Cluster(tmp_path / "c", dataservers=1) as c:
        _, pid, before, after_read = _read_384_mib_through_a_fresh_mount(c, "--metrics-listen", "127.0.0.1:0")
        address = metrics_address(c.logs_dir / "mount-2.log")
        assert eventually(lambda: value(scrape(address), "stripefs_fuse_memory_trims_total", why="idle") >= 1,
                          timeout_s=15.0)
        assert eventually(lambda: _resident_mib(pid) < before + 64, timeout_s=15.0), (
            f"resident {before:.0f} MiB before the read, {after_read:.0f} after it,"
            f" {_resident_mib(pid):.0f} after 15 s idle")


def test_a_write_after_a_spell_of_reads_hands_back_what_the_reads_freed(tmp_path):
    """A write that follows 64 MiB or more of reads with no write between them hands back
    what the reads freed at once (fs/fuse/memory.py), without waiting for an idle second
    that a job loading a checkpoint and then saving one may never leave: the write's
    buffers then take pages glibc holds, not new ones on top of them. (Before, writes with
    no idle second between them kept the mount ~65 MiB above where it started after a
    384 MiB read; a 1 GiB write after a 1 GiB read peaked at 436-461 MiB, 20-190 MiB above
    what the read left.)"""
    with Cluster(tmp_path / "c", dataservers=1) as c:
        path, pid, before, after_read = _read_384_mib_through_a_fresh_mount(c)
        lowest = after_read
        with open(path / "log", "wb", buffering=0) as f:
            deadline = time.monotonic() + 6.0  # small writes, never a second apart: never idle
            while time.monotonic() < deadline and lowest >= before + 48:
                f.write(b"x" * 65536)
                time.sleep(0.05)
                lowest = min(lowest, _resident_mib(pid))
        assert lowest < before + 48, (
            f"resident {before:.0f} MiB before the read, {after_read:.0f} after it,"
            f" no lower than {lowest:.0f} while writing")
