"""Level 3: the client library (no FUSE) against real server processes on loopback."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio

from stripefs.client import Ctx, FsError, open_client
from stripefs.proto.credentials import load_credentials
from stripefs.proto.messages import SessionReq
from stripefs.proto.rpc import Stub
from stripefs.proto.services import META_METHODS, META_SERVICE
from stripefs.proto.types import ROOT_INODE

from cluster import Cluster

ROOT = Ctx(0, 0, 0)


@pytest.fixture(scope="module")
def lib_cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("libcluster"), dataservers=3) as c:
        yield c


def run(cluster, fn, **options):
    """Run `fn(client)` in a fresh trio run with a fresh client."""

    async def main():
        async with open_client(cluster.meta_addr, load_credentials(cluster.client), **options) as client:
            return await fn(client)

    return trio.run(main)


async def fresh_dir(client, name: bytes, block_size: int | None = None) -> int:
    attr = await client.mkdir(ROOT_INODE, name + os.urandom(4).hex().encode(), 0o755, ROOT)
    if block_size:
        await client.setxattr(attr.ino, b"stripefs.block_size", str(block_size).encode())
    return attr.ino


async def write_file(client, parent: int, name: bytes, data: bytes, chunk: int = 1 << 20) -> int:
    fh, attr = await client.create(parent, name, 0o644, os.O_WRONLY, ROOT)
    for off in range(0, len(data), chunk):
        await client.write(fh, off, data[off : off + chunk])
    await client.flush(fh)
    await client.release(fh)
    return attr.ino


def expire_session(cluster, session: int) -> None:
    """End a client's session on the metaserver, as its expiry would (with the client's own
    credential: a session is closed by whom it belongs to)."""
    stub = Stub(cluster.meta_addr, load_credentials(cluster.client), META_SERVICE, META_METHODS)
    try:
        stub.call("close_session", SessionReq(session))
    finally:
        stub.close()


def opens_recorded(cluster, ino: int, session: int) -> int:
    """The opens of `ino` the metaserver has recorded in `session`."""
    return cluster.meta_value(
        "SELECT COALESCE(SUM(count), 0) FROM opens WHERE ino = ? AND session_id = ?", ino, session)


async def read_file(client, ino: int, chunk: int = 128 * 1024) -> bytes:
    fh, _, _ = await client.open(ino, os.O_RDONLY)
    out = bytearray()
    while True:
        piece = await client.read(fh, len(out), chunk)
        if not piece:
            break
        out += piece
    await client.release(fh)
    return bytes(out)


def test_write_read_striped_across_servers(lib_cluster):
    data = random.randbytes(10 * 1024 * 1024 + 123)

    async def body(client):
        d = await fresh_dir(client, b"striped", block_size=1 << 20)
        ino = await write_file(client, d, b"big", data)
        assert (await client.getattr(ino)).size == len(data)
        assert await read_file(client, ino) == data
        return (await client.block_map(ino)).blocks

    blocks = run(lib_cluster, body)
    assert len(blocks) == 11
    assert all(len(b.servers) == 2 and len(set(b.servers)) == 2 for b in blocks)  # R = min(2, 3)
    assert len({b.servers[0] for b in blocks[:3]}) == 3  # consecutive blocks start on different servers


def test_second_client_sees_closed_file(lib_cluster):
    data = random.randbytes(300_000)

    async def writer(client):
        d = await fresh_dir(client, b"c2o")
        return d, await write_file(client, d, b"f", data)

    d, ino = run(lib_cluster, writer)

    async def reader(client):
        assert (await client.lookup(d, b"f")).ino == ino
        return await read_file(client, ino)

    assert run(lib_cluster, reader) == data


def test_a_reopen_names_the_map_it_has_and_sees_what_another_client_wrote(lib_cluster):
    """Close-to-open with the maps a client keeps (files.py KnownMaps): an open names the
    map it has and gets none while the file is unchanged; after another client rewrites
    the file, the next open gets the new map and reads the new bytes."""
    first, second = random.randbytes(300_000), random.randbytes(200_000)

    async def writer(client):
        d = await fresh_dir(client, b"maps")
        return d, await write_file(client, d, b"f", first)

    d, ino = run(lib_cluster, writer)

    async def main():
        creds = load_credentials(lib_cluster.client)
        async with open_client(lib_cluster.meta_addr, creds) as a, open_client(lib_cluster.meta_addr, creds) as b:
            assert await read_file(a, ino) == first
            assert a.maps.reused == 0
            assert await read_file(a, ino) == first
            assert a.maps.reused == 1  # (the second open: no map sent)
            fh, _, _ = await b.open(ino, os.O_WRONLY | os.O_TRUNC, ROOT)
            await b.write(fh, 0, second)
            await b.flush(fh)
            await b.release(fh)
            assert await read_file(a, ino) == second
            assert a.maps.reused == 1
            assert await read_file(a, ino) == second
            assert a.maps.reused == 2

    trio.run(main)


def test_overwrite_middle_and_truncate(lib_cluster):
    async def body(client):
        d = await fresh_dir(client, b"rmw", block_size=64 * 1024)
        base = bytearray(random.randbytes(200_000))
        ino = await write_file(client, d, b"f", bytes(base))
        fh, _, _ = await client.open(ino, os.O_RDWR)
        await client.write(fh, 70_000, b"X" * 100)  # inside block 1: read-modify-write
        base[70_000:70_100] = b"X" * 100
        await client.fsync(fh)
        await client.release(fh)
        assert await read_file(client, ino) == bytes(base)
        await client.setattr(ino, ROOT, size=100_000)  # down, mid-block
        await client.setattr(ino, ROOT, size=150_000)  # up again: the cut bytes read as zeros
        assert await read_file(client, ino) == bytes(base[:100_000]) + bytes(50_000)

    run(lib_cluster, body)


def test_unlinked_file_stays_readable_through_open_handle(lib_cluster):
    data = random.randbytes(100_000)

    async def body(client):
        d = await fresh_dir(client, b"unl")
        ino = await write_file(client, d, b"f", data)
        fh, _, _ = await client.open(ino, os.O_RDONLY)
        await client.unlink(d, b"f")
        with pytest.raises(FsError) as exc:
            await client.lookup(d, b"f")
        assert exc.value.errno == errno.ENOENT
        assert await client.read(fh, 0, len(data)) == data
        await client.release(fh)
        # The metaserver hears of releases in the background; once it has, the inode has
        # no open and no link, and goes with the sweep once readers elsewhere whose opens
        # went unrecorded have had their time (unlinked_hold_s: test_meta_core.py,
        # test_e2e_multi.py).
        await client.session.flush_releases()
        assert (await client.getattr(ino)).nlink == 0

    run(lib_cluster, body)


def test_a_reader_whose_open_was_not_recorded_in_time_gets_eio_for_what_is_gone(tmp_path):
    # The metaserver keeps an unlinked file with blocks for --unlinked-hold-s (1 s here)
    # for readers whose opens went unrecorded; a client that does not record its open in
    # that time (here: told to wait an hour, as a stopped one would) finds the file purged
    # and its blocks collected: the read is an I/O error, said as one, not ENOENT.
    from faults import block_files

    data = random.randbytes(300_000)
    with Cluster(tmp_path / "c", dataservers=2, meta_args=["--unlinked-hold-s", "1", "--gc-grace-s", "1"]) as c:

        def stored() -> set[int]:
            return {b for i in range(2) for b in block_files(c.base / f"data-{i}")}

        async def main():
            creds = load_credentials(c.client)
            async with open_client(c.meta_addr, creds) as writer, open_client(c.meta_addr, creds) as reader:
                d = await fresh_dir(writer, b"late")
                ino = await write_file(writer, d, b"f", data)
                reader.session.record_open_after_s = 3600.0
                fh, _, _ = await reader.open(ino, os.O_RDONLY)
                block = reader._files[ino].blocks[0].block_id
                await writer.unlink(d, b"f")
                for _ in range(300):  # (60 s at most)
                    if block not in stored():
                        break
                    await trio.sleep(0.2)
                else:
                    pytest.fail(f"block {block} of the purged file was not collected")
                with pytest.raises(FsError) as exc:
                    await reader.read(fh, 0, len(data))
                assert exc.value.errno == errno.EIO
                await reader.release(fh)

        trio.run(main)


def test_errors_are_errno(lib_cluster):
    async def body(client):
        d = await fresh_dir(client, b"err")
        await client.mkdir(d, b"sub", 0o755, ROOT)
        for call, code in [
            (client.mkdir(d, b"sub", 0o755, ROOT), errno.EEXIST),
            (client.rmdir(ROOT_INODE, b"nope-" + os.urandom(4).hex().encode()), errno.ENOENT),
            (client.unlink(d, b"sub"), errno.EISDIR),
            (client.lookup(d, b"x" * 256), errno.ENAMETOOLONG),  # as ext4 (the wire: EINVAL)
            (client.lookup(d, b"a/b"), errno.EINVAL),  # not a name at all
        ]:
            with pytest.raises(FsError) as exc:
                await call
            assert exc.value.errno == code, call

    run(lib_cluster, body)


def test_write_back_stays_within_budget(lib_cluster):
    """A writer past the write-back budget waits for its flushes instead of growing."""
    data = random.randbytes(24 * 1024 * 1024)

    async def body(client):
        d = await fresh_dir(client, b"wb", block_size=1 << 20)
        fh, attr = await client.create(d, b"f", 0o644, os.O_WRONLY, ROOT)
        peak = 0
        for off in range(0, len(data), 256 * 1024):
            await client.write(fh, off, data[off : off + 256 * 1024])
            peak = max(peak, client._files[attr.ino].dirty_bytes())
        await client.flush(fh)
        await client.release(fh)
        assert await read_file(client, attr.ino) == data
        return peak

    peak = run(lib_cluster, body, writeback_bytes=4 * 1024 * 1024)
    assert peak <= 4 * 1024 * 1024 + 1024 * 1024


def test_expired_session_is_replaced(lib_cluster):
    """After the metaserver drops our session (as when it did not hear from us for several
    leases), the next call opens a new session, registers the open files again, retries."""
    data = random.randbytes(50_000)

    async def body(client):
        d = await fresh_dir(client, b"sess")
        ino = await write_file(client, d, b"keep", data)
        fh, _, _ = await client.open(ino, os.O_RDONLY)
        old = client.session.id
        expire_session(lib_cluster, old)
        fh2, attr = await client.create(d, b"after", 0o644, os.O_WRONLY, ROOT)  # needs a session
        assert client.session.id != old
        await client.write(fh2, 0, b"x")
        await client.flush(fh2)
        await client.release(fh2)
        assert await client.read(fh, 0, len(data)) == data  # the open file still reads
        await client.release(fh)

    run(lib_cluster, body)


def test_a_file_created_read_only_is_written_on_after_its_session_is_replaced(lib_cluster):
    """A non-root writer of a file it created 0444 (as git writes its objects): after the
    session is replaced, its handle is registered again for writing with the grant its
    create came with, although the mode lets nobody but root write, and the rest of what
    it writes reaches the file. Without the grant the registration failed (EACCES) and
    the handle's write-back then did too (EBADF: not open for writing)."""
    data = random.randbytes(3 * (1 << 20) + 5)
    user = Ctx(1000, 1000, 0)

    async def body(client):
        d = (await client.mkdir(ROOT_INODE, b"ro" + os.urandom(4).hex().encode(), 0o777, ROOT)).ino
        await client.setxattr(d, b"stripefs.block_size", str(1 << 20).encode())
        fh, attr = await client.create(d, b"obj", 0o444, os.O_WRONLY, user)
        half = len(data) // 2
        await client.write(fh, 0, data[:half])
        await client.flush(fh)
        old = client.session.id
        expire_session(lib_cluster, old)
        await client.release((await client.create(d, b"after", 0o644, os.O_WRONLY, user))[0])  # replaces it
        assert client.session.id != old
        assert lib_cluster.meta_value("SELECT COUNT(*) FROM opens WHERE ino = ? AND session_id = ? AND writable = 1",
                                      attr.ino, client.session.id) == 1
        await client.write(fh, half, data[half:])
        await client.flush(fh)
        await client.release(fh)
        assert await read_file(client, attr.ino) == data

    run(lib_cluster, body)


def test_a_new_session_records_the_opens_the_old_one_had_and_no_more(lib_cluster):
    """A replaced session's client records again one open for each recorded handle (their
    releases take them back one by one) and none for a handle whose open went unrecorded
    (it sends no release: one recorded for it would keep the file until the session ends)."""
    data = random.randbytes(200_000)  # stored in blocks: a reader's first open goes unrecorded

    async def body(client):
        async def agree(ino: int) -> tuple[int, int]:
            """(opens the metaserver has of `ino` in our session, our recorded handles on
            it), once they agree or after 5 s. Releases leave in the background, and a
            handle left unrecorded is recorded after a while (_record_lingering)."""
            for _ in range(100):
                mine = sum(h.recorded for h in client._handles.values() if h.ino == ino)
                theirs = opens_recorded(lib_cluster, ino, client.session.id)
                if mine == theirs:
                    break
                await trio.sleep(0.05)
            return theirs, mine

        d = await fresh_dir(client, b"reopen")
        ino = await write_file(client, d, b"f", data)
        other = await write_file(client, d, b"g", data)
        first, _, _ = await client.open(ino, os.O_RDONLY)  # unrecorded
        second, _, _ = await client.open(ino, os.O_RDONLY)  # recorded (the inode is open here)
        writer, _, _ = await client.open(ino, os.O_RDWR)  # recorded
        alone, _, _ = await client.open(other, os.O_RDONLY)  # unrecorded, the only handle
        assert not client._handles[first].recorded and not client._handles[alone].recorded
        old = client.session.id
        assert await agree(ino) == (2, 2) or client._handles[first].recorded
        expire_session(lib_cluster, old)
        await client.release((await client.create(d, b"after", 0o644, os.O_WRONLY, ROOT))[0])  # replaces it
        assert client.session.id != old
        for fh in (None, second, writer, first, alone):
            if fh is not None:
                await client.release(fh)
            theirs, mine = await agree(ino)
            assert theirs == mine, f"after releasing {fh}: {theirs} opens recorded for {mine} handles"
            theirs, mine = await agree(other)
            assert theirs == mine, f"after releasing {fh}: {theirs} opens recorded for {mine} handles"
        assert await agree(ino) == (0, 0) and await agree(other) == (0, 0)

    run(lib_cluster, body)


def test_a_release_queued_before_the_session_is_replaced_stays_in_the_old_one(lib_cluster, monkeypatch):
    """A handle closed while its session expired: its release, still queued when the new
    session is opened, must not take back one of the opens registered in the new session
    for the handles still open (an unlink elsewhere could then purge the file under them)."""
    from stripefs.client import session as session_mod
    monkeypatch.setattr(session_mod, "RELEASE_LINGER_S", 1.0)  # queued across the replacement

    async def body(client):
        d = await fresh_dir(client, b"requeue")
        ino = await write_file(client, d, b"f", random.randbytes(200_000))
        handles = [(await client.open(ino, os.O_RDWR))[0] for _ in range(3)]  # all recorded
        old = client.session.id
        expire_session(lib_cluster, old)
        await client.release(handles.pop())  # its release waits in the queue
        await client.release((await client.create(d, b"after", 0o644, os.O_WRONLY, ROOT))[0])  # replaces it
        assert client.session.id != old
        await client.session.flush_releases()
        opens = opens_recorded(lib_cluster, ino, client.session.id)
        assert opens == len(handles), f"{opens} opens recorded for {len(handles)} open handles"
        for fh in handles:
            await client.release(fh)
        await client.session.flush_releases()
        assert lib_cluster.meta_value("SELECT COUNT(*) FROM opens WHERE ino = ?", ino) == 0

    run(lib_cluster, body)


def test_a_session_lost_again_while_it_is_replaced_is_replaced_again(lib_cluster):
    """The new session expires too while the client registers its open files there: that
    replacement's own calls fail (they do not wait on the replacement they are part of),
    and the call that began it replaces the session again, where the files are registered."""
    async def body(client):
        d = await fresh_dir(client, b"twice")
        ino = await write_file(client, d, b"f", random.randbytes(200_000))
        fh, _, _ = await client.open(ino, os.O_RDWR)  # recorded
        reopen, lost = client.session.on_replaced, []

        async def lose_it_again() -> None:
            if not lost:
                lost.append(client.session.id)
                expire_session(lib_cluster, client.session.id)
            assert reopen is not None
            await reopen()

        client.session.on_replaced = lose_it_again
        first = client.session.id
        expire_session(lib_cluster, first)
        await client.release((await client.create(d, b"after", 0o644, os.O_WRONLY, ROOT))[0])
        assert client.session.id not in (first, *lost) and lost
        assert opens_recorded(lib_cluster, ino, client.session.id) == 1
        await client.release(fh)
        await client.session.flush_releases()
        assert lib_cluster.meta_value("SELECT COUNT(*) FROM opens WHERE ino = ?", ino) == 0

    run(lib_cluster, body)


@pytest.mark.parametrize("kind", ["open", "create"])
def test_an_open_answered_after_its_session_was_replaced_is_registered_in_the_new_one(lib_cluster, monkeypatch, kind):
    """An open (or create) recorded in a session that expires and is replaced while its
    reply is on its way (several metaservers: a reply can outlast its session): the
    replacement registers only the opens the client had counted, so this one is registered
    in the new session before it is counted; else its release would take back another
    handle's open there, and an unlink elsewhere could purge the file under that handle."""
    async def body(client):
        d = await fresh_dir(client, b"late" + kind.encode())
        ino = await write_file(client, d, b"f", random.randbytes(200_000))
        kept, _, _ = await client.open(ino, os.O_RDWR)  # recorded; open across the replacement
        old, real = client.session.id, client.session.transport.call

        async def late_reply(name, req, *args):
            reply = await real(name, req, *args)
            if name == {"open": "open", "create": "mknod"}[kind] and client.session.id == old and (
                    getattr(req, "ino", 0) == ino or getattr(req, "name", b"") == b"g"):
                # Recorded in `old`; the reply is on its way while that session is lost.
                expire_session(lib_cluster, old)
                await client.session._replace(old)
            return reply

        monkeypatch.setattr(client.session.transport, "call", late_reply)
        if kind == "open":
            late, _, _ = await client.open(ino, os.O_RDONLY)
            target, handles = ino, [kept, late]
        else:
            late, attr = await client.create(d, b"g", 0o644, os.O_WRONLY, ROOT)
            target, handles = attr.ino, [late]
        assert client.session.id != old
        assert opens_recorded(lib_cluster, target, client.session.id) == len(handles)
        for fh in (kept, late):
            await client.release(fh)
        await client.session.flush_releases()
        for i in {ino, target}:
            assert lib_cluster.meta_value("SELECT COUNT(*) FROM opens WHERE ino = ?", i) == 0

    run(lib_cluster, body)


@pytest.mark.parametrize("case, dropped", [
    ("larger than the cache", True),
    ("under a mount (kernel page cache)", True),
    ("smaller than the cache", False),
    ("open twice", False),
])
def test_a_sequential_reader_drops_the_blocks_it_has_passed(lib_cluster, case, dropped):
    """Drop behind (fs/client/reader.py): a block a sequential reader has moved past (by a
    block) leaves the block cache, for a file larger than the cache or under a mount, so
    that a stream's blocks do not fill the cache with new pages; kept otherwise (a second
    pass may use them), and while another handle has the file open (it may be behind)."""
    bs, blocks = 65536, 8
    data = random.randbytes(bs * blocks)
    options = {"cache_bytes": 4 * bs if case == "larger than the cache" else 64 * bs,
               "kernel_page_cache": case.startswith("under a mount")}

    async def body(client):
        d = await fresh_dir(client, b"behind", block_size=bs)
        ino = await write_file(client, d, b"f", data)
        other = (await client.open(ino, os.O_RDONLY))[0] if case == "open twice" else None
        fh, _, _ = await client.open(ino, os.O_RDONLY)
        got = b""
        for off in range(0, len(data), bs // 2):
            got += await client.read(fh, off, bs // 2)
        assert got == data
        ids = [ref.block_id for _, ref in sorted(client._files[ino].blocks.items())]
        held = [i for i, b in enumerate(ids) if b in client.data.cache]
        passed = range(blocks - 2)  # (the last two: one block of lag, and the one read last)
        if dropped:
            assert not set(passed) & set(held), f"blocks {held} still cached"
        else:
            assert set(passed) <= set(held), f"only blocks {held} cached"
        for h in (fh, other):
            if h is not None:
                await client.release(h)

    run(lib_cluster, body, **options)


def test_close_leaves_blocks_unsynced_and_fsync_syncs_them(lib_cluster):
    """close: data on its servers (written), metadata committed; fsync: the servers have
    also synced every block the client wrote to the file."""
    data = random.randbytes(3 * 65536 + 10)

    async def body(client):
        d = await fresh_dir(client, b"sync", block_size=65536)
        fh, attr = await client.create(d, b"f", 0o644, os.O_WRONLY, ROOT)
        await client.write(fh, 0, data)
        await client.flush(fh)
        f = client._files[attr.ino]
        written = {b for ids in f.unsynced.values() for b in ids}
        assert len(written) == 4  # 4 blocks written, none synced by close
        await client.fsync(fh)
        assert f.unsynced == {}
        await client.release(fh)
        assert await read_file(client, attr.ino) == data

    run(lib_cluster, body)


def test_upload_whose_allocation_expired_is_uploaded_again(tmp_path):
    """A write stalled past the metaserver's pending timeout (its allocations collected)
    still lands: the refused commit makes the client upload the blocks again."""
    data = random.randbytes(65536 * 2)
    with Cluster(tmp_path / "c", dataservers=2, meta_args=["--pending-timeout-s", "1"]) as c:

        async def body(client):
            d = await fresh_dir(client, b"exp", block_size=65536)
            fh, attr = await client.create(d, b"f", 0o644, os.O_WRONLY, ROOT)
            await client.write(fh, 0, data)  # two full blocks: uploaded in the background
            f = client._files[attr.ino]
            while f.flushing or len(f.uploaded) < 2:  # noqa: ASYNC110 - polling internals: nothing signals this
                await trio.sleep(0.05)
            await trio.sleep(3.0)  # the sweep (every second) drops allocations older than 1 s
            await client.flush(fh)
            assert f.expired_commits == 1
            await client.release(fh)
            assert await read_file(client, attr.ino) == data

        run(c, body)


def test_calls_made_together_fail_with_their_errno(lib_cluster):
    """paths.labels and paths.read_range make their calls together (fs/client/together.py):
    an error comes back as the FsError it is, not inside an ExceptionGroup (which the FUSE
    layer would answer with EIO and a program would see as a traceback)."""
    from stripefs.client import paths

    async def body(client):
        d = await fresh_dir(client, b"together")
        ino = await write_file(client, d, b"private", b"x" * 10)
        await client.setxattr(ino, b"user.split", b"train", 0, ROOT)
        await client.setxattr(ino, b"user.class", b"cat", 0, ROOT)
        await client.setattr(ino, ROOT, mode=0o600)
        assert await paths.labels(client, ino, ROOT) == {"class": "cat", "split": "train"}
        with pytest.raises(FsError) as exc:
            await paths.labels(client, ino, Ctx(1000, 1000))
        assert exc.value.errno == errno.EACCES
        fh, _, _ = await client.open(ino, os.O_RDONLY)
        assert await paths.read_range(client, fh, 0, 10) == b"x" * 10
        await client.release(fh)
        with pytest.raises(FsError) as exc:
            await paths.read_range(client, fh, 0, 10)  # a handle no longer open
        assert exc.value.errno == errno.EBADF

    run(lib_cluster, body)
