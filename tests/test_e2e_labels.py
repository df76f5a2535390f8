"""Label queries end to end: labels set with setxattr(2) through a real mount, found by
`stripefs find` (with and without --json, named as a mount path or a stripefs:// URL) and
by the library, checked against a walk of the mount that reads every label with
getxattr(2); after labels change and files move or go, as a second mount sees it; and a
find whose pages are taken while another mount changes the tree."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import trio

from cluster import Cluster
from test_cli import run, run_json
from test_e2e_perms import USER, run_as

from stripefs.client import open_client, paths
from stripefs.proto.credentials import load_credentials
from stripefs.proto.errors import FsError

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("labels"), dataservers=2) as c:
        c.m1, c.m2 = c.mount(), c.mount()
        yield c


def setlabel(path: Path, name: str, value: str) -> None:
    os.setxattr(path, f"user.{name}", value.encode())


def walk_find(top: Path, labels: dict[str, str]) -> list[str]:
    """The regular files under `top` whose effective labels are `labels`, by walking the
    mount and reading each label with getxattr(2) (root's own labels included)."""
    def own(p: Path) -> dict[str, str]:
        out = {}
        for name in os.listxattr(p, follow_symlinks=False):
            if name.startswith("user."):
                out[name[5:]] = os.getxattr(p, name, follow_symlinks=False).decode()
        return out

    found = []

    def walk(d: Path, eff: dict[str, str]) -> None:
        with os.scandir(d) as it:
            for e in it:
                p = Path(e.path)
                if e.is_dir(follow_symlinks=False):
                    walk(p, {**eff, **own(p)})
                elif e.is_file(follow_symlinks=False):
                    mine = {**eff, **own(p)}
                    if all(mine.get(k) == v for k, v in labels.items()):
                        found.append(str(p))

    walk(top, eff_from_mount(top))
    return sorted(found)


def eff_from_mount(top: Path) -> dict[str, str]:
    """Effective labels of directory `top` of a mount: its own over its parents', up to the mount's root."""
    chain = []
    p = top
    while True:
        chain.append(p)
        if p.is_mount():
            break
        p = p.parent
    eff: dict[str, str] = {}
    for d in reversed(chain):
        for name in os.listxattr(d):
            if name.startswith("user."):
                eff[name[5:]] = os.getxattr(d, name).decode()
    return eff


def make_dataset(root: Path) -> None:
    """ds/{train,val}/{cat,dog}/N.jpg, split and class labels on the directories, a few
    files labelled otherwise than their directory, and a symlink and a fifo."""
    for split in ("train", "val"):
        s = root / "ds" / split
        for cls in ("cat", "dog"):
            d = s / cls
            d.mkdir(parents=True)
            setlabel(d, "class", cls)
            for i in range(5):
                (d / f"{i}.jpg").write_bytes(b"x" * (100 + i))
        setlabel(s, "split", split)
    setlabel(root / "ds" / "train" / "cat" / "3.jpg", "class", "dog")
    setlabel(root / "ds" / "train" / "dog" / "2.jpg", "class", "cat")
    setlabel(root / "ds" / "val" / "cat" / "1.jpg", "split", "train")
    os.symlink("train", root / "ds" / "link")
    os.mkfifo(root / "ds" / "train" / "cat" / "fifo")


def test_find_on_the_command_line_agrees_with_a_walk(two):
    c = two
    m1 = c.m1.path
    make_dataset(m1)
    query = {"split": "train", "class": "cat"}
    want = walk_find(m1 / "ds", query)
    assert len(want) == 6  # 4 of train/cat's 5, train/dog/2 and val/cat/1 by labels of their own
    args = [arg for k, v in query.items() for arg in ("--label", f"{k}={v}")]
    res = run(c, "find", str(m1 / "ds"), *args)
    assert sorted(res.stdout.splitlines()) == want
    doc = run_json(c, "find", str(m1 / "ds"), *args)
    assert sorted(d["path"] for d in doc) == want
    assert {d["cluster_path"] for d in doc} == {"/" + os.path.relpath(p, m1) for p in want}
    for d in doc:
        assert d["size"] == os.stat(d["path"]).st_size and d["ino"] == os.stat(d["path"]).st_ino
    url = f"stripefs://{c.meta_addr}/ds"
    res = run(c, "find", url, "-l", "split=val")
    assert sorted(res.stdout.splitlines()) == sorted(
        url + "/" + os.path.relpath(p, m1 / "ds") for p in walk_find(m1 / "ds", {"split": "val"}))
    # Nothing found is no error; a bad label or a missing path is.
    assert run(c, "find", str(m1 / "ds"), "-l", "split=test").stdout == ""
    assert run_json(c, "find", str(m1 / "ds"), "-l", "split=test") == []
    assert "NAME=VALUE" in run(c, "find", str(m1 / "ds"), "-l", "split", rc=2).stderr
    res = run(c, "find", "stripefs:/no/such", "-l", "a=b", rc=1)
    assert res.stderr.strip() == "stripefs find: stripefs:/no/such: No such file or directory [ENOENT]"
    res = run(c, "find", str(m1 / "ds" / "train" / "cat" / "0.jpg"), "-l", "a=b", rc=1)
    assert "ENOTDIR" in res.stderr


def test_changes_on_one_mount_are_found_from_another(two):
    c = two
    m1, m2 = c.m1.path, c.m2.path
    top = "changes"
    for i in range(6):
        d = m1 / top / f"d{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(b"y")
    setlabel(m1 / top / "d0", "split", "train")

    def found_on_m2(**labels) -> list[str]:
        args = [arg for k, v in labels.items() for arg in ("-l", f"{k}={v}")]
        got = sorted(run(c, "find", str(m2 / top), *args).stdout.splitlines())
        assert got == walk_find(m2 / top, labels)
        return [os.path.relpath(p, m2 / top) for p in got]

    assert found_on_m2(split="train") == ["d0/f0", "d0/f2", "d0/f4"]
    setlabel(m1 / top / "d1" / "f1", "split", "train")  # a label set
    os.rename(m1 / top / "d0" / "f2", m1 / top / "d1" / "f2")  # a file moved out
    os.unlink(m1 / top / "d0" / "f4")  # and one removed
    assert found_on_m2(split="train") == ["d0/f0", "d1/f1"]
    os.rename(m1 / top / "d1", m1 / top / "d0" / "sub")  # a directory moved under the label
    assert found_on_m2(split="train") == ["d0/f0", "d0/sub/f1", "d0/sub/f2", "d0/sub/f3", "d0/sub/f5"]
    setlabel(m1 / top / "d0" / "sub", "split", "val")  # relabelled below
    os.removexattr(m1 / top / "d0" / "sub" / "f1", "user.split")
    assert found_on_m2(split="train") == ["d0/f0"]
    assert found_on_m2(split="val") == ["d0/sub/f1", "d0/sub/f2", "d0/sub/f3", "d0/sub/f5"]


def test_a_find_goes_on_while_another_mount_changes_the_tree(two):
    """Pages of 3, with files renamed, relabelled, removed and added between pages: no
    error, nothing listed twice, and every file that matched all along and was not touched
    is listed."""
    c = two
    m1 = c.m1.path
    top = m1 / "moving"
    for i in range(40):
        d = top / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(b"z")
    for i in range(4):
        setlabel(top / f"d{i}", "k", "v")
    for i in range(0, 40, 5):
        setlabel(top / f"d{i % 4}" / f"f{i}", "own", "yes")
    touched = set()

    async def main() -> list[bytes]:
        async with open_client(c.meta_addr, load_credentials(c.client)) as client:
            top_ino = (await paths.resolve(client, "/moving")).ino
            labels = paths.label_list({"k": "v"})
            cursor: list[int] = []
            got: list[bytes] = []
            step = 0
            while True:
                page = await client.find(top_ino, labels, cursor, 3)
                got += page.paths
                if not page.cursor:
                    return got
                cursor = page.cursor
                step += 1
                i = step % 40
                f = top / f"d{i % 4}" / f"f{i}"
                if f.exists():
                    touched.add(f"d{i % 4}/f{i}")
                    [lambda: os.rename(f, top / f"d{(i + 1) % 4}" / f"r{i}"),
                     lambda: setlabel(f, "k", "other"),
                     lambda: os.unlink(f),
                     lambda: (top / f"d{i % 4}" / f"new{i}").write_bytes(b"n")][step % 4]()

    got = [p.decode() for p in trio.run(main)]
    assert len(got) == len(set(got)), got
    untouched = {f"d{i % 4}/f{i}" for i in range(40)} - touched
    assert untouched <= set(got), untouched - set(got)


def test_the_library_finds_by_path(two):
    c = two
    m1 = c.m1.path
    (m1 / "lib" / "a").mkdir(parents=True)
    (m1 / "lib" / "a" / "x").write_bytes(b"1")
    (m1 / "lib" / "y").write_bytes(b"22")
    setlabel(m1 / "lib" / "a", "t", "1")
    setlabel(m1 / "lib" / "y", "t", "1")

    async def main():
        async with open_client(c.meta_addr, load_credentials(c.client)) as client:
            got = sorted([(p, size) async for p, _, size in paths.find(client, "/lib", {"t": "1"})])
            assert got == [("/lib/a/x", 1), ("/lib/y", 2)]
            # The attribute's whole name and a bytes value say the same.
            assert sorted([f.path async for f in paths.find(client, "/lib/", {"user.t": b"1"})]) == ["/lib/a/x", "/lib/y"]
            with pytest.raises(FsError) as e:
                async for _ in paths.find(client, "/lib/y", {"t": "1"}):
                    pass
            assert e.value.errno == errno.ENOTDIR

    trio.run(main)


def query_tree(q: Path) -> dict[str, str]:
    """Relative path -> link target of every link under a query directory (and 'dir' for
    each directory), read with plain os calls."""
    out = {}
    for top, dirs, files in os.walk(q):
        for name in dirs:
            out[os.path.relpath(os.path.join(top, name), q)] = "dir"
        for name in files:
            p = os.path.join(top, name)
            assert os.path.islink(p), p
            out[os.path.relpath(p, q)] = os.readlink(p)
    return out


def test_a_query_directory_shows_the_labelled_files(two):
    c = two
    m1, m2 = c.m1.path, c.m2.path
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = m1 / "qds" / split / cls
            d.mkdir(parents=True)
            setlabel(d, "qclass", cls)
            for i in range(3):
                (d / f"{i}.jpg").write_bytes(f"{split}/{cls}/{i}".encode())
        setlabel(m1 / "qds" / split, "qsplit", split)
    assert ".stripefs" not in os.listdir(m1)
    q = m1 / ".stripefs" / "query" / "qsplit=train"
    tree = query_tree(q)
    files = sorted(k for k, v in tree.items() if v != "dir")
    assert files == [f"qds/train/{c}/{i}.jpg" for c in ("cat", "dog") for i in range(3)]
    assert sorted(os.listdir(q / "qds" / "train")) == ["cat", "dog"]  # as ImageFolder wants it
    for rel in files:
        link = q / rel
        assert os.path.realpath(link) == str(m1 / rel)  # a relative target: works wherever the mount is
        assert link.read_bytes() == (m1 / rel).read_bytes()
    both = m1 / ".stripefs" / "query" / "qsplit=train,qclass=cat"
    assert sorted(os.listdir(both / "qds" / "train" / "cat")) == ["0.jpg", "1.jpg", "2.jpg"]
    assert not os.path.exists(m1 / ".stripefs" / "query" / "nonsense")
    assert os.listdir(m1 / ".stripefs" / "query" / "qsplit=test") == []
    # Read-only, but a link leads to the real file, which is as writable as ever.
    for make in (lambda: os.mkdir(q / "x"), lambda: os.unlink(q / files[0]), lambda: os.symlink("a", q / "b"),
                 lambda: os.rename(q / files[0], q / "moved"), lambda: os.setxattr(q, "user.x", b"1")):
        with pytest.raises(OSError) as e:
            make()
        assert e.value.errno == errno.EROFS
    with open(q / files[0], "ab") as f:
        f.write(b"+")
    assert (m1 / files[0]).read_bytes().endswith(b"+")

    # While a directory of it is open, changes on this mount: the open listing keeps what
    # it began with; the next listing of the query (after QUERY_FRESH_S) shows them, and
    # so does the other mount's.
    cat = q / "qds" / "train" / "cat"
    fd = os.open(cat, os.O_RDONLY | os.O_DIRECTORY)
    try:
        setlabel(m1 / "qds" / "train" / "cat" / "0.jpg", "qsplit", "val")  # relabelled
        os.rename(m1 / "qds" / "train" / "cat" / "1.jpg", m1 / "qds" / "val" / "cat" / "1.jpg")  # moved out
        os.unlink(m1 / "qds" / "train" / "dog" / "2.jpg")  # removed
        (m1 / "qds" / "train" / "cat" / "3.jpg").write_bytes(b"new")  # added
        assert sorted(os.listdir(fd)) == ["0.jpg", "1.jpg", "2.jpg"]
        with pytest.raises(FileNotFoundError):
            (cat / "1.jpg").read_bytes()  # the link of a file moved since: dangling until the next find
    finally:
        os.close(fd)
    time.sleep(1.1)
    want = ["qds/train/cat/2.jpg", "qds/train/cat/3.jpg", "qds/train/dog/0.jpg", "qds/train/dog/1.jpg"]
    assert sorted(k for k, v in query_tree(q).items() if v != "dir") == want
    q2 = m2 / ".stripefs" / "query" / "qsplit=train"
    assert sorted(k for k, v in query_tree(q2).items() if v != "dir") == want
    assert (q2 / "qds" / "train" / "cat" / "3.jpg").read_bytes() == b"new"


def test_a_query_directory_shows_each_caller_what_it_could_walk_to(two):
    c = two
    public = Path(tempfile.mkdtemp(prefix="stripefs-labels-", dir="/tmp"))  # pytest's tmp is 0700
    try:
        public.chmod(0o755)
        m = c.mount(public / "mnt")
        try:
            each_caller(m.path)
        finally:
            m.close()
    finally:
        shutil.rmtree(public, ignore_errors=True)


def each_caller(m1: Path) -> None:
    top = m1 / "qperm"
    (top / "open").mkdir(parents=True)
    (top / "closed").mkdir(mode=0o700)
    for d in ("open", "closed"):
        (top / d / "f").write_bytes(b"x")
    os.chmod(top / "open" / "f", 0o644)
    setlabel(top, "qperm", "1")
    q = m1 / ".stripefs" / "query" / "qperm=1"

    def files() -> list[str]:
        return sorted(k for k, v in query_tree(q).items() if v != "dir")

    assert files() == ["qperm/closed/f", "qperm/open/f"]
    assert run_as(USER, USER, files) == ("ok", ["qperm/open/f"])
    assert os.stat(q).st_uid == 0 and os.stat(q).st_mode & 0o777 == 0o500
    assert run_as(USER, USER, lambda: os.stat(q).st_uid) == ("ok", USER)  # its own
