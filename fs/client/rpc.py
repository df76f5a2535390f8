"""The one bridge between trio and grpcio in the client.

A call starts with grpcio's non-blocking `future()`; its done-callback (run on a gRPC
thread) wakes the waiting trio task through the trio token. The trio thread never blocks
on the network. Replies are decoded on the trio thread; that is a memcpy of the payload at
worst, and keeps the errno mapping in one place (proto.rpc.Stub.result).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import trio

from proto.messages import Message
from proto.rpc import Stub

log = logging.getLogger("stripefs.client")


async def call(stub: Stub, name: str, req: Message, timeout_s: Optional[float] = 30.0) -> Any:
    """Call `name` on `stub` without blocking the trio thread; returns the reply or raises FsError."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_fut: Any) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:  # the client shut down while the call was in flight
            pass

    fut = stub.future(name, req, timeout=timeout_s)
    fut.add_done_callback(wake)
    try:
        await done.wait()
    except trio.Cancelled:
        fut.cancel()
        raise
    return stub.result(name, fut)

