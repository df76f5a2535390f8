"""A client's locks: taking, testing and releasing them on the metaserver, waiting for
one without polling, and releasing what a close releases.

The metaserver keeps every lock (metaserver/locks.py); this side remembers only which
owners took locks through which handle and on which file, so that a close that holds none
(nearly every close) costs no round trip:
- a process's close of any descriptor drops its record locks on the file
  (`owner_closed`, called by the mount at every flush with the kernel's lock owner);
- the last close of an open file description drops what was taken through it (its OFD
  and flock locks, and anything a process left: `handle_closed`).

A waiting lock (`wait=True`) asks, and when refused waits on the metaserver (`lock_wait`)
until the file's locks change, then asks again; a wait cut short by the transport (the
metaserver went away, or the client moved to another, transport.py) asks again too. The ask
itself is shielded from cancellation (a FUSE interrupt): a lock the metaserver granted is
always known here. Cancelling the wait in between leaves nothing behind.

A session that expired (the client was cut off for 3 leases) lost its locks on the
metaserver; the client logs which files it held locks on, and a new lock is asked for in
the new session.
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Awaitable, Callable, Optional

import trio

from stripefs.proto import messages as m
from stripefs.proto.errors import FsError, TransportError
from stripefs.proto.types import LOCK_RECORD, LOCK_WAIT_MAX_S, OFFSET_MAX

log = logging.getLogger("stripefs.client")

Call = Callable[[str, m.Message], Awaitable[Any]]


def signed64(owner: int) -> int:
    """The kernel's 64-bit lock owner id as the signed number the wire carries."""
    return owner - (1 << 64) if owner >= 1 << 63 else owner


class Locks:
    def __init__(self, call: Call, session_id: Callable[[], int]) -> None:
        self._call = call
        self._session_id = session_id
        self._owners_of_handle: dict[int, set[int]] = {}  # handle -> owners that locked through it
        self._owners_on_file: dict[int, set[int]] = {}  # inode -> owners that may hold locks on it

    async def test(self, ino: int, owner: int, type: int, start: int = 0, end: int = OFFSET_MAX,
                   kind: int = LOCK_RECORD) -> Optional[m.LockReply]:
        """F_GETLK: a lock of another owner that would conflict (its type, range and pid),
        or None."""
        reply = await self._call("lock", m.LockReq(self._session_id(), ino, owner, type, kind, start, end, test=True))
        return None if reply.granted else reply

    async def set(self, fh: int, ino: int, owner: int, type: int, *, kind: int = LOCK_RECORD, start: int = 0,
                  end: int = OFFSET_MAX, pid: int = 0, wait: bool = False) -> Optional[m.Attr]:
        """Take (F_RDLCK, F_WRLCK) or release (F_UNLCK) a range; EAGAIN if another owner
        holds a conflicting lock and not `wait`. A lock taken: the file's attributes as
        the metaserver had them then."""
        if type != m.F_UNLCK:
            self._owners_of_handle.setdefault(fh, set()).add(owner)
            self._owners_on_file.setdefault(ino, set()).add(owner)
        while True:
            req = m.LockReq(self._session_id(), ino, owner, type, kind, start, end, pid)
            with trio.CancelScope(shield=True):
                reply = await self._call("lock", req)
            if reply.granted:
                return reply.attr
            if not wait:
                raise FsError(errno.EAGAIN, f"inode {ino}: bytes {reply.start}-{reply.end} are locked"
                                            f" by process {reply.pid}")
            try:
                await self._call("lock_wait", m.LockWaitReq(req.session, ino, reply.gen, LOCK_WAIT_MAX_S))
            except TransportError:
                pass  # the metaserver went away, or the client moved to another: ask there

    def may_hold(self, ino: int, owner: int) -> bool:
        return owner in self._owners_on_file.get(ino, ())

    def taken_through(self, fh: int) -> bool:
        return fh in self._owners_of_handle

    async def owner_closed(self, ino: int, owner: int) -> None:
        """`owner` closed a descriptor of the file: its record locks on it go."""
        owners = self._owners_on_file.get(ino)
        if owners is None or owner not in owners:
            return
        await self._call("unlock_owners", m.UnlockOwnersReq(self._session_id(), ino, [owner]))
        owners.discard(owner)
        if not owners:
            del self._owners_on_file[ino]

    async def handle_closed(self, fh: int, ino: int) -> None:
        """The open file description `fh` is closed for good: whatever was locked through
        it goes."""
        owners = self._owners_of_handle.pop(fh, None)
        if not owners:
            return
        await self._call("unlock_owners", m.UnlockOwnersReq(self._session_id(), ino, sorted(owners)))
        left = self._owners_on_file.get(ino, set()) - owners
        if left:
            self._owners_on_file[ino] = left
        else:
            self._owners_on_file.pop(ino, None)

    def session_lost(self) -> None:
        """The session expired: the metaserver dropped every lock of ours."""
        if self._owners_on_file:
            log.error("session expired: locks on inodes %s may have been lost (other clients may"
                      " have taken them meanwhile)", sorted(self._owners_on_file))
        self._owners_on_file.clear()
        self._owners_of_handle.clear()
