"""End to end: permission checks for users other than root, through a real mount.

Each operation runs in a forked child that has switched to another uid/gid, once on the
mount and once on a local directory prepared with the same owners and modes; the two
results (a value or an errno) must be the same, and where Linux's answer is well known the
test states it too.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest

from cluster import Cluster

pytestmark = [pytest.mark.mount]

USER = 65534  # nobody
OTHER = 65533  # another unprivileged user


def run_as(uid: int, gid: int, fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """Runs fn(*args) in a forked child as uid/gid (no supplementary groups); returns
    ("ok", result) or ("err", errno name)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                result: tuple[str, Any] = ("ok", fn(*args))
            except OSError as e:
                result = ("err", errno.errorcode.get(e.errno, e.errno))
            data = pickle.dumps(result)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            data = pickle.dumps(("crash", repr(e)))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = pickle.loads(data)
    assert result[0] != "crash", f"child as uid {uid} crashed: {result[1]}"
    return result


@pytest.fixture(scope="module")
def public_mount(module_cluster: Cluster):
    """A mount and a local directory that other users can reach (pytest's tmp_path is
    under a 0700 directory)."""
    top = Path(tempfile.mkdtemp(prefix="stripefs-perms-", dir="/tmp"))
    try:
        top.chmod(0o755)
        local = top / "local"
        local.mkdir()
        local.chmod(0o755)
        m = module_cluster.mount(top / "mnt")
        try:
            m.path.chmod(0o755)
            yield m.path, local
        finally:
            m.close()
    finally:
        shutil.rmtree(top, ignore_errors=True)


class Sides:
    """The same test directory on the mount and locally."""

    def __init__(self, mount_dir: Path, local_dir: Path) -> None:
        self.dirs = (mount_dir, local_dir)

    def setup(self, fn: Callable[[Path], None]) -> None:
        """Prepares both directories as root."""
        for d in self.dirs:
            fn(d)

    def as_user(self, uid: int, fn: Callable[[Path], Any], gid: int | None = None) -> tuple[str, Any]:
        """Runs fn on both sides as uid; the results must agree."""
        gid = uid if gid is None else gid
        on_mount, on_local = (run_as(uid, gid, fn, d) for d in self.dirs)
        assert on_mount == on_local, f"as uid {uid}: mount gave {on_mount!r}, local gave {on_local!r}"
        return on_mount

    def as_root(self, fn: Callable[[Path], Any]) -> Any:
        on_mount, on_local = (fn(d) for d in self.dirs)
        assert on_mount == on_local, f"as root: mount gave {on_mount!r}, local gave {on_local!r}"
        return on_mount


@pytest.fixture
def sides(public_mount: tuple[Path, Path], request: pytest.FixtureRequest) -> Sides:
    mount_root, local_root = public_mount
    name = request.node.name
    dirs = []
    for root in (mount_root, local_root):
        d = root / name
        d.mkdir()
        d.chmod(0o755)
        dirs.append(d)
    return Sides(*dirs)


def _file(path: Path, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def test_other_users_cannot_read_a_0600_file(sides: Sides):
    def prepare(d: Path) -> None:
        _file(d / "secret", b"root only", 0o600)
        _file(d / "public", b"for everyone", 0o644)

    sides.setup(prepare)
    assert sides.as_user(USER, lambda d: (d / "secret").read_bytes()) == ("err", "EACCES")
    assert sides.as_user(USER, lambda d: (d / "public").read_bytes()) == ("ok", b"for everyone")
    assert sides.as_user(USER, lambda d: open(d / "public", "r+b").close()) == ("err", "EACCES")


def test_other_users_cannot_create_in_a_0755_root_dir(sides: Sides):
    def prepare(d: Path) -> None:
        (d / "rootdir").mkdir()
        os.chmod(d / "rootdir", 0o755)
        _file(d / "rootdir" / "existing", b"x", 0o666)

    sides.setup(prepare)
    create = lambda d: os.close(os.open(d / "rootdir" / "new", os.O_CREAT | os.O_WRONLY, 0o644))  # noqa: E731
    assert sides.as_user(USER, create) == ("err", "EACCES")
    assert sides.as_user(USER, lambda d: os.mkdir(d / "rootdir" / "sub")) == ("err", "EACCES")
    assert sides.as_user(USER, lambda d: os.unlink(d / "rootdir" / "existing")) == ("err", "EACCES")
    assert sides.as_user(USER, lambda d: os.rename(d / "rootdir" / "existing", d / "rootdir" / "moved")) == (
        "err", "EACCES")
    # Writing into a 0666 file is allowed even in a directory the user cannot change.
    assert sides.as_user(USER, lambda d: (d / "rootdir" / "existing").write_bytes(b"yes")) == ("ok", 3)


def test_a_0700_dir_cannot_be_searched_by_others(sides: Sides):
    def prepare(d: Path) -> None:
        (d / "private").mkdir()
        os.chmod(d / "private", 0o700)
        _file(d / "private" / "inside", b"hidden", 0o644)

    sides.setup(prepare)
    assert sides.as_user(USER, lambda d: os.stat(d / "private" / "inside").st_size) == ("err", "EACCES")
    assert sides.as_user(USER, lambda d: os.listdir(d / "private")) == ("err", "EACCES")


def test_sticky_dir_protects_other_users_files(sides: Sides):
    def prepare(d: Path) -> None:
        (d / "tmp").mkdir()
        os.chmod(d / "tmp", 0o1777)
        _file(d / "tmp" / "theirs", b"other's", 0o666, OTHER, OTHER)
        _file(d / "tmp" / "mine", b"user's", 0o644, USER, USER)

    sides.setup(prepare)
    assert sides.as_user(USER, lambda d: os.unlink(d / "tmp" / "theirs")) == ("err", "EPERM")
    assert sides.as_user(USER, lambda d: os.rename(d / "tmp" / "theirs", d / "tmp" / "stolen")) == ("err", "EPERM")
    assert sides.as_user(USER, lambda d: os.unlink(d / "tmp" / "mine")) == ("ok", None)
    # New files there belong to their creator.
    assert sides.as_user(USER, lambda d: (d / "tmp" / "new").write_bytes(b"n")) == ("ok", 1)
    owner = sides.as_root(lambda d: (os.stat(d / "tmp" / "new").st_uid, os.stat(d / "tmp" / "new").st_gid))
    assert owner == (USER, USER)
    assert sides.as_root(lambda d: sorted(os.listdir(d / "tmp"))) == ["new", "theirs"]


def test_only_the_owner_may_chmod(sides: Sides):
    def prepare(d: Path) -> None:
        _file(d / "roots", b"r", 0o644)
        _file(d / "users", b"u", 0o644, USER, USER)

    sides.setup(prepare)
    assert sides.as_user(USER, lambda d: os.chmod(d / "roots", 0o777)) == ("err", "EPERM")
    assert sides.as_user(USER, lambda d: os.chmod(d / "users", 0o600)) == ("ok", None)
    assert sides.as_root(lambda d: stat.S_IMODE(os.stat(d / "users").st_mode)) == 0o600
    assert sides.as_root(lambda d: stat.S_IMODE(os.stat(d / "roots").st_mode)) == 0o644
    # Nobody but root gives a file away.
    assert sides.as_user(USER, lambda d: os.chown(d / "users", OTHER, OTHER)) == ("err", "EPERM")


def test_owner_writes_own_0644_file_others_cannot(sides: Sides):
    def prepare(d: Path) -> None:
        _file(d / "users", b"original", 0o644, USER, USER)

    sides.setup(prepare)

    def overwrite(d: Path) -> bytes:
        with open(d / "users", "r+b") as f:
            f.write(b"CHANGED")
        return (d / "users").read_bytes()

    assert sides.as_user(USER, overwrite) == ("ok", b"CHANGEDl")
    assert sides.as_user(OTHER, overwrite) == ("err", "EACCES")
    assert sides.as_user(OTHER, lambda d: os.truncate(d / "users", 0)) == ("err", "EACCES")
    assert sides.as_root(lambda d: (d / "users").read_bytes()) == b"CHANGEDl"


def test_user_xattrs_need_write_permission(sides: Sides):
    def prepare(d: Path) -> None:
        _file(d / "roots", b"r", 0o644)
        os.setxattr(d / "roots", "user.label", b"root's label")
        _file(d / "users", b"u", 0o644, USER, USER)

    sides.setup(prepare)
    assert sides.as_user(USER, lambda d: os.setxattr(d / "users", "user.label", b"mine")) == ("ok", None)
    assert sides.as_user(USER, lambda d: os.getxattr(d / "users", "user.label")) == ("ok", b"mine")
    assert sides.as_user(USER, lambda d: os.setxattr(d / "roots", "user.label", b"taken")) == ("err", "EACCES")
    assert sides.as_user(USER, lambda d: os.removexattr(d / "roots", "user.label")) == ("err", "EACCES")
    # Reading needs only read permission.
    assert sides.as_user(USER, lambda d: os.getxattr(d / "roots", "user.label")) == ("ok", b"root's label")
    assert sides.as_root(lambda d: os.getxattr(d / "roots", "user.label")) == b"root's label"


def test_setgid_dir_passes_its_group_to_new_files(sides: Sides):
    def prepare(d: Path) -> None:
        (d / "shared").mkdir()
        os.chown(d / "shared", 0, 1234)
        os.chmod(d / "shared", 0o2777)

    sides.setup(prepare)
    assert sides.as_user(USER, lambda d: (d / "shared" / "f").write_bytes(b"f")) == ("ok", 1)
    assert sides.as_user(USER, lambda d: os.mkdir(d / "shared" / "sub")) == ("ok", None)
    assert sides.as_root(lambda d: (os.stat(d / "shared" / "f").st_uid, os.stat(d / "shared" / "f").st_gid)) == (
        USER, 1234)
    sub_mode = sides.as_root(lambda d: os.stat(d / "shared" / "sub").st_mode)
    assert sub_mode & stat.S_ISGID, "a directory made in a setgid directory is setgid too"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_once(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY)
    os.write(fd, b"x")
    os.close(fd)


def _pwrite_twice(p: Path) -> None:
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"y", 3)
    os.pwrite(fd, b"z", 9)
    os.close(fd)


def _ftruncate(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY)
    os.ftruncate(fd, 2)
    os.close(fd)


@pytest.mark.parametrize("mode", [0o6777, 0o6767, 0o4757, 0o2757])
def test_writes_and_truncates_by_others_drop_set_id_bits(sides: Sides, mode: int):
    """A write, truncate or O_TRUNC open by a user other than root drops set-user-ID, and
    set-group-ID where group execute is set or the writer is not of the group; root's keep
    them. The mount does this itself (FUSE_HANDLE_KILLPRIV_V2: the kernel leaves it to the
    file system), and must leave exactly what the kernel leaves on a local file."""
    cases: dict[str, Callable[[Path], Any]] = {
        "write": _write_once,
        "pwrite twice": _pwrite_twice,
        "ftruncate": _ftruncate,
        "truncate": lambda p: os.truncate(p, 1),
        "O_TRUNC": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)),
    }
    for name, act in cases.items():
        for who, uid, gid in (("group member", USER, 0), ("stranger", USER, OTHER), ("root", 0, 0)):
            f = f"{name.replace(' ', '_')}-{who.replace(' ', '_')}"

            def prepare(d: Path, f: str = f) -> None:
                _file(d / f, b"0123456789", mode, uid=OTHER, gid=0)

            sides.setup(prepare)
            if uid == 0:
                sides.as_root(lambda d, f=f, act=act: act(d / f))
                done = True
            else:  # (a group member without group write permission gets EACCES on both)
                done = sides.as_user(uid, lambda d, f=f, act=act: act(d / f), gid=gid)[0] == "ok"
            got = sides.as_root(lambda d, f=f: _mode(d / f))
            if uid == 0 or not done:
                assert got == mode, f"{name} by {who} changed the mode to {got:o}"
            else:
                assert not got & stat.S_ISUID, f"{name} by {who} kept set-user-ID ({got:o})"
            sides.as_root(lambda d, f=f: (d / f).read_bytes())  # both sides hold the same bytes


def test_chown_drops_set_id_bits_and_a_mode_set_with_it_stays(sides: Sides):
    def prepare(d: Path) -> None:
        _file(d / "f", b"data", 0o6755, uid=USER, gid=0)
        _file(d / "g", b"data", 0o6755, uid=USER, gid=0)

    sides.setup(prepare)
    sides.as_root(lambda d: os.chown(d / "f", OTHER, OTHER))
    assert sides.as_root(lambda d: _mode(d / "f")) == 0o755
    sides.as_root(lambda d: [os.chown(d / "g", OTHER, -1), os.chmod(d / "g", 0o6755)])
    assert sides.as_root(lambda d: _mode(d / "g")) == 0o6755
