"""Locks without a mount: the range rules (locktable.py) against a model of Linux's, and
the metaserver's lock calls (metaserver/locks.py) on a real store: exclusion between
sessions, the open that a lock needs, session expiry, restarts, and waking a waiter."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading

import pytest

from stripefs.metaserver.locktable import Lock, first_conflict, set_range
from stripefs.proto.credentials import CLIENT, Caller
from stripefs.proto.messages import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    LockReq,
    LockWaitReq,
    OpenReq,
    SessionOpenReq,
    SessionReq,
    UnlockOwnersReq,
)
from stripefs.proto.types import LOCK_FLOCK, LOCK_RECORD, OFFSET_MAX, ROOT_INODE
from engines import meta_engine, open_meta_store  # noqa: F401 - fixtures
from test_meta_core import Env, fails

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(open_meta_store):
    e = Env(open_meta_store)
    yield e
    e.core.close()


# ---------------------------------------------------------------- the range rules


def _bytes_of(locks: list[Lock], size: int) -> list[str]:
    """Per byte 0..size-1: "w", "r" or "-"."""
    out = ["-"] * size
    for lk in locks:
        for i in range(lk.start, min(lk.end, size - 1) + 1):
            assert out[i] == "-", "an owner's locks overlap"
            out[i] = "w" if lk.exclusive else "r"
    return out


def test_set_range_matches_a_per_byte_model():
    """Random sets and unlocks of one owner: the ranges describe what a byte-by-byte model
    holds, never overlap, and touching ranges of one type are merged, as Linux keeps them."""
    rng = random.Random(7)
    size = 64
    for _ in range(300):
        mine: list[Lock] = []
        model = ["-"] * size
        for _ in range(12):
            start = rng.randrange(size)
            end = rng.randrange(start, size)
            kind = rng.choice("wr-")
            new = None if kind == "-" else Lock(1, 1, LOCK_RECORD, kind == "w", start, end, 9)
            mine = set_range(mine, start, end, new)
            model[start : end + 1] = [kind] * (end - start + 1)
            assert _bytes_of(mine, size) == model
            for a, b in zip(mine, mine[1:]):
                assert not (a.exclusive == b.exclusive and a.end + 1 >= b.start), f"not merged: {a} {b}"


def test_unlocking_the_middle_splits_a_lock():
    whole = [Lock(1, 1, LOCK_RECORD, True, 0, OFFSET_MAX, 9)]
    left, right = set_range(whole, 10, 19, None)
    assert (left.start, left.end, right.start, right.end) == (0, 9, 20, OFFSET_MAX)


def test_conflicts_are_between_owners_of_one_kind():
    held = [Lock(1, 1, LOCK_RECORD, False, 0, 99, 9), Lock(1, 2, LOCK_FLOCK, True, 0, OFFSET_MAX, 8)]
    assert first_conflict(held, Lock(2, 1, LOCK_RECORD, False, 0, 10, 7)) is None  # shared
    assert first_conflict(held, Lock(2, 1, LOCK_RECORD, True, 50, 60, 7)).pid == 9
    assert first_conflict(held, Lock(2, 1, LOCK_RECORD, True, 100, 200, 7)) is None  # beyond
    assert first_conflict(held, Lock(1, 1, LOCK_RECORD, True, 0, 10, 7)) is None  # its own
    assert first_conflict(held, Lock(1, 3, LOCK_FLOCK, False, 0, OFFSET_MAX, 7)).pid == 8
    assert first_conflict(held, Lock(1, 2, LOCK_FLOCK, False, 0, OFFSET_MAX, 7)) is None


# ---------------------------------------------------------------- the metaserver's calls


def _opened(env: Env, name: bytes, flags: int = os.O_RDWR) -> tuple[int, int, int]:
    """A file, and two sessions that have it open."""
    ino = env.create(ROOT_INODE, name).ino
    sessions = [env.session(), env.session()]
    for s in sessions:
        env.core.open(OpenReq(ino=ino, session=s, flags=flags))
    return ino, sessions[0], sessions[1]


def lock(env: Env, session: int, ino: int, type: int, start: int = 0, end: int = OFFSET_MAX, *,
         owner: int = 1, kind: int = LOCK_RECORD, test: bool = False, pid: int = 0):
    return env.core.lock(LockReq(session, ino, owner, type, kind, start, end, pid, test))


def test_sessions_exclude_each_other_and_a_test_reports_the_holder(env):
    ino, s1, s2 = _opened(env, b"f")
    assert lock(env, s1, ino, F_WRLCK, 0, 99, pid=41).granted
    refused = lock(env, s2, ino, F_RDLCK, 50, 50, pid=42)
    assert not refused.granted and (refused.type, refused.start, refused.end, refused.pid) == (F_WRLCK, 0, 99, 41)
    test = lock(env, s2, ino, F_WRLCK, 10, 20, test=True)
    assert not test.granted and test.pid == 41
    assert lock(env, s2, ino, F_WRLCK, 100, 200).granted
    assert lock(env, s1, ino, F_UNLCK).granted
    assert lock(env, s2, ino, F_WRLCK, 0, 99).granted
    assert env.core.status(None).locks == 1  # s2's two ranges merged: [0, 200]


def test_a_lock_needs_the_file_open(env):
    ino = env.create(ROOT_INODE, b"f").ino
    alice = Caller(CLIENT, "alice")
    s = env.core.open_session(SessionOpenReq(host="h", mountpoint="/m"), caller=alice).session

    def as_alice(req: LockReq):
        return env.core.lock(req, caller=alice)

    fails(errno.EBADF, as_alice, LockReq(s, ino, 1, F_RDLCK))
    env.core.open(OpenReq(ino=ino, session=s, flags=os.O_RDONLY), caller=alice)
    assert as_alice(LockReq(s, ino, 1, F_RDLCK)).granted
    fails(errno.EBADF, as_alice, LockReq(s, ino, 1, F_WRLCK))  # a write lock needs a writable open
    assert as_alice(LockReq(s, ino, 1, F_WRLCK, LOCK_FLOCK)).granted  # flock does not
    bob = Caller(CLIENT, "bob")
    fails(errno.EPERM, lambda req: env.core.lock(req, caller=bob), LockReq(s, ino, 1, F_UNLCK))
    fails(errno.ESTALE, as_alice, LockReq(9999, ino, 1, F_RDLCK))


def test_refused_flock_conversion_loses_the_lock(env):
    ino, s1, s2 = _opened(env, b"f")
    assert lock(env, s1, ino, F_RDLCK, kind=LOCK_FLOCK).granted
    assert lock(env, s2, ino, F_RDLCK, kind=LOCK_FLOCK).granted
    assert not lock(env, s1, ino, F_WRLCK, kind=LOCK_FLOCK).granted
    assert lock(env, s2, ino, F_WRLCK, kind=LOCK_FLOCK).granted  # s1 holds nothing now


def test_unlock_owners_and_session_close_drop_locks(env):
    ino, s1, s2 = _opened(env, b"f")
    assert lock(env, s1, ino, F_WRLCK, 0, 9, owner=1).granted
    assert lock(env, s1, ino, F_WRLCK, 10, 19, owner=2).granted
    assert lock(env, s1, ino, F_WRLCK, 20, 29, owner=3).granted
    env.core.unlock_owners(UnlockOwnersReq(s1, ino, [1, 2]))
    assert lock(env, s2, ino, F_WRLCK, 0, 19).granted
    assert not lock(env, s2, ino, F_WRLCK, 20, 29).granted
    env.core.close_session(SessionReq(s1))
    assert lock(env, s2, ino, F_WRLCK, 20, 29).granted


def test_expired_session_loses_its_locks(env):
    ino, s1, s2 = _opened(env, b"f")
    assert lock(env, s1, ino, F_WRLCK).granted
    env.clock.advance(2 * 30.0)
    env.core.renew_session(SessionReq(s2))
    env.clock.advance(2 * 30.0)  # s1 silent for 4 leases, s2 for 2
    env.core.sweep()
    assert lock(env, s2, ino, F_WRLCK).granted


def test_locks_survive_a_metaserver_restart(env):
    ino, s1, s2 = _opened(env, b"f")
    assert lock(env, s1, ino, F_WRLCK, 5, 5, owner=-(2**63)).granted  # owners are signed 64-bit
    env.reopen()
    refused = lock(env, s2, ino, F_RDLCK)
    assert not refused.granted and (refused.start, refused.end) == (5, 5)


def test_invalid_lock_requests_are_refused():
    assert LockReq(1, 2, 3, 7).valid()  # no such type
    assert LockReq(1, 2, 3, F_RDLCK, start=10, end=9).valid()
    assert LockReq(1, 2, 3, F_RDLCK, kind=LOCK_FLOCK, start=1).valid()
    assert LockReq(1, 2, 3, F_UNLCK, test=True).valid()
    assert LockReq(1, 2, 2**64, F_RDLCK).valid()  # not a signed 64-bit owner
    assert LockWaitReq(1, 2, 3, wait_s=3600).valid()
    assert LockReq(1, 2, 3, F_RDLCK).valid() is None


def test_a_waiter_is_woken_by_the_release_not_by_its_timeout(env):
    """lock_wait returns as soon as the locks change (here: from another thread, as a
    unary call's worker or the sweep would), long before its timeout."""
    ino, s1, s2 = _opened(env, b"f")
    assert lock(env, s1, ino, F_WRLCK).granted
    refused = lock(env, s2, ino, F_WRLCK)
    assert not refused.granted

    async def wait() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        threading.Timer(0.3, lambda: env.core.unlock_owners(UnlockOwnersReq(s1, ino, [1]))).start()
        reply = await env.core.lock_wait(LockWaitReq(s2, ino, refused.gen, wait_s=20.0))
        assert reply.gen != refused.gen
        return loop.time() - started

    assert asyncio.run(wait()) < 10.0
    assert lock(env, s2, ino, F_WRLCK).granted


def test_a_waiter_refused_before_a_change_returns_at_once(env):
    """The change came between the refusal and the wait: no wake-up is lost."""
    ino, s1, s2 = _opened(env, b"f")
    assert lock(env, s1, ino, F_WRLCK).granted
    refused = lock(env, s2, ino, F_WRLCK)
    env.core.unlock_owners(UnlockOwnersReq(s1, ino, [1]))
    reply = asyncio.run(env.core.lock_wait(LockWaitReq(s2, ino, refused.gen, wait_s=20.0)))
    assert reply.gen != refused.gen
