"""Service method tables: for each RPC, its request and reply types, and the roles that
may call it.

A server implements a method as `def <name>(self, req) -> reply` on its service object (a
method that needs to know who calls takes `caller` too); stripefs.proto.rpc binds the table to
gRPC and refuses a call from a role the table does not list (EACCES) before the method
runs. The client calls `<service>.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import messages as m
from .credentials import ADMIN, CLIENT, DATA, META, ROLES

#: Who may call what: file system calls are clients' (and admins'); what only a data
#: server knows (its registration, its blocks) is data servers'; repairs are admins'.
CLIENTS = frozenset({CLIENT, ADMIN})
DATA_SERVERS = frozenset({DATA})
ADMINS = frozenset({ADMIN})
ANYONE = frozenset(ROLES)


@dataclass(frozen=True)
class Method:
    name: str
    request: type
    reply: type
    roles: frozenset[str] = CLIENTS
    #: cheap (no fsync, little I/O): a server may run it on its event loop when nothing else
    #: is running, saving the hand-off to a worker thread (~0.1 ms); see proto/rpc.py
    quick: bool = False
    #: how the bytes move (proto/rpc.py): UNARY, one frame each way; UPLOAD, a request frame
    #: then raw chunks in, one reply frame out; DOWNLOAD, one request frame in, a reply
    #: frame then raw chunks out; WAIT, one frame each way, but the reply may take long (it
    #: waits for an event): served by a coroutine on the server's event loop, holding no
    #: worker thread and not holding up the calls sent after it
    kind: str = "unary"
    #: changes state and is not idempotent: its request carries `rid`, the metaserver
    #: records the reply with the change, and a retry with the same id (after a transport
    #: failure, on a new stream or another metaserver) gets that reply instead of running
    #: again (metaserver/core.py apply_batch)
    once: bool = False


UNARY, UPLOAD, DOWNLOAD, WAIT = "unary", "upload", "download", "wait"


def _table(*methods: Method) -> dict[str, Method]:
    return {meth.name: meth for meth in methods}


META_SERVICE = "stripefs.Meta"
META_METHODS = _table(
    # client sessions
    Method("open_session", m.SessionOpenReq, m.SessionReply),
    Method("renew_session", m.SessionReq, m.Empty),
    Method("close_session", m.SessionReq, m.Empty),
    # namespace
    Method("lookup", m.LookupReq, m.AttrReply),
    Method("lookups", m.LookupsReq, m.LookupsReply),
    Method("getattr", m.InodeReq, m.AttrReply),
    Method("setattr", m.SetattrReq, m.AttrReply, once=True),
    Method("mknod", m.MknodReq, m.CreateReply, once=True),
    Method("mkdir", m.MkdirReq, m.AttrReply, once=True),
    Method("symlink", m.SymlinkReq, m.AttrReply, once=True),
    Method("readlink", m.InodeReq, m.ReadlinkReply),
    Method("link", m.LinkReq, m.AttrReply, once=True),
    Method("unlink", m.RemoveReq, m.DirChangeReply, once=True),
    Method("rmdir", m.RemoveReq, m.DirChangeReply, once=True),
    Method("rename", m.RenameReq, m.RenameReply, once=True),
    Method("readdir", m.ReaddirReq, m.ReaddirReply),
    Method("getxattr", m.XattrReq, m.XattrReply),
    Method("setxattr", m.XattrReq, m.Empty, once=True),
    Method("listxattr", m.InodeReq, m.XattrListReply),
    Method("removexattr", m.XattrReq, m.Empty, once=True),
    Method("statfs", m.Empty, m.StatfsReply),
    Method("usage", m.UsageReq, m.UsageReply),
    Method("find", m.FindReq, m.FindReply),
    # file data
    Method("open", m.OpenReq, m.OpenReply),
    Method("release", m.ReleaseReq, m.Empty, once=True),
    Method("block_map", m.BlockMapReq, m.BlockMapReply),
    Method("alloc_blocks", m.AllocReq, m.AllocReply),
    Method("commit_blocks", m.CommitReq, m.AttrReply, once=True),
    Method("commit_inline", m.InlineCommitReq, m.AttrReply, once=True),
    Method("punch_hole", m.PunchReq, m.AttrReply, once=True),
    Method("accessed", m.AccessedReq, m.Empty),
    # locks (metaserver/locks.py)
    Method("lock", m.LockReq, m.LockReply),
    Method("unlock_owners", m.UnlockOwnersReq, m.Empty),
    Method("lock_wait", m.LockWaitReq, m.LockWaitReply, kind=WAIT),
    # data server registry
    Method("register", m.RegisterReq, m.RegisterReply, DATA_SERVERS),
    Method("heartbeat", m.HeartbeatReq, m.HeartbeatReply, DATA_SERVERS),
    Method("blocks_deleted", m.DeletedReq, m.Empty, DATA_SERVERS),
    Method("replicated", m.ReplicatedReq, m.Empty, DATA_SERVERS),
    Method("block_report", m.BlockReportReq, m.Empty, DATA_SERVERS),
    Method("report_bad_replica", m.BadReplicaReq, m.Empty),
    # operators
    Method("status", m.Empty, m.StatusReply, ANYONE),
    Method("sync", m.Empty, m.Empty),  # make every committed operation durable
    Method("fsck", m.FsckReq, m.FsckReply, ADMINS),
)

DATA_SERVICE = "stripefs.Data"
DATA_METHODS = _table(
    # a client writes a block to the first server of its chain, each server forwards it to
    # the next (dataserver/chain.py)
    Method("write_block", m.WriteBlockHead, m.WriteBlockReply, frozenset({CLIENT, DATA}), kind=UPLOAD),
    Method("sync_blocks", m.SyncBlocksReq, m.Empty, frozenset({CLIENT})),
    # data servers read from each other to re-replicate; admins to check copies.
    # get_block: a range (small reads go on the multiplexed stream); read_block: a whole
    # block, streamed in chunks
    Method("get_block", m.GetBlockReq, m.BlockData, frozenset({CLIENT, DATA, ADMIN}), quick=True),
    Method("read_block", m.GetBlockReq, m.BlockData, frozenset({CLIENT, DATA, ADMIN}), kind=DOWNLOAD),
    Method("status", m.Empty, m.DataStatusReply, ANYONE, quick=True),
)


#: The role whose credential answers for each service (clients check it in the handshake).
SERVER_ROLE = {META_SERVICE: META, DATA_SERVICE: DATA}
