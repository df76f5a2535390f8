"""The real metaserver process (`python -m metaserver`) on loopback, through proto.rpc.Stub."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proto.auth import load_secret
from proto.errors import FsError
from proto.messages import Ctx, Empty, LookupReq, MkdirReq, ReaddirReq, SessionOpenReq
from proto.rpc import Stub
from proto.services import META_METHODS, META_SERVICE
from proto.types import ROOT_INODE

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0


@pytest.fixture
def metaserver(tmp_path):
    state = tmp_path / "meta"
    ready = tmp_path / "ready"
    log = tmp_path / "meta.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metaserver", "--listen", "127.0.0.1:0", "--dir", str(state),
         "--ready-file", str(ready), "--log-file", str(log)],
        cwd=REPO,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"metaserver did not start:\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.05)
    address = ready.read_text().strip()
    secret = load_secret(state / "cluster.secret")
    yield proc, address, secret, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_round_trip(metaserver):
    proc, address, secret, log = metaserver
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    stub = Stub(address, secret, META_SERVICE, META_METHODS)
    try:
        made = stub.call("mkdir", MkdirReq(parent=ROOT_INODE, name=b"data", mode=0o755, ctx=Ctx(uid=7, gid=8))).attr
        found = stub.call("lookup", LookupReq(parent=ROOT_INODE, name=b"data")).attr
        assert found == made and found.uid == 7
        listing = stub.call("readdir", ReaddirReq(ino=ROOT_INODE))
        assert [(e.name, e.attr.ino) for e in listing.entries] == [(b"data", made.ino)] and not listing.more
        with pytest.raises(FsError) as info:
            stub.call("lookup", LookupReq(parent=ROOT_INODE, name=b"missing"))
        assert info.value.errno == errno.ENOENT
        assert stub.call("open_session", SessionOpenReq(host="h", mountpoint="/m")).session > 0
        assert stub.call("status", Empty()).directories == 2
    finally:
        stub.close()
    assert "serving on 127.0.0.1:" in log.read_text()


def test_malformed_request_is_einval(metaserver):
    _, address, secret, _ = metaserver
    stub = Stub(address, secret, META_SERVICE, META_METHODS)
    try:
        with pytest.raises(FsError) as info:
            stub.call("mkdir", MkdirReq(parent=ROOT_INODE, name=b"a/b", mode=0o755, ctx=Ctx()))
        assert info.value.errno == errno.EINVAL
        with pytest.raises(FsError) as info:
            stub.call("lookup", LookupReq(parent="one", name=b"x"))  # type: ignore[arg-type]
        assert info.value.errno == errno.EINVAL
        # Raw garbage on the wire.
        raw = stub.channel.unary_unary(f"/{META_SERVICE}/lookup")
        from proto import codec
        from proto.auth import AUTH_METADATA_KEY, call_credential

        frame = raw(b"\x00\x00\x00\x05garbage", timeout=10,
                    metadata=((AUTH_METADATA_KEY, call_credential(secret)),))
        with pytest.raises(FsError) as info:
            codec.decode_reply(Empty, frame)
        assert info.value.errno == errno.EINVAL
        # The server is still fine.
        assert stub.call("readdir", ReaddirReq(ino=ROOT_INODE)).entries == []
    finally:
        stub.close()


def test_wrong_secret_is_eacces(metaserver):
    _, address, _, _ = metaserver
    stub = Stub(address, b"not-the-cluster-secret", META_SERVICE, META_METHODS)
    try:
        with pytest.raises(FsError) as info:
            stub.call("readdir", ReaddirReq(ino=ROOT_INODE))
        assert info.value.errno == errno.EACCES
    finally:
        stub.close()


def test_sigterm_exits_cleanly_and_state_persists(metaserver, tmp_path):
    proc, address, secret, log = metaserver
    stub = Stub(address, secret, META_SERVICE, META_METHODS)
    try:
        stub.call("mkdir", MkdirReq(parent=ROOT_INODE, name=b"kept", mode=0o755, ctx=Ctx()))
    finally:
        stub.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "metaserver stopped" in log.read_text()
    # The database is there and readable by a fresh core in this process.
    from metaserver.core import MetaCore

    core = MetaCore(str(tmp_path / "meta" / "meta.db"), secret)
    try:
        assert core.lookup(LookupReq(parent=ROOT_INODE, name=b"kept")).attr.nlink == 2
    finally:
        core.close()
    assert os.stat(tmp_path / "meta" / "cluster.secret").st_mode & 0o077 == 0


def test_stream_batches_and_errors(metaserver):
    """The multiplexed stream: many calls in flight on one stream, each with its own
    reply or errno, and a stream with the wrong credential refused as EACCES."""
    import trio

    from fs.client.transport import StreamTransport

    _, address, secret, _ = metaserver

    async def main():
        t = StreamTransport(address, secret, META_SERVICE, META_METHODS)
        try:
            made = await t.call("mkdir", MkdirReq(ROOT_INODE, b"s", 0o755, Ctx()), 10)
            results = {}

            async def lookup(name: bytes) -> None:
                try:
                    results[name] = (await t.call("lookup", LookupReq(ROOT_INODE, name), 10)).attr.ino
                except FsError as exc:
                    results[name] = exc.errno

            async with trio.open_nursery() as n:
                for i in range(200):
                    n.start_soon(lookup, b"s" if i % 2 else b"missing%d" % i)
            assert {v for k, v in results.items() if k == b"s"} == {made.attr.ino}
            assert {v for k, v in results.items() if k != b"s"} == {errno.ENOENT}
            with pytest.raises(FsError) as info:
                await t.call("mkdir", MkdirReq(ROOT_INODE, b"a/b", 0o755, Ctx()), 10)
            assert info.value.errno == errno.EINVAL
        finally:
            t.close()
        bad = StreamTransport(address, b"not-the-cluster-secret", META_SERVICE, META_METHODS)
        try:
            with pytest.raises(FsError) as info:
                await bad.call("readdir", ReaddirReq(ino=ROOT_INODE), 10)
            assert info.value.errno == errno.EACCES
        finally:
            bad.close()

    trio.run(main)


def test_malformed_stream_message_ends_that_stream_only(metaserver):
    _, address, secret, _ = metaserver
    import grpc

    from proto.auth import AUTH_METADATA_KEY, call_credential

    channel = grpc.insecure_channel(address)
    try:
        call = channel.stream_stream(f"/{META_SERVICE}/stream")(
            iter([b"\xc1 not msgpack"]), metadata=((AUTH_METADATA_KEY, call_credential(secret)),), timeout=10
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
    stub = Stub(address, secret, META_SERVICE, META_METHODS)
    try:
        assert stub.call("readdir", ReaddirReq(ino=ROOT_INODE)).entries == []  # still serving
    finally:
        stub.close()
