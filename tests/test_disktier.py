"""The disk tier alone (fs/client/disktier.py), on a real directory: sizes as the mount's
--cache-size takes them, blocks kept and read back, a torn or damaged file found by its
checksum, leftovers of a crash removed, the LRU bound, and the index rebuilt by the next
client. The tier in a real mount: test_e2e_disktier.py."""

from __future__ import annotations

import os

import pytest
import trio

from stripefs.client.disktier import DiskTier, parse_size
from stripefs.proto.errors import FsError

pytestmark = pytest.mark.timeout(60)


def test_sizes():
    assert parse_size("10G") == 10 << 30
    assert parse_size("512m") == 512 << 20
    assert parse_size("1.5KiB") == 1536
    assert parse_size("1T") == 1 << 40
    assert parse_size("4096") == 4096
    for bad in ("", "G", "ten", "-1G"):
        with pytest.raises(ValueError):
            parse_size(bad)


def keep(tier: DiskTier, blocks: dict[int, bytes]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for block_id, data in blocks.items():
                tier.put_soon(nursery.start_soon, block_id, data)

    trio.run(main)


def get(tier: DiskTier, block_id: int):
    return trio.run(tier.get, block_id)


def test_kept_checked_bounded_and_found_again(tmp_path):
    d = tmp_path / "tier"
    tier = DiskTier(d, limit_bytes=3000)
    blocks = {i: os.urandom(1000) for i in range(1, 4)}
    for block_id, data in blocks.items():  # one at a time: the writes land in this order
        keep(tier, {block_id: data})
    assert len(tier) == 3 and tier.used_bytes == 3000
    assert get(tier, 2) == blocks[2] and tier.hits == 1
    # One more: the least recently used (1; 2 was just read) goes.
    keep(tier, {4: os.urandom(1000)})
    assert not tier.holds(1) and tier.holds(2) and tier.holds(3) and tier.holds(4)
    assert sorted(int(p.name) for p in (d / "blocks").glob("*/*")) == [2, 3, 4]
    # Damaged on disk: found, removed, and a miss.
    path = next(p for p in (d / "blocks").glob("*/*") if p.name == "3")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    assert get(tier, 3) is None and tier.corrupt == 1 and not tier.holds(3) and not path.exists()
    # Torn (a crash mid-write that still got renamed, or a truncated disk file).
    path4 = next(p for p in (d / "blocks").glob("*/*") if p.name == "4")
    path4.write_bytes(path4.read_bytes()[:500])
    assert get(tier, 4) is None and tier.corrupt == 2
    # A second client of the directory is refused while the first holds it.
    with pytest.raises(FsError):
        DiskTier(d, limit_bytes=3000)
    # A leftover temporary file of a crashed write goes; what is kept is found again.
    (d / "blocks" / "02" / "7.tmp").write_bytes(b"partial")
    tier.close()
    again = DiskTier(d, limit_bytes=3000)
    assert len(again) == 1 and again.holds(2) and again.used_bytes == 1000
    assert not (d / "blocks" / "02" / "7.tmp").exists()
    assert get(again, 2) == blocks[2]
    again.close()
    # A smaller limit at the next start evicts down to it.
    small = DiskTier(d, limit_bytes=0)
    assert len(small) == 0 and not list((d / "blocks").glob("*/*"))
    small.close()
