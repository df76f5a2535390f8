"""Calls made together, each one's value or error kept apart.

A trio nursery raises its tasks' errors as an ExceptionGroup, which is neither an FsError
nor an errno: the FUSE layer would answer EIO, a program would see a traceback. at_once
keeps each call's outcome, so the caller unwraps them in the order of precedence it
needs and an FsError stays an FsError.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

import outcome
import trio


async def at_once(*calls: Callable[[], Awaitable[Any]]) -> list[outcome.Outcome]:
    """Each call's outcome (`unwrap()` returns its value or raises its error), the calls
    made together: one round trip's wait where there were several."""
    out: list[Optional[outcome.Outcome]] = [None] * len(calls)

    async def one(i: int, call: Callable[[], Awaitable[Any]]) -> None:
        out[i] = await outcome.acapture(call)

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(one, i, call)
    return [o for o in out if o is not None]
