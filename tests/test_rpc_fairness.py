"""A server's worker threads are shared fairly between callers (proto/rpc.py): one caller
with many slow calls holds at most CALLER_WORKERS of them, so another caller's call starts
while the first one's are still queued. A real gRPC server over mutual TLS, with a service
object whose method is slow on purpose (a unit test of the RPC layer, not of a role)."""

from __future__ import annotations

import threading
import time

import pytest

from stripefs.proto import rpc
from stripefs.proto.messages import BlockData, GetBlockReq
from stripefs.proto.services import DATA_METHODS, DATA_SERVICE

from pki import Pki

pytestmark = pytest.mark.timeout(120)

HOG_CALLS = 3 * rpc.DEFAULT_WORKERS
CALL_S = 0.2


class SlowService:
    """get_block that takes CALL_S and records who ran when."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.started: list[tuple[float, str]] = []

    def get_block(self, req: GetBlockReq, caller) -> BlockData:
        who = caller.name
        with self.lock:
            self.running[who] = self.running.get(who, 0) + 1
            self.most[who] = max(self.most.get(who, 0), self.running[who])
            self.started.append((time.monotonic(), who))
        time.sleep(CALL_S)
        with self.lock:
            self.running[who] -= 1
        return BlockData(b"x")


def test_one_caller_cannot_take_every_worker(tmp_path):
    pki = Pki(tmp_path / "pki")
    service = SlowService()
    server, port = rpc.serve(DATA_SERVICE, DATA_METHODS, service, pki.creds("data", "server"), "127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    hog = rpc.Stub(address, pki.creds("client", "hog"), DATA_SERVICE, DATA_METHODS)
    other = rpc.Stub(address, pki.creds("client", "other"), DATA_SERVICE, DATA_METHODS)
    try:
        hog.call("get_block", GetBlockReq(1), timeout=30)  # connected, warmed up
        threads = [threading.Thread(target=hog.call, args=("get_block", GetBlockReq(1)), kwargs={"timeout": 60})
                   for _ in range(HOG_CALLS)]
        for t in threads:
            t.start()
        # Wait until the hog's calls run (the rest of them queue), then call as someone else.
        deadline = time.monotonic() + 30
        while service.running.get("hog", 0) < 4:
            assert time.monotonic() < deadline, "the hog's calls never ran"
            time.sleep(0.01)
        time.sleep(CALL_S / 2)
        other.call("get_block", GetBlockReq(1), timeout=60)
        for t in threads:
            t.join(60)
    finally:
        hog.close()
        other.close()
        server.stop(0)
    assert service.most["hog"] <= rpc.CALLER_WORKERS
    hog_starts = [t for t, who in service.started if who == "hog"]
    (other_start,) = [t for t, who in service.started if who == "other"]
    # The other caller did not queue behind the hog's calls: many of them started after it.
    assert sum(t > other_start for t in hog_starts) >= HOG_CALLS - 2 * rpc.DEFAULT_WORKERS
