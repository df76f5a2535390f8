"""Failure handling against real processes on loopback (tests/cluster.py): a SIGKILLed
data server's blocks get back to R live copies, a returning server's stale copies are
deleted, scrubbing replaces a block with a flipped byte, a block report reconciles a
restarted server's disk, a server back during its repair leaves R copies, and `stripefs
fsck` reports and repairs.

Files are written through proto stubs as the client library would (alloc, put to every
replica, commit), with 64 KiB blocks so that many blocks cost little. Timeouts are short
(suspect after 1 s, dead after 3 s, GC grace 1 s) so that repairs happen within seconds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import time

import pytest
from cluster import REPO_ROOT, Cluster, cli, put_block
from faults import block_files

from stripefs.proto.credentials import load_credentials
from stripefs.proto.errors import FsError
from stripefs.proto.messages import (
    AllocReq,
    BlockMapReq,
    BlockRef,
    CommitReq,
    Ctx,
    GetBlockReq,
    MkdirReq,
    MknodReq,
    SessionOpenReq,
    XattrReq,
)
from stripefs.proto.rpc import Stub
from stripefs.proto.services import DATA_METHODS, DATA_SERVICE, META_METHODS, META_SERVICE
from stripefs.proto.types import LAYOUT_XATTR_BLOCK_SIZE, ROOT_INODE

pytestmark = pytest.mark.timeout(120)

BLOCK_BYTES = 64 * 1024
#: What these tests promise: R copies back on live servers within this long after a
#: failure is detected (dead after 3 s; a sweep and a heartbeat a second each).
REPAIR_WITHIN_S = 30.0
META_FLAGS = ["--server-suspect-after-s", "1", "--server-dead-after-s", "3", "--gc-grace-s", "1"]


class Writer:
    """Writes and reads files as the client library does, through the wire contract."""

    def __init__(self, cluster: Cluster) -> None:
        self.creds = load_credentials(cluster.client)
        self.meta = Stub(cluster.meta_addr, self.creds, META_SERVICE, META_METHODS)
        self.session = self.meta.call("open_session", SessionOpenReq(host="test", mountpoint="-")).session
        self._data: dict[str, Stub] = {}
        d = self.meta.call("mkdir", MkdirReq(parent=ROOT_INODE, name=b"small", mode=0o755, ctx=Ctx())).attr
        self.meta.call("setxattr", XattrReq(ino=d.ino, name=LAYOUT_XATTR_BLOCK_SIZE, value=str(BLOCK_BYTES).encode()))
        self.dir = d.ino

    def close(self) -> None:
        for stub in [self.meta, *self._data.values()]:
            stub.close()

    def data(self, address: str) -> Stub:
        if address not in self._data:
            self._data[address] = Stub(address, self.creds, DATA_SERVICE, DATA_METHODS)
        return self._data[address]

    def write_file(self, name: bytes, nblocks: int) -> tuple[int, bytes]:
        # Created open for writing in our session, as a client's create: what lets the
        # session allocate and commit blocks, and read the map, of the file.
        attr = self.meta.call("mknod", MknodReq(parent=self.dir, name=name, mode=0o100644, ctx=Ctx(),
                                                session=self.session)).attr
        content = os.urandom(nblocks * BLOCK_BYTES - 100)
        allocs = self.meta.call(
            "alloc_blocks", AllocReq(ino=attr.ino, session=self.session, indexes=list(range(nblocks)))
        ).allocations
        refs = []
        for a in allocs:
            piece = content[a.index * BLOCK_BYTES : (a.index + 1) * BLOCK_BYTES]
            reply = put_block(self.data(a.servers[0]), a.block_id, a.servers, a.tokens, piece)
            assert reply.stored == a.servers, reply
            refs.append(BlockRef(index=a.index, block_id=a.block_id, length=len(piece), servers=a.servers))
        self.meta.call("commit_blocks", CommitReq(ino=attr.ino, session=self.session, blocks=refs,
                                                  size=len(content), mtime_ns=time.time_ns()))
        return attr.ino, content

    def block_map(self, ino: int) -> list[BlockRef]:
        return self.meta.call("block_map", BlockMapReq(ino=ino, session=self.session)).blocks

    def check_every_replica(self, ino: int, content: bytes) -> bool:
        """Every listed replica of every block holds the right bytes. A copy that is missing
        raises FsError (the block map lags a data server's report by up to one heartbeat:
        callers wait); a copy with wrong bytes fails at once."""
        for ref in self.block_map(ino):
            want = content[ref.index * BLOCK_BYTES : ref.index * BLOCK_BYTES + ref.length]
            for server in ref.servers:
                got = self.data(server).call("get_block", GetBlockReq(block_id=ref.block_id, token=ref.token)).data
                assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), (ref, server)
        return True


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except FsError as exc:  # a server coming or going
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s} s: {what} (last: {last!r})")


def fsck(cluster: Cluster, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli("fsck", "--meta", cluster.meta_addr, "--credentials", str(cluster.admin), *flags),
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )


@pytest.fixture
def fast_cluster(tmp_path):
    c = Cluster(tmp_path / "cluster", dataservers=3, meta_args=META_FLAGS,
                data_args=["--heartbeat-interval-s", "0.3"])
    w = None
    try:
        w = Writer(c)
        yield c, w
    finally:
        if w is not None:
            w.close()
        c.close()


def fully_replicated(cluster: Cluster, w: Writer, ino: int, avoid: str | None = None) -> bool:
    st = cluster.status()
    if st["under_replicated"] or st["lost"]:
        return False
    return all(len(r.servers) == 2 and avoid not in r.servers for r in w.block_map(ino))


def test_sigkilled_server_rereplicated_and_its_stale_copies_deleted_on_return(fast_cluster):
    c, w = fast_cluster
    ino, content = w.write_file(b"f", 24)
    dead = c.data[0].address
    on_dead = [r.block_id for r in w.block_map(ino) if dead in r.servers]
    assert on_dead
    c.kill_data(0, signal.SIGKILL)
    wait_for(lambda: any(s["state"] == "dead" for s in c.status()["servers"]), 10, "server seen dead")
    wait_for(lambda: c.status()["under_replicated"] == 0 and fully_replicated(c, w, ino, avoid=dead),
             REPAIR_WITHIN_S, "R=2 live copies of every block")
    wait_for(lambda: w.check_every_replica(ino, content), REPAIR_WITHIN_S, "every listed replica right")
    assert fsck(c).returncode == 0
    # Back on its old directory: its copies were re-made elsewhere, so they are garbage.
    c.start_data(0)
    data_dir = c.base / "data-0"
    wait_for(lambda: not (set(block_files(data_dir)) & set(on_dead)), REPAIR_WITHIN_S, "stale copies deleted")
    assert fully_replicated(c, w, ino)
    wait_for(lambda: w.check_every_replica(ino, content), REPAIR_WITHIN_S, "every listed replica right")


def test_scrub_replaces_a_flipped_byte(tmp_path):
    c = Cluster(tmp_path / "cluster", dataservers=3, meta_args=META_FLAGS,
                data_args=["--heartbeat-interval-s", "0.3", "--scrub-rate-mib-s", "64", "--scrub-interval-s", "1"])
    w = None
    try:
        w = Writer(c)
        ino, content = w.write_file(b"f", 4)
        ref = w.block_map(ino)[1]
        victim = next(i for i, p in enumerate(c.data) if p.address == ref.servers[0])
        data_dir = c.base / f"data-{victim}"
        path = block_files(data_dir)[ref.block_id]
        raw = bytearray(path.read_bytes())
        raw[-1000] ^= 0x10  # in the data, far from the header
        path.write_bytes(bytes(raw))
        wait_for(lambda: list((data_dir / "corrupt").glob(f"{ref.block_id}.*")), 20, "corrupt copy moved aside")

        # The metaserver hears of the bad copy with the victim's next heartbeat: until then
        # the block still looks fully replicated. Wait for the whole repair to be visible.
        def repaired() -> bool:
            return (fully_replicated(c, w, ino) and w.check_every_replica(ino, content)
                    and fsck(c).returncode == 0)

        wait_for(repaired, REPAIR_WITHIN_S, "block re-replicated, every replica right, fsck clean")
    finally:
        if w is not None:
            w.close()
        c.close()


def test_block_report_reconciles_a_restarted_server(fast_cluster):
    c, w = fast_cluster
    ino, content = w.write_file(b"f", 9)
    data_dir = c.base / "data-1"
    addr1 = c.data[1].address
    mine = [r.block_id for r in w.block_map(ino) if addr1 in r.servers]
    assert mine
    c.kill_data(1)  # SIGTERM; restarted before it is judged dead
    files = block_files(data_dir)
    files[mine[0]].unlink()  # a copy lost with the disk
    stray = data_dir / "blocks" / f"{987654 % 256:02x}" / "987654"
    stray.write_bytes(files[mine[1]].read_bytes())  # a block nobody references
    c.start_data(1)
    wait_for(lambda: not stray.exists(), REPAIR_WITHIN_S, "stray block deleted")
    wait_for(lambda: fully_replicated(c, w, ino), REPAIR_WITHIN_S, "lost copy re-made")
    wait_for(lambda: w.check_every_replica(ino, content), REPAIR_WITHIN_S, "every listed replica right")
    assert fsck(c).returncode == 0


def test_a_server_back_during_its_repair_ends_with_r_copies(fast_cluster):
    """A data server judged dead comes back while its blocks are being copied elsewhere
    (a slow restart): whichever copies land before or after its return, every block ends
    with exactly R copies, and fsck (which reports copies beyond R) is clean."""
    c, w = fast_cluster
    ino, content = w.write_file(b"f", 24)
    c.kill_data(1)
    wait_for(lambda: any(s["state"] == "dead" for s in c.status()["servers"]), 10, "server seen dead")
    c.start_data(1)
    wait_for(lambda: {s["state"] for s in c.status()["servers"]} == {"up"}, REPAIR_WITHIN_S, "server back up")
    wait_for(lambda: fully_replicated(c, w, ino), REPAIR_WITHIN_S, "R=2 copies of every block")
    wait_for(lambda: w.check_every_replica(ino, content), REPAIR_WITHIN_S, "every listed replica right")
    done = fsck(c)
    assert done.returncode == 0, done.stdout + done.stderr


def test_fsck_cli_reports_and_repairs(fast_cluster):
    c, w = fast_cluster
    w.write_file(b"f", 2)
    clean = fsck(c)
    assert clean.returncode == 0 and "clean" in clean.stdout, clean.stdout + clean.stderr
    # Damage the database behind the metaserver's back (SQLite lets a second writer in).
    db = sqlite3.connect(c.base / "meta" / "meta.db", timeout=10)
    with db:
        db.execute("INSERT INTO dentries (parent, name, ino) VALUES (1, x'6768', 424242)")
        db.execute("UPDATE inodes SET nlink = 7 WHERE ino = ?", (w.dir,))
    db.close()
    found = fsck(c, "--json")
    assert found.returncode == 1
    assert "424242" in found.stdout and "nlink 7" in found.stdout
    fixed = fsck(c, "--repair")
    assert fixed.returncode == 0, fixed.stdout
    assert "repaired:" in fixed.stdout
    again = fsck(c)
    assert again.returncode == 0 and "clean" in again.stdout
    status = c.status()
    assert {s["state"] for s in status["servers"]} == {"up"}
    assert status["under_replicated"] == 0 and status["lost"] == 0
