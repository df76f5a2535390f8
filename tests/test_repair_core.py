"""Failure handling in the metadata core, in process with an injected clock: server
states, placement around failed servers, re-replication planning and hand-out, corrupt
and bad-replica reports, block report reconciliation, and fsck."""

from __future__ import annotations

import errno
import stat

import pytest

from stripefs.metaserver.core import MetaCore
from stripefs.proto.auth import check_write_token
from stripefs.proto.errors import FsError
from stripefs.proto.messages import (
    AllocReq,
    BadReplicaReq,
    BlockMapReq,
    BlockRef,
    BlockReportReq,
    CommitReq,
    Ctx,
    Empty,
    FsckReq,
    HeartbeatReq,
    MkdirReq,
    MknodReq,
    RegisterReq,
    ReplicatedReq,
    SessionOpenReq,
)
from stripefs.proto.types import ROOT_INODE

from engines import meta_engine, open_meta_store  # noqa: F401 - fixtures
from fakeclock import Clock

pytestmark = pytest.mark.timeout(60)

SECRET = b"0123456789abcdef0123456789abcdef"
GiB = 1024**3
ROOT = Ctx(uid=0, gid=0)


class Env:
    def __init__(self, open_store, **kw) -> None:
        self.open_store = open_store  # a new Store on the test's database at each call
        self.kw = kw
        self.clock = Clock()
        self.core = self.open()
        self.servers: dict[int, int] = {}  # n -> server id
        self.session = self.core.open_session(SessionOpenReq(host="h", mountpoint="/m")).session

    def open(self) -> MetaCore:
        return MetaCore(self.open_store(), SECRET, clock=self.clock, **self.kw)

    def reopen(self) -> None:
        self.core.close()
        self.core = self.open()

    def add(self, n: int, free: int = 100 * GiB) -> int:
        sid = self.core.register(
            RegisterReq(address=addr(n), node_id=f"node-{n}", capacity_bytes=200 * GiB, free_bytes=free, blocks=0)
        ).server_id
        self.servers[n] = sid
        return sid

    def beat(self, n: int, free: int = 100 * GiB, corrupt: list[int] | None = None,
             verified: list[int] | None = None):
        return self.core.heartbeat(
            HeartbeatReq(server_id=self.servers[n], capacity_bytes=200 * GiB, free_bytes=free, blocks=0,
                         corrupt=corrupt or [], verified=verified or [])
        )

    def beat_all(self, *ns: int):
        return {n: self.beat(n) for n in ns}

    def create(self, name: bytes, parent: int = ROOT_INODE):
        return self.core.mknod(MknodReq(parent=parent, name=name, mode=stat.S_IFREG | 0o644, ctx=ROOT)).attr

    def write(self, ino: int, indexes: list[int], exclude: list[str] | None = None):
        allocs = self.core.alloc_blocks(
            AllocReq(ino=ino, session=self.session, indexes=indexes, exclude=exclude or [])
        ).allocations
        refs = [BlockRef(index=a.index, block_id=a.block_id, length=100, servers=a.servers) for a in allocs]
        self.core.commit_blocks(CommitReq(ino=ino, session=self.session, blocks=refs,
                                          size=max(indexes) * 4 * 1024 * 1024 + 100, mtime_ns=1))
        return allocs

    def block_map(self, ino: int):
        return self.core.block_map(BlockMapReq(ino=ino)).blocks

    def status(self):
        return self.core.status(Empty())

    def report(self, n: int, block_ids: list[int]):
        self.core.block_report(BlockReportReq(server_id=self.servers[n], block_ids=block_ids))


def addr(n: int) -> str:
    return f"10.0.0.{n}:7000"


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


def kill(env: Env, dead: int, alive: list[int], seconds: float = 11.0) -> None:
    """Let `dead` go silent for `seconds` while the others keep beating."""
    step = 1.0
    t = 0.0
    while t < seconds:
        env.clock.advance(step)
        t += step
        for n in alive:
            env.beat(n)


# --------------------------------------------------------------------------- states, placement


def test_states_and_placement(env):
    for n in (1, 2, 3):
        env.add(n)
    f = env.create(b"f")
    env.clock.advance(2)
    env.beat_all(1, 2)
    env.clock.advance(2)  # 3: silent 4 s -> suspect
    env.beat_all(1, 2)
    states = {s.address: s.state for s in env.status().servers}
    assert states == {addr(1): "up", addr(2): "up", addr(3): "suspect"}
    allocs = env.core.alloc_blocks(AllocReq(ino=f.ino, session=env.session, indexes=list(range(6)))).allocations
    assert all(addr(3) not in a.servers and len(a.servers) == 2 for a in allocs)
    # Exclusions leave one server: R=2 becomes 1 rather than failing the writer.
    (a,) = env.core.alloc_blocks(AllocReq(ino=f.ino, session=env.session, indexes=[0], exclude=[addr(1)])).allocations
    assert a.servers == [addr(2)]
    # No up server left: the suspect one (its heartbeats may be what is missing), then EIO.
    (a,) = env.core.alloc_blocks(AllocReq(ino=f.ino, session=env.session, indexes=[0],
                                          exclude=[addr(1), addr(2)])).allocations
    assert a.servers == [addr(3)]
    fails(errno.EIO, env.core.alloc_blocks, AllocReq(ino=f.ino, session=env.session, indexes=[0],
                                                     exclude=[addr(1), addr(2), addr(3)]))
    # Full: ENOSPC only when no up server (after exclusions) has room.
    env.beat(1, free=1024)
    (a,) = env.core.alloc_blocks(AllocReq(ino=f.ino, session=env.session, indexes=[0])).allocations
    assert a.servers == [addr(2)]
    env.beat(2, free=1024)
    fails(errno.ENOSPC, env.core.alloc_blocks, AllocReq(ino=f.ino, session=env.session, indexes=[0]))
    env.clock.advance(7)  # 3: silent 11 s -> dead
    env.beat_all(1, 2)
    assert {s.address: s.state for s in env.status().servers}[addr(3)] == "dead"


def test_reserve_bytes(open_meta_store):
    e = Env(open_meta_store, reserve_bytes=10 * GiB)
    try:
        e.add(1, free=9 * GiB)
        e.add(2, free=11 * GiB)
        f = e.create(b"f")
        (a,) = e.core.alloc_blocks(AllocReq(ino=f.ino, session=e.session, indexes=[0])).allocations
        assert a.servers == [addr(2)]
    finally:
        e.core.close()


def test_block_map_lists_live_replicas_first(env):
    for n in (1, 2, 3):
        env.add(n)
    f = env.create(b"f")
    allocs = env.write(f.ino, list(range(6)))
    primaries = {a.servers[0] for a in allocs}
    assert len(primaries) == 3  # striped
    kill(env, 1, [2, 3], seconds=5)  # 1 suspect
    for ref in env.block_map(f.ino):
        if addr(1) in ref.servers:
            assert ref.servers[-1] == addr(1)


def test_no_server_looks_dead_right_after_a_restart(env):
    for n in (1, 2):
        env.add(n)
    env.clock.advance(60)  # the metaserver was down for a minute
    env.reopen()
    assert {s.state for s in env.status().servers} == {"up"}
    env.clock.advance(11)
    assert {s.state for s in env.status().servers} == {"dead"}


# --------------------------------------------------------------------------- re-replication


def test_rereplication_after_a_server_dies(env):
    for n in (1, 2, 3):
        env.add(n)
    f = env.create(b"f")
    allocs = env.write(f.ino, list(range(6)))
    on1 = [a.block_id for a in allocs if addr(1) in a.servers]
    assert on1 and env.status().under_replicated == 0
    kill(env, 1, [2, 3])
    st = env.status()
    assert (st.under_replicated, st.lost) == (len(on1), 0)
    assert env.core.sweep()["replication_tasks_planned"] == len(on1)
    assert env.core.sweep()["replication_tasks_planned"] == 0  # in flight: not planned twice
    copied: dict[int, int] = {}
    for n in (2, 3):
        for task in env.beat(n).replicate:
            assert check_write_token(SECRET, task.block_id, "admin:local", addr(n), task.token, env.clock.t)
            assert task.sources and addr(1) not in task.sources and addr(n) not in task.sources
            copied[task.block_id] = n
    assert sorted(copied) == sorted(on1)
    assert set(copied.values()) == {2, 3} or len(on1) == 1  # spread over the survivors
    for n in (2, 3):
        env.core.replicated(ReplicatedReq(server_id=env.servers[n],
                                          block_ids=[b for b, t in copied.items() if t == n]))
    st = env.status()
    assert (st.under_replicated, st.lost) == (0, 0)
    for ref in env.block_map(f.ino):
        assert len(ref.servers) == 2 and addr(1) not in ref.servers
    # Server 1 comes back: its old copies are garbage (after the grace), and it is asked
    # for a block report.
    env.clock.advance(31)
    reply = env.beat(1)
    assert sorted(reply.delete) == sorted(on1) and reply.block_report


def test_a_server_back_while_its_blocks_are_copied_leaves_r_copies(env):
    """A server judged dead that comes back (a slow restart) while its blocks are being
    copied elsewhere: a copy that lands after its return makes three of R = 2, and the
    one on the fullest server goes to garbage; a task not handed out yet is dropped."""
    for n in (1, 2, 3):
        env.add(n)
    f = env.create(b"f")
    allocs = env.write(f.ino, list(range(12)))
    on1 = sorted(a.block_id for a in allocs if addr(1) in a.servers)
    assert len(on1) >= 2
    kill(env, 1, [2, 3])
    assert env.core.sweep()["replication_tasks_planned"] == len(on1)
    copied = {t.block_id: 2 for t in env.beat(2).replicate}
    assert copied and len(copied) < len(on1)  # the rest wait for server 3's beat
    env.beat(1)  # back, with every copy it had
    env.report(1, on1)
    assert env.beat(3).replicate == []  # back at R since queued: not handed out
    env.beat(2, free=50 * GiB)  # the fullest server
    env.core.replicated(ReplicatedReq(server_id=env.servers[2], block_ids=sorted(copied)))
    st = env.status()
    assert (st.under_replicated, st.lost) == (0, 0)
    for ref in env.block_map(f.ino):
        assert len(ref.servers) == 2, ref
        if ref.block_id in copied:  # on 1 and 3, copied to 2
            assert sorted(ref.servers) == [addr(1), addr(3)], ref
    assert env.core.sweep()["replication_tasks_planned"] == 0
    env.clock.advance(31)
    env.beat_all(1, 3)
    assert set(env.beat(2, free=50 * GiB).delete) == set(copied)


def test_fsck_reports_and_trims_copies_beyond_r(env):
    """A block with three copies of R = 2 (as the race above left them before copies that
    land were trimmed): fsck reports it, and its repair drops the newest on a tie of room,
    as garbage."""
    for n in (1, 2, 3):
        env.add(n)
    f = env.create(b"f")
    (a,) = env.write(f.ino, [0])
    (extra,) = [n for n in (1, 2, 3) if addr(n) not in a.servers]
    with env.core.store.transaction() as tx:
        tx.run("INSERT INTO replicas (block_id, server_id, rank, created_ns) VALUES (?, ?, 5, 0)",
               (a.block_id, env.servers[extra]))
    assert len(env.block_map(f.ino)[0].servers) == 3
    assert env.core.fsck(FsckReq()).problems == ["1 blocks over-replicated"]
    fixed = env.core.fsck(FsckReq(repair=True))
    assert fixed.repaired == ["copies beyond the replica count of 1 blocks sent to garbage"]
    assert env.core.fsck(FsckReq()).problems == []
    assert env.block_map(f.ino)[0].servers == a.servers
    env.clock.advance(31)
    env.beat_all(*(n for n in (1, 2, 3) if n != extra))
    assert env.beat(extra).delete == [a.block_id]


def test_tasks_of_a_target_that_dies_are_planned_again_elsewhere(env):
    """A copy queued for a server that then stops answering is not left waiting for the
    task timeout: once the target is not up its queued tasks are dropped, once dead its
    sent ones too, and the blocks are planned on a live server."""
    for n in (1, 2, 3, 4):
        env.add(n)
    f = env.create(b"f")
    allocs = env.write(f.ino, list(range(8)))
    on1 = sorted(a.block_id for a in allocs if addr(1) in a.servers)
    kill(env, 1, [2, 3, 4])
    assert env.core.sweep()["replication_tasks_planned"] == len(on1)
    targets = {}
    for n in (2, 3, 4):
        for task in env.beat(n).replicate:
            targets[task.block_id] = n
    assert sorted(targets) == on1
    victim = max({*targets.values()}, key=lambda n: sum(t == n for t in targets.values()))
    lost_tasks = sorted(b for b, n in targets.items() if n == victim)
    kill(env, victim, [m for m in (2, 3, 4) if m != victim])  # dead before it reports
    env.core.sweep()
    again = {}
    for n in (2, 3, 4):
        if n != victim:
            for task in env.beat(n).replicate:
                again[task.block_id] = n
    # Planned again at once, not after the 60 s task timeout (with the blocks that lost
    # their copy on the victim too).
    assert set(lost_tasks) <= set(again) and victim not in again.values()


def test_replication_rate_bound_timeout_and_failure(open_meta_store):
    e = Env(open_meta_store, replication_per_heartbeat=3, replication_timeout_s=20)
    try:
        for n in (1, 2, 3):
            e.add(n)
        f = e.create(b"f")
        e.write(f.ino, list(range(20)))
        kill(e, 1, [2, 3])
        under = e.status().under_replicated
        assert under > 6
        assert e.core.sweep()["replication_tasks_planned"] == 6  # 3 per target
        t2 = e.beat(2).replicate
        assert len(t2) == 3 and e.beat(2).replicate == []
        # One copy fails, one is done, one is never reported on.
        sid2 = e.servers[2]
        e.core.replicated(ReplicatedReq(server_id=sid2, block_ids=[t2[0].block_id], failed=[t2[1].block_id]))
        assert e.core.sweep()["replication_tasks_planned"] == 2
        e.clock.advance(21)
        e.beat_all(2, 3)
        done = e.core.sweep()
        assert done["replication_tasks_timed_out"] >= 1 and done["replication_tasks_planned"] > 0
    finally:
        e.core.close()


def test_corrupt_copy_reported_by_heartbeat_is_replaced(env):
    for n in (1, 2, 3):
        env.add(n)
    f = env.create(b"f")
    (a,) = env.write(f.ino, [0])
    holder = int(a.servers[0].split(".")[3].split(":")[0])
    env.beat(holder, corrupt=[a.block_id])
    (ref,) = env.block_map(f.ino)
    assert a.servers[0] not in ref.servers
    assert env.status().under_replicated == 1
    env.core.sweep()
    # Any server without a good copy may take it (the one that found the bad copy too).
    (task,) = [t for n in (1, 2, 3) if addr(n) != a.servers[1] for t in env.beat(n).replicate]
    assert task.block_id == a.block_id and task.sources == [a.servers[1]]


def test_bad_replica_reports_are_verified_by_the_server_that_holds_the_copy(env):
    """A client's report never deletes a copy: the server holding it is asked to check it
    (HeartbeatReply.verify); only its own report of a bad copy drops the replica."""
    for n in (1, 2):
        env.add(n)
    f = env.create(b"f")
    (a,) = env.write(f.ino, [0])
    n0 = 1 if a.servers[0] == addr(1) else 2
    n1 = 3 - n0
    fails(errno.EINVAL, env.core.report_bad_replica, BadReplicaReq(block_id=a.block_id, address=addr(1), reason="x"))
    env.core.report_bad_replica(BadReplicaReq(block_id=a.block_id, address=addr(1), reason="unreachable"))
    env.core.report_bad_replica(BadReplicaReq(block_id=a.block_id, address=a.servers[0], reason="corrupt"))
    env.core.report_bad_replica(BadReplicaReq(block_id=a.block_id, address=a.servers[1], reason="missing"))
    env.core.report_bad_replica(BadReplicaReq(block_id=999, address="nowhere:1", reason="missing"))
    assert len(env.block_map(f.ino)[0].servers) == 2  # nothing dropped on a client's word
    assert env.beat(n0).verify == [a.block_id] and env.beat(n1).verify == [a.block_id]
    assert env.beat(n0).verify == []  # handed out once (again only after a task timeout)
    # The copy on n1 checks out; the one on n0 is corrupt: n0 says so itself.
    env.beat(n1, verified=[a.block_id])
    env.beat(n0, corrupt=[a.block_id])
    assert env.block_map(f.ino)[0].servers == [a.servers[1]]
    with env.core.store.transaction() as tx:
        assert tx.scalar("SELECT COUNT(*) FROM verify") == 0


# --------------------------------------------------------------------------- block reports


def test_block_report_reconciliation(env):
    for n in (1, 2, 3):
        env.add(n)
    assert env.beat(1).block_report  # asked at registration
    env.report(1, [])
    assert not env.beat(1).block_report
    f = env.create(b"f")
    allocs = env.write(f.ino, [0, 1, 2])
    env.clock.advance(1)
    env.add(1)  # restarted: asked again
    (pending,) = env.core.alloc_blocks(AllocReq(ino=f.ino, session=env.session, indexes=[5])).allocations
    on1 = [a.block_id for a in allocs if addr(1) in a.servers]
    not_on1 = [a.block_id for a in allocs if addr(1) not in a.servers]
    assert on1 and not_on1
    # Server 1 lost one of its copies, holds a stray unknown block, a copy of a block it
    # is not a replica of (fully replicated elsewhere), and maybe the pending block.
    lost_copy = on1[0]
    listed = [b for b in on1 if b != lost_copy] + [424242, not_on1[0]]
    if addr(1) in pending.servers:
        listed.append(pending.block_id)
    env.core.block_report(BlockReportReq(server_id=env.servers[1], block_ids=listed[:1], first=True, last=False))
    # A replica added after the report was asked for is not judged by it (the server
    # may have listed its blocks before storing it).
    g = env.create(b"g")
    late = [a.block_id for a in env.write(g.ino, [0, 1])]
    env.core.block_report(BlockReportReq(server_id=env.servers[1], block_ids=listed[1:], first=False, last=True))
    servers = {r.block_id: r.servers for r in env.block_map(f.ino) + env.block_map(g.ino)}
    assert all(len(servers[b]) == 2 for b in late)
    assert addr(1) not in servers[lost_copy]
    assert addr(1) not in servers[not_on1[0]]
    assert not env.beat(1).block_report  # done
    env.clock.advance(31)
    env.beat_all(2, 3)
    delete = env.beat(1).delete
    assert 424242 in delete and not_on1[0] in delete and pending.block_id not in delete
    assert lost_copy not in delete
    # The lost copy is re-made.
    assert env.status().under_replicated == 1


def test_block_report_adopts_a_copy_of_an_under_replicated_block(env):
    for n in (1, 2):
        env.add(n)
    f = env.create(b"f")
    (a,) = env.write(f.ino, [0])
    env.beat(1, corrupt=[a.block_id]) if a.servers[0] == addr(1) else env.beat(2, corrupt=[a.block_id])
    assert env.status().under_replicated == 1
    # The server that "lost" it reports holding a copy (say a good one turned up again).
    n = 1 if a.servers[0] == addr(1) else 2
    env.report(n, [a.block_id])
    assert env.status().under_replicated == 0
    assert sorted(env.block_map(f.ino)[0].servers) == sorted(a.servers)


# --------------------------------------------------------------------------- fsck


def test_fsck_clean_finds_and_repairs(env):
    for n in (1, 2):
        env.add(n)
    d = env.core.mkdir(MkdirReq(parent=ROOT_INODE, name=b"d", mode=0o755, ctx=ROOT)).attr
    f = env.create(b"f", parent=d.ino)
    env.write(f.ino, [0, 1])
    g = env.create(b"g")
    clean = env.core.fsck(FsckReq())
    assert clean.problems == [] and clean.repaired == [] and clean.inodes == 4 and clean.blocks == 2
    # Damage the store behind the core's back, as a bug or a bad disk might.
    with env.core.store.transaction() as tx:
        tx.run("UPDATE inodes SET nlink = 5 WHERE ino = ?", (g.ino,))
        tx.run("UPDATE inodes SET parent = ? WHERE ino = ?", (g.ino, d.ino))
        tx.run("INSERT INTO inodes (mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns, block_size)"
               " VALUES (?, 0, 0, 0, 0, 0, 0, 65536)", (stat.S_IFREG | 0o644,))
        tx.run("INSERT INTO pending (block_id, ino, idx, session_id, created_ns) VALUES (9999, ?, 7, 1, 0)",
               (f.ino,))
    # Rows no foreign key would let in: with the keys off (SQLite), or dropped (PostgreSQL,
    # where turning them off takes a superuser).
    if env.core.store.engine == "sqlite":
        env.core.store._conn.execute("PRAGMA foreign_keys = OFF")
    else:
        with env.core.store.transaction() as tx:
            tx.run("ALTER TABLE dentries DROP CONSTRAINT dentries_ino_fkey")
            tx.run("ALTER TABLE garbage DROP CONSTRAINT garbage_server_id_fkey")
    with env.core.store.transaction() as tx:
        tx.run("INSERT INTO dentries (parent, name, ino) VALUES (?, ?, 777777)", (ROOT_INODE, b"dangling"))
        tx.run("INSERT INTO garbage (block_id, server_id, not_before_ns) VALUES (5, 99, 0)")
    if env.core.store.engine == "sqlite":
        env.core.store._conn.execute("PRAGMA foreign_keys = ON")
    report = env.core.fsck(FsckReq())
    text = "\n".join(report.problems)
    assert report.repaired == []
    for needle in ("dangling", f"inode {g.ino} has nlink 5", f"directory {d.ino} has parent",
                   "no links and is not open", "past the pending timeout", "unknown server 99"):
        assert needle in text, (needle, text)
    fixed = env.core.fsck(FsckReq(repair=True))
    assert len(fixed.repaired) == len(fixed.problems) > 0
    again = env.core.fsck(FsckReq())
    assert again.problems == [], again.problems


def test_fsck_reports_under_replicated_and_lost(env):
    for n in (1, 2, 3):
        env.add(n)
    f = env.create(b"f")
    allocs = env.write(f.ino, [0, 1, 2])
    both = [a.block_id for a in allocs if addr(3) not in a.servers]
    assert len(both) == 1  # striped pairs over three servers
    # Only server 3 keeps beating: with one server alive a block needs one replica, so the
    # block without a copy on 3 is lost (and under-replicated), the others are fine.
    kill(env, 1, [3])
    report = env.core.fsck(FsckReq())
    assert (report.lost, report.under_replicated) == (1, 1)
    assert any("lost" in p for p in report.problems)
    fixed = env.core.fsck(FsckReq(repair=True))
    assert len(fixed.repaired) < len(fixed.problems)
    # Server 2 is back: the block is merely under-replicated, and fsck --repair schedules it.
    env.beat(2)
    fixed = env.core.fsck(FsckReq(repair=True))
    assert fixed.lost == 0 and fixed.under_replicated >= 1
    assert len(fixed.repaired) == len(fixed.problems) == 1


def test_long_dead_servers_are_forgotten(env):
    for n in (1, 2, 3):
        env.add(n)
    f = env.create(b"f")
    (a,) = env.write(f.ino, [0])
    dead = next(n for n in (1, 2, 3) if addr(n) in a.servers)
    alive = [n for n in (1, 2, 3) if n != dead]
    for _ in range(25):  # a day passes, in hours; the others keep beating
        env.clock.advance(3600)
        env.beat_all(*alive)
        env.core.sweep()
    assert env.core.sweep()["servers_forgotten"] == 0  # it went in an earlier sweep
    assert {s.address for s in env.status().servers} == {addr(n) for n in alive}
    assert addr(dead) not in env.block_map(f.ino)[0].servers
    # Back: it registers anew (a new id), and is asked what it holds.
    env.add(dead)
    assert env.beat(dead).block_report
