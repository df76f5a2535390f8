"""Level 1: pieces of the client library as pure functions (no servers)."""

from fs.client.data import BlockCache
from fs.client.files import DirtyBlock, FileState, WritebackBudget
from proto.messages import Attr


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
    f.dirty[3] = DirtyBlock(bytearray(10))
    f.set_map(attr(size=100), [])
    assert f.size == 3 * 4096 + 10


def test_budget_counts_dirty_bytes():
    budget = WritebackBudget(100)
    f = FileState(9, attr(), 4096, budget)
    d = f.new_dirty(0, b"x" * 10)
    f.write_into(d, 50, memoryview(b"y" * 60))  # zero-fills 10..50, then 60 bytes
    assert budget.used_bytes == 110 and budget.over() and d.version == 1
    assert bytes(d.data[10:50]) == bytes(40)
    f.drop_dirty(0)
    assert budget.used_bytes == 0 and not f.busy()
