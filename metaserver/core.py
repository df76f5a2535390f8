"""MetaCore: the metadata service, one method per entry of stripefs.proto.services.META_METHODS.

Each method takes the request message, runs as one store transaction, and returns the
reply message or raises FsError(errno). The methods are grouped by subject in
namespace.py, xattrs.py, labels.py (label queries), files.py, locks.py, registry.py,
repair.py (re-replication, block reports) and fsck.py over the shared mechanisms of
base.py; this class puts them together, so that
`stripefs.proto.rpc.serve(META_SERVICE, META_METHODS, core, ...)` serves it directly,
and adds `apply_batch`, which runs a batch of calls from a client's stream in one
store transaction, each `once` call at most once per request id.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import signal
from typing import Any, Callable, Optional

from stripefs.proto import codec, faults
from stripefs.proto.errors import FsError
from stripefs.proto.messages import Message
from stripefs.proto.rpc import BatchResult, summary
from stripefs.proto.services import META_METHODS

from .base import retrying
from .files import FileOps
from .fsck import FsckOps
from .labels import LabelOps
from .locks import LockOps
from .namespace import NamespaceOps
from .registry import RegistryOps
from .xattrs import XattrOps

log = logging.getLogger("stripefs.metaserver")


class MetaCore(NamespaceOps, XattrOps, LabelOps, FileOps, LockOps, RegistryOps, FsckOps):
    """The metadata service. Thread-safe: the store keeps transactions serializable.

    MetaCore(store, token_key, *, clock=time.time, server_suspect_after_s=3.0,
             server_dead_after_s=10.0, session_lease_s=30.0, gc_grace_s=30.0,
             unlinked_hold_s=10.0, pending_timeout_s=600.0, reserve_bytes=0,
             replication_per_heartbeat=8, replication_timeout_s=60.0, server_forget_after_s=86400.0)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._faults = faults.armed()  # tests only (proto/faults.py)
        self._once_calls = 0

    @property
    def batches_inline(self) -> bool:
        """Batches may run on the RPC server's event-loop thread (proto/rpc.py)."""
        return self.store.runs_inline

    def beat(self, address: str, lease_s: float) -> bool:
        """Tell the store this metaserver is alive (serving at `address`) and take or renew
        the background duties (sweep) if they are free; whether it holds them now."""
        self.duties, self.metaservers = self.store.beat(self.name, address, lease_s)
        return self.duties == self.name

    def apply_batch(self, calls: list[tuple[str, Message]],
                    run: Optional[Callable[[str, Message], Any]] = None) -> list[BatchResult]:
        """Run checked calls in order; `run(name, req)` runs one (the RPC glue's, which
        passes the caller to the methods that take it; default: the method itself). For
        each: its reply or FsError (a `once` call's reply encoded already: bytes), and the
        barrier to pass before the reply may leave (`store.sync` for a durable one).

        With a store that runs one transaction at a time (SQLite), the batch is one
        transaction, each call a savepoint of it (a call that fails undoes only itself):
        one commit and at most one fsync for the lot, where one per call cost both per
        call. With a database server (PostgreSQL), each call is a transaction of its own,
        retried alone: transactions run concurrently there, and one that holds a whole
        batch conflicts more and, refused, costs the whole batch again (32 creates a batch
        from 4 clients in 4 directories: 350 creates/s and 726 conflicts as batches, 956/s
        and 307 as calls, measured in-process)."""
        if run is None:
            def run(name: str, req: Message) -> Any:
                return getattr(self, name)(req)
        if not self.store.runs_inline:
            return [(self._call_alone(name, req, run), None) for name, req in calls]
        try:
            results = self._run_batch(calls, run)
        except Exception:  # noqa: BLE001 - the commit failed: nothing of the batch happened
            log.exception("a batch of %d calls could not be committed", len(calls))
            return [(FsError(errno.EIO, "metadata commit failed"), None)] * len(calls)
        if self._faults:
            self._maybe_die_after(sum(1 for name, _ in calls if META_METHODS[name].once))
        return [(result, self.store.sync if durable else None) for result, durable in results]

    def _run_batch(self, calls: list[tuple[str, Message]], run: Callable[[str, Message], Any]) -> list[tuple[Any, bool]]:
        """apply_batch's transaction, on a store that runs one transaction at a time (and so
        never refuses one for a conflict): each call's result and whether it asked for
        durability."""
        results: list[tuple[Any, bool]] = []
        with self.store.batch() as batch:
            for name, req in calls:
                batch.durable = False
                try:
                    result: Any = self._call(name, req, run)
                except FsError as exc:
                    result = exc
                except Exception:  # noqa: BLE001 - one call's bug fails that call only
                    log.exception("%s failed on %s", name, summary(req))
                    result = FsError(errno.EIO, f"internal error in {name}")
                results.append((result, batch.durable))
        return results

    @retrying
    def _call(self, name: str, req: Message, run: Callable[[str, Message], Any]) -> Any:
        """One call of a batch: its reply, or raises. A `once` call is recorded (`_once`)."""
        rid = getattr(req, "rid", 0) if META_METHODS[name].once else 0
        return self._once(name, req, rid, run) if rid else run(name, req)

    def _call_alone(self, name: str, req: Message, run: Callable[[str, Message], Any]) -> Any:
        """One call of a batch in its own transaction (retried alone): its reply or FsError."""
        try:
            result = self._call(name, req, run)
        except FsError as exc:
            return exc
        except Exception:  # noqa: BLE001 - one call's bug, or conflicts past every retry
            log.exception("%s failed on %s", name, summary(req))
            return FsError(errno.EIO, f"internal error in {name}")
        if self._faults and META_METHODS[name].once:
            self._maybe_die_after(1)
        return result

    def _maybe_die_after(self, once_calls: int) -> None:
        """Fault injection (proto/faults.py) "kill-after-once=N": SIGKILL this process once
        the Nth `once` call is committed and synced, before any reply leaves: a client then
        knows nothing of what became of it, the case request ids are for."""
        limit = self._faults.get("kill-after-once")
        if not limit:
            return
        self._once_calls += once_calls
        if self._once_calls >= limit[0]:
            self.store.sync()
            log.warning("fault injection: killed after %d once calls", self._once_calls)
            os.kill(os.getpid(), signal.SIGKILL)

    def _once(self, name: str, req: Message, rid: int, run: Callable[[str, Message], Any]) -> bytes:
        """Run a `once` call unless its request id has a recorded reply, which is returned
        instead; a reply is recorded in the call's own transaction (savepoint), so it is
        there exactly when the change is. An error is not recorded: nothing changed, and a
        retry runs again (and may now succeed). The reply comes back encoded (the frame
        recorded is the frame sent: encoded once)."""
        with self.store.transaction() as tx:
            recorded = tx.scalar("SELECT reply FROM requests WHERE rid = ?", (rid,))
            if recorded is not None:
                return bytes(recorded)
            frame = codec.encode_reply(run(name, req))
            tx.run("INSERT INTO requests (rid, reply, created_ns) VALUES (?, ?, ?)", (rid, frame, self.now_ns()))
            return frame


# Every operation the RPC layer or the server's sweep calls runs again when its store
# refuses it for a conflict (base.retrying); coroutines (WAIT methods) call wrapped ones.
# The sweep retries each of its steps alone (registry.py).
for _name in (*META_METHODS, "check_session", "beat"):
    _op = getattr(MetaCore, _name, None)
    if _op is not None and not inspect.iscoroutinefunction(_op):
        setattr(MetaCore, _name, retrying(_op))
