"""End-to-end integrity of stored blocks: what a writer computes of each block it stores,
which the metaserver records at commit and hands out in block maps, and which a reader (or
a data server copying the block) checks what it got against.

Data servers check their own CRC32Cs per 4 KiB (dataserver/store.py): that catches a bad
disk, not a bad server, since a server that wants to can serve other bytes with matching
CRCs. The digest comes from the writer, through the metaserver, so no data server, rogue
or buggy, can make a reader accept bytes the writer did not write.

The block is cut into LEAF_BYTES leaves, each leaf hashed (SHA-256, first LEAF_HASH_BYTES
bytes: second preimages stay out of reach). A digest (version 2, DIGEST_BYTES) is a version
byte, the SHA-256 of the whole block, and the SHA-256 of its leaf hashes:

- a whole-block reader hashes what it got in one SHA-256 pass, which hashlib runs without
  the GIL (chunk by chunk as the block streams in), and compares it with the first hash;
- a range reader (random 4 KiB reads) fetches the block's leaf hashes once (the writer
  sends them with the block and the data server keeps them beside it, untrusted), checks
  them against the second hash, then checks each leaf it reads against its own hash.

Version 1 (DIGEST_V1_BYTES, blocks written before version 2) is the SHA-256 of the leaf
hashes alone, so a whole-block reader had to hash every leaf, 1,024 hashlib calls a 4 MiB
block with the GIL held (measured: half of a mount's GIL time while it reads a
checkpoint); both are still checked. SHA-256 runs at ~1.5 GB/s with the SHA instructions
of these machines.
"""

from __future__ import annotations

import hashlib
from typing import Optional

#: Bytes of a block digest: version byte, SHA-256 of the block, SHA-256 of its leaf hashes.
DIGEST_BYTES = 65
DIGEST_VERSION = b"\x02"
#: Bytes of a version 1 digest (the SHA-256 of the leaf hashes; blocks written before).
DIGEST_V1_BYTES = 32
#: Bytes of data per leaf: a random 4 KiB read checks one leaf.
LEAF_BYTES = 4096
#: Bytes kept of each leaf's SHA-256.
LEAF_HASH_BYTES = 16
#: Blocks smaller than this are hashed where they are (the thread hand-off costs more).
INLINE_HASH_MAX_BYTES = 256 * 1024


def leaf_count(length: int) -> int:
    return (length + LEAF_BYTES - 1) // LEAF_BYTES


#: hashlib lets go of the GIL for each update of at least 2,048 bytes: fed smaller pieces
#: it keeps it, so hashing a block costs the calling thread one GIL hand-off, not one per
#: leaf (each a wait of up to the switch interval while other threads run: measured, the
#: per-leaf hand-offs slowed a mount's uploads until its write-back budget filled).
_PIECE = 2047
assert 2 * _PIECE < LEAF_BYTES <= 3 * _PIECE


def leaf_hashes(data: bytes | bytearray | memoryview) -> bytes:
    """The hashes of a block's leaves (of its valid length), concatenated."""
    view, sha = memoryview(data), hashlib.sha256
    full = len(view) - len(view) % LEAF_BYTES
    out: list[bytes] = []
    add = out.append
    # Whole leaves unrolled into three pieces below the GIL threshold: this loop's own
    # overhead was half the cost of hashing a block (4.9 -> 3.7 ms a 4 MiB block here).
    a, b = _PIECE, 2 * _PIECE
    for i in range(0, full, LEAF_BYTES):
        h = sha(view[i : i + a])
        h.update(view[i + a : i + b])
        h.update(view[i + b : i + LEAF_BYTES])
        add(h.digest()[:LEAF_HASH_BYTES])
    if full < len(view):  # the short last leaf
        h = sha(view[full : full + a])
        for j in range(full + a, len(view), _PIECE):
            h.update(view[j : j + _PIECE])
        add(h.digest()[:LEAF_HASH_BYTES])
    return b"".join(out)


def root_of(leaves: bytes) -> bytes:
    return hashlib.sha256(leaves).digest()


def make_digest(block_hash: bytes, leaves: bytes) -> bytes:
    """The digest of a block from its SHA-256 and its leaf hashes."""
    return DIGEST_VERSION + block_hash + root_of(leaves)


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of a block's bytes (its valid length, nothing past it)."""
    return make_digest(hashlib.sha256(data).digest(), leaf_hashes(data))


def hash_matches(digest: bytes, block_hash: bytes) -> Optional[bool]:
    """Whether a block whose SHA-256 is block_hash is the one the digest was made of; None
    when the digest cannot tell from that alone (version 1: hash the leaves, `matches`)."""
    if len(digest) != DIGEST_BYTES:
        return None
    return digest[1:33] == block_hash


def matches(digest: bytes, data: bytes | bytearray | memoryview) -> bool:
    """Whether data is the block the digest was made of; True when no digest is recorded
    (blocks committed before digests were)."""
    if not digest:
        return True
    if len(digest) == DIGEST_BYTES:
        return digest[1:33] == hashlib.sha256(data).digest()
    return root_of(leaf_hashes(data)) == digest


def leaves_match(digest: bytes, length: int, leaves: bytes) -> bool:
    """Whether `leaves` are the leaf hashes of the `length`-byte block with this digest."""
    if len(leaves) != leaf_count(length) * LEAF_HASH_BYTES:
        return False
    return root_of(leaves) == (digest[33:] if len(digest) == DIGEST_BYTES else digest)


def range_matches(leaves: bytes, offset: int, data: bytes | bytearray | memoryview) -> bool:
    """Whether data, read at a leaf-aligned offset, matches its leaves' hashes (leaves
    already checked against the digest with leaves_match)."""
    assert offset % LEAF_BYTES == 0
    first = offset // LEAF_BYTES
    got = leaf_hashes(data)
    return got == leaves[first * LEAF_HASH_BYTES : first * LEAF_HASH_BYTES + len(got)]
