"""The one bridge between trio and grpcio in the client.

A call runs grpcio's blocking unary call on a worker thread (`trio.to_thread.run_sync`),
so the trio thread never blocks on the network, and encoding/decoding of the frame (a
memcpy of block payloads) happens off it too. Measured here (see docs/client.md): this
costs ~1.2 ms a call on a loaded 2-core machine against ~1.8 ms for grpcio's `future()` +
done-callback, whose per-call channel-spin thread start dominates.

At most MAX_CALLS_IN_FLIGHT calls run at once per trio run; a cancelled caller abandons
its thread, whose call then ends by its own deadline.
"""

from __future__ import annotations

from typing import Any, Optional

import trio

from proto.errors import TransportError
from proto.messages import Message
from proto.rpc import Stub

#: Worker threads that may be inside a gRPC call at once (per trio run).
MAX_CALLS_IN_FLIGHT = 64
#: How long past its deadline a call is given up on by the caller if gRPC has not ended it.
DEADLINE_BACKSTOP_S = 2.0

_limiter: trio.lowlevel.RunVar = trio.lowlevel.RunVar("stripefs_rpc_limiter")


def _get_limiter() -> trio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(MAX_CALLS_IN_FLIGHT)
        _limiter.set(limiter)
        return limiter


async def call(stub: Stub, name: str, req: Message | bytes, timeout_s: Optional[float] = 30.0) -> Any:
    """Call `name` on `stub` without blocking the trio thread; returns the reply or raises FsError."""
    if timeout_s is None:
        return await trio.to_thread.run_sync(
            stub.call, name, req, None, abandon_on_cancel=True, limiter=_get_limiter()
        )
    # gRPC enforces the deadline itself; this is the backstop for when it does not (seen:
    # calls to a server whose link went down stayed blocked past their deadline). The
    # worker thread is abandoned and ends whenever gRPC lets it go.
    with trio.move_on_after(timeout_s + DEADLINE_BACKSTOP_S):
        return await trio.to_thread.run_sync(
            stub.call, name, req, timeout_s, abandon_on_cancel=True, limiter=_get_limiter()
        )
    raise TransportError(f"{name} to {stub.address}: no answer within {timeout_s:.0f} s")
