"""Client sessions, the data server registry, garbage hand-out and the status report.

A session is a lease: a client renews it, and one silent for 3 leases is closed by the
sweep as if the client had closed it, releasing its open files. A data server is "up"
while its last heartbeat is younger than server_dead_after_s; only up servers get new
blocks. Garbage goes back to each server in its heartbeat replies.
"""

from __future__ import annotations

import errno
import stat

from proto.errors import FsError
from proto.messages import (
    DeletedReq,
    Empty,
    HeartbeatReply,
    HeartbeatReq,
    RegisterReply,
    RegisterReq,
    ServerStatus,
    SessionOpenReq,
    SessionReply,
    SessionReq,
    StatusReply,
)

from .base import NS_PER_S, CoreBase
from .store import Tx

#: How often data servers should send heartbeats.
HEARTBEAT_INTERVAL_S = 1.0
#: Garbage block ids handed to one server per heartbeat.
GARBAGE_PER_HEARTBEAT = 1000
#: A session silent for this many leases is closed.
SESSION_EXPIRY_LEASES = 3
#: An allocation not committed within this long is abandoned (its writer is gone).
PENDING_EXPIRY_S = 3600.0

_S_IFMT = 0o170000  # the type bits of st_mode


class RegistryOps(CoreBase):
    # ------------------------------------------------------------------ sessions

    def open_session(self, req: SessionOpenReq) -> SessionReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            cur = tx.run(
                "INSERT INTO sessions (host, mountpoint, created_ns, last_renew_ns) VALUES (?, ?, ?, ?)",
                (req.host, req.mountpoint, now, now),
            )
            return SessionReply(session=cur.lastrowid, lease_s=self.session_lease_s)

    def renew_session(self, req: SessionReq) -> Empty:
        with self.store.transaction() as tx:
            cur = tx.run(
                "UPDATE sessions SET last_renew_ns = ? WHERE session_id = ?", (self.now_ns(), req.session)
            )
            if cur.rowcount == 0:
                raise FsError(errno.ESTALE, f"session {req.session} is unknown or expired")
            return Empty()

    def close_session(self, req: SessionReq) -> Empty:
        with self.store.transaction() as tx:
            self._session_exists(tx, req.session)
            self._close_session(tx, req.session, self.now_ns())
            return Empty()

    def _close_session(self, tx: Tx, session: int, now: int) -> None:
        inos = [r[0] for r in tx.all("SELECT ino FROM opens WHERE session_id = ?", (session,))]
        tx.run("DELETE FROM opens WHERE session_id = ?", (session,))
        for ino in inos:
            self._maybe_purge(tx, ino, now)
        tx.run("DELETE FROM sessions WHERE session_id = ?", (session,))

    def sweep(self) -> dict[str, int]:
        """Periodic housekeeping: expire silent sessions and abandoned allocations.
        Returns what it did, for the caller to log."""
        with self.store.transaction() as tx:
            now = self.now_ns()
            expired = [
                r[0]
                for r in tx.all(
                    "SELECT session_id FROM sessions WHERE last_renew_ns < ?",
                    (now - int(SESSION_EXPIRY_LEASES * self.session_lease_s * NS_PER_S),),
                )
            ]
            for session in expired:
                self._close_session(tx, session, now)
            stale = [
                r[0]
                for r in tx.all(
                    "SELECT block_id FROM pending WHERE created_ns < ?",
                    (now - int(PENDING_EXPIRY_S * NS_PER_S),),
                )
            ]
            for block_id in stale:
                self._garbage_pending(tx, block_id, now)
            return {"sessions_expired": len(expired), "allocations_abandoned": len(stale)}

    # ------------------------------------------------------------------ data servers

    def register(self, req: RegisterReq) -> RegisterReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            # The same data directory keeps its id, so the replicas recorded for it stay
            # valid; only its address (a new port after a restart) changes.
            tx.run(
                "INSERT INTO servers (node_id, address, capacity_bytes, free_bytes, blocks, last_heartbeat_ns)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
                " address = excluded.address, capacity_bytes = excluded.capacity_bytes,"
                " free_bytes = excluded.free_bytes, blocks = excluded.blocks,"
                " last_heartbeat_ns = excluded.last_heartbeat_ns",
                (req.node_id, req.address, req.capacity_bytes, req.free_bytes, req.blocks, now),
            )
            server_id = tx.scalar("SELECT server_id FROM servers WHERE node_id = ?", (req.node_id,))
            return RegisterReply(server_id=server_id, heartbeat_interval_s=HEARTBEAT_INTERVAL_S)

    def heartbeat(self, req: HeartbeatReq) -> HeartbeatReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            cur = tx.run(
                "UPDATE servers SET capacity_bytes = ?, free_bytes = ?, used_bytes = ?, blocks = ?,"
                " last_heartbeat_ns = ? WHERE server_id = ?",
                (req.capacity_bytes, req.free_bytes, req.used_bytes, req.blocks, now, req.server_id),
            )
            if cur.rowcount == 0:
                return HeartbeatReply(delete=[], reregister=True)
            rows = tx.all(
                "SELECT block_id FROM garbage WHERE server_id = ? AND not_before_ns <= ?"
                " ORDER BY block_id LIMIT ?",
                (req.server_id, now, GARBAGE_PER_HEARTBEAT),
            )
            return HeartbeatReply(delete=[r[0] for r in rows])

    def blocks_deleted(self, req: DeletedReq) -> Empty:
        with self.store.transaction() as tx:
            tx.run_many(
                "DELETE FROM garbage WHERE server_id = ? AND block_id = ?",
                [(req.server_id, b) for b in req.block_ids],
            )
            return Empty()

    # ------------------------------------------------------------------ operators

    def status(self, req: Empty) -> StatusReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            cutoff = self._live_cutoff_ns(now)
            servers = [
                ServerStatus(
                    server_id=s["server_id"],
                    address=s["address"],
                    state="up" if s["last_heartbeat_ns"] >= cutoff else "down",
                    capacity_bytes=s["capacity_bytes"],
                    free_bytes=s["free_bytes"],
                    used_bytes=s["used_bytes"],
                    blocks=s["blocks"],
                    last_heartbeat_s=max(0.0, (now - s["last_heartbeat_ns"]) / NS_PER_S),
                )
                for s in tx.all("SELECT * FROM servers ORDER BY server_id")
            ]
            counts = tx.one(
                "SELECT COUNT(*) AS inodes,"
                " COALESCE(SUM((mode & ?) = ?), 0) AS files,"
                " COALESCE(SUM((mode & ?) = ?), 0) AS dirs,"
                " COALESCE(SUM(CASE WHEN (mode & ?) = ? THEN size ELSE 0 END), 0) AS bytes"
                " FROM inodes",
                (_S_IFMT, stat.S_IFREG, _S_IFMT, stat.S_IFDIR, _S_IFMT, stat.S_IFREG),
            )
            return StatusReply(
                servers=servers,
                inodes=counts["inodes"],
                files=counts["files"],
                directories=counts["dirs"],
                bytes=counts["bytes"],
                blocks=tx.scalar("SELECT COUNT(*) FROM blocks"),
                sessions=tx.scalar("SELECT COUNT(*) FROM sessions"),
            )
