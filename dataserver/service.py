"""The data server's RPC methods (stripefs.proto.services.DATA_METHODS) over a BlockStore.

stripefs.proto.rpc has already checked the caller's credential and role and the request's `valid()`
before a method runs; what is left here is the per-block write authorization and the
translation between wire messages and store calls. Methods run on gRPC worker threads.
The token key that write and read tokens are checked with comes from the metaserver when
this server registers (server.py); until then no block is stored or served (EAGAIN).

Blocks are written by `write_block`, the write chain (chain.py), and read whole by
`read_block`, streamed in TRANSFER_CHUNK_BYTES chunks: both run on the server's event loop
with their disk work on `disk` threads, but a chunk that the page cache holds
(get_cached: a streamed read's chunks after the first, which the kernel reads ahead while
the one before goes out) is read on the loop itself. `get_block` reads a range in one
reply (random readers, on the stream).
"""

from __future__ import annotations

import asyncio
import errno
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Optional

from stripefs.proto import metrics
from stripefs.proto.auth import check_read_token
from stripefs.proto.credentials import ADMIN, LOCAL, Caller, Credentials
from stripefs.proto.errors import FsError
from stripefs.proto.messages import BlockData, DataStatusReply, Empty, GetBlockReq, SyncBlocksReq, WriteBlockHead
from stripefs.proto.messages import WriteBlockReply
from stripefs.proto.types import TRANSFER_CHUNK_BYTES

from .chain import ChainWriter
from .store import BlockStore

#: Threads for the disk work of streamed block writes and reads.
DISK_WORKERS = 8


class DataService:
    def __init__(self, store: BlockStore, creds: Optional[Credentials] = None, address: str = "") -> None:
        self.store = store
        self.token_key = b""  # set when the metaserver answers our registration
        self.address = address  # the address this server registers with (its write tokens name it)
        self.disk = ThreadPoolExecutor(max_workers=DISK_WORKERS, thread_name_prefix="disk")
        self.chain = ChainWriter(store, creds, lambda: self.address, lambda: self.token_key, self.disk)

    def close(self) -> None:
        self.disk.shutdown(wait=False, cancel_futures=True)

    async def write_block(self, head: WriteBlockHead, chunks: AsyncIterator[bytes], caller: Caller,
                          time_left_s: Optional[float]) -> WriteBlockReply:
        return await self.chain.write_block(head, chunks, caller, time_left_s)

    def sync_blocks(self, req: SyncBlocksReq) -> Empty:
        self.store.sync_blocks(req.block_ids)
        return Empty()

    def _may_read(self, req: GetBlockReq, caller: Caller) -> None:
        # Only with the metaserver's word: a read token for this block, this caller, still
        # good. Admins (operators' checks) need none.
        if caller.role != ADMIN:
            if not self.token_key:
                raise FsError(errno.EAGAIN, "not registered with the metaserver yet")
            if not check_read_token(self.token_key, req.block_id, str(caller), req.token, time.time()):
                raise FsError(errno.EACCES, f"no valid read token for block {req.block_id}")

    def _get(self, block_id: int, offset: int, length: int, cached_only: bool = False) -> Optional[bytes]:
        """store.get, counted, a corrupt copy moved aside; with `cached_only`, store.get_cached
        (None: not all in the page cache)."""
        try:
            data = (self.store.get_cached if cached_only else self.store.get)(block_id, offset, length)
            if data is not None:
                metrics.data().read_bytes.inc(len(data))
            return data
        except FsError as exc:
            # A checksum failure: the copy leaves service now (the reader tries another
            # replica) and the metaserver hears of it with the next heartbeat.
            if exc.errno == errno.EIO and self.store.is_corrupt(block_id):
                self.store.quarantine(block_id)
            raise

    def get_block(self, req: GetBlockReq, caller: Caller = LOCAL) -> BlockData:
        self._may_read(req, caller)
        data = self._get(req.block_id, req.offset, req.length)
        assert data is not None
        return BlockData(data=data, leaves=self.store.get_leaves(req.block_id) if req.leaves else b"")

    async def read_block(self, req: GetBlockReq, caller: Caller = LOCAL) -> tuple[BlockData, AsyncIterator[bytes]]:
        """[offset, offset+length) of a block as a stream of chunks; the reply carries the
        leaf hashes if asked. The first chunk is read before the reply, so a missing or
        corrupt block is an errno, not a broken stream."""
        self._may_read(req, caller)
        loop = asyncio.get_running_loop()
        end = None if req.length == -1 else req.offset + req.length

        def read(offset: int, cached_only: bool = False) -> Optional[bytes]:
            n = TRANSFER_CHUNK_BYTES if end is None else min(TRANSFER_CHUNK_BYTES, end - offset)
            return self._get(req.block_id, offset, n, cached_only) if n > 0 else b""

        async def fetch(offset: int) -> Optional[bytes]:
            # A chunk the page cache holds is read here, on the event loop: a hand-off to
            # a disk thread and back costs more than the read itself. The rest is read on
            # a disk thread, so that the loop starts no disk read (store.get_cached).
            data = read(offset, cached_only=True)
            return data if data is not None else await loop.run_in_executor(self.disk, read, offset)

        # The first chunk on a disk thread: the block is most likely cold, and even the
        # open of its file may wait for the disk (its name and inode); the later chunks'
        # opens find them cached.
        first = await loop.run_in_executor(self.disk, read, req.offset)
        leaves = await loop.run_in_executor(self.disk, self.store.get_leaves, req.block_id) if req.leaves else b""

        async def chunks() -> AsyncIterator[bytes]:
            data, offset = first, req.offset
            while data:
                offset += len(data)
                full = len(data) == TRANSFER_CHUNK_BYTES
                yield data
                # The next chunk, once this one has gone out: the kernel has read it ahead
                # meanwhile (the first chunk's read started that for the whole block), so
                # it is read here, and on a disk thread only if it is not there yet.
                data = await fetch(offset) if full else b""

        return BlockData(leaves=leaves), chunks()

    def status(self, req: Empty) -> DataStatusReply:
        st = self.store.stats()
        return DataStatusReply(
            node_id=self.store.node_id,
            capacity_bytes=st.capacity_bytes,
            free_bytes=st.free_bytes,
            used_bytes=st.used_bytes,
            blocks=st.blocks,
        )
