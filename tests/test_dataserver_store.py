"""The data server's block store, in process: format, checksums, idempotence, counters."""

from __future__ import annotations

import errno
import logging
import os
import threading

import pytest
from faults import resident_bytes

from stripefs.dataserver.store import FIXED_HEADER, BlockStore
from stripefs.proto.errors import FsError
from stripefs.proto.types import SUB_BLOCK_BYTES

pytestmark = pytest.mark.timeout(30)

SUB = SUB_BLOCK_BYTES


def pattern(n: int, seed: int = 0) -> bytes:
    """Bytes that differ in every position, so an off-by-one slice shows."""
    return bytes((i * 7 + seed) % 251 for i in range(n))


def block_file(root, block_id: int):
    return root / "blocks" / f"{block_id % 256:02x}" / str(block_id)


@pytest.fixture
def store(tmp_path):
    return BlockStore(tmp_path)


def test_round_trip_and_layout(store, tmp_path):
    data = pattern(3 * SUB + 123)
    store.put(300, data)
    assert store.get(300) == data
    path = block_file(tmp_path, 300)
    assert path.parent.name == "2c"  # 300 % 256 = 44
    n_sub = 4
    assert path.stat().st_size == FIXED_HEADER.size + 4 * n_sub + len(data)
    assert list(store.block_ids()) == [300]
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize(
    "offset,length",
    [
        (0, 10),
        (SUB - 5, 10),  # straddles the first boundary
        (SUB, SUB),  # exactly one sub-block
        (1, 3 * SUB),  # many sub-blocks, unaligned
        (3 * SUB + 100, -1),  # the short tail
        (2 * SUB - 1, -1),
        (3 * SUB + 123, 10),  # at the end
        (10 * SUB, 5),  # past the end
        (5, 0),
    ],
)
def test_partial_reads(store, offset, length):
    data = pattern(3 * SUB + 123)
    store.put(7, data)
    end = len(data) if length == -1 else offset + length
    assert store.get(7, offset, length) == data[offset:end]


def test_empty_block(store):
    store.put(1, b"")
    assert store.get(1) == b""
    assert store.get(1, 5, 10) == b""
    assert store.stats().blocks == 1


def test_exact_multiple_of_sub_block(store):
    data = pattern(2 * SUB)
    store.put(2, data)
    assert store.get(2) == data
    assert store.get(2, SUB, -1) == data[SUB:]


def test_idempotent_put_and_eexist(store):
    data = pattern(1000)
    store.put(5, data)
    store.put(5, data)
    assert store.stats().blocks == 1
    with pytest.raises(FsError) as info:
        store.put(5, pattern(1000, seed=1))
    assert info.value.errno == errno.EEXIST
    with pytest.raises(FsError) as info:
        store.put(5, pattern(999))
    assert info.value.errno == errno.EEXIST
    assert store.get(5) == data


def test_concurrent_puts_of_one_id_agree(store):
    data = [pattern(SUB + 1, seed=i % 2) for i in range(8)]
    results: list = [None] * len(data)

    def put(i: int) -> None:
        try:
            store.put(9, data[i])
            results[i] = "ok"
        except FsError as exc:
            results[i] = exc.errno

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(data))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = store.get(9)
    assert stored in data
    for i, r in enumerate(results):
        assert r == ("ok" if data[i] == stored else errno.EEXIST)
    assert store.stats().blocks == 1
    assert os.listdir(store.root / "tmp") == []


def test_missing_block(store):
    with pytest.raises(FsError) as info:
        store.get(42)
    assert info.value.errno == errno.ENOENT
    assert store.delete(42) is False


def test_flipped_byte_is_eio_only_for_its_sub_block(store, tmp_path, caplog):
    data = pattern(3 * SUB)
    store.put(11, data)
    path = block_file(tmp_path, 11)
    data_start = FIXED_HEADER.size + 4 * 3
    raw = bytearray(path.read_bytes())
    raw[data_start + SUB + 17] ^= 0x01  # inside sub-block 1
    path.write_bytes(bytes(raw))

    assert store.get(11, 0, SUB) == data[:SUB]
    assert store.get(11, 2 * SUB, -1) == data[2 * SUB :]
    with caplog.at_level(logging.ERROR, logger="stripefs.dataserver.store"):
        for offset, length in [(SUB + 17, 1), (SUB - 1, 2), (0, -1)]:
            with pytest.raises(FsError) as info:
                store.get(11, offset, length)
            assert info.value.errno == errno.EIO
    assert any("11" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert store.stats().corrupt_blocks == 1

    # Rewriting a corrupt block with its (authorized) content repairs it.
    store.put(11, data)
    assert store.get(11) == data
    assert store.stats().corrupt_blocks == 0
    assert store.stats().blocks == 1


@pytest.mark.parametrize("damage", ["magic", "truncate", "extend", "crc"])
def test_damaged_header_or_size_is_eio(store, tmp_path, damage):
    store.put(12, pattern(SUB + 5))
    path = block_file(tmp_path, 12)
    raw = bytearray(path.read_bytes())
    if damage == "magic":
        raw[0] ^= 0xFF
    elif damage == "truncate":
        raw = raw[:-1]
    elif damage == "extend":
        raw += b"x"
    else:
        raw[FIXED_HEADER.size] ^= 0x80  # first CRC
    path.write_bytes(bytes(raw))
    with pytest.raises(FsError) as info:
        store.get(12, 0, 10)
    assert info.value.errno == errno.EIO


@pytest.mark.parametrize("bad", [0, -1, 1 << 64, True, "5", "../etc/passwd", 1.0, None])
def test_bad_ids_rejected(store, bad):
    for call in (lambda: store.put(bad, b"x"), lambda: store.get(bad), lambda: store.delete(bad)):
        with pytest.raises(FsError) as info:
            call()
        assert info.value.errno == errno.EINVAL
    assert list(store.block_ids()) == []


def test_bad_ranges_rejected(store):
    store.put(3, b"abc")
    for offset, length in [(-1, 1), (0, -2)]:
        with pytest.raises(FsError) as info:
            store.get(3, offset, length)
        assert info.value.errno == errno.EINVAL


def test_restart_cleans_tmp_keeps_node_id_and_counts(tmp_path):
    store = BlockStore(tmp_path)
    node_id = store.node_id
    assert len(node_id) == 32 and (tmp_path / "node_id").read_text().strip() == node_id
    store.put(1, pattern(10))
    store.put(257, pattern(SUB + 1))
    used = store.stats().used_bytes
    (tmp_path / "tmp" / "1.leftover").write_bytes(b"half a block")
    (tmp_path / "blocks" / "01" / "stray").write_bytes(b"not a block")
    (tmp_path / "blocks" / "02" / "1").write_bytes(b"wrong shard")

    again = BlockStore(tmp_path)
    assert again.node_id == node_id
    assert os.listdir(tmp_path / "tmp") == []
    assert sorted(again.block_ids()) == [1, 257]
    st = again.stats()
    assert (st.blocks, st.used_bytes) == (2, used)


def test_counters(store):
    st = store.stats()
    assert (st.blocks, st.used_bytes, st.corrupt_blocks) == (0, 0, 0)
    assert st.capacity_bytes > 0 and 0 <= st.free_bytes <= st.capacity_bytes
    store.put(1, pattern(100))
    store.put(2, pattern(SUB * 2 + 1))
    st = store.stats()
    assert st.blocks == 2
    assert st.used_bytes == (FIXED_HEADER.size + 4 + 100) + (FIXED_HEADER.size + 12 + SUB * 2 + 1)
    assert store.delete(1) is True
    assert store.delete(1) is False
    st = store.stats()
    assert st.blocks == 1
    assert st.used_bytes == FIXED_HEADER.size + 12 + SUB * 2 + 1


def test_enospc_becomes_fserror_and_leaves_nothing(store, monkeypatch):
    import stripefs.dataserver.store as mod

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mod.os, "pwrite", full)
    with pytest.raises(FsError) as info:
        store.put(4, pattern(100))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert os.listdir(store.root / "tmp") == []
    assert list(store.block_ids()) == []
    assert store.stats().blocks == 0
    store.put(4, pattern(100))
    assert store.get(4) == pattern(100)


def test_unsynced_put_then_sync_blocks(store, monkeypatch):
    """put(sync=False) does no fsync; sync_blocks fsyncs the blocks and their directories
    once each, and skips blocks that are gone."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store.put(1, b"a" * 100, sync=False)
    store.put(257, b"b" * 100, sync=False)  # same directory as block 1 (1 % 256 == 257 % 256)
    assert synced == []
    assert store.get(1) == b"a" * 100
    store.sync_blocks([1, 257, 999])
    assert len(synced) == 3  # two files, one directory


@pytest.mark.parametrize("sync", [False, True])
def test_written_blocks_leave_the_page_cache(store, tmp_path, monkeypatch, sync):
    """Drop-behind: a block streamed in (as the write chain stores one) is on disk and out
    of the page cache once finished, fsynced or not; with it off the pages stay."""
    import stripefs.dataserver.store as mod

    data = os.urandom(4 << 20)
    for block_id, drop in ((7, True), (8, False)):
        monkeypatch.setattr(mod, "DROP_BEHIND", drop)
        w = store.writer(block_id, len(data), sync=sync)
        try:
            for i in range(0, len(data), 1 << 20):
                w.write(data[i : i + (1 << 20)])
            w.finish()
        finally:
            w.close()
        resident = resident_bytes(block_file(tmp_path, block_id))
        if drop:
            assert resident == 0
        else:
            assert resident > len(data) // 2
        assert store.get(block_id) == data


def test_a_writeback_error_fails_the_write(store, monkeypatch):
    """The wait for a block's writeback consumes any error it finds, so a later fsync would
    not see it: the write fails with it instead, and leaves nothing."""
    import ctypes

    import stripefs.dataserver.store as mod

    def failing(fd, offset, length, flags):
        if flags & mod._SYNC_FILE_RANGE_WAIT_AFTER:
            ctypes.set_errno(errno.EIO)
            return -1
        return 0

    monkeypatch.setattr(mod, "_sync_file_range", failing)
    with pytest.raises(FsError) as info:
        store.put(9, pattern(100_000), sync=False)
    assert info.value.errno == errno.EIO
    monkeypatch.undo()
    assert os.listdir(store.root / "tmp") == [] and list(store.block_ids()) == []


def test_version_1_blocks_are_still_read_and_checked(store, tmp_path):
    """Blocks stored by the first format (64 KiB sub-blocks, a zero flags field) read and
    verify as before; new blocks use the current sub-block size."""
    import struct

    import crc32c

    from stripefs.dataserver.store import V1_SUB_BLOCK_BYTES

    data = pattern(2 * V1_SUB_BLOCK_BYTES + 77)
    crcs = [crc32c.crc32c(data[i : i + V1_SUB_BLOCK_BYTES]) for i in range(0, len(data), V1_SUB_BLOCK_BYTES)]
    path = block_file(tmp_path, 77)
    path.write_bytes(FIXED_HEADER.pack(b"SFBK", 1, 0, len(data)) + struct.pack(f"<{len(crcs)}I", *crcs) + data)
    assert store.get(77) == data
    assert store.get(77, V1_SUB_BLOCK_BYTES + 5, 10) == data[V1_SUB_BLOCK_BYTES + 5 : V1_SUB_BLOCK_BYTES + 15]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(FsError) as exc:
        store.get(77, len(data) - 1, 1)
    assert exc.value.errno == errno.EIO
    store.put(78, data)
    _, version, sub_kib, _ = FIXED_HEADER.unpack(block_file(tmp_path, 78).read_bytes()[: FIXED_HEADER.size])
    assert (version, sub_kib * 1024) == (2, SUB)


def test_leaf_hashes_are_kept_beside_the_block(store, tmp_path):
    """A block stored with its writer's leaf hashes (format 3) reads as before and hands
    them back; a wrong count is refused; a copy whose data or hashes do not match the
    writer's digest fails `check` and is moved aside."""
    from stripefs.proto.integrity import block_digest, leaf_hashes

    data = pattern(3 * SUB_BLOCK_BYTES + 100, seed=5)
    leaves = leaf_hashes(data)
    store.put(400, data, leaves=leaves)
    version = FIXED_HEADER.unpack(block_file(tmp_path, 400).read_bytes()[: FIXED_HEADER.size])[1]
    assert version == 3
    assert store.get(400) == data and store.get(400, 5000, 10) == data[5000:5010]
    assert store.get_leaves(400) == leaves
    assert store.check(400, block_digest(data)) == "good"
    store.put(401, data)  # no leaves: format 2, none handed back
    assert store.get_leaves(401) == b""
    with pytest.raises(FsError) as info:
        store.put(402, data, leaves=leaves[:-1])
    assert info.value.errno == errno.EINVAL
    # Hashes that are not the data's (a bad server's, or a bug): the copy is not good.
    store.put(403, data, leaves=bytes(len(leaves)))
    assert store.check(403, block_digest(data)) == "corrupt"
    assert not block_file(tmp_path, 403).exists()
    # Data that is not the writer's, with CRCs and hashes to match: not good either.
    other = pattern(len(data), seed=6)
    store.put(404, other, leaves=leaf_hashes(other))
    assert store.check(404, block_digest(data)) == "corrupt"
    # Rot in the hashes is caught by their CRC, as rot in the data is by the sub-blocks'.
    store.put(406, data, leaves=leaves)
    path = block_file(tmp_path, 406)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(FsError) as info:
        store.verify(406)
    assert info.value.errno == errno.EIO and store.is_corrupt(406)
    # A file cut short in its hashes is corrupt, as one cut short in its data.
    store.put(405, data, leaves=leaves)
    path = block_file(tmp_path, 405)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(FsError) as info:
        store.get(405, 0, 10)
    assert info.value.errno == errno.EIO


def test_streamed_writer_checks_each_chunk(store):
    """A block stored chunk by chunk: the chunks' CRCs are checked (a damaged chunk is
    EBADMSG and nothing is stored), misfitting chunks are EINVAL, and a block whose chunks
    all came is stored as put would store it."""
    import crc32c

    from stripefs.proto.integrity import leaf_hashes

    data = pattern(3 * 65536 + 123)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    w = store.writer(9, len(data))
    try:
        for i, c in enumerate(chunks):
            w.write(c, leaf_hashes(c, first_leaf=16 * i), crc32c.crc32c(c))
        w.finish()
    finally:
        w.close()
    assert store.get(9) == data and store.get_leaves(9) == leaf_hashes(data)
    assert os.listdir(store.root / "tmp") == []

    w = store.writer(10, len(data))
    try:
        w.write(chunks[0], leaf_hashes(chunks[0]), crc32c.crc32c(chunks[0]))
        bad = bytearray(chunks[1])
        bad[7] ^= 1
        with pytest.raises(FsError) as info:
            w.write(bad, leaf_hashes(chunks[1], first_leaf=16), crc32c.crc32c(chunks[1]))
        assert info.value.errno == errno.EBADMSG
        with pytest.raises(FsError) as info:
            w.write(b"x" * 10)  # then a chunk without leaf hashes, after chunks with them
        with pytest.raises(FsError) as info:
            w.finish()  # short
        assert info.value.errno == errno.EINVAL
    finally:
        w.close()
    assert 10 not in set(store.block_ids()) and os.listdir(store.root / "tmp") == []

    w = store.writer(11, 100)
    try:
        w.write(b"a" * 50)
        with pytest.raises(FsError) as info:
            w.write(b"b" * 50)  # the first chunk was not a whole number of sub-blocks
        assert info.value.errno == errno.EINVAL
    finally:
        w.close()


def test_get_cached_reads_only_what_the_page_cache_holds(store, tmp_path, monkeypatch):
    """get_cached answers as get does for a range the page cache holds whole (as a rule
    the later chunks of a block whose first chunk was read: the kernel reads it ahead), and
    None where a page of it would come from the disk, or where the kernel cannot say (no
    cachestat: before Linux 6.5). A missing block is ENOENT, a corrupt one EIO, as for get."""
    import stripefs.dataserver.store as mod

    data = os.urandom(4 << 20)
    store.put(12, data)  # drop-behind: nothing of it is cached after the write
    fd = os.open(block_file(tmp_path, 12), os.O_RDONLY)
    try:
        mod._pages_cached(fd, 0, 1)  # finds out whether the kernel has cachestat(2)
    finally:
        os.close(fd)
    if not mod._cachestat_works:
        pytest.skip("this kernel has no cachestat(2) (Linux 6.5)")
    assert store.get_cached(12, 1 << 20, 1 << 20) is None
    assert store.get(12) == data  # all of it read (whatever the kernel's read-ahead)
    for k in range(4):
        assert store.get_cached(12, k << 20, 1 << 20) == data[k << 20: (k + 1) << 20]
    assert store.get_cached(12, 5, 10) == data[5:15]
    fd = os.open(block_file(tmp_path, 12), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # all gone...
        os.pread(fd, 16, 0)  # ... but the header's page
    finally:
        os.close(fd)
    assert store.get_cached(12, 2 << 20, 1 << 20) is None
    with pytest.raises(FsError) as info:
        store.get_cached(13)
    assert info.value.errno == errno.ENOENT
    path = block_file(tmp_path, 12)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    store.get(12, 0, 1)  # the header's page and the first data page cached again
    with pytest.raises(FsError) as info:
        store.get_cached(12, len(data) - 1, 1)
    assert info.value.errno == errno.EIO and store.is_corrupt(12)
    monkeypatch.setattr(mod, "_cachestat_works", False)
    assert store.get_cached(12, 0, 1) is None
