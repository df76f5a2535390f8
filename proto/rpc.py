"""gRPC glue: generic handlers on the server side, a thin stub on the client side. No protoc.

Server: `serve(service_name, methods, impl, ...)` binds each method of a table to
`impl.<name>(request)`. The handler decodes and checks the request (`valid()`), so an
implementation only ever sees well-formed messages; FsError becomes an errno reply, any
other exception is logged and becomes EIO. A server never dies on what a client sends.

Client: `Stub(address, secret)` has `call()` (blocking) and `future()` (non-blocking, for
the trio bridge in fs/client). Transport failures become FsError(EIO).
"""

from __future__ import annotations

import errno
import logging
from concurrent import futures
from typing import Any, Callable, Optional

import grpc

from . import codec
from .auth import AUTH_METADATA_KEY, call_credential, check_credential
from .errors import FsError, TransportError
from .messages import Message
from .services import Method

log = logging.getLogger("stripefs.rpc")

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly after a server comes back: the default backoff grows to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.min_reconnect_backoff_ms", 200),
]


def _handler(method: Method, impl: Any, secret: bytes) -> Callable[[bytes, Any], bytes]:
    fn = getattr(impl, method.name, None)

    def handle(frame: bytes, context: grpc.ServicerContext) -> bytes:
        if fn is None:  # a server older than the contract: say so instead of failing
            return codec.encode_reply(None, errno.ENOSYS, f"{method.name} not implemented")
        presented = dict(context.invocation_metadata()).get(AUTH_METADATA_KEY)
        if not check_credential(secret, presented):
            return codec.encode_reply(None, errno.EACCES, "bad or missing cluster credential")
        try:
            req = codec.decode_request(method.request, frame)
            problem = req.valid()
        except ValueError as exc:
            return codec.encode_reply(None, errno.EINVAL, str(exc))
        if problem:
            return codec.encode_reply(None, errno.EINVAL, problem)
        try:
            reply = fn(req)
        except FsError as exc:
            return codec.encode_reply(None, exc.errno, exc.message)
        except Exception:  # noqa: BLE001 - a handler bug must not take the server down
            log.exception("%s failed on %r", method.name, req)
            return codec.encode_reply(None, errno.EIO, f"internal error in {method.name}")
        return codec.encode_reply(reply)

    return handle


def generic_handler(service: str, methods: dict[str, Method], impl: Any, secret: bytes):
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(_handler(meth, impl, secret))
        for name, meth in methods.items()
    }
    return grpc.method_handlers_generic_handler(service, handlers)


def serve(
    service: str,
    methods: dict[str, Method],
    impl: Any,
    secret: bytes,
    listen: str,
    workers: int = 16,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for one service; returns (server, bound port). Port 0 picks one."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=service),
        options=CHANNEL_OPTIONS,
    )
    server.add_generic_rpc_handlers((generic_handler(service, methods, impl, secret),))
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(errno.EADDRINUSE, f"cannot listen on {listen}")
    server.start()
    return server, port


class Stub:
    """A client of one service on one address."""

    def __init__(
        self, address: str, secret: bytes, service: str, methods: dict[str, Method], wait_for_ready: bool = False
    ) -> None:
        """wait_for_ready=True: a call made while the server is unreachable waits (up to its
        deadline) for it to come back instead of failing at once; the request is only sent
        once connected, so even a non-idempotent call is never half-sent by this wait."""
        self.address = address
        self.wait_for_ready = wait_for_ready
        self.service = service
        self.methods = methods
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._metadata = ((AUTH_METADATA_KEY, call_credential(secret)),)
        self._callables = {
            name: self.channel.unary_unary(f"/{service}/{name}") for name in methods
        }

    def close(self) -> None:
        self.channel.close()

    def call(self, name: str, req: Message | bytes, timeout: Optional[float] = 30.0) -> Any:
        """Blocking call: returns the reply message or raises FsError. `req` may be a frame
        already encoded with codec.encode_request (to send one block to several servers)."""
        meth = self.methods[name]
        try:
            frame = self._callables[name](
                req if isinstance(req, bytes) else codec.encode_request(req),
                timeout=timeout, metadata=self._metadata,
                wait_for_ready=self.wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise transport_error(self.address, name, exc) from None
        return codec.decode_reply(meth.reply, frame)

    def future(self, name: str, req: Message, timeout: Optional[float] = 30.0) -> grpc.Future:
        """Start a call without blocking; finish it with `result(name, future)`."""
        return self._callables[name].future(
            codec.encode_request(req), timeout=timeout, metadata=self._metadata,
            wait_for_ready=self.wait_for_ready,
        )

    def result(self, name: str, fut: grpc.Future) -> Any:
        """The reply of a finished future(), or FsError. Does not block if fut is done."""
        try:
            frame = fut.result()
        except grpc.RpcError as exc:
            raise transport_error(self.address, name, exc) from None
        except grpc.FutureCancelledError:
            raise FsError(errno.EINTR, f"{name} to {self.address} cancelled") from None
        return codec.decode_reply(self.methods[name].reply, frame)


def transport_error(address: str, name: str, exc: grpc.RpcError) -> TransportError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return TransportError(f"{name} to {address}: {code.name if code else 'transport'}: {details}")
