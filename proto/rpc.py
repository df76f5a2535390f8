"""gRPC glue: the server side of every service, and a blocking stub. No protoc.

Server: `serve(service, methods, impl, credentials, listen)` starts a grpc.aio server on a
thread of its own and binds each method of the table to `impl.<name>(request)`, two ways:

- as a unary method `/<service>/<name>` (one frame in, one frame out), run on a worker
  thread: data servers, operators' commands and bulk block transfers use these;
- inside one long-lived bidirectional stream, `/<service>/stream`, which carries batches
  of requests with ids one way and batches of replies the other (codec.py). A client keeps
  many calls in flight on it without a thread per call: the round trip costs what the wire
  costs (docs/client.md has the figures). The server greets every new stream with an empty
  batch, so a client knows the stream is up before it sends anything on it.

The same stream is served on a port of its own without gRPC, framed (proto/frames.py:
`Server.frames`, `_StreamHandler.run`); the greeting of every gRPC stream names that port
(an entry with call id 0), and clients move there after their first call.

Blocks move on two more kinds of method (proto/services.py `kind`), served on the event
loop by coroutines of the implementation: UPLOAD (`write_block`), a request frame then raw
chunks in, one reply frame out, run as `await impl.<name>(request, chunks, caller,
time_left_s)`; and DOWNLOAD (`read_block`), one request frame in, then `await
impl.<name>(request, caller)` returns (reply, async iterator of chunks) and the reply
frame and the chunks go out; an error in the middle of the chunks ends the call with
DATA_LOSS (the reader sees EIO). A WAIT method (`lock_wait`) is one frame each way, as a
unary one or inside the stream, but `await impl.<name>(request, caller)` runs it on the
event loop: it may wait long for an event, holding no thread and holding up no other call.

Every way a request is decoded and checked (`valid()`) before the implementation sees
it; FsError becomes an errno reply, any other exception is logged and becomes EIO, an
unknown method ENOSYS. A server never dies on what a client sends.

How the requests of a stream batch run is the implementation's choice:
- `impl.apply_batch(calls)` (the metaserver): the whole batch, on the server's event-loop
  thread (on a worker thread if `impl.batches_inline` is False: a database server's
  round trips), in one store transaction; it returns for each call the reply (or FsError; or the
  reply frame already encoded, bytes) and an
  optional barrier, a blocking function to run before that reply may leave (the fsync of a
  durable operation). A barrier runs on a worker thread while the streams go on, so replies
  of later calls are not held behind another call's fsync (group commit); when no other
  barrier is running it runs right there on the loop, where an fsync (~0.1 ms here) costs
  less than the hand-off to a thread and back (a lone writer of small files: 208-255 ->
  309-327 files/s).
- otherwise (data servers): each call on a worker thread, replies as they finish; a call
  of a `quick` method (a small block read) runs on the event loop itself when it came
  alone and no other call of the server is running, which saves a round trip through a
  worker thread when one client reads at random. The quick calls of a message that
  brought several (a prefetcher's reads) run in groups of QUICK_GROUP_MAX, each group one
  after the other on one worker thread, its replies in one message: a hand-off and a
  message a group rather than a call, and still parallel work for several groups.

Who calls: every channel is mutual TLS (proto/credentials.py); the caller's role and name
come from its certificate, a stream's once when it opens. Each call is checked against its
method's roles (proto/services.py) before it runs: EACCES otherwise. A method that needs
to know the caller (sessions, data servers' reports) declares a `caller` parameter and gets
it passed. A revoked name (`--revoked FILE`) is refused like a stranger. A request's Ctx
(the ids it acts for) is mapped through the client credential's squash rule here, before
any method sees it.

Client: `Stub(address, credentials, service, methods).call(name, req)` is a blocking unary
call (the trio client has its own transport in fs/client/transport.py). Transport failures
become TransportError (EIO).

Failover: a role that talks to the metaservers is given a list of addresses (`a:p,b:p`,
`parse_addresses`) and talks to one at a time. `AddressList` is the one place that knows
which one that is and moves on to the next (round robin) when the current one fails, with
one WARNING naming both; `ChannelWatch` tells a server that cannot be reached without a
call; `FailoverStub` is the blocking client over them (data servers, operators' commands),
fs/client/transport.FailoverTransport the trio one. How long a server may stay silent
before it counts as hung is `HUNG_AFTER_S`.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import re
import threading
import time
from concurrent import futures
from typing import Any, Callable, Optional, Sequence

import grpc

from . import codec, frames, metrics
from .credentials import Caller, Credentials, Revocations, caller_of, channel_credentials, channel_options
from .credentials import server_credentials
from .errors import FsError, TransportError
from .messages import Ctx, Message
from .services import DOWNLOAD, SERVER_ROLE, UNARY, UPLOAD, WAIT, Method

log = logging.getLogger("stripefs.rpc")

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly after a server comes back: the default backoff grows to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.min_reconnect_backoff_ms", 200),
    # A long-lived stream over a connection whose peer vanished (host down, link cut)
    # would wait for TCP's retransmission timeout (minutes): pings find it in seconds.
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.max_pings_without_data", 0),
]
#: Only for channels of gRPC's synchronous stack (Stub: bulk transfers, the CLI): a
#: DOWNLOAD's chunks are taken off the call's completion queue by the thread that iterates
#: them (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream), not handed to it by
#: the channel's polling thread, one wake-up of each thread a chunk. A cold 1 GiB read
#: through a mount cost it 5% less CPU (docs/benchmark.md).
SYNC_CHANNEL_OPTIONS = [("SingleThreadedUnaryStream", 1)]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Accept the clients' keepalive pings (every 5 s; the default allows one per 5 minutes),
    # and no more: a peer that pings faster is sent away after two strikes (gRPC's default)
    # rather than allowed to keep a server busy answering pings.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 4000),
    ("grpc.http2.max_ping_strikes", 2),
    # A peer that opens a connection and never finishes the TLS handshake is dropped.
    ("grpc.server_handshake_timeout_ms", 10_000),
    # Connections nobody uses go away instead of holding descriptors for ever.
    ("grpc.max_connection_idle_ms", 10 * 60 * 1000),
    # Streams one connection may have open at once (a client has one long-lived stream
    # and a few bulk calls per server); more wait on the client's side.
    ("grpc.max_concurrent_streams", 100),
]
#: The name of the multiplexed stream method of every service.
STREAM_METHOD = "stream"
#: Calls of one stream that may wait for or run on worker threads at once; past it the
#: server reads no more from that stream until some finish.
STREAM_CALLS_IN_FLIGHT = 256
#: Quick calls (services.Method.quick) of one stream message run one after the other on
#: one worker thread, this many at most, and their replies leave in one message: a data
#: server's small block reads asked for together (a prefetcher's) cost one hand-off and
#: one reply message, not one each.
QUICK_GROUP_MAX = 16
#: Worker threads of a server (unary calls, stream calls of data servers, barriers).
DEFAULT_WORKERS = 16
#: Worker threads one caller (one credential) may hold at once: a busy or slow caller
#: leaves the others at least the rest. Its further calls wait on the event loop, holding
#: no thread.
CALLER_WORKERS = DEFAULT_WORKERS // 2
#: How long a server may take to bind and start.
START_TIMEOUT_S = 30.0
#: How often a stopping server looks whether its last running call has ended.
STOP_POLL_S = 0.02
#: How long a stop waits for the tasks of the calls it ended to finish before the loop closes.
STOP_SETTLE_S = 0.5
#: A stop's grace from which it ends early once nothing runs (Server.stop); a shorter one
#: is left to gRPC alone.
STOP_EARLY_MIN_GRACE_S = 1.0
#: Connections a server holds at most (more are refused at once): what a flood of idle or
#: half-open connections can take, leaving the rest of the descriptors for block files and
#: the database. Default: half the descriptor limit, at most this.
MAX_CONNECTIONS = 4096


def default_max_connections() -> int:
    import resource

    return max(64, min(MAX_CONNECTIONS, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2))

#: (reply or FsError, barrier) for each call of a batch, from `impl.apply_batch`.
BatchResult = tuple[Any, Optional[Callable[[], None]]]
#: How much of a request a log line about it shows.
LOGGED_REQUEST_CHARS = 300


def summary(req: Any) -> str:
    """A bounded description of a request for a log line: a caller must not be able to make
    the server write as many bytes as it sends."""
    text = repr(req)
    return text if len(text) <= LOGGED_REQUEST_CHARS else text[:LOGGED_REQUEST_CHARS] + "...(truncated)"


def _reply_frame(name: str, result: Any, req: Any = None) -> bytes:
    if isinstance(result, bytes):  # encoded already (a recorded reply: metaserver/core.py)
        return result
    if isinstance(result, FsError):
        return codec.encode_reply(None, result.errno, result.message)
    try:
        return codec.encode_reply(result)
    except Exception:  # noqa: BLE001 - a reply we cannot encode is a server bug, not a crash
        log.exception("%s: cannot encode the reply to %s", name, summary(req))
        return codec.encode_reply(None, errno.EIO, f"internal error in {name}")


class Dispatch:
    """Decoding, checking (roles, `valid()`) and running the calls of one service, for both
    ways in, and for the in-process twin of a server (fs/client/transport.LocalTransport)."""

    def __init__(self, methods: dict[str, Method], impl: Any, service: Optional[str] = None) -> None:
        self.methods = methods
        self.impl = impl
        #: the service's name when its calls are counted (proto/metrics.py); None: not
        self.service = service
        self.metrics = metrics.rpc() if service is not None else None
        #: methods of impl that take the caller
        self.wants_caller = {
            name for name in methods
            if callable(getattr(impl, name, None)) and "caller" in inspect.signature(getattr(impl, name)).parameters
        }

    def decode(self, name: str, frame: bytes, caller: Caller) -> Message | bytes:
        """The checked request, or the error reply frame to send instead."""
        method = self.methods.get(name)
        if method is None or getattr(self.impl, name, None) is None or name == STREAM_METHOD:
            return codec.encode_reply(None, errno.ENOSYS, f"{name} not implemented")
        if caller.role not in method.roles:
            return codec.encode_reply(None, errno.EACCES, f"{name} is not for a {caller.role} credential")
        try:
            req: Message = codec.decode_request(method.request, frame)
            problem = req.valid()
        except ValueError as exc:
            return codec.encode_reply(None, errno.EINVAL, str(exc))
        if problem:
            return codec.encode_reply(None, errno.EINVAL, problem)
        ctx = getattr(req, "ctx", None)
        if caller.squash and isinstance(ctx, Ctx):
            setattr(req, "ctx", caller.identity(ctx))  # the ids this credential may speak for
        return req

    def call(self, name: str, req: Message, caller: Caller) -> Any:
        """Run one checked call; its reply, or raises."""
        fn = getattr(self.impl, name)
        return fn(req, caller=caller) if name in self.wants_caller else fn(req)

    def reply(self, name: str, result: Any, req: Message, started: float) -> bytes:
        """The reply frame of a decoded call that began at `started` (perf_counter), counted."""
        if self.metrics is not None:
            self.metrics.observe(self.service, name, result, started)  # type: ignore[arg-type]
        return _reply_frame(name, result, req)

    def run(self, name: str, frame: bytes, caller: Caller) -> bytes:
        """Decode, check and run one unary call; the reply frame. Any thread."""
        started = time.perf_counter()
        method = self.methods.get(name)
        if method is not None and method.kind != UNARY:
            return codec.encode_reply(None, errno.EINVAL, f"{name} is a streamed method, not a unary one")
        req = self.decode(name, frame, caller)
        if isinstance(req, bytes):
            return req
        try:
            result = self.call(name, req, caller)
        except FsError as exc:
            result = exc
        except Exception:  # noqa: BLE001 - a handler bug must not take the server down
            log.exception("%s failed on %s", name, summary(req))
            result = FsError(errno.EIO, f"internal error in {name}")
        return self.reply(name, result, req, started)


class _Shares:
    """Per-caller bounds on the worker threads of a server (on its event loop)."""

    def __init__(self, pool: futures.ThreadPoolExecutor, limit: int) -> None:
        self.pool = pool
        self.limit = limit
        self._slots: dict[str, list] = {}  # caller -> [semaphore, calls using it]

    async def run(self, caller: Caller, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on a worker thread, once the caller has a share free."""
        key = str(caller)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = [asyncio.Semaphore(self.limit), 0]
        slot[1] += 1
        try:
            async with slot[0]:
                return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                del self._slots[key]


def _authenticate(context: Any, revocations: Revocations) -> Optional[Caller]:
    caller = caller_of(context)
    return None if caller is None or revocations.revoked(caller) else caller


class _StreamHandler:
    """Serves `/<service>/stream` (see the module docstring)."""

    def __init__(self, dispatch: Dispatch, revocations: Revocations, pool: futures.ThreadPoolExecutor,
                 shares: _Shares) -> None:
        self.dispatch = dispatch
        self.revocations = revocations
        self.pool = pool
        self.shares = shares
        self.running = 0  # stream calls on worker threads now, over every stream
        self.applying = 0  # batches applied on worker threads now (not inline), likewise
        self.apply_batch: Optional[Callable[..., list[BatchResult]]] = getattr(dispatch.impl, "apply_batch", None)
        #: batches run on the event-loop thread (the implementation's word: False when each
        #: of its statements is a network round trip, as with a database server)
        self.batches_inline: bool = getattr(dispatch.impl, "batches_inline", True)
        #: the server's framed port, named in every gRPC stream's greeting (0: none)
        self.frames_port = 0

    async def serve(self, request_iterator: Any, context: Any) -> None:
        """A gRPC stream; its greeting names the server's framed port, if it has one."""
        caller = _authenticate(context, self.revocations)
        if caller is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid stripefs credential")
            return  # (abort raises)
        await self.run(caller, request_iterator, context,
                       [frames.greeting_entry(self.frames_port)] if self.frames_port else [])

    async def run(self, caller: Caller, request_iterator: Any, context: Any, greeting: list) -> None:
        """A stream of `caller`, authenticated: on gRPC (serve) or on a framed connection
        (proto/frames.py), whose messages come from `request_iterator` and whose replies go
        to `context.write`."""
        counted = self.dispatch.metrics
        received = sent = None
        if counted is not None:
            received = counted.stream_messages.labels(self.dispatch.service, "received")
            sent = counted.stream_messages.labels(self.dispatch.service, "sent")
        out = _Replies(context, sent)
        slots = asyncio.Semaphore(STREAM_CALLS_IN_FLIGHT)
        tasks: set[asyncio.Task] = set()
        try:
            await out.send(greeting)  # the greeting: the stream is up
            async for message in request_iterator:
                try:
                    calls = codec.decode_request_batch(message)
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if received is not None:
                    received.inc()
                calls = await self._start_waits(calls, out, tasks, caller)
                if self.apply_batch is not None:
                    await self._apply(calls, out, tasks, caller)
                else:
                    together: list[tuple[int, str, bytes]] = []  # quick calls: run and answered together
                    for call_id, name, frame in calls:
                        method = self.dispatch.methods.get(name)
                        if method is not None and method.quick:
                            if self.running == 0 and len(calls) == 1:
                                await out.send([[call_id, self.dispatch.run(name, frame, caller)]])
                            else:
                                together.append((call_id, name, frame))
                            continue
                        await slots.acquire()
                        self.running += 1
                        self._spawn(tasks, self._run_group([(call_id, name, frame)], caller, out, slots))
                    for i in range(0, len(together), QUICK_GROUP_MAX):
                        await slots.acquire()
                        self.running += 1
                        self._spawn(tasks, self._run_group(together[i:i + QUICK_GROUP_MAX], caller, out, slots))
            # The client half-closed: answer what is still running, then end the stream.
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    @staticmethod
    def _spawn(tasks: set, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run_group(self, group: list[tuple[int, str, bytes]], caller: Caller, out: "_Replies",
                         slots: asyncio.Semaphore) -> None:
        """Run calls one after the other on a worker thread; their replies leave in one message."""
        try:
            try:
                replies = await self.shares.run(caller, self._run_all, group, caller)
            finally:
                self.running -= 1
            await out.send(replies)
        finally:
            slots.release()

    def _run_all(self, group: list[tuple[int, str, bytes]], caller: Caller) -> list[list]:
        return [[call_id, self.dispatch.run(name, frame, caller)] for call_id, name, frame in group]

    async def _start_waits(self, calls: list[tuple[int, str, bytes]], out: "_Replies", tasks: set,
                           caller: Caller) -> list[tuple[int, str, bytes]]:
        """Start the batch's WAIT calls as tasks of their own (they may wait long); the
        other calls, to run as the batch runs."""
        rest = []
        for call_id, name, frame in calls:
            method = self.dispatch.methods.get(name)
            if method is None or method.kind != WAIT:
                rest.append((call_id, name, frame))
                continue
            req = self.dispatch.decode(name, frame, caller)
            if isinstance(req, bytes):
                await out.send([[call_id, req]])
            else:
                self._spawn(tasks, self._wait_one(call_id, name, req, caller, out))
        return rest

    async def _wait_one(self, call_id: int, name: str, req: Message, caller: Caller, out: "_Replies") -> None:
        started = time.perf_counter()
        result = await _run_coroutine(name, req, getattr(self.dispatch.impl, name), caller)
        await out.send([[call_id, self.dispatch.reply(name, result, req, started)]])

    async def _apply(self, calls: list[tuple[int, str, bytes]], out: "_Replies", tasks: set, caller: Caller) -> None:
        """Run a batch in one store transaction, here on the event-loop thread: a metadata
        call is tens of microseconds of work, less than a hand-off to a worker thread."""
        assert self.apply_batch is not None
        started = time.perf_counter()
        checked: list[tuple[int, str, Message]] = []
        now: list[list] = []  # replies that may leave at once
        for call_id, name, frame in calls:
            req = self.dispatch.decode(name, frame, caller)
            if isinstance(req, bytes):
                now.append([call_id, req])
            else:
                checked.append((call_id, name, req))
        if not checked:
            await out.send(now)
            return
        def apply() -> list[BatchResult]:
            assert self.apply_batch is not None
            return self.apply_batch([(name, req) for _, name, req in checked],
                                    lambda name, req: self.dispatch.call(name, req, caller))

        try:
            if self.batches_inline:
                results = apply()
            else:
                self.applying += 1
                try:
                    results = await asyncio.get_running_loop().run_in_executor(self.pool, apply)
                finally:
                    self.applying -= 1
        except Exception:  # noqa: BLE001 - the whole batch failed (the store, say)
            log.exception("a batch of %d calls failed", len(checked))
            results = [(FsError(errno.EIO, "internal error"), None)] * len(checked)
        held: dict[Callable[[], None], list[list]] = {}
        for (call_id, name, req), (result, barrier) in zip(checked, results):
            entry = [call_id, self.dispatch.reply(name, result, req, started)]
            if barrier is None:
                now.append(entry)
            else:
                held.setdefault(barrier, []).append(entry)
        if now:
            await out.send(now)
        for barrier, entries in held.items():
            if self.running == 0:
                # Nothing else is waiting on a worker thread: an fsync here (~0.1 ms)
                # costs less than the hand-off to one and back.
                self.running += 1
                try:
                    await self._release_after(barrier, entries, out, inline=True)
                finally:
                    self.running -= 1
            else:
                self.running += 1
                self._spawn(tasks, self._release_after(barrier, entries, out))

    async def _release_after(self, barrier: Callable[[], None], entries: list[list], out: "_Replies",
                             inline: bool = False) -> None:
        started = time.perf_counter()
        try:
            if inline:
                barrier()
            else:
                try:
                    await asyncio.get_running_loop().run_in_executor(self.pool, barrier)
                finally:
                    self.running -= 1
        except Exception:  # noqa: BLE001 - not durable: the callers must not hear success
            log.exception("barrier %r failed", barrier)
            entries = [[call_id, codec.encode_reply(None, errno.EIO, "not made durable")]
                       for call_id, _ in entries]
        if self.dispatch.metrics is not None:
            self.dispatch.metrics.durability_wait.labels(self.dispatch.service).observe(time.perf_counter() - started)
        await out.send(entries)


class _Replies:
    """The reply side of one stream: one message per send, one send at a time."""

    def __init__(self, context: Any, sent: Any = None) -> None:
        self._context = context
        self._sent = sent  # the counter of messages sent (proto/metrics.py), if counted
        self._lock = asyncio.Lock()
        self._closed = False

    async def send(self, entries: list[list]) -> None:
        """Send replies; dropped if the stream is gone (its client asks again elsewhere: a
        task answering late, a lock wait say, must not fail on it)."""
        for i in range(0, max(len(entries), 1), codec.MAX_BATCH):
            async with self._lock:
                if self._closed:
                    return
                try:
                    await self._context.write(codec.encode_batch(entries[i : i + codec.MAX_BATCH]))
                    if self._sent is not None:
                        self._sent.inc()
                except Exception as exc:  # noqa: BLE001 - grpc raises several kinds here
                    if self._context.done():
                        self._closed = True
                        log.debug("%d replies dropped: their stream is closed (%r)", len(entries), exc)
                        return
                    raise


def _unary_handler(dispatch: Dispatch, name: str, revocations: Revocations, shares: _Shares) -> Callable:
    async def handle(frame: bytes, context: Any) -> bytes:
        caller = _authenticate(context, revocations)
        if caller is None:
            return codec.encode_reply(None, errno.EACCES, "no valid stripefs credential")
        return await shares.run(caller, dispatch.run, name, frame, caller)

    return handle


async def _run_coroutine(name: str, req: Message, fn: Callable, *args: Any) -> Any:
    """await fn(req, *args): its result, or the FsError to answer with (EIO, logged, for
    anything else: a handler bug must not take the server down)."""
    try:
        return await fn(req, *args)
    except FsError as exc:
        return exc
    except Exception:  # noqa: BLE001
        log.exception("%s failed on %s", name, summary(req))
        return FsError(errno.EIO, f"internal error in {name}")


def _wait_handler(dispatch: Dispatch, name: str, revocations: Revocations) -> Callable:
    async def handle(frame: bytes, context: Any) -> bytes:
        caller = _authenticate(context, revocations)
        if caller is None:
            return codec.encode_reply(None, errno.EACCES, "no valid stripefs credential")
        started = time.perf_counter()
        req = dispatch.decode(name, frame, caller)
        if isinstance(req, bytes):
            return req
        return dispatch.reply(name, await _run_coroutine(name, req, getattr(dispatch.impl, name), caller), req, started)

    return handle


def _upload_handler(dispatch: Dispatch, name: str, revocations: Revocations) -> Callable:
    async def handle(request_iterator: Any, context: Any) -> bytes:
        caller = _authenticate(context, revocations)
        if caller is None:
            return codec.encode_reply(None, errno.EACCES, "no valid stripefs credential")
        messages = request_iterator.__aiter__()
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            return codec.encode_reply(None, errno.EINVAL, f"{name}: no request")
        started = time.perf_counter()
        req = dispatch.decode(name, first, caller)
        if isinstance(req, bytes):
            return req
        result = await _run_coroutine(name, req, getattr(dispatch.impl, name), messages, caller,
                                      context.time_remaining())
        return dispatch.reply(name, result, req, started)

    return handle


def _download_handler(dispatch: Dispatch, name: str, revocations: Revocations) -> Callable:
    async def handle(frame: bytes, context: Any) -> Any:
        caller = _authenticate(context, revocations)
        if caller is None:
            yield codec.encode_reply(None, errno.EACCES, "no valid stripefs credential")
            return
        started = time.perf_counter()
        req = dispatch.decode(name, frame, caller)
        if isinstance(req, bytes):
            yield req
            return
        result = await _run_coroutine(name, req, getattr(dispatch.impl, name), caller)
        if isinstance(result, FsError):
            yield dispatch.reply(name, result, req, started)
            return
        head, chunks = result
        yield dispatch.reply(name, head, req, started)
        try:
            async for chunk in chunks:
                yield chunk
        except FsError as exc:
            await context.abort(grpc.StatusCode.DATA_LOSS, f"errno {exc.errno}: {exc.message}")
        except Exception:  # noqa: BLE001
            log.exception("%s failed on %s", name, summary(req))
            await context.abort(grpc.StatusCode.DATA_LOSS, f"errno {errno.EIO}: internal error in {name}")

    return handle


class Server:
    """A running server: `port` is the bound port; `stop()` ends it."""

    def __init__(self, service: str, methods: dict[str, Method], impl: Any, creds: Credentials,
                 listen: str, workers: int, revoked: Optional[str] = None,
                 max_connections: Optional[int] = None, frames_port: Optional[int] = 0) -> None:
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=service)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"{service}-rpc", daemon=True)
        self.thread.start()
        dispatch = Dispatch(methods, impl, service)
        revocations = Revocations(revoked)
        shares = _Shares(self.pool, max(1, min(CALLER_WORKERS, workers - 1)))
        #: calls running now, besides streams' (self.streams.running, .applying) and WAIT calls
        self.calls = 0
        handlers = {}
        for name, method in methods.items():
            if method.kind == UPLOAD:
                handlers[name] = grpc.stream_unary_rpc_method_handler(
                    self._counted(_upload_handler(dispatch, name, revocations)))
            elif method.kind == DOWNLOAD:
                handlers[name] = grpc.unary_stream_rpc_method_handler(
                    self._counted_stream(_download_handler(dispatch, name, revocations)))
            elif method.kind == WAIT:  # (waiting on others, not running: not counted)
                handlers[name] = grpc.unary_unary_rpc_method_handler(_wait_handler(dispatch, name, revocations))
            else:
                handlers[name] = grpc.unary_unary_rpc_method_handler(
                    self._counted(_unary_handler(dispatch, name, revocations, shares)))
        self.streams = _StreamHandler(dispatch, revocations, self.pool, shares)
        # A bound coroutine method: grpc.aio tells coroutine handlers from generators by it.
        handlers[STREAM_METHOD] = grpc.stream_stream_rpc_method_handler(self.streams.serve)

        cap = max_connections or default_max_connections()
        #: the framed port (proto/frames.py), on the same host; None: frames_port was None
        self.frames: Optional[frames.Frames] = None
        if frames_port is not None:
            # Half as many as gRPC's: the descriptors both ports may hold stay within
            # the limit's share (default_max_connections); a client refused there stays on
            # gRPC (fs/client/transport.py), and one framed connection a client is plenty.
            self.frames = frames.Frames(service, self.streams.run, creds, revocations, max(1, cap // 2))

        async def start() -> tuple[grpc.aio.Server, int]:
            options = SERVER_OPTIONS + [("grpc.max_allowed_incoming_connections", cap)]
            server = grpc.aio.server(migration_thread_pool=self.pool, options=options)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
            port = server.add_secure_port(listen, server_credentials(creds))
            if port == 0:
                raise OSError(errno.EADDRINUSE, f"cannot listen on {listen}")
            await server.start()
            if self.frames is not None:
                try:
                    self.streams.frames_port = await self.frames.start(_listen_host(listen), frames_port or 0)
                except BaseException:
                    await server.stop(None)
                    raise
            return server, port

        try:
            self._server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(START_TIMEOUT_S)
        except BaseException:
            self._close_loop()
            raise

    def _counted(self, handle: Callable) -> Callable:
        """A coroutine handler whose calls count in self.calls while they run."""
        async def counted(request: Any, context: Any) -> Any:
            self.calls += 1
            try:
                return await handle(request, context)
            finally:
                self.calls -= 1

        return counted

    def _counted_stream(self, handle: Callable) -> Callable:
        """An async generator handler whose calls count in self.calls while they run."""
        async def counted(request: Any, context: Any) -> Any:
            self.calls += 1
            try:
                async for message in handle(request, context):
                    yield message
            finally:
                self.calls -= 1

        return counted

    def busy(self) -> bool:
        """A call is running (on the event loop's thread: the counts are its own)."""
        return self.calls > 0 or self.streams.running > 0 or self.streams.applying > 0

    def stop(self, grace_s: Optional[float]) -> None:
        """Refuse new calls, give running ones `grace_s` to finish, then end them, and with
        them streams waiting for their client's next call and WAIT calls (a lock wait: its
        client asks again). Returns as soon as nothing runs: gRPC's own graceful stop also
        waits for every connection to close, and an idle one of a synchronous client (its
        channel reads the socket only during its calls, so it never sees the goodbye) held
        it for the whole grace. (A grace under STOP_EARLY_MIN_GRACE_S is left to gRPC.)"""
        async def stop() -> None:
            if self.frames is not None:
                self.frames.stop_listening()
            await end_server()
            if self.frames is not None:
                # What gRPC's stop does to its streams: the framed ones end too, their
                # calls answered (within the grace) or not (their clients ask again).
                self.frames.close()
            # gRPC ends a stopped server's calls by cancelling them, and their tasks still
            # have to run to their end on this loop: closing it with them pending destroyed
            # them mid-way (asyncio's "Task was destroyed but it is pending!", a
            # GeneratorExit traceback from grpc.aio; seen once in CI, in a metaserver's log).
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            if rest:
                await asyncio.wait(rest, timeout=STOP_SETTLE_S)

        async def end_server() -> None:
            if grace_s is None or grace_s < STOP_EARLY_MIN_GRACE_S:
                await self._server.stop(grace_s)
                return
            loop = asyncio.get_running_loop()
            # The second stop, which ends the graceful one, only while half its grace or
            # more (half a second at least) is left: grpc.aio's graceful stop, when its
            # grace runs out, cancels the calls of a server that a second stop may have
            # destroyed meanwhile (a segfault, seen in CI with a grace of 0). That is ample
            # for a second stop with nothing running to end the server, and the graceful
            # one then returns as it ended.
            last = loop.time() + grace_s / 2
            graceful = asyncio.ensure_future(self._server.stop(grace_s))
            while True:
                await asyncio.wait([graceful], timeout=STOP_POLL_S)
                if graceful.done() or loop.time() >= last:
                    break
                if not self.busy():
                    await self._server.stop(None)
                    break
            await graceful

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result()
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _listen_host(listen: str) -> str:
    """The host of a HOST:PORT listen address ("" for every address)."""
    host = frames.host_of(listen)
    return "" if host in ("", "0.0.0.0", "::") else host


def serve(service: str, methods: dict[str, Method], impl: Any, creds: Credentials, listen: str,
          workers: int = DEFAULT_WORKERS, revoked: Optional[str] = None,
          max_connections: Optional[int] = None, frames_port: Optional[int] = 0) -> tuple[Server, int]:
    """Start serving one service over mutual TLS; returns (server, bound port). Port 0 picks
    one. `revoked`: a file of names to refuse (proto/credentials.py); `max_connections`:
    connections held at most (default_max_connections()), and half as many on the framed
    port; `frames_port`: the port of its framed streams on the same host (proto/frames.py;
    0 picks one, None: none)."""
    server = Server(service, methods, impl, creds, listen, workers, revoked, max_connections, frames_port)
    return server, server.port


def secure_channel(address: str, creds: Credentials, service: str) -> grpc.Channel:
    """A channel to a server of `service`, whose certificate must be of that service's role."""
    return grpc.secure_channel(address, channel_credentials(creds),
                               options=CHANNEL_OPTIONS + SYNC_CHANNEL_OPTIONS + channel_options(SERVER_ROLE[service]))


def aio_secure_channel(address: str, creds: Credentials, service: str) -> grpc.aio.Channel:
    """The same for grpc.aio, on the running asyncio loop (a data server forwarding blocks)."""
    return grpc.aio.secure_channel(address, channel_credentials(creds),
                                   options=CHANNEL_OPTIONS + channel_options(SERVER_ROLE[service]))


def data_loss_errno(exc: grpc.RpcError) -> Optional[FsError]:
    """The FsError a server ended a DOWNLOAD with (DATA_LOSS, "errno N: text"), or None."""
    if not hasattr(exc, "code") or exc.code() != grpc.StatusCode.DATA_LOSS:
        return None
    head, _, text = (exc.details() or "").partition(": ")
    code = head.removeprefix("errno ")
    return FsError(int(code) if code.isdigit() else errno.EIO, text)


class Stub:
    """A blocking client of one service on one address (unary calls)."""

    def __init__(
        self, address: str, creds: Credentials, service: str, methods: dict[str, Method], wait_for_ready: bool = False
    ) -> None:
        """wait_for_ready=True: a call made while the server is unreachable waits (up to its
        deadline) for it to come back instead of failing at once; the request is only sent
        once connected, so even a non-idempotent call is never half-sent by this wait."""
        self.address = address
        self.wait_for_ready = wait_for_ready
        self.service = service
        self.methods = methods
        self.channel = secure_channel(address, creds, service)
        self._callables = {}
        for name, method in methods.items():
            path = f"/{service}/{name}"
            kind = {UPLOAD: self.channel.stream_unary, DOWNLOAD: self.channel.unary_stream}
            self._callables[name] = kind.get(method.kind, self.channel.unary_unary)(path)

    def close(self) -> None:
        self.channel.close()

    def call(self, name: str, req: Message | bytes, timeout: Optional[float] = 30.0) -> Any:
        """Blocking call: returns the reply message or raises FsError. `req` may be a frame
        already encoded with codec.encode_request (to send one block to several servers)."""
        meth = self.methods[name]
        try:
            frame = self._callables[name](
                req if isinstance(req, bytes) else codec.encode_request(req),
                timeout=timeout, wait_for_ready=self.wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise transport_error(self.address, name, exc) from None
        return codec.decode_reply(meth.reply, frame)


    def upload(self, name: str, head: Message, chunks: Any, timeout: Optional[float] = 30.0) -> Any:
        """Blocking UPLOAD call: `head`, then every message of the iterable `chunks`
        (codec.BlockChunks), which gRPC's own thread consumes as it sends. The reply
        message, or FsError."""
        def messages() -> Any:
            yield codec.encode_request(head)
            yield from chunks

        meth = self.methods[name]
        try:
            frame = self._callables[name](messages(), timeout=timeout, wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as exc:
            raise transport_error(self.address, name, exc) from None
        return codec.decode_reply(meth.reply, frame)

    def download(self, name: str, req: Message, timeout: Optional[float] = 30.0) -> tuple[Any, Any]:
        """Blocking DOWNLOAD call: (reply message, iterator of the chunks that follow it).
        FsError from the reply, or while iterating: the server's errno (DATA_LOSS), else
        TransportError."""
        meth = self.methods[name]
        replies = self._callables[name](codec.encode_request(req), timeout=timeout, wait_for_ready=self.wait_for_ready)

        def rest() -> Any:
            try:
                yield from replies
            except grpc.RpcError as exc:
                raise (data_loss_errno(exc) or transport_error(self.address, name, exc)) from None

        chunks = rest()
        try:
            first = next(replies)
        except StopIteration:
            raise TransportError(f"{name} to {self.address}: no reply") from None
        except grpc.RpcError as exc:
            raise (data_loss_errno(exc) or transport_error(self.address, name, exc)) from None
        try:
            return codec.decode_reply(meth.reply, first), chunks
        except FsError:
            replies.cancel()
            raise


def transport_error(address: str, name: str, exc: grpc.RpcError) -> TransportError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return TransportError(f"{name} to {address}: {code.name if code else 'transport'}: {details}")


# ---------------------------------------------------------------------------- failover

#: A server that says nothing for this long when it should (a new connection's greeting; a
#: reply, while no other reply arrives either) is taken for hung and left for the next of
#: its list, when there is one: long enough that a busy metaserver on a loaded 2-core
#: machine is not taken for a hung one (a call cut short anyway is tried again with twice
#: as long, fs/client/session.py), short against the 30 s call deadline and gRPC's ~10 s
#: keepalive (CHANNEL_OPTIONS), which would find a stopped server too, only later.
HUNG_AFTER_S = 5.0


#: A host name, an IPv4 address, or an IPv6 address in brackets.
_HOST = re.compile(r"\[[0-9A-Za-z:.%]+\]|[A-Za-z0-9._-]+")


def parse_addresses(value: str | Sequence[str]) -> list[str]:
    """The server addresses of `HOST:PORT[,HOST:PORT...]` or of a list of them, in order,
    each once; ValueError for an empty list or an address that is not HOST:PORT (HOST may
    be a bracketed IPv6 address)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        address = item.strip()
        host, _, port = address.rpartition(":")
        if not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT[,HOST:PORT...], got {value!r}")
        if address not in out:
            out.append(address)
    if not out:
        raise ValueError("no server address given")
    return out


class AddressList:
    """The addresses of the servers a caller may use (the metaservers, which all serve
    every caller) and the one it uses now. Not thread-safe: one thread (a trio run, a
    heartbeat thread) uses it."""

    def __init__(self, addresses: str | Sequence[str], label: str = "metaserver") -> None:
        self.addresses = parse_addresses(addresses)
        self.label = label
        self._current = 0
        self._failing: set[str] = set()  # failed since they last answered: moves from them are not news

    def __len__(self) -> int:
        return len(self.addresses)

    @property
    def current(self) -> str:
        return self.addresses[self._current]

    def move_on(self, failed: str, why: object) -> bool:
        """`failed` failed (`why`): if it is still the current one and there is another,
        the next in the list becomes current. Whether it moved; callers that saw the same
        server fail together move once."""
        if len(self.addresses) == 1 or failed != self.current:
            return False
        self._current = (self._current + 1) % len(self.addresses)
        level = logging.DEBUG if failed in self._failing else logging.WARNING
        self._failing.add(failed)
        log.log(level, "%s %s failed (%s); switching to %s", self.label, failed, why, self.current)
        return True

    def answered(self, address: str) -> None:
        """`address` answered a call: its next failure is news again."""
        if self._failing:
            self._failing.discard(address)


class ChannelWatch:
    """How gRPC sees a channel's connection (IDLE, CONNECTING, READY, TRANSIENT_FAILURE),
    kept current from gRPC's own polling thread. Watching also keeps a channel's attempts
    to reconnect going: gRPC's sync stack makes no progress on an attempt that no thread
    polls (seen here: fail-fast calls to a metaserver back for seconds still failing with
    "connect() timed out"), and nothing may be polling it while its server is skipped."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.state = grpc.ChannelConnectivity.IDLE
        self._changed = threading.Condition()
        channel.subscribe(self._note, try_to_connect=True)

    def _note(self, state: grpc.ChannelConnectivity) -> None:
        with self._changed:
            self.state = state
            self._changed.notify_all()

    def failing(self) -> bool:
        """The last attempt to connect failed: nothing listens there, or the server did not
        finish the handshake within gRPC's connect timeout (CHANNEL_OPTIONS: 0.2 s at
        first; a stopped process never does)."""
        return self.state == grpc.ChannelConnectivity.TRANSIENT_FAILURE

    def wait_ready(self, timeout_s: float) -> bool:
        """Blocking: whether the channel is connected, or is within timeout_s; False as
        soon as it is failing."""
        settled = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                   grpc.ChannelConnectivity.SHUTDOWN)
        # An idle channel (its connection closed) connects only when asked to.
        asked = grpc.channel_ready_future(self.channel) if self.state == grpc.ChannelConnectivity.IDLE else None
        try:
            with self._changed:
                self._changed.wait_for(lambda: self.state in settled, timeout_s)
                return self.state == grpc.ChannelConnectivity.READY
        finally:
            if asked is not None:
                asked.cancel()

    def close(self) -> None:
        self.channel.unsubscribe(self._note)


class AioChannelWatch:
    """ChannelWatch's `state` and `failing()` for a grpc.aio channel, kept current by
    `run()`, a task on the channel's loop, which also keeps the channel connecting."""

    def __init__(self) -> None:
        self.state = grpc.ChannelConnectivity.IDLE

    async def run(self, channel: grpc.aio.Channel) -> None:
        while True:
            self.state = state = channel.get_state(try_to_connect=True)
            await channel.wait_for_state_change(state)

    def failing(self) -> bool:
        return self.state == grpc.ChannelConnectivity.TRANSIENT_FAILURE


class FailoverStub:
    """A blocking client of one service on a list of servers (AddressList): each call goes
    to the current one; one that cannot be reached is skipped for the next (the call was not
    sent), one whose call fails in transport is left and the error raised (the call may have
    run: repeating it is the caller's decision, as with Stub). With one address, it is that
    address's Stub."""

    def __init__(self, addresses: str | Sequence[str], creds: Credentials, service: str,
                 methods: dict[str, Method], label: str = "metaserver") -> None:
        self.servers = AddressList(addresses, label)
        self._stubs = {a: Stub(a, creds, service, methods) for a in self.servers.addresses}
        self._watches = ({a: ChannelWatch(stub.channel) for a, stub in self._stubs.items()}
                         if len(self._stubs) > 1 else {})

    @property
    def address(self) -> str:
        return self.servers.current

    def close(self) -> None:
        for watch in self._watches.values():
            watch.close()
        for stub in self._stubs.values():
            stub.close()

    def call(self, name: str, req: Message | bytes, timeout: float = 30.0) -> Any:
        if len(self._stubs) == 1:
            return self._stubs[self.address].call(name, req, timeout=timeout)
        deadline = time.monotonic() + timeout
        for _ in range(len(self._stubs)):
            address = self.servers.current
            if not self._watches[address].wait_ready(max(0.0, min(HUNG_AFTER_S, deadline - time.monotonic()))):
                self.servers.move_on(address, "cannot connect")
                continue
            try:
                reply = self._stubs[address].call(name, req, timeout=max(0.0, deadline - time.monotonic()))
            except TransportError as exc:
                self.servers.move_on(address, exc.message)
                raise
            except FsError:
                self.servers.answered(address)
                raise
            self.servers.answered(address)
            return reply
        raise TransportError(f"{name}: no {self.servers.label} of {','.join(self.servers.addresses)} reachable")
