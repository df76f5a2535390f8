"""Failover between metaservers (issue 12): every role that talks to a metaserver takes a
list of addresses, talks to one at a time and moves to the next when it dies or hangs.

Levels: the address list (pure); then the client library, a data server and the CLI
against real metaserver processes on loopback. Most tests pair SQLite metaservers with
stores of their own: they check where calls go and that they succeed, not that both see
one namespace. The last ones run two metaservers over one PostgreSQL database, the shape
failover is for: a moved client keeps its session, its open files and its locks. A dead
address is a port nothing listens on; a hung metaserver is a real one under SIGSTOP
(SIGCONT and stopped by pid in teardown).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
import trio

from cluster import REPO_ROOT, Cluster, Proc, _wait_ready_file, cli, is_mounted
from stripefs.client import F_UNLCK, F_WRLCK, Ctx, load_credentials, open_client
from stripefs.client.transport import FailoverTransport
from stripefs.proto.errors import FsError, TransportError
from stripefs.proto.messages import InodeReq, LockReq, LockWaitReq, SessionOpenReq
from stripefs.proto.rpc import HUNG_AFTER_S, AddressList, Stub, parse_addresses
from stripefs.proto.services import META_METHODS, META_SERVICE
from stripefs.proto.types import ROOT_INODE

pytestmark = pytest.mark.timeout(180)

ROOT = Ctx(0, 0, 0)
#: What a switch may cost beyond the hang bound: the session's retry backoff and a busy
#: 2-core machine.
SWITCH_SLACK_S = 6.0


# ---------------------------------------------------------------------------- helpers


def dead_address() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def start_metaserver(c: Cluster, name: str, listen: str = "127.0.0.1:0", flags: tuple[str, ...] = ()) -> Proc:
    """Another real metaserver with the cluster's credentials, on a state directory of its
    own (the same one again for the same name)."""
    state = c.base / name
    state.mkdir(exist_ok=True)
    ready = c.run_dir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    proc = Proc(name, cli("meta", "--listen", listen, "--dir", str(state),
                          "--credentials", str(c.pki.bundle("meta")), "--ready-file", str(ready),
                          "--log-file", str(c.logs_dir / f"{name}.log"), *flags),
                c.logs_dir / f"{name}.log", c.logs_dir / f"{name}.out")
    proc.start()
    try:
        proc.address = _wait_ready_file(proc, ready)
    except BaseException:
        proc.stop()
        raise
    return proc


@contextmanager
def spare_metaserver(c: Cluster, name: str) -> Iterator[Proc]:
    """start_metaserver; SIGCONT (it may be stopped) and stopped by pid at the end."""
    proc = start_metaserver(c, name)
    try:
        yield proc
    finally:
        proc.signal(signal.SIGCONT)
        proc.stop()


def sessions_past(address: str, creds, session: int) -> None:
    """Open sessions on `address` until its session ids are past `session`: the metaservers
    of these tests have stores of their own, and a session that moves from one to the other
    must not meet its own number there (it would not be replaced, as an expired one is)."""
    stub = Stub(address, creds, META_SERVICE, META_METHODS)
    try:
        while stub.call("open_session", SessionOpenReq("test", "padding"), timeout=10).session <= session:
            pass
    finally:
        stub.close()


def switches(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "switching to" in r.getMessage()]


def status_json(c: Cluster, metas: str) -> dict:
    res = subprocess.run(cli("status", "--meta", metas, "--credentials", str(c.admin), "--json"),
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def meta_cluster(tmp_path_factory):
    """A metaserver and no data server (metadata calls and inline files need none)."""
    with Cluster(tmp_path_factory.mktemp("failover"), dataservers=0) as c:
        yield c


# ---------------------------------------------------------------------------- the address list


def test_addresses_parse_from_a_string_or_a_list():
    assert parse_addresses("a:1") == ["a:1"]
    assert parse_addresses(" a:1, b:2 ,a:1") == ["a:1", "b:2"]  # in order, each once
    assert parse_addresses(["[::1]:7000", "h:7001"]) == ["[::1]:7000", "h:7001"]
    for bad in ("", "a", "a:", ":7000", "a:0", "a:70000", "a:1,,b:2", "a:1;b:2", []):
        with pytest.raises(ValueError):
            parse_addresses(bad)


def test_the_list_moves_round_robin_once_per_failure(caplog):
    servers = AddressList("a:1,b:2,c:3")
    assert servers.current == "a:1"
    with caplog.at_level(logging.WARNING, logger="stripefs.rpc"):
        assert servers.move_on("a:1", "gone")
        assert not servers.move_on("a:1", "gone")  # others that saw a:1 fail move no further
        assert servers.current == "b:2"
        assert servers.move_on("b:2", "hung") and servers.move_on("c:3", "gone")
        assert servers.current == "a:1"
        # Round and round while none answers: each outage is told once.
        assert servers.move_on("a:1", "gone") and servers.move_on("b:2", "gone")
        servers.answered("c:3")
        assert servers.move_on("c:3", "gone again")
    assert servers.current == "a:1"
    assert switches(caplog) == ["metaserver a:1 failed (gone); switching to b:2",
                                "metaserver b:2 failed (hung); switching to c:3",
                                "metaserver c:3 failed (gone); switching to a:1",
                                "metaserver c:3 failed (gone again); switching to a:1"]
    alone = AddressList(["a:1"])
    assert not alone.move_on("a:1", "gone") and alone.current == "a:1"


# ---------------------------------------------------------------------------- the client library


async def some_calls(client, tag: bytes) -> None:
    """Calls of every retry class: once (mkdir, create, commit, rename, unlink), idempotent
    (lookup, getattr, readdir, open), and the session's own."""
    d = await client.mkdir(ROOT_INODE, tag + os.urandom(4).hex().encode(), 0o755, ROOT)
    fh, attr = await client.create(d.ino, b"f", 0o644, os.O_WRONLY, ROOT)
    await client.write(fh, 0, b"small, kept inline")
    await client.flush(fh)
    await client.release(fh)
    await client.rename(d.ino, b"f", d.ino, b"g")
    assert (await client.lookup(d.ino, b"g")).ino == attr.ino
    fh, _, _ = await client.open(attr.ino, os.O_RDONLY)
    assert await client.read(fh, 0, 100) == b"small, kept inline"
    await client.release(fh)
    await client.unlink(d.ino, b"g")
    assert all(e.name in (b".", b"..") for e in await client.listdir(d.ino))


def test_client_skips_a_dead_first_address(meta_cluster, caplog):
    dead = dead_address()

    async def main():
        async with open_client(f"{dead},{meta_cluster.meta_addr}", load_credentials(meta_cluster.client)) as client:
            await some_calls(client, b"dead-first")
            return client.session.address

    with caplog.at_level(logging.WARNING, logger="stripefs.rpc"):
        assert trio.run(main) == meta_cluster.meta_addr
    assert any(dead in s and meta_cluster.meta_addr in s for s in switches(caplog))


def test_client_skips_a_stopped_first_metaserver(meta_cluster):
    with spare_metaserver(meta_cluster, "meta-stopped") as stopped:
        stopped.signal(signal.SIGSTOP)

        async def main():
            t = time.monotonic()
            async with open_client([stopped.address, meta_cluster.meta_addr],
                                   load_credentials(meta_cluster.client)) as client:
                await some_calls(client, b"stopped-first")
                return client.session.address, time.monotonic() - t

        address, took = trio.run(main)
        assert address == meta_cluster.meta_addr
        assert took < HUNG_AFTER_S + SWITCH_SLACK_S


def test_client_leaves_a_metaserver_that_stops_answering(meta_cluster, caplog):
    """Connected to the first, which then hangs: the next call goes to the second within
    the hang bound. (The second has a store of its own here, so the session is unknown
    there: the client replaces it, as after an expiry.)"""
    with spare_metaserver(meta_cluster, "meta-hangs") as first:

        creds = load_credentials(meta_cluster.client)

        async def main():
            async with open_client([first.address, meta_cluster.meta_addr], creds) as client:
                await some_calls(client, b"before")
                assert client.session.address == first.address
                await trio.to_thread.run_sync(sessions_past, meta_cluster.meta_addr, creds, client.session.id)
                first.signal(signal.SIGSTOP)
                t = time.monotonic()
                await client.mkdir(ROOT_INODE, b"after-" + os.urandom(4).hex().encode(), 0o755, ROOT)
                took = time.monotonic() - t
                await some_calls(client, b"after")
                return client.session.address, took

        with caplog.at_level(logging.WARNING, logger="stripefs.rpc"):
            address, took = trio.run(main)
        assert address == meta_cluster.meta_addr
        assert HUNG_AFTER_S * 0.9 < took < HUNG_AFTER_S + SWITCH_SLACK_S
        assert any(first.address in s and meta_cluster.meta_addr in s for s in switches(caplog))


def test_client_comes_back_to_a_metaserver_that_restarted(tmp_path, caplog):
    """First on X; X dies, so on to Y; X comes back and Y dies: back on X. A channel to a
    server that was unreachable reconnects when it returns, though no call waits on it."""
    with Cluster(tmp_path / "cluster", dataservers=0) as c:
        x = start_metaserver(c, "meta-x")
        try:
            y = c.meta_addr

            creds = load_credentials(c.client)

            async def main():
                nonlocal x
                async with open_client([x.address, y], creds) as client:
                    await some_calls(client, b"on-x")
                    assert client.session.address == x.address
                    await trio.to_thread.run_sync(sessions_past, y, creds, client.session.id)
                    x.kill()
                    await some_calls(client, b"on-y")
                    assert client.session.address == y
                    x = await trio.to_thread.run_sync(start_metaserver, c, "meta-x", x.address)
                    await trio.to_thread.run_sync(sessions_past, x.address, creds, client.session.id)
                    await trio.sleep(3)  # gRPC's reconnect backoff is at most 2 s
                    c.meta.kill()
                    await some_calls(client, b"back-on-x")
                    return client.session.address

            with caplog.at_level(logging.WARNING, logger="stripefs.rpc"):
                assert trio.run(main) == x.address
            assert len([s for s in switches(caplog) if f"{x.address} failed" in s]) == 1
            assert len([s for s in switches(caplog) if f"{y} failed" in s]) == 1
        finally:
            x.stop()


def test_calls_wait_while_no_metaserver_answers(tmp_path, caplog):
    """Every metaserver of the list down: calls go round the list, with pauses, until one
    comes back within their deadline (as one address waits for its metaserver), and the
    outage is logged once per server, not once a round."""
    with Cluster(tmp_path / "cluster", dataservers=0) as c:
        dead, y = dead_address(), c.meta_addr

        async def main():
            async with open_client([dead, y], load_credentials(c.client)) as client:
                await client.mkdir(ROOT_INODE, b"before", 0o755, ROOT)
                c.meta.kill()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, restart_after, c, 3.0)
                    await client.mkdir(ROOT_INODE, b"during", 0o755, ROOT)
                return client.session.address

        with caplog.at_level(logging.DEBUG, logger="stripefs.rpc"):
            assert trio.run(main) == y
        warned = switches(caplog)
        assert len([s for s in warned if f"{dead} failed" in s]) == 1
        assert len([s for s in warned if f"{y} failed" in s]) == 1
        assert len([r for r in caplog.records if "switching to" in r.getMessage()]) > 2  # the rest at DEBUG


def restart_after(c: Cluster, seconds: float) -> None:
    time.sleep(seconds)
    c.start_meta(listen=c.meta_addr)


def test_one_address_waits_for_a_stopped_metaserver_as_before(meta_cluster, caplog):
    """With one address nothing moves: a call made while the metaserver is stopped longer
    than the hang bound waits for it (within the call deadline) and succeeds."""
    with spare_metaserver(meta_cluster, "meta-alone") as alone:

        async def main():
            async with open_client(alone.address, load_credentials(meta_cluster.client)) as client:
                await client.mkdir(ROOT_INODE, b"before", 0o755, ROOT)
                alone.signal(signal.SIGSTOP)
                t = time.monotonic()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, wake_after, alone, HUNG_AFTER_S + 2)
                    await client.mkdir(ROOT_INODE, b"during", 0o755, ROOT)
                return time.monotonic() - t, client.session.address

        with caplog.at_level(logging.WARNING, logger="stripefs.rpc"):
            took, address = trio.run(main)
        assert took >= HUNG_AFTER_S + 2 and address == alone.address
        assert switches(caplog) == []


def wake_after(proc: Proc, seconds: float) -> None:
    time.sleep(seconds)
    proc.signal(signal.SIGCONT)


def test_a_lock_wait_outlasts_the_hang_bound(meta_cluster, caplog):
    """A waiter for a lock held longer than the hang bound is not cut off or moved: it
    waits for a lock, not for a reply."""
    with spare_metaserver(meta_cluster, "meta-lockwait") as second:
        metas = [meta_cluster.meta_addr, second.address]
        creds = load_credentials(meta_cluster.client)

        async def main():
            async with open_client(metas, creds) as holder, open_client(metas, creds) as waiter:
                fh, attr = await holder.create(ROOT_INODE, b"lock-" + os.urandom(4).hex().encode(), 0o644,
                                               os.O_RDWR, ROOT)
                await holder.lock(fh, F_WRLCK)
                wfh, _, _ = await waiter.open(attr.ino, os.O_RDWR)
                got = []

                async def wait_for_it():
                    await waiter.lock(wfh, F_WRLCK, wait=True)
                    got.append(time.monotonic())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_for_it)
                    await trio.sleep(HUNG_AFTER_S + 2)
                    assert not got
                    released = time.monotonic()
                    await holder.lock(fh, F_UNLCK)
                assert got[0] - released < 5.0
                await waiter.lock(wfh, F_UNLCK)
                await waiter.release(wfh)
                await holder.release(fh)
                return holder.session.address, waiter.session.address

        with caplog.at_level(logging.WARNING, logger="stripefs.rpc"):
            assert trio.run(main) == (meta_cluster.meta_addr, meta_cluster.meta_addr)
        assert switches(caplog) == []


def test_a_move_sends_lock_waits_to_the_next_metaserver(meta_cluster):
    """The transport itself: a lock wait in flight on a metaserver that hangs is given up
    (for its caller to ask again on the next) as soon as another call finds the hang,
    not when its own wait would end."""
    with spare_metaserver(meta_cluster, "meta-move") as first:

        async def main():
            t = FailoverTransport([first.address, meta_cluster.meta_addr], load_credentials(meta_cluster.client),
                                  META_SERVICE, META_METHODS)
            try:
                session = (await t.call("open_session", SessionOpenReq("test", "move"), 10)).session
                gen = (await t.call("lock", LockReq(session, ROOT_INODE, 1, F_UNLCK), 10)).gen  # (unlocks nothing)
                ended = []

                async def wait():
                    with pytest.raises(TransportError):
                        await t.call("lock_wait", LockWaitReq(session, ROOT_INODE, gen, 20.0), 30, float("inf"))
                    ended.append(time.monotonic())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait)
                    await trio.sleep(0.5)  # the wait is on its way
                    first.signal(signal.SIGSTOP)
                    start = time.monotonic()
                    with pytest.raises(TransportError):  # nothing heard for 1 s: moved
                        await t.call("getattr", InodeReq(ROOT_INODE), 30, 1.0)
                    assert t.address == meta_cluster.meta_addr
                assert ended[0] - start < 1.0 + SWITCH_SLACK_S
                # The next call goes to the other metaserver at once.
                assert (await t.call("getattr", InodeReq(ROOT_INODE), 10, 1.0)).attr.ino == ROOT_INODE
            finally:
                t.close()

        trio.run(main)


# ---------------------------------------------------------------------------- data servers


@pytest.mark.parametrize("first", ["dead", "stopped"])
def test_data_server_registers_and_heartbeats_past_a_failed_first_metaserver(tmp_path, first):
    with Cluster(tmp_path / "cluster", dataservers=0) as c, spare_metaserver(c, "meta-other") as other:
        if first == "dead":
            bad = dead_address()
        else:
            other.signal(signal.SIGSTOP)
            bad = other.address
        ready = c.run_dir / "data-0.ready"
        proc = Proc("data-0", cli("data", "--listen", "127.0.0.1:0", "--meta", f"{bad},{c.meta_addr}",
                                  "--dir", str(c.base / "data-0"), "--credentials", str(c.pki.bundle("data", "data-0")),
                                  "--ready-file", str(ready), "--log-file", str(c.logs_dir / "data-0.log"),
                                  "--heartbeat-interval-s", "0.3"),
                    c.logs_dir / "data-0.log", c.logs_dir / "data-0.out")
        (c.base / "data-0").mkdir()
        proc.start()
        try:
            proc.address = _wait_ready_file(proc, ready)
            c.wait_servers_up(1)
            for _ in range(3):  # still beating (a beat every 0.3 s)
                time.sleep(1.0)
                (server,) = c.status()["servers"]
                assert server["state"] == "up" and server["last_heartbeat_s"] < 3.0
            log = (c.logs_dir / "data-0.log").read_text()
            assert f"switching to {c.meta_addr}" in log
            assert f"registered with metaserver {c.meta_addr}" in log
        finally:
            proc.stop()


# ---------------------------------------------------------------------------- the CLI


def test_status_shows_every_metaserver(meta_cluster):
    with spare_metaserver(meta_cluster, "meta-status") as stopped:
        stopped.signal(signal.SIGSTOP)
        dead, real = dead_address(), meta_cluster.meta_addr
        metas = f"{dead},{stopped.address},{real}"
        res = subprocess.run(cli("status", "--meta", metas, "--credentials", str(meta_cluster.admin)),
                             capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        assert res.returncode == 0, res.stdout + res.stderr
        lines = res.stdout.splitlines()
        assert lines[0].startswith(f"metaserver {dead} unreachable")
        assert lines[1].startswith(f"metaserver {stopped.address} unreachable")
        assert lines[2].startswith(f"metaserver {real} up")

        doc = status_json(meta_cluster, metas)
        assert doc["meta"] == real
        assert [(a["address"], a["reachable"]) for a in doc["addresses"]] == [
            (dead, False), (stopped.address, False), (real, True)]
        for field in ("engine", "metaserver", "duties", "metaservers"):
            assert field in doc  # the metaserver fills them in once it has more than one

        res = subprocess.run(cli("status", "--meta", dead, "--credentials", str(meta_cluster.admin)),
                             capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        assert res.returncode != 0 and dead in res.stderr


def test_fsck_and_the_state_file_take_a_list(meta_cluster, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "meta.addr").write_text(f"{dead_address()},{meta_cluster.meta_addr}\n")
    res = subprocess.run(cli("fsck", "--state", str(state), "--credentials", str(meta_cluster.admin)),
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(f"metaserver {meta_cluster.meta_addr}:") and "clean" in res.stdout
    res = subprocess.run(cli("fsck", "--meta", "nonsense", "--credentials", str(meta_cluster.admin)),
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert res.returncode != 0 and "HOST:PORT" in res.stderr


@pytest.mark.mount
@pytest.mark.parametrize("first", ["dead", "stopped"])
def test_mount_takes_a_list(tmp_path, first):
    """A mount (whose streams run on one asyncio loop, fs/client/transport.py, where the
    library above uses gRPC's sync threads) skips a first metaserver that is not there or
    stopped."""
    with Cluster(tmp_path / "cluster", dataservers=1) as c, spare_metaserver(c, "meta-spare") as spare:
        real = c.meta_addr
        if first == "stopped":
            spare.signal(signal.SIGSTOP)
        c.meta_addr = f"{dead_address() if first == 'dead' else spare.address},{real}"  # what the mount is given
        m = c.mount()
        (m / "f").write_bytes(b"through the second metaserver")
        assert (m / "f").read_bytes() == b"through the second metaserver"
        with open("/proc/self/mountinfo") as f:
            line = next(line for line in f if line.split(" ")[4] == str(m.path))
        assert f"stripefs:{c.meta_addr}" in line
        m.close()
        assert not is_mounted(m.path)
        assert f"switching to {real}" in (c.logs_dir / "mount-1.log").read_text()


@pytest.mark.mount
def test_mount_leaves_a_metaserver_that_stops_answering(tmp_path):
    """Mounted through the first metaserver, which then hangs: the mount's next calls go to
    the second within the hang bound (a store of its own: the session is replaced there,
    and small files, which need no data server, are written and read through it)."""
    with Cluster(tmp_path / "cluster", dataservers=1) as c, spare_metaserver(c, "meta-first") as first:
        real = c.meta_addr
        c.meta_addr = f"{first.address},{real}"
        m = c.mount()
        (m / "before").write_bytes(b"on the first")
        first.signal(signal.SIGSTOP)
        t = time.monotonic()
        (m / "after").write_bytes(b"on the second")
        assert (m / "after").read_bytes() == b"on the second"
        assert time.monotonic() - t < HUNG_AFTER_S + 2 * SWITCH_SLACK_S
        assert f"switching to {real}" in (c.logs_dir / "mount-1.log").read_text()
        m.close()


# ---------------------------------------------------------------------------- one database, two metaservers


#: Session lease of the shared-database tests: renewals every 2 s, so a client whose only
#: call in flight is a lock wait finds a hung metaserver within ~2 s + the hang bound.
PG_LEASE_S = 6.0


@pytest.fixture
def pg_pair(tmp_path, new_pg_dsn) -> Iterator[tuple[Cluster, Proc, Proc]]:
    """Two metaservers over one new PostgreSQL database; no data server (inline files)."""
    c = Cluster(tmp_path / "cluster", start=False)
    dsn = new_pg_dsn()
    procs: list[Proc] = []
    try:
        for k in range(2):
            procs.append(start_metaserver(c, f"meta-pg-{k}", flags=(
                "--engine", "postgres", "--dsn", dsn, "--session-lease-s", str(PG_LEASE_S))))
        yield c, procs[0], procs[1]
    finally:
        for proc in procs:
            proc.signal(signal.SIGCONT)
            proc.stop()


def test_shared_store_a_moved_client_keeps_its_session_opens_and_locks(pg_pair, caplog):
    c, a, b = pg_pair
    creds = load_credentials(c.client)

    async def main():
        async with open_client([a.address, b.address], creds) as client, \
                open_client([b.address, a.address], creds) as other:
            fh, attr = await client.create(ROOT_INODE, b"kept", 0o644, os.O_RDWR, ROOT)
            await client.write(fh, 0, b"written through a")
            await client.flush(fh)
            await client.lock(fh, F_WRLCK)
            session = client.session.id
            a.signal(signal.SIGSTOP)
            t = time.monotonic()
            await client.write(fh, 0, b"WRITTEN THROUGH b")
            await client.flush(fh)  # a commit: moves within the hang bound
            took = time.monotonic() - t
            assert (client.session.address, client.session.id) == (b.address, session)
            ofh, _, _ = await other.open(attr.ino, os.O_RDWR)
            assert await other.read(ofh, 0, 100) == b"WRITTEN THROUGH b"
            with pytest.raises(FsError) as info:
                await other.lock(ofh, F_WRLCK)  # our lock holds
            assert info.value.errno == errno.EAGAIN
            await other.release(ofh)
            await client.unlink(ROOT_INODE, b"kept")
            assert (await client.getattr(attr.ino)).nlink == 0  # kept: our open counts
            await client.lock(fh, F_UNLCK)
            await client.release(fh)
            return took

    with caplog.at_level(logging.WARNING):
        took = trio.run(main)
    assert took < HUNG_AFTER_S + SWITCH_SLACK_S
    assert not [r for r in caplog.records if "expired" in r.getMessage()]  # no new session


def test_shared_store_a_lock_wait_moves_with_the_client(pg_pair):
    """A waiter waits on the metaserver that hangs; it moves when its session renewal finds
    the hang, asks for the lock again on the other, and gets it there when the holder lets
    go. The hung one coming back later answers the abandoned wait: nobody minds."""
    c, a, b = pg_pair
    creds = load_credentials(c.client)

    async def main():
        async with open_client([a.address, b.address], creds) as waiter, \
                open_client([b.address, a.address], creds) as holder:
            fh, attr = await holder.create(ROOT_INODE, b"contended", 0o644, os.O_RDWR, ROOT)
            await holder.lock(fh, F_WRLCK)
            wfh, _, _ = await waiter.open(attr.ino, os.O_RDWR)
            got = []

            async def wait_for_it():
                await waiter.lock(wfh, F_WRLCK, wait=True)
                got.append(waiter.session.address)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_it)
                await trio.sleep(1.0)
                a.signal(signal.SIGSTOP)
                # The renewal (every lease/3) finds the hang and moves the waiter.
                with trio.fail_after(PG_LEASE_S / 3 + HUNG_AFTER_S + SWITCH_SLACK_S):
                    while waiter.session.address != b.address:  # noqa: ASYNC110 - polling internals: nothing signals this
                        await trio.sleep(0.2)
                await trio.sleep(1.0)
                assert not got
                await holder.lock(fh, F_UNLCK)
            assert got == [b.address]
            a.signal(signal.SIGCONT)
            await trio.sleep(1.0)
            await waiter.lock(wfh, F_UNLCK)
            await waiter.release(wfh)
            await holder.release(fh)

    trio.run(main)


def test_shared_store_status_shows_both_and_the_duties(pg_pair):
    c, a, b = pg_pair
    metas = f"{a.address},{b.address}"
    doc = status_json(c, metas)
    assert doc["engine"] == "postgres"
    assert [x["reachable"] for x in doc["addresses"]] == [True, True]
    assert sum(x["duties"] for x in doc["addresses"]) == 1
    assert doc["duties_address"] in (a.address, b.address)
    res = subprocess.run(cli("status", "--meta", metas, "--credentials", str(c.admin)),
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"metaserver {a.address} up") and lines[1].startswith(f"metaserver {b.address} up")
    assert sum("holds the background duties" in line for line in lines[:2]) == 1
    assert "store: postgres" in res.stdout
