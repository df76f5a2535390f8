"""The write chain: a block comes in as a stream of chunks, is stored here and forwarded to
the next server of its chain at the same time, and the reply says which servers of the
chain hold it.

A client sends each block once, to the first of its R servers (HDFS's write pipeline,
MooseFS's chunk-server chain, 3FS's chain replication): what leaves the client is one copy
of the data whatever R is. Each server, as chunks arrive:

- checks the chunk's CRC32C (sent by the writer with its leaf hashes in the chunk's head
  message, codec.encode_chunk_head),
  so a chunk damaged anywhere on the way, in a forwarding server too, is refused
  (EBADMSG) instead of stored;
- writes it to its temporary block file (BlockWriter, on a worker thread) while passing the
  same message on to the next server, so receiving, checking, forwarding and writing
  overlap and a block's latency is one block's transfer plus a chunk per hop;
- at the end, finishes its copy and waits for the next server's reply, and answers with
  the servers that stored the block and those that did not (WriteBlockReply).

Authorisation: the head carries one write token per server of the chain, each made out by
the metaserver to that server and to the client the block is written for
(proto/auth.py). A server stores the block only with a good token for itself: the first
one for the client that called, a later one for the client its forwarding predecessor
names (only data-server credentials may forward). A client cannot send a block to a server
it was not allocated, nor a forwarder store one that the metaserver did not allocate to
that client on that server; a replayed chain finds the block stored (EEXIST unless it is
the very same block) and a token expires with its allocation.

Failures: a server further down that fails, hangs or breaks the stream is reported in
`failed` (with errno; the servers after it as ECANCELED, not reached) and this server's
own copy still completes; the client places the
block again elsewhere (fs/client/writer.py), so no acknowledged block is ever short of a
replica. Each server gives the next CHAIN_HOP_MARGIN_S less time than it has itself, so a
hung server is reported by its predecessor before the writer's own deadline.

Fault injection for tests, from STRIPEFS_FAULTS in a data server's environment
(proto/faults.py): "flip-forwarded-chunks=N" flips a bit in each of the first N chunks it forwards
(after checking and storing them itself), as a forwarder with bad memory would;
"kill-at-hop=H/N" and "stop-at-hop=H/N" make the server SIGKILL or SIGSTOP itself in the
middle of receiving the Nth block it gets as replica H+1 of a chain (H servers before it),
so that a test can fail a middle or a last replica of a chain while data flows through it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Optional

import grpc

from stripefs.proto import codec, faults
from stripefs.proto.auth import check_write_token
from stripefs.proto.credentials import CLIENT, DATA, Caller, Credentials
from stripefs.proto.errors import FsError
from stripefs.proto.messages import ReplicaError, WriteBlockHead, WriteBlockReply
from stripefs.proto.rpc import aio_secure_channel, transport_error
from stripefs.proto.services import DATA_SERVICE
from stripefs.proto.types import CHAIN_HOP_MARGIN_S

from .store import BlockStore, BlockWriter

log = logging.getLogger("stripefs.dataserver.chain")

#: Least time a server gives the next one of its chain.
MIN_HOP_DEADLINE_S = 1.0
#: Chunks queued for an in-process next server (_LocalNext).
LOCAL_CHUNKS_AHEAD = 2


def _broken_at(chain: list[str], error: FsError) -> list[ReplicaError]:
    """A chain that broke at its first server: that one failed with `error`, the ones
    after it were not reached (ECANCELED: nothing is held against them)."""
    return [ReplicaError(chain[0], error.errno, error.message)] + [
        ReplicaError(a, errno.ECANCELED, f"not reached: the chain broke at {chain[0]}") for a in chain[1:]
    ]


class _Next:
    """The stream to the next server of a chain. A failure of it is kept, never raised:
    the block still completes here."""

    def __init__(self, channel: grpc.aio.Channel, address: str, head: WriteBlockHead, timeout_s: float,
                 position: int) -> None:
        self.address = address
        self.rest = head.chain  # the servers its reply answers for
        self.error: Optional[FsError] = None
        self._what = (f"block {head.block_id}: forwarding to {address}"
                      f" (replica {position + 1} of {position + len(head.chain)})")
        self._call = channel.stream_unary(f"/{DATA_SERVICE}/write_block")(timeout=timeout_s)
        self._first: Optional[bytes] = codec.encode_request(head)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = (transport_error(self.address, "write_block", exc) if isinstance(exc, grpc.RpcError)
                          else FsError(errno.EIO, f"forwarding to {self.address}: {exc}"))
            log.warning("write chain: %s failed: %s", self._what, self.error)
            self._call.cancel()

    async def send(self, message: bytes) -> None:
        if self.error is not None:
            return
        try:
            if self._first is not None:
                first, self._first = self._first, None
                await self._call.write(first)
            await self._call.write(message)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            self._fail(exc)

    async def reply(self) -> WriteBlockReply:
        """What the rest of the chain stored; a broken link makes every server from it on
        failed."""
        if self.error is None:
            try:
                if self._first is not None:  # an empty block: the head alone
                    await self._call.write(self._first)
                await self._call.done_writing()
                frame = await self._call
                reply = codec.decode_reply(WriteBlockReply, frame)
                if sorted(reply.stored + [e.address for e in reply.failed]) == sorted(self.rest):
                    return reply
                self.error = FsError(errno.EIO, f"{self.address} answered for other servers than its chain")
            except FsError as exc:
                self.error = exc
            except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                self._fail(exc)
        assert self.error is not None
        return WriteBlockReply(failed=_broken_at(self.rest, self.error))

    def cancel(self) -> None:
        self._call.cancel()


class _LocalNext(_Next):
    """The in-process twin of _Next, for tests of the client without processes
    (fs/client/transport.LocalTransport): the next server's write_block is called directly,
    fed through a queue, as a data server named after this one."""

    def __init__(self, peer: "ChainWriter", head: WriteBlockHead, caller: Caller, timeout_s: float) -> None:
        self.address = head.chain[0]
        self.rest = head.chain
        self.error: Optional[FsError] = None
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=LOCAL_CHUNKS_AHEAD)
        self._task = asyncio.ensure_future(peer.write_block(head, self._messages(), caller, timeout_s))

    async def _messages(self) -> AsyncIterator[bytes]:
        while (message := await self._queue.get()) is not None:
            yield message

    async def send(self, message: bytes) -> None:
        await self._queue.put(message)

    async def reply(self) -> WriteBlockReply:
        await self._queue.put(None)
        try:
            return await self._task
        except FsError as exc:
            return WriteBlockReply(failed=_broken_at(self.rest, exc))

    def cancel(self) -> None:
        self._task.cancel()


class ChainWriter:
    """write_block of a data server (runs on its gRPC event loop)."""

    def __init__(self, store: BlockStore, creds: Optional[Credentials], address: Callable[[], str],
                 token_key: Callable[[], bytes], disk: ThreadPoolExecutor) -> None:
        self.store = store
        self._creds = creds  # what it forwards with (None: a chain of one only, in tests)
        self._address = address  # this server's registered address, which its tokens name
        self._token_key = token_key
        self._disk = disk  # worker threads for the store's disk work
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._faults = faults.armed()
        self._seen: dict[int, str] = {}  # blocks a kill/stop fault has counted
        #: in-process servers by address, for tests without processes (_LocalNext)
        self.local_peers: Optional[dict[str, "ChainWriter"]] = None

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self._creds is None:
                raise FsError(errno.EINVAL, "this server does not forward blocks")
            channel = self._channels[address] = aio_secure_channel(address, self._creds, DATA_SERVICE)
        return channel

    def _authorise(self, head: WriteBlockHead, caller: Caller) -> str:
        """The client the block is written for, once this server's token is checked."""
        key = self._token_key()
        if not key:
            raise FsError(errno.EAGAIN, "not registered with the metaserver yet")
        if caller.role == CLIENT:
            if head.holder not in ("", str(caller)):
                raise FsError(errno.EACCES, "a client writes for itself only")
            holder = str(caller)
        elif caller.role == DATA and head.holder.startswith(f"{CLIENT}:"):
            holder = head.holder  # a predecessor in the chain says for whom
        else:
            raise FsError(errno.EACCES, f"{caller} may not write blocks")
        me = self._address()
        if head.chain[0] != me:
            raise FsError(errno.EINVAL, f"block {head.block_id}: the chain starts at {head.chain[0]}, not here ({me})")
        if not check_write_token(key, head.block_id, holder, me, head.tokens[0], time.time()):
            raise FsError(errno.EACCES, f"no valid write token for block {head.block_id} here")
        return holder

    async def write_block(self, head: WriteBlockHead, chunks: AsyncIterator[bytes], caller: Caller,
                          time_left_s: Optional[float]) -> WriteBlockReply:
        holder = self._authorise(head, caller)
        me = head.chain[0]
        loop = asyncio.get_running_loop()
        nxt: Optional[_Next] = None
        if len(head.chain) > 1:
            budget = (time_left_s if time_left_s is not None else 60.0) - CHAIN_HOP_MARGIN_S
            onward = WriteBlockHead(head.block_id, head.length, head.chain[1:], head.tokens[1:], holder, head.sync,
                                    head.hop + 1)
            timeout_s = max(MIN_HOP_DEADLINE_S, budget)
            if self.local_peers is not None:
                nxt = _LocalNext(self.local_peers[head.chain[1]], onward, Caller(DATA, me), timeout_s)
            else:
                nxt = _Next(self._channel(head.chain[1]), head.chain[1], onward, timeout_s, onward.hop)
        local: Optional[FsError] = None
        writer: Optional[BlockWriter] = None
        pending: list[asyncio.Future] = []
        try:
            try:
                writer = await loop.run_in_executor(self._disk, self.store.writer, head.block_id, head.length, head.sync)
            except FsError as exc:
                local = exc
            chunk_head: Optional[bytes] = None
            async for message in chunks:
                if chunk_head is None:  # a chunk comes as its head, then its data
                    chunk_head = message
                    continue
                try:
                    data, crc, leaves = codec.decode_chunk(chunk_head, message)
                except ValueError as exc:
                    raise FsError(errno.EINVAL, f"block {head.block_id}: {exc}") from None
                if writer is not None and local is None:
                    # One chunk on its way to disk at a time (a BlockWriter takes them in
                    # order), while the next is received and forwarded.
                    while pending:
                        local = await self._settle(pending.pop(0)) or local
                    if local is None:
                        pending.append(loop.run_in_executor(self._disk, writer.write, data, leaves, crc))
                if nxt is not None:
                    await nxt.send(chunk_head)
                    await nxt.send(self._maybe_damage(message))
                chunk_head = None
                self._maybe_die(head)
            if chunk_head is not None:
                raise FsError(errno.EINVAL, f"block {head.block_id}: a chunk head without its data")
            for fut in pending:
                local = await self._settle(fut) or local
            pending = []
            if writer is not None and local is None:
                local = await self._settle(loop.run_in_executor(self._disk, writer.finish))
            rest = await nxt.reply() if nxt is not None else WriteBlockReply()
            nxt = None
        finally:
            for fut in pending:
                await asyncio.wait([fut])
            if nxt is not None:  # our caller went away or sent garbage: end the chain too
                nxt.cancel()
            if writer is not None:
                await loop.run_in_executor(self._disk, writer.close)
        if local is not None:
            log.warning("block %d not stored here: %s", head.block_id, local)
            return WriteBlockReply(rest.stored, [ReplicaError(me, local.errno, local.message)] + rest.failed)
        return WriteBlockReply([me] + rest.stored, rest.failed)

    @staticmethod
    async def _settle(fut: asyncio.Future) -> Optional[FsError]:
        try:
            await fut
        except FsError as exc:
            return exc
        return None

    def _maybe_die(self, head: WriteBlockHead) -> None:
        for name, sig in (("kill-at-hop", signal.SIGKILL), ("stop-at-hop", signal.SIGSTOP)):
            hop_count = self._faults.get(name)
            if hop_count is None or hop_count[0] != head.hop or self._seen.get(head.block_id) == name:
                continue
            self._seen[head.block_id] = name
            left = hop_count[1] - 1
            self._faults[name] = (hop_count[0], left)
            if left == 0:
                log.warning("fault injection: %s of block %d, replica %d", name, head.block_id, head.hop + 1)
                os.kill(os.getpid(), sig)

    def _maybe_damage(self, data: bytes) -> bytes:
        """A chunk's data message as forwarded: with a bit flipped, while the fault lasts."""
        (left,) = self._faults.get("flip-forwarded-chunks", (0,))
        if not left or not data:
            return data
        self._faults["flip-forwarded-chunks"] = (left - 1,)
        damaged = bytearray(data)
        damaged[-1] ^= 0x10
        log.warning("fault injection: flipped a bit of a forwarded chunk")
        return bytes(damaged)
