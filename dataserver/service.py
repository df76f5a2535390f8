"""The data server's RPC methods (proto.services.DATA_METHODS) over a BlockStore.

proto.rpc has already checked the caller's credential and role and the request's `valid()`
before a method runs; what is left here is the per-block write authorization and the
translation between wire messages and store calls. Methods run on gRPC worker threads.
The token key that write and read tokens are checked with comes from the metaserver when
this server registers (server.py); until then no block is stored or served (EAGAIN).
"""

from __future__ import annotations

import errno
import time

from proto.auth import check_read_token, check_write_token
from proto.credentials import ADMIN, LOCAL, Caller
from proto.errors import FsError
from proto.messages import BlockData, DataStatusReply, Empty, GetBlockReq, PutBlockReq, SyncBlocksReq

from .store import BlockStore


class DataService:
    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.token_key = b""  # set when the metaserver answers our registration

    def put_block(self, req: PutBlockReq, caller: Caller = LOCAL) -> Empty:
        if not self.token_key:
            raise FsError(errno.EAGAIN, "not registered with the metaserver yet")
        # Only the metaserver can mint a token for an id, so a client cannot store (or,
        # with ids never reused, overwrite) a block it was not allocated, nor use another
        # client's allocation, nor an old one.
        if not check_write_token(self.token_key, req.block_id, str(caller), req.token, time.time()):
            raise FsError(errno.EACCES, f"no valid write token for block {req.block_id}")
        self.store.put(req.block_id, req.data, sync=req.sync, leaves=req.leaves)
        return Empty()

    def sync_blocks(self, req: SyncBlocksReq) -> Empty:
        self.store.sync_blocks(req.block_ids)
        return Empty()

    def get_block(self, req: GetBlockReq, caller: Caller = LOCAL) -> BlockData:
        # Only with the metaserver's word: a read token for this block, this caller, still
        # good. Admins (operators' checks) need none.
        if caller.role != ADMIN:
            if not self.token_key:
                raise FsError(errno.EAGAIN, "not registered with the metaserver yet")
            if not check_read_token(self.token_key, req.block_id, str(caller), req.token, time.time()):
                raise FsError(errno.EACCES, f"no valid read token for block {req.block_id}")
        try:
            data = self.store.get(req.block_id, req.offset, req.length)
            return BlockData(data=data, leaves=self.store.get_leaves(req.block_id) if req.leaves else b"")
        except FsError as exc:
            # A checksum failure: the copy leaves service now (the reader tries another
            # replica) and the metaserver hears of it with the next heartbeat.
            if exc.errno == errno.EIO and self.store.is_corrupt(req.block_id):
                self.store.quarantine(req.block_id)
            raise

    def status(self, req: Empty) -> DataStatusReply:
        st = self.store.stats()
        return DataStatusReply(
            node_id=self.store.node_id,
            capacity_bytes=st.capacity_bytes,
            free_bytes=st.free_bytes,
            used_bytes=st.used_bytes,
            blocks=st.blocks,
        )
