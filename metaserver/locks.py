"""Cluster-wide locks: fcntl record locks (process-owned and OFD), and flock locks.

Every lock of the cluster is a row of the `locks` table, so two mounts exclude each other
as two processes on one machine do; the rules (conflicts, splitting and merging an
owner's ranges) are locktable.py's. Three calls:

- `lock`: take, change or release a range, or test one (F_GETLK). A lock is granted at
  once or refused with the conflicting lock and the file's lock generation; it is never
  queued here. Taking one needs the file open in the session (a write lock: open for
  writing, as the kernel asks of fcntl F_WRLCK; not of flock).
- `lock_wait` (a WAIT method: proto/services.py): a refused waiter (F_SETLKW, flock without
  LOCK_NB) waits here until the file's locks change from the generation it was refused at,
  then asks again. It holds no thread; a release wakes it at once (LockEvents), and it
  asks again at most every LOCK_WAIT_MAX_S otherwise.
- `unlock_owners`: drop every lock of some owners on a file (a process closed a
  descriptor; an open file description was closed for the last time).

Locks belong to a session: its close or expiry (3 leases of silence) drops them, so the
locks of a mount that dies or is cut off go when its session expires. Every change is
made durable before the reply (one fsync, shared with concurrent ones), so a metaserver
that restarts remembers every lock a client was told it holds.

What Linux does and this does not: F_SETLKW's deadlock detection (EDEADLK) — waiters are
not queued here, so two owners that wait for each other wait until one is interrupted;
and the order in which waiters get a released lock is whoever asks first, not FIFO.
"""

from __future__ import annotations

import asyncio

from stripefs.proto.credentials import LOCAL, Caller
from stripefs.proto.messages import (F_RDLCK, F_UNLCK, F_WRLCK, Empty, LockReply, LockReq, LockWaitReply, LockWaitReq,
                                     UnlockOwnersReq)
from stripefs.proto.types import LOCK_FLOCK, LOCK_RECORD, LOCK_WAIT_MAX_S

from .base import CoreBase
from .locktable import Lock, first_conflict, set_range
from .store import Tx

_COLUMNS = "session_id, owner, kind, exclusive, start, end_, pid"


def _lock_of(row) -> Lock:
    return Lock(row[0], row[1], row[2], bool(row[3]), row[4], row[5], row[6])


class LockOps(CoreBase):
    def lock(self, req: LockReq, caller: Caller = LOCAL) -> LockReply:
        changed = False
        with self.store.transaction() as tx:
            self._session_exists(tx, req.session, caller)
            if req.type != F_UNLCK:
                write_lock = req.kind == LOCK_RECORD and req.type == F_WRLCK
                self._check_open(tx, req.session, req.ino, caller, writable=write_lock and not req.test)
            held = self._locks_on(tx, req.ino)
            mine = [lk for lk in held if lk.holder == (req.session, req.owner) and lk.kind == req.kind]
            want = Lock(req.session, req.owner, req.kind, req.type == F_WRLCK, req.start, req.end, req.pid)
            conflict = None if req.type == F_UNLCK else first_conflict(held, want)
            if req.test:
                pass
            elif conflict is None:
                new = set_range(mine, req.start, req.end, None if req.type == F_UNLCK else want)
                changed = new != mine
                if changed:
                    self._put_owner_locks(tx, req, new)
            elif req.kind == LOCK_FLOCK and mine:
                # Linux drops a flock lock that is being converted before it tries for the
                # new one: a conversion that is refused leaves no lock.
                self._put_owner_locks(tx, req, [])
                changed = True
            gen = self.lock_events.current(req.ino)
            taken = conflict is None and not req.test and req.type != F_UNLCK
            attr = self._attr(tx, req.ino) if taken else None
            if changed:
                self._locks_changed(tx, [req.ino])
        if changed:
            self.store.make_durable()
        if conflict is None:
            return LockReply(granted=True, gen=gen, attr=attr)
        return LockReply(granted=False, gen=gen, type=F_WRLCK if conflict.exclusive else F_RDLCK,
                         start=conflict.start, end=conflict.end, pid=conflict.pid)

    def unlock_owners(self, req: UnlockOwnersReq, caller: Caller = LOCAL) -> Empty:
        with self.store.transaction() as tx:
            self._session_exists(tx, req.session, caller)
            owners = [int(o) for o in req.owners]
            marks = ",".join("?" * len(owners))
            dropped = tx.run(f"DELETE FROM locks WHERE ino = ? AND session_id = ? AND owner IN ({marks})",
                             (req.ino, req.session, *owners)) if owners else 0
            if dropped:
                self._locks_changed(tx, [req.ino])
        if dropped:
            self.store.make_durable()
        return Empty()

    async def lock_wait(self, req: LockWaitReq, caller: Caller = LOCAL) -> LockWaitReply:
        if self.store.runs_inline:
            self.check_session(req.session, caller)
        else:  # a round trip to the database: not on the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.check_session, req.session, caller)
        gen = await self.lock_events.wait(req.ino, req.gen, min(req.wait_s, LOCK_WAIT_MAX_S))
        return LockWaitReply(gen=gen)

    @staticmethod
    def _locks_on(tx: Tx, ino: int) -> list[Lock]:
        return [_lock_of(r) for r in tx.all(f"SELECT {_COLUMNS} FROM locks WHERE ino = ?", (ino,))]

    @staticmethod
    def _put_owner_locks(tx: Tx, req: LockReq, locks: list[Lock]) -> None:
        tx.run("DELETE FROM locks WHERE ino = ? AND session_id = ? AND owner = ? AND kind = ?",
               (req.ino, req.session, req.owner, req.kind))
        tx.run_many(
            f"INSERT INTO locks (ino, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(req.ino, lk.session, lk.owner, lk.kind, int(lk.exclusive), lk.start, lk.end, lk.pid) for lk in locks],
        )
