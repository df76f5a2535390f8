"""Crash safety of the metaserver: SIGKILL `python -m stripefs.metaserver` at random instants of a
workload of creates, block commits, renames and unlinks (a thread calling it through
stripefs.proto.rpc.Stub), restart it on the same address, and check after each restart that
fsck finds nothing wrong and every acknowledged operation is there.

The data servers are fakes that exist only as register/heartbeat calls: block bytes are
not needed to check the metadata.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stripefs.proto.credentials import Credentials
from stripefs.proto.errors import FsError, TransportError
from stripefs.proto.messages import (
    AllocReq,
    BlockMapReq,
    BlockRef,
    CommitReq,
    Ctx,
    FsckReq,
    HeartbeatReq,
    InodeReq,
    LookupReq,
    MkdirReq,
    MknodReq,
    RegisterReq,
    RemoveReq,
    RenameReq,
    SessionOpenReq,
    XattrReq,
)
from stripefs.proto.rpc import Stub
from stripefs.proto.services import META_METHODS, META_SERVICE
from stripefs.proto.types import LAYOUT_XATTR_BLOCK_SIZE, ROOT_INODE

pytestmark = [pytest.mark.timeout(120), pytest.mark.allow_tracebacks]

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0
KILLS = 6
BLOCK_BYTES = 64 * 1024
GiB = 1024**3


class Meta:
    def __init__(self, tmp: Path) -> None:
        from pki import Pki

        self.pki = Pki(tmp / "credentials")
        self.state = tmp / "meta"
        self.ready = tmp / "ready"
        self.log = tmp / "meta.log"
        self.listen = "127.0.0.1:0"
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stripefs.metaserver", "--listen", self.listen, "--dir", str(self.state),
             "--ready-file", str(self.ready), "--log-file", str(self.log),
             "--credentials", str(self.pki.bundle("meta"))],
            cwd=REPO,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"metaserver did not start:\n{self.log.read_text() if self.log.exists() else ''}")
            time.sleep(0.02)
        self.address = self.ready.read_text().strip()
        self.listen = self.address  # come back on the same port: clients reconnect by themselves

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Workload(threading.Thread):
    """create tmp -> alloc+commit blocks -> rename to its final name -> unlink every third."""

    def __init__(self, stub: Stub, session: int, dir_ino: int) -> None:
        super().__init__(daemon=True)
        self.stub = stub
        self.session = session
        self.dir = dir_ino
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done: dict[bytes, int] = {}  # final name -> size, acknowledged
        self.unlinking: set[bytes] = set()  # unlinks started (maybe not acknowledged)
        self.unlinked: set[bytes] = set()  # acknowledged unlinks
        self.errors = 0

    def call(self, name, req):
        return self.stub.call(name, req, timeout=5)

    def run(self) -> None:
        k = 0
        while not self.stop.is_set():
            k += 1
            try:
                self.one(k)
            except FsError:
                self.errors += 1
                time.sleep(0.05)

    def one(self, k: int) -> None:
        tmp, final = b"tmp-%d" % k, b"file-%d" % k
        attr = self.call("mknod", MknodReq(parent=self.dir, name=tmp, mode=0o100644, ctx=Ctx(),
                                           session=self.session)).attr
        n = 1 + k % 3
        allocs = self.call("alloc_blocks", AllocReq(ino=attr.ino, session=self.session,
                                                    indexes=list(range(n)))).allocations
        refs = [BlockRef(index=a.index, block_id=a.block_id, length=BLOCK_BYTES, servers=a.servers) for a in allocs]
        size = n * BLOCK_BYTES
        self.call("commit_blocks", CommitReq(ino=attr.ino, session=self.session, blocks=refs, size=size, mtime_ns=1))
        self.call("rename", RenameReq(parent=self.dir, name=tmp, new_parent=self.dir, new_name=final))
        with self.lock:
            self.done[final] = size
        if k % 3 == 0:
            with self.lock:
                self.unlinking.add(final)
            self.call("unlink", RemoveReq(parent=self.dir, name=final))
            with self.lock:
                self.unlinked.add(final)


def beat_forever(address_of, creds: dict[str, Credentials], ids: dict[str, int], stop: threading.Event) -> None:
    """Fake data servers: heartbeat, each with its own credential, riding out metaserver
    restarts."""
    stubs: dict[str, Stub] = {}
    current = ""
    while not stop.wait(0.3):
        try:
            if address_of() != current:
                current = address_of()
                stubs = {node: Stub(current, creds[node], META_SERVICE, META_METHODS) for node in ids}
            for node, sid in ids.items():
                stubs[node].call("heartbeat", HeartbeatReq(server_id=sid, capacity_bytes=200 * GiB,
                                                           free_bytes=100 * GiB, blocks=0), timeout=2)
        except FsError:
            pass


def read_only_call(stub: Stub, name: str, req, attempts: int = 3):
    """A read-only call of the checker: one that went out on the connection of the killed
    metaserver as it died (UNAVAILABLE, "Stream removed") is sent again."""
    for attempt in range(attempts):
        try:
            return stub.call(name, req, timeout=30)
        except TransportError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)


def test_sigkill_metaserver_mid_workload(tmp_path):
    meta = Meta(tmp_path)
    meta.start()
    stub = Stub(meta.address, meta.pki.creds("client"), META_SERVICE, META_METHODS)
    # The checker waits for the restarted metaserver; the workload fails fast and goes on.
    checker = Stub(meta.address, meta.pki.creds("admin"), META_SERVICE, META_METHODS, wait_for_ready=True)
    stop_beats = threading.Event()
    workload = None
    try:
        ids, creds = {}, {}
        for n in (1, 2):
            node = f"node-{n}"
            creds[node] = meta.pki.creds("data", node)
            registrar = Stub(meta.address, creds[node], META_SERVICE, META_METHODS)
            ids[node] = registrar.call("register", RegisterReq(
                address=f"10.0.0.{n}:7000", node_id=node, capacity_bytes=200 * GiB,
                free_bytes=100 * GiB, blocks=0)).server_id
            registrar.close()
        beats = threading.Thread(target=beat_forever, args=(lambda: meta.address, creds, ids, stop_beats),
                                 daemon=True)
        beats.start()
        d = stub.call("mkdir", MkdirReq(parent=ROOT_INODE, name=b"w", mode=0o755, ctx=Ctx())).attr
        stub.call("setxattr", XattrReq(ino=d.ino, name=LAYOUT_XATTR_BLOCK_SIZE, value=str(BLOCK_BYTES).encode()))
        session = stub.call("open_session", SessionOpenReq(host="t", mountpoint="-")).session
        workload = Workload(stub, session, d.ino)
        workload.start()
        rng = random.Random(4)
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.0))
            meta.kill()
            meta.start()
            report = read_only_call(checker, "fsck", FsckReq())
            assert report.problems == [], report.problems
            with workload.lock:
                done, unlinked = dict(workload.done), set(workload.unlinked)
            for name, size in done.items():
                try:
                    ino = checker.call("lookup", LookupReq(parent=d.ino, name=name)).attr.ino
                except FsError:
                    with workload.lock:
                        assert name in workload.unlinking, f"{name!r} lost"
                    continue
                assert name not in unlinked, f"{name!r} came back after its unlink"
                assert checker.call("getattr", InodeReq(ino=ino)).attr.size == size
                blocks = checker.call("block_map", BlockMapReq(ino=ino)).blocks
                assert len(blocks) == size // BLOCK_BYTES and all(len(b.servers) == 2 for b in blocks)
        workload.stop.set()
        workload.join(10)
        assert len(workload.done) >= KILLS, "the workload made no progress"
        assert checker.call("fsck", FsckReq(), timeout=30).problems == []
    finally:
        if workload is not None:
            workload.stop.set()
        stop_beats.set()
        stub.close()
        checker.close()
        meta.kill()
    assert "Traceback" not in meta.log.read_text()
