"""End-to-end integrity of stored blocks: what a writer computes of each block it stores,
which the metaserver records at commit and hands out in block maps, and which a reader (or
a data server copying the block) checks what it got against.

Data servers check their own CRC32Cs per 4 KiB (dataserver/store.py): that catches a bad
disk, not a bad server, since a server that wants to can serve other bytes with matching
CRCs. The digest comes from the writer, through the metaserver, so no data server, rogue
or buggy, can make a reader accept bytes the writer did not write.

The block is cut into LEAF_BYTES leaves, each leaf hashed (SHA-256, first LEAF_HASH_BYTES
bytes: second preimages stay out of reach). A digest (version 3, DIGEST_BYTES) is a version
byte, the BLAKE3 hash of the whole block, and the SHA-256 of its leaf hashes:

- a whole-block reader hashes what it got in one BLAKE3 pass, which runs without the GIL
  (chunk by chunk as the block streams in), and compares it with the first hash;
- a range reader (random 4 KiB reads) fetches the block's leaf hashes once (the writer
  sends them with the block and the data server keeps them beside it, untrusted), checks
  them against the second hash, then checks each leaf it reads against its own hash.

Version 2 (the same, with the SHA-256 of the whole block) is what blocks written before
version 3 carry: BLAKE3 runs at ~7 GB/s on one core of these machines (AVX-512) against
~1.7 GB/s for SHA-256 with the SHA instructions, and that hash was a quarter of a mount's
CPU reading a checkpoint cold (perf) and one of the two hashing passes of every byte a
writer sends. Version 1 (DIGEST_V1_BYTES, blocks written before version 2) is the SHA-256
of the leaf hashes alone, so a whole-block reader had to hash every leaf, 1,024 hashlib
calls a 4 MiB block with the GIL held (measured: half of a mount's GIL time while it reads
a checkpoint). All three are checked. Leaves stay SHA-256, hashed in C (proto/_leafhash.c):
sixteen at once in the lanes of AVX-512 registers where the CPU has them, the rest with
OpenSSL's SHA256, which uses the CPU's SHA instructions.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

from blake3 import blake3

from . import _leafhash  # (compiled: setup.py)

#: Bytes of a block digest: version byte, hash of the block, SHA-256 of its leaf hashes.
DIGEST_BYTES = 65
#: The version digests are made with now (BLAKE3 of the block)...
DIGEST_VERSION = b"\x03"
#: ... and the one before (SHA-256 of the block), still checked.
DIGEST_V2 = b"\x02"
#: Bytes of a version 1 digest (the SHA-256 of the leaf hashes; blocks written before).
DIGEST_V1_BYTES = 32
#: Bytes of data per leaf: a random 4 KiB read checks one leaf.
LEAF_BYTES = 4096
#: Bytes kept of each leaf's SHA-256.
LEAF_HASH_BYTES = 16
#: Blocks up to this size are hashed where they are (the thread hand-off costs more), and
#: leaf hashing keeps the GIL for them (leaf_hashes).
INLINE_HASH_MAX_BYTES = 256 * 1024


def leaf_count(length: int) -> int:
    return (length + LEAF_BYTES - 1) // LEAF_BYTES


def leaf_hashes(data: bytes | bytearray | memoryview) -> bytes:
    """The hashes of a block's leaves (of its valid length), concatenated: each leaf's
    SHA-256, cut to LEAF_HASH_BYTES. The loop runs in C (proto/_leafhash.c), without the
    GIL for more than INLINE_HASH_MAX_BYTES (what is hashed on a worker thread: a writer
    hashes every byte it sends this way, and in Python the loop held the GIL ~2.5 ms a
    4 MiB block, docs/benchmark.md); less is hashed where it is, GIL held."""
    return _leafhash.hashes(data, LEAF_BYTES, LEAF_HASH_BYTES, INLINE_HASH_MAX_BYTES)


def root_of(leaves: bytes) -> bytes:
    return hashlib.sha256(leaves).digest()


def block_hasher(digest: bytes = b"") -> Any:
    """A fresh hash of whole blocks (update, digest) as `digest` was made with: version 2
    SHA-256, version 3 BLAKE3 (a new digest's, when none is given)."""
    return hashlib.sha256() if digest[:1] == DIGEST_V2 else blake3()


def known_version(digest: bytes) -> bool:
    """Whether a digest of DIGEST_BYTES is of a version this code checks."""
    return digest[:1] in (DIGEST_V2, DIGEST_VERSION)


def make_digest(block_hash: bytes, leaves: bytes) -> bytes:
    """The digest of a block from its hash (block_hasher()'s) and its leaf hashes."""
    return DIGEST_VERSION + block_hash + root_of(leaves)


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of a block's bytes (its valid length, nothing past it)."""
    h = block_hasher()
    h.update(data)
    return make_digest(h.digest(), leaf_hashes(data))


def hash_matches(digest: bytes, block_hash: bytes) -> Optional[bool]:
    """Whether a block whose hash (by block_hasher(digest)) is block_hash is the one the
    digest was made of; None when the digest cannot tell from that alone (version 1: hash
    the leaves, `matches`)."""
    if len(digest) != DIGEST_BYTES:
        return None
    return known_version(digest) and digest[1:33] == block_hash


def matches(digest: bytes, data: bytes | bytearray | memoryview) -> bool:
    """Whether data is the block the digest was made of; True when no digest is recorded
    (blocks committed before digests were)."""
    if not digest:
        return True
    if len(digest) == DIGEST_BYTES:
        h = block_hasher(digest)
        h.update(data)
        return bool(hash_matches(digest, h.digest()))
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
