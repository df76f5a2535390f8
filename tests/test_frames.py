"""Framed streams (proto/frames.py): the client's move from the gRPC stream to a server's
framed port, what the port lets through and what it refuses, and how a client comes back
from a restart or a stopped server. Real metaserver processes, the client library's
transport, raw TLS sockets for what a hostile peer would send."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import ssl
import time

import pytest
import trio

from cluster import Cluster
from faults import pause, resume
from pki import Pki
from stripefs.client.transport import StreamTransport, _FramedStream
from stripefs.proto import frames
from stripefs.proto.credentials import SERVER_NAMES, META, Credentials, load_credentials
from stripefs.proto.errors import FsError, TransportError
from stripefs.proto.messages import InodeReq
from stripefs.proto.services import META_METHODS, META_SERVICE
from stripefs.proto.types import ROOT_INODE

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("frames"), dataservers=1)
    try:
        yield c
    finally:
        c.close()


def transport(c: Cluster, creds: Credentials | None = None, frames: bool = True) -> StreamTransport:
    """The library's transport, asked to move to framed streams (a mount's does by itself)."""
    return StreamTransport(c.meta_addr, creds or load_credentials(c.client), META_SERVICE, META_METHODS,
                           frames=frames)


async def getattr_root(t: StreamTransport, timeout_s: float = 10.0):
    return await t.call("getattr", InodeReq(ROOT_INODE), timeout_s)


async def until_framed(t: StreamTransport, within_s: float = 30.0) -> None:
    """Calls until the transport's calls have moved to its framed stream (it opens beside
    the gRPC stream; calls move once it is up)."""
    deadline = trio.current_time() + within_s
    while not isinstance(t._stream, _FramedStream):
        assert trio.current_time() < deadline, "still on gRPC"
        await getattr_root(t)
        await trio.sleep(0.01)
    assert t._stream.up.is_set()


def framed_port(c: Cluster) -> int:
    """The framed port the metaserver's gRPC greeting names."""
    async def main() -> int:
        t = transport(c, frames=False)
        try:
            await getattr_root(t)
            assert t._stream is not None
            return t._stream.frames_port
        finally:
            t.close()
    return trio.run(main)


def calls_on_grpc(c: Cluster, named: bool = True) -> tuple[int, tuple[int, float]]:
    """Calls of a new transport, which must still be on its gRPC stream after them: the
    framed port that stream's greeting named, and the transport's last failed one (with
    `named`, calls go on until that framed port has been tried and has failed)."""
    async def main() -> tuple[int, tuple[int, float]]:
        t = transport(c)
        try:
            deadline = trio.current_time() + 30
            for n in itertools.count():
                await getattr_root(t)
                assert t._stream is not None and not isinstance(t._stream, _FramedStream)
                if n >= 4 and (not named or t._frames_failed[0]):
                    break
                assert trio.current_time() < deadline, "the framed port was never found failing"
                await trio.sleep(0.05)
            return t._stream.frames_port, t._frames_failed
        finally:
            t.close()
    return trio.run(main)


def on_frames(tmp_path, body) -> None:
    """`await body(c, t)`: a metaserver of its own, and a transport whose calls have moved
    to its framed stream."""
    c = Cluster(tmp_path / "c", dataservers=0)
    try:
        async def main() -> None:
            t = transport(c)
            try:
                await until_framed(t)
                await body(c, t)
            finally:
                t.close()
        trio.run(main)
    finally:
        c.close()


def tls_socket(c: Cluster, creds: Credentials, port: int) -> ssl.SSLSocket:
    host = c.meta_addr.rsplit(":", 1)[0]
    raw = socket.create_connection((host, port), timeout=10)
    return frames.client_context(creds).wrap_socket(raw, server_hostname=SERVER_NAMES[META])


def read_frame(s: ssl.SSLSocket) -> bytes:
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = s.recv(n - len(out))
            if not got:
                raise EOFError
            out += got
        return out
    (n,) = frames.HEADER.unpack(exactly(4))
    return exactly(n) if n else b""


def test_frames_are_cut_and_gathered_whatever_the_reads():
    msgs = [b"a" * 10, b"", b"b" * 70_000, b"c"]
    wire = b"".join(frames.HEADER.pack(len(m)) + m for m in msgs)
    for step in (1, 3, 4, 5, 1000, len(wire)):
        buf = frames.FrameBuffer()
        got = []
        for i in range(0, len(wire), step):
            got += buf.feed(wire[i:i + step])
        assert got == msgs, step
    with pytest.raises(ValueError):
        frames.FrameBuffer().feed(frames.HEADER.pack(frames.MAX_FRAME_BYTES + 1))


def test_a_long_frame_is_filled_in_place():
    """A frame of DIRECT_FRAME_BYTES or more is gathered in a buffer of its own, which a
    reader may also fill itself (room/filled), mixed with fed bytes in any way."""
    long = bytes(range(256)) * (frames.DIRECT_FRAME_BYTES // 128)
    msgs = [b"x", long, b"", long[::-1], b"tail"]
    wire = b"".join(frames.HEADER.pack(len(m)) + m for m in msgs)
    for step in (7, 1000, 16 * 1024, len(wire)):
        for direct in (False, True):
            buf = frames.FrameBuffer()
            got: list = []
            i = 0
            while i < len(wire):
                room = buf.room() if direct else None
                if room is not None:
                    n = min(len(room), step, len(wire) - i)
                    room[:n] = wire[i:i + n]
                    room.release()
                    got += buf.filled(n)
                else:
                    n = step
                    got += buf.feed(wire[i:i + n])
                i += n
            assert [bytes(g) for g in got] == msgs, (step, direct)
            assert buf.room() is None


def test_a_greeting_names_a_port_or_none():
    assert frames.port_of_greeting(frames.greeting_entry(4242)[1]) == 4242
    for junk in (b"", b"frames-port:", b"frames-port:0", b"frames-port:70000", b"frames-port:-1",
                 b"frames-port:123456789012", b"other:12"):
        assert frames.port_of_greeting(junk) == 0, junk


def test_calls_move_to_the_framed_port(cluster):
    async def main() -> None:
        t = transport(cluster)
        try:
            first = await getattr_root(t)  # on the gRPC stream: its greeting names the port
            grpc_stream = t._stream
            assert grpc_stream is not None and grpc_stream.frames_port > 0
            assert not isinstance(grpc_stream, _FramedStream)
            await until_framed(t)
            async with trio.open_nursery() as n:  # many at once, on the framed stream
                for _ in range(50):
                    n.start_soon(getattr_root, t)
            assert isinstance(t._stream, _FramedStream) and t._stream.up.is_set()
            assert (await getattr_root(t)).attr.ino == first.attr.ino
            assert grpc_stream.broken is not None and not t._retired  # closed once idle
        finally:
            t.close()
    trio.run(main)


def test_a_server_without_frames_keeps_clients_on_grpc(tmp_path):
    c = Cluster(tmp_path / "c", dataservers=0, meta_args=["--frames-port", "off"], start=False)
    try:
        c.start_meta()
        named, _ = calls_on_grpc(c, named=False)
        assert named == 0
    finally:
        c.close()


def test_strangers_get_no_further_than_the_handshake(cluster, tmp_path):
    """A credential of another CA, or no TLS at all: not one frame is read."""
    port = framed_port(cluster)
    # Our CA trusted (so the refusal is the server's), a certificate of another CA shown.
    other = Pki(tmp_path / "other-ca").creds("admin")
    ours = load_credentials(cluster.client)
    stranger = Credentials(ours.ca_pem, other.cert_pem, other.key_pem, other.role, other.name)
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        with tls_socket(cluster, stranger, port) as s:
            hello = META_SERVICE.encode()
            s.sendall(frames.HEADER.pack(len(hello)) + hello)
            read_frame(s)  # (TLS 1.3: the server's refusal arrives with the first read)
    host = cluster.meta_addr.rsplit(":", 1)[0]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(frames.HEADER.pack(5) + b"hello" + b"\x00" * 1000)
        s.settimeout(10)
        try:
            while s.recv(4096):  # a TLS alert, perhaps, then the server hangs up (no timeout) ...
                pass
        except ConnectionResetError:
            pass
    with tls_socket(cluster, load_credentials(cluster.client), port) as s:  # ... and still serves
        hello = META_SERVICE.encode()
        s.sendall(frames.HEADER.pack(len(hello)) + hello)
        assert read_frame(s)  # the greeting


def test_a_wrong_service_or_an_oversized_frame_ends_the_connection(cluster):
    port = framed_port(cluster)
    creds = load_credentials(cluster.client)
    with tls_socket(cluster, creds, port) as s:
        s.sendall(frames.HEADER.pack(5) + b"bogus")
        with pytest.raises((EOFError, ssl.SSLError, ConnectionError)):
            read_frame(s)
    with tls_socket(cluster, creds, port) as s:
        hello = META_SERVICE.encode()
        s.sendall(frames.HEADER.pack(len(hello)) + hello)
        assert read_frame(s)  # the greeting
        s.sendall(frames.PING)
        assert read_frame(s) == b""  # a ping is answered
        s.sendall(frames.HEADER.pack(frames.MAX_FRAME_BYTES + 1))
        with pytest.raises((EOFError, ssl.SSLError, ConnectionError)):
            read_frame(s)


def test_half_sent_frames_and_handshakes_freeze_nothing(cluster):
    """Connections that never finish their handshake, and one that sends half a frame:
    other callers' calls stay fast."""
    port = framed_port(cluster)
    host = cluster.meta_addr.rsplit(":", 1)[0]
    socks: list[socket.socket] = []
    try:
        for _ in range(32):
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
            socks.append(s)
        half = tls_socket(cluster, load_credentials(cluster.client), port)
        socks.append(half)
        hello = META_SERVICE.encode()
        half.sendall(frames.HEADER.pack(len(hello)) + hello)
        read_frame(half)
        half.sendall(frames.HEADER.pack(1000) + b"\x00" * 10)

        async def main() -> None:
            t = transport(cluster)
            try:
                for _ in range(20):
                    t0 = time.monotonic()
                    await getattr_root(t)
                    assert time.monotonic() - t0 < 2.0
                assert isinstance(t._stream, _FramedStream)
            finally:
                t.close()
        trio.run(main)
    finally:
        for s in socks:
            s.close()


def test_revoked_credentials_are_refused_on_the_framed_port(tmp_path):
    from stripefs.proto.credentials import revoke

    c = Cluster(tmp_path / "c", dataservers=0, start=False)
    c.meta_args = ["--revoked", str(c.pki.ca / "revoked")]
    try:
        c.start_meta()
        port = framed_port(c)
        revoke(c.pki.ca, "eve")
        with tls_socket(c, c.pki.creds("client", "eve"), port) as s:
            hello = META_SERVICE.encode()
            s.sendall(frames.HEADER.pack(len(hello)) + hello)
            with pytest.raises((EOFError, ssl.SSLError, ConnectionError)):
                read_frame(s)

        async def main() -> None:
            t = transport(c, c.pki.creds("client", "eve"))
            try:
                with pytest.raises(FsError) as info:
                    await getattr_root(t)
                assert info.value.errno == errno.EACCES
            finally:
                t.close()
        trio.run(main)
    finally:
        c.close()


def test_a_restarted_server_is_found_on_its_new_framed_port(tmp_path):
    async def body(c: Cluster, t: StreamTransport) -> None:
        old = t._frames_port
        await trio.to_thread.run_sync(c.restart_meta)
        deadline = trio.current_time() + 30
        while True:  # the stream broke: a retry, as the session layer makes it
            try:
                await getattr_root(t)
                break
            except TransportError:
                assert trio.current_time() < deadline
                await trio.sleep(0.1)
        await until_framed(t)
        assert t._frames_port != old  # (port 0: another one, which the greeting named)
    on_frames(tmp_path, body)


def test_a_stopped_server_is_found_by_a_ping(tmp_path):
    """A server stopped (SIGSTOP) keeps its connection open and says nothing: a call
    waiting on it fails once a ping goes unanswered, well before its own deadline."""
    async def body(c: Cluster, t: StreamTransport) -> None:
        pause(c.meta)
        try:
            t0 = trio.current_time()
            with pytest.raises(TransportError, match="ping"):
                await getattr_root(t, timeout_s=120)
            assert trio.current_time() - t0 < frames.PING_AFTER_S + frames.PING_TIMEOUT_S + 15
        finally:
            resume(c.meta)
        await getattr_root(t)  # and then on a new stream
    on_frames(tmp_path, body)


def test_a_full_framed_port_leaves_clients_on_grpc(tmp_path):
    """Far more idle connections than the framed port takes (half of --max-connections):
    the ones past it are closed at once, the server's descriptors stay bounded, and a
    client refused there makes its calls on the gRPC stream."""
    cap = 48
    c = Cluster(tmp_path / "c", dataservers=0, meta_args=["--max-connections", str(cap)], start=False)
    socks = []
    try:
        c.start_meta()
        port = framed_port(c)
        host = c.meta_addr.rsplit(":", 1)[0]
        for _ in range(3 * cap):
            try:
                socks.append(socket.create_connection((host, port), timeout=5))
            except OSError:
                pass  # refused: fine
        time.sleep(1)
        fds = len(os.listdir(f"/proc/{c.meta.pid}/fd"))
        assert fds < cap + 100, f"the metaserver holds {fds} descriptors"
        _, (failed_port, _) = calls_on_grpc(c)
        assert failed_port == port  # it tried, and stays on gRPC for a while
    finally:
        for s in socks:
            s.close()
        c.close()



def test_a_silent_framed_port_holds_up_no_call(cluster, monkeypatch):
    """A framed port that takes the TCP connection and then says nothing (a firewall or a
    NAT that drops what goes to it, a server's port mapped to nothing): the framed stream
    is opened beside the gRPC one and gives up after its handshake's timeout, while every
    call goes on on gRPC without waiting for it; the port is then left alone for
    FRAMES_RETRY_S."""
    silent = socket.socket()
    silent.bind((cluster.meta_addr.rsplit(":", 1)[0], 0))
    silent.listen(64)  # (the kernel completes TCP handshakes; nobody ever reads)
    port = silent.getsockname()[1]
    monkeypatch.setattr(frames, "HANDSHAKE_TIMEOUT_S", 2.0)
    monkeypatch.setattr(frames, "port_of_greeting", lambda frame: port)

    async def main() -> None:
        t = transport(cluster)
        try:
            slowest = 0.0
            end = trio.current_time() + 2.0 + 3.0
            while trio.current_time() < end:
                t0 = trio.current_time()
                await getattr_root(t)
                slowest = max(slowest, trio.current_time() - t0)
                assert not isinstance(t._stream, _FramedStream)
                await trio.sleep(0.05)
            assert slowest < 1.0, f"a call waited {slowest:.2f} s"
            assert t._frames_failed[0] == port  # it was tried, and failed
            assert t._candidate is None  # and is not tried again yet
        finally:
            t.close()
    try:
        trio.run(main)
    finally:
        silent.close()
