"""How the trio client reaches a server: every call of the client goes through here.

- `StreamTransport`: one long-lived, multiplexed gRPC stream to one server (see proto/rpc.py
  for the server side). A call encodes its request, puts it on the queue that feeds the
  stream and waits for the reply with its id; calls queued at the same time leave as one
  message (and the metaserver applies them in one transaction). The trio thread never
  blocks. In a mount (`loop`) every stream of the process runs on one asyncio loop on a
  thread of its own (grpc.aio, `_GrpcLoop`), which writes the requests and hands each
  reply message to trio through its token; elsewhere (the library, which a DataLoader
  may fork: gRPC does not work in a child forked after grpc.aio) on gRPC's sync stack,
  three Python threads a stream (its request sender and poller, our reader thread), each
  call crossing three or four of them. Measured on this 2-core machine (scripts/bench-rpc,
  docs/client.md): ~0.3 ms for one caller and tens of thousands of calls a second with 64
  callers, against ~0.8 ms and ~1,900/s for a thread per call; a cold epoch of 150 KiB
  files cost the mount 49 thread switches a file in gRPC's threads, 15 on the loop, and
  2.0 against 1.45-1.68 ms of CPU.
- `_FramedStream`: the same stream on the server's framed port (proto/frames.py), run by
  trio itself: no gRPC and no thread between a caller and the socket. A StreamTransport
  starts on gRPC and moves there once a greeting names the port (StreamTransport's
  docstring; docs/client.md, "Framed streams").
- `upload`, `download`: a call on a worker thread, on a channel of its own, for
  bulk transfers (blocks of megabytes), which would hold up every small call queued behind
  them on the stream. Blocks move as streams of chunks (proto/rpc.py's UPLOAD and
  DOWNLOAD): whatever is done per chunk (hashing, say) is done on gRPC's threads as the
  chunks go or come, off the trio thread.
- `FailoverTransport`: calls to a list of servers that all serve every caller (the
  metaservers), through a StreamTransport to one of them at a time (failover, below).
- `LocalTransport`: the in-process twin of a server for tests of the client: it calls the
  server's implementation directly, through the same codec, with no process and no network.

Stream life cycle. A call made while there is no stream opens one and waits (up to its own
deadline) for the server's greeting, so calls made while a server restarts wait for it to
come back, and a request is put on a stream only once that stream is up: a call that gave
up before then was never sent. If the stream breaks (server gone, connection reset, keepalive
timeout) every call in flight fails with TransportError, which says the call may or may not
have run; the next call opens a new stream. Retrying is the caller's decision (session.py).

Failover. With one address, FailoverTransport is that address's StreamTransport, as above.
With several (proto/rpc.py AddressList), it talks to the current one and moves to the next
- when it cannot be reached: gRPC says its last attempt to connect failed (proto/rpc.py
  AioChannelWatch: at once when nothing listens, after 0.2 s for a stopped process), or no
  stream to it is up within HUNG_AFTER_S. Nothing was sent, so any call goes on to the
  next server; the stream left waiting for it keeps its channel reconnecting, and is used
  when the list comes round to it again;
- when a call on it fails in transport (its stream broke); that call fails as above;
- when a call that its caller marked movable (`patience_s`: it may run twice) heard
  nothing from the server for that long: a stopped server keeps its connection up and
  says nothing.
On a move, every movable call still waiting on the server left fails with TransportError,
so that its caller repeats it on the next; a lock wait is movable with no silence bound (it
waits for a lock, not a reply). A call that must not run twice is never moved: it waits
for the server it was sent to, up to its deadline, as with one address.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import math
import os
import queue
import ssl
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence, TypeVar, cast

import grpc
import trio

from stripefs.proto import codec, frames
from stripefs.proto.credentials import CLIENT, SERVER_NAMES, Caller, Credentials
from stripefs.proto.errors import FsError, TransportError
from stripefs.proto.messages import Message
from stripefs.proto.rpc import (HUNG_AFTER_S, STREAM_METHOD, AddressList, AioChannelWatch, ChannelWatch, Dispatch, Stub,
                       aio_secure_channel, secure_channel, transport_error)
from stripefs.proto.services import SERVER_ROLE, WAIT, Method

log = logging.getLogger("stripefs.client")

#: Worker threads that may be inside a unary gRPC call at once (per trio run).
MAX_UNARY_CALLS_IN_FLIGHT = 64
#: How long past its deadline a unary call is given up on by the caller if gRPC has not
#: ended it (seen: calls to a server whose link went down stayed blocked past it).
DEADLINE_BACKSTOP_S = 2.0
#: Pause after every server of a FailoverTransport failed to come up, doubling up to the
#: second figure while none does (gRPC's own reconnect backoff is 0.2-2 s).
ALL_UNREACHABLE_PAUSE_S = (0.1, 2.0)
#: How often a call waiting for a stream to come up looks at what gRPC says of the
#: connection (fail-fast transports; gRPC says it on a thread of its own).
CONNECTING_POLL_S = 0.05


class Unreachable(TransportError):
    """No stream to the server came up: the call was not sent."""


class Transport(Protocol):
    """What the client needs of a connection to one server."""

    @property
    def address(self) -> str:
        """The server it talks to now."""

    async def call(self, name: str, req: Message | bytes, timeout_s: float,
                   patience_s: Optional[float] = None) -> Any:
        """The reply to `req`, or FsError (TransportError: the call may not have run).
        `patience_s` not None: the call is movable (it may run twice), and a transport with
        several servers may give it up when its server says nothing for that long or when
        it moves to another server (module docstring)."""

    async def upload(self, name: str, head: Message, chunks: Iterable[bytes], timeout_s: float) -> Any:
        """An UPLOAD call: head, then the messages of `chunks` (produced on a worker thread
        as they are sent); the reply."""

    async def download(self, name: str, req: Message, timeout_s: float,
                       consume: Callable[[Any, Iterator[bytes]], T]) -> T:
        """A DOWNLOAD call: consume(reply, chunks) on a worker thread as the chunks
        arrive; what it returns. FsError as for `call`, or from consume."""

    def close(self) -> None:
        """Ends the connection; calls in flight fail."""


T = TypeVar("T")


class _Pending:
    """One call waiting for its reply on a stream."""

    __slots__ = ("event", "frame", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.frame: Optional[bytes] = None
        self.error: Optional[FsError] = None


class _GrpcLoop:
    """The asyncio loop, on a thread of its own, that runs every stream of this process
    (grpc.aio): one Python thread for all of them, where gRPC's sync stack takes three per
    stream (its sender, its poller, our reader), each request and reply crossing two or
    three of them. Made on first use."""

    _current: Optional["_GrpcLoop"] = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()  # (what is scheduled before it runs waits for it)
        self.thread = threading.Thread(target=self._run, name="stripefs-grpc", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> Optional["_GrpcLoop"]:
        """The loop; None in a child forked from a process that had started it, whose
        streams then take gRPC's sync stack (_ThreadStream) rather than crash: grpc.aio
        does not survive a fork (a new loop there crashed in gRPC), and gRPC's sync stack
        hangs there too. A client that may be used in a forked child does not use the
        loop (Client's `rpc_loop`)."""
        with cls._lock:
            if cls._current is None:
                cls._current = cls()
            return cls._current if cls._current.pid == os.getpid() else None

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) on the loop (from any thread)."""
        self.loop.call_soon_threadsafe(fn, *args)

    def start(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)


class _StreamState:
    """What a stream call shares with the trio thread, whoever runs it: one gRPC stream
    call that lives until it breaks or is closed, never reopened."""

    def __init__(self, address: str, token: trio.lowlevel.TrioToken) -> None:
        self.address = address
        self._token = token
        #: call id -> pending call; touched on the trio thread, read by the stream's
        self.pending: dict[int, _Pending] = {}
        self.up = trio.Event()  # set by the greeting, or when the stream breaks first
        #: why it broke: TransportError, or EACCES when the server refused our credential
        self.broken: Optional[FsError] = None
        #: trio time of the last message from the server (the greeting, replies)
        self.heard = -math.inf
        self._closed = False  # close() was called: its cancellation is no failure

    def send(self, call_id: int, name: str, frame: bytes) -> _Pending:
        """Queue one request (trio thread) and return what its reply will wake. The stream
        must be up."""
        waiter = self.pending[call_id] = _Pending()
        self._enqueue([call_id, name, frame])
        return waiter

    def _enqueue(self, entry: list) -> None:
        """Hand [call_id, name, frame] to the stream's writer (trio thread)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _unsent(self, entries: Iterable[list]) -> list[list]:
        """The requests of `entries` to send: a caller that gave up before its request
        left does not send it."""
        return [entry for entry in entries if entry[0] in self.pending]

    def _error(self, exc: grpc.RpcError) -> FsError:
        """What the calls waiting on a stream that ended with `exc` are told."""
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return FsError(errno.EACCES, f"{self.address}: {exc.details()}")
        if exc.code() == grpc.StatusCode.CANCELLED and self._closed:
            return TransportError(f"stream to {self.address} closed")
        return transport_error(self.address, STREAM_METHOD, exc)

    #: the server's framed port, from its greeting (proto/frames.py; 0: none named)
    frames_port = 0

    def _deliver(self, entries: list[tuple[int, bytes]]) -> None:
        self.up.set()  # the first message is the greeting
        self.heard = trio.current_time()
        for call_id, frame in entries:
            if call_id == frames.GREETING_ID:
                self.frames_port = frames.port_of_greeting(frame)
                continue
            waiter = self.pending.pop(call_id, None)
            if waiter is not None:
                waiter.frame = frame
                waiter.event.set()

    def _fail(self, error: FsError) -> None:
        if self.broken is None:
            self.broken = error
        self.up.set()
        pending, self.pending = self.pending, {}
        for waiter in pending.values():
            waiter.error = error
            waiter.event.set()

    def _tell(self, error: FsError) -> None:
        """The stream ended (any thread): every call waiting on it is told."""
        try:
            self._token.run_sync_soon(self._fail, error)
        except trio.RunFinishedError:
            pass  # the client's trio run is over: nobody is waiting


class _Stream(_StreamState):
    """A stream on the _GrpcLoop: requests queued by the trio thread are written there,
    everything queued at the time in one message; each reply message is handed to trio
    through its token."""

    def __init__(self, grpc_loop: _GrpcLoop, channel: Callable[[], grpc.aio.Channel], path: str, address: str,
                 token: trio.lowlevel.TrioToken) -> None:
        super().__init__(address, token)
        self._grpc = grpc_loop
        #: requests not yet written: appended by the trio thread, taken by the loop's
        self._outbox: collections.deque = collections.deque()
        self._kicked = False  # a wake-up of the writer is on its way to the loop
        self._wake = asyncio.Event()  # (bound to the loop that first waits for it)
        self._call: Any = None
        self._grpc.start(self._run(channel, path))

    def _enqueue(self, entry: list) -> None:
        self._outbox.append(entry)
        if not self._kicked:  # (the writer takes everything queued before it runs)
            self._kicked = True
            self._grpc.soon(self._kick)

    def _kick(self) -> None:
        self._kicked = False
        self._wake.set()

    async def _run(self, channel: Callable[[], grpc.aio.Channel], path: str) -> None:
        """The stream, on the loop: open it (waiting for the server: wait_for_ready; nothing
        is queued on it before its greeting), write requests, hand replies to trio."""
        error: FsError
        writer: Optional[asyncio.Task] = None
        try:
            if self._closed:
                raise asyncio.CancelledError
            self._call = channel().stream_stream(path)(wait_for_ready=True)
            writer = asyncio.ensure_future(self._write())
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    break
                self._token.run_sync_soon(self._deliver, codec.decode_reply_batch(message))
            error = TransportError(f"stream to {self.address} ended")
        except asyncio.CancelledError:
            error = TransportError(f"stream to {self.address} closed")
        except grpc.RpcError as exc:
            error = self._error(exc)
        except ValueError as exc:
            error = TransportError(f"stream to {self.address}: {exc}")
        except trio.RunFinishedError:
            error = TransportError("the client's trio run is over")
        except Exception as exc:  # (a bug: still, every call waiting on the stream is told)
            log.exception("stream to %s", self.address)
            error = TransportError(f"stream to {self.address}: {exc!r}")
        finally:
            if writer is not None:
                writer.cancel()
            if self._call is not None:
                self._call.cancel()
        self._tell(error)

    async def _write(self) -> None:
        """Write what the trio thread queued, as it comes."""
        assert self._call is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                taken = [self._outbox.popleft() for _ in range(min(len(self._outbox), codec.MAX_BATCH))]
                batch = self._unsent(taken)
                if batch:
                    try:
                        await self._call.write(codec.encode_batch(batch))
                    except (grpc.RpcError, asyncio.InvalidStateError):
                        return  # the stream ended: its reader tells the callers

    def close(self) -> None:
        self._closed = True
        self._grpc.soon(self._cancel)

    def _cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()


class _ThreadStream(_StreamState):
    """A stream on gRPC's sync stack, for a process where the _GrpcLoop cannot run (a
    forked child): gRPC's sender thread takes the requests off a queue, everything queued
    at the time in one message, and a reader thread hands each reply message to trio."""

    def __init__(self, channel: grpc.Channel, path: str, address: str, token: trio.lowlevel.TrioToken) -> None:
        super().__init__(address, token)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # wait_for_ready: opening the stream waits for the server instead of failing at
        # once; nothing is queued on it before its greeting, so nothing waits inside gRPC.
        self._call = channel.stream_stream(path)(self._requests(), wait_for_ready=True)
        threading.Thread(target=self._read, name=f"stream-{address}", daemon=True).start()

    def _enqueue(self, entry: list) -> None:
        self._queue.put(entry)

    def _requests(self) -> Iterator[bytes]:
        """The messages of the stream, built on gRPC's sender thread."""
        while True:
            taken = [self._queue.get()]
            while taken[-1] is not None and len(taken) < codec.MAX_BATCH:
                try:
                    taken.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = self._unsent(e for e in taken if e is not None)
            if batch:
                yield codec.encode_batch(batch)
            if taken[-1] is None:
                return

    def _read(self) -> None:
        """The reader thread."""
        error: FsError
        try:
            for message in self._call:
                self._token.run_sync_soon(self._deliver, codec.decode_reply_batch(message))
            error = TransportError(f"stream to {self.address} ended")
        except grpc.RpcError as exc:
            error = self._error(exc)
        except ValueError as exc:
            error = TransportError(f"stream to {self.address}: {exc}")
            self._call.cancel()
        except trio.RunFinishedError:
            error = TransportError("the client's trio run is over")
            self._call.cancel()
        self._tell(error)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._call.cancel()


class _FramedStream(_StreamState):
    """A stream on a framed connection of its own (proto/frames.py), run by trio itself: no
    thread between the caller and the socket. Requests queued while the writer is busy
    leave together, as on the gRPC stream; replies are delivered as they are read."""

    def __init__(self, address: str, port: int, creds: Credentials, service: str) -> None:
        super().__init__(address, trio.lowlevel.current_trio_token())
        self.pid = os.getpid()
        self.port = port
        self._outbox: list[list] = []
        self._wake = trio.Event()
        self._scope = trio.CancelScope()
        self._last_sent = -math.inf
        trio.lowlevel.spawn_system_task(self._run, frames.host_of(address), port, creds, service,
                                        name=f"stripefs framed stream to {address}")

    def _enqueue(self, entry: list) -> None:
        self._outbox.append(entry)
        self._wake.set()

    async def _run(self, host: str, port: int, creds: Credentials, service: str) -> None:
        error: FsError = TransportError(f"framed stream to {self.address} ended")
        try:
            with self._scope:
                await self._serve(host, port, creds, service)
        except BaseException as exc:
            cause = _first_error(exc)
            if not isinstance(cause, Exception):
                raise  # the trio run is ending (cancelled), or KeyboardInterrupt
            error = self._error_of(cause)
        if self._closed:
            error = TransportError(f"framed stream to {self.address} closed")
        self._fail(error)

    async def _serve(self, host: str, port: int, creds: Credentials, service: str) -> None:
        """Connect, then read replies (and write requests, and watch for silence) until
        the connection ends or fails."""
        with trio.fail_after(frames.HANDSHAKE_TIMEOUT_S):
            tcp = await trio.open_tcp_stream(host, port)
        try:
            conn = _Tls(tcp, frames.client_context(creds), SERVER_NAMES[SERVER_ROLE[service]])
            with trio.fail_after(frames.HANDSHAKE_TIMEOUT_S):
                frames.keep_alive(tcp.socket)  # type: ignore[arg-type]
                await conn.handshake()
                hello = service.encode()
                await conn.send(frames.HEADER.pack(len(hello)) + hello)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, conn)
                nursery.start_soon(self._watch)
                await self._read(conn)
                nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(tcp)

    def _error_of(self, exc: Exception) -> FsError:
        """What the calls waiting on the stream are told when `exc` ended it."""
        if isinstance(exc, trio.TooSlowError):
            return TransportError(f"framed stream to {self.address}: not connected within "
                                  f"{frames.HANDSHAKE_TIMEOUT_S:g} s")
        if isinstance(exc, _Silent):
            return TransportError(str(exc))
        if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, ValueError)):
            return TransportError(f"framed stream to {self.address}: {exc.__cause__ or exc!r}")
        # (a bug: still, every call waiting on the stream is told)
        log.error("framed stream to %s", self.address, exc_info=exc)
        return TransportError(f"framed stream to {self.address}: {exc!r}")

    async def _read(self, conn: "_Tls") -> None:
        buffer = frames.FrameBuffer()
        scratch = bytearray(READ_BYTES)  # (short frames and headers: what buffer.feed takes)
        while True:
            room = buffer.room()
            if room is not None:  # a long frame: decrypted straight into its buffer
                n = await conn.receive_into(room)
                if not n:
                    return
                got = buffer.filled(n)
            else:
                n = await conn.receive_into(memoryview(scratch))
                if not n:
                    return
                got = buffer.feed(memoryview(scratch)[:n])
            for frame in got:
                if frame:
                    self._deliver(codec.decode_reply_batch(frame))
                else:
                    self.heard = trio.current_time()  # a pong

    async def _write(self, conn: "_Tls") -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._outbox:
                taken = self._outbox[:codec.MAX_BATCH]
                del self._outbox[:codec.MAX_BATCH]
                if any(entry is _PING_ENTRY for entry in taken):
                    await conn.send(frames.PING)
                batch = self._unsent(taken)
                if batch:
                    message = codec.encode_batch(batch)
                    self._last_sent = trio.current_time()
                    await conn.send(frames.HEADER.pack(len(message)) + message)

    async def _watch(self) -> None:
        """While calls wait, a server silent for PING_AFTER_S is pinged, and given up when
        nothing comes back within PING_TIMEOUT_S (a stopped server keeps its connection)."""
        while True:
            await trio.sleep(frames.PING_AFTER_S / 2)
            now = trio.current_time()
            if not self.pending or now - max(self.heard, self._last_sent) < frames.PING_AFTER_S:
                continue
            self._enqueue_ping()
            pinged = now
            while self.heard < pinged:
                if trio.current_time() - pinged > frames.PING_TIMEOUT_S:
                    raise _Silent(f"framed stream to {self.address}: no answer to a ping within "
                                  f"{frames.PING_TIMEOUT_S:g} s")
                await trio.sleep(0.5)

    def _enqueue_ping(self) -> None:
        self._outbox.append(_PING_ENTRY)
        self._wake.set()

    def _unsent(self, entries: Iterable[list]) -> list[list]:
        return [entry for entry in entries if entry is not _PING_ENTRY and entry[0] in self.pending]

    def close(self) -> None:
        self._closed = True
        self._scope.cancel()


#: What a framed stream's outbox holds for a ping.
_PING_ENTRY: list = []


class _Tls:
    """TLS over a trio TCP stream, for a framed stream: trio's SSLStream decrypts one TLS
    record (16 KiB at most) per call, each call a trip through trio's scheduler, which
    cost a mount a quarter of its time on a stream of 150 KiB block reads; here a read of
    the socket takes what has arrived (RECV_BYTES at most) and every record in it is
    decrypted in one loop. One task reads and one writes; both may send (a read may leave
    TLS bytes to send back), one at a time."""

    def __init__(self, tcp: trio.SocketStream, context: ssl.SSLContext, server_name: str) -> None:
        self._tcp = tcp
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname=server_name)
        self._sending = trio.Lock()
        self._ended = False

    async def _flush(self) -> None:
        if self._out.pending:
            async with self._sending:
                data = self._out.read()
                if data:
                    await self._tcp.send_all(data)

    async def _fill(self) -> bool:
        """More bytes from the socket; False at its end (then reads raise SSLEOFError)."""
        data = await self._tcp.receive_some(RECV_BYTES)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise trio.BrokenResourceError("the server hung up during the TLS handshake") from None

    async def send(self, data: bytes) -> None:
        self._tls.write(data)  # (TLS 1.3 renegotiates nothing: a write never waits for a read)
        await self._flush()

    async def receive_into(self, view: memoryview) -> int:
        """The bytes that have arrived (waiting for some if none has), decrypted into `view`
        (up to its length): how many; 0 at the end of the stream."""
        got = 0
        while not self._ended:
            try:
                while got < len(view):
                    n = cast(int, self._tls.read(len(view) - got, view[got:]))  # (the count, given a buffer)
                    if not n:  # the server's close_notify
                        self._ended = True
                        return got
                    got += n
                return got
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._ended = True  # (its end: what came before it, then 0)
                return got
            await self._flush()  # (what reading made to send back: a key update's reply)
            if got:
                return got
            await self._fill()  # (at the socket's end, the next read raises SSLEOFError)
        return got


def _first_error(exc: BaseException) -> Optional[BaseException]:
    """The first exception in `exc` (a group's, depth first) that is not trio's
    cancellation; None if there is none."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_error(inner)
            if found is not None:
                return found
        return None
    return None if isinstance(exc, trio.Cancelled) else exc


class _Silent(Exception):
    """A framed stream's server said nothing, not even to a ping."""


#: Bytes a framed stream takes from its socket at most at once (many TLS records), and
#: decrypts at most at once outside a long frame (FrameBuffer.room).
RECV_BYTES = 256 * 1024
READ_BYTES = 64 * 1024
#: Pause before a client tries a server's framed port again after it could not reach it.
FRAMES_RETRY_S = 30.0


class StreamTransport:
    """Calls to one server over one multiplexed stream (module docstring).

    fail_fast: a call does not wait for a server that cannot be reached: Unreachable (the
    stream it opened keeps waiting; FailoverTransport has others to try meanwhile).
    loop: the stream runs on the _GrpcLoop (grpc.aio), else on gRPC's sync threads.
    frames: once a gRPC stream's greeting names the server's framed port, a framed stream
    there (_FramedStream) is opened beside it, and calls move to it once it is up (its
    greeting came); the gRPC stream is closed when its last call is answered. No call ever
    waits for a framed connection: until then, and when the port cannot be reached (a
    firewall that drops its packets costs the handshake's 10 s), calls go on gRPC. A framed
    port that could not be reached is tried again after FRAMES_RETRY_S, or at once when a
    greeting names another. By default only with `loop` (a mount): a
    library process may fork, and a forked child's first gRPC stream was seen to fail
    (CI, once in three runs; twice more it took a minute) when its parent had moved to
    framed streams, which is not understood yet; without the loop the library keeps the
    gRPC stream it always had."""

    def __init__(self, address: str, creds: Credentials, service: str, methods: dict[str, Method],
                 fail_fast: bool = False, loop: bool = False, frames: Optional[bool] = None) -> None:
        self.address = address
        self._frames = loop if frames is None else frames
        self._frames_port = 0  # the framed port the last greeting named
        self._frames_failed: tuple[int, float] = (0, -math.inf)  # (port, when) it last could not be reached
        self._retired: list[_StreamState] = []  # gRPC streams left for a framed one, with calls on them
        self._candidate: Optional[_FramedStream] = None  # a framed stream opening beside the gRPC one
        self.methods = methods
        self._creds = creds
        self._service = service
        self._stub: Optional[Stub] = None  # for bulk calls, made on first use
        self._grpc = _GrpcLoop.get() if loop else None
        #: the streams' channel: on the _GrpcLoop (grpc.aio), made there when first needed;
        #: without one, a sync channel (_ThreadStream)
        self._aio_channel: Optional[grpc.aio.Channel] = None
        self._sync_channel = secure_channel(address, creds, service) if self._grpc is None else None
        self._path = f"/{service}/{STREAM_METHOD}"
        self._stream: Optional[_StreamState] = None
        self._ids = itertools.count(1)
        self._closed = False
        # gRPC's view of the connection, for calls that must not wait for it
        self._watch: Optional[AioChannelWatch | ChannelWatch] = None
        if fail_fast and self._sync_channel is not None:
            self._watch = ChannelWatch(self._sync_channel)
        elif fail_fast and self._grpc is not None:
            self._watch = watch = AioChannelWatch()
            self._grpc.start(self._watching(watch))

    def _channel(self) -> grpc.aio.Channel:
        """On the _GrpcLoop."""
        if self._aio_channel is None:
            self._aio_channel = aio_secure_channel(self.address, self._creds, self._service)
        return self._aio_channel

    async def _close_channel(self) -> None:
        if self._aio_channel is not None:
            await self._aio_channel.close()  # (ends the watch's wait: it was the last user)

    async def _watching(self, watch: AioChannelWatch) -> None:
        try:
            await watch.run(self._channel())
        except (asyncio.CancelledError, grpc.aio.UsageError):
            pass  # the channel was closed
        except Exception:
            if not self._closed:
                log.exception("%s: the connection's watch stopped", self.address)

    def _current(self) -> _StreamState:
        stream = self._stream
        if isinstance(stream, _FramedStream) and stream.pid != os.getpid():
            stream = None  # (made in the process this one was forked from)
        if stream is not None and stream.broken is None:
            return self._advance(stream)
        if self._closed:
            raise TransportError(f"connection to {self.address} is closed")
        # A new stream is a gRPC one, whose greeting names the framed port of the server
        # as it is now (restarted, it may have another); calls move on from it (_advance).
        token = trio.lowlevel.current_trio_token()
        if self._grpc is not None:
            stream = _Stream(self._grpc, self._channel, self._path, self.address, token)
        else:
            assert self._sync_channel is not None
            stream = _ThreadStream(self._sync_channel, self._path, self.address, token)
        self._stream = stream
        return stream

    def _advance(self, stream: _StreamState) -> _StreamState:
        """The stream for the next call, given the current one (healthy): a gRPC stream
        gives way to the framed stream opened beside it once that one is up; one is opened
        when the gRPC stream's greeting names a port and the port is worth trying."""
        if not self._frames or isinstance(stream, _FramedStream) or not stream.frames_port:
            return stream
        self._frames_port = stream.frames_port
        candidate = self._candidate
        if candidate is not None and candidate.pid != os.getpid():
            candidate = self._candidate = None  # (made in the process this one was forked from: left alone)
        elif candidate is not None and candidate.port != self._frames_port:
            candidate.close()  # (for a port the server no longer has)
            candidate = self._candidate = None
        if candidate is not None:
            if candidate.broken is not None:
                if self._frames_failed[0] != candidate.port:
                    log.warning("%s: its framed port %d cannot be reached (%s): calls go on gRPC",
                                self.address, candidate.port, candidate.broken)
                self._frames_failed = (candidate.port, trio.current_time())
                self._candidate = None
            elif candidate.up.is_set():
                self._candidate = None
                self._retire(stream)
                self._stream = candidate
                return candidate
            return stream
        if self._frames_usable():
            self._candidate = _FramedStream(self.address, self._frames_port, self._creds, self._service)
        return stream

    def _frames_usable(self) -> bool:
        port, when = self._frames_failed
        return self._frames_port != port or trio.current_time() - when >= FRAMES_RETRY_S

    def _retire(self, stream: _StreamState) -> None:
        """A gRPC stream given up for a framed one: closed once no call waits on it."""
        if stream.pending:
            self._retired.append(stream)
        else:
            stream.close()

    def _close_retired(self) -> None:
        still = []
        for stream in self._retired:
            if stream.pending and stream.broken is None:
                still.append(stream)
            else:
                stream.close()
        self._retired = still

    async def _up(self) -> _StreamState:
        """A stream that is up (its greeting came), opened if need be. While the server
        cannot be reached: waits for it, or (fail_fast) raises Unreachable."""
        while True:
            stream = self._current()
            while not stream.up.is_set():  # (waiting on a set event would still yield)
                if self._watch is None:
                    await stream.up.wait()
                elif self._watch.failing():
                    raise Unreachable(f"{self.address}: cannot connect")
                else:
                    with trio.move_on_after(CONNECTING_POLL_S):
                        await stream.up.wait()
            if stream.broken is None:
                return stream
            if not isinstance(stream.broken, TransportError):
                raise stream.broken
            if self._watch is not None:
                raise Unreachable(stream.broken.message)
            # Broke before its greeting (the server went away while we waited, or
            # refused the stream): wait a little for it and open a new one.
            await trio.sleep(0.1)

    async def connect(self, timeout_s: float) -> None:
        """Returns once a stream is up; Unreachable if none is within timeout_s."""
        with trio.move_on_after(timeout_s):
            await self._up()
            return
        raise Unreachable(f"{self.address}: no connection within {timeout_s:.3g} s")

    async def call(self, name: str, req: Message | bytes, timeout_s: float,
                   patience_s: Optional[float] = None) -> Any:
        """`req` may be a frame already encoded with codec.encode_request. A finite
        `patience_s`: TransportError once the call has heard nothing from the server for
        that long (no reply to it or to any other call on the stream)."""
        reply_type = self.methods[name].reply
        frame = req if isinstance(req, bytes) else codec.encode_request(req)
        call_id = next(self._ids)
        stream: Optional[_StreamState] = None
        with trio.move_on_after(timeout_s):
            stream = await self._up()
            waiter = stream.send(call_id, name, frame)
            try:
                if patience_s is None or math.isinf(patience_s):
                    await waiter.event.wait()
                else:
                    await self._wait_hearing(stream, waiter, patience_s, name)
            finally:
                stream.pending.pop(call_id, None)
                if self._retired:
                    self._close_retired()
            if waiter.error is not None:
                raise waiter.error
            assert waiter.frame is not None  # (the event is set with a frame or an error)
            return codec.decode_reply(reply_type, waiter.frame)
        if stream is not None and stream.broken is not None:
            raise stream.broken
        raise TransportError(f"{name} to {self.address}: no answer within {timeout_s:.3g} s")

    async def _wait_hearing(self, stream: _StreamState, waiter: _Pending, patience_s: float, name: str) -> None:
        """Wait for the reply while the server says something at least every patience_s:
        a busy server answering other calls first is not a hung one."""
        quiet_since = trio.current_time()
        while True:
            with trio.move_on_at(quiet_since + patience_s):
                await waiter.event.wait()
                return
            if stream.heard <= quiet_since:
                raise TransportError(f"{name} to {self.address}: nothing heard for {patience_s:.3g} s")
            quiet_since = stream.heard

    def _bulk_stub(self) -> Stub:
        if self._stub is None:
            # A channel (connection) of its own: megabytes in flight on it do not queue in
            # front of the stream's small messages.
            self._stub = Stub(self.address, self._creds, self._service, self.methods)
        return self._stub

    async def upload(self, name: str, head: Message, chunks: Iterable[bytes], timeout_s: float) -> Any:
        stub = self._bulk_stub()
        return await in_thread(stub.upload, name, head, chunks, timeout_s, what=f"{name} to {self.address}",
                               timeout_s=timeout_s)

    async def download(self, name: str, req: Message, timeout_s: float,
                       consume: Callable[[Any, Iterator[bytes]], T]) -> T:
        stub = self._bulk_stub()

        def run() -> T:
            reply, chunks = stub.download(name, req, timeout_s)
            return consume(reply, chunks)

        return await in_thread(run, what=f"{name} to {self.address}", timeout_s=timeout_s)

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.close()
        if self._candidate is not None:
            self._candidate.close()
        for stream in self._retired:
            stream.close()
        self._retired = []
        if isinstance(self._watch, ChannelWatch):
            self._watch.close()
        if self._sync_channel is not None:
            self._sync_channel.close()
        if self._grpc is not None:
            self._grpc.start(self._close_channel())
        if self._stub is not None:
            self._stub.close()


class FailoverTransport:
    """Calls to a list of servers of one service (the metaservers), one at a time (module
    docstring, Failover). `addresses`: `HOST:PORT[,HOST:PORT...]` or a list."""

    def __init__(self, addresses: str | Sequence[str], creds: Credentials, service: str,
                 methods: dict[str, Method], label: str = "metaserver", loop: bool = False) -> None:
        self.servers = AddressList(addresses, label)
        several = len(self.servers) > 1
        self._transports = {a: StreamTransport(a, creds, service, methods, fail_fast=several, loop=loop)
                            for a in self.servers.addresses}
        #: per server, the cancel scopes of the movable calls waiting on it
        self._movable: dict[str, set[trio.CancelScope]] = {a: set() for a in self.servers.addresses}

    @property
    def address(self) -> str:
        return self.servers.current

    async def call(self, name: str, req: Message | bytes, timeout_s: float,
                   patience_s: Optional[float] = None) -> Any:
        if len(self.servers) == 1:
            return await self._transports[self.address].call(name, req, timeout_s)
        deadline = trio.current_time() + timeout_s
        address, transport = await self._connected(deadline)
        movable = self._movable[address]
        scope = trio.CancelScope()
        if patience_s is not None:
            movable.add(scope)
        try:
            with scope:
                try:
                    reply = await transport.call(name, req, max(0.0, deadline - trio.current_time()), patience_s)
                except TransportError as exc:
                    movable.discard(scope)
                    self._move(address, exc)
                    raise
                except FsError:
                    self.servers.answered(address)
                    raise
                self.servers.answered(address)
                return reply
        finally:
            movable.discard(scope)
        raise TransportError(f"{name}: left {address} for {self.address} before it answered")

    async def _connected(self, deadline: float) -> tuple[str, StreamTransport]:
        """The current server once a stream to it is up, moving on from those that cannot
        be reached; Unreachable at the deadline. Each full round of the list that fails
        pauses, and gives each server twice as long to come up in the next."""
        failed = 0
        while True:
            address = self.servers.current
            transport = self._transports[address]
            rounds = failed // len(self.servers)
            try:
                await transport.connect(min(HUNG_AFTER_S * 2**rounds, max(0.0, deadline - trio.current_time())))
                return address, transport
            except Unreachable as exc:
                if trio.current_time() >= deadline:
                    raise
                self._move(address, exc)
            failed += 1
            if failed % len(self.servers) == 0:
                first, most = ALL_UNREACHABLE_PAUSE_S
                await trio.sleep(min(first * 2**rounds, most, max(0.0, deadline - trio.current_time())))

    def _move(self, failed: str, why: FsError) -> None:
        """`failed` failed: on to the next server; the movable calls waiting on it go too."""
        if self.servers.move_on(failed, why.message):
            waiting = self._movable[failed]
            for scope in waiting:
                scope.cancel()
            waiting.clear()

    async def upload(self, name: str, head: Message, chunks: Iterable[bytes], timeout_s: float) -> Any:
        return await self._transports[self.address].upload(name, head, chunks, timeout_s)

    async def download(self, name: str, req: Message, timeout_s: float,
                       consume: Callable[[Any, Iterator[bytes]], T]) -> T:
        return await self._transports[self.address].download(name, req, timeout_s, consume)

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()


_limiter: trio.lowlevel.RunVar = trio.lowlevel.RunVar("stripefs_unary_limiter")


def _get_limiter() -> trio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(MAX_UNARY_CALLS_IN_FLIGHT)
        _limiter.set(limiter)
        return limiter


async def in_thread(fn: Callable[..., T], *args: Any, what: str, timeout_s: float) -> T:
    """fn(*args), a blocking gRPC call with a deadline of timeout_s, on a worker thread, so
    that the trio thread never blocks on the network and the copies of a bulk payload
    (encoding, decoding) happen off it. A cancelled caller abandons its thread, whose call
    then ends by its own deadline."""
    # gRPC enforces the deadline itself; this is the backstop for when it does not.
    with trio.move_on_after(timeout_s + DEADLINE_BACKSTOP_S):
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=_get_limiter())
    raise TransportError(f"{what}: no answer within {timeout_s:.0f} s")


class LocalTransport:
    """The in-process twin of a server: runs the call on the trio thread through the
    server glue's own decoding, role checks and encoding (stripefs.proto.rpc.Dispatch), as `caller`,
    so that what the server would refuse or what cannot cross the wire fails here too."""

    def __init__(self, impl: Any, methods: dict[str, Method], address: str = "local",
                 caller: Caller = Caller(CLIENT, "local")) -> None:
        self.methods = methods
        self.address = address
        self.caller = caller
        self._dispatch = Dispatch(methods, impl)

    async def call(self, name: str, req: Message | bytes, timeout_s: float,
                   patience_s: Optional[float] = None) -> Any:
        frame = req if isinstance(req, bytes) else codec.encode_request(req)
        if self.methods[name].kind == WAIT:
            return await self._coroutine_call(name, frame, self.caller)
        await trio.lowlevel.checkpoint()
        return codec.decode_reply(self.methods[name].reply, self._dispatch.run(name, frame, self.caller))

    async def _coroutine_call(self, name: str, frame: bytes, *args: Any) -> Any:
        """A call the server serves with a coroutine, `impl.<name>(request, *args)` (WAIT,
        UPLOAD): in an asyncio loop of its own on a worker thread, as a server runs it on
        its loop while other calls go on."""
        req = self._dispatch.decode(name, frame, self.caller)
        if isinstance(req, bytes):
            return codec.decode_reply(self.methods[name].reply, req)

        def run() -> bytes:
            async def go() -> Any:
                return await getattr(self._dispatch.impl, name)(req, *args)

            try:
                return codec.encode_reply(asyncio.run(go()))
            except FsError as exc:
                return codec.encode_reply(None, exc.errno, exc.message)

        return codec.decode_reply(self.methods[name].reply, await trio.to_thread.run_sync(run))

    async def upload(self, name: str, head: Message, chunks: Iterable[bytes], timeout_s: float) -> Any:
        """The server's coroutine, fed the chunks as they are made."""

        async def messages() -> Any:
            for chunk in chunks:
                yield chunk

        return await self._coroutine_call(name, codec.encode_request(head), messages(), self.caller, timeout_s)

    async def download(self, name: str, req: Message, timeout_s: float,
                       consume: Callable[[Any, Iterator[bytes]], T]) -> T:
        checked = self._dispatch.decode(name, codec.encode_request(req), self.caller)
        if isinstance(checked, bytes):
            codec.decode_reply(self.methods[name].reply, checked)  # raises its errno

        def run() -> T:
            async def go() -> tuple[Any, list[bytes]]:
                head, chunks = await getattr(self._dispatch.impl, name)(checked, self.caller)
                return head, [c async for c in chunks]

            head, chunks = asyncio.run(go())
            return consume(head, iter(chunks))

        return await trio.to_thread.run_sync(run)

    def close(self) -> None:
        pass
