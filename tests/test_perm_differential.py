"""The metaserver's permission checks against the kernel's: random operations by random
uids and groups on a tree of random modes and owners, run on a local directory (each in a
forked child that takes on the ids, as a process would) and through the metadata core
(path walked with lookups as that caller, as the library does), must give the same
errno. The kernel is the reference: "as the kernel would" is the rule of metaserver/perm.py.

Needs root (to take on other ids and to chown); the core runs in-process.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import tempfile

import pytest

from stripefs.metaserver.core import MetaCore
from stripefs.proto.errors import FsError
from stripefs.proto.messages import (
    RENAME_NOREPLACE,
    Ctx,
    InodeReq,
    LookupReq,
    MkdirReq,
    MknodReq,
    OpenReq,
    ReaddirReq,
    RemoveReq,
    RenameReq,
    SessionOpenReq,
    SetattrReq,
    XattrReq,
)
from stripefs.proto.types import ROOT_INODE

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users"),
]

UIDS = (0, 1000, 1001, 1002)
GIDS = (1000, 1001, 2000)
NAMES = (b"a", b"b", b"c")
MODES = (0o000, 0o700, 0o755, 0o750, 0o705, 0o777, 0o1777, 0o2775, 0o644, 0o640, 0o604, 0o600, 0o666, 0o311, 0o4755)


class Twins:
    """One tree twice: a local directory and the metadata core."""

    def __init__(self, tmp: str, db: str) -> None:
        self.local = tmp
        self.core = MetaCore(db, b"k" * 32)
        self.session = self.core.open_session(SessionOpenReq(host="h", mountpoint="/t")).session

    # -------------------------------------------------------------- local side

    def local_run(self, ctx: Ctx, fn) -> int:
        """Run fn() in a child with ctx's ids; its errno (0: success)."""
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            code = 0
            try:
                os.setgroups(ctx.groups)
                os.setresgid(ctx.gid, ctx.gid, ctx.gid)
                os.setresuid(ctx.uid, ctx.uid, ctx.uid)
                fn()
            except OSError as exc:
                code = exc.errno or 255
            except BaseException:  # noqa: BLE001 - anything else is a test bug: report it
                code = 254
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def path(self, names: tuple[bytes, ...]) -> bytes:
        return os.path.join(self.local.encode(), *names)

    # -------------------------------------------------------------- core side

    def walk(self, ctx: Ctx, names: tuple[bytes, ...]) -> int:
        """The inode at names, looked up one component at a time as ctx."""
        ino = ROOT_INODE
        for name in names:
            ino = self.core.lookup(LookupReq(ino, name, ctx)).attr.ino
        return ino

    def core_run(self, fn) -> int:
        try:
            fn()
        except FsError as exc:
            return exc.errno
        return 0


def random_ctx(rng: random.Random) -> Ctx:
    uid = rng.choice(UIDS)
    return Ctx(uid=uid, gid=rng.choice(GIDS), groups=sorted(rng.sample(GIDS, rng.randint(0, 2))))


def random_path(rng: random.Random, depth_max: int = 2) -> tuple[bytes, ...]:
    return tuple(rng.choice(NAMES) for _ in range(rng.randint(1, depth_max)))


def build(t: Twins, rng: random.Random) -> None:
    """Directories a, b (and some children) with random modes and owners, as root."""
    root = Ctx()
    # The root of the tree: searchable and writable by all, as a shared scratch directory.
    os.chmod(t.local, 0o777)
    t.core.setattr(SetattrReq(ROOT_INODE, root, mode=0o777))
    for top in (b"a", b"b"):
        for names, is_dir in (((top,), True), ((top, b"a"), True), ((top, b"b"), False), ((top, b"c"), False)):
            mode = rng.choice(MODES)
            uid, gid = rng.choice(UIDS), rng.choice(GIDS)
            p = t.path(names)
            parent = t.walk(root, names[:-1])
            if is_dir:
                os.mkdir(p)
                ino = t.core.mkdir(MkdirReq(parent, names[-1], 0o755, root)).attr.ino
            else:
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
                ino = t.core.mknod(MknodReq(parent, names[-1], stat.S_IFREG | 0o644, root)).attr.ino
            os.chown(p, uid, gid)
            os.chmod(p, mode)
            t.core.setattr(SetattrReq(ino, root, uid=uid, gid=gid))
            t.core.setattr(SetattrReq(ino, root, mode=mode))


def one_op(t: Twins, rng: random.Random) -> tuple[str, int, int]:
    """One random operation on both sides: (description, local errno, core errno)."""
    ctx = random_ctx(rng)
    names = random_path(rng)
    p = t.path(names)
    parent_names, name = names[:-1], names[-1]
    op = rng.choice(["stat", "open", "create", "mkdir", "unlink", "rmdir", "rename", "chmod", "chown",
                     "utime", "touch", "truncate", "listdir", "setxattr", "getxattr"])
    core = t.core
    what = f"{op} {b'/'.join(names).decode()} as {ctx.uid}:{ctx.gid}{ctx.groups}"

    def parent() -> int:
        return t.walk(ctx, parent_names)

    if op == "stat":
        local = lambda: os.lstat(p)  # noqa: E731
        remote = lambda: t.walk(ctx, names)  # noqa: E731
    elif op == "open":
        flags = rng.choice([os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC])
        what += f" flags {flags:o}"

        def local() -> None:
            os.close(os.open(p, flags))

        def remote() -> None:
            ino = t.walk(ctx, names)
            if stat.S_ISDIR(core.getattr(InodeReq(ino)).attr.mode):
                if flags & os.O_ACCMODE == os.O_RDONLY:
                    # open(2) of a directory for reading is opendir: a client asks for its
                    # entries (fs/fuse's opendir is the kernel's; the library's is readdir).
                    core.readdir(ReaddirReq(ino, 0, 1, ctx))
                    return
                raise FsError(errno.EISDIR)
            core.open(OpenReq(ino, t.session, ctx, flags))
    elif op == "create":
        def local() -> None:
            os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

        def remote() -> None:
            core.mknod(MknodReq(parent(), name, stat.S_IFREG | 0o644, ctx, session=t.session))
    elif op == "mkdir":
        local = lambda: os.mkdir(p, 0o755)  # noqa: E731
        remote = lambda: core.mkdir(MkdirReq(parent(), name, 0o755, ctx))  # noqa: E731
    elif op == "unlink":
        local = lambda: os.unlink(p)  # noqa: E731
        remote = lambda: core.unlink(RemoveReq(parent(), name, ctx))  # noqa: E731
    elif op == "rmdir":
        local = lambda: os.rmdir(p)  # noqa: E731
        remote = lambda: core.rmdir(RemoveReq(parent(), name, ctx))  # noqa: E731
    elif op == "rename":
        dest = random_path(rng)
        q = t.path(dest)
        what += f" -> {b'/'.join(dest).decode()}"
        local = lambda: os.rename(p, q)  # noqa: E731

        def remote() -> None:
            src_parent = parent()
            # The kernel walks the source's path, searching its directory, before it walks
            # the destination's: looking up "." asks the same of the metaserver.
            core.lookup(LookupReq(src_parent, b".", ctx))
            dst_parent = t.walk(ctx, dest[:-1])
            core.rename(RenameReq(src_parent, name, dst_parent, dest[-1], 0, ctx))
    elif op == "chmod":
        mode = rng.choice(MODES) | rng.choice([0, stat.S_ISGID])
        what += f" {mode:o}"
        local = lambda: os.chmod(p, mode)  # noqa: E731
        remote = lambda: core.setattr(SetattrReq(t.walk(ctx, names), ctx, mode=mode))  # noqa: E731
    elif op == "chown":
        uid = rng.choice((-1,) + UIDS)
        gid = rng.choice(GIDS if uid < 0 else (-1,) + GIDS)  # chown(-1, -1) is no setattr here
        what += f" {uid}:{gid}"
        local = lambda: os.lchown(p, uid, gid)  # noqa: E731

        def remote() -> None:
            core.setattr(SetattrReq(t.walk(ctx, names), ctx, uid=None if uid < 0 else uid,
                                    gid=None if gid < 0 else gid))
    elif op == "utime":
        local = lambda: os.utime(p, ns=(10**9, 2 * 10**9), follow_symlinks=False)  # noqa: E731
        remote = lambda: core.setattr(  # noqa: E731
            SetattrReq(t.walk(ctx, names), ctx, atime_ns=10**9, mtime_ns=2 * 10**9))
    elif op == "touch":
        local = lambda: os.utime(p, None, follow_symlinks=False)  # noqa: E731
        remote = lambda: core.setattr(  # noqa: E731
            SetattrReq(t.walk(ctx, names), ctx, atime_now=True, mtime_now=True))
    elif op == "truncate":
        local = lambda: os.truncate(p, 3)  # noqa: E731
        remote = lambda: core.setattr(SetattrReq(t.walk(ctx, names), ctx, size=3))  # noqa: E731
    elif op == "listdir":
        local = lambda: os.listdir(p)  # noqa: E731

        def remote() -> None:
            ino = t.walk(ctx, names)
            core.readdir(ReaddirReq(ino, 0, 1000, ctx))
    elif op == "setxattr":
        local = lambda: os.setxattr(p, b"user.k", b"v", follow_symlinks=False)  # noqa: E731
        remote = lambda: core.setxattr(XattrReq(t.walk(ctx, names), b"user.k", ctx, b"v"))  # noqa: E731
    else:  # getxattr
        def local() -> None:
            try:
                os.getxattr(p, b"user.k", follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise

        def remote() -> None:
            try:
                core.getxattr(XattrReq(t.walk(ctx, names), b"user.k", ctx))
            except FsError as exc:
                if exc.errno != errno.ENODATA:
                    raise
    return what, t.local_run(ctx, local), t.core_run(remote)


@pytest.fixture
def twins(tmp_path):
    # Not under tmp_path: its parents are root's 0700, which other uids cannot cross.
    local = tempfile.mkdtemp(prefix="stripefs-perm-", dir="/tmp")
    os.chmod(local, 0o755)
    t = Twins(os.path.join(local, "twin"), str(tmp_path / "meta.db"))
    os.mkdir(t.local)
    try:
        yield t
    finally:
        t.core.close()
        shutil.rmtree(local, ignore_errors=True)


@pytest.mark.parametrize("seed", range(int(os.environ.get("PERM_SEEDS", "12"))))
def test_permission_errnos_match_the_kernels(twins, seed):
    rng = random.Random(seed)
    build(twins, rng)
    if not _user_xattrs_work(twins.local):
        pytest.skip("the local file system has no user.* xattrs")
    mismatches = []
    for _ in range(250):
        what, local, core = one_op(twins, rng)
        assert local != 254, f"the local side of {what} failed outside the operation"
        if local != core:
            mismatches.append(f"{what}: kernel {errno.errorcode.get(local, local)}, "
                              f"metaserver {errno.errorcode.get(core, core)}")
    assert not mismatches, "\n".join(mismatches[:20])


def _user_xattrs_work(path: str) -> bool:
    probe = os.path.join(path, ".probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o600))
        os.setxattr(probe, b"user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def test_renames_keep_noreplace_order(twins):
    """RENAME_NOREPLACE's EEXIST comes before any permission check (do_renameat2)."""
    root = Ctx()
    t = twins
    t.core.mkdir(MkdirReq(ROOT_INODE, b"d", 0o755, root))
    d = t.walk(root, (b"d",))
    t.core.mknod(MknodReq(d, b"x", stat.S_IFREG | 0o644, root))
    t.core.mknod(MknodReq(d, b"y", stat.S_IFREG | 0o644, root))
    user = Ctx(uid=1000, gid=1000)
    with pytest.raises(FsError) as got:
        t.core.rename(RenameReq(d, b"x", d, b"y", RENAME_NOREPLACE, user))
    assert got.value.errno == errno.EEXIST
    with pytest.raises(FsError) as got:
        t.core.rename(RenameReq(d, b"x", d, b"z", 0, user))
    assert got.value.errno == errno.EACCES
