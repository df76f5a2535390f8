"""Block I/O against the data servers: replica reads with failover, replicated writes,
and the cache of immutable blocks.

Stored blocks never change: a rewrite makes a new block id. So a cached block is valid for
as long as anyone holds its id, and the cache needs no invalidation; close-to-open
consistency comes from refreshing the block map (ids) on open, not from the cache.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict
from typing import Optional

import trio

from proto.errors import FsError
from proto.messages import BlockRef, GetBlockReq, PutBlockReq
from proto.rpc import Stub
from proto.services import DATA_METHODS, DATA_SERVICE

from .rpc import call

log = logging.getLogger("stripefs.client")

#: A block read or write that takes longer than this is abandoned and the next replica tried.
BLOCK_RPC_TIMEOUT_S = 30.0
#: A data server that failed is not asked first again for this long.
SERVER_PENALTY_S = 5.0


class BlockCache:
    """LRU of whole blocks by block id, bounded in bytes."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()

    def get(self, block_id: int) -> Optional[bytes]:
        data = self._blocks.get(block_id)
        if data is not None:
            self._blocks.move_to_end(block_id)
        return data

    def put(self, block_id: int, data: bytes) -> None:
        if len(data) > self.limit_bytes:
            return
        old = self._blocks.pop(block_id, None)
        if old is not None:
            self.used_bytes -= len(old)
        self._blocks[block_id] = data
        self.used_bytes += len(data)
        while self.used_bytes > self.limit_bytes:
            _, evicted = self._blocks.popitem(last=False)
            self.used_bytes -= len(evicted)

    def clear(self) -> None:
        self._blocks.clear()
        self.used_bytes = 0


class DataPath:
    """Talks to data servers. One gRPC channel per server address, reused."""

    def __init__(self, secret: bytes, cache_bytes: int) -> None:
        self._secret = secret
        self._stubs: dict[str, Stub] = {}
        self._penalised_until: dict[str, float] = {}
        self.cache = BlockCache(cache_bytes)
        # block id -> event set when an in-flight fetch of that block finishes; concurrent
        # readers of one block (the kernel sends 128 KiB reads in parallel) share one fetch.
        self._fetching: dict[int, trio.Event] = {}

    def stub(self, address: str) -> Stub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = Stub(address, self._secret, DATA_SERVICE, DATA_METHODS)
        return stub

    def close(self) -> None:
        for stub in self._stubs.values():
            stub.close()
        self._stubs.clear()

    def _order(self, servers: list[str]) -> list[str]:
        now = time.monotonic()
        return sorted(servers, key=lambda a: self._penalised_until.get(a, 0.0) > now)

    def _penalise(self, address: str, exc: FsError) -> None:
        if self._penalised_until.get(address, 0.0) <= time.monotonic():
            log.warning("data server %s failed: %s", address, exc)
        self._penalised_until[address] = time.monotonic() + SERVER_PENALTY_S

    async def read_block(self, ref: BlockRef) -> bytes:
        """The stored bytes of a block (its first ref.length bytes), from the cache or a replica."""
        while True:
            data = self.cache.get(ref.block_id)
            if data is not None:
                return data[: ref.length]
            pending = self._fetching.get(ref.block_id)
            if pending is None:
                break
            await pending.wait()
            if ref.block_id not in self._fetching and self.cache.get(ref.block_id) is None:
                break  # the shared fetch failed or its block was too big to cache: fetch ourselves
        done = self._fetching[ref.block_id] = trio.Event()
        try:
            data = await self._fetch(ref)
            self.cache.put(ref.block_id, data)
            return data[: ref.length]
        finally:
            del self._fetching[ref.block_id]
            done.set()

    async def _fetch(self, ref: BlockRef) -> bytes:
        last: Optional[FsError] = None
        for address in self._order(ref.servers):
            try:
                reply = await call(
                    self.stub(address), "get_block",
                    GetBlockReq(ref.block_id, 0, ref.length), BLOCK_RPC_TIMEOUT_S,
                )
            except FsError as exc:
                self._penalise(address, exc)
                last = exc
                continue
            if len(reply.data) < ref.length:
                last = FsError(errno.EIO, f"block {ref.block_id} on {address} is short")
                self._penalise(address, last)
                continue
            return reply.data
        if last is not None and last.errno == errno.ENOENT:
            raise last
        log.error("block %d: no replica readable (%s): %s", ref.block_id, ref.servers, last)
        raise FsError(errno.EIO, f"block {ref.block_id}: no replica readable")

    async def write_block(self, block_id: int, token: bytes, servers: list[str], data: bytes) -> list[str]:
        """Store one block on every server in parallel; returns the servers that hold it.
        Raises EIO (ENOSPC when servers were full) unless every one of them does."""
        written: list[str] = []
        errors: list[FsError] = []
        req = PutBlockReq(block_id, token, data)

        async def put(address: str) -> None:
            try:
                await call(self.stub(address), "put_block", req, BLOCK_RPC_TIMEOUT_S)
            except FsError as exc:
                self._penalise(address, exc)
                errors.append(exc)
            else:
                written.append(address)

        async with trio.open_nursery() as nursery:
            for address in servers:
                nursery.start_soon(put, address)
        if len(written) == len(servers):
            self.cache.put(block_id, data)
            return list(servers)
        # Fewer than R copies is not durable: the caller gets the error, nothing is committed,
        # and the stray copies become garbage with the uncommitted allocation.
        if errors and all(e.errno == errno.ENOSPC for e in errors):
            raise FsError(errno.ENOSPC, f"block {block_id}: data servers full")
        log.error("block %d: replica write failed on %s: %s", block_id, servers, errors)
        raise FsError(errno.EIO, f"block {block_id}: replica write failed")
