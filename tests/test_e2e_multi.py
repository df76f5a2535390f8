"""End to end with two mounts of one cluster: close-to-open consistency between them,
renames seen by the other mount, an unlinked file still readable through a handle open
on the other mount, and many processes writing and reading large files at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import pytest

from cluster import Cluster, Mount, sha256_file

pytestmark = [pytest.mark.mount]

#: How long another mount may take to see a rename (its entry cache times out).
visibility_timeout_s = 2.5
chunk_bytes = 1024 * 1024
writers = 8
writer_file_bytes = 20 * 1024 * 1024
readers = 4
shared_file_bytes = 50 * 1024 * 1024


def _chunks(seed: int, size: int):
    """Deterministic pseudo-random content, produced a chunk at a time."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(chunk_bytes, left)
        yield rng.randbytes(n)
        left -= n


def write_file(path: str, seed: int, size: int) -> str:
    """Writes the content for `seed` to path; returns its sha256. Runs in a child process."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in _chunks(seed, size):
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def expected_sha256(seed: int, size: int) -> str:
    h = hashlib.sha256()
    for chunk in _chunks(seed, size):
        h.update(chunk)
    return h.hexdigest()


def read_sha256(path: str) -> str:
    return sha256_file(path)


def _pool(n: int) -> ProcessPoolExecutor:
    # Fork: the children need nothing but the functions above.
    return ProcessPoolExecutor(max_workers=n, mp_context=get_context("fork"))


def wait_for(predicate, timeout: float = visibility_timeout_s, what: str = "") -> None:
    """Polls predicate; an OSError counts as not yet (within the entry cache timeout the
    other mount may still hold a name for an inode that is gone)."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        try:
            if predicate():
                return
        except OSError as e:
            last_error = e
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {timeout}s: {what} (last error: {last_error})")
        time.sleep(0.05)


def test_file_closed_in_one_mount_reads_whole_in_the_other(two_mounts: tuple[Mount, Mount]):
    a, b = two_mounts
    for size in (0, 1, 100_000, 9 * 1024 * 1024 + 17):
        name = f"f{size}"
        digest = write_file(os.fspath(a / name), seed=size, size=size)
        assert sha256_file(b / name) == digest, f"{name}: content differs in the other mount"
        assert os.stat(b / name).st_size == size


def test_overwrite_in_one_mount_is_seen_after_reopen_in_the_other(two_mounts: tuple[Mount, Mount]):
    a, b = two_mounts
    (a / "v").write_bytes(b"version 1")
    assert (b / "v").read_bytes() == b"version 1"
    # A checkpoint-style publish: write a temporary file, fsync, rename over the old one.
    with open(a / "v.tmp", "wb") as f:
        f.write(b"version 2, longer than the first")
        f.flush()
        os.fsync(f.fileno())
    os.rename(a / "v.tmp", a / "v")
    wait_for(lambda: (b / "v").read_bytes() == b"version 2, longer than the first",
             what="the renamed checkpoint in the other mount")


def test_rename_in_one_mount_is_seen_by_the_other(two_mounts: tuple[Mount, Mount]):
    a, b = two_mounts
    (a / "dir").mkdir()
    (a / "dir" / "old").write_bytes(b"payload")
    # The other mount looks first, so that it has the old names cached.
    assert (b / "dir" / "old").read_bytes() == b"payload"
    assert not (b / "dir" / "new").exists()
    os.rename(a / "dir" / "old", a / "dir" / "new")
    wait_for(lambda: not (b / "dir" / "old").exists() and (b / "dir" / "new").exists(),
             what="rename dir/old -> dir/new")
    assert (b / "dir" / "new").read_bytes() == b"payload"
    assert sorted(os.listdir(b / "dir")) == ["new"]


def test_unlinked_file_stays_readable_through_a_handle_in_the_other_mount(
    two_mounts: tuple[Mount, Mount],
):
    a, b = two_mounts
    size = 6 * 1024 * 1024 + 5
    digest = write_file(os.fspath(a / "doomed"), seed=7, size=size)
    with open(b / "doomed", "rb") as reader:
        first = reader.read(1000)
        os.unlink(a / "doomed")
        wait_for(lambda: not (b / "doomed").exists(), what="unlink in the other mount")
        rest = reader.read()
    assert hashlib.sha256(first + rest).hexdigest() == digest
    assert not (a / "doomed").exists()


def _inode_exists(cluster: Cluster, ino: int) -> bool:
    """Whether the metaserver still has an inode."""
    return cluster.meta_value("SELECT COUNT(*) FROM inodes WHERE ino = ?", ino) == 1


@contextmanager
def _open_for_reading(written: Path, read: Path, content: bytes) -> Iterator[tuple[int, int]]:
    """`content` written as `written`, then that file opened read-only as `read` (through
    the same mount or another): its descriptor and inode, the descriptor closed after."""
    written.write_bytes(content)
    fd = os.open(read, os.O_RDONLY)
    try:
        yield fd, os.fstat(fd).st_ino
    finally:
        os.close(fd)


def test_a_small_file_open_for_reading_elsewhere_is_removed_at_once_and_still_read_whole(
    cluster: Cluster, two_mounts: tuple[Mount, Mount],
):
    # A reader's open of a file without blocks (inline here) is not recorded: the open
    # brought all of it. Removed by another mount, it is purged, and the handle
    # still reads what it opened; fstat shows it unlinked, as a local disk would.
    a, b = two_mounts
    with _open_for_reading(a / "small", b / "small", b"all of the sample") as (fd, ino):
        os.unlink(a / "small")
        # (at once once the writer's own release, sent in the background, is in)
        wait_for(lambda: not _inode_exists(cluster, ino), what="the purge while open elsewhere")
        wait_for(lambda: not (b / "small").exists(), what="unlink in the other mount")
        time.sleep(1.1)  # the kernel's attributes of the open file expire: fstat asks the mount
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100, 0) == b"all of the sample"


def _opens_of(cluster: Cluster, ino: int) -> int:
    """Opens of an inode the metaserver has recorded, over all sessions."""
    return cluster.meta_value("SELECT COALESCE(SUM(count), 0) FROM opens WHERE ino = ?", ino)


def test_a_file_with_blocks_open_unrecorded_elsewhere_outlives_its_unlink(tmp_path: Path):
    # A reader's open of a file with blocks goes unrecorded (no write on the metaserver, no
    # release): the metaserver keeps an unlinked file with blocks for --unlinked-hold-s
    # (1 s here), and the reader's client records an open still there after a fifth of
    # that. The handle, kept open well past the wait and the GC grace (1 s), reads it all.
    c = Cluster(tmp_path / "cluster", dataservers=2, meta_args=["--unlinked-hold-s", "1", "--gc-grace-s", "1"])
    try:
        a, b = c.mount(), c.mount()
        content = os.urandom(300 * 1024)
        for name in ("sample", "quick"):
            (a.path / name).write_bytes(content)
            ino = os.stat(a.path / name).st_ino
            wait_for(lambda: _opens_of(c, ino) == 0, what="the writer's release")
        fd = os.open(b.path / "sample", os.O_RDONLY)
        try:
            ino = os.fstat(fd).st_ino
            assert _opens_of(c, ino) == 0, "a reader's open was recorded at once"
            wait_for(lambda: _opens_of(c, ino) == 1, what="the lingering open recorded")
            os.unlink(a.path / "sample")
            time.sleep(3.5)  # the wait, a sweep, the GC grace and a heartbeat's deletes
            assert _inode_exists(c, ino)
            assert os.pread(fd, len(content) + 1, 0) == content
        finally:
            os.close(fd)
        wait_for(lambda: not _inode_exists(c, ino), what="the purge after the close")
        # Read and closed at once: the metaserver records nothing and hears no release.
        assert (b.path / "quick").read_bytes() == content
        time.sleep(0.5)
        assert _opens_of(c, os.stat(b.path / "quick").st_ino) == 0
    finally:
        c.close()


def test_a_small_file_open_for_reading_outlives_its_name_removed_on_the_same_mount(
    cluster: Cluster, two_mounts: tuple[Mount, Mount],
):
    # Removed (or replaced) through the mount that holds it open, the open is recorded
    # first: the inode stays for the handle, which can still change it (fchmod), and goes
    # with the close.
    a, _ = two_mounts
    for how in ("unlink", "rename over"):
        with _open_for_reading(a / "small", a / "small", b"tiny") as (fd, ino):
            if how == "unlink":
                os.unlink(a / "small")
            else:
                (a / "other").write_bytes(b"new")
                os.rename(a / "other", a / "small")
            assert _inode_exists(cluster, ino), how
            os.fchmod(fd, 0o600)
            assert os.fstat(fd).st_mode & 0o777 == 0o600
            assert os.pread(fd, 100, 0) == b"tiny"
        wait_for(lambda: not _inode_exists(cluster, ino), what=f"the purge after the close ({how})")
    assert (a / "small").read_bytes() == b"new"


def test_a_name_replaced_elsewhere_is_removed_though_its_old_file_is_open_here(
    cluster: Cluster, two_mounts: tuple[Mount, Mount],
):
    # The name still leads, here, to the old file, which is open unrecorded and already
    # gone (replaced by the other mount): recording that open first fails, and the removal
    # of the name (now the new file's) goes on all the same.
    a, b = two_mounts
    with _open_for_reading(a / "small", a / "small", b"old") as (fd, old):
        (b / "small.new").write_bytes(b"new")
        os.rename(b / "small.new", b / "small")
        wait_for(lambda: not _inode_exists(cluster, old), what="the old file's purge")
        os.unlink(a / "small")
        assert os.pread(fd, 10, 0) == b"old"
    # b made the name itself (the rename), so its kernel may show it until its entry
    # timeout runs out: another mount's change is seen within that, not at once.
    wait_for(lambda: not (b / "small").exists(), what="the removal, in the other mount")


def test_a_lock_through_a_small_file_open_for_reading_holds_across_mounts(two_mounts: tuple[Mount, Mount]):
    # The lock records the reader's open first (the metaserver lets only an open take one).
    a, b = two_mounts
    (a / "small").write_bytes(b"x" * 100)
    with open(b / "small", "rb") as reader, open(a / "small", "r+b") as writer:
        fcntl.lockf(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.lockf(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(reader, fcntl.LOCK_UN)
        fcntl.lockf(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_parallel_writers_and_readers(two_mounts: tuple[Mount, Mount]):
    a, b = two_mounts
    (a / "par").mkdir()
    paths = [os.fspath(a / "par" / f"w{i}") for i in range(writers)]
    with _pool(writers) as pool:
        digests = list(pool.map(write_file, paths, range(writers), [writer_file_bytes] * writers))
    for i, digest in enumerate(digests):
        assert digest == expected_sha256(i, writer_file_bytes)
    # Verified through the other mount, which saw none of the writes.
    with _pool(writers) as pool:
        read_back = list(pool.map(read_sha256, [os.fspath(b / "par" / f"w{i}") for i in range(writers)]))
    assert read_back == digests

    shared = os.fspath(a / "par" / "shared")
    digest = write_file(shared, seed=1000, size=shared_file_bytes)
    # Readers on both mounts at once.
    sources = [os.fspath((a if i % 2 == 0 else b) / "par" / "shared") for i in range(readers)]
    with _pool(readers) as pool:
        assert list(pool.map(read_sha256, sources)) == [digest] * readers
