"""Level 2: the client library against in-process servers (a MetaCore and data services on
temporary directories) through `LocalTransport`: the read and write paths, inline files,
and how many metadata calls the caches save, without processes or a network."""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections import Counter
from typing import Optional

import pytest
import trio

from stripefs.dataserver.service import DataService
from stripefs.dataserver.store import BlockStore
from stripefs.client import Ctx, FsError
from stripefs.client.client import Client
from stripefs.client.disktier import DiskTier
from stripefs.client.staging import Stager
from stripefs.client.transport import LocalTransport
from stripefs.client.writer import ALLOC_AHEAD_BLOCKS
from stripefs.metaserver.core import MetaCore
from stripefs.proto.messages import Empty, RegisterReq
from stripefs.proto.services import DATA_METHODS, META_METHODS
from stripefs.proto.types import CHECKPOINT_XATTR, LAYOUT_XATTR_BLOCK_SIZE, LAYOUT_XATTR_INLINE_MAX, ROOT_INODE

pytestmark = pytest.mark.timeout(120)

SECRET = b"0123456789abcdef0123456789abcdef"
ROOT = Ctx(0, 0, 0)
SMALL_BS = 64 * 1024


class Counting(LocalTransport):
    """A LocalTransport that counts calls by name."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    async def call(self, name, req, timeout_s, patience_s=None):
        self.calls[name] += 1
        return await super().call(name, req, timeout_s, patience_s)


class World:
    """One metaserver core and three data services, in this process."""

    def __init__(self, tmp_path) -> None:
        self.core = MetaCore(str(tmp_path / "meta.db"), SECRET)
        self.data = {}
        for i in range(3):
            address = f"data-{i}"
            store = BlockStore(tmp_path / address)
            self.data[address] = DataService(store, address=address)
            self.data[address].token_key = SECRET  # as after registering
            self.core.register(RegisterReq(address, uuid.uuid4().hex, 1 << 40, 1 << 40, 0))
        peers = {a: s.chain for a, s in self.data.items()}
        for service in self.data.values():
            service.chain.local_peers = peers  # write chains forwarded in-process

    def client(self, disk_tier: Optional[DiskTier] = None) -> tuple[Client, Counting]:
        meta = Counting(self.core, META_METHODS, "meta")
        client = Client("meta", None, meta_transport=meta, disk_tier=disk_tier,
                        data_connect=lambda a: LocalTransport(self.data[a], DATA_METHODS, a))
        return client, meta

    def close(self) -> None:
        self.core.close()
        for service in self.data.values():
            service.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def run(world: World, *bodies, disk_tier: Optional[DiskTier] = None):
    """Run each body(client, counter) with a client of its own, one after the other (each
    with `disk_tier`, if given)."""

    async def main():
        out = []
        for body in bodies:
            client, counter = world.client(disk_tier)
            async with trio.open_nursery() as nursery:
                await client._start(nursery)
                try:
                    out.append(await body(client, counter.calls))
                finally:
                    with trio.CancelScope(shield=True):
                        await client.aclose()
                    nursery.cancel_scope.cancel()
        return out

    return trio.run(main)


async def write(client: Client, parent: int, name: bytes, data: bytes) -> int:
    fh, attr = await client.create(parent, name, 0o644, os.O_WRONLY, ROOT)
    for off in range(0, len(data), 1 << 20):
        await client.write(fh, off, data[off : off + (1 << 20)])
    await client.flush(fh)
    await client.release(fh)
    return attr.ino


async def read(client: Client, ino: int) -> bytes:
    fh, _, _ = await client.open(ino, os.O_RDONLY)
    out = bytearray()
    while piece := await client.read(fh, len(out), 128 * 1024):
        out += piece
    await client.release(fh)
    return bytes(out)


def test_small_file_is_inline_and_read_in_one_open(world):
    data = os.urandom(16 * 1024)

    async def writer(client, calls):
        d = (await client.mkdir(ROOT_INODE, b"ds", 0o755, ROOT)).ino
        ino = await write(client, d, b"sample", data)
        assert calls["commit_inline"] == 1
        assert calls["alloc_blocks"] == calls["commit_blocks"] == 0  # no data server involved
        return d, ino

    async def reader(client, calls):
        ino = (await client.lookup(d, b"sample")).ino
        before = sum(calls.values())
        assert await read(client, ino) == data
        await client.session.flush_releases()
        # The open, with the bytes, and nothing else: a reader's open of a file without
        # blocks is not recorded, so no release follows it.
        assert sum(calls.values()) - before == 1 and calls["open"] == 1 and calls["release"] == 0
        return ino

    [(d, ino)] = run(world, writer)
    run(world, reader)
    status = world.core.status(Empty())
    assert status.inline_files == 1 and status.inline_bytes == len(data) and status.blocks == 0


def test_inline_file_grows_to_blocks_and_back(world):
    small, big = os.urandom(1000), os.urandom(200_000)

    async def body(client, calls):
        d = (await client.mkdir(ROOT_INODE, b"grow", 0o755, ROOT)).ino
        await client.setxattr(d, LAYOUT_XATTR_BLOCK_SIZE, str(SMALL_BS).encode())
        ino = await write(client, d, b"f", small)
        assert world.core.status(Empty()).inline_files == 1
        fh, _, _ = await client.open(ino, os.O_WRONLY)
        await client.write(fh, len(small), big)  # appends: block 0 rewritten as a stored block
        await client.flush(fh)
        await client.release(fh)
        assert await read(client, ino) == small + big
        st = world.core.status(Empty())
        assert st.inline_files == 0 and st.blocks == 4
        fh, _, _ = await client.open(ino, os.O_WRONLY | os.O_TRUNC)
        await client.write(fh, 0, small)
        await client.flush(fh)
        await client.release(fh)
        assert await read(client, ino) == small
        st = world.core.status(Empty())
        assert st.inline_files == 1 and st.blocks == 0
        # A truncate down inside the inline bytes, and up again: the cut part reads as zeros.
        await client.setattr(ino, ROOT, size=10)
        await client.setattr(ino, ROOT, size=20)
        assert await read(client, ino) == small[:10] + bytes(10)

    run(world, body)


def test_inline_limit_is_per_directory(world):
    async def body(client, calls):
        d = (await client.mkdir(ROOT_INODE, b"noinline", 0o755, ROOT)).ino
        await client.setxattr(d, LAYOUT_XATTR_INLINE_MAX, b"0")
        assert await client.getxattr(d, LAYOUT_XATTR_INLINE_MAX) == b"0"
        ino = await write(client, d, b"f", b"tiny")
        assert calls["commit_inline"] == 0 and calls["commit_blocks"] == 1
        assert (await client.getattr(ino)).inline_max == 0
        with pytest.raises(FsError) as exc:
            await client.setxattr(d, LAYOUT_XATTR_INLINE_MAX, b"99999999")
        assert exc.value.errno == errno.EINVAL

    run(world, body)


def test_large_file_round_trip(world):
    data = os.urandom(3 * SMALL_BS + 123)

    async def body(client, calls):
        d = (await client.mkdir(ROOT_INODE, b"big", 0o755, ROOT)).ino
        await client.setxattr(d, LAYOUT_XATTR_BLOCK_SIZE, str(SMALL_BS).encode())
        ino = await write(client, d, b"f", data)
        assert await read(client, ino) == data
        assert calls["commit_inline"] == 0

    run(world, body)


def test_a_block_clamped_by_truncate_reads_back(world):
    """truncate leaves the block holding the new end as written and clamps its length; its
    digest describes it as written. A fresh client reads it whole, in ranges, and after a
    write past the end (which reads it to fill the rest of its block): no EIO, and nothing
    past the clamp shows (fsx found reads of such blocks failing their digest)."""
    data = os.urandom(2 * SMALL_BS + 5000)
    cut = SMALL_BS + 1234
    state = {}

    async def writer(client, calls):
        d = (await client.mkdir(ROOT_INODE, b"t", 0o755, ROOT)).ino
        await client.setxattr(d, LAYOUT_XATTR_BLOCK_SIZE, str(SMALL_BS).encode())
        await client.setxattr(d, LAYOUT_XATTR_INLINE_MAX, b"0")
        state["ino"] = ino = await write(client, d, b"f", data)
        await client.setattr(ino, ROOT, size=cut)

    async def reader(client, calls):
        ino = state["ino"]
        assert await read(client, ino) == data[:cut]
        fh, _, _ = await client.open(ino, os.O_RDWR)
        assert await client.read(fh, SMALL_BS + 1000, 300) == data[SMALL_BS + 1000 : cut]  # a range, to the end
        await client.write(fh, cut + 100, b"tail")
        await client.flush(fh)
        await client.release(fh)

    async def rereader(client, calls):
        assert await read(client, state["ino"]) == data[:cut] + bytes(100) + b"tail"

    run(world, writer, reader, rereader)


def test_creates_in_a_directory_being_filled_are_one_call_each(world):
    async def body(client, calls):
        d = (await client.mkdir(ROOT_INODE, b"fill", 0o755, ROOT)).ino
        for i in range(200):
            name = b"f%03d" % i
            assert (await client.lookup_entry(d, name)).attr is None  # what the kernel asks first
            fh, _ = await client.create(d, name, 0o644, os.O_WRONLY, ROOT)
            await client.flush(fh)
            await client.release(fh)
        # no lookup reached the metaserver: the listing of a directory we made is complete
        assert calls["lookup"] == 0 and calls["mknod"] == 200
        e = await client.lookup_entry(d, b"f007")
        assert e.attr is not None and calls["lookup"] == 0

    run(world, body)


def test_statahead_fetches_entries_in_batches(world):
    async def fill(client, calls):
        d = (await client.mkdir(ROOT_INODE, b"many", 0o755, ROOT)).ino
        for i in range(3000):
            await client.mknod(d, b"e%05d" % i, 0o100644, ROOT)
        return d

    async def scan(client, calls):
        for i in range(3000):
            assert (await client.lookup(d, b"e%05d" % i)).size == 0
        return calls["lookup"], calls["readdir"]

    [d] = run(world, fill)
    [(lookups, readdirs)] = run(world, scan)
    assert lookups <= 10 and readdirs <= 6, (lookups, readdirs)


def test_lookups_of_one_name_made_together_are_one_call(world):
    """A name several tasks look up at once (a prefetcher resolving the parents of a
    group of paths) is asked for once; the others wait for its answer, a missing name's
    ENOENT included. Another caller's lookup is its own (the metaserver checks each
    caller's search permission)."""
    async def body(client, calls):
        d = (await client.mkdir(ROOT_INODE, b"dir", 0o755, ROOT)).ino
        await client.mknod(d, b"there", 0o100644, ROOT)
        client.names.attrs.drop(d)
        client.names.listings.forget(client.names.listings.of(ROOT_INODE), b"dir")
        before = calls["lookup"]
        got, missing = [], []

        async def look(name: bytes, ctx: Ctx) -> None:
            try:
                got.append((await client.names.lookup(ROOT_INODE if name == b"dir" else d, name, ctx)).attr)
            except FsError as exc:
                missing.append(exc.errno)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(look, b"dir", ROOT)
            nursery.start_soon(look, b"dir", Ctx(1000, 1000, 0))
        assert len(got) == 9 and {a.ino for a in got} == {d}
        assert calls["lookup"] - before == 2  # one for root's eight, one for uid 1000's
        client.names.listings.drop(d)  # (else its listing, complete, answers "no such entry")
        before = calls["lookup"]
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(look, b"nothing", ROOT)
        assert missing == [errno.ENOENT] * 5 and calls["lookup"] - before == 1

    run(world, body)


def test_blocks_are_allocated_with_creates_only_where_files_outgrow_inline(world):
    async def body(client, calls):
        d = (await client.mkdir(ROOT_INODE, b"medium", 0o755, ROOT)).ino
        await client.setxattr(d, LAYOUT_XATTR_BLOCK_SIZE, str(SMALL_BS * 4).encode())
        await write(client, d, b"a", os.urandom(150_000))  # first one: allocates at close
        assert calls["alloc_blocks"] == 1
        for i in range(5):
            await write(client, d, b"m%d" % i, os.urandom(150_000))  # allocated with the create
        assert calls["alloc_blocks"] == 1 and calls["commit_blocks"] == 6
        for i in range(5):
            await write(client, d, b"s%d" % i, b"small")  # the first small one drops its allocation
        assert calls["commit_inline"] == 5
        with world.core.store.transaction() as tx:
            assert tx.scalar("SELECT COUNT(*) FROM pending") == 0

    run(world, body)


def test_files_staged_while_a_previous_clients_leftovers_are_swept_are_kept(world, tmp_path, monkeypatch):
    """A client starting on a staging area sweeps what a previous one left unrecorded (files
    never closed) while it may already be serving; a file it stages meanwhile has no record
    yet either, so its first staged files wait for the sweep (Stager.begin). With the sweep
    made slow, the file staged at once must survive it and be uploaded whole."""
    tier = tmp_path / "tier"
    (tier / "stage").mkdir(parents=True)
    leftover = tier / "stage" / "987654321"
    leftover.write_bytes(b"written by a client that died before closing it")
    sweep = Stager._records

    def slow_sweep(self):
        time.sleep(0.5)
        return sweep(self)

    monkeypatch.setattr(Stager, "_records", slow_sweep)
    data = os.urandom(3 * SMALL_BS + 5)

    async def body(client, calls):
        d = await client.mkdir(ROOT_INODE, b"ckpt", 0o755, ROOT)
        await client.setxattr(d.ino, CHECKPOINT_XATTR, b"async", ctx=ROOT)
        await client.setxattr(d.ino, LAYOUT_XATTR_BLOCK_SIZE, str(SMALL_BS).encode(), ctx=ROOT)
        fh, attr = await client.create(d.ino, b"rank0.pt", 0o644, os.O_WRONLY, ROOT)
        assert client.stager is not None and attr.ino in client.stager.files
        staged = client.stager.files[attr.ino].stage
        assert staged is not None
        await client.write(fh, 0, data)
        with trio.fail_after(30):
            await client.stager._swept.wait()
        assert not leftover.exists()
        assert (tier / "stage" / str(attr.ino)).read_bytes() == data  # not swept with it
        await client.release(fh)
        with trio.fail_after(60):
            await staged.uploaded.wait()
        assert not client.stager.files and client.stager.uploaded_files == 1
        return attr.ino

    [ino] = run(world, body, disk_tier=DiskTier(tier, 1 << 26))
    assert run(world, lambda c, _: read(c, ino)) == [data]


def test_a_sequential_writer_allocates_blocks_ahead_in_few_calls(world):
    """The write-behind of block k also allocates the next min(k, ALLOC_AHEAD_BLOCKS)
    (writer.py): a file written block by block (as FUSE hands a mount its writes) takes a
    handful of alloc_blocks calls, not one a block, and a block covered by an allocation
    on its way waits for it rather than allocate again; a 3-block file makes no more
    allocations than before. The spares a file never reached go back with its release:
    none is left pending (before, up to 7 a file until the pending timeout)."""

    big, small = os.urandom(40 * SMALL_BS), os.urandom(2 * SMALL_BS + 100)

    async def write_by_blocks(client, parent: int, name: bytes, data: bytes) -> int:
        fh, attr = await client.create(parent, name, 0o644, os.O_WRONLY, ROOT)
        for off in range(0, len(data), SMALL_BS // 2):
            await client.write(fh, off, data[off : off + SMALL_BS // 2])
            await trio.lowlevel.checkpoint()  # the write-behind tasks start, as between FUSE requests
        await client.flush(fh)
        await client.release(fh)
        return attr.ino

    async def body(client, calls):
        d = (await client.mkdir(ROOT_INODE, b"ckpt", 0o755, ROOT)).ino
        await client.setxattr(d, LAYOUT_XATTR_BLOCK_SIZE, str(SMALL_BS).encode())
        ino = await write_by_blocks(client, d, b"big", big)
        # blocks 0, 1 (+2), 3 (+4..6), 7 (+8..14), 15 (+16..22), 23 (+...), 31 (+...), 39
        assert 5 <= calls["alloc_blocks"] <= 40 // (1 + ALLOC_AHEAD_BLOCKS) + 4, calls
        await client.session.flush_releases()
        with world.core.store.transaction() as tx:
            assert tx.scalar("SELECT COUNT(*) FROM pending WHERE ino = ?", (ino,)) == 0
            abandoned = tx.scalar("SELECT COUNT(DISTINCT block_id) FROM garbage")
        assert 1 <= abandoned <= ALLOC_AHEAD_BLOCKS  # the spares past block 39
        assert await read(client, ino) == big
        before = calls["alloc_blocks"]
        ino = await write_by_blocks(client, d, b"small", small)
        assert calls["alloc_blocks"] - before <= 3
        assert await read(client, ino) == small
        await client.session.flush_releases()
        with world.core.store.transaction() as tx:
            assert tx.scalar("SELECT COUNT(*) FROM pending WHERE ino = ?", (ino,)) == 0

    run(world, body)
