"""Client sessions, the data server registry, heartbeats (garbage and replication tasks
out, corrupt copies in), the sweep and the status report.

A session is a lease: a client renews it, and one silent for 3 leases is closed by the
sweep as if the client had closed it, releasing its open files and abandoning its
uncommitted allocations. A data server is "up" while its last heartbeat is at most
server_suspect_after_s old, "suspect" up to server_dead_after_s, then "dead"; only up
servers get new blocks and replication tasks, and only dead servers' replicas stop
counting (see repair.py). Garbage goes back to each server in its heartbeat replies.
"""

from __future__ import annotations

import errno
import logging
import stat

from stripefs.proto.errors import FsError
from stripefs.proto.messages import (
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

from .base import ADMIN, DEAD, LOCAL, NS_PER_S, Caller
from .repair import RepairOps
from .store import Tx

log = logging.getLogger("stripefs.metaserver.registry")

#: How often data servers should send heartbeats.
HEARTBEAT_INTERVAL_S = 1.0
#: Garbage block ids handed to one server per heartbeat.
GARBAGE_PER_HEARTBEAT = 1000
#: How long the reply of a `once` call is kept for a retry of it: well past the longest a
#: client retries (30 s, fs/client/session.py) and a metaserver restart.
REQUEST_RECORD_TTL_S = 600.0
#: A session silent for this many leases is closed.
SESSION_EXPIRY_LEASES = 3

_S_IFMT = 0o170000  # the type bits of st_mode


class RegistryOps(RepairOps):
    # ------------------------------------------------------------------ sessions

    def open_session(self, req: SessionOpenReq, caller: Caller = LOCAL) -> SessionReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            session = tx.insert(
                "INSERT INTO sessions (host, mountpoint, created_ns, last_renew_ns, owner) VALUES (?, ?, ?, ?, ?)",
                (req.host, req.mountpoint, now, now, str(caller)), "session_id",
            )
            return SessionReply(session=session, lease_s=self.session_lease_s,
                                record_open_after_s=self.record_open_after_s())

    def renew_session(self, req: SessionReq, caller: Caller = LOCAL) -> Empty:
        with self.store.transaction() as tx:
            self._session_exists(tx, req.session, caller)
            tx.run("UPDATE sessions SET last_renew_ns = ? WHERE session_id = ?", (self.now_ns(), req.session))
            return Empty()

    def close_session(self, req: SessionReq, caller: Caller = LOCAL) -> Empty:
        with self.store.transaction() as tx:
            self._session_exists(tx, req.session, caller)
            self._close_session(tx, req.session, self.now_ns())
            return Empty()

    def _close_session(self, tx: Tx, session: int, now: int) -> int:
        """End a session: drop its locks, release its opens, abandon its allocations;
        returns how many allocations went to garbage."""
        self._drop_session_locks(tx, session)
        inos = [r[0] for r in tx.all("SELECT ino FROM opens WHERE session_id = ?", (session,))]
        tx.run("DELETE FROM opens WHERE session_id = ?", (session,))
        for ino in inos:
            self._maybe_purge(tx, ino, now)
        # A closed or expired session commits nothing any more (commit needs the pending
        # row): whatever it wrote and did not commit is garbage now, not after the timeout.
        pending = [r[0] for r in tx.all("SELECT block_id FROM pending WHERE session_id = ?", (session,))]
        for block_id in pending:
            self._garbage_pending(tx, block_id, now)
        tx.run("DELETE FROM sessions WHERE session_id = ?", (session,))
        return len(pending)

    def sync(self, req: Empty) -> Empty:
        """Make every committed operation durable (a client's fsync with nothing to commit)."""
        self.store.make_durable()
        return Empty()

    def sweep(self) -> dict[str, int]:
        """Periodic housekeeping: expire silent sessions and abandoned allocations, forget
        stale replication tasks and plan new ones, purge unlinked files. Returns what it
        did, for the caller to log. Each step is its own transaction, run again alone if
        the store refuses it (a conflict costs that step, not the sweep), and opens with
        `on_duty`: a sweep that finds the duties taken over stops (store.DutiesLost)."""
        expired, abandoned, timed_out, forgotten = self.store.retried(self._sweep_expiries)
        # Planning is its own transaction: it can be the longest step, and the expiries
        # above need not wait for it.
        planned = self.store.retried(lambda: self.plan_replication(force=False))
        purged = self.purge_unlinked()
        return {
            "sessions_expired": expired,
            "unlinked_purged": purged,
            "allocations_abandoned": abandoned,
            "replication_tasks_timed_out": timed_out,
            "replication_tasks_planned": planned,
            "servers_forgotten": forgotten,
        }

    def _sweep_expiries(self) -> tuple[int, int, int, int]:
        """The sweep's first step: (sessions expired, allocations abandoned, replication
        tasks timed out, servers forgotten)."""
        with self.store.transaction() as tx:
            self.on_duty(tx)
            now = self.now_ns()
            expired = [
                r[0]
                for r in tx.all(
                    "SELECT session_id FROM sessions WHERE last_renew_ns < ?",
                    (now - int(SESSION_EXPIRY_LEASES * self.session_lease_s * NS_PER_S),),
                )
            ]
            abandoned = sum(self._close_session(tx, session, now) for session in expired)
            stale = [
                r[0]
                for r in tx.all(
                    "SELECT block_id FROM pending WHERE created_ns < ?",
                    (now - int(self.pending_timeout_s * NS_PER_S),),
                )
            ]
            for block_id in stale:
                self._garbage_pending(tx, block_id, now)
            tx.run("DELETE FROM requests WHERE created_ns < ?", (now - int(REQUEST_RECORD_TTL_S * NS_PER_S),))
            timed_out = self._expire_tasks(tx, now)
            forgotten = self._forget_servers(tx, now)
            self._log_state_changes(tx, now)
            return len(expired), abandoned + len(stale), timed_out, forgotten

    def _forget_servers(self, tx: Tx, now: int) -> int:
        """Registrations silent for server_forget_after_s go, with every row naming them:
        a dead server's copies stopped counting long ago and were re-made elsewhere, and
        registrations must not pile up (each costs every placement and every block map).
        A server that comes back registers anew, and its block report sorts out what it
        holds."""
        cutoff = now - int(self.server_forget_after_s * NS_PER_S)
        # Heartbeat ages count from our own start (base._state_of): nothing is forgotten
        # before this metaserver could have heard from it.
        gone = tx.all("SELECT server_id, address FROM servers WHERE last_heartbeat_ns < ?", (cutoff,)) \
            if self.listening_since_ns() < cutoff else []
        for row in gone:
            sid = row["server_id"]
            for table in ("replicas", "garbage", "pending_servers", "replication", "reported", "verify"):
                tx.run(f"DELETE FROM {table} WHERE server_id = ?", (sid,))
            tx.run("DELETE FROM servers WHERE server_id = ?", (sid,))
            log.warning("data server %d (%s) forgotten: silent for more than %.0f s",
                        sid, row["address"], self.server_forget_after_s)
        if gone:
            self.replan = True
        return len(gone)

    def _log_state_changes(self, tx: Tx, now: int) -> None:
        # Remembered only to log transitions; nothing depends on it (a restart logs anew).
        seen = self.__dict__.setdefault("_states_seen", {})
        for row, state in self._servers(tx, now):
            before = seen.get(row["server_id"])
            if before != state:
                self.replan = True
            if before is not None and before != state:
                level = logging.INFO if state == "up" else logging.WARNING
                log.log(level, "data server %d (%s): %s -> %s", row["server_id"], row["address"], before, state)
            seen[row["server_id"]] = state

    # ------------------------------------------------------------------ data servers

    def register(self, req: RegisterReq, caller: Caller = LOCAL) -> RegisterReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            # A data directory is bound to the credential that registered it first: nobody
            # else can take its place (its blocks would be served by them), and one
            # credential cannot register as several servers.
            bound = tx.scalar("SELECT identity FROM servers WHERE node_id = ?", (req.node_id,))
            if bound is not None and bound != str(caller) and caller.role != ADMIN:
                raise FsError(errno.EPERM, f"data server {req.node_id} belongs to another credential")
            if bound is None and caller.role != ADMIN and tx.scalar(
                "SELECT 1 FROM servers WHERE identity = ? AND node_id != ?", (str(caller), req.node_id)
            ):
                raise FsError(errno.EPERM, f"{caller} already registered another data directory")
            # The same data directory keeps its id, so the replicas recorded for it stay
            # valid; only its address (a new port after a restart) changes.
            # A (re)registering server may hold anything (it was away, or its disk was
            # swapped): ask for a block report. The earliest ask is kept; see _reconcile.
            tx.run(
                "INSERT INTO servers (node_id, address, capacity_bytes, free_bytes, blocks, last_heartbeat_ns,"
                " report_wanted_ns, identity) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
                " address = excluded.address, capacity_bytes = excluded.capacity_bytes,"
                " free_bytes = excluded.free_bytes, blocks = excluded.blocks,"
                " last_heartbeat_ns = excluded.last_heartbeat_ns,"
                " report_wanted_ns = COALESCE(servers.report_wanted_ns, excluded.report_wanted_ns),"
                " identity = COALESCE(servers.identity, excluded.identity)",
                (req.node_id, req.address, req.capacity_bytes, req.free_bytes, req.blocks, now, now, str(caller)),
            )
            server_id = tx.scalar("SELECT server_id FROM servers WHERE node_id = ?", (req.node_id,))
            self.replan = True  # a new server can take copies; a returning one may hold some
            # A restarted server lost the tasks it had been handed.
            tx.run("DELETE FROM replication WHERE server_id = ? AND sent_ns IS NOT NULL", (server_id,))
            return RegisterReply(server_id=server_id, heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
                                 token_key=self.token_key)

    def heartbeat(self, req: HeartbeatReq, caller: Caller = LOCAL) -> HeartbeatReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            if not tx.scalar("SELECT 1 FROM servers WHERE server_id = ?", (req.server_id,)):
                return HeartbeatReply(delete=[], reregister=True)
            row = self._server_row(tx, req.server_id, caller)
            # Back from the dead without a restart (a partition, a long stall): what it
            # holds may have been re-made elsewhere meanwhile, so reconcile it too.
            back = self._state_of(row, now) == DEAD
            tx.run(
                "UPDATE servers SET capacity_bytes = ?, free_bytes = ?, used_bytes = ?, blocks = ?,"
                " last_heartbeat_ns = ?, report_wanted_ns = CASE WHEN ? THEN COALESCE(report_wanted_ns, ?)"
                " ELSE report_wanted_ns END WHERE server_id = ?",
                (req.capacity_bytes, req.free_bytes, req.used_bytes, req.blocks, now, back, now, req.server_id),
            )
            if back:
                log.info("data server %d (%s) is back", req.server_id, row["address"])
            self._drop_corrupt(tx, req.server_id, req.corrupt, now)
            tx.run_many("DELETE FROM verify WHERE server_id = ? AND block_id = ?",
                        [(req.server_id, b) for b in (*req.corrupt, *req.verified)])
            rows = tx.all(
                "SELECT block_id FROM garbage WHERE server_id = ? AND not_before_ns <= ?"
                " ORDER BY block_id LIMIT ?",
                (req.server_id, now, GARBAGE_PER_HEARTBEAT),
            )
            wanted = tx.scalar("SELECT report_wanted_ns FROM servers WHERE server_id = ?", (req.server_id,))
            verify, digests = self._hand_out_verifications(tx, req.server_id, now)
            return HeartbeatReply(
                delete=[r[0] for r in rows],
                replicate=self._hand_out_tasks(tx, req.server_id, now),
                block_report=wanted is not None,
                verify=verify,
                verify_digests=digests,
            )

    def blocks_deleted(self, req: DeletedReq, caller: Caller = LOCAL) -> Empty:
        with self.store.transaction() as tx:
            self._server_row(tx, req.server_id, caller)
            tx.run_many(
                "DELETE FROM garbage WHERE server_id = ? AND block_id = ?",
                [(req.server_id, b) for b in req.block_ids],
            )
            return Empty()

    # ------------------------------------------------------------------ operators

    def status(self, req: Empty) -> StatusReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            servers = [
                ServerStatus(
                    server_id=s["server_id"],
                    address=s["address"],
                    state=state,
                    capacity_bytes=s["capacity_bytes"],
                    free_bytes=s["free_bytes"],
                    used_bytes=s["used_bytes"],
                    blocks=s["blocks"],
                    last_heartbeat_s=max(0.0, (now - s["last_heartbeat_ns"]) / NS_PER_S),
                )
                for s, state in self._servers(tx, now)
            ]
            blocks, under, lost = self._replica_health(tx, now)
            counts = tx.one(
                "SELECT COUNT(*) AS inodes,"
                " COALESCE(SUM(CASE WHEN (mode & ?) = ? THEN 1 ELSE 0 END), 0) AS files,"
                " COALESCE(SUM(CASE WHEN (mode & ?) = ? THEN 1 ELSE 0 END), 0) AS dirs,"
                " COALESCE(SUM(CASE WHEN (mode & ?) = ? THEN size ELSE 0 END), 0) AS bytes"
                " FROM inodes",
                (_S_IFMT, stat.S_IFREG, _S_IFMT, stat.S_IFDIR, _S_IFMT, stat.S_IFREG),
            )
            inline = tx.one("SELECT COUNT(*) AS files, COALESCE(SUM(length(data)), 0) AS bytes FROM inline_data")
            assert counts is not None and inline is not None  # (aggregates: always one row)
            return StatusReply(
                servers=servers,
                inodes=counts["inodes"],
                files=counts["files"],
                directories=counts["dirs"],
                bytes=counts["bytes"],
                blocks=blocks,
                sessions=tx.scalar("SELECT COUNT(*) FROM sessions"),
                locks=tx.scalar("SELECT COUNT(*) FROM locks"),
                under_replicated=under,
                lost=lost,
                inline_files=inline["files"],
                inline_bytes=inline["bytes"],
                engine=self.store.engine,
                metaserver=self.name,
                duties=self.duties,
                duties_address=dict(self.metaservers).get(self.duties, ""),
                metaservers=[address for _, address in self.metaservers],
            )
