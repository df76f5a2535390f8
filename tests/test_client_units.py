"""Level 1: pieces of the client library as pure functions (no servers)."""

import trio
import trio.testing

from stripefs.client.cache import AttrCache, NameCache, now
from stripefs.client.data import BlockCache, DataPath
from stripefs.client.files import DirtyBlock, FileState, WritebackBudget
from stripefs.proto.messages import Attr, AttrReply, Ctx


def attr(size=0, mtime=1, generation=0):
    return Attr(9, 0o100644, 1, 0, 0, 0, size, 1, mtime, 1, 4096, 0, generation)


def test_block_cache_is_bounded_lru():
    c = BlockCache(limit_bytes=10)
    c.put(1, b"aaaa")
    c.put(2, b"bbbb")
    assert c.get(1) == b"aaaa"  # 1 is now most recent
    c.put(3, b"cccc")  # evicts 2
    assert 2 not in c and 1 in c and 3 in c  # membership does not count as a use
    assert c.get(2) is None and c.get(1) == b"aaaa" and c.get(3) == b"cccc"
    assert c.used_bytes == 8
    c.put(4, b"x" * 11)  # larger than the whole cache: not cached
    assert c.get(4) is None and c.used_bytes <= 10


def test_blocks_passed_leave_the_cache_and_are_remembered_only_if_the_kernel_keeps_them():
    d = DataPath(lambda address: None, cache_bytes=12)  # type: ignore[arg-type,return-value]
    for block_id in (1, 2, 3):
        d.cache.put(block_id, b"aaaa")
    d.passed(1, kernel_keeps=True)  # a mount's reader
    d.passed(2, kernel_keeps=False)  # the library's: its second pass fetches again
    assert 1 not in d.cache and 2 not in d.cache and d.cache.used_bytes == 4
    assert d.read_lately(1) and not d.read_lately(2) and d.read_lately(3)  # (3: cached)
    d.passed(1, kernel_keeps=True)  # not held any more: nothing changes
    for block_id in (4, 5):  # remembered up to the cache's limit (12) in bytes, oldest forgotten first
        d.cache.put(block_id, b"bbbbb")
        d.passed(block_id, kernel_keeps=True)
    assert not d.read_lately(1) and d.read_lately(4) and d.read_lately(5)


def test_overlay_applies_local_writes_only_while_dirty():
    f = FileState(9, attr(), 4096, WritebackBudget(1 << 20))
    f.dirty[1] = DirtyBlock(bytearray(b"x" * 100))
    f.size = 4096 + 100
    f.mtime_ns = 50
    a = f.overlay(attr(size=10, mtime=2))
    assert a.size == 4196 and a.mtime_ns == 50
    f.dirty.clear()
    a = f.overlay(attr(size=4196, mtime=60))
    assert a.size == 4196 and a.mtime_ns == 60 and f.size == 4196


def test_set_map_keeps_dirty_extent():
    f = FileState(9, attr(), 4096, WritebackBudget(1 << 20))
    f.dirty[3] = DirtyBlock(bytes(10))
    f.set_map(attr(size=100), [])
    assert f.size == 3 * 4096 + 10


def test_budget_counts_dirty_bytes():
    budget = WritebackBudget(100)
    f = FileState(9, attr(), 4096, budget)
    d = f.new_dirty(0, b"x" * 10)
    f.write_into(d, 50, memoryview(b"y" * 60))  # zero-fills 10..50, then 60 bytes
    assert budget.used_bytes == 110 and budget.over() and d.version == 1
    assert d.read(10, 40) == bytes(40)
    f.drop_dirty(0)
    assert budget.used_bytes == 0 and not f.busy()


def test_dirty_block_keeps_appends_and_copies_on_write():
    """Appends keep the writers' immutable buffers (a bytearray's bytes are copied); a write
    anywhere else gathers them into one buffer; a snapshot taken for an upload never
    changes under later writes, either way."""
    from stripefs.proto import codec

    d = DirtyBlock(b"base")
    mutable = bytearray(b"1234")
    d.write(4, memoryview(b"abcdef"))
    d.write(10, memoryview(mutable))
    mutable[:] = b"xxxx"  # the caller reuses its buffer
    assert d.content() == b"baseabcdef1234" and d.read(3, 5) == b"eabcd" and len(d) == 14
    snap = d.snapshot()
    d.write(14, memoryview(b"!"))  # an append after the snapshot
    assert b"".join(snap) == b"baseabcdef1234"
    d.write(0, memoryview(b"B"))  # in place: gathered into a bytearray
    assert d.content() == b"Baseabcdef1234!" and b"".join(snap) == b"baseabcdef1234"
    snap2 = d.snapshot()
    d.write(1, memoryview(b"A"))  # while an upload holds it: copied first
    assert b"".join(snap2) == b"Baseabcdef1234!" and d.content() == b"BAseabcdef1234!"
    d.release(snap2)
    d.release(snap)
    # Pieces in any sizes become the same chunk messages as one buffer would.
    pieces = [bytes([i]) * n for i, n in enumerate((1, 4095, 5000, 2 << 20, 7))]
    whole = b"".join(pieces)
    a, b = codec.BlockChunks(pieces), codec.BlockChunks(whole)
    assert list(a.messages()) == list(b.messages()) and a.digest() == b.digest() and a.length == len(whole)


def test_block_cache_gives_way_to_write_back():
    from stripefs.client.data import BlockCache

    cache = BlockCache(10)
    for block_id in (1, 2, 3):
        cache.put(block_id, b"x" * 3)
    cache.get(1)  # most recently used now
    cache.trim(10 - 5)  # 5 bytes of dirty data want room: the least recently used go
    assert cache.used_bytes == 3 and 1 in cache and 2 not in cache and 3 not in cache
    cache.trim(-1)
    assert cache.used_bytes == 0


def test_forget_refuses_attributes_fetched_before_it():
    """A reply on its way while we changed an inode (setxattr) must not put back the
    attributes the change made wrong: getxattr answers ENODATA from their xattr count."""
    cache = AttrCache()
    before = now()
    stale = Attr(7, 0o40755, 2, 0, 0, 0, 0, 0, 0, 0, 4096, 0, xattrs=0)
    cache.forget(7)
    cache.put(stale, before)  # fetched before the change
    assert cache.get(7) is None
    fresh = Attr(7, 0o40755, 2, 0, 0, 0, 0, 0, 0, 0, 4096, 0, xattrs=1)
    cache.put(fresh, now())
    assert cache.get(7)[0].xattrs == 1
    other = AttrCache()
    other.drop(7)
    other.put(stale, before)  # drop alone (every other change) keeps the old rule
    assert other.get(7)[0].xattrs == 0


def test_a_lookup_joins_one_on_its_way_only_if_nothing_changed_since_it_was_sent():
    """Concurrent lookups of one name share one call (a prefetcher's group of paths), but a
    lookup made after a change of this client (here an unlink of the name) must not take
    the answer of one sent before it: that answer may not show the change."""
    async def main() -> None:
        sent, release = [], trio.Event()

        async def call(method, req):
            assert method == "lookup"
            sent.append(req.name)
            await release.wait()
            return AttrReply(attr=Attr(9, 0o100644, 1, 0, 0, 0, 0, 1, 1, 1, 4096, 0))

        names = NameCache(call, spawn=lambda *a: None)
        ctx = Ctx(0, 0, 0)
        got = []

        async def look() -> None:
            got.append((await names.lookup(1, b"x", ctx)).attr)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look)
            nursery.start_soon(look)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == [b"x"]  # the second waits for the first's answer
            names.removed(1, b"x", None, now())  # a change of ours, after that call was sent
            nursery.start_soon(look)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == [b"x", b"x"]  # asked again
            release.set()
        assert len(got) == 3

    trio.run(main)
