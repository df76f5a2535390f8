"""End-to-end integrity of stored blocks: what a writer computes of each block it stores,
which the metaserver records at commit and hands out in block maps, and which a reader (or
a data server copying the block) checks what it got against.

Data servers check their own CRC32Cs per 4 KiB (dataserver/store.py): that catches a bad
disk, not a bad server, since a server that wants to can serve other bytes with matching
CRCs. The digest comes from the writer, through the metaserver, so no data server, rogue
or buggy, can make a reader accept bytes the writer did not write.

The block is cut into LEAF_BYTES leaves, each with a hash (its first LEAF_HASH_BYTES bytes:
second preimages stay out of reach). A digest (DIGEST_BYTES) is a version byte, the BLAKE3
hash of the whole block, and the SHA-256 of its leaf hashes:

- a whole-block reader hashes what it got in one BLAKE3 pass, which runs without the GIL
  (chunk by chunk as the block streams in), and compares it with the first hash;
- a range reader (random 4 KiB reads) fetches the block's leaf hashes once (the writer
  sends them with the block and the data server keeps them beside it, untrusted), checks
  them against the second hash, then checks each leaf it reads against its own hash.

Version 4 (what is written now): a leaf's hash is its chaining value in the block's own
BLAKE3 tree (a 4 KiB leaf is the subtree of four 1 KiB BLAKE3 chunks, at its place in the
block), so one pass (proto/_leafhash.c: sixteen leaves at once in the lanes of AVX-512
registers where the CPU has them) makes every leaf hash, and merging them up the tree gives
the block's BLAKE3 hash: a writer hashed each byte twice before (SHA-256 leaves, then
BLAKE3), ~2.6 ms a 4 MiB block on this project's machines against ~1.0 now. Readers are
unchanged: the block's hash is standard BLAKE3, however it was made.

Version 3 (blocks written before version 4): the same, with each leaf's hash its own
SHA-256. Version 2: as 3, with the SHA-256 of the whole block. Version 1 (DIGEST_V1_BYTES):
the SHA-256 of the (SHA-256) leaf hashes alone, so a whole-block reader hashes every leaf.
All four are checked.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

from blake3 import blake3

from . import _leafhash  # (compiled: setup.py)

#: Bytes of a block digest: version byte, hash of the block, SHA-256 of its leaf hashes.
DIGEST_BYTES = 65
#: The version digests are made with now (leaf hashes from the block's BLAKE3 tree)...
DIGEST_VERSION = b"\x04"
#: ... and the ones before, still checked: SHA-256 leaves and the block's BLAKE3 hash...
DIGEST_V3 = b"\x03"
#: ... and SHA-256 leaves and the block's SHA-256.
DIGEST_V2 = b"\x02"
#: The version a writer makes: 4 where the CPU hashes sixteen leaves at once (AVX-512);
#: elsewhere 3, whose SHA-256 leaves (the CPU's SHA instructions, through OpenSSL) and
#: separate BLAKE3 pass cost less there than one leaf's BLAKE3 tree at a time in plain C.
WRITE_VERSION = DIGEST_VERSION if _leafhash.LANES == 16 else DIGEST_V3
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


def leaf_hashes(data: bytes | bytearray | memoryview, digest: bytes = b"", first_leaf: int = 0) -> bytes:
    """The hashes of leaves of a block (its valid length, nothing past it), concatenated, as
    `digest`'s version makes them (a new digest's, when none is given): `data` starts at the
    block's leaf `first_leaf` (a range reader's leaves; version 4 leaf hashes depend on where
    the leaf is). The loop runs in C (proto/_leafhash.c), without the GIL for more than
    INLINE_HASH_MAX_BYTES (what is hashed on a worker thread: a writer hashes every byte it
    sends this way); less is hashed where it is, GIL held."""
    if _tree_leaves(digest):
        return _tree_leaf_hashes(data, first_leaf)[0]
    return _sha_leaf_hashes(data)


def _tree_leaves(digest: bytes) -> bool:
    """Whether `digest` (empty: a new one) has its leaf hashes from the block's BLAKE3 tree."""
    if not digest:
        return WRITE_VERSION == DIGEST_VERSION
    return len(digest) == DIGEST_BYTES and digest[:1] == DIGEST_VERSION


def _tree_leaf_hashes(data: bytes | bytearray | memoryview, first_leaf: int) -> tuple[bytes, bytes]:
    """Version 4: (leaf hashes, the leaves' whole chaining values, for _leafhash.b3_root)."""
    return _leafhash.b3_leaves(data, first_leaf, LEAF_HASH_BYTES, INLINE_HASH_MAX_BYTES)


def _sha_leaf_hashes(data: bytes | bytearray | memoryview) -> bytes:
    """Versions 1 to 3: each leaf's SHA-256, cut to LEAF_HASH_BYTES."""
    return _leafhash.hashes(data, LEAF_BYTES, LEAF_HASH_BYTES, INLINE_HASH_MAX_BYTES)


class Digester:
    """A block's digest made as a writer sends it: `leaves` hashes each piece in order (each
    but the last a whole number of leaves) and returns its leaf hashes; `digest` once every
    piece is in. Version 4: one pass over the bytes, the block's hash merged from its
    leaves'; version 3: SHA-256 leaves and a BLAKE3 pass beside them."""

    def __init__(self, version: bytes = WRITE_VERSION) -> None:
        assert version in (DIGEST_VERSION, DIGEST_V3)
        self.version = version
        self.length = 0
        self._cvs: list[bytes] = []  # each piece's leaves' chaining values (version 4)
        self._leaves: list[bytes] = []
        self._small = b""  # a block of one leaf: hashed whole (its leaf is its root)
        self._hash = blake3() if version == DIGEST_V3 else None

    def leaves(self, piece: bytes | bytearray | memoryview) -> bytes:
        assert self.length % LEAF_BYTES == 0
        if self._hash is not None:
            leaves = _sha_leaf_hashes(piece)
            self._hash.update(piece)
        else:
            leaves, cvs = _tree_leaf_hashes(piece, self.length // LEAF_BYTES)
            self._cvs.append(cvs)
            if self.length + len(piece) <= LEAF_BYTES:
                self._small += bytes(piece)
        self.length += len(piece)
        self._leaves.append(leaves)
        return leaves

    def digest(self) -> bytes:
        leaves = b"".join(self._leaves)
        if self._hash is not None:
            block_hash = self._hash.digest()
        elif self.length <= LEAF_BYTES:
            block_hash = blake3(self._small).digest()
        else:
            block_hash = _leafhash.b3_root(b"".join(self._cvs), self.length)
        return self.version + block_hash + root_of(leaves)


def root_of(leaves: bytes) -> bytes:
    return hashlib.sha256(leaves).digest()


def block_hasher(digest: bytes = b"") -> Any:
    """A fresh hash of whole blocks (update, digest) as `digest` was made with: version 2
    SHA-256, version 3 BLAKE3 (a new digest's, when none is given)."""
    return hashlib.sha256() if digest[:1] == DIGEST_V2 else blake3()


def known_version(digest: bytes) -> bool:
    """Whether a digest of DIGEST_BYTES is of a version this code checks."""
    return digest[:1] in (DIGEST_V2, DIGEST_V3, DIGEST_VERSION)


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of a block's bytes (its valid length, nothing past it)."""
    d = Digester()
    d.leaves(data)
    return d.digest()


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
    return root_of(leaf_hashes(data, digest)) == digest


def leaves_match(digest: bytes, length: int, leaves: bytes) -> bool:
    """Whether `leaves` are the leaf hashes of the `length`-byte block with this digest."""
    if len(leaves) != leaf_count(length) * LEAF_HASH_BYTES:
        return False
    return root_of(leaves) == (digest[33:] if len(digest) == DIGEST_BYTES else digest)


def range_matches(leaves: bytes, offset: int, data: bytes | bytearray | memoryview, digest: bytes) -> bool:
    """Whether data, read at a leaf-aligned offset, matches its leaves' hashes (leaves
    already checked against `digest` with leaves_match)."""
    assert offset % LEAF_BYTES == 0
    first = offset // LEAF_BYTES
    got = leaf_hashes(data, digest, first)
    return got == leaves[first * LEAF_HASH_BYTES : first * LEAF_HASH_BYTES + len(got)]
