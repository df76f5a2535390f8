"""Service method tables: for each RPC, its request and reply types.

A server implements a method as `def <name>(self, req) -> reply` on its service object;
proto.rpc binds the table to gRPC. The client calls `<service>.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import messages as m


@dataclass(frozen=True)
class Method:
    name: str
    request: type
    reply: type
    #: cheap (no fsync, little I/O): a server may run it on its event loop when nothing else
    #: is running, saving the hand-off to a worker thread (~0.1 ms); see proto/rpc.py
    quick: bool = False


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
    Method("getattr", m.InodeReq, m.AttrReply),
    Method("setattr", m.SetattrReq, m.AttrReply),
    Method("mknod", m.MknodReq, m.CreateReply),
    Method("mkdir", m.MkdirReq, m.AttrReply),
    Method("symlink", m.SymlinkReq, m.AttrReply),
    Method("readlink", m.InodeReq, m.ReadlinkReply),
    Method("link", m.LinkReq, m.AttrReply),
    Method("unlink", m.RemoveReq, m.DirChangeReply),
    Method("rmdir", m.RemoveReq, m.DirChangeReply),
    Method("rename", m.RenameReq, m.RenameReply),
    Method("readdir", m.ReaddirReq, m.ReaddirReply),
    Method("getxattr", m.XattrReq, m.XattrReply),
    Method("setxattr", m.XattrReq, m.Empty),
    Method("listxattr", m.InodeReq, m.XattrListReply),
    Method("removexattr", m.XattrReq, m.Empty),
    Method("statfs", m.Empty, m.StatfsReply),
    # file data
    Method("open", m.OpenReq, m.OpenReply),
    Method("release", m.ReleaseReq, m.Empty),
    Method("block_map", m.BlockMapReq, m.BlockMapReply),
    Method("alloc_blocks", m.AllocReq, m.AllocReply),
    Method("commit_blocks", m.CommitReq, m.AttrReply),
    Method("commit_inline", m.InlineCommitReq, m.AttrReply),
    # data server registry
    Method("register", m.RegisterReq, m.RegisterReply),
    Method("heartbeat", m.HeartbeatReq, m.HeartbeatReply),
    Method("blocks_deleted", m.DeletedReq, m.Empty),
    Method("replicated", m.ReplicatedReq, m.Empty),
    Method("block_report", m.BlockReportReq, m.Empty),
    Method("report_bad_replica", m.BadReplicaReq, m.Empty),
    # operators
    Method("status", m.Empty, m.StatusReply),
    Method("sync", m.Empty, m.Empty),  # make every committed operation durable
    Method("fsck", m.FsckReq, m.FsckReply),
)

DATA_SERVICE = "stripefs.Data"
DATA_METHODS = _table(
    Method("put_block", m.PutBlockReq, m.Empty),
    Method("sync_blocks", m.SyncBlocksReq, m.Empty),
    Method("get_block", m.GetBlockReq, m.BlockData, quick=True),
    Method("status", m.Empty, m.DataStatusReply, quick=True),
)
