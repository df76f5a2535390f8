"""Framed streams: the stream of proto/rpc.py on a mutual-TLS socket of its own, without gRPC.

Why: a message of gRPC's Python stacks costs the server 130-225 us of CPU and, on the
client, a hand-off to gRPC's thread and back (docs/benchmark.md, "What a stream message
costs the server"); on a socket of our own, served by the server's asyncio loop and read
by the trio client itself, a metadata round trip from one caller went from 0.51-0.63 to
0.40-0.45 ms and random 4 KiB reads through a mount 30-60% faster (docs/client.md,
"Framed streams"). Bulk transfers (UPLOAD, DOWNLOAD) stay on gRPC, whose C core copies
bytes more cheaply than Python's TLS layer does ("Block transfers on TLS sockets of their
own", tried and not kept).

The wire. TLS with the same credentials, CA and server names as the gRPC channels
(proto/credentials.py): the caller's role and name come from its certificate and the
server's certificate must carry its role's name. Then frames both ways, each a 4-byte
big-endian length and that many bytes. The client's first frame names the service; from
then on each frame is one message of the stream, exactly as on the gRPC stream
(codec.encode_batch: requests one way, replies the other), and the server's first one is
the greeting. A frame of length 0 is a ping, answered at once with one (`Frames.ping`);
the client sends one when it waits for replies and has heard nothing for PING_AFTER_S, and
gives the connection up when nothing comes back within PING_TIMEOUT_S (gRPC's keepalive
does the same for its streams: a stopped server keeps its connection up and says nothing).

Finding it: a server listens for framed streams on a port of its own (`--frames-port`, 0:
any free one) on its gRPC host, and says which in the greeting of every gRPC stream, as an
entry with call id 0 (`greeting_entry`; call ids start at 1, and clients that do not know
it ignore it). So a client starts on gRPC, as it always did, and moves to the framed port
once a connection there is up (fs/client/transport.py StreamTransport); it stays on gRPC
while that port cannot be reached (a firewall, a server restarted on another port).

What a connection may do to the server: finish its TLS handshake within
HANDSHAKE_TIMEOUT_S, send a frame's bytes within FRAME_TIMEOUT_S of its length (a half-sent
request costs its own connection only, and not for long), send frames no larger than
MAX_FRAME_BYTES; connections beyond the server's cap are closed at once. A vanished peer is
found by TCP keepalive (KEEPALIVE_*).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
import tempfile
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from .credentials import CERT, KEY, Caller, Credentials, Revocations, caller_of_certificate, write_private

log = logging.getLogger("stripefs.rpc")

HEADER = struct.Struct(">I")
#: Largest frame either side accepts (the gRPC channels' message limit).
MAX_FRAME_BYTES = 256 * 1024 * 1024
#: A connection's TLS handshake must be done within this long.
HANDSHAKE_TIMEOUT_S = 10.0
#: Once a frame's length has arrived, its bytes must within this long.
FRAME_TIMEOUT_S = 30.0
#: The client pings a connection it waits on and has heard nothing from for this long ...
PING_AFTER_S = 5.0
#: ... and gives it up when nothing at all comes within this long of the ping.
PING_TIMEOUT_S = 10.0
#: TCP keepalive on every framed connection: probes after this many idle seconds, this
#: often, this many unanswered before the kernel drops it.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 5, 5, 2
#: The greeting entry's call id and the prefix of its frame.
GREETING_ID = 0
_GREETING_PREFIX = b"frames-port:"
PING = HEADER.pack(0)
#: A server's reply message smaller than this goes out joined to its length, in one write.
JOIN_BELOW_BYTES = 64 * 1024


def greeting_entry(port: int) -> list:
    """The entry of a gRPC stream's greeting that names the framed port."""
    return [GREETING_ID, _GREETING_PREFIX + str(port).encode()]


def port_of_greeting(frame: bytes) -> int:
    """The port a greeting entry names; 0 when it names none."""
    frame = bytes(frame)
    if not frame.startswith(_GREETING_PREFIX):
        return 0
    digits = frame[len(_GREETING_PREFIX):]
    port = int(digits) if digits.isdigit() and len(digits) <= 5 else 0
    return port if 0 < port < 65536 else 0


def host_of(address: str) -> str:
    """The host of a HOST:PORT address, an IPv6 one without its brackets."""
    host = address.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def keep_alive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _load_chain(ctx: ssl.SSLContext, creds: Credentials) -> None:
    """Our certificate and key into `ctx`: from the bundle's files, or (a bundle made in
    memory) from a private temporary copy, removed at once."""
    if creds.directory and os.path.exists(os.path.join(creds.directory, KEY)):
        ctx.load_cert_chain(os.path.join(creds.directory, CERT), os.path.join(creds.directory, KEY))
        return
    with tempfile.TemporaryDirectory(prefix="stripefs-tls-") as d:
        cert, key = os.path.join(d, CERT), os.path.join(d, KEY)
        write_private(cert, creds.cert_pem)
        write_private(key, creds.key_pem)
        ctx.load_cert_chain(cert, key)


def server_context(creds: Credentials) -> ssl.SSLContext:
    """TLS for a server's framed port: our certificate, and a client certificate from the
    cluster's CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, creds)
    ctx.load_verify_locations(cadata=creds.ca_pem.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(creds: Credentials) -> ssl.SSLContext:
    """TLS for a client of a framed port: the server's certificate from the cluster's CA,
    checked against its role's name (the caller passes it as the server name)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # (CERT_REQUIRED, check_hostname)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, creds)
    ctx.load_verify_locations(cadata=creds.ca_pem.decode())
    return ctx


#: A frame at least this long is gathered in a buffer of its own, each byte copied into it
#: once (or decrypted straight into it: `FrameBuffer.room`), rather than appended to the
#: buffer of leftovers: a batch of 16 block reads is a frame of ~2.4 MiB, arriving in
#: 16 KiB TLS records, and a bytearray grown record by record copied it over and over.
DIRECT_FRAME_BYTES = 64 * 1024


class FrameBuffer:
    """Bytes as they arrive in, whole frames out (the client's side). A frame comes out
    as bytes, or as the bytearray it was gathered in (DIRECT_FRAME_BYTES or longer)."""

    def __init__(self) -> None:
        self._buf = bytearray()  # bytes of frames shorter than DIRECT_FRAME_BYTES, and headers
        self._need = -1  # the length of the frame being gathered; -1: its header is not in yet
        self._frame: Optional[bytearray] = None  # a long frame being gathered in place
        self._got = 0  # bytes of it in

    def room(self) -> Optional[memoryview]:
        """The part of a long frame still to come, for a reader that can put bytes there
        itself (then `filled`); None when there is no such frame in progress (then `feed`)."""
        return None if self._frame is None else memoryview(self._frame)[self._got:]

    def filled(self, n: int) -> list[bytes | bytearray]:
        """`n` more bytes were put in `room()`: the frame, if that completes it."""
        assert self._frame is not None and 0 <= n <= len(self._frame) - self._got
        self._got += n
        if self._got < len(self._frame):
            return []
        frame, self._frame, self._need = self._frame, None, -1
        return [frame]

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | bytearray]:
        """The frames `data` completes, in order (pings as b""). ValueError: a frame over
        MAX_FRAME_BYTES."""
        out: list[bytes | bytearray] = []
        if self._frame is not None:
            n = min(len(self._frame) - self._got, len(data))
            self._frame[self._got:self._got + n] = memoryview(data)[:n]
            out += self.filled(n)
            if self._frame is not None:
                return out
            data = memoryview(data)[n:]
        self._buf += data
        start = 0
        buf = self._buf
        while True:
            if self._need < 0:
                if len(buf) - start < HEADER.size:
                    break
                (self._need,) = HEADER.unpack_from(buf, start)
                if self._need > MAX_FRAME_BYTES:
                    raise ValueError(f"a frame of {self._need} bytes")
                start += HEADER.size
            have = len(buf) - start
            if have < self._need:
                if self._need >= DIRECT_FRAME_BYTES:
                    self._frame = bytearray(self._need)
                    self._frame[:have] = memoryview(buf)[start:]
                    self._got = have
                    start = len(buf)
                break
            out.append(bytes(memoryview(buf)[start:start + self._need]))
            start += self._need
            self._need = -1
        if start:
            del buf[:start]
        return out


class _Context:
    """What proto/rpc.py's stream handler writes its replies to, for one framed connection."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, message: bytes) -> None:
        # One TLS record for a small message, not one for its length and one for it.
        if len(message) < JOIN_BELOW_BYTES:
            self._writer.write(HEADER.pack(len(message)) + message)
        else:
            self._writer.write(HEADER.pack(len(message)))
            self._writer.write(message)
        await self._writer.drain()

    def done(self) -> bool:
        return self._writer.is_closing()

    async def abort(self, code: Any, details: str) -> None:
        raise ConnectionAbortedError(details)


#: The stream handler's entry: run(caller, messages, context, greeting entries).
RunStream = Callable[[Caller, AsyncIterator[bytes], Any, list], Awaitable[None]]


class Frames:
    """A server's framed port, on its asyncio loop: `start` binds it; `close` stops it and
    ends every connection."""

    def __init__(self, service: str, run: RunStream, creds: Credentials, revocations: Revocations,
                 max_connections: int) -> None:
        self.service = service
        self._run = run
        self._revocations = revocations
        self._max_connections = max_connections
        self._server: Optional[asyncio.AbstractServer] = None
        self._tls = server_context(creds)
        self._connections: dict[asyncio.StreamWriter, asyncio.Task] = {}
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        # TLS is started by _connection, once the connection is counted: a flood of
        # handshakes never finished is bounded by the cap too.
        self._server = await asyncio.start_server(self._connection, host or None, port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        """No more connections, and every open one ends, the calls still running on it
        cancelled (a lock wait, say): their clients see the stream break and ask again, as
        when a gRPC server stops."""
        self.stop_listening()
        for writer, task in list(self._connections.items()):
            writer.close()
            task.cancel()

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max_connections:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections[writer] = task
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                keep_alive(sock)
            await writer.start_tls(self._tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            caller = caller_of_certificate(der) if der else None
            if caller is None or self._revocations.revoked(caller):
                log.info("framed connection from %s refused: no valid stripefs credential",
                         writer.get_extra_info("peername"))
                return
            frames = self._frames(reader, writer)
            hello = await frames.__anext__()
            if hello != self.service.encode():
                log.info("framed connection from %s asked for %r, not %s", caller, hello[:100], self.service)
                return
            await self._run(caller, frames, _Context(writer), [])
        except (StopAsyncIteration, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                ssl.SSLError, ValueError) as exc:
            log.debug("framed connection ended: %r", exc)
        except Exception:  # noqa: BLE001 - a server never dies on what a client sends
            log.exception("framed connection")
        except asyncio.CancelledError:
            # close(): the server stops. Ended quietly: asyncio logs a connection task
            # that ends cancelled as an error.
            pass
        finally:
            self._connections.pop(writer, None)
            writer.close()

    async def _frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> AsyncIterator[bytes]:
        """The frames a connection sends, pings answered here; ends at its end of file."""
        while True:
            try:
                head = await reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                return
            (n,) = HEADER.unpack(head)
            if n == 0:
                writer.write(PING)
                await writer.drain()  # (a peer that pings and never reads fills no buffer)
                continue
            if n > MAX_FRAME_BYTES:
                raise ValueError(f"a frame of {n} bytes")
            async with asyncio.timeout(FRAME_TIMEOUT_S):  # (a timer, not wait_for's task a frame)
                frame = await reader.readexactly(n)
            yield frame


def _port_or_off(value: str) -> Optional[int]:
    if value == "off":
        return None
    if not value.isdigit() or int(value) > 65535:
        raise ValueError(value)
    return int(value)


def add_argument(parser: Any) -> None:
    """A server's `--frames-port` (argparse): where its framed streams listen."""
    parser.add_argument("--frames-port", type=_port_or_off, default=0, metavar="PORT|off",
                        help="port of the framed streams, on the --listen host (default 0: any free port;"
                             " off: clients use the gRPC stream only)")
