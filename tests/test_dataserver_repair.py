"""The data server's side of repair, in process: moving corrupt blocks aside, the
scrubber, get_block on a corrupt copy, and the Replicator copying from a real data
service on loopback."""

from __future__ import annotations

import threading
import time

import pytest

from stripefs.dataserver.replicate import Replicator
from stripefs.dataserver.scrub import Scrubber
from stripefs.dataserver.service import DataService
from stripefs.dataserver.store import FIXED_HEADER, BlockStore
from stripefs.proto.auth import read_token, write_token
from stripefs.proto.errors import FsError
from stripefs.proto.messages import GetBlockReq, ReplicateTask
from stripefs.proto.rpc import Stub, serve
from stripefs.proto.services import DATA_METHODS, DATA_SERVICE

pytestmark = pytest.mark.timeout(60)

SECRET = b"test-token-key-0123456789abcdef"  # the token key a metaserver would hand out


def flip(store: BlockStore, block_id: int, at: int = -10) -> None:
    path = store.root / "blocks" / f"{block_id % 256:02x}" / str(block_id)
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_quarantine_moves_aside_and_reports_once(tmp_path):
    store = BlockStore(tmp_path)
    store.put(5, b"x" * 100_000)
    store.put(6, b"y" * 10)
    flip(store, 5)
    with pytest.raises(FsError):
        store.verify(5)
    assert store.is_corrupt(5) and not store.is_corrupt(6)
    assert store.quarantine(5) and not store.quarantine(5)
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "corrupt").iterdir()) == ["5"]
    assert sorted(store.block_ids()) == [6] and store.stats().blocks == 1
    assert store.take_corrupt() == [5] and store.take_corrupt() == []
    store.return_corrupt([5])
    assert store.take_corrupt() == [5]
    # Stored again (a repair copy): no longer reported missing.
    store.quarantine(6)
    store.put(6, b"y" * 10)
    assert store.take_corrupt() == [] and store.get(6) == b"y" * 10


def test_scrubber_finds_corruption_at_a_bounded_rate(tmp_path):
    store = BlockStore(tmp_path)
    for b in range(1, 9):
        store.put(b, bytes([b]) * 64 * 1024)
    flip(store, 3)
    flip(store, 7, at=FIXED_HEADER.size)  # a checksum in the header
    stop = threading.Event()
    rate = 4 * 64 * 1024  # four blocks a second
    scrubber = Scrubber(store, stop, rate_bytes_s=rate, interval_s=3600)
    started = time.monotonic()
    done = scrubber.run_pass()
    elapsed = time.monotonic() - started
    assert done == {"blocks": 6, "corrupt": 2, "bytes": 6 * 64 * 1024}
    assert elapsed >= 6 / 4 - 0.3  # paced: ~1.5 s for 6 good blocks at 4 blocks/s
    assert sorted(store.take_corrupt()) == [3, 7]
    assert sorted(store.block_ids()) == [1, 2, 4, 5, 6, 8]
    # Oldest-verified first: a new block is checked before the ones just verified.
    store.put(20, b"new")
    order = []
    real_verify = store.verify
    store.verify = lambda b: (order.append(b), real_verify(b))[1]  # type: ignore[method-assign]
    scrubber.rate_bytes_s = 1 << 40
    scrubber.run_pass()
    assert order[0] == 20


def test_get_block_of_a_corrupt_copy_moves_it_aside(tmp_path):
    store = BlockStore(tmp_path)
    service = DataService(store)
    store.put(9, b"z" * 200_000)
    flip(store, 9)
    with pytest.raises(FsError):
        service.get_block(GetBlockReq(block_id=9))
    assert store.take_corrupt() == [9]
    assert list(store.block_ids()) == []


def readable(block_id: int) -> bytes:
    """The read token the metaserver gives the copying server (data:dst) in a task."""
    return read_token(SECRET, block_id, "data:dst", int(time.time()) + 600)


def test_replicator_copies_from_a_source_and_reports(tmp_path):
    from pki import Pki

    pki = Pki(tmp_path / "credentials")
    source = BlockStore(tmp_path / "src")
    data = bytes(range(256)) * 1000
    source.put(11, data)
    service = DataService(source)
    service.token_key = SECRET
    server, port = serve(DATA_SERVICE, DATA_METHODS, service, pki.creds("data", "src"), "127.0.0.1:0")
    target = BlockStore(tmp_path / "dst")
    rep = Replicator(target, pki.creds("data", "dst"), lambda: SECRET, lambda: "dst:1", workers=2)
    try:
        good = f"127.0.0.1:{port}"
        rep.submit([
            # The first source is down: the next one is tried.
            ReplicateTask(block_id=11, sources=["127.0.0.1:1", good], read_token=readable(11),
                          token=write_token(SECRET, 11, "data:dst", "dst:1", int(time.time()) + 60)),
            ReplicateTask(block_id=12, sources=[good], read_token=readable(12),  # no such block
                          token=write_token(SECRET, 12, "data:dst", "dst:1", int(time.time()) + 60)),
            ReplicateTask(block_id=13, sources=[good], token=b"forged", read_token=readable(13)),
        ])
        deadline = time.monotonic() + 20
        done: list[int] = []
        failed: list[int] = []
        while len(done) + len(failed) < 3 and time.monotonic() < deadline:
            d, f = rep.take_results()
            done += d
            failed += f
            time.sleep(0.05)
        assert done == [11] and sorted(failed) == [12, 13]
        assert target.get(11) == data
        check = Stub(good, pki.creds("admin"), DATA_SERVICE, DATA_METHODS)
        assert check.call("get_block", GetBlockReq(block_id=11)).data == data
        check.close()
    finally:
        rep.close()
        server.stop(0)
