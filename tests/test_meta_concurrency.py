"""Two metaservers on one PostgreSQL database, running conflicting operations at once.

Each MetaCore here has its own store (its own connection pool): two metaservers, as far
as the database can tell. Threads on both run creates, links, unlinks and renames in
the same directories, and directory renames in opposite directions (a into b's subtree
while b goes into a's): under SERIALIZABLE one of two crossing renames is refused and
run again, when its loop check sees the other. Afterwards the tree must hold no loop and
no orphan, every link count must be right (fsck clean), and every entry the operations'
ledger says exists must exist, and nothing else.
"""

from __future__ import annotations

import errno
import traceback
import random
import stat
import threading
import time

import pytest

from stripefs.metaserver.core import MetaCore
from stripefs.metaserver.store import DutiesLost, open_store
from stripefs.proto.errors import FsError
from stripefs.proto.messages import (
    Attr,
    Ctx,
    FsckReq,
    InodeReq,
    LinkReq,
    LookupReq,
    MkdirReq,
    MknodReq,
    ReaddirReq,
    RemoveReq,
    RenameReq,
)
from stripefs.proto.types import ROOT_INODE

pytestmark = pytest.mark.timeout(240)

SECRET = b"0123456789abcdef0123456789abcdef"
ROOT = Ctx(uid=0, gid=0)
#: How long the threads run, and how many per metaserver.
RUN_S = 8.0
THREADS_PER_CORE = 2
#: What a conflicting operation may be answered (the losing side of a race), never EIO.
EXPECTED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EINVAL, errno.ENOTDIR, errno.EISDIR}
SHARED_DIRS = 4


@pytest.fixture
def cores(new_pg_dsn):
    dsn = new_pg_dsn()
    made = [MetaCore(open_store("postgres", dsn), SECRET) for _ in range(2)]
    yield made
    for core in made:
        core.close()


def _listing(core: MetaCore, ino: int) -> dict[bytes, Attr]:
    out: dict[bytes, Attr] = {}
    offset = 0
    while True:
        page = core.readdir(ReaddirReq(ino=ino, offset=offset))
        out.update((e.name, e.attr) for e in page.entries if e.name not in (b".", b".."))
        if not page.more:
            return out
        offset = page.entries[-1].cookie


def test_two_metaservers_conflicting_renames_links_and_creates(cores):
    a, b = cores
    dirs = [a.mkdir(MkdirReq(ROOT_INODE, f"d{i}".encode(), 0o755, ROOT)).attr.ino for i in range(SHARED_DIRS)]
    # Two directory trees that the rename threads move into each other.
    left = a.mkdir(MkdirReq(ROOT_INODE, b"left", 0o755, ROOT)).attr.ino
    right = a.mkdir(MkdirReq(ROOT_INODE, b"right", 0o755, ROOT)).attr.ino
    mu = threading.Lock()
    ledger: dict[tuple[int, bytes], int] = {}  # (directory, name) -> inode, files only
    unexpected: list[str] = []
    counts = {"ok": 0, "refused": 0, "dir_moves": 0}
    stop = time.monotonic() + RUN_S

    def files_worker(core: MetaCore, wid: int) -> None:
        rnd = random.Random(wid)
        mine: list[tuple[int, bytes]] = []  # entries this worker made (only it touches them)
        n = 0
        while time.monotonic() < stop:
            op = rnd.choice(("create", "create", "link", "unlink", "rename"))
            try:
                if op == "create" or not mine:
                    n += 1
                    d, name = rnd.choice(dirs), f"w{wid}-{n}".encode()
                    ino = core.mknod(MknodReq(d, name, stat.S_IFREG | 0o644, ROOT)).attr.ino
                    with mu:
                        ledger[(d, name)] = ino
                    mine.append((d, name))
                elif op == "link":
                    n += 1
                    src = rnd.choice(mine)
                    d, name = rnd.choice(dirs), f"w{wid}-{n}".encode()
                    core.link(LinkReq(ledger[src], d, name, ROOT))
                    with mu:
                        ledger[(d, name)] = ledger[src]
                    mine.append((d, name))
                elif op == "unlink":
                    victim = mine.pop(rnd.randrange(len(mine)))
                    core.unlink(RemoveReq(victim[0], victim[1], ROOT))
                    with mu:
                        del ledger[victim]
                else:
                    n += 1
                    src = mine.pop(rnd.randrange(len(mine)))
                    dst = (rnd.choice(dirs), f"w{wid}-{n}".encode())
                    core.rename(RenameReq(src[0], src[1], dst[0], dst[1], 0, ROOT))
                    with mu:
                        ledger[dst] = ledger.pop(src)
                    mine.append(dst)
                with mu:
                    counts["ok"] += 1
            except FsError as exc:
                with mu:
                    unexpected.append(f"worker {wid} {op}: {exc}")
            except Exception as exc:  # noqa: BLE001 - reported below
                with mu:
                    unexpected.append(f"worker {wid} {op}: {exc!r} {traceback.format_exc()}")

    def dirs_worker(core: MetaCore, src: int, dst: int, name: bytes) -> None:
        """Move `name` (a directory) into the other tree and back, over and over; the other
        thread does the same the other way round, on the other metaserver."""
        while time.monotonic() < stop:
            for old, new in ((ROOT_INODE, dst), (dst, ROOT_INODE)):
                try:
                    core.rename(RenameReq(old, name, new, name, 0, ROOT))
                    with mu:
                        counts["dir_moves"] += 1
                except FsError as exc:
                    with mu:
                        if exc.errno in EXPECTED:
                            counts["refused"] += 1
                        else:
                            unexpected.append(f"rename {name!r}: {exc}")
                except Exception as exc:  # noqa: BLE001 - reported below
                    with mu:
                        unexpected.append(f"rename {name!r}: {exc!r}")

    threads = [threading.Thread(target=files_worker, args=(core, 10 * k + i))
               for k, core in enumerate((a, b)) for i in range(THREADS_PER_CORE)]
    threads.append(threading.Thread(target=dirs_worker, args=(a, left, right, b"left")))
    threads.append(threading.Thread(target=dirs_worker, args=(b, right, left, b"right")))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not unexpected, "\n".join(unexpected[:3])
    assert counts["ok"] > 50 and counts["dir_moves"] > 10, counts

    # No loop, no orphan: every directory is reached from the root, each once.
    seen_dirs: set[int] = set()
    found: dict[tuple[int, bytes], int] = {}
    todo = [ROOT_INODE]
    while todo:
        d = todo.pop()
        assert d not in seen_dirs, f"directory {d} reached twice: a loop"
        seen_dirs.add(d)
        for name, attr in _listing(b, d).items():
            ino = attr.ino
            if stat.S_ISDIR(attr.mode):
                assert a.lookup(LookupReq(ino, b"..")).attr.ino == d
                todo.append(ino)
            else:
                found[(d, name)] = ino
    assert {ROOT_INODE, left, right, *dirs} == seen_dirs
    assert found == ledger  # nothing lost, nothing extra
    links: dict[int, int] = {}
    for ino in ledger.values():
        links[ino] = links.get(ino, 0) + 1
    for ino, n in links.items():
        assert a.getattr(InodeReq(ino=ino)).attr.nlink == n
    for core in (a, b):
        report = core.fsck(FsckReq())
        assert report.problems == [], report.problems


def test_metaservers_starting_together_share_one_setting_and_one_duty_holder(new_pg_dsn):
    """Metaservers started at once all ask for the shared token key and beat for the
    duties in the same instant: they meet on one row (a serialization failure for all but
    one), and each must come up with the winner's value, never the database's error (a
    CI run once lost a metaserver this way)."""
    dsn = new_pg_dsn()
    stores = [open_store("postgres", dsn) for _ in range(6)]
    try:
        for round_ in range(5):
            gate = threading.Barrier(len(stores))
            got: list[object] = [None] * len(stores)

            def start(i: int) -> None:
                gate.wait()
                try:
                    key = stores[i].setting(f"key{round_}", lambda: f"made by {i}".encode())
                    holder, alive = stores[i].beat(f"meta-{i}", f"10.0.0.{i}:1", 30.0)
                    got[i] = (key, holder)
                except Exception as exc:  # noqa: BLE001 - reported below
                    got[i] = exc

            threads = [threading.Thread(target=start, args=(i,)) for i in range(len(stores))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(isinstance(g, Exception) for g in got), got
            keys = {g[0] for g in got}  # type: ignore[index]
            assert len(keys) == 1 and next(iter(keys)).startswith(b"made by "), got
            # One duty holder: whoever took the lease first (round 0) keeps it while it beats.
            holders = {g[1] for g in got}  # type: ignore[index]
            assert len(holders) == 1, got
    finally:
        for s in stores:
            s.close()


def test_a_holder_that_lost_the_duties_stops_its_sweep(cores):
    """A duties holder stopped past its lease (SIGSTOP, a stalled machine, a sweep retried
    for longer than the lease) resumes in the middle of a sweep after another metaserver
    took the duties over. Its sweep must stop at its next step, not run beside the new
    holder's: two sweeps purging the same unlinked files refused each other's transactions
    until both gave up, sweep after sweep (a CI run once ended with 51 unpurged orphans)."""
    a, b = cores
    a.name, b.name = "meta-a", "meta-b"
    lease_s = 0.3
    assert a.beat("10.0.0.1:1", lease_s) and a.sweep() is not None
    assert not b.beat("10.0.0.2:1", lease_s) and b.duties == "meta-a"
    time.sleep(lease_s * 2)  # a is silent past its lease
    assert b.beat("10.0.0.2:1", lease_s)
    with pytest.raises(DutiesLost, match="meta-b"):
        a.sweep()
    for step in (a.purge_unlinked, lambda: a.plan_replication(force=True)):
        with pytest.raises(DutiesLost):
            step()
    assert b.sweep() is not None
    assert not a.beat("10.0.0.1:1", lease_s) and a.duties == "meta-b"
