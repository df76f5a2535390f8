"""The rules of locks, apart from where they are stored: which locks conflict, what an
owner's locks become when it takes or releases a range (split and merged as Linux does),
and `LockEvents`, how a waiter hears that a file's locks changed.

A lock belongs to (session, owner): the owner is the kernel's lock owner of a mount (a
process for fcntl record locks, an open file description for OFD and flock locks), so
record locks of one owner never conflict with each other, and a process's new lock over
its own range replaces what it held there (F_RDLCK over F_WRLCK downgrades, and so on).
Record locks and flock locks are two separate kinds that never conflict, as on Linux.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional

#: Files whose generation is remembered before the ones nobody waits for are forgotten.
GENERATIONS_KEPT = 65536


@dataclass(frozen=True)
class Lock:
    session: int
    owner: int
    kind: int  # LOCK_RECORD or LOCK_FLOCK
    exclusive: bool
    start: int
    end: int  # inclusive
    pid: int

    @property
    def holder(self) -> tuple[int, int]:
        return self.session, self.owner


def first_conflict(locks: Iterable[Lock], want: Lock) -> Optional[Lock]:
    """The first lock of another owner that `want` cannot coexist with (the lowest start,
    as F_GETLK reports on Linux), or None."""
    found = [
        lock for lock in locks
        if lock.kind == want.kind and lock.holder != want.holder and (lock.exclusive or want.exclusive)
        and lock.start <= want.end and want.start <= lock.end
    ]
    return min(found, key=lambda lock: lock.start) if found else None


def set_range(mine: list[Lock], start: int, end: int, new: Optional[Lock]) -> list[Lock]:
    """One owner's locks of one kind on a file after it sets [start, end] to `new` (None:
    unlocks the range): what it held there is cut out (a lock across the range's edge is
    split), then `new` is merged with the owner's locks of its type that overlap or touch
    it, as Linux merges them. Sorted by start."""
    out: list[Lock] = []
    for lock in mine:
        if lock.end < start or lock.start > end:
            out.append(lock)
            continue
        if lock.start < start:
            out.append(dataclasses.replace(lock, end=start - 1))
        if lock.end > end:
            out.append(dataclasses.replace(lock, start=end + 1))
    if new is not None:
        kept: list[Lock] = []
        for lock in out:
            if lock.exclusive == new.exclusive and lock.start <= new.end + 1 and new.start <= lock.end + 1:
                new = dataclasses.replace(new, start=min(new.start, lock.start), end=max(new.end, lock.end))
            else:
                kept.append(lock)
        out = kept + [new]
    return sorted(out, key=lambda lock: lock.start)


class LockEvents:
    """Each file's lock generation, and the waiters for it to change.

    A waiter (metaserver/locks.py lock_wait) names the generation it was refused at; it is
    answered as soon as the file's locks change after that, or at its timeout, and then
    asks for its lock again. A change is announced after the operation's transaction (it
    may only wake a waiter too early, never too late). Any thread may announce; waiters
    wait on an asyncio loop (the RPC server's), woken through call_soon_threadsafe.

    Generations come from one counter that starts at this process's start time in
    nanoseconds, so a generation handed out before a restart is never mistaken for one
    after it; a file never changed since is at `base`."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self.base = time.time_ns()
        self._counter = self.base
        self._gen: dict[int, int] = {}
        self._waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def current(self, ino: int) -> int:
        with self._mu:
            return self._gen.get(ino, self.base)

    def changed(self, inos: Iterable[int]) -> None:
        """The locks of `inos` changed: a new generation each, their waiters woken."""
        with self._mu:
            for ino in set(inos):
                self._counter += 1
                self._gen[ino] = self._counter
                for loop, event in self._waiters.get(ino, ()):
                    loop.call_soon_threadsafe(event.set)
            if len(self._gen) > GENERATIONS_KEPT:
                # Forget the files nobody waits for: a waiter that was refused at one of
                # them and has not started waiting yet waits for its timeout at worst.
                self._gen = {ino: gen for ino, gen in self._gen.items() if ino in self._waiters}

    async def wait(self, ino: int, seen: int, timeout_s: float) -> int:
        """Wait until the generation of `ino` is no longer `seen`, at most timeout_s; the
        generation then."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._mu:
            if self._gen.get(ino, self.base) != seen:
                return self._gen.get(ino, self.base)
            self._waiters.setdefault(ino, []).append(waiter)
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._mu:
                waiters = self._waiters[ino]
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[ino]
        return self.current(ino)

    def waited(self) -> list[int]:
        """The files somebody waits for."""
        with self._mu:
            return list(self._waiters)

    def waiting(self) -> int:
        with self._mu:
            return sum(len(w) for w in self._waiters.values())
