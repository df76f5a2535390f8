"""MetaCore in-process (no gRPC) on a temporary database, with an injectable clock and
fake data servers that exist only as register/heartbeat calls. Every test runs on each
metadata engine (tests/engines.py): SQLite and PostgreSQL."""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest

from stripefs.metaserver.base import READ_ORDER_REUSE_NS
from stripefs.metaserver.core import MetaCore
from stripefs.proto import codec
from stripefs.proto.services import META_METHODS
from stripefs.metaserver.store import SCHEMA_VERSION
from stripefs.proto.auth import check_write_token
from stripefs.proto.credentials import CLIENT, Caller
from stripefs.proto.errors import FsError
from stripefs.proto.messages import (
    LOOKUPS_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    AllocReq,
    BlockMapReq,
    BlockRef,
    CommitReq,
    Ctx,
    DeletedReq,
    Empty,
    HeartbeatReq,
    InodeReq,
    LinkReq,
    LookupReq,
    LookupsReq,
    MkdirReq,
    MknodReq,
    OpenReply,
    OpenReq,
    ReaddirReq,
    RegisterReq,
    ReleaseReq,
    RemoveReq,
    RenameReq,
    SessionOpenReq,
    SessionReq,
    SetattrReq,
    SymlinkReq,
    XattrReq,
    FsckReq,
)
from stripefs.proto.types import (
    DEFAULT_BLOCK_SIZE_BYTES,
    DEFAULT_INLINE_MAX_BYTES,
    LAYOUT_XATTR_BLOCK_SIZE,
    LAYOUT_XATTR_REPLICAS,
    ROOT_INODE,
)

from engines import meta_engine, open_meta_store  # noqa: F401 - fixtures
from fakeclock import Clock

pytestmark = pytest.mark.timeout(60)

SECRET = b"0123456789abcdef0123456789abcdef"
GiB = 1024**3
ROOT = Ctx(uid=0, gid=0)
USER = Ctx(uid=1000, gid=1000)
OTHER = Ctx(uid=2000, gid=2000)
SMALL_BS = 64 * 1024


class Env:
    def __init__(self, open_store) -> None:
        self.open_store = open_store  # a new Store on the test's database at each call
        self.clock = Clock()
        self.core = self.open()

    def open(self) -> MetaCore:
        return MetaCore(
            self.open_store(), SECRET, clock=self.clock, server_dead_after_s=10.0,
            session_lease_s=30.0, gc_grace_s=30.0,
        )

    def reopen(self) -> None:
        self.core.close()
        self.core = self.open()

    # namespace helpers -------------------------------------------------------
    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, ctx: Ctx = ROOT):
        return self.core.mkdir(MkdirReq(parent=parent, name=name, mode=mode, ctx=ctx)).attr

    def create(self, parent: int, name: bytes, mode: int = stat.S_IFREG | 0o644, ctx: Ctx = ROOT, session: int = 0):
        return self.core.mknod(MknodReq(parent=parent, name=name, mode=mode, ctx=ctx, session=session)).attr

    def lookup(self, parent: int, name: bytes):
        return self.core.lookup(LookupReq(parent=parent, name=name)).attr

    def getattr(self, ino: int):
        return self.core.getattr(InodeReq(ino=ino)).attr

    def names(self, ino: int) -> list[bytes]:
        return [e.name for e in self.core.readdir(ReaddirReq(ino=ino)).entries]

    def open_root(self) -> None:
        """Let every uid create entries in the root (mode 0777)."""
        self.core.setattr(SetattrReq(ino=ROOT_INODE, ctx=ROOT, mode=0o777))

    def session(self) -> int:
        return self.core.open_session(SessionOpenReq(host="h", mountpoint="/m")).session

    # data server helpers ------------------------------------------------------
    def add_server(self, n: int, free: int = 100 * GiB) -> int:
        return self.core.register(
            RegisterReq(address=f"10.0.0.{n}:7000", node_id=f"node-{n}", capacity_bytes=200 * GiB,
                        free_bytes=free, blocks=0)
        ).server_id

    def beat(self, server_id: int, free: int = 100 * GiB):
        return self.core.heartbeat(
            HeartbeatReq(server_id=server_id, capacity_bytes=200 * GiB, free_bytes=free, blocks=0)
        )

    def write(self, ino: int, session: int, index: int, length: int, size: int | None = None):
        """Allocate and commit one block, as a client would after writing it everywhere."""
        (a,) = self.core.alloc_blocks(AllocReq(ino=ino, session=session, indexes=[index])).allocations
        bs = self.getattr(ino).block_size
        ref = BlockRef(index=index, block_id=a.block_id, length=length, servers=a.servers)
        attr = self.core.commit_blocks(
            CommitReq(ino=ino, session=session, blocks=[ref],
                      size=index * bs + length if size is None else size, mtime_ns=123)
        ).attr
        return a, attr


@pytest.fixture
def env(open_meta_store):
    e = Env(open_meta_store)
    yield e
    e.core.close()


def fails(code: int, fn, req) -> FsError:
    with pytest.raises(FsError) as info:
        fn(req)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value}"
    return info.value


# --------------------------------------------------------------------------- basics


def test_root_and_store(env):
    root = env.getattr(ROOT_INODE)
    assert root.mode == stat.S_IFDIR | 0o755 and root.uid == 0 and root.gid == 0 and root.nlink == 2
    assert root.block_size == DEFAULT_BLOCK_SIZE_BYTES and root.replicas == 0
    assert env.core.store.schema_version() == SCHEMA_VERSION
    with env.core.store.transaction() as tx:
        if env.core.store.engine == "sqlite":
            assert tx.scalar("PRAGMA journal_mode") == "wal"
            assert tx.scalar("PRAGMA foreign_keys") == 1
            assert tx.scalar("PRAGMA synchronous") == 1  # NORMAL: durability comes from Store.sync
        else:
            # Serializable: the core's checks hold across metaservers; every commit on disk.
            assert tx.scalar("SHOW transaction_isolation") == "serializable"
            assert tx.scalar("SHOW synchronous_commit") == "on"


def downgrade(env, version: int, *statements: str) -> None:
    """Make the test's database one of schema `version` and reopen it, which migrates it:
    `statements` take away what later schemas added that the test cares about; the label
    index (schema 12) and the unlinked index (13) go here for every older version."""
    with env.core.store.transaction() as tx:
        for statement in statements:
            tx.run(statement)
        if version < 12:
            tx.run("DROP INDEX xattrs_by_value")
        if version < 13:
            tx.run("DROP INDEX inodes_unlinked")
        if env.core.store.engine == "postgres":
            tx.run("UPDATE schema_version SET version = ?", (version,))
    if env.core.store.engine == "sqlite":
        env.core.store._conn.execute(f"PRAGMA user_version={version}")
    env.reopen()


def test_version_3_database_is_migrated(env):
    """A database of schema 3 (no inline data, no inline_max, no parent indexes, no owners
    of sessions and servers, no writable opens, no block digests, no locks, no stored
    lengths, no request records) opens as the current one with everything in it kept; opens
    made before are taken as writable (they may have been)."""
    if env.core.store.engine != "sqlite":
        pytest.skip("SQLite's migrations: PostgreSQL's schema starts at this version")
    f = env.create(ROOT_INODE, b"kept")
    s = env.session()
    env.core.open(OpenReq(ino=f.ino, session=s))
    downgrade(env, 3,
              "DROP TABLE inline_data",
              "DROP TABLE verify",
              "DROP INDEX inodes_by_parent",
              "DROP INDEX dentries_by_parent",
              "ALTER TABLE inodes DROP COLUMN inline_max",
              "ALTER TABLE servers DROP COLUMN identity",
              "ALTER TABLE sessions DROP COLUMN owner",
              "ALTER TABLE opens DROP COLUMN writable",
              "ALTER TABLE blocks DROP COLUMN digest",
              "DROP TABLE locks",
              "ALTER TABLE blocks DROP COLUMN stored",
              "DROP TABLE requests",
              "ALTER TABLE inodes DROP COLUMN used_files",
              "ALTER TABLE inodes DROP COLUMN used_bytes",
              )
    assert env.core.store.schema_version() == SCHEMA_VERSION
    assert env.lookup(ROOT_INODE, b"kept").ino == f.ino
    assert env.getattr(f.ino).inline_max == DEFAULT_INLINE_MAX_BYTES
    with env.core.store.transaction() as tx:
        assert tx.scalar("SELECT COUNT(*) FROM inline_data") == 0
        assert tx.scalar("SELECT COUNT(*) FROM sqlite_master WHERE name IN ('inodes_by_parent',"
                         " 'dentries_by_parent')") == 2
        assert tx.scalar("SELECT writable FROM opens WHERE ino = ?", (f.ino,)) == 1
        assert tx.scalar("SELECT COUNT(*) FROM locks") == 0
    assert env.core.fsck(FsckReq()).problems == []  # the usage counters were counted


def test_readdir_pages_are_range_scans(env):
    """A page of a listing must not cost the whole directory (huge directories stream)."""
    page = "SELECT d.cookie FROM dentries d WHERE d.parent = ? AND d.cookie > ? ORDER BY d.cookie LIMIT 10"
    with env.core.store.transaction() as tx:
        if env.core.store.engine == "sqlite":
            plan = " ".join(r[3] for r in tx.all(f"EXPLAIN QUERY PLAN {page}", (1, 0)))
            assert "TEMP B-TREE" not in plan and "dentries_by_parent" in plan, plan
        else:
            tx.run("SET LOCAL enable_seqscan = off")  # a table this small would be read whole
            tx.run("SET LOCAL enable_bitmapscan = off")
            plan = " ".join(r[0] for r in tx.all(f"EXPLAIN {page}", (1, 0)))
            assert "Sort" not in plan and "dentries_by_parent" in plan, plan


def test_failed_operation_rolls_back(env):
    env.create(ROOT_INODE, b"f")
    with pytest.raises(RuntimeError):
        with env.core.store.transaction() as tx:
            tx.run("DELETE FROM dentries")
            raise RuntimeError("boom")
    assert env.names(ROOT_INODE) == [b"f"]


def test_lookup_errors(env):
    f = env.create(ROOT_INODE, b"file")
    assert env.lookup(ROOT_INODE, b"file").ino == f.ino
    fails(errno.ENOENT, env.core.lookup, LookupReq(parent=ROOT_INODE, name=b"nope"))
    fails(errno.ENOTDIR, env.core.lookup, LookupReq(parent=f.ino, name=b"x"))
    fails(errno.ENOENT, env.core.lookup, LookupReq(parent=999, name=b"x"))
    d = env.mkdir(ROOT_INODE, b"d")
    assert env.lookup(d.ino, b"..").ino == ROOT_INODE
    assert env.lookup(d.ino, b".").ino == d.ino


def users_own_file(env):
    """Two data servers and `mine`, USER's file of one block that only USER may read:
    (its attributes at create, its allocation, its attributes after the write)."""
    for n in (1, 2):
        env.beat(env.add_server(n))
    s = env.session()
    env.open_root()
    mine = env.create(ROOT_INODE, b"mine", mode=stat.S_IFREG | 0o600, ctx=USER)
    a, attr = env.write(mine.ino, s, 0, 200_000)
    return mine, a, attr


def test_lookups_answer_each_lookup_as_lookup_does(env):
    """LookupsReq (a prefetcher's): each lookup answered as `lookup` answers it, its map
    only where its caller may read, an error for one not failing the others."""
    mine, a, attr = users_own_file(env)
    d = env.mkdir(ROOT_INODE, b"d", mode=0o700, ctx=USER)
    inner = env.create(d.ino, b"inner", ctx=USER)
    other = Ctx(uid=2000, gid=2000)
    asked = [LookupReq(ROOT_INODE, b"mine", USER, want_map=True),
             LookupReq(ROOT_INODE, b"nothing", USER, want_map=True),
             LookupReq(ROOT_INODE, b"mine", other, want_map=True),
             LookupReq(d.ino, b"inner", other, want_map=True),  # (no search permission on d)
             LookupReq(d.ino, b"inner", USER),
             LookupReq(ROOT_INODE, b"d", USER, want_map=True)]
    got = env.core.lookups(LookupsReq(asked), Caller(CLIENT, "node1")).replies
    assert [x.errno for x in got] == [0, errno.ENOENT, 0, errno.EACCES, 0, 0]
    assert got[0].reply.mapped and [b.block_id for b in got[0].reply.blocks] == [a.block_id]
    assert got[0].reply.blocks[0].token and got[0].reply.attr.generation == attr.generation
    assert got[1].reply is None
    assert not got[2].reply.mapped and got[2].reply.attr.ino == mine.ino
    assert got[4].reply.attr.ino == inner.ino and not got[4].reply.mapped
    assert got[5].reply.attr.ino == d.ino and not got[5].reply.mapped
    assert LookupsReq([LookupReq(ROOT_INODE, b"x")] * (LOOKUPS_MAX + 1)).valid()
    assert LookupsReq([LookupReq(ROOT_INODE, b"x")] * LOOKUPS_MAX).valid() is None
    assert LookupsReq([LookupReq(ROOT_INODE, b"a/b")]).valid()


def test_lookup_with_the_block_map_checks_read_permission(env):
    """LookupReq.want_map (prefetch): a regular file the caller may read comes with its
    block map and read tokens for the caller, as an open for reading would give, and no
    open is recorded; without read permission, or for anything but a regular file, the
    lookup answers as a plain one."""
    mine, a, _ = users_own_file(env)
    got = env.core.lookup(LookupReq(ROOT_INODE, b"mine", USER, want_map=True), Caller(CLIENT, "node1"))
    assert got.mapped and [b.block_id for b in got.blocks] == [a.block_id]
    assert got.blocks[0].token and got.blocks[0].servers
    assert got.attr.ino == mine.ino
    other = Ctx(uid=2000, gid=2000)
    denied = env.core.lookup(LookupReq(ROOT_INODE, b"mine", other, want_map=True), Caller(CLIENT, "node1"))
    assert not denied.mapped and denied.blocks == [] and denied.attr.ino == mine.ino
    env.mkdir(ROOT_INODE, b"d", ctx=USER)
    assert not env.core.lookup(LookupReq(ROOT_INODE, b"d", USER, want_map=True)).mapped
    plain = env.core.lookup(LookupReq(ROOT_INODE, b"mine", USER))
    assert not plain.mapped and plain.blocks == []
    # No open was recorded: the file is purged as soon as an unlinked file with blocks may be.
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"mine", ctx=USER))
    env.clock.advance(env.core.unlinked_hold_s)
    env.core.sweep()
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=mine.ino))


def test_getattr_gone(env):
    f = env.create(ROOT_INODE, b"f")
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"f"))
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=f.ino))
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=12345))


# --------------------------------------------------------------------------- creation


@pytest.mark.parametrize("kind", [stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK])
def test_mknod_types(env, kind):
    env.open_root()
    a = env.core.mknod(MknodReq(parent=ROOT_INODE, name=b"n", mode=kind | 0o640, ctx=USER, rdev=0x0801)).attr
    assert a.mode == kind | 0o640 and a.nlink == 1 and a.uid == 1000 and a.gid == 1000
    assert a.rdev == (0x0801 if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0)


@pytest.mark.parametrize("kind", [stat.S_IFDIR, stat.S_IFLNK])
def test_mknod_bad_type(env, kind):
    fails(errno.EINVAL, env.core.mknod, MknodReq(parent=ROOT_INODE, name=b"n", mode=kind | 0o644, ctx=ROOT))


def test_create_errors(env):
    f = env.create(ROOT_INODE, b"f")
    d = env.mkdir(ROOT_INODE, b"d")
    for req_fn, mk in [
        (env.core.mknod, lambda p, n: MknodReq(parent=p, name=n, mode=stat.S_IFREG | 0o644, ctx=ROOT)),
        (env.core.mkdir, lambda p, n: MkdirReq(parent=p, name=n, mode=0o755, ctx=ROOT)),
        (env.core.symlink, lambda p, n: SymlinkReq(parent=p, name=n, target=b"t", ctx=ROOT)),
    ]:
        fails(errno.EEXIST, req_fn, mk(ROOT_INODE, b"f"))
        fails(errno.EEXIST, req_fn, mk(ROOT_INODE, b"d"))
        fails(errno.ENOTDIR, req_fn, mk(f.ino, b"x"))
        fails(errno.ENOENT, req_fn, mk(4242, b"x"))
    # A directory that was removed while someone still refers to it by inode.
    env.core.rmdir(RemoveReq(parent=ROOT_INODE, name=b"d"))
    fails(errno.ENOENT, env.core.mkdir, MkdirReq(parent=d.ino, name=b"x", mode=0o755, ctx=ROOT))


def test_create_in_removed_dir_kept_by_nlink0(env):
    # A directory row with nlink 0 (as an unlinked-but-held inode would be) refuses entries.
    d = env.mkdir(ROOT_INODE, b"d")
    with env.core.store.transaction() as tx:
        tx.run("UPDATE inodes SET nlink = 0 WHERE ino = ?", (d.ino,))
    fails(errno.ENOENT, env.core.mknod, MknodReq(parent=d.ino, name=b"x", mode=stat.S_IFREG, ctx=ROOT))


def test_ownership_and_setgid(env):
    env.open_root()
    d = env.mkdir(ROOT_INODE, b"d", mode=0o2775, ctx=Ctx(uid=0, gid=50))
    assert d.mode == stat.S_IFDIR | 0o2775 and d.gid == 50
    member = Ctx(uid=1000, gid=1000, groups=[50])
    fails(errno.EACCES, env.core.mknod, MknodReq(parent=d.ino, name=b"f", mode=stat.S_IFREG | 0o644, ctx=USER))
    f = env.create(d.ino, b"f", ctx=member)
    assert f.uid == 1000 and f.gid == 50
    sub = env.mkdir(d.ino, b"sub", mode=0o755, ctx=member)
    assert sub.gid == 50 and sub.mode & stat.S_ISGID
    plain = env.mkdir(ROOT_INODE, b"plain", ctx=USER)
    assert plain.gid == 1000 and not plain.mode & stat.S_ISGID


def test_dir_nlink_and_times(env):
    before = env.getattr(ROOT_INODE)
    env.clock.advance(5)
    a = env.mkdir(ROOT_INODE, b"a")
    assert a.nlink == 2
    root = env.getattr(ROOT_INODE)
    assert root.nlink == 3 and root.mtime_ns > before.mtime_ns and root.ctime_ns == root.mtime_ns
    env.mkdir(a.ino, b"b")
    env.create(a.ino, b"f")
    assert env.getattr(a.ino).nlink == 3
    env.core.rmdir(RemoveReq(parent=a.ino, name=b"b"))
    assert env.getattr(a.ino).nlink == 2
    env.clock.advance(5)
    env.core.unlink(RemoveReq(parent=a.ino, name=b"f"))
    assert env.getattr(a.ino).mtime_ns == int(env.clock.t * 1e9)
    env.core.rmdir(RemoveReq(parent=ROOT_INODE, name=b"a"))
    assert env.getattr(ROOT_INODE).nlink == 2


def test_symlink_readlink(env):
    env.open_root()
    s = env.core.symlink(SymlinkReq(parent=ROOT_INODE, name=b"s", target=b"../x/y", ctx=USER)).attr
    assert stat.S_ISLNK(s.mode) and s.size == 6 and s.uid == 1000
    assert env.core.readlink(InodeReq(ino=s.ino)).target == b"../x/y"
    f = env.create(ROOT_INODE, b"f")
    fails(errno.EINVAL, env.core.readlink, InodeReq(ino=f.ino))


# --------------------------------------------------------------------------- removal


def test_unlink_rmdir_errors(env):
    d = env.mkdir(ROOT_INODE, b"d")
    f = env.create(d.ino, b"f")
    fails(errno.ENOENT, env.core.unlink, RemoveReq(parent=ROOT_INODE, name=b"nope"))
    fails(errno.EISDIR, env.core.unlink, RemoveReq(parent=ROOT_INODE, name=b"d"))
    fails(errno.ENOTDIR, env.core.rmdir, RemoveReq(parent=d.ino, name=b"f"))
    fails(errno.ENOTEMPTY, env.core.rmdir, RemoveReq(parent=ROOT_INODE, name=b"d"))
    fails(errno.ENOENT, env.core.rmdir, RemoveReq(parent=ROOT_INODE, name=b"nope"))
    fails(errno.ENOTDIR, env.core.unlink, RemoveReq(parent=f.ino, name=b"x"))
    fails(errno.EINVAL, env.core.rmdir, RemoveReq(parent=ROOT_INODE, name=b"."))
    fails(errno.ENOTEMPTY, env.core.rmdir, RemoveReq(parent=d.ino, name=b".."))


def test_unlink_ctime_and_hard_links(env):
    f = env.create(ROOT_INODE, b"f")
    d = env.mkdir(ROOT_INODE, b"d")
    env.clock.advance(3)
    linked = env.core.link(LinkReq(ino=f.ino, new_parent=d.ino, new_name=b"g")).attr
    assert linked.nlink == 2 and linked.ctime_ns > f.ctime_ns
    assert env.getattr(d.ino).mtime_ns == linked.ctime_ns
    env.clock.advance(3)
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"f"))
    a = env.lookup(d.ino, b"g")
    assert a.nlink == 1 and a.ctime_ns > linked.ctime_ns


def test_link_errors(env):
    f = env.create(ROOT_INODE, b"f")
    d = env.mkdir(ROOT_INODE, b"d")
    fails(errno.EPERM, env.core.link, LinkReq(ino=d.ino, new_parent=ROOT_INODE, new_name=b"d2"))
    fails(errno.EEXIST, env.core.link, LinkReq(ino=f.ino, new_parent=ROOT_INODE, new_name=b"d"))
    fails(errno.ENOTDIR, env.core.link, LinkReq(ino=f.ino, new_parent=f.ino, new_name=b"x"))
    fails(errno.ENOENT, env.core.link, LinkReq(ino=9999, new_parent=ROOT_INODE, new_name=b"x"))
    # An unlinked file still open somewhere cannot get a name back.
    s = env.session()
    env.core.open(OpenReq(ino=f.ino, session=s))
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"f"))
    fails(errno.ENOENT, env.core.link, LinkReq(ino=f.ino, new_parent=ROOT_INODE, new_name=b"back"))


# --------------------------------------------------------------------------- rename


def rename(env, parent, name, new_parent, new_name, flags=0):
    return env.core.rename(RenameReq(parent=parent, name=name, new_parent=new_parent, new_name=new_name, flags=flags))


def test_rename_errors(env):
    a = env.mkdir(ROOT_INODE, b"a")
    b = env.mkdir(a.ino, b"b")
    env.create(ROOT_INODE, b"f")
    env.mkdir(ROOT_INODE, b"full")
    env.create(env.lookup(ROOT_INODE, b"full").ino, b"x")
    env.mkdir(ROOT_INODE, b"empty")
    R = RenameReq
    fails(errno.ENOENT, env.core.rename, R(parent=ROOT_INODE, name=b"nope", new_parent=ROOT_INODE, new_name=b"z"))
    fails(errno.EEXIST, env.core.rename,
          R(parent=ROOT_INODE, name=b"f", new_parent=ROOT_INODE, new_name=b"a", flags=RENAME_NOREPLACE))
    fails(errno.ENOENT, env.core.rename,
          R(parent=ROOT_INODE, name=b"f", new_parent=ROOT_INODE, new_name=b"z", flags=RENAME_EXCHANGE))
    fails(errno.EINVAL, env.core.rename, R(parent=ROOT_INODE, name=b"a", new_parent=a.ino, new_name=b"z"))
    fails(errno.EINVAL, env.core.rename, R(parent=ROOT_INODE, name=b"a", new_parent=b.ino, new_name=b"z"))
    fails(errno.ENOTDIR, env.core.rename, R(parent=ROOT_INODE, name=b"empty", new_parent=ROOT_INODE, new_name=b"f"))
    fails(errno.EISDIR, env.core.rename, R(parent=ROOT_INODE, name=b"f", new_parent=ROOT_INODE, new_name=b"empty"))
    fails(errno.ENOTEMPTY, env.core.rename, R(parent=ROOT_INODE, name=b"empty", new_parent=ROOT_INODE, new_name=b"full"))
    # Exchanging a directory with an entry inside it would also make a cycle.
    fails(errno.EINVAL, env.core.rename,
          R(parent=ROOT_INODE, name=b"a", new_parent=a.ino, new_name=b"b", flags=RENAME_EXCHANGE))
    assert sorted(env.names(ROOT_INODE)) == [b"a", b"empty", b"f", b"full"]


def test_rename_same_inode_is_noop(env):
    f = env.create(ROOT_INODE, b"f")
    env.core.link(LinkReq(ino=f.ino, new_parent=ROOT_INODE, new_name=b"g"))
    before = env.getattr(f.ino)
    env.clock.advance(1)
    rename(env, ROOT_INODE, b"f", ROOT_INODE, b"g")
    assert sorted(env.names(ROOT_INODE)) == [b"f", b"g"]
    assert env.getattr(f.ino) == before
    rename(env, ROOT_INODE, b"f", ROOT_INODE, b"f")
    assert sorted(env.names(ROOT_INODE)) == [b"f", b"g"]


def test_rename_file_replaces_and_purges(env):
    f = env.create(ROOT_INODE, b"f")
    g = env.create(ROOT_INODE, b"g")
    cookie_before = env.core.readdir(ReaddirReq(ino=ROOT_INODE)).entries[0].cookie
    env.clock.advance(2)
    rename(env, ROOT_INODE, b"f", ROOT_INODE, b"g")
    (entry,) = env.core.readdir(ReaddirReq(ino=ROOT_INODE)).entries
    assert entry.name == b"g" and entry.attr.ino == f.ino and entry.cookie > cookie_before
    assert entry.attr.ctime_ns > f.ctime_ns
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=g.ino))


def test_rename_dir_across_parents(env):
    a = env.mkdir(ROOT_INODE, b"a")
    b = env.mkdir(ROOT_INODE, b"b")
    c = env.mkdir(a.ino, b"c")
    env.clock.advance(2)
    rename(env, a.ino, b"c", b.ino, b"c2")
    assert env.getattr(a.ino).nlink == 2 and env.getattr(b.ino).nlink == 3
    assert env.lookup(c.ino, b"..").ino == b.ino
    now = int(env.clock.t * 1e9)
    assert env.getattr(a.ino).mtime_ns == now and env.getattr(b.ino).ctime_ns == now
    assert env.getattr(c.ino).ctime_ns == now
    # Over an empty directory: the replaced one is gone, nlinks stay right.
    e = env.mkdir(a.ino, b"e")
    rename(env, b.ino, b"c2", a.ino, b"e")
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=e.ino))
    assert env.getattr(a.ino).nlink == 3 and env.getattr(b.ino).nlink == 2
    assert env.getattr(ROOT_INODE).nlink == 4
    # Moving a directory down elsewhere is fine; only into its own subtree is not.
    rename(env, ROOT_INODE, b"b", a.ino, b"b")
    assert env.lookup(b.ino, b"..").ino == a.ino and env.getattr(ROOT_INODE).nlink == 3


def test_rename_exchange(env):
    a = env.mkdir(ROOT_INODE, b"a")
    b = env.mkdir(ROOT_INODE, b"b")
    f = env.create(a.ino, b"x")
    d = env.mkdir(b.ino, b"y")
    rename(env, a.ino, b"x", b.ino, b"y", RENAME_EXCHANGE)
    assert env.lookup(a.ino, b"x").ino == d.ino and env.lookup(b.ino, b"y").ino == f.ino
    assert env.lookup(d.ino, b"..").ino == a.ino
    assert env.getattr(a.ino).nlink == 3 and env.getattr(b.ino).nlink == 2
    # Same directory exchange.
    env.create(a.ino, b"z")
    z = env.lookup(a.ino, b"z")
    rename(env, a.ino, b"x", a.ino, b"z", RENAME_EXCHANGE)
    assert env.lookup(a.ino, b"z").ino == d.ino and env.lookup(a.ino, b"x").ino == z.ino
    assert env.getattr(a.ino).nlink == 3


def test_rename_noreplace_ok_when_free(env):
    env.create(ROOT_INODE, b"f")
    rename(env, ROOT_INODE, b"f", ROOT_INODE, b"g", RENAME_NOREPLACE)
    assert env.names(ROOT_INODE) == [b"g"]


# --------------------------------------------------------------------------- setattr


def test_writer_may_drop_set_id_bits(env):
    """What the kernel asks after a non-owner's write to a set-ID file (file_remove_privs):
    the same mode less set-user/group-ID bits, allowed to whoever may write the file; any
    other mode change, or a caller who may not write, is still the owner's (EPERM)."""
    env.open_root()
    f = env.create(ROOT_INODE, b"suid", ctx=USER)
    env.core.setattr(SetattrReq(ino=f.ino, ctx=USER, mode=0o6777))
    fails(errno.EPERM, env.core.setattr, SetattrReq(ino=f.ino, ctx=OTHER, mode=0o0776))  # not only set-id
    fails(errno.EPERM, env.core.setattr, SetattrReq(ino=f.ino, ctx=OTHER, mode=0o7777))  # adds sticky
    assert env.core.setattr(SetattrReq(ino=f.ino, ctx=OTHER, mode=0o2777)).attr.mode == stat.S_IFREG | 0o2777
    assert env.core.setattr(SetattrReq(ino=f.ino, ctx=OTHER, mode=0o0777)).attr.mode == stat.S_IFREG | 0o0777
    env.core.setattr(SetattrReq(ino=f.ino, ctx=USER, mode=0o4755))  # others may not write now
    fails(errno.EPERM, env.core.setattr, SetattrReq(ino=f.ino, ctx=OTHER, mode=0o0755))


def test_setattr_mode_owner(env):
    env.open_root()
    f = env.create(ROOT_INODE, b"f", ctx=USER)
    env.clock.advance(1)
    a = env.core.setattr(SetattrReq(ino=f.ino, ctx=USER, mode=0o4600)).attr
    assert a.mode == stat.S_IFREG | 0o4600 and a.ctime_ns > f.ctime_ns
    fails(errno.EPERM, env.core.setattr, SetattrReq(ino=f.ino, ctx=OTHER, mode=0o777))
    fails(errno.EPERM, env.core.setattr, SetattrReq(ino=f.ino, ctx=USER, uid=2000))
    fails(errno.EPERM, env.core.setattr, SetattrReq(ino=f.ino, ctx=OTHER, gid=2000))
    assert env.core.setattr(SetattrReq(ino=f.ino, ctx=USER, uid=1000)).attr.uid == 1000  # no change: fine
    fails(errno.EPERM, env.core.setattr, SetattrReq(ino=f.ino, ctx=USER, gid=77))  # not a member of 77
    in_77 = Ctx(uid=1000, gid=1000, groups=[77])
    assert env.core.setattr(SetattrReq(ino=f.ino, ctx=in_77, gid=77)).attr.gid == 77
    a = env.core.setattr(SetattrReq(ino=f.ino, ctx=ROOT, uid=5, gid=6)).attr
    assert (a.uid, a.gid) == (5, 6)
    a = env.core.setattr(SetattrReq(ino=f.ino, ctx=ROOT, atime_ns=10, mtime_ns=20)).attr
    assert (a.atime_ns, a.mtime_ns) == (10, 20)
    env.clock.advance(1)
    a = env.core.setattr(SetattrReq(ino=f.ino, ctx=ROOT, atime_now=True, mtime_now=True)).attr
    assert a.atime_ns == a.mtime_ns == a.ctime_ns == int(env.clock.t * 1e9)
    fails(errno.ENOENT, env.core.setattr, SetattrReq(ino=999, ctx=ROOT, mode=0o644))


def test_setattr_size_errors(env):
    d = env.mkdir(ROOT_INODE, b"d")
    p = env.create(ROOT_INODE, b"p", mode=stat.S_IFIFO | 0o644)
    fails(errno.EISDIR, env.core.setattr, SetattrReq(ino=d.ino, ctx=ROOT, size=0))
    fails(errno.EINVAL, env.core.setattr, SetattrReq(ino=p.ino, ctx=ROOT, size=0))
    f = env.create(ROOT_INODE, b"f")
    fails(errno.EFBIG, env.core.setattr, SetattrReq(ino=f.ino, ctx=ROOT, size=1 << 60))


def test_truncate_clamps_and_garbage(env):
    sids = [env.add_server(i) for i in range(3)]
    s = env.session()
    f = env.create(ROOT_INODE, b"f")
    env.core.setxattr(XattrReq(ino=f.ino, name=LAYOUT_XATTR_BLOCK_SIZE, value=str(SMALL_BS).encode()))
    blocks = [env.write(f.ino, s, i, SMALL_BS)[0] for i in range(3)]
    assert env.getattr(f.ino).size == 3 * SMALL_BS
    gen = env.getattr(f.ino).generation
    env.clock.advance(1)
    new_size = SMALL_BS + 100
    a = env.core.setattr(SetattrReq(ino=f.ino, ctx=ROOT, size=new_size)).attr
    assert a.size == new_size and a.generation > gen
    assert a.mtime_ns == a.ctime_ns == int(env.clock.t * 1e9)
    m = env.core.block_map(BlockMapReq(ino=f.ino)).blocks
    assert [(r.index, r.block_id, r.length) for r in m] == [
        (0, blocks[0].block_id, SMALL_BS), (1, blocks[1].block_id, 100)]
    # Extending keeps the clamp: the bytes past 100 in block 1 read as zeros.
    env.core.setattr(SetattrReq(ino=f.ino, ctx=ROOT, size=3 * SMALL_BS))
    m = env.core.block_map(BlockMapReq(ino=f.ino)).blocks
    assert [(r.index, r.length) for r in m] == [(0, SMALL_BS), (1, 100)]
    # Truncating at a block boundary drops that block entirely.
    env.core.setattr(SetattrReq(ino=f.ino, ctx=ROOT, size=SMALL_BS))
    assert [r.index for r in env.core.block_map(BlockMapReq(ino=f.ino)).blocks] == [0]
    # The dropped blocks reach their servers' delete lists after the grace period.
    env.clock.advance(31)
    deleted = set()
    for sid in sids:
        deleted |= set(env.beat(sid).delete)
    assert deleted == {blocks[1].block_id, blocks[2].block_id}
    # An explicit mtime wins over the truncation's now.
    a = env.core.setattr(SetattrReq(ino=f.ino, ctx=ROOT, size=10, mtime_ns=77)).attr
    assert a.mtime_ns == 77 and a.size == 10


# --------------------------------------------------------------------------- readdir


def test_readdir_errors_and_paging(env):
    f = env.create(ROOT_INODE, b"f")
    fails(errno.ENOTDIR, env.core.readdir, ReaddirReq(ino=f.ino))
    fails(errno.ENOENT, env.core.readdir, ReaddirReq(ino=999))
    d = env.mkdir(ROOT_INODE, b"d")
    assert env.core.readdir(ReaddirReq(ino=d.ino)).entries == []
    for i in range(10):
        env.create(d.ino, b"n%d" % i)
    page = env.core.readdir(ReaddirReq(ino=d.ino, limit=4))
    assert [e.name for e in page.entries] == [b"n0", b"n1", b"n2", b"n3"] and page.more
    assert page.entries[0].attr.ino == env.lookup(d.ino, b"n0").ino
    last = env.core.readdir(ReaddirReq(ino=d.ino, offset=page.entries[-1].cookie, limit=6))
    assert len(last.entries) == 6 and not last.more


def test_readdir_cookies_stable_while_changing(env):
    d = env.mkdir(ROOT_INODE, b"d")
    for i in range(10):
        env.create(d.ino, b"n%d" % i)
    page = env.core.readdir(ReaddirReq(ino=d.ino, limit=5))
    seen = [e.name for e in page.entries]
    # Mid-listing: remove one already listed, one not yet listed, add a new one.
    env.core.unlink(RemoveReq(parent=d.ino, name=b"n1"))
    env.core.unlink(RemoveReq(parent=d.ino, name=b"n7"))
    env.create(d.ino, b"new")
    offset = page.entries[-1].cookie
    while True:
        page = env.core.readdir(ReaddirReq(ino=d.ino, offset=offset, limit=2))
        seen += [e.name for e in page.entries]
        if not page.more:
            break
        offset = page.entries[-1].cookie
    assert seen == [b"n0", b"n1", b"n2", b"n3", b"n4", b"n5", b"n6", b"n8", b"n9", b"new"]


# --------------------------------------------------------------------------- xattrs


def test_xattrs(env):
    env.open_root()
    f = env.create(ROOT_INODE, b"f", ctx=USER)
    X = XattrReq
    env.core.setxattr(X(ino=f.ino, name=b"user.label", value=b"cat", ctx=USER))
    assert env.core.getxattr(X(ino=f.ino, name=b"user.label")).value == b"cat"
    fails(errno.EEXIST, env.core.setxattr, X(ino=f.ino, name=b"user.label", value=b"dog", flags=1))
    fails(errno.ENODATA, env.core.setxattr, X(ino=f.ino, name=b"user.none", value=b"x", flags=2))
    env.core.setxattr(X(ino=f.ino, name=b"user.label", value=b"dog", flags=2))
    assert env.core.getxattr(X(ino=f.ino, name=b"user.label")).value == b"dog"
    env.core.setxattr(X(ino=f.ino, name=b"user.empty", value=b""))
    assert env.core.getxattr(X(ino=f.ino, name=b"user.empty")).value == b""
    fails(errno.ENODATA, env.core.getxattr, X(ino=f.ino, name=b"user.none"))
    fails(errno.ENODATA, env.core.removexattr, X(ino=f.ino, name=b"user.none"))
    fails(errno.EOPNOTSUPP, env.core.setxattr, X(ino=f.ino, name=b"bogus.x", value=b"1"))
    fails(errno.EOPNOTSUPP, env.core.getxattr, X(ino=f.ino, name=b"bogus.x"))
    fails(errno.ENODATA, env.core.getxattr, X(ino=f.ino, name=b"system.posix_acl_access"))
    fails(errno.EACCES, env.core.setxattr, X(ino=f.ino, name=b"system.posix_acl_default", value=b"x"))  # a file
    fails(errno.EOPNOTSUPP, env.core.setxattr, X(ino=f.ino, name=b"system.other", value=b"x"))
    fails(errno.EPERM, env.core.setxattr, X(ino=f.ino, name=b"trusted.t", value=b"1", ctx=USER))
    fails(errno.EPERM, env.core.setxattr, X(ino=f.ino, name=b"security.s", value=b"1", ctx=USER))
    env.core.setxattr(X(ino=f.ino, name=b"trusted.t", value=b"1", ctx=ROOT))
    fails(errno.EPERM, env.core.removexattr, X(ino=f.ino, name=b"trusted.t", ctx=USER))
    assert sorted(env.core.listxattr(InodeReq(ino=f.ino)).names) == [b"trusted.t", b"user.empty", b"user.label"]
    env.clock.advance(1)
    env.core.removexattr(X(ino=f.ino, name=b"user.label"))
    assert env.getattr(f.ino).ctime_ns == int(env.clock.t * 1e9)
    assert b"user.label" not in env.core.listxattr(InodeReq(ino=f.ino)).names
    fails(errno.ENOENT, env.core.listxattr, InodeReq(ino=999))


def test_xattr_user_on_special_files(env):
    s = env.core.symlink(SymlinkReq(parent=ROOT_INODE, name=b"s", target=b"t", ctx=ROOT)).attr
    p = env.create(ROOT_INODE, b"p", mode=stat.S_IFIFO | 0o644)
    for ino in (s.ino, p.ino):
        fails(errno.EPERM, env.core.setxattr, XattrReq(ino=ino, name=b"user.x", value=b"1"))
    env.core.setxattr(XattrReq(ino=s.ino, name=b"trusted.x", value=b"1", ctx=ROOT))
    d = env.mkdir(ROOT_INODE, b"d")
    env.core.setxattr(XattrReq(ino=d.ino, name=b"user.x", value=b"1"))


def test_xattr_total_cap(env):
    f = env.create(ROOT_INODE, b"f")
    value = b"v" * 65536
    for i in range(15):
        env.core.setxattr(XattrReq(ino=f.ino, name=b"user.%d" % i, value=value))
    fails(errno.ENOSPC, env.core.setxattr, XattrReq(ino=f.ino, name=b"user.big", value=value))
    # Replacing one with a same-size value still fits.
    env.core.setxattr(XattrReq(ino=f.ino, name=b"user.0", value=value))


def test_layout_xattrs(env):
    d = env.mkdir(ROOT_INODE, b"d")
    X = XattrReq
    assert env.core.getxattr(X(ino=d.ino, name=LAYOUT_XATTR_BLOCK_SIZE)).value == str(DEFAULT_BLOCK_SIZE_BYTES).encode()
    env.core.setxattr(X(ino=d.ino, name=LAYOUT_XATTR_BLOCK_SIZE, value=b"1048576"))
    env.core.setxattr(X(ino=d.ino, name=LAYOUT_XATTR_REPLICAS, value=b"3"))
    for bad in (b"1000000", b"1024", b"abc", b"", b"-4", str(128 * 1024 * 1024).encode()):
        fails(errno.EINVAL, env.core.setxattr, X(ino=d.ino, name=LAYOUT_XATTR_BLOCK_SIZE, value=bad))
    fails(errno.EINVAL, env.core.setxattr, X(ino=d.ino, name=LAYOUT_XATTR_REPLICAS, value=b"9"))
    assert env.core.getxattr(X(ino=d.ino, name=LAYOUT_XATTR_REPLICAS)).value == b"3"
    assert env.core.listxattr(InodeReq(ino=d.ino)).names == []
    f = env.create(d.ino, b"f")
    sub = env.mkdir(d.ino, b"sub")
    assert (f.block_size, f.replicas) == (1048576, 3) and (sub.block_size, sub.replicas) == (1048576, 3)
    # A file without blocks may still change its layout; one with blocks may not.
    env.core.setxattr(X(ino=f.ino, name=LAYOUT_XATTR_BLOCK_SIZE, value=b"65536"))
    assert env.getattr(f.ino).block_size == 65536
    env.add_server(1)
    env.write(f.ino, env.session(), 0, 10)
    fails(errno.EBUSY, env.core.setxattr, X(ino=f.ino, name=LAYOUT_XATTR_BLOCK_SIZE, value=b"131072"))
    fails(errno.EPERM, env.core.setxattr, X(ino=d.ino, name=LAYOUT_XATTR_REPLICAS, value=b"1", ctx=USER))


def test_checkpoint_xattrs_mark_staged_files_until_their_upload_commits(env):
    """A checkpoint directory's mode and marker name are stored attributes that new
    subdirectories inherit; a create that asks to stage is marked staged only in an async
    directory, the mark is never listed nor made by setxattr, only reported on, and the
    upload's commit removes it in its own transaction."""
    from stripefs.proto.types import (
        CHECKPOINT_KEEP_XATTR, CHECKPOINT_MARKER_XATTR, CHECKPOINT_XATTR, STAGED_XATTR,
    )

    X = XattrReq
    env.open_root()
    d = env.mkdir(ROOT_INODE, b"ckpt", ctx=USER)
    for bad in (b"later", b""):
        fails(errno.EINVAL, env.core.setxattr, X(ino=d.ino, name=CHECKPOINT_XATTR, value=bad, ctx=USER))
    for bad in (b"a/b", b"..", b"", b"x" * 256):
        fails(errno.EINVAL, env.core.setxattr, X(ino=d.ino, name=CHECKPOINT_MARKER_XATTR, value=bad, ctx=USER))
    for bad in (b"0", b"-1", b"two"):
        fails(errno.EINVAL, env.core.setxattr, X(ino=d.ino, name=CHECKPOINT_KEEP_XATTR, value=bad, ctx=USER))
    fails(errno.EACCES, env.core.setxattr, X(ino=d.ino, name=CHECKPOINT_XATTR, value=b"async", ctx=OTHER))
    env.core.setxattr(X(ino=d.ino, name=CHECKPOINT_XATTR, value=b"async", ctx=USER))
    env.core.setxattr(X(ino=d.ino, name=CHECKPOINT_MARKER_XATTR, value=b"DONE", ctx=USER))
    env.core.setxattr(X(ino=d.ino, name=CHECKPOINT_KEEP_XATTR, value=b"2", ctx=USER))
    assert env.core.getxattr(X(ino=d.ino, name=CHECKPOINT_XATTR, ctx=OTHER)).value == b"async"
    step = env.mkdir(d.ino, b"step-1", ctx=USER)
    assert env.core.getxattr(X(ino=step.ino, name=CHECKPOINT_XATTR)).value == b"async"
    assert env.core.getxattr(X(ino=step.ino, name=CHECKPOINT_MARKER_XATTR)).value == b"DONE"
    fails(errno.ENODATA, env.core.getxattr, X(ino=step.ino, name=CHECKPOINT_KEEP_XATTR))  # the parent's only
    fails(errno.EINVAL, env.core.setxattr, X(ino=env.create(d.ino, b"plain", ctx=USER).ino,
                                             name=CHECKPOINT_XATTR, value=b"async", ctx=USER))

    env.add_server(1)
    s = env.session()
    reply = env.core.mknod(MknodReq(step.ino, b"shard", stat.S_IFREG | 0o644, USER, session=s, stage=True))
    assert reply.staged and reply.attr.xattrs == 1
    shard = reply.attr.ino
    assert env.core.getxattr(X(ino=shard, name=STAGED_XATTR)).value == b"0"
    assert env.core.listxattr(InodeReq(ino=shard)).names == []  # a copy must not look unfinished
    env.core.setxattr(X(ino=shard, name=STAGED_XATTR, value=b"4096", ctx=USER))  # the stager reports
    assert env.core.getxattr(X(ino=shard, name=STAGED_XATTR)).value == b"4096"
    fails(errno.EACCES, env.core.setxattr, X(ino=shard, name=STAGED_XATTR, value=b"1", ctx=OTHER))
    other = env.create(step.ino, b"copy", ctx=USER)
    fails(errno.ENODATA, env.core.setxattr, X(ino=other.ino, name=STAGED_XATTR, value=b"0", ctx=USER))
    # Not staged: no stage asked, or a sync directory.
    assert not env.core.mknod(MknodReq(step.ino, b"f2", stat.S_IFREG | 0o644, USER, session=s)).staged
    env.core.setxattr(X(ino=step.ino, name=CHECKPOINT_XATTR, value=b"sync", ctx=USER))
    assert not env.core.mknod(MknodReq(step.ino, b"f3", stat.S_IFREG | 0o644, USER, session=s, stage=True)).staged
    # A commit without unstage keeps the mark; the upload's commit drops it.
    (a,) = env.core.alloc_blocks(AllocReq(ino=shard, session=s, indexes=[0])).allocations
    env.core.commit_blocks(CommitReq(shard, s, [BlockRef(0, a.block_id, 10, a.servers)], 10, 1))
    assert env.core.getxattr(X(ino=shard, name=STAGED_XATTR)).value == b"4096"
    (a,) = env.core.alloc_blocks(AllocReq(ino=shard, session=s, indexes=[0])).allocations
    attr = env.core.commit_blocks(CommitReq(shard, s, [BlockRef(0, a.block_id, 20, a.servers)], 20, 1,
                                            unstage=True)).attr
    assert attr.size == 20 and attr.xattrs == 0
    fails(errno.ENODATA, env.core.getxattr, X(ino=shard, name=STAGED_XATTR))


# --------------------------------------------------------------------------- statfs, status


def test_statfs(env):
    assert env.core.statfs(Empty()).total_bytes == 0
    env.add_server(1)
    st = env.core.statfs(Empty())
    assert st.total_bytes == 200 * GiB and st.free_bytes == 100 * GiB  # one server: one replica
    env.add_server(2)
    env.add_server(3)
    st = env.core.statfs(Empty())
    assert st.total_bytes == 300 * GiB and st.free_bytes == 150 * GiB
    assert st.block_size == 4096 and st.name_max == 255 and st.files == 1 and st.files_free > 0


def test_status(env):
    a = env.add_server(1)
    env.add_server(2)
    c = env.add_server(3)
    env.clock.advance(5)
    env.beat(a)
    env.clock.advance(6)
    env.beat(c)
    s = env.session()
    f = env.create(ROOT_INODE, b"f")
    env.mkdir(ROOT_INODE, b"d")
    env.write(f.ino, s, 0, 1000)
    st = env.core.status(Empty())
    states = {x.server_id: (x.state, round(x.last_heartbeat_s)) for x in st.servers}
    # Silent > 3 s: suspect; > 10 s: dead.
    assert states == {a: ("suspect", 6), a + 1: ("dead", 11), c: ("up", 0)}
    assert (st.inodes, st.files, st.directories, st.bytes, st.blocks, st.sessions) == (3, 1, 2, 1000, 1, 1)
    # One replica (only c is up to take it) of a block that wants min(2, 2 alive) = 2.
    assert (st.under_replicated, st.lost) == (1, 0)


def test_block_map_orders_replicas_by_state(env):
    """Up replicas first, then suspect, then dead, each in placement order; the states
    that order them are at most READ_ORDER_REUSE_NS old (base.py `_read_order`)."""
    for n in (1, 2, 3):
        env.add_server(n)
    s = env.session()
    f = env.create(ROOT_INODE, b"f")
    env.core.setxattr(XattrReq(ino=f.ino, name=LAYOUT_XATTR_REPLICAS, value=b"3"))
    a, _ = env.write(f.ino, s, 0, 100)
    placed = a.servers
    ids = {f"10.0.0.{n}:7000": n for n in (1, 2, 3)}

    def order():
        return env.core.block_map(BlockMapReq(ino=f.ino)).blocks[0].servers

    assert order() == placed
    env.clock.advance(2)
    for addr in placed[1:]:
        env.beat(ids[addr])
    assert order() == placed  # (the first is silent for 2 s: still up)
    env.clock.advance(2)  # the first: suspect
    for addr in placed[2:]:
        env.beat(ids[addr])
    assert order() == placed[1:] + placed[:1]
    env.clock.advance(8)  # the first dead, the second suspect
    env.beat(ids[placed[2]])
    assert order() == [placed[2], placed[1], placed[0]]
    # The first beats again: within the reuse window, the map may still put it last; past
    # it, first again.
    env.beat(ids[placed[0]])
    env.clock.advance(READ_ORDER_REUSE_NS / 1e9)
    env.beat(ids[placed[0]])
    assert order()[0] == placed[0]


# --------------------------------------------------------------------------- open, sessions


def test_open_errors_and_trunc(env):
    s = env.session()
    d = env.mkdir(ROOT_INODE, b"d")
    fails(errno.EISDIR, env.core.open, OpenReq(ino=d.ino, session=s))
    fails(errno.ENOENT, env.core.open, OpenReq(ino=999, session=s))
    f = env.create(ROOT_INODE, b"f")
    fails(errno.ESTALE, env.core.open, OpenReq(ino=f.ino, session=s + 100))
    env.add_server(1)
    env.write(f.ino, s, 0, 500)
    reply = env.core.open(OpenReq(ino=f.ino, session=s))
    assert reply.attr.size == 500 and [b.length for b in reply.blocks] == [500]
    assert reply.blocks[0].servers == ["10.0.0.1:7000"]
    reply = env.core.open(OpenReq(ino=f.ino, session=s, flags=os.O_WRONLY | os.O_TRUNC))
    assert reply.attr.size == 0 and reply.blocks == []


def test_create_and_open(env):
    s = env.session()
    f = env.create(ROOT_INODE, b"f", session=s)
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"f"))
    assert env.getattr(f.ino).nlink == 0
    env.core.release(ReleaseReq(ino=f.ino, session=s))
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=f.ino))
    fails(errno.ESTALE, env.core.mknod,
          MknodReq(parent=ROOT_INODE, name=b"g", mode=stat.S_IFREG | 0o644, ctx=ROOT, session=s + 9))
    assert env.names(ROOT_INODE) == []


def test_unlink_while_open_two_sessions(env):
    env.add_server(1)
    s1, s2 = env.session(), env.session()
    f = env.create(ROOT_INODE, b"f")
    a, _ = env.write(f.ino, s1, 0, 1000)
    env.core.open(OpenReq(ino=f.ino, session=s1))
    env.core.open(OpenReq(ino=f.ino, session=s2))
    env.core.open(OpenReq(ino=f.ino, session=s2))
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"f"))
    assert env.getattr(f.ino).nlink == 0
    # Still readable and even writable through the open handles.
    assert env.core.block_map(BlockMapReq(ino=f.ino)).blocks[0].block_id == a.block_id
    env.write(f.ino, s2, 1, 10, size=f.block_size + 10)
    env.core.release(ReleaseReq(ino=f.ino, session=s1))
    env.core.release(ReleaseReq(ino=f.ino, session=s2))
    assert env.getattr(f.ino).nlink == 0  # s2 still has one open
    env.core.release(ReleaseReq(ino=f.ino, session=s2))
    # Open nowhere: purged once an unlinked file with blocks may be (unrecorded readers).
    assert env.getattr(f.ino).nlink == 0
    env.clock.advance(env.core.unlinked_hold_s)
    env.core.sweep()
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=f.ino))
    env.core.release(ReleaseReq(ino=f.ino, session=s2))  # a stray release is harmless
    env.clock.advance(31)
    assert len(env.beat(1).delete) == 2


def test_purge_on_session_close_and_expiry(env):
    s1, s2 = env.session(), env.session()
    f = env.create(ROOT_INODE, b"f")
    g = env.create(ROOT_INODE, b"g")
    env.core.open(OpenReq(ino=f.ino, session=s1))
    env.core.open(OpenReq(ino=g.ino, session=s2))
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"f"))
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"g"))
    env.core.close_session(SessionReq(session=s1))
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=f.ino))
    fails(errno.ESTALE, env.core.renew_session, SessionReq(session=s1))
    fails(errno.ESTALE, env.core.close_session, SessionReq(session=s1))
    # s2 goes silent: renewals keep a session alive, silence for 3 leases ends it.
    env.clock.advance(60)
    env.core.renew_session(SessionReq(session=s2))
    env.clock.advance(60)
    env.core.sweep()
    assert env.getattr(g.ino).nlink == 0
    env.clock.advance(31)
    assert env.core.sweep()["sessions_expired"] == 1
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=g.ino))
    fails(errno.ESTALE, env.core.renew_session, SessionReq(session=s2))
    assert env.core.status(Empty()).sessions == 0


# --------------------------------------------------------------------------- allocation


def test_alloc_no_servers(env):
    s = env.session()
    f = env.create(ROOT_INODE, b"f")
    fails(errno.EIO, env.core.alloc_blocks, AllocReq(ino=f.ino, session=s, indexes=[0]))
    sid = env.add_server(1, free=DEFAULT_BLOCK_SIZE_BYTES)  # too full for a 4 MiB block
    fails(errno.ENOSPC, env.core.alloc_blocks, AllocReq(ino=f.ino, session=s, indexes=[0]))
    env.beat(sid, free=100 * GiB)
    env.clock.advance(11)  # silent too long: dead
    fails(errno.EIO, env.core.alloc_blocks, AllocReq(ino=f.ino, session=s, indexes=[0]))
    d = env.mkdir(ROOT_INODE, b"d")
    fails(errno.EISDIR, env.core.alloc_blocks, AllocReq(ino=d.ino, session=s, indexes=[0]))
    fails(errno.ESTALE, env.core.alloc_blocks, AllocReq(ino=f.ino, session=s + 1, indexes=[0]))
    fails(errno.ENOENT, env.core.alloc_blocks, AllocReq(ino=999, session=s, indexes=[0]))


def test_alloc_striping_and_replicas(env):
    s = env.session()
    f = env.create(ROOT_INODE, b"f")
    env.add_server(1)
    (a,) = env.core.alloc_blocks(AllocReq(ino=f.ino, session=s, indexes=[0])).allocations
    assert len(a.servers) == 1  # min(2, 1)
    assert len(a.tokens) == 1
    assert check_write_token(SECRET, a.block_id, "admin:local", a.servers[0], a.tokens[0], env.clock.t)
    for n in (2, 3, 4):
        env.add_server(n)
    allocs = env.core.alloc_blocks(AllocReq(ino=f.ino, session=s, indexes=list(range(8)))).allocations
    assert all(len(x.servers) == 2 and len(set(x.servers)) == 2 for x in allocs)
    starts = [x.servers[0] for x in allocs]
    assert all(starts[i] != starts[i + 1] for i in range(7))
    assert len(set(starts)) == 4  # every server leads some block
    ids = [x.block_id for x in allocs]
    assert len(set(ids)) == 8 and min(ids) > a.block_id
    # Committed, the block map keeps the placement order (whatever order the client
    # reports), so readers of consecutive blocks start on different servers too.
    refs = [BlockRef(index=x.index, block_id=x.block_id, length=10, servers=x.servers[::-1]) for x in allocs]
    env.core.commit_blocks(CommitReq(ino=f.ino, session=s, blocks=refs, size=7 * f.block_size + 10, mtime_ns=1))
    m = env.core.block_map(BlockMapReq(ino=f.ino)).blocks
    assert [r.servers for r in m] == [x.servers for x in allocs]
    # A per-file replica count, capped at the usable servers; full and dead servers are skipped.
    g = env.create(ROOT_INODE, b"g")
    env.core.setxattr(XattrReq(ino=g.ino, name=LAYOUT_XATTR_REPLICAS, value=b"8"))
    (x,) = env.core.alloc_blocks(AllocReq(ino=g.ino, session=s, indexes=[0])).allocations
    assert len(x.servers) == 4
    env.beat(1, free=0)
    env.clock.advance(8)
    env.beat(1, free=0)
    env.beat(2)
    env.beat(3)
    env.clock.advance(3)  # server 4 now silent for 11 s
    (x,) = env.core.alloc_blocks(AllocReq(ino=g.ino, session=s, indexes=[0])).allocations
    assert sorted(x.servers) == ["10.0.0.2:7000", "10.0.0.3:7000"]


# --------------------------------------------------------------------------- commit and GC


def test_commit_and_gc(env):
    sids = [env.add_server(i) for i in range(1, 3)]
    s = env.session()
    f = env.create(ROOT_INODE, b"f")
    a1, attr = env.write(f.ino, s, 0, 4096)
    assert attr.size == 4096 and attr.mtime_ns == 123 and attr.generation == 1
    m = env.core.block_map(BlockMapReq(ino=f.ino)).blocks
    assert m[0].block_id == a1.block_id and m[0].servers == a1.servers
    # Overwrite block 0: the old id becomes garbage on both servers, after the grace period.
    a2, attr = env.write(f.ino, s, 0, 100, size=100)
    assert attr.size == 4096 and attr.generation == 2  # a commit never shrinks
    for sid in sids:
        assert env.beat(sid).delete == []
    env.clock.advance(31)
    for sid in sids:
        assert env.beat(sid).delete == [a1.block_id]
    env.core.blocks_deleted(DeletedReq(server_id=sids[0], block_ids=[a1.block_id]))
    assert env.beat(sids[0]).delete == []
    assert env.beat(sids[1]).delete == [a1.block_id]


def test_commit_errors(env):
    env.add_server(1)
    env.add_server(2)
    s = env.session()
    f = env.create(ROOT_INODE, b"f")
    g = env.create(ROOT_INODE, b"g")
    (a,) = env.core.alloc_blocks(AllocReq(ino=f.ino, session=s, indexes=[3])).allocations

    def commit(ino=f.ino, **kw):
        ref = dict(index=3, block_id=a.block_id, length=10, servers=a.servers)
        ref.update(kw)
        return CommitReq(ino=ino, session=s, blocks=[BlockRef(**ref)], size=10, mtime_ns=1)

    fails(errno.EINVAL, env.core.commit_blocks, commit(block_id=a.block_id + 100))
    fails(errno.EINVAL, env.core.commit_blocks, commit(ino=g.ino))
    fails(errno.EINVAL, env.core.commit_blocks, commit(index=4))
    fails(errno.EINVAL, env.core.commit_blocks, commit(servers=[]))
    fails(errno.EINVAL, env.core.commit_blocks, commit(servers=["10.9.9.9:1"]))
    fails(errno.EINVAL, env.core.commit_blocks, commit(length=f.block_size + 1))
    # Written to one of the two: committed with one replica, the other gets cleaned up.
    attr = env.core.commit_blocks(commit(servers=a.servers[:1])).attr
    assert attr.size == 10
    assert env.core.block_map(BlockMapReq(ino=f.ino)).blocks[0].servers == a.servers[:1]
    fails(errno.EINVAL, env.core.commit_blocks, commit())  # no longer pending
    env.clock.advance(31)
    other = 1 if a.servers[1].startswith("10.0.0.1") else 2
    assert env.beat(other).delete == [a.block_id]


def test_commit_after_purge(env):
    sid = env.add_server(1)
    s = env.session()
    f = env.create(ROOT_INODE, b"f")
    (a,) = env.core.alloc_blocks(AllocReq(ino=f.ino, session=s, indexes=[0])).allocations
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"f"))
    ref = BlockRef(index=0, block_id=a.block_id, length=5, servers=a.servers)
    fails(errno.ENOENT, env.core.commit_blocks, CommitReq(ino=f.ino, session=s, blocks=[ref], size=5, mtime_ns=1))
    env.clock.advance(31)
    assert env.beat(sid).delete == [a.block_id]


def test_abandoned_allocations_swept(env):
    sid = env.add_server(1)
    s = env.session()
    f = env.create(ROOT_INODE, b"f")
    (a,) = env.core.alloc_blocks(AllocReq(ino=f.ino, session=s, indexes=[0])).allocations
    env.clock.advance(300)
    env.beat(sid)
    env.core.renew_session(SessionReq(session=s))
    assert env.core.sweep()["allocations_abandoned"] == 0
    env.clock.advance(301)  # past the 600 s pending timeout
    env.beat(sid)
    env.core.renew_session(SessionReq(session=s))
    assert env.core.sweep()["allocations_abandoned"] == 1
    env.clock.advance(31)
    assert env.beat(sid).delete == [a.block_id]


def test_allocations_abandoned_with_their_session(env):
    sid = env.add_server(1)
    s1, s2 = env.session(), env.session()
    f = env.create(ROOT_INODE, b"f")
    (a,) = env.core.alloc_blocks(AllocReq(ino=f.ino, session=s1, indexes=[0])).allocations
    (b,) = env.core.alloc_blocks(AllocReq(ino=f.ino, session=s2, indexes=[1])).allocations
    env.core.close_session(SessionReq(session=s1))
    # s2 expires (3 leases of silence): its allocation goes too, without waiting 10 min.
    env.clock.advance(91)
    env.beat(sid)
    assert env.core.sweep()["allocations_abandoned"] == 1
    env.clock.advance(31)
    assert sorted(env.beat(sid).delete) == [a.block_id, b.block_id]
    ref = BlockRef(index=0, block_id=a.block_id, length=5, servers=a.servers)
    fails(errno.ESTALE, env.core.commit_blocks, CommitReq(ino=f.ino, session=s1, blocks=[ref], size=5, mtime_ns=1))
    # Nor can another session commit it (the client then uploads its blocks again).
    fails(errno.EINVAL, env.core.commit_blocks,
          CommitReq(ino=f.ino, session=env.session(), blocks=[ref], size=5, mtime_ns=1))


# --------------------------------------------------------------------------- registry


def test_register_and_heartbeat(env):
    sid = env.add_server(1)
    assert env.add_server(2) != sid
    s = env.session()
    f = env.create(ROOT_INODE, b"f")
    env.write(f.ino, s, 0, 10)
    # Restarted on a new port: same id, and block maps point at the new address.
    reply = env.core.register(RegisterReq(address="10.0.0.1:7999", node_id="node-1",
                                          capacity_bytes=1, free_bytes=1, blocks=0))
    assert reply.server_id == sid and reply.heartbeat_interval_s > 0
    servers = env.core.block_map(BlockMapReq(ino=f.ino)).blocks[0].servers
    assert "10.0.0.1:7999" in servers and "10.0.0.1:7000" not in servers
    hb = env.core.heartbeat(HeartbeatReq(server_id=4242, capacity_bytes=1, free_bytes=1, blocks=0))
    assert hb.reregister and hb.delete == []
    assert not env.beat(sid).reregister


def test_heartbeat_delete_list_is_capped(env):
    sid = env.add_server(1)
    with env.core.store.transaction() as tx:
        tx.run_many("INSERT INTO garbage (block_id, server_id, not_before_ns) VALUES (?, ?, 0)",
                    [(i, sid) for i in range(1, 1500)])
    first = env.beat(sid).delete
    assert len(first) == 1000
    env.core.blocks_deleted(DeletedReq(server_id=sid, block_ids=first))
    assert len(env.beat(sid).delete) == 499


# --------------------------------------------------------------------------- persistence


def test_reopen_keeps_everything_and_never_reuses_ids(env):
    sid = env.add_server(1)
    s = env.session()
    d = env.mkdir(ROOT_INODE, b"d")
    f = env.create(d.ino, b"f")
    env.core.setxattr(XattrReq(ino=f.ino, name=b"user.k", value=b"v"))
    a, _ = env.write(f.ino, s, 0, 42)
    tmp = env.create(ROOT_INODE, b"tmp")
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"tmp"))
    env.reopen()
    assert env.lookup(d.ino, b"f").ino == f.ino
    assert env.core.getxattr(XattrReq(ino=f.ino, name=b"user.k")).value == b"v"
    m = env.core.block_map(BlockMapReq(ino=f.ino)).blocks
    assert [(r.block_id, r.length) for r in m] == [(a.block_id, 42)]
    assert env.getattr(ROOT_INODE).nlink == 3
    env.core.renew_session(SessionReq(session=s))
    assert env.beat(sid).reregister is False
    # The highest inode was deleted before the reopen; its number is still not handed out.
    new = env.create(ROOT_INODE, b"new")
    assert new.ino > tmp.ino
    (b,) = env.core.alloc_blocks(AllocReq(ino=new.ino, session=s, indexes=[0])).allocations
    assert b.block_id > a.block_id
    assert env.session() > s


def test_concurrent_calls(env):
    errors = []

    def worker(k):
        try:
            d = env.mkdir(ROOT_INODE, b"w%d" % k)
            for i in range(20):
                env.create(d.ino, b"f%d" % i)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert env.getattr(ROOT_INODE).nlink == 10
    assert env.core.status(Empty()).inodes == 1 + 8 + 160


def test_durable_transactions_are_synced_and_others_wait_for_sync(env):
    store = env.core.store
    if store.engine != "sqlite":
        pytest.skip("SQLite's group commit: PostgreSQL's commits are durable on return (test_root_and_store)")
    with store.transaction() as tx:
        tx.run("UPDATE inodes SET atime_ns = atime_ns WHERE ino = 1")
    assert store._synced < store._commits  # crash-safe (in the WAL), not yet fsynced
    with store.transaction(durable=True) as tx:
        tx.run("UPDATE inodes SET atime_ns = atime_ns WHERE ino = 1")
    assert store._synced == store._commits  # one fsync covered both
    store.sync()  # nothing new: no fsync needed
    assert store._synced == store._commits


def test_create_can_preallocate_blocks(env):
    """A create with prealloc_blocks returns allocations usable by commit_blocks."""
    from stripefs.proto.messages import BlockRef, CommitReq, MknodReq, SessionOpenReq

    core = env.core
    for n in range(3):
        env.add_server(n)
    session = core.open_session(SessionOpenReq("h", "m")).session
    reply = core.mknod(MknodReq(1, b"pre", 0o100644, Ctx(), 0, session, prealloc_blocks=1))
    (a,) = reply.allocations
    assert a.index == 0 and a.servers and len(a.tokens) == len(a.servers)
    attr = core.commit_blocks(CommitReq(reply.attr.ino, session, [BlockRef(0, a.block_id, 10, a.servers)], 10, 1)).attr
    assert attr.size == 10
    # No live server: the create still succeeds, without allocations.
    env.clock.advance(3600)
    reply = core.mknod(MknodReq(1, b"pre2", 0o100644, Ctx(), 0, session, prealloc_blocks=1))
    assert reply.allocations == []


def test_inline_commit_drops_an_unused_preallocation(env):
    for n in range(3):
        env.add_server(n)
    session = env.session()
    reply = env.core.mknod(MknodReq(1, b"small", 0o100644, ROOT, 0, session, prealloc_blocks=1))
    (a,) = reply.allocations
    inline_commit(env, reply.attr.ino, session, b"tiny")
    with env.core.store.transaction() as tx:
        assert tx.scalar("SELECT COUNT(*) FROM pending WHERE block_id = ?", (a.block_id,)) == 0
        assert tx.scalar("SELECT COUNT(*) FROM garbage WHERE block_id = ?", (a.block_id,)) == len(a.servers)


# ---------------------------------------------------------------------------- inline block 0


def inline_commit(env, ino: int, session: int, data: bytes, size: int | None = None):
    import crc32c

    from stripefs.proto.messages import InlineCommitReq

    return env.core.commit_inline(InlineCommitReq(ino, session, len(data) if size is None else size, 1,
                                                  crc32c.crc32c(data), data)).attr


def test_inline_commit_open_and_truncate(env):
    session = env.session()
    f = env.create(ROOT_INODE, b"small", session=session)
    attr = inline_commit(env, f.ino, session, b"hello world")
    assert attr.size == 11 and attr.generation == f.generation + 1
    opened = env.core.open(OpenReq(f.ino, session))
    assert opened.inline and opened.data == b"hello world" and opened.blocks == []
    env.core.setattr(SetattrReq(f.ino, ROOT, size=5))
    assert env.core.block_map(BlockMapReq(f.ino)).data == b"hello"
    env.core.setattr(SetattrReq(f.ino, ROOT, size=0))
    reply = env.core.block_map(BlockMapReq(f.ino))
    assert not reply.inline and reply.attr.size == 0
    assert env.core.status(Empty()).inline_files == 0


def test_a_reader_open_goes_unrecorded_when_the_client_asks(env):
    env.add_server(1)
    session = env.session()
    small = env.create(ROOT_INODE, b"small", session=session)
    inline_commit(env, small.ino, session, b"all of it")
    empty = env.create(ROOT_INODE, b"empty", session=session)
    big = env.create(ROOT_INODE, b"big", session=session)
    env.write(big.ino, session, 0, 1000)
    for ino in (small.ino, empty.ino, big.ino):
        env.core.release(ReleaseReq(ino, session))  # (the creator's opens)

    def opens(ino: int) -> int:
        with env.core.store.transaction() as tx:
            return tx.scalar("SELECT COALESCE(SUM(count), 0) FROM opens WHERE ino = ?", (ino,))

    for ino in (small.ino, empty.ino, big.ino):
        reply = env.core.open(OpenReq(ino, session, flags=os.O_RDONLY, unrecorded_ok=True))
        assert not reply.recorded and opens(ino) == 0
    assert env.core.open(OpenReq(small.ino, session, flags=os.O_RDONLY, unrecorded_ok=True)).data == b"all of it"
    # Recorded: a writer, and any client that does not ask (older clients release every
    # open); a file with blocks when the metaserver does not keep unlinked ones a while.
    assert env.core.open(OpenReq(small.ino, session, flags=os.O_RDWR, unrecorded_ok=True)).recorded
    assert env.core.open(OpenReq(empty.ino, session, flags=os.O_RDONLY)).recorded
    env.core.unlinked_hold_s = 0
    assert env.core.open(OpenReq(big.ino, session, flags=os.O_RDONLY, unrecorded_ok=True)).recorded
    assert (opens(big.ino), opens(small.ino), opens(empty.ino)) == (1, 1, 1)
    # Permission is checked all the same.
    env.core.setattr(SetattrReq(small.ino, ROOT, mode=0o600))
    fails(errno.EACCES, env.core.open, OpenReq(small.ino, session, USER, os.O_RDONLY, unrecorded_ok=True))
    # Unrecorded, the file is purged with its last name (the reader holds its content).
    env.core.release(ReleaseReq(empty.ino, session))  # (the one recorded open of it)
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"empty"))
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=empty.ino))


def test_an_open_naming_the_map_of_the_current_generation_gets_no_map(env):
    """OpenReq.map_generation: while the file's generation is the one the client's map is
    of, the reply leaves the map out (same_map); any change of its blocks moves the
    generation, and the map comes whole again."""
    env.add_server(1)
    session = env.session()
    f = env.create(ROOT_INODE, b"f", session=session)
    a, attr = env.write(f.ino, session, 0, 1000)
    env.core.release(ReleaseReq(f.ino, session))

    def open_naming(generation: int, flags: int = os.O_RDONLY, ctx: Ctx = ROOT) -> OpenReply:
        return env.core.open(OpenReq(f.ino, session, ctx, flags, unrecorded_ok=True, map_generation=generation))

    full = open_naming(0)
    assert not full.same_map and [b.block_id for b in full.blocks] == [a.block_id]
    assert not full.recorded
    same = open_naming(full.attr.generation)
    assert same.same_map and same.blocks == [] and same.attr == full.attr and same.grant == full.grant
    assert not same.recorded  # (a file with blocks, as the map said)
    stale = open_naming(full.attr.generation - 1)
    assert not stale.same_map and [b.block_id for b in stale.blocks] == [a.block_id]
    # An open that registers one the client has (recorded late, or in a new session)
    # asks for no map: recorded, and no map built.
    registered = env.core.open(OpenReq(f.ino, session, ROOT, os.O_RDONLY, grant=full.grant, map_wanted=False))
    assert registered.recorded and registered.blocks == [] and not registered.same_map
    env.core.release(ReleaseReq(f.ino, session))
    # (recorded even if it says it could do without: its empty map is not the file's)
    both = env.core.open(OpenReq(f.ino, session, ROOT, os.O_RDONLY, unrecorded_ok=True, map_wanted=False))
    assert both.recorded and both.blocks == []
    env.core.release(ReleaseReq(f.ino, session))
    # Permission is checked all the same.
    env.core.setattr(SetattrReq(f.ino, ROOT, mode=0o600))
    fails(errno.EACCES, lambda g: open_naming(g, ctx=USER), full.attr.generation)
    # A new block 0: a new generation, the new map.
    b, _ = env.write(f.ino, session, 0, 500)
    after = open_naming(full.attr.generation)
    assert not after.same_map and [x.block_id for x in after.blocks] == [b.block_id]
    assert open_naming(after.attr.generation).same_map
    # A truncate at open: the map after it.
    env.core.release(ReleaseReq(f.ino, session))
    trunc = open_naming(after.attr.generation, os.O_RDWR | os.O_TRUNC)
    assert not trunc.same_map and trunc.blocks == [] and trunc.attr.size == 0


def test_an_unlinked_file_with_blocks_waits_for_readers_whose_opens_went_unrecorded(env):
    """A reader's unrecorded open of a file with blocks is recorded by its client within
    SessionReply.record_open_after_s if still open; until then, only the metaserver's wait
    (unlinked_hold_s after the last link went) keeps the file's blocks for it."""
    env.add_server(1)
    writer, reader = env.session(), env.session()
    hold = env.core.unlinked_hold_s
    assert env.core.open_session(SessionOpenReq("h", "/m")).record_open_after_s == hold / 5 > 0
    f = env.create(ROOT_INODE, b"f", session=writer)
    a, _ = env.write(f.ino, writer, 0, 1000)
    env.core.release(ReleaseReq(f.ino, writer))
    assert not env.core.open(OpenReq(f.ino, reader, flags=os.O_RDONLY, unrecorded_ok=True)).recorded
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"f"))
    assert env.getattr(f.ino).nlink == 0  # kept, with its blocks
    assert env.core.fsck(FsckReq()).problems == []  # (waiting is not an orphan)
    env.clock.advance(hold / 5)
    env.core.sweep()
    # The reader's client records the open (the handle is still open): that keeps it now.
    assert env.core.open(OpenReq(f.ino, reader, flags=os.O_RDONLY)).recorded
    env.clock.advance(hold)
    env.core.sweep()
    assert env.core.block_map(BlockMapReq(ino=f.ino)).blocks[0].block_id == a.block_id
    env.core.release(ReleaseReq(f.ino, reader))  # past the wait: purged at once
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=f.ino))
    # Nobody records anything: the sweep purges it when the wait is over, not before.
    env.beat(1)
    g = env.create(ROOT_INODE, b"g", session=writer)
    env.write(g.ino, writer, 0, 1000)
    env.core.release(ReleaseReq(g.ino, writer))
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"g"))
    env.clock.advance(hold - 1)
    assert env.core.sweep()["unlinked_purged"] == 0
    env.clock.advance(1)
    assert env.core.sweep()["unlinked_purged"] == 1
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=g.ino))
    env.clock.advance(env.core.gc_grace_s + 1)
    assert len(env.beat(1).delete) == 2
    # A file without blocks goes with its last link as before.
    h = env.create(ROOT_INODE, b"h")
    env.core.unlink(RemoveReq(parent=ROOT_INODE, name=b"h"))
    fails(errno.ENOENT, env.core.getattr, InodeReq(ino=h.ino))


def test_the_sweep_purges_unlinked_files_in_batches_of_their_own(env, monkeypatch):
    from stripefs.metaserver import base

    monkeypatch.setattr(base, "PURGE_BATCH", 2)
    env.add_server(1)
    s = env.session()
    inos = []
    for i in range(5):
        f = env.create(ROOT_INODE, f"f{i}".encode(), session=s)
        env.write(f.ino, s, 0, 100)
        env.core.release(ReleaseReq(f.ino, s))
        env.core.unlink(RemoveReq(parent=ROOT_INODE, name=f"f{i}".encode()))
        inos.append(f.ino)
    env.clock.advance(env.core.unlinked_hold_s)
    assert env.core.purge_unlinked(budget_s=0) == 2  # one batch, the budget spent
    assert env.core.purge_unlinked() == 3  # batch after batch, to a short one
    for ino in inos:
        fails(errno.ENOENT, env.core.getattr, InodeReq(ino=ino))


def test_inline_commit_checks_limit_and_checksum(env):
    import crc32c

    from stripefs.proto.messages import InlineCommitReq

    session = env.session()
    f = env.create(ROOT_INODE, b"f", session=session)
    too_big = bytes(DEFAULT_INLINE_MAX_BYTES + 1)
    with pytest.raises(FsError) as exc:
        inline_commit(env, f.ino, session, too_big)
    assert exc.value.errno == errno.EFBIG
    with pytest.raises(FsError) as exc:
        env.core.commit_inline(InlineCommitReq(f.ino, session, 3, 1, crc32c.crc32c(b"abc") ^ 1, b"abc"))
    assert exc.value.errno == errno.EIO
    d = env.mkdir(ROOT_INODE, b"d")
    with pytest.raises(FsError) as exc:
        inline_commit(env, d.ino, session, b"x")
    assert exc.value.errno == errno.EISDIR


def test_stored_block_0_and_inline_replace_each_other(env):
    for n in range(3):
        env.add_server(n)
    session = env.session()
    f = env.create(ROOT_INODE, b"f", session=session)
    inline_commit(env, f.ino, session, b"x" * 100)
    (a,) = env.core.alloc_blocks(AllocReq(f.ino, session, [0])).allocations
    env.core.commit_blocks(CommitReq(f.ino, session, [BlockRef(0, a.block_id, 200_000, a.servers)], 200_000, 2))
    reply = env.core.block_map(BlockMapReq(f.ino))
    assert not reply.inline and [b.block_id for b in reply.blocks] == [a.block_id]
    inline_commit(env, f.ino, session, b"y" * 10)
    reply = env.core.block_map(BlockMapReq(f.ino))
    assert reply.inline and reply.data == b"y" * 10 and reply.blocks == []
    # the stored block went to garbage, on each of its servers
    with env.core.store.transaction() as tx:
        assert tx.scalar("SELECT COUNT(*) FROM garbage WHERE block_id = ?", (a.block_id,)) == len(a.servers)


def test_fsck_finds_corrupt_inline_data(env):
    from stripefs.proto.messages import FsckReq

    session = env.session()
    f = env.create(ROOT_INODE, b"f", session=session)
    inline_commit(env, f.ino, session, b"precious")
    assert env.core.fsck(FsckReq()).problems == []
    with env.core.store.transaction() as tx:
        tx.run("UPDATE inline_data SET data = ? WHERE ino = ?", (b"Precious", f.ino))
    problems = env.core.fsck(FsckReq()).problems
    assert len(problems) == 1 and "checksum" in problems[0]
    with pytest.raises(FsError) as exc:
        env.core.open(OpenReq(f.ino, session))
    assert exc.value.errno == errno.EIO


def test_directory_generation_moves_with_every_entry_change(env):
    d = env.mkdir(ROOT_INODE, b"d")
    g0 = env.getattr(d.ino).generation
    env.create(d.ino, b"a")
    env.core.rename(RenameReq(d.ino, b"a", d.ino, b"b"))
    env.core.link(LinkReq(env.lookup(d.ino, b"b").ino, d.ino, b"c"))
    env.core.unlink(RemoveReq(d.ino, b"c"))
    env.core.setattr(SetattrReq(d.ino, ROOT, mode=0o700))  # not an entry change
    assert env.getattr(d.ino).generation == g0 + 4
    listing = env.core.readdir(ReaddirReq(d.ino))
    assert listing.generation == g0 + 4
    assert env.core.lookup(LookupReq(d.ino, b"b")).cookie == listing.entries[0].cookie


def test_batch_runs_calls_in_one_transaction_each_undone_alone(env):
    sqlite = env.core.store.engine == "sqlite"
    commits = env.core.store._commits if sqlite else 0
    results = env.core.apply_batch([
        ("mkdir", MkdirReq(ROOT_INODE, b"a", 0o755, ROOT)),
        ("mkdir", MkdirReq(ROOT_INODE, b"a", 0o755, ROOT)),  # EEXIST: undoes only itself
        ("rename", RenameReq(ROOT_INODE, b"a", ROOT_INODE, b"b")),  # durable
        ("lookup", LookupReq(ROOT_INODE, b"b")),
    ])
    (made, b1), (err, b2), (_, b3), (found, b4) = results
    assert isinstance(err, FsError) and err.errno == errno.EEXIST
    assert found.attr.ino == made.attr.ino
    if not sqlite:
        assert b1 is b2 is b3 is b4 is None  # every commit is durable on return
        return
    assert env.core.store._commits == commits + 1
    assert b1 is None and b2 is None and b4 is None and b3 is not None  # only the rename waits for an fsync
    b3()
    assert env.core.store._synced == env.core.store._commits


def test_version_9_request_records_are_kept_in_their_new_layout(env):
    """Schema 10 keeps SQLite's request records in insertion order (rid in an index of its
    own): a record made under schema 9's layout still answers its retry after the
    migration, and new records go on after it."""
    if env.core.store.engine != "sqlite":
        pytest.skip("SQLite's migrations: PostgreSQL's table did not change")
    ((made, _),) = env.core.apply_batch([("mkdir", MkdirReq(ROOT_INODE, b"d", 0o755, ROOT, rid=77))])
    downgrade(env, 9,
              "CREATE TABLE old (rid INTEGER PRIMARY KEY, reply BLOB NOT NULL, created_ns INTEGER NOT NULL)",
              "INSERT INTO old SELECT rid, reply, created_ns FROM requests",
              "DROP TABLE requests",
              "ALTER TABLE old RENAME TO requests",
              "CREATE INDEX requests_by_age ON requests(created_ns)",
              "ALTER TABLE inodes DROP COLUMN used_files",
              "ALTER TABLE inodes DROP COLUMN used_bytes",
              )
    assert env.core.store.schema_version() == SCHEMA_VERSION
    ((again, _),) = env.core.apply_batch([("mkdir", MkdirReq(ROOT_INODE, b"d", 0o755, ROOT, rid=77))])
    assert again == made  # the first reply, not EEXIST
    env.core.apply_batch([("mkdir", MkdirReq(ROOT_INODE, b"e", 0o755, ROOT, rid=78))])
    with env.core.store.transaction() as tx:
        assert [tuple(r) for r in tx.all("SELECT seq, rid FROM requests ORDER BY seq")] == [(1, 77), (2, 78)]

def test_version_10_database_gets_its_usage_counters(env):
    """Schema 11 added the directory usage counters: a database of version 10 (on either
    engine) opens with them counted from its entries."""
    d = env.mkdir(ROOT_INODE, b"d")
    s = env.session()
    f = env.create(d.ino, b"f", session=s)
    inline_commit(env, f.ino, s, b"y" * 123)
    downgrade(env, 10, "ALTER TABLE inodes DROP COLUMN used_files", "ALTER TABLE inodes DROP COLUMN used_bytes")
    assert env.core.store.schema_version() == SCHEMA_VERSION
    assert usage(env, ROOT_INODE) == (123, 1, 2)
    assert env.core.fsck(FsckReq()).problems == []

def test_a_once_call_retried_with_its_request_id_gets_the_first_reply(env):
    """apply_batch records the reply of a `once` call under its request id, in the call's
    own transaction: the same id again gets that reply without running the call (a mkdir
    is not EEXIST, an unlink not ENOENT), a new id runs it; a failure is not recorded; the
    sweep forgets records after REQUEST_RECORD_TTL_S."""
    from stripefs.metaserver.registry import REQUEST_RECORD_TTL_S

    def once(name, req):
        ((result, _),) = env.core.apply_batch([(name, req)])
        if isinstance(result, FsError):
            raise result
        return codec.decode_reply(META_METHODS[name].reply, result)  # encoded once, recorded so

    first = once("mkdir", MkdirReq(ROOT_INODE, b"d", 0o755, ROOT, rid=77))
    again = once("mkdir", MkdirReq(ROOT_INODE, b"d", 0o755, ROOT, rid=77))
    assert again.attr.ino == first.attr.ino
    fails(errno.EEXIST, lambda req: once("mkdir", req), MkdirReq(ROOT_INODE, b"d", 0o755, ROOT, rid=78))
    fails(errno.ENOENT, lambda req: once("rmdir", req), RemoveReq(ROOT_INODE, b"x", ROOT, rid=79))
    env.create(ROOT_INODE, b"x")  # the failure was not recorded: the same id runs again
    fails(errno.ENOTDIR, lambda req: once("rmdir", req), RemoveReq(ROOT_INODE, b"x", ROOT, rid=79))
    once("rmdir", RemoveReq(ROOT_INODE, b"d", ROOT, rid=80))
    once("rmdir", RemoveReq(ROOT_INODE, b"d", ROOT, rid=80))  # not ENOENT
    assert b"d" not in env.names(ROOT_INODE)
    env.clock.advance(REQUEST_RECORD_TTL_S + 1)
    env.core.sweep()
    with env.core.store.transaction() as tx:
        assert tx.scalar("SELECT COUNT(*) FROM requests") == 0


# ---------------------------------------------------------------------------- usage (du)


def walk_usage(env, ino: int) -> tuple[int, int, int]:
    """(bytes, files, dirs) under directory `ino`, by listing every directory."""
    total, files, dirs = 0, 0, 1
    for e in env.core.readdir(ReaddirReq(ino=ino, limit=100_000)).entries:
        if stat.S_ISDIR(e.attr.mode):
            b, f, d = walk_usage(env, e.attr.ino)
            total, files, dirs = total + b, files + f, dirs + d
        else:
            total, files = total + e.attr.size, files + 1
    return total, files, dirs


def usage(env, ino: int) -> tuple[int, int, int]:
    from stripefs.proto.messages import UsageReq

    r = env.core.usage(UsageReq(ino=ino, ctx=ROOT))
    return r.bytes, r.files, r.dirs


def test_usage_counters_agree_with_a_walk(env):
    """`du` from the directory usage counters equals a walk of the tree after creates,
    block and inline writes, truncates, links, renames (across directories, replacing,
    exchanging, a directory with its subtree), unlinks of open and closed files, rmdir,
    and a metaserver restart; fsck finds the counters right, and repairs broken ones."""
    s = env.session()
    env.add_server(1)
    a = env.mkdir(ROOT_INODE, b"a")
    b = env.mkdir(a.ino, b"b")
    c = env.mkdir(ROOT_INODE, b"c")
    f1 = env.create(a.ino, b"f1", session=s)
    env.write(f1.ino, s, 0, 1000)
    env.write(f1.ino, s, 1, 500)  # size: one block + 500
    f2 = env.create(b.ino, b"f2", session=s)
    inline_commit(env, f2.ino, s, b"x" * 300)
    env.core.symlink(SymlinkReq(parent=b.ino, name=b"ln", target=b"../f1", ctx=ROOT))
    env.create(c.ino, b"empty")
    checks = [ROOT_INODE, a.ino, b.ino, c.ino]

    def agree():
        for d in checks:
            assert usage(env, d) == walk_usage(env, d), d

    agree()
    assert usage(env, f1.ino) == (env.getattr(f1.ino).size, 1, 0)
    env.core.setattr(SetattrReq(ino=f1.ino, ctx=ROOT, size=100))
    env.core.setattr(SetattrReq(ino=f2.ino, ctx=ROOT, size=5000))
    agree()
    env.core.link(LinkReq(ino=f1.ino, new_parent=c.ino, new_name=b"f1-again", ctx=ROOT))
    env.core.link(LinkReq(ino=f1.ino, new_parent=c.ino, new_name=b"f1-third", ctx=ROOT))
    env.core.setattr(SetattrReq(ino=f1.ino, ctx=ROOT, size=700))  # counted in both directories
    agree()
    env.core.rename(RenameReq(parent=b.ino, name=b"f2", new_parent=c.ino, new_name=b"f2", ctx=ROOT))
    env.core.rename(RenameReq(parent=c.ino, name=b"f2", new_parent=c.ino, new_name=b"empty", ctx=ROOT))
    env.core.rename(RenameReq(parent=c.ino, name=b"f1-again", new_parent=a.ino, new_name=b"f1", ctx=ROOT))
    agree()
    g = env.create(a.ino, b"g", session=s)
    env.write(g.ino, s, 0, 4096)
    env.core.rename(RenameReq(parent=a.ino, name=b"g", new_parent=c.ino, new_name=b"empty", ctx=ROOT,
                              flags=RENAME_EXCHANGE))
    env.core.rename(RenameReq(parent=a.ino, name=b"b", new_parent=c.ino, new_name=b"b", ctx=ROOT))
    agree()
    env.core.open(OpenReq(ino=g.ino, session=s))
    env.core.unlink(RemoveReq(parent=c.ino, name=b"empty", ctx=ROOT))  # g, still open
    env.write(g.ino, s, 1, 10)  # grows an unlinked file: no directory counts it
    env.core.unlink(RemoveReq(parent=c.ino, name=b"f1-third", ctx=ROOT))
    agree()
    env.reopen()
    agree()
    assert usage(env, ROOT_INODE)[2] == 4
    rep = env.core.fsck(FsckReq())
    assert rep.problems == []
    with env.core.store.transaction() as tx:
        tx.run("UPDATE inodes SET used_bytes = used_bytes + 7, used_files = 0 WHERE ino = ?", (a.ino,))
    rep = env.core.fsck(FsckReq())
    assert any("usage" in p or f"directory {a.ino}" in p for p in rep.problems)
    rep = env.core.fsck(FsckReq(repair=True))
    assert len(rep.repaired) == len(rep.problems) == 1
    agree()
    from stripefs.proto.messages import UsageReq

    closed = env.mkdir(ROOT_INODE, b"closed", mode=0o300)  # not readable by USER
    fails(errno.EACCES, env.core.usage, UsageReq(ino=closed.ino, ctx=USER))


def test_an_open_is_registered_again_with_its_grant_whatever_the_mode_says_now(env):
    """A client that lost its session registers its open handles again in a new one. A
    file created 0444 by its writer (git's objects are) is open for writing although its
    mode lets nobody but root write: without proof, that open fails the check, and the
    handle's writes fail after the replacement. The grant a recorded open comes with is
    that proof: for that client, that inode and that access only, never for a truncate."""
    env.open_root()
    env.add_server(1)
    node1, node2 = Caller(CLIENT, "node1"), Caller(CLIENT, "node2")
    old, new, theirs = (env.core.open_session(SessionOpenReq(host="h", mountpoint="/m"), c).session
                        for c in (node1, node1, node2))
    created = env.core.mknod(MknodReq(parent=ROOT_INODE, name=b"obj", mode=stat.S_IFREG | 0o444, ctx=USER,
                                      session=old), node1)
    ino, grant = created.attr.ino, created.grant
    assert grant
    fails(errno.EACCES, lambda r: env.core.open(r, node1), OpenReq(ino, new, USER, os.O_WRONLY))
    reopened = env.core.open(OpenReq(ino, new, USER, os.O_WRONLY, grant=grant), node1)
    assert reopened.recorded and reopened.grant == grant
    # The handle writes on in the new session (EBADF without the open: not open for writing).
    assert env.core.alloc_blocks(AllocReq(ino=ino, session=new, indexes=[0]), node1).allocations
    # Another client, a forged grant, a truncate: the permission check as ever.
    fails(errno.EACCES, lambda r: env.core.open(r, node2), OpenReq(ino, theirs, USER, os.O_WRONLY, grant=grant))
    forged = bytes(len(grant))
    fails(errno.EACCES, lambda r: env.core.open(r, node1), OpenReq(ino, new, USER, os.O_WRONLY, grant=forged))
    fails(errno.EACCES, lambda r: env.core.open(r, node1),
          OpenReq(ino, new, USER, os.O_WRONLY | os.O_TRUNC, grant=grant))
    # A grant for reading lets nobody write; one for writing lets its holder read too.
    env.core.setattr(SetattrReq(ino=ino, ctx=ROOT, mode=0o404))
    read = env.core.open(OpenReq(ino, theirs, OTHER, os.O_RDONLY), node2)
    assert read.grant and read.grant != grant
    env.core.setattr(SetattrReq(ino=ino, ctx=ROOT, mode=0o000))
    assert env.core.open(OpenReq(ino, theirs, OTHER, os.O_RDONLY, grant=read.grant), node2).recorded
    fails(errno.EACCES, lambda r: env.core.open(r, node2), OpenReq(ino, theirs, OTHER, os.O_WRONLY, grant=read.grant))
    assert env.core.open(OpenReq(ino, new, USER, os.O_RDONLY, grant=grant), node1).recorded
    # An unrecorded open (a reader's of a file with blocks) comes with one too: its client
    # records it later (after record_open_after_s), when the mode may say otherwise.
    unrecorded = env.core.open(OpenReq(ino, new, ROOT, os.O_RDONLY, unrecorded_ok=True), node1)
    assert not unrecorded.recorded and unrecorded.grant == env.core._open_grant(ino, False, node1)


def test_a_release_abandons_only_its_own_sessions_allocations_of_that_file(env):
    """ReleaseReq.abandon (a writer's last close gives back the blocks it allocated ahead
    and never reached): each becomes garbage at once, where the server it was placed on
    is told to drop it, and can no longer be committed; an id of another session's
    allocation, or of another file's, is ignored."""
    env.add_server(1)
    s1, s2 = env.session(), env.session()
    f, g = env.create(ROOT_INODE, b"f"), env.create(ROOT_INODE, b"g")
    a, b = env.core.alloc_blocks(AllocReq(ino=f.ino, session=s1, indexes=[0, 1])).allocations
    (c,) = env.core.alloc_blocks(AllocReq(ino=g.ino, session=s1, indexes=[0])).allocations

    def pending() -> set[int]:
        with env.core.store.transaction() as tx:
            return {r[0] for r in tx.all("SELECT block_id FROM pending")}

    env.core.release(ReleaseReq(ino=f.ino, session=s2, abandon=[a.block_id, b.block_id]))  # not s2's
    env.core.release(ReleaseReq(ino=f.ino, session=s1, abandon=[c.block_id]))  # not f's
    assert pending() == {a.block_id, b.block_id, c.block_id}
    env.core.release(ReleaseReq(ino=f.ino, session=s1, abandon=[a.block_id]))
    assert pending() == {b.block_id, c.block_id}
    with pytest.raises(FsError):
        env.core.commit_blocks(CommitReq(ino=f.ino, session=s1, size=10, mtime_ns=1,
                                         blocks=[BlockRef(index=0, block_id=a.block_id, length=10, servers=a.servers)]))
    env.clock.advance(31)
    assert a.block_id in env.beat(1).delete
    assert ReleaseReq(ino=f.ino, session=s1, abandon=list(range(4097))).valid()
