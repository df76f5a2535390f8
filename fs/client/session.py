"""The client's session with the metaserver, and the retry rules of every metadata call.

A session is a lease: open files hang off it, so that an unlinked file stays readable
while any session holds it, and a client that dies releases what it held when its lease
runs out. `MetaSession` opens it, renews it, replaces it when it expired under us (a long
metaserver outage) and closes it. Every metadata call of the client goes through
`MetaSession.call`, which:
- repeats a call that failed in transport only if repeating it is harmless: it is
  idempotent (IDEMPOTENT_META_CALLS), or it is a `once` call (proto/services.py), which
  carries a request id the metaserver records its reply under, so that a repeat gets the
  first answer instead of running twice (a create whose reply was lost is not EEXIST);
  with backoff, within META_TIMEOUT_S;
- with several metaservers (transport.py FailoverTransport, which moves between them),
  lets the transport give such a call up when its metaserver says nothing for
  HUNG_AFTER_S, and repeats it there on the next one, each time with twice the patience,
  so that a call that is only slow still gets its answer; a lock wait may be moved at any
  time (locks.py asks again). The session is in the shared store: a moved client keeps it;
- replaces an expired session (ESTALE) and repeats the call in the new one;
- registers again, in the session that is ours when its reply arrives, an open (or a
  create) whose reply names the session it was recorded in as one replaced meanwhile (with
  several metaservers a reply can outlast its session): the replacement registered only
  the opens the client had counted, and the caller counts this one in the new session.

Releases do not make the caller wait: `release_soon` queues them and one background task
sends whatever is queued together (one message, one metaserver transaction). Until it is
sent the metaserver counts the file as still open, which only delays the purge of an
unlinked file; a client that dies with releases queued is cleaned up by its session's
expiry, as one that dies with files open. A release takes back an open of the session
that was ours when it was queued: an open of an expired session went with it, and sent in
the new one it would take back an open registered there for a handle still open (an
unlinked file could then be purged under its reader). None leaves while a replacement
registers the open files again, so that none arrives before the open it takes back.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import secrets
import socket
import time
from typing import Any, Awaitable, Callable, Optional

import trio

from stripefs.proto import messages as m
from stripefs.proto import metrics
from stripefs.proto.errors import FsError, TransportError
from stripefs.proto.rpc import HUNG_AFTER_S
from stripefs.proto.services import META_METHODS, WAIT

from .transport import Transport

_metrics = metrics.client()

log = logging.getLogger("stripefs.client")

#: Metadata RPC deadline. Calls made while the metaserver is unreachable wait this long
#: for it to come back before failing with EIO.
META_TIMEOUT_S = 30.0
#: Metadata calls that may be repeated after a transport failure mid-call. `open` is not
#: quite idempotent (a repeat counts one handle more, so an unlinked file is purged at the
#: session's end rather than its last close) but harmless; `release` is not: a `once` call.
IDEMPOTENT_META_CALLS = frozenset({
    "lookup", "getattr", "readlink", "readdir", "getxattr", "listxattr", "statfs", "block_map",
    "status", "renew_session", "open", "alloc_blocks", "sync", "usage", "find",
})
#: Calls that name the session itself and must not trigger its replacement.
_SESSION_CALLS = frozenset({"renew_session", "close_session"})
#: Deadline of a bad-replica report (best effort).
REPORT_TIMEOUT_S = 5.0
#: How long a release waits for others to go with it: a reader of many small files closes
#: one every millisecond or so, and releases sent together cost one metaserver transaction.
RELEASE_LINGER_S = 0.005


def new_request_id() -> int:
    """A request id for a `once` call: random, so that ids of all clients never meet
    (63 bits: the wire carries signed 64-bit integers)."""
    return secrets.randbits(63) or 1


class MetaSession:
    """The session and the metadata calls of one client (module docstring)."""

    def __init__(self, transport: Transport, mountpoint: str) -> None:
        self.transport = transport
        self.mountpoint = mountpoint
        self.id = 0  # the session id; open files and leases hang off it
        self.lease_s = 30.0
        self.record_open_after_s = 0.0  # (SessionReply)
        self._replace_lock = trio.Lock()
        # Unbounded: one small record per closed file, drained as fast as the metaserver
        # answers; a close never waits on it.
        self._release_in, self._release_out = trio.open_memory_channel[tuple[int, int, tuple[int, ...]]](math.inf)
        self._releases_queued = 0
        self._releases_sent = 0
        self._release_progress = trio.Event()
        #: called after a replacement, to register open files again
        self.on_replaced: Optional[Callable[[], Awaitable[None]]] = None

    @property
    def address(self) -> str:
        return self.transport.address

    async def start(self, nursery: trio.Nursery) -> None:
        await self._open()
        nursery.start_soon(self._renew_loop)
        nursery.start_soon(self._send_releases)

    async def _open(self) -> None:
        reply = await self.call("open_session", m.SessionOpenReq(socket.gethostname(), self.mountpoint))
        self.id, self.lease_s = reply.session, reply.lease_s
        self.record_open_after_s = reply.record_open_after_s

    async def _renew_loop(self) -> None:
        while True:
            await trio.sleep(self.lease_s / 3)
            try:
                await self.call("renew_session", m.SessionReq(self.id))
            except FsError as exc:
                if exc.errno == errno.ESTALE:
                    await self._replace(self.id)
                else:
                    log.warning("session renewal failed: %s", exc)

    async def _replace(self, expired: int) -> None:
        """Our session expired (the metaserver did not hear from us for several leases):
        open a new one and let the client register again the files it holds open."""
        if self.id != expired:
            return  # another task already replaced it
        if self._replace_lock.statistics().owner is trio.lowlevel.current_task():
            # A call of the replacement itself (registering the open files again): the new
            # session expired too. That call fails (our id is still the expired one); the
            # call that began the replacement finds the new id stale as well and replaces
            # it again.
            return
        async with self._replace_lock:
            if self.id != expired:
                return
            log.warning("session %d expired; opening a new one", expired)
            await self._open()
            if self.on_replaced is not None:
                await self.on_replaced()

    async def close(self) -> None:
        await self.flush_releases()
        try:
            await self.call("close_session", m.SessionReq(self.id))
        except FsError as exc:
            log.warning("closing session %d failed: %s", self.id, exc)

    async def call(self, name: str, req: m.Message) -> Any:
        """One metadata call with the retry rules of the module docstring (counted:
        proto/metrics.py)."""
        started = time.perf_counter()
        outcome: Optional[BaseException] = None
        try:
            reply = await self._call(name, req)
            opened_in = getattr(reply, "opened_in", 0)
            if opened_in and opened_in != self.id:
                await self._open_again(reply.attr.ino, req, opened_in, getattr(reply, "grant", b""))
            return reply
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            if not isinstance(outcome, trio.Cancelled):
                _metrics.meta_calls.observe((name,), outcome, started)

    async def _open_again(self, ino: int, req: m.Message, opened_in: int, grant: bytes) -> None:
        """An open (or create) the metaserver recorded in a session that we replaced while
        its reply was on its way: that open went with the old session, and the replacement
        did not register it again (it registers the opens the client had counted), so it
        is registered now in ours, before the caller counts it (its release will go here).
        Only with several metaservers can a reply outlast its session so."""
        assert isinstance(req, (m.OpenReq, m.MknodReq))
        flags = req.flags & ~os.O_TRUNC if isinstance(req, m.OpenReq) else os.O_WRONLY  # (a create: for writing)
        log.warning("inode %d: opened in session %d, replaced since: opening it again in session %d",
                    ino, opened_in, self.id)
        await self.call("open", m.OpenReq(ino, self.id, req.ctx, flags, grant=grant, map_wanted=False))

    async def _call(self, name: str, req: m.Message) -> Any:
        deadline = time.monotonic() + META_TIMEOUT_S
        delay = 0.1
        method = META_METHODS[name]
        repeatable = method.once or name in IDEMPOTENT_META_CALLS
        if method.once and not getattr(req, "rid", 0):
            req = dataclasses.replace(req, rid=new_request_id())  # type: ignore[type-var]
        # How long the call may hear nothing before it is tried on another metaserver
        # (None: never moved, it must not run twice; a wait hears nothing until its event).
        patience = math.inf if method.kind == WAIT else HUNG_AFTER_S if repeatable else None
        while True:
            try:
                return await self.transport.call(name, req, max(0.0, deadline - time.monotonic()), patience)
            except TransportError as exc:
                # The call may or may not have run; repeat it only if that is harmless.
                if not repeatable or time.monotonic() + delay > deadline:
                    if method.kind != WAIT:  # (a wait's caller asks again: locks.py)
                        log.error("metaserver %s: %s failed: %s", self.address, name, exc)
                    raise
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
                if patience is not None:
                    patience *= 2  # slow rather than hung, maybe: wait longer next time
            except FsError as exc:
                session = getattr(req, "session", None)
                if not (exc.errno == errno.ESTALE and session and name not in _SESSION_CALLS):
                    raise
                # The session expired under us (a long metaserver outage): replace it, retry.
                await self._replace(session)
                if self.id == session:
                    raise
                req = dataclasses.replace(req, session=self.id)  # type: ignore[type-var]

    # ------------------------------------------------------------------ releases

    def release_soon(self, ino: int, session: int = 0, abandon: tuple[int, ...] = ()) -> None:
        """An open of `ino` recorded in `session` (by default our current one) is gone: tell
        the metaserver soon, with the allocations of the file it leaves unused (`abandon`,
        block ids)."""
        self._releases_queued += 1
        self._release_in.send_nowait((ino, session or self.id, abandon))

    async def flush_releases(self) -> None:
        """Wait until every release queued so far has been sent."""
        target = self._releases_queued
        while self._releases_sent < target:
            await self._release_progress.wait()

    async def _send_releases(self) -> None:
        async for first in self._release_out:
            await trio.sleep(RELEASE_LINGER_S)
            batch = [first]
            while True:
                try:
                    batch.append(self._release_out.receive_nowait())
                except trio.WouldBlock:
                    break
            async with self._replace_lock:
                pass  # (a replacement registering the open files again: after it)
            async with trio.open_nursery() as nursery:
                # Started together, they leave in one stream message.
                for ino, session, abandon in batch:
                    if session == self.id:  # (else its open and allocations went with the expired session)
                        nursery.start_soon(self._release, ino, session, abandon)
            self._releases_sent += len(batch)
            self._release_progress.set()
            self._release_progress = trio.Event()

    async def _release(self, ino: int, session: int, abandon: tuple[int, ...]) -> None:
        try:
            # (The metaserver does nothing for a session it no longer has: not ESTALE,
            # so the call is not repeated in a new one.)
            await self.call("release", m.ReleaseReq(ino, session, abandon=list(abandon)))
        except FsError as exc:
            # The metaserver drops our opens with the session anyway; an unlinked file is
            # purged then instead of now.
            log.warning("release of inode %d failed: %s", ino, exc)

    # ------------------------------------------------------------------ reports

    def report_soon(self, nursery: trio.Nursery, name: str, req: m.Message) -> None:
        """A best-effort call nobody waits for (bad-replica reports)."""

        async def send() -> None:
            try:
                await self.transport.call(name, req, REPORT_TIMEOUT_S)
            except FsError:
                pass  # heartbeats and scrubbing find it too

        nursery.start_soon(send)
