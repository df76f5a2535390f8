"""End-to-end integrity of stored blocks: the digest a writer computes of each block it
stores, which the metaserver records at commit and hands out in block maps, and which a
reader (or a data server copying the block) checks what it got against.

Data servers check their own CRC32Cs per 4 KiB (dataserver/store.py): that catches a bad
disk, not a bad server, since a server that wants to can serve other bytes with matching
CRCs. The digest comes from the writer, through the metaserver, so no data server, rogue
or buggy, can make a reader accept bytes the writer did not write. SHA-256 (a keyless
hash is enough: the attacker does not choose the writer's bytes, and cannot find others
with the same digest); ~1.5 GB/s with the SHA instructions of these machines, computed off
the event loop (hashlib releases the GIL for large buffers).

What it covers: whole-block reads (sequential reads and readahead, checkpoint loads,
every read of a small file's stored block) and re-replication. A range read (random 4 KiB
of a large block) is checked by the server's CRC32Cs only: checking it end to end needs a
digest per range (a hash tree), not built yet.
"""

from __future__ import annotations

import hashlib

#: Bytes of a block digest.
DIGEST_BYTES = 32
#: Blocks smaller than this are hashed where they are (the thread hand-off costs more).
INLINE_HASH_MAX_BYTES = 256 * 1024


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of a block's bytes (its valid length, nothing past it)."""
    return hashlib.sha256(data).digest()


def matches(digest: bytes, data: bytes | bytearray | memoryview) -> bool:
    """Whether data is the block the digest was made of; True when no digest is recorded
    (blocks committed before digests were)."""
    return not digest or block_digest(data) == digest
