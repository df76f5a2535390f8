"""Block I/O against the data servers: replica reads with failover, replicated writes,
and the cache of immutable blocks.

Stored blocks never change: a rewrite makes a new block id. So a cached block is valid for
as long as anyone holds its id, and the cache needs no invalidation; close-to-open
consistency comes from refreshing the block map (ids) on open, not from the cache.

Each data server is reached through one Transport (transport.py): small reads (random
reads, a few KiB) go on its multiplexed stream, so they cost one cheap round trip; whole
blocks move as streams of TRANSFER_CHUNK_BYTES chunks on a channel of their own, so that
megabytes in flight do not hold up small calls behind them, and each chunk is hashed on
gRPC's thread as it goes out or comes in.

A block is written once, to the first server of its chain, which forwards it to the next
(dataserver/chain.py): the client's upload bandwidth and copies do not grow with R. Each
chunk carries its CRC32C and leaf hashes, computed here as it is sent (and kept for a
retry); the block's digest for the commit is made of them.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, Optional

import trio

from stripefs.proto import codec, metrics
from stripefs.proto.codec import Block
from stripefs.proto.errors import FsError, TransportError
from stripefs.proto.integrity import (
    DIGEST_BYTES,
    INLINE_HASH_MAX_BYTES,
    LEAF_BYTES,
    LEAF_HASH_BYTES,
    block_hasher,
    hash_matches,
    leaf_hashes,
    leaves_match,
    matches,
    range_matches,
    root_of,
)
from stripefs.proto.messages import BlockRef, GetBlockReq, SyncBlocksReq, WriteBlockHead
from stripefs.proto.types import CHAIN_HOP_MARGIN_S

from .disktier import DiskTier
from .transport import Transport

log = logging.getLogger("stripefs.client")

#: A block read or write that takes longer than this is abandoned and the next replica tried.
BLOCK_RPC_TIMEOUT_S = 30.0
#: A data server that failed is not asked first again for this long.
SERVER_PENALTY_S = 5.0
#: Deadline of a block read when another replica is left to try (a hung server).
FAILOVER_DEADLINE_S = 5.0
#: Deadline of a block write: a fixed part plus the block at a slow transfer rate, so a
#: hung server costs seconds and the block is placed elsewhere.
PUT_DEADLINE_BASE_S = 8.0
PUT_DEADLINE_BYTES_PER_S = 8 * 1024 * 1024
#: Deadline of a sync_blocks call (an fsync of everything a client wrote to one server).
SYNC_RPC_TIMEOUT_S = 20.0
#: A server unreachable this recently is not asked to sync: its copies count as lost.
SYNC_SKIP_AFTER_FAILURE_S = 30.0
#: Errors of a write chain's reply that say nothing against the server they name: a stale
#: write token (ours), a chunk damaged before it (its forwarder is blamed), or a server the
#: chain never reached. The block is placed again, but not around that server.
NOT_THE_SERVERS_FAULT = frozenset({errno.EACCES, errno.EBADMSG, errno.ECANCELED})
#: Reads of at most this many bytes go on a server's stream; larger ones are streamed in
#: chunks on a channel of their own (read_block).
STREAM_READ_MAX_BYTES = 1024 * 1024
#: Memory for the leaf hashes of blocks read in ranges (proto/integrity.py): 16 bytes per
#: 4 KiB, so 64 MiB of them cover 16 GiB of randomly read data.
LEAVES_CACHE_BYTES = 64 * 1024 * 1024


async def _off_loop(fn: Callable[..., bool], *args: object, size: int) -> bool:
    """fn(*args), hashing `size` bytes: off the trio thread when that is large."""
    if size <= INLINE_HASH_MAX_BYTES:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


def written(ref: BlockRef) -> int:
    """The bytes of a block as its writer stored them: what its digest describes."""
    return ref.stored or ref.length


def _leaf_span(offset: int, length: int, block_length: int) -> tuple[int, int]:
    """The leaf-aligned range holding [offset, offset+length) of a block."""
    start = offset - offset % LEAF_BYTES
    end = min(block_length, -(-(offset + length) // LEAF_BYTES) * LEAF_BYTES)
    return start, end


_metrics = metrics.client()


class BlockCache:
    """LRU of whole blocks by block id, bounded in bytes."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._blocks: OrderedDict[int, Block] = OrderedDict()

    def get(self, block_id: int) -> Optional[Block]:
        data = self._blocks.get(block_id)
        if data is not None:
            self._blocks.move_to_end(block_id)
            _metrics.cache_hits.inc()
        else:
            _metrics.cache_misses.inc()
        return data

    def put(self, block_id: int, data: Block) -> None:
        if len(data) > self.limit_bytes:
            return
        self.discard(block_id)
        self._blocks[block_id] = data
        self.used_bytes += len(data)
        self.trim(self.limit_bytes)

    def __contains__(self, block_id: int) -> bool:
        """Membership without counting as a use (unlike get)."""
        return block_id in self._blocks

    def discard(self, block_id: int) -> int:
        """Forget a block (no error if it is not held); the bytes it held."""
        data = self._blocks.pop(block_id, None)
        if data is None:
            return 0
        self.used_bytes -= len(data)
        return len(data)

    def trim(self, room_bytes: int) -> None:
        """Evict least recently used blocks until at most room_bytes are held."""
        while self.used_bytes > max(0, room_bytes) and self._blocks:
            _, evicted = self._blocks.popitem(last=False)
            self.used_bytes -= len(evicted)


class Prefetched:
    """Blocks fetched ahead of their readers (prefetch.py), by block id, each held until a
    read takes it (`take`) or the prefetcher drops it: never evicted by other reads, as
    the block cache's would be. The prefetcher bounds what it holds."""

    def __init__(self) -> None:
        self.used_bytes = 0
        self._blocks: OrderedDict[int, tuple[Block, float]] = OrderedDict()  # id -> (bytes, when fetched)
        #: called (block_id, bytes) when a read takes a block; called () when bytes go
        self.on_taken: Optional[Callable[[int, int], None]] = None
        self.on_freed: Optional[Callable[[], None]] = None

    def holds(self, block_id: int) -> bool:
        return block_id in self._blocks

    def put(self, block_id: int, data: Block) -> None:
        self.drop([block_id])
        self._blocks[block_id] = (data, time.monotonic())
        self.used_bytes += len(data)

    def take(self, block_id: int) -> Optional[Block]:
        held = self._blocks.pop(block_id, None)
        if held is None:
            return None
        self._released(len(held[0]))
        if self.on_taken is not None:
            self.on_taken(block_id, len(held[0]))
        return held[0]

    def drop(self, block_ids: Iterable[int]) -> int:
        """Let these blocks go unread; the bytes dropped."""
        dropped = 0
        for block_id in list(block_ids):
            held = self._blocks.pop(block_id, None)
            if held is not None:
                dropped += len(held[0])
        self._released(dropped)
        return dropped

    def drop_older_than(self, t: float) -> int:
        """Let go the blocks fetched before monotonic time `t`; the bytes dropped."""
        old = [block_id for block_id, (_, at) in self._blocks.items() if at < t]
        return self.drop(old)

    def _released(self, n: int) -> None:
        if n:
            self.used_bytes -= n
            if self.on_freed is not None:
                self.on_freed()


class DataPath:
    """Talks to data servers: one Transport per server address, made by `connect`."""

    def __init__(self, connect: Callable[[str], Transport], cache_bytes: int) -> None:
        self._connect = connect
        self._conns: dict[str, Transport] = {}
        self._penalised_until: dict[str, float] = {}
        self._last_error: dict[str, FsError] = {}
        self._unreachable_at: dict[str, float] = {}
        self.cache = BlockCache(cache_bytes)
        #: blocks fetched ahead for readers to come (prefetch.py)
        self.prefetched = Prefetched()
        #: the local disk tier (disktier.py), if the client has one, and how it spawns
        #: its background writes (set by the client)
        self.disk: Optional[DiskTier] = None
        self.spawn: Optional[Callable[..., None]] = None
        #: block id -> its leaf hashes, checked against the block's digest
        self.leaves = BlockCache(LEAVES_CACHE_BYTES)
        #: block id -> bytes, of blocks readers here passed while the kernel's page cache
        #: keeps what they read (`passed`), up to the block cache's limit in bytes
        self._passed: OrderedDict[int, int] = OrderedDict()
        self._passed_bytes = 0
        # block id -> event set when an in-flight fetch of that block finishes; concurrent
        # readers of one block (the kernel sends 128 KiB reads in parallel) share one fetch.
        self._fetching: dict[int, trio.Event] = {}
        #: called (block_id, address, reason) when a replica fails a read; set by the client
        self.on_bad_replica: Optional[Callable[[int, str, str], None]] = None

    def conn(self, address: str) -> Transport:
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = self._connect(address)
        return conn

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def _is_penalised(self, address: str) -> bool:
        return self._penalised_until.get(address, 0.0) > time.monotonic()

    def _order(self, servers: list[str]) -> list[str]:
        return sorted(servers, key=self._is_penalised)

    def _penalise(self, address: str, exc: FsError) -> None:
        if not self._is_penalised(address):
            log.warning("data server %s failed: %s", address, exc)
        self._penalised_until[address] = time.monotonic() + SERVER_PENALTY_S
        self._last_error[address] = exc
        if isinstance(exc, TransportError):  # dead or hung, not a server that answered (full, say)
            self._unreachable_at[address] = time.monotonic()

    def all_full(self, addresses: list[str]) -> bool:
        """The last failure of each of these servers was ENOSPC."""
        return bool(addresses) and all(
            getattr(self._last_error.get(a), "errno", None) == errno.ENOSPC for a in addresses
        )

    async def read_block(self, ref: BlockRef) -> Block:
        """The whole stored block (its first ref.length bytes), from the cache or a replica.
        For sequential readers: the block is cached and shared with concurrent readers. A
        block a truncate clamped is fetched as written (what its digest describes), and
        cached so; readers get its first ref.length bytes."""
        while True:
            data = self._held(ref.block_id)
            if data is not None:
                return data if len(data) <= ref.length else data[: ref.length]
            pending = self._fetching.get(ref.block_id)
            if pending is None:
                break
            await pending.wait()
            if (ref.block_id not in self._fetching and ref.block_id not in self.cache
                    and not self.prefetched.holds(ref.block_id)):
                break  # the shared fetch failed or its block was too big to cache: fetch ourselves
        data = await self._load_shared(ref, self.cache.put)
        return data if len(data) <= ref.length else data[: ref.length]

    def _held(self, block_id: int) -> Optional[Block]:
        """A block from the cache, or one fetched ahead (which moves to the cache: read)."""
        data = self.cache.get(block_id)
        if data is None:
            data = self.prefetched.take(block_id)
            if data is not None:
                self.cache.put(block_id, data)
        return data

    async def _load(self, ref: BlockRef) -> Block:
        """A whole block as its writer stored it: from the disk tier if it has it (checked
        there), else from a replica (checked against the digest), then kept on disk."""
        size = written(ref)
        if self.disk is not None:
            kept = await self.disk.get(ref.block_id)
            if kept is not None and len(kept) == size:
                return kept
        data = await self._fetch(ref, 0, size)
        if self.disk is not None and self.spawn is not None:
            self.disk.put_soon(self.spawn, ref.block_id, data)
        return data

    async def read_ahead(self, ref: BlockRef) -> int:
        """Fetch a whole block for a reader to come, into `prefetched` (prefetch.py); the
        bytes now held there (0: cached, held, being fetched already, or read lately
        through a mount: `read_lately`). A reader asking for it meanwhile shares this fetch."""
        if self.read_lately(ref.block_id) or self.prefetched.holds(ref.block_id):
            return 0
        return len(await self._load_shared(ref, self.prefetched.put))

    async def _load_shared(self, ref: BlockRef, keep: Callable[[int, Block], None]) -> Block:
        """_load, announced in `_fetching` so that concurrent readers of the block wait for
        this fetch instead of starting their own; `keep(block_id, data)` puts it where
        they will look (the cache, or the prefetch store) before they are woken."""
        done = self._fetching[ref.block_id] = trio.Event()
        try:
            data = await self._load(ref)
            keep(ref.block_id, data)
            return data
        finally:
            del self._fetching[ref.block_id]
            done.set()

    async def read_range(self, ref: BlockRef, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a block, clipped to ref.length, without fetching
        or caching the rest of it: random readers must not pay for whole blocks. With a
        digest, the leaves holding the range are read and checked against the block's leaf
        hashes (fetched once per block and checked against the digest)."""
        length = max(0, min(length, ref.length - offset))
        data = self._held(ref.block_id)
        if data is not None:
            return data[offset : offset + length]
        if self.disk is not None and self.disk.holds(ref.block_id):
            return (await self.read_block(ref))[offset : offset + length]  # local: read it whole
        if length == 0:
            return b""
        if not ref.digest:
            return bytes(await self._fetch(ref, offset, length))
        leaves = self.leaves.get(ref.block_id)
        if leaves is None:
            leaves = bytes(await self._fetch(ref, 0, 0, want_leaves=True))
            self.leaves.put(ref.block_id, leaves)
        start, end = _leaf_span(offset, length, written(ref))
        span = await self._fetch(ref, start, end - start, leaves=bytes(leaves))  # (bytes: no copy)
        return span[offset - start : offset - start + length]

    async def _fetch(self, ref: BlockRef, offset: int, length: int, *, want_leaves: bool = False,
                     leaves: bytes = b"") -> Block:
        """Read from the replicas in turn. Every attempt but the last has a short deadline,
        so a hung (not dead) server costs seconds, not the full RPC timeout. What a replica
        sends is checked against the writer's digest (proto/integrity.py) if there is one:
        a whole block by its hash, a leaf-aligned range by `leaves`; `want_leaves` fetches
        the block's leaf hashes instead (checked against the digest), not data. A replica
        that fails a check is treated as corrupt: reported, and the next one tried."""
        last: Optional[FsError] = None
        all_missing = bool(ref.servers)
        order = self._order(ref.servers)
        for n, address in enumerate(order):
            deadline = BLOCK_RPC_TIMEOUT_S if n == len(order) - 1 else FAILOVER_DEADLINE_S
            conn = self.conn(address)
            req = GetBlockReq(ref.block_id, offset, length, ref.token, leaves=want_leaves)
            streamed = length > STREAM_READ_MAX_BYTES and not want_leaves
            whole = offset == 0 and length == written(ref)
            try:
                if streamed:
                    # Hashed chunk by chunk as it arrives, on gRPC's thread: a whole block
                    # in one pass of its digest's hash (without the GIL), a range (or a
                    # block with a version 1 digest) by its leaves (chunks start at leaf
                    # boundaries).
                    consume = (_join_chunks if not ref.digest
                               else functools.partial(_hash_chunks, ref.digest)
                               if whole and len(ref.digest) == DIGEST_BYTES
                               else functools.partial(_leaf_chunks, ref.digest, offset))
                    data, got = await conn.download("read_block", req, deadline, consume)
                else:
                    reply = await conn.call("get_block", req, deadline)
                    data, got = reply.data, b""
            except FsError as exc:
                if exc.errno == errno.EACCES:
                    # Our read token is missing or too old: no replica will take it. The
                    # reader asks the metaserver for the map (with fresh tokens) again.
                    raise FsError(errno.EACCES, f"block {ref.block_id}: read token refused by {address}") from None
                self._penalise(address, exc)
                self._report(ref.block_id, address, exc)
                last = exc
                all_missing = all_missing and exc.errno == errno.ENOENT
                continue
            if len(data) != length:
                last = FsError(errno.EIO, f"block {ref.block_id} on {address} is short")
                self._penalise(address, last)
                self._report(ref.block_id, address, last)
                all_missing = False
                continue
            if want_leaves:
                good, data = leaves_match(ref.digest, written(ref), reply.leaves), reply.leaves
            elif streamed and ref.digest:
                first = offset // LEAF_BYTES * LEAF_HASH_BYTES
                if not whole:
                    good = not leaves or got == leaves[first : first + len(got)]
                else:
                    good = bool(hash_matches(ref.digest, got)) if len(ref.digest) == DIGEST_BYTES else root_of(got) == ref.digest
            elif leaves:
                good = await _off_loop(range_matches, leaves, offset, data, ref.digest, size=length)
            elif whole:
                good = await _off_loop(matches, ref.digest, data, size=length)
            else:
                good = True  # no digest to check against (an old block)
            if not good:
                # Its CRCs passed there, but these are not the bytes the writer committed:
                # a bad server (or a bug), never to be handed to the reader.
                log.error("block %d from %s does not match its writer's digest", ref.block_id, address)
                last = FsError(errno.EIO, f"block {ref.block_id} on {address} does not match its digest")
                self._penalise(address, last)
                self._report(ref.block_id, address, last)
                all_missing = False
                continue
            return data
        if all_missing:  # typically a block replaced and collected since our map was fetched
            raise FsError(errno.ENOENT, f"block {ref.block_id}: on none of its servers")
        log.error("block %d: no replica readable (%s): %s", ref.block_id, ref.servers, last)
        raise FsError(errno.EIO, f"block {ref.block_id}: no replica readable")

    def _report(self, block_id: int, address: str, exc: FsError) -> None:
        if isinstance(exc, TransportError):
            reason = "unreachable"
        else:
            reason = {errno.ENOENT: "missing", errno.EIO: "corrupt"}.get(exc.errno, "unreachable")
        self.report(block_id, address, reason)

    def report(self, block_id: int, address: str, reason: str) -> None:
        """Tell the metaserver (through on_bad_replica) that a replica failed us."""
        if self.on_bad_replica is not None:
            self.on_bad_replica(block_id, address, reason)

    async def sync_blocks(self, by_server: dict[str, set[int]]) -> dict[str, FsError]:
        """Make blocks written with sync=False durable on their servers, in parallel.
        Returns the servers that failed (dead or hung since the write), with their errors."""
        failed: dict[str, FsError] = {}

        async def sync(address: str, ids: set[int]) -> None:
            failed_at = self._unreachable_at.get(address)
            if failed_at is not None and time.monotonic() - failed_at < SYNC_SKIP_AFTER_FAILURE_S:
                # Unreachable moments ago (dead or hung): waiting out a deadline again would
                # only delay the fsync; its copies are treated as lost and re-replicated.
                failed[address] = self._last_error[address]
                return
            try:
                await self.conn(address).call("sync_blocks", SyncBlocksReq(sorted(ids)), SYNC_RPC_TIMEOUT_S)
            except FsError as exc:
                self._penalise(address, exc)
                failed[address] = exc

        async with trio.open_nursery() as nursery:
            for address, ids in by_server.items():
                nursery.start_soon(sync, address, ids)
        return failed

    def penalised(self) -> list[str]:
        """Servers that failed a call in the last SERVER_PENALTY_S: new blocks avoid them."""
        return [a for a in self._penalised_until if self._is_penalised(a)]

    def has_or_fetching(self, block_id: int) -> bool:
        """The block is cached or a fetch of it is under way (readahead need not start one)."""
        return block_id in self.cache or block_id in self._fetching

    def passed(self, block_id: int, kernel_keeps: bool) -> None:
        """A reader here is done with this block (reader.py, drop behind): it leaves the
        cache. `kernel_keeps`: what it read is in the kernel's page cache (a mount), so the
        block is remembered, as the block cache would have held it (the last blocks passed,
        up to its limit in bytes), for `read_lately`."""
        size = self.cache.discard(block_id)
        if not (kernel_keeps and size):
            return
        self._passed[block_id] = size
        self._passed_bytes += size
        while self._passed_bytes > self.cache.limit_bytes:
            self._passed_bytes -= self._passed.popitem(last=False)[1]

    def read_lately(self, block_id: int) -> bool:
        """The block is cached, on its way, or was lately passed by a reader whose kernel
        keeps it: a prefetch need not fetch it (it would hold it for a reader who will find
        the bytes elsewhere, till it is dropped unread)."""
        return self.has_or_fetching(block_id) or block_id in self._passed

    async def write_block(
        self, block_id: int, tokens: list[bytes], servers: list[str], data: codec.Buffers, sync: bool = True
    ) -> tuple[list[str], dict[str, FsError], bytes]:
        """Store one block (a buffer, or its pieces in order) on its servers: sent once, to
        the first, which forwards it down the chain. Returns the servers that hold it (in
        the given order), the errors of those that do not, and the block's digest for the
        commit. sync=False: the servers have it (in their page cache) on return;
        sync_blocks makes it durable."""
        failed = {a: self._last_error[a] for a in servers if self._is_penalised(a)}
        if failed:
            # Failed a call moments ago (this block may have been placed on it before that):
            # do not wait out another deadline, have the block placed elsewhere.
            return [], failed, b""
        chunks = codec.BlockChunks(data)
        head = WriteBlockHead(block_id, chunks.length, servers, tokens, sync=sync)
        deadline = (PUT_DEADLINE_BASE_S + chunks.length / PUT_DEADLINE_BYTES_PER_S
                    + CHAIN_HOP_MARGIN_S * (len(servers) - 1))
        try:
            reply = await self.conn(servers[0]).upload("write_block", head, chunks.messages(), deadline)
        except FsError as exc:
            if exc.errno != errno.EACCES:  # a stale write token is ours, not the server's
                self._penalise(servers[0], exc)
            return [], {servers[0]: exc}, b""
        for e in reply.failed:
            err = FsError(e.errno, f"{e.address}: {e.message}")
            if e.errno == errno.EBADMSG and e.address in servers[1:]:
                # A chunk arrived damaged: the server before it in the chain, which stored
                # it intact (its own check passed), damaged it on the way. That one is
                # placed around; the receiver did its job.
                forwarder = servers[servers.index(e.address) - 1]
                if forwarder in reply.stored:
                    err = FsError(errno.EIO, f"{forwarder} damaged block {block_id} forwarding it to {e.address}")
                    self._penalise(forwarder, err)
                    failed[forwarder] = err
                    continue
            if e.errno not in NOT_THE_SERVERS_FAULT:
                self._penalise(e.address, err)
            failed[e.address] = err
        stored = [a for a in servers if a in reply.stored and a not in failed]
        if len(reply.stored) + len(reply.failed) != len(servers) or not set(reply.stored) <= set(servers):
            # A chain that does not account for every server: none of it counts.
            bad = FsError(errno.EIO, f"{servers[0]}: the chain's reply leaves servers out")
            return [], {a: failed.get(a, bad) for a in servers}, b""
        # Written blocks are not cached: a writer rarely reads back, and the cache would
        # hold a second copy of everything written (the kernel page cache has it anyway).
        return stored, failed, chunks.digest() if not failed else b""


# A streamed read's bytes stay the chunks they arrived in (codec.Pieces): never gathered.

def _join_chunks(reply: object, chunks: Iterator[bytes]) -> tuple[Block, bytes]:
    return codec.joined(list(chunks)), b""


def _hash_chunks(digest: bytes, reply: object, chunks: Iterator[bytes]) -> tuple[Block, bytes]:
    """A streamed read's bytes and their hash (as `digest` was made), hashed as they arrive."""
    parts, h = [], block_hasher(digest)
    for chunk in chunks:
        parts.append(chunk)
        h.update(chunk)
    return codec.joined(parts), h.digest()


def _leaf_chunks(digest: bytes, offset: int, reply: object, chunks: Iterator[bytes]) -> tuple[Block, bytes]:
    """The bytes of a streamed read at `offset` (a leaf boundary) and their leaf hashes (as
    `digest` makes them), hashed as they arrive (each chunk but the last whole leaves)."""
    parts, hashes = [], []
    for chunk in chunks:
        parts.append(chunk)
        hashes.append(leaf_hashes(chunk, digest, offset // LEAF_BYTES))
        offset += len(chunk)
    return codec.joined(parts), b"".join(hashes)
