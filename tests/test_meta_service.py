"""The real metaserver process (`python -m stripefs.metaserver`) on loopback, through stripefs.proto.rpc.Stub
and the client's stream transport, over mutual TLS with credentials of a test CA."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stripefs.proto.auth import load_token_key
from stripefs.proto.errors import FsError
from stripefs.proto.messages import Ctx, Empty, LookupReq, MkdirReq, ReaddirReq, SessionOpenReq, SetattrReq
from stripefs.proto.rpc import Stub
from stripefs.proto.services import META_METHODS, META_SERVICE
from stripefs.proto.types import ROOT_INODE

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0


@pytest.fixture
def metaserver(tmp_path, pki):
    state = tmp_path / "meta"
    ready = tmp_path / "ready"
    log = tmp_path / "meta.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stripefs.metaserver", "--listen", "127.0.0.1:0", "--dir", str(state),
         "--ready-file", str(ready), "--log-file", str(log), "--credentials", str(pki.bundle("meta"))],
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
    yield proc, address, pki.creds("client"), log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_round_trip(metaserver):
    proc, address, creds, log = metaserver
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    stub = Stub(address, creds, META_SERVICE, META_METHODS)
    try:
        # uid 7 may create in the root once root made it writable for all.
        stub.call("setattr", SetattrReq(ino=ROOT_INODE, ctx=Ctx(), mode=0o777))
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
    _, address, creds, _ = metaserver
    stub = Stub(address, creds, META_SERVICE, META_METHODS)
    try:
        with pytest.raises(FsError) as info:
            stub.call("mkdir", MkdirReq(parent=ROOT_INODE, name=b"a/b", mode=0o755, ctx=Ctx()))
        assert info.value.errno == errno.EINVAL
        with pytest.raises(FsError) as info:
            stub.call("lookup", LookupReq(parent="one", name=b"x"))  # type: ignore[arg-type]
        assert info.value.errno == errno.EINVAL
        # Raw garbage on the wire.
        raw = stub.channel.unary_unary(f"/{META_SERVICE}/lookup")
        from stripefs.proto import codec

        frame = raw(b"\x00\x00\x00\x05garbage", timeout=10)
        with pytest.raises(FsError) as info:
            codec.decode_reply(Empty, frame)
        assert info.value.errno == errno.EINVAL
        # The server is still fine.
        assert stub.call("readdir", ReaddirReq(ino=ROOT_INODE)).entries == []
    finally:
        stub.close()


def test_credential_of_another_ca_gets_nowhere(metaserver, tmp_path):
    from pki import Pki

    _, address, _, _ = metaserver
    stranger = Pki(tmp_path / "other-ca").creds("admin")
    stub = Stub(address, stranger, META_SERVICE, META_METHODS)
    try:
        with pytest.raises(FsError) as info:
            stub.call("readdir", ReaddirReq(ino=ROOT_INODE), timeout=5)
        assert info.value.errno == errno.EIO  # the TLS handshake fails: no call is made
    finally:
        stub.close()


def test_roles_decide_what_may_be_called(metaserver, pki):
    """A client credential cannot act as a data server or run fsck; a data credential
    cannot touch the namespace (EACCES, before the method runs)."""
    from stripefs.proto.messages import FsckReq, HeartbeatReq, RegisterReq

    _, address, client, _ = metaserver
    as_client = Stub(address, client, META_SERVICE, META_METHODS)
    as_data = Stub(address, pki.creds("data", "d1"), META_SERVICE, META_METHODS)
    try:
        for name, req in (("register", RegisterReq("h:1", "0" * 32, 1, 1, 0)),
                          ("heartbeat", HeartbeatReq(1, 1, 1, 0)), ("fsck", FsckReq(repair=True))):
            with pytest.raises(FsError) as info:
                as_client.call(name, req)
            assert info.value.errno == errno.EACCES, name
        with pytest.raises(FsError) as info:
            as_data.call("mkdir", MkdirReq(parent=ROOT_INODE, name=b"x", mode=0o755, ctx=Ctx()))
        assert info.value.errno == errno.EACCES
        assert as_data.call("status", Empty()).inodes == 1  # status is for anyone
    finally:
        as_client.close()
        as_data.close()


def test_sigterm_exits_cleanly_and_state_persists(metaserver, tmp_path):
    proc, address, creds, log = metaserver
    stub = Stub(address, creds, META_SERVICE, META_METHODS)
    try:
        stub.call("mkdir", MkdirReq(parent=ROOT_INODE, name=b"kept", mode=0o755, ctx=Ctx()))
    finally:
        stub.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "metaserver stopped" in log.read_text()
    # The database is there and readable by a fresh core in this process.
    from stripefs.metaserver.core import MetaCore

    core = MetaCore(str(tmp_path / "meta" / "meta.db"), load_token_key(tmp_path / "meta" / "token.key"))
    try:
        assert core.lookup(LookupReq(parent=ROOT_INODE, name=b"kept")).attr.nlink == 2
    finally:
        core.close()
    assert os.stat(tmp_path / "meta" / "token.key").st_mode & 0o077 == 0


def test_stream_batches_and_errors(metaserver, pki):
    """The multiplexed stream: many calls in flight on one stream, each with its own
    reply or errno, and a call its credential's role may not make refused as EACCES."""
    import trio

    from stripefs.client.transport import StreamTransport

    _, address, creds, _ = metaserver

    async def main():
        t = StreamTransport(address, creds, META_SERVICE, META_METHODS)
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
        data = StreamTransport(address, pki.creds("data", "d1"), META_SERVICE, META_METHODS)
        try:
            with pytest.raises(FsError) as info:
                await data.call("readdir", ReaddirReq(ino=ROOT_INODE), 10)
            assert info.value.errno == errno.EACCES
        finally:
            data.close()

    trio.run(main)


def test_malformed_stream_message_ends_that_stream_only(metaserver):
    _, address, creds, _ = metaserver
    import grpc

    from stripefs.proto.rpc import secure_channel

    channel = secure_channel(address, creds, META_SERVICE)
    try:
        call = channel.stream_stream(f"/{META_SERVICE}/stream")(iter([b"\xc1 not msgpack"]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
    stub = Stub(address, creds, META_SERVICE, META_METHODS)
    try:
        assert stub.call("readdir", ReaddirReq(ino=ROOT_INODE)).entries == []  # still serving
    finally:
        stub.close()
