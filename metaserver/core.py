"""MetaCore: the metadata service, one method per entry of proto.services.META_METHODS.

Each method takes the request message, runs as one store transaction, and returns the
reply message or raises FsError(errno). The methods are grouped by subject in
namespace.py, xattrs.py, files.py, registry.py, repair.py (re-replication, block
reports) and fsck.py over the shared mechanisms of base.py; this class only puts them together, so `proto.rpc.serve(META_SERVICE,
META_METHODS, core, ...)` serves it directly.
"""

from __future__ import annotations

from .files import FileOps
from .fsck import FsckOps
from .namespace import NamespaceOps
from .registry import RegistryOps
from .xattrs import XattrOps


class MetaCore(NamespaceOps, XattrOps, FileOps, RegistryOps, FsckOps):
    """The metadata service. Thread-safe: the store serializes transactions.

    MetaCore(db_path, secret, *, clock=time.time, server_suspect_after_s=3.0,
             server_dead_after_s=10.0, session_lease_s=30.0, gc_grace_s=30.0,
             pending_timeout_s=600.0, reserve_bytes=0, replication_per_heartbeat=8,
             replication_timeout_s=60.0)
    """
