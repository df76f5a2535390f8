"""End-to-end integrity of stored blocks: what a writer computes of each block it stores,
which the metaserver records at commit and hands out in block maps, and which a reader (or
a data server copying the block) checks what it got against.

Data servers check their own CRC32Cs per 4 KiB (dataserver/store.py): that catches a bad
disk, not a bad server, since a server that wants to can serve other bytes with matching
CRCs. The digest comes from the writer, through the metaserver, so no data server, rogue
or buggy, can make a reader accept bytes the writer did not write.

The digest is a two-level hash tree: the block is cut into LEAF_BYTES leaves, each leaf
hashed (SHA-256, first LEAF_HASH_BYTES bytes: second preimages stay out of reach), and the
digest is the SHA-256 of those leaf hashes. A whole-block reader hashes what it got; a
range reader (random 4 KiB reads) fetches the block's leaf hashes once (the writer sends
them with the block and the data server keeps them beside it, untrusted), checks them
against the digest, then checks each leaf it reads against its hash. Hashing runs at
~1.2 GB/s with the SHA instructions of these machines, off the event loop (hashlib
releases the GIL for large buffers).
"""

from __future__ import annotations

import hashlib

#: Bytes of a block digest (SHA-256).
DIGEST_BYTES = 32
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


def leaf_hashes(data: bytes | bytearray | memoryview) -> bytes:
    """The hashes of a block's leaves (of its valid length), concatenated."""
    view, sha = memoryview(data), hashlib.sha256
    out = []
    for i in range(0, len(view), LEAF_BYTES):
        end = min(i + LEAF_BYTES, len(view))
        h = sha(view[i : min(i + _PIECE, end)])
        for j in range(i + _PIECE, end, _PIECE):
            h.update(view[j : min(j + _PIECE, end)])
        out.append(h.digest()[:LEAF_HASH_BYTES])
    return b"".join(out)


def root_of(leaves: bytes) -> bytes:
    return hashlib.sha256(leaves).digest()


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of a block's bytes (its valid length, nothing past it)."""
    return root_of(leaf_hashes(data))


def matches(digest: bytes, data: bytes | bytearray | memoryview) -> bool:
    """Whether data is the block the digest was made of; True when no digest is recorded
    (blocks committed before digests were)."""
    return not digest or block_digest(data) == digest


def leaves_match(digest: bytes, length: int, leaves: bytes) -> bool:
    """Whether `leaves` are the leaf hashes of the `length`-byte block with this digest."""
    return len(leaves) == leaf_count(length) * LEAF_HASH_BYTES and root_of(leaves) == digest


def range_matches(leaves: bytes, offset: int, data: bytes | bytearray | memoryview) -> bool:
    """Whether data, read at a leaf-aligned offset, matches its leaves' hashes (leaves
    already checked against the digest with leaves_match)."""
    assert offset % LEAF_BYTES == 0
    first = offset // LEAF_BYTES
    got = leaf_hashes(data)
    return got == leaves[first * LEAF_HASH_BYTES : first * LEAF_HASH_BYTES + len(got)]
