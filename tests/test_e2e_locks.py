"""Cluster-wide locks through two real mounts of one cluster (two nodes, as far as the
file system can tell): flock and fcntl record locks exclude each other across mounts,
F_GETLK reports the other mount's holder, a waiter is woken when the holder unlocks,
closes or its mount dies (once its session expires), OFD locks, release on close, and
the programs that rely on them: SQLite written from both mounts at once, and Python's
filelock.

Each "node" is a lockholder.py process on one mount, told what to do line by line.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import pytest

from cluster import Cluster, Mount
from conftest import _require_mount

pytestmark = [pytest.mark.mount]

HOLDER = Path(__file__).with_name("lockholder.py")
#: The metaserver's session lease in these tests: a mount killed while holding a lock
#: loses it 3 leases later.
LEASE_S = 2.0
#: How long a waiter may take to see a lock released (a wake-up, not a poll: well under
#: a second on an idle machine; generous for a loaded one).
WAKE_TIMEOUT_S = 15.0


class Holder:
    """One lockholder.py process."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HOLDER)], cwd=cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout.readline().strip() == "ready"

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = 30.0) -> str:
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the lock holder did not answer in time"
        return self.proc.stdout.readline().strip()

    def do(self, line: str) -> str:
        self.send(line)
        return self.answer()

    def ok(self, line: str) -> str:
        answer = self.do(line)
        assert answer.startswith("ok"), f"{line!r}: {answer}"
        return answer[3:]

    def err(self, line: str) -> int:
        answer = self.do(line)
        assert answer.startswith("err"), f"{line!r} should have failed: {answer}"
        return int(answer.split()[1])

    def pending(self, seconds: float) -> bool:
        """No answer within `seconds` (a blocked call)."""
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        return not ready

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def lock_cluster(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tmp_path_factory.mktemp("locks"), dataservers=2, meta_args=["--session-lease-s", str(LEASE_S)])
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def mounts(lock_cluster: Cluster) -> tuple[Mount, Mount]:
    _require_mount()
    return lock_cluster.mount(), lock_cluster.mount()


@pytest.fixture
def nodes(mounts, request: pytest.FixtureRequest):
    """A directory for the test and one lock holder on each mount, working in it."""
    a, b = mounts
    os.mkdir(a / request.node.name)
    (b / request.node.name).stat()
    holders = [Holder(a / request.node.name), Holder(b / request.node.name)]
    try:
        yield holders
    finally:
        for h in holders:
            h.close()


def test_flock_excludes_across_mounts(nodes):
    a, b = nodes
    a.ok("open 1 f rw")
    b.ok("open 1 f rw")
    a.ok("flock 1 ex nb")
    assert b.err("flock 1 ex nb") == errno.EWOULDBLOCK
    assert b.err("flock 1 sh nb") == errno.EWOULDBLOCK
    a.ok("flock 1 sh nb")  # a conversion down: both may share now
    b.ok("flock 1 sh nb")
    assert a.err("flock 1 ex nb") == errno.EWOULDBLOCK  # refused, and (as Linux) loses its shared lock
    b.ok("flock 1 ex nb")
    b.ok("flock 1 un")
    a.ok("flock 1 ex nb")


def test_flock_waiter_is_woken_by_unlock_and_by_close(nodes):
    a, b = nodes
    a.ok("open 1 f rw")
    b.ok("open 1 f rw")
    a.ok("flock 1 ex")
    b.send("flock 1 ex")
    assert b.pending(1.0)
    a.ok("flock 1 un")
    assert b.answer(WAKE_TIMEOUT_S) == "ok"
    a.send("flock 1 sh")
    assert a.pending(1.0)
    b.ok("close 1")  # the last close of the description drops its flock lock
    assert a.answer(WAKE_TIMEOUT_S) == "ok"


def test_record_locks_ranges_and_getlk_across_mounts(nodes):
    a, b = nodes
    a.ok("open 1 f rw")
    b.ok("open 1 f rw")
    a_pid = int(a.ok("pid"))
    a.ok("setlk 1 wr 0 100")
    a.ok("setlk 1 rd 200 0")  # 200 to the end of the file
    b.ok("setlk 1 wr 100 100")  # [100, 200): free
    assert b.err("setlk 1 wr 50 10") == errno.EAGAIN
    assert b.err("setlk 1 wr 1000000 1") == errno.EAGAIN
    b.ok("setlk 1 rd 5000 10")  # shared with a's read lock
    assert b.ok("getlk 1 wr 90 20").split() == ["wr", "0", "100", str(a_pid)]
    assert b.ok("getlk 1 rd 300 1").split() == ["un", "300", "1", "0"]  # shared: no conflict
    assert b.ok("getlk 1 wr 300 1").split() == ["rd", "200", "0", str(a_pid)]
    # Splitting: a unlocks the middle of its write lock; the middle is free, the rest not.
    a.ok("setlk 1 un 40 20")
    b.ok("setlk 1 wr 45 10")
    assert b.err("setlk 1 wr 30 1") == errno.EAGAIN
    assert b.err("setlk 1 wr 70 1") == errno.EAGAIN
    # Merging and converting: a's own locks never conflict with each other.
    b.ok("setlk 1 un 0 0")
    a.ok("setlk 1 wr 0 0")
    assert b.ok("getlk 1 rd 0 1").split() == ["wr", "0", "0", str(a_pid)]  # one lock, merged


def test_setlkw_waiter_is_woken_by_unlock(nodes):
    a, b = nodes
    a.ok("open 1 f rw")
    b.ok("open 1 f rw")
    a.ok("setlk 1 wr 0 10")
    b.send("setlk 1 wr 5 1 wait")
    assert b.pending(1.0)
    a.ok("setlk 1 un 0 5")  # not the byte b waits for
    assert b.pending(1.0)
    started = time.monotonic()
    a.ok("setlk 1 un 0 0")
    assert b.answer(WAKE_TIMEOUT_S) == "ok"
    woken_s = time.monotonic() - started
    assert a.err("setlk 1 wr 5 1") == errno.EAGAIN
    print(f"woken {woken_s * 1000:.0f} ms after the unlock")


def test_a_signal_interrupts_a_waiting_lock_and_leaves_nothing_behind(nodes):
    a, b = nodes
    a.ok("open 1 f rw")
    b.ok("open 1 f rw")
    a.ok("setlk 1 wr 0 0")
    a.ok("flock 1 ex")
    b.ok("alarm 1.0")
    assert b.err("setlk 1 wr 0 0 wait") == errno.EINTR  # FUSE_INTERRUPT ended the wait
    b.ok("alarm 1.0")
    assert b.err("flock 1 ex") == errno.EINTR
    a.ok("setlk 1 un 0 0")
    a.ok("flock 1 un")
    time.sleep(1.0)
    a.ok("setlk 1 wr 0 0")  # the interrupted waiters did not take them meanwhile
    a.ok("flock 1 ex nb")
    a.ok("close 1")
    b.ok("setlk 1 wr 0 0 wait")


def test_close_of_any_descriptor_releases_the_process_record_locks(nodes):
    a, b = nodes
    a.ok("open 1 f rw")
    a.ok("open 2 f r")
    b.ok("open 1 f rw")
    a.ok("setlk 1 wr 0 0")
    b.send("setlk 1 wr 0 0 wait")
    assert b.pending(1.0)
    a.ok("close 2")  # POSIX: any close of the file by the process drops its locks
    assert b.answer(WAKE_TIMEOUT_S) == "ok"


def test_ofd_locks_belong_to_the_open_file_description(nodes):
    a, b = nodes
    a.ok("open 1 f rw")
    a.ok("open 2 f rw")
    b.ok("open 1 f rw")
    a.ok("ofd 1 wr 0 10")
    assert a.err("ofd 2 wr 0 10") == errno.EAGAIN  # another description of the same process
    assert b.err("ofd 1 rd 5 1") == errno.EAGAIN
    assert b.err("setlk 1 rd 5 1") == errno.EAGAIN  # OFD and process locks conflict
    a.ok("close 2")  # not the description that holds it: kept
    assert b.err("ofd 1 wr 0 1") == errno.EAGAIN
    b.send("ofd 1 wr 0 1 wait")
    assert b.pending(1.0)
    a.ok("close 1")
    assert b.answer(WAKE_TIMEOUT_S) == "ok"


def test_waiter_is_woken_when_the_holders_mount_dies(lock_cluster, nodes, request):
    _, b = nodes
    dead = lock_cluster.mount()
    c = Holder(dead.path / request.node.name)
    try:
        c.ok("open 1 f rw")
        b.ok("open 1 f rw")
        c.ok("flock 1 ex")
        c.ok("setlk 1 wr 0 0")
        b.send("setlk 1 rd 0 1 wait")
        assert b.pending(1.0)
        killed = time.monotonic()
        dead.proc.kill()  # the node dies: no unlock, no close, no session close
        assert b.answer(3 * LEASE_S + 2.0 + WAKE_TIMEOUT_S) == "ok"
        assert time.monotonic() - killed >= 2 * LEASE_S, "the lock went before the dead mount's session expired"
        b.ok("flock 1 ex nb")
        assert lock_cluster.status()["locks"] == 2
    finally:
        c.close()


def _count(path: str, times: int) -> None:
    """Increment a counter row `times` times, each in its own transaction (a child process)."""
    db = sqlite3.connect(path, timeout=60)
    for _ in range(times):
        with db:
            db.execute("UPDATE counter SET n = n + 1")
    db.close()


def test_sqlite_written_from_two_mounts(mounts, request):
    a, b = mounts
    os.mkdir(a / request.node.name)
    path_a = str(a / request.node.name / "db.sqlite")
    path_b = str(b / request.node.name / "db.sqlite")
    db = sqlite3.connect(path_a)
    with db:
        db.execute("CREATE TABLE counter (n INTEGER)")
        db.execute("INSERT INTO counter VALUES (0)")
    db.close()
    times = 1000
    ctx = get_context("spawn")
    procs = [ctx.Process(target=_count, args=(path, times)) for path in (path_a, path_b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    for path in (path_a, path_b):
        db = sqlite3.connect(path)
        assert db.execute("SELECT n FROM counter").fetchone()[0] == 2 * times
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()


def _filelock_count(lock_path: str, data_path: str, times: int) -> None:
    import filelock
    for _ in range(times):
        with filelock.FileLock(lock_path, timeout=120):
            with open(data_path) as f:
                n = int(f.read())
            with open(data_path, "w") as f:
                f.write(str(n + 1))


def test_python_filelock_excludes_across_mounts(mounts, request):
    a, b = mounts
    os.mkdir(a / request.node.name)
    (a / request.node.name / "n").write_text("0")
    times = 100
    ctx = get_context("spawn")
    procs = [ctx.Process(target=_filelock_count, args=(str(m / request.node.name / "lock"),
                                                        str(m / request.node.name / "n"), times))
             for m in (a, b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    assert (a / request.node.name / "n").read_text() == str(2 * times)
