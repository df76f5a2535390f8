"""End to end: a tree with every kind of file POSIX has survives `cp -a` into a mount and
back out, as judged by `rsync -aHAXc --itemize-changes` and by a walk of both trees.

The tree holds nested directories, 1,000 small files, three 50 MiB files, empty and sparse
files, symlinks (relative, absolute, dangling), hard links within and across directories,
user.* xattrs on files and directories, odd modes (0o000, setuid, sticky, setgid), files
owned by other users, non-UTF-8 and 255-byte names, and FIFOs.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest

from cluster import Cluster, Mount

pytestmark = [pytest.mark.mount, pytest.mark.slow]

small_files = 1000
small_file_max_bytes = 8 * 1024
big_files = 3
big_file_bytes = 50 * 1024 * 1024
sparse_offset_bytes = 20 * 1024 * 1024
name_max_bytes = 255


def _write(path: bytes | Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def make_tree(root: Path, seed: int = 1234) -> None:
    """Builds the tree under `root` (which must not exist)."""
    rng = random.Random(seed)
    root.mkdir()
    # Nested directories.
    deep = root / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    _write(deep / "leaf.txt", b"deep leaf\n")
    # Small files spread over a few directories, random sizes including 0.
    for i in range(small_files):
        d = root / "small" / f"d{i % 10:02d}"
        d.mkdir(parents=True, exist_ok=True)
        _write(d / f"f{i:04d}.bin", rng.randbytes(rng.randint(0, small_file_max_bytes)))
    # Large files with random content.
    (root / "big").mkdir()
    for i in range(big_files):
        _write(root / "big" / f"big{i}.dat", rng.randbytes(big_file_bytes))
    # Empty files.
    _write(root / "empty", b"")
    _write(root / "a" / "empty-too", b"")
    # Sparse files: a far hole then a little data, and a hole at the end.
    with open(root / "sparse-far", "wb") as f:
        f.seek(sparse_offset_bytes)
        f.write(b"after the hole")
    with open(root / "sparse-mid", "wb") as f:
        f.write(b"head")
        f.seek(3 * 1024 * 1024 + 123)
        f.write(rng.randbytes(100))
        f.truncate(5 * 1024 * 1024 + 7)
    # Symlinks.
    os.symlink("a/b/c/d/leaf.txt", root / "link-relative")
    os.symlink("../../empty", root / "a" / "b" / "link-up")
    os.symlink("/etc/hostname", root / "link-absolute")
    os.symlink("no/such/target", root / "link-dangling")
    os.symlink("a", root / "link-to-dir")
    # Hard links within one directory and across directories.
    (root / "hl").mkdir()
    (root / "hl-other").mkdir()
    _write(root / "hl" / "orig", b"linked content\n" * 100)
    os.link(root / "hl" / "orig", root / "hl" / "same-dir")
    os.link(root / "hl" / "orig", root / "hl-other" / "cross-dir")
    _write(root / "hl" / "pair", rng.randbytes(5000))
    os.link(root / "hl" / "pair", root / "hl-other" / "pair-link")
    # Extended attributes on files and directories.
    os.setxattr(root / "empty", "user.label", b"cat")
    os.setxattr(root / "empty", "user.empty", b"")
    os.setxattr(root / "hl" / "orig", "user.binary", bytes(range(256)))
    os.setxattr(root / "small" / "d00" / "f0000.bin", "user.split", b"train")
    os.setxattr(root / "small" / "d00" / "f0000.bin", "user.big", rng.randbytes(4000))
    os.setxattr(root / "small", "user.dataset", b"imagenet-mini")
    os.setxattr(root / "a" / "b", "user.dir-label", b"\x00\x01\xff")
    # Non-UTF-8 names and names of the longest length.
    broot = os.fsencode(root)
    _write(os.path.join(broot, b"caf\xe9"), b"latin-1 name\n")
    os.mkdir(os.path.join(broot, b"dir-\xff\xfe"))
    _write(os.path.join(broot, b"dir-\xff\xfe", b"inner"), b"x")
    _write(root / ("n" * name_max_bytes), b"long name\n")
    _write(root / ("\u00e9" * (name_max_bytes // 2) + "x"), b"long multibyte name\n")
    os.mkdir(root / ("D" * name_max_bytes))
    # FIFOs.
    os.mkfifo(root / "fifo")
    os.mkfifo(root / "a" / "fifo2", 0o600)
    # Files owned by other users (we are root: cp -a must carry ownership over).
    _write(root / "owned-by-other", b"mine\n")
    os.chown(root / "owned-by-other", 1234, 5678)
    (root / "other-dir").mkdir()
    os.chown(root / "other-dir", 4321, 8765)
    os.lchown(root / "link-dangling", 1234, 1234)
    # Fixed timestamps with nanoseconds.
    os.utime(root / "a" / "b" / "c" / "d" / "leaf.txt", ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    # Odd modes, set last so that writing the tree above was not in their way.
    _write(root / "mode000", b"nobody may read me\n")
    os.chmod(root / "mode000", 0o000)
    _write(root / "setuid", b"#!/bin/sh\nexit 0\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "sticky").mkdir()
    _write(root / "sticky" / "inside", b"in a sticky dir\n")
    os.chmod(root / "sticky", 0o1777)
    (root / "setgid").mkdir()
    _write(root / "setgid" / "inside", b"in a setgid dir\n")
    os.chmod(root / "setgid", 0o2750)
    os.chmod(root / "a" / "b" / "c", 0o700)


def run(*argv: str | os.PathLike, timeout: float = 240) -> subprocess.CompletedProcess:
    res = subprocess.run([os.fspath(a) for a in argv], capture_output=True, timeout=timeout)
    if res.returncode != 0:
        pytest.fail(
            f"{' '.join(map(os.fspath, argv))} exited with {res.returncode}\n"
            f"stdout:\n{res.stdout.decode(errors='replace')[-4000:]}\n"
            f"stderr:\n{res.stderr.decode(errors='replace')[-4000:]}",
            pytrace=False,
        )
    return res


def rsync_differences(src: Path, dst: Path) -> str:
    """What `rsync -aHAXc` would change to make dst like src (empty when they are alike)."""
    res = run(
        "rsync", "-aHAXc", "--delete", "--dry-run", "--itemize-changes",
        f"{os.fspath(src)}/", f"{os.fspath(dst)}/",
    )
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


def assert_no_rsync_differences(src: Path, dst: Path) -> None:
    diff = rsync_differences(src, dst)
    lines = diff.splitlines()
    assert not lines, f"rsync would change {len(lines)} entries of {dst}:\n" + "\n".join(lines[:60])


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path) -> dict[bytes, dict]:
    """Everything `cp -a` should preserve, per path relative to root, with hard links
    recorded as the sorted group of paths sharing an inode."""
    broot = os.fsencode(root)
    entries: dict[bytes, dict] = {}
    inodes: dict[int, list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, broot)
            st = os.lstat(full)
            e: dict = {
                "mode": oct(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "nlink": st.st_nlink,
            }
            if not stat.S_ISDIR(st.st_mode):
                e["size"] = st.st_size
            if stat.S_ISREG(st.st_mode):
                e["mtime_ns"] = st.st_mtime_ns
                e["sha256"] = _sha256(full)
                inodes.setdefault(st.st_ino, []).append(rel)
                e["ino"] = st.st_ino
            if stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(full)
            else:
                e["xattrs"] = {
                    n: os.getxattr(full, n, follow_symlinks=False)
                    for n in sorted(os.listxattr(full, follow_symlinks=False))
                    if n.startswith("user.")
                }
            entries[rel] = e
    for e in entries.values():
        if "ino" in e:
            e["links"] = sorted(inodes[e.pop("ino")])
    return entries


def assert_same_tree(expected: dict[bytes, dict], actual: dict[bytes, dict], where: str) -> None:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing and not extra, f"{where}: missing {missing[:10]}, extra {extra[:10]}"
    diffs: dict[str, list[str]] = {}
    for rel in sorted(expected):
        e, a = expected[rel], actual[rel]
        for key in sorted(set(e) | set(a)):
            if e.get(key) != a.get(key):
                diffs.setdefault(key, []).append(
                    f"{rel!r:.80} {key}: expected {e.get(key)!r:.200}, got {a.get(key)!r:.200}"
                )
    # A few examples of each kind of difference, so one kind does not hide the others.
    report = [
        f"{key}: {len(lines)} entries differ\n  " + "\n  ".join(lines[:8])
        for key, lines in sorted(diffs.items())
    ]
    assert not diffs, f"{where}:\n" + "\n".join(report)


@pytest.fixture(scope="module")
def trees(engine_module_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory):
    """(source, copy in the mount, copy brought back out), made once for each metadata
    engine: copied in through one mount and out through another (on PostgreSQL, each
    mount at its own metaserver)."""
    base = tmp_path_factory.mktemp("tree")
    src = base / "src"
    make_tree(src)
    m: Mount = engine_module_cluster.mount(base / "mnt")
    m2: Mount = engine_module_cluster.mount(base / "mnt2")
    try:
        run("cp", "-a", src, m.path / "tree")
        in_mount = m2.path / "tree"
        out = base / "out"
        run("cp", "-a", in_mount, out)
        yield src, in_mount, out, snapshot(src)
    finally:
        m2.close()
        m.close()


@pytest.mark.timeout(600)
def test_rsync_sees_no_difference_in_the_mount(trees):
    src, in_mount, _, _ = trees
    assert_no_rsync_differences(src, in_mount)


def test_rsync_sees_no_difference_in_the_copy_brought_out(trees):
    src, _, out, _ = trees
    assert_no_rsync_differences(src, out)


def test_walk_of_the_mount_matches_the_source(trees):
    _, in_mount, _, expected = trees
    assert_same_tree(expected, snapshot(in_mount), "mount")


def test_walk_of_the_copy_brought_out_matches_the_source(trees):
    _, _, out, expected = trees
    assert_same_tree(expected, snapshot(out), "copied out")
