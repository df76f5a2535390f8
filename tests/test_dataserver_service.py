"""The data server over real gRPC on loopback: the service in process, then the whole
process (`python -m stripefs.dataserver`) against a fake metaserver that records what it hears."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cluster import put_block

from stripefs.dataserver.service import DataService
from stripefs.dataserver.store import BlockStore
from stripefs.proto import codec, frames
from stripefs.proto.auth import read_token, write_token
from stripefs.proto.errors import FsError
from stripefs.proto.messages import (
    BlockData,
    DataStatusReply,
    Empty,
    GetBlockReq,
    HeartbeatReply,
    RegisterReply,
)
from stripefs.proto.rpc import STREAM_METHOD, Stub, secure_channel, serve
from stripefs.proto.services import DATA_METHODS, DATA_SERVICE, META_METHODS, META_SERVICE

pytestmark = pytest.mark.timeout(60)

SECRET = b"test-token-key-0123456789abcdef"  # the token key a metaserver would hand out
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_server(tmp_path, pki):
    store = BlockStore(tmp_path / "data")
    service = DataService(store, pki.creds("data", "d0"))
    service.token_key = SECRET  # as after its registration
    server, port = serve(DATA_SERVICE, DATA_METHODS, service, pki.creds("data", "d0"), "127.0.0.1:0")
    service.address = f"127.0.0.1:{port}"
    stub = Stub(f"127.0.0.1:{port}", pki.creds("client"), DATA_SERVICE, DATA_METHODS)
    stub.put = lambda block_id, data, token=None, **kw: put(stub, port, block_id, data, token, **kw)
    yield store, stub, port
    stub.close()
    server.stop(0)
    service.close()


def put(stub: Stub, port: int, block_id: int, data: bytes, token: bytes | None = None, holder: str = ""):
    """Write a block to this one server (a chain of one), as a client; FsError if refused."""
    address = f"127.0.0.1:{port}"
    token = writable(block_id, server=address) if token is None else token
    reply = put_block(stub, block_id, [address], [token], data, holder)
    if reply.failed:
        raise FsError(reply.failed[0].errno, reply.failed[0].message)
    return reply


def readable(block_id: int, holder: str = "client:client", ttl_s: int = 600) -> bytes:
    """A read token as the metaserver would put it in a block map."""
    return read_token(SECRET, block_id, holder, int(time.time()) + ttl_s)


def writable(block_id: int, holder: str = "client:client", ttl_s: int = 600, key: bytes = SECRET,
             server: str = "") -> bytes:
    """A write token as the metaserver would put it in an allocation (for `server`)."""
    return write_token(key, block_id, holder, server, int(time.time()) + ttl_s)


def test_put_get_status(data_server):
    store, stub, port = data_server
    data = os.urandom(200_000)
    assert stub.put(77, data).stored == [f"127.0.0.1:{port}"]
    reply = stub.call("get_block", GetBlockReq(block_id=77, token=readable(77)))
    assert isinstance(reply, BlockData) and reply.data == data
    part = stub.call("get_block", GetBlockReq(block_id=77, offset=65_000, length=70_000, token=readable(77)))
    assert part.data == data[65_000:135_000]
    head, chunks = stub.download("read_block", GetBlockReq(block_id=77, token=readable(77), leaves=True))
    assert b"".join(chunks) == data and head.leaves == store.get_leaves(77)
    # A retried write is fine; other bytes under the same id are not.
    stub.put(77, data)
    with pytest.raises(FsError) as info:
        stub.put(77, data[:-1] + b"?")
    assert info.value.errno == errno.EEXIST
    status = stub.call("status", Empty())
    assert isinstance(status, DataStatusReply)
    assert status.node_id == store.node_id and status.blocks == 1 and status.used_bytes > len(data)
    with pytest.raises(FsError) as info:
        stub.call("get_block", GetBlockReq(block_id=78, token=readable(78)))
    assert info.value.errno == errno.ENOENT


def test_reads_need_the_metaservers_token_for_that_block_and_reader(data_server):
    store, stub, port = data_server
    stub.put(80, b"private")
    # None, another block's, another reader's, expired, another key's, and a write token
    # (another operation's) for this very block.
    for token in (b"", readable(81), readable(80, holder="client:someone-else"), readable(80, ttl_s=-3600),
                  read_token(b"another-key-0123456789abcdef", 80, "client:client", int(time.time()) + 60),
                  writable(80, server=f"127.0.0.1:{port}")):
        with pytest.raises(FsError) as info:
            stub.call("get_block", GetBlockReq(block_id=80, token=token))
        assert info.value.errno == errno.EACCES
    assert stub.call("get_block", GetBlockReq(block_id=80, token=readable(80))).data == b"private"


def test_bad_token_is_eacces(data_server):
    store, stub, port = data_server
    me = f"127.0.0.1:{port}"
    # Another block's, none, another key's, a read token (another operation's) for it,
    # another client's, an expired one, and one made out to another data server.
    for token in (writable(6, server=me), b"", writable(5, key=b"another-secret-0123456789", server=me),
                  readable(5), writable(5, holder="client:someone-else", server=me),
                  writable(5, ttl_s=-3600, server=me), writable(5, server="127.0.0.1:1")):
        with pytest.raises(FsError) as info:
            stub.put(5, b"x", token)
        assert info.value.errno == errno.EACCES
    # A client cannot say it writes for another client.
    with pytest.raises(FsError) as info:
        stub.put(5, b"x", writable(5, holder="client:someone-else", server=me), holder="client:someone-else")
    assert info.value.errno == errno.EACCES
    assert store.stats().blocks == 0


def test_strangers_and_wrong_roles_are_refused(data_server, pki, tmp_path):
    """A credential of another CA does not get past the handshake; a data server's own
    credential may read (to re-replicate) but not write; no token makes up for either."""
    from pki import Pki

    store, _, port = data_server
    stranger = Stub(f"127.0.0.1:{port}", Pki(tmp_path / "other").creds("client"), DATA_SERVICE, DATA_METHODS)
    peer = Stub(f"127.0.0.1:{port}", pki.creds("data", "d1"), DATA_SERVICE, DATA_METHODS)
    try:
        me = f"127.0.0.1:{port}"
        for who in (stranger, peer):
            who.put = lambda block_id, data, token=None, _who=who, **kw: put(_who, port, block_id, data, token, **kw)
        with pytest.raises(FsError) as info:
            stranger.put(5, b"x")
        assert info.value.errno == errno.EIO  # no handshake, no call
        with pytest.raises(FsError) as info:
            stranger.call("get_block", GetBlockReq(block_id=5), timeout=5)
        assert info.value.errno == errno.EIO
        # A data server forwards only for a client, with the token made out to that client.
        for holder in ("", "data:d1", "admin:x"):
            with pytest.raises(FsError) as info:
                peer.put(5, b"x", writable(5, holder=holder or "data:d1", server=me), holder=holder)
            assert info.value.errno == errno.EACCES
    finally:
        stranger.close()
        peer.close()
    assert store.stats().blocks == 0


def test_no_block_is_stored_before_the_token_key_is_known(tmp_path, pki):
    store = BlockStore(tmp_path / "data")
    server, port = serve(DATA_SERVICE, DATA_METHODS, DataService(store), pki.creds("data", "d0"), "127.0.0.1:0")
    stub = Stub(f"127.0.0.1:{port}", pki.creds("client"), DATA_SERVICE, DATA_METHODS)
    try:
        with pytest.raises(FsError) as info:
            put(stub, port, 5, b"x", writable(5, key=b""))
        assert info.value.errno == errno.EAGAIN
    finally:
        stub.close()
        server.stop(0)


def test_malformed_frame_is_einval(data_server):
    _, stub, _ = data_server
    frame = stub._callables["get_block"](b"garbage", timeout=10)
    with pytest.raises(FsError) as info:
        codec.decode_reply(BlockData, frame)
    assert info.value.errno == errno.EINVAL
    # An invalid but well-formed request (non-positive id) never reaches the store.
    with pytest.raises(FsError) as info:
        stub.call("get_block", GetBlockReq(block_id=0))
    assert info.value.errno == errno.EINVAL
    # The server is still fine.
    assert stub.call("status", Empty()).blocks == 0


def test_a_chunk_that_does_not_add_up_is_einval_and_stores_nothing(data_server):
    """A write_block stream whose chunk messages (a head, then the data) do not pair up or
    do not match: EINVAL, nothing stored, and the server serves the next write."""
    from stripefs.proto.messages import WriteBlockHead

    store, stub, port = data_server
    address = f"127.0.0.1:{port}"
    data = os.urandom(300_000)
    chunk_head, body = codec.BlockChunks(data).messages()
    for messages in ([chunk_head], [chunk_head, body[:-1]], [chunk_head, body + b"!"], [body], [body, chunk_head],
                     [chunk_head, body, chunk_head]):
        head = WriteBlockHead(90, len(data), [address], [writable(90, server=address)])
        with pytest.raises(FsError) as info:
            stub.upload("write_block", head, iter(messages))
        assert info.value.errno == errno.EINVAL
    assert stub.call("status", Empty()).blocks == 0
    assert stub.put(90, data).stored == [address]
    assert stub.call("get_block", GetBlockReq(block_id=90, token=readable(90))).data == data


# --------------------------------------------------------------------------- the process


class FakeMeta:
    """Just the data server registry of a metaserver: records calls, hands out one delete
    list and one re-register request."""

    def __init__(self, garbage: list[int]) -> None:
        self.lock = threading.Lock()
        self.registers: list = []
        self.heartbeats: list = []
        self.deleted: list = []
        self._garbage = list(garbage)
        self._asked_reregister = False

    def register(self, req):
        with self.lock:
            self.registers.append(req)
            return RegisterReply(server_id=len(self.registers), heartbeat_interval_s=0.05, token_key=SECRET)

    def heartbeat(self, req):
        with self.lock:
            self.heartbeats.append(req)
            if self._garbage:
                garbage, self._garbage = self._garbage, []
                return HeartbeatReply(delete=garbage)
            if self.deleted and not self._asked_reregister:
                self._asked_reregister = True
                return HeartbeatReply(delete=[], reregister=True)
            return HeartbeatReply(delete=[])

    def blocks_deleted(self, req):
        with self.lock:
            self.deleted.append(req)
        return Empty()

    def __getattr__(self, name):
        # stripefs.proto.rpc binds every method of META_METHODS; the rest are not part of this fake.
        def refuse(req):
            raise FsError(errno.ENOSYS, f"fake metaserver has no {name}")

        return refuse


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_process_registers_heartbeats_deletes_garbage_and_stops(tmp_path, pki):
    data_dir = tmp_path / "data"
    store = BlockStore(data_dir)
    store.put(1000, b"garbage block")
    store.put(1001, b"live block")
    node_id = store.node_id
    del store

    meta = FakeMeta(garbage=[1000])
    meta_server, meta_port = serve(META_SERVICE, META_METHODS, meta, pki.creds("meta"), "127.0.0.1:0")
    ready = tmp_path / "ready"
    log_file = tmp_path / "dataserver.log"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "stripefs.dataserver",
            "--listen", "127.0.0.1:0",
            "--meta", f"127.0.0.1:{meta_port}",
            "--dir", str(data_dir),
            "--credentials", str(pki.bundle("data", "d0")),
            "--ready-file", str(ready),
            "--log-file", str(log_file),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    stub = None
    try:
        address = wait_for(lambda: ready.exists() and ready.read_text(), what="ready file").strip()
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        stub = Stub(address, pki.creds("client"), DATA_SERVICE, DATA_METHODS)

        wait_for(lambda: meta.deleted, what="blocks_deleted")
        first = meta.registers[0]
        assert (first.address, first.node_id, first.blocks) == (address, node_id, 2)
        assert meta.deleted[0].server_id == 1 and meta.deleted[0].block_ids == [1000]
        with pytest.raises(FsError) as info:
            stub.call("get_block", GetBlockReq(block_id=1000, token=readable(1000)))
        assert info.value.errno == errno.ENOENT
        assert stub.call("get_block", GetBlockReq(block_id=1001, token=readable(1001))).data == b"live block"

        # reregister=True makes it register again, then heartbeats carry the new id.
        wait_for(lambda: len(meta.registers) >= 2, what="second register")
        wait_for(lambda: meta.heartbeats[-1].server_id == 2, what="heartbeat with the new id")
        assert meta.heartbeats[-1].blocks == 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if stub is not None:
            stub.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        meta_server.stop(0)
    log_text = log_file.read_text()
    assert "node_id " + node_id in log_text and address in log_text
    assert "Traceback" not in log_text


def test_process_waits_for_metaserver_and_logs_outage_once(tmp_path, pki):
    """The data server starts before its metaserver, keeps retrying, logs the outage once."""
    # Reserve a port for the metaserver-to-be; nothing listens there yet.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        meta_port = s.getsockname()[1]
    ready = tmp_path / "ready"
    log_file = tmp_path / "dataserver.log"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "stripefs.dataserver",
            "--listen", "127.0.0.1:0",
            "--meta", f"127.0.0.1:{meta_port}",
            "--dir", str(tmp_path / "data"),
            "--credentials", str(pki.bundle("data", "d0")),
            "--ready-file", str(ready),
            "--log-file", str(log_file),
            "--heartbeat-interval-s", "0.05",
        ],
        cwd=REPO,
    )
    meta_server = None
    try:
        wait_for(ready.exists, what="ready file")
        wait_for(lambda: "register failed" in log_file.read_text(), what="outage logged")
        time.sleep(1.0)  # several retries at 0.2-0.8 s backoff
        meta = FakeMeta(garbage=[])
        meta_server, port = serve(META_SERVICE, META_METHODS, meta, pki.creds("meta"), f"127.0.0.1:{meta_port}")
        wait_for(lambda: len(meta.heartbeats) >= 2, what="heartbeats after the metaserver came up")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if meta_server is not None:
            meta_server.stop(0)
    log_text = log_file.read_text()
    assert log_text.count("register failed") == 1
    assert "answers again" in log_text


def test_small_reads_sent_together_are_answered_together(data_server, pki):
    """Quick calls of one stream message (a prefetcher's block reads) run together on one
    worker thread and their replies leave in one message, each with its own result."""
    store, stub, port = data_server
    blocks = {90 + i: os.urandom(100_000 + i) for i in range(5)}
    for block_id, data in blocks.items():
        stub.put(block_id, data)
    asked = [*blocks, 99]  # 99: no such block
    # (call ids from 1, as clients number them: id 0 is the greeting's, frames.GREETING_ID)
    batch = codec.encode_batch([[i, "get_block", codec.encode_request(GetBlockReq(block_id=b, token=readable(b)))]
                                for i, b in enumerate(asked, 1)])
    channel = secure_channel(f"127.0.0.1:{port}", pki.creds("client"), DATA_SERVICE)
    try:
        replies = list(channel.stream_stream(f"/{DATA_SERVICE}/{STREAM_METHOD}")(iter([batch]), timeout=30))
    finally:
        channel.close()
    greeting, *answers = [codec.decode_reply_batch(r) for r in replies]
    assert [call_id for call_id, _ in greeting] == [frames.GREETING_ID]  # (it names the framed port)
    assert frames.port_of_greeting(greeting[0][1]) > 0 and len(answers) == 1, answers
    got = dict(answers[0])
    assert sorted(got) == list(range(1, len(asked) + 1))
    for i, block_id in enumerate(asked[:-1], 1):
        assert codec.decode_reply(BlockData, got[i]).data == blocks[block_id]
    with pytest.raises(FsError) as info:
        codec.decode_reply(BlockData, got[len(asked)])
    assert info.value.errno == errno.ENOENT


def test_a_streamed_read_reads_cached_chunks_on_its_loop(tmp_path, monkeypatch):
    """read_block reads a chunk after the first that the page cache holds on the event
    loop and hands only the others to a disk thread: of a cold block the first chunk goes
    to one (the kernel then reads the rest ahead, so the others mostly do not), of a block
    read just before only the first, and where the kernel cannot say what it holds, every
    chunk; every byte arrives."""
    import asyncio

    import stripefs.dataserver.store as store_mod

    store = BlockStore(tmp_path / "data")
    service = DataService(store)
    data = os.urandom(4 << 20)
    store.put(21, data)  # drop-behind: not cached
    handed: list[object] = []
    submit = service.disk.submit

    def counted(fn, *args, **kwargs):
        handed.append(fn)
        return submit(fn, *args, **kwargs)

    service.disk.submit = counted  # type: ignore[method-assign]

    async def read_whole() -> bytes:
        reply, chunks = await service.read_block(GetBlockReq(block_id=21, offset=0, length=-1))
        return b"".join([c async for c in chunks])

    try:
        assert asyncio.run(read_whole()) == data
        cold = len(handed)
        handed.clear()
        assert asyncio.run(read_whole()) == data
        if store_mod._cachestat_works:
            assert 1 <= cold <= 4 and len(handed) == 1
        handed.clear()
        monkeypatch.setattr(store_mod, "_cachestat_works", False)  # a kernel before 6.5
        assert asyncio.run(read_whole()) == data
        assert len(handed) == 5  # four chunks, and the read that finds the block's end
    finally:
        service.close()
