"""A server's stop (proto/rpc.py Server.stop): calls running when it begins finish and
are answered; then it ends without waiting out the grace for idle connections, which a
synchronous client keeps open without ever reading the server's goodbye. A real gRPC
server over mutual TLS (a unit test of the RPC layer, not of a role)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from stripefs.proto import rpc
from stripefs.proto.errors import FsError
from stripefs.proto.messages import BlockData, Empty, GetBlockReq
from stripefs.proto.services import DATA_METHODS, DATA_SERVICE, META_METHODS, META_SERVICE

from pki import Pki

pytestmark = pytest.mark.timeout(120)

#: Far longer than any stop here should take, however loaded the machine.
GRACE_S = 60.0
#: A stop with nothing running returns well within this (a held one takes ~5 s).
IDLE_STOP_BOUND_S = 2.5


class SlowService:
    """get_block that waits until released (block id 1) or answers at once."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def get_block(self, req: GetBlockReq) -> BlockData:
        if req.block_id == 1:
            self.started.set()
            self.release.wait(GRACE_S)
        return BlockData(b"x" * req.block_id)


def serve(tmp_path):
    pki = Pki(tmp_path / "pki")
    service = SlowService()
    server, port = rpc.serve(DATA_SERVICE, DATA_METHODS, service, pki.creds("data", "server"), "127.0.0.1:0")
    stub = rpc.Stub(f"127.0.0.1:{port}", pki.creds("client", "c"), DATA_SERVICE, DATA_METHODS)
    return pki, service, server, stub


#: A client in a process of its own (in ours, the server's polling would read its socket
#: too): connects, makes one call, says so, then holds the connection idle.
IDLE_CLIENT = """
import sys, time
from stripefs.proto import rpc
from stripefs.proto.credentials import load_credentials
from stripefs.proto.messages import GetBlockReq
from stripefs.proto.services import DATA_METHODS, DATA_SERVICE
stub = rpc.Stub(sys.argv[1], load_credentials(sys.argv[2]), DATA_SERVICE, DATA_METHODS)
print(stub.call("get_block", GetBlockReq(3)).data.decode(), flush=True)
time.sleep(float(sys.argv[3]))
"""


def stop_during(server, service, caller: threading.Thread) -> None:
    """Start `caller`, whose call waits in `service` until released, and stop the server
    while it waits: the stop waits for the call, and returns once it is released."""
    caller.start()
    assert service.started.wait(30)
    stopper = threading.Thread(target=server.stop, args=(GRACE_S,))
    stopper.start()
    time.sleep(0.5)
    assert stopper.is_alive()  # waiting for the running call
    service.release.set()
    stopper.join(GRACE_S / 2)
    assert not stopper.is_alive()
    caller.join(30)


def test_stop_does_not_wait_for_an_idle_connection(tmp_path):
    pki, service, server, stub = serve(tmp_path)
    client = subprocess.Popen(
        [sys.executable, "-c", IDLE_CLIENT, stub.address, str(pki.bundle("client", "idle")),
         str(GRACE_S)], stdout=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdout is not None and client.stdout.readline() == "xxx\n"  # connected, then idle
        started = time.monotonic()
        server.stop(GRACE_S)
        # Held, it takes gRPC's own ~5 s to give up on the connection; let go, a few ms.
        assert time.monotonic() - started < IDLE_STOP_BOUND_S
        with pytest.raises(FsError):
            stub.call("get_block", GetBlockReq(3), timeout=10)
    finally:
        client.kill()
        client.wait()
        stub.close()


def test_a_call_running_at_stop_is_answered(tmp_path):
    _, service, server, stub = serve(tmp_path)
    replies: list = []
    caller = threading.Thread(target=lambda: replies.append(stub.call("get_block", GetBlockReq(1), timeout=GRACE_S)))
    try:
        stop_during(server, service, caller)
        assert [r.data for r in replies] == [b"x"]
    finally:
        service.release.set()
        stub.close()


class SlowBatches:
    """A metadata service whose stream batches run on a worker thread (as with PostgreSQL)
    and whose `sync` waits until released."""

    batches_inline = False

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def sync(self, req: Empty) -> Empty:
        self.started.set()
        self.release.wait(GRACE_S)
        return Empty()

    def apply_batch(self, calls, run):
        return [(run(name, req), None) for name, req in calls]


def test_a_stream_batch_running_at_stop_is_answered(tmp_path):
    import trio

    from stripefs.client.transport import StreamTransport

    pki = Pki(tmp_path / "pki")
    service = SlowBatches()
    server, port = rpc.serve(META_SERVICE, META_METHODS, service, pki.creds("meta", "server"), "127.0.0.1:0")
    replies: list = []

    async def call() -> None:
        t = StreamTransport(f"127.0.0.1:{port}", pki.creds("client", "c"), META_SERVICE, META_METHODS)
        try:
            replies.append(await t.call("sync", Empty(), GRACE_S))
        finally:
            t.close()

    caller = threading.Thread(target=trio.run, args=(call,))
    try:
        stop_during(server, service, caller)
        assert replies == [Empty()]
    finally:
        service.release.set()


#: Servers started, called and stopped one after the other with the grace given, in a
#: process of its own (a crash must not take the tests with it).
STOP_MANY = """
import sys
from stripefs.proto import rpc
from stripefs.proto.credentials import load_credentials
from stripefs.proto.messages import BlockData, GetBlockReq
from stripefs.proto.services import DATA_METHODS, DATA_SERVICE
class Quick:
    def get_block(self, req):
        return BlockData(b"x")
server_creds, client_creds = load_credentials(sys.argv[1]), load_credentials(sys.argv[2])
for _ in range(int(sys.argv[4])):
    server, port = rpc.serve(DATA_SERVICE, DATA_METHODS, Quick(), server_creds, "127.0.0.1:0")
    stub = rpc.Stub(f"127.0.0.1:{port}", client_creds, DATA_SERVICE, DATA_METHODS)
    stub.call("get_block", GetBlockReq(3))
    server.stop(float(sys.argv[3]))
    stub.close()
"""


@pytest.mark.parametrize("grace_s", [0.0, 0.5, 1.0, 2.0])
def test_stops_one_after_another_do_not_crash(tmp_path, grace_s):
    """grpc.aio crashes when a second stop destroys the server while the first one's grace
    runs out (with a grace of 0, within a few dozen stops before Server.stop kept them
    apart)."""
    pki = Pki(tmp_path / "pki")
    done = subprocess.run(
        [sys.executable, "-c", STOP_MANY, str(pki.bundle("data", "server")), str(pki.bundle("client", "c")),
         str(grace_s), "60"],
        capture_output=True, text=True, timeout=100,
    )
    assert done.returncode == 0, done.stderr[-2000:]
