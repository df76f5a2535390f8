"""Keeping R replicas of every block: re-replication, block reports, corrupt and bad
replica reports.

Re-replication. The planner (`plan_replication`, run by the sweep) finds blocks with fewer
replicas on non-dead servers than min(R, non-dead servers), R being the file's replica
count, and queues a task in the `replication` table for an up server with room that holds
no copy (and no copy waiting for deletion) of the block. Each target has at most
`replication_per_heartbeat` tasks in flight, so repair traffic is bounded per server
whatever the backlog. The target's next heartbeat reply carries the task with its sources
(non-dead replicas, up ones first) and a write token; the target copies the block and
reports `replicated` (or failed). Only then does the copy become a replica row, and once
a block has R replicas on non-dead servers again, its rows on dead servers are dropped
and their copies sent to garbage, so a dead server that returns deletes them; a server
that returns before the copy lands leaves the block with more than R copies, and those
beyond R go to garbage too (`_excess`). A task queued for a block that is back at R is
dropped when its target next beats instead of being handed out. A task nobody reports on
is forgotten after `replication_timeout_s` (at once when its target is dead, or not up
and the task not handed out yet) and planned again.

Block reports. A (re)registered server is asked for a full block report; its ids arrive
in chunks (`reported` table) and the last chunk reconciles them with the block maps:
a replica row whose copy is not reported is dropped (the copy is gone); a reported copy
of a block that is not referenced and not pending is garbage; a reported copy of a
referenced block the server is not a replica of becomes a replica if the block is short
of replicas (ids are never reused, so it is the same immutable content), else garbage.

Everything here is crash-safe by construction: tasks, reports in progress and the wish
for a report live in the store, and a lost task is simply planned again.
"""

from __future__ import annotations

import errno
import logging

from stripefs.proto.errors import FsError
from stripefs.proto.messages import BadReplicaReq, BlockReportReq, Empty, ReplicatedReq, ReplicateTask

from .base import ADMIN, DEAD, LOCAL, NS_PER_S, UP, WANT_SQL, Caller, CoreBase, copies_on_sql, id_list, want_replicas
from .store import Row, Tx

log = logging.getLogger("stripefs.metaserver.repair")

#: Reasons a client may give for a bad replica.
BAD_REPLICA_REASONS = ("corrupt", "missing", "unreachable")
#: Blocks a server is asked to verify per heartbeat (each is a whole-block read).
VERIFY_PER_HEARTBEAT = 16
#: How many candidate blocks the planner looks at per free task slot (some find no target).
PLAN_LOOKAHEAD = 4
#: Planning scans every block (~0.5 s per 100k blocks), so the sweep plans only when
#: something may have left a block short (a server's state changed, a copy was dropped,
#: a task ended, a commit placed fewer than R), and otherwise at this interval.
FULL_PLAN_INTERVAL_S = 30.0


def _excess(copies: list[tuple[int, str, int, int]], want: int) -> list[int]:
    """The servers of a block's copies beyond `want`, among its copies on live servers
    (server id, state, rank, free bytes): none unless `want` of them are on up servers.
    Copies pile up beyond R when a server judged dead comes back while its blocks are
    being copied elsewhere (the copy lands after its return, when its own copies count
    again). Kept: the copies on the up servers with the most room (the older placement
    on a tie). The rest go to garbage, so a reader holding an older block map still finds
    them for the GC grace."""
    up = [c for c in copies if c[1] == UP]
    if len(copies) <= want or len(up) < want:
        return []
    keep = {c[0] for c in sorted(up, key=lambda c: (-c[3], c[2]))[:want]}
    return [c[0] for c in copies if c[0] not in keep]


class RepairOps(CoreBase):
    #: Counters since start, for logs and tests (not state: nothing depends on them).
    unreachable_reports = 0

    # ------------------------------------------------------------------ helpers

    def _alive_ids(self, tx: Tx, now: int) -> list[int]:
        return [sid for sid, st in self._server_states(tx, now).items() if st != DEAD]

    def _counted_replicas(self, tx: Tx, block_id: int, alive: list[int]) -> int:
        return tx.scalar(
            f"SELECT COUNT(*) FROM replicas WHERE block_id = ? AND server_id IN {id_list(alive)}", (block_id,)
        )

    def _block_want(self, tx: Tx, block_id: int) -> int | None:
        """R of the file holding block_id, or None when no file references it."""
        r = tx.scalar(
            "SELECT i.replicas FROM blocks b JOIN inodes i ON i.ino = b.ino WHERE b.block_id = ?", (block_id,)
        )
        return None if r is None else want_replicas(r)

    def _add_replica(self, tx: Tx, block_id: int, server_id: int, now: int) -> None:
        rank = tx.scalar("SELECT COALESCE(MAX(rank), -1) + 1 FROM replicas WHERE block_id = ?", (block_id,))
        tx.run(
            "INSERT INTO replicas (block_id, server_id, rank, created_ns) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (block_id, server_id, rank, now),
        )

    def _settle(self, tx: Tx, block_id: int, now: int) -> None:
        """A block back at R counted replicas: forget its copies on dead servers. With R
        copies on up servers, forget its copies beyond R too (see _excess)."""
        want = self._block_want(tx, block_id)
        if want is None:
            return
        states = self._server_states(tx, now)
        rows = tx.all(
            "SELECT r.server_id, r.rank, s.free_bytes FROM replicas r JOIN servers s ON s.server_id = r.server_id"
            " WHERE r.block_id = ?", (block_id,),
        )
        live = [(r[0], states[r[0]], r[1], r[2]) for r in rows if states.get(r[0], DEAD) != DEAD]
        if len(live) < want:
            return
        drop = [r[0] for r in rows if states.get(r[0], DEAD) == DEAD] + _excess(live, want)
        if drop:
            tx.run_many("DELETE FROM replicas WHERE block_id = ? AND server_id = ?", [(block_id, s) for s in drop])
            self._garbage(tx, block_id, drop, now)

    def _drop_replica(self, tx: Tx, block_id: int, server_id: int) -> bool:
        return tx.run(
            "DELETE FROM replicas WHERE block_id = ? AND server_id = ?", (block_id, server_id)
        ) > 0

    # ------------------------------------------------------------------ planning

    def plan_replication(self, force: bool = True) -> int:
        """Queue re-replication tasks for blocks short of replicas; returns how many.
        force=False: only if something may have changed (the sweep's way)."""
        next_full_plan_ns = self.next_full_plan_ns
        try:
            with self.store.transaction() as tx:
                self.on_duty(tx)
                now = self.now_ns()
                if not force and not self.replan and now < self.next_full_plan_ns:
                    return 0
                # Cleared under the store lock, before planning: a trigger that comes later
                # (in a later transaction) sets it again.
                self.replan = False
                self.next_full_plan_ns = now + int(FULL_PLAN_INTERVAL_S * NS_PER_S)
                return self._plan(tx, now)
        except BaseException:
            # Refused (a conflict, the duties lost): nothing was planned, so the next try
            # plans, as this one would have.
            self.replan, self.next_full_plan_ns = True, next_full_plan_ns
            raise

    def _over_replicated(self, tx: Tx, now: int) -> list[int]:
        """Blocks with copies beyond R on live servers, R of them on up servers: what
        `_settle` trims. A scan of every block, for fsck: copies that land are trimmed as
        they land, so only a state from before that (or a store edited by hand) has any."""
        states = self._server_states(tx, now)
        alive = [sid for sid, st in states.items() if st != DEAD]
        up = [sid for sid, st in states.items() if st == UP]
        return [r[0] for r in tx.all(
            "SELECT block_id FROM ("
            f" SELECT b.block_id, {WANT_SQL} AS want, {copies_on_sql(alive)} AS live, {copies_on_sql(up)} AS up"
            " FROM blocks b JOIN inodes i ON i.ino = b.ino) AS counted"
            " WHERE live > want AND up >= want ORDER BY block_id",
            (want_replicas(0),),
        )]

    def _plan(self, tx: Tx, now: int) -> int:
        servers = self._servers(tx, now)
        alive = [row["server_id"] for row, st in servers if st != DEAD]
        targets = [row for row, st in servers if st == UP]
        if not targets or not alive:
            return 0
        busy = {
            r[0]: r[1]
            for r in tx.all("SELECT server_id, COUNT(*) FROM replication GROUP BY server_id")
        }
        cap = self.replication_per_heartbeat
        budget = sum(max(0, cap - busy.get(t["server_id"], 0)) for t in targets)
        if budget == 0:
            return 0
        # Fewest counted replicas first: a block down to one copy is one failure from loss.
        candidates = tx.all(
            "SELECT * FROM ("
            " SELECT b.block_id, b.ino, b.idx, i.block_size,"
            f"  {WANT_SQL} AS want, {copies_on_sql(alive)} AS live,"
            "  (SELECT COUNT(*) FROM replication t WHERE t.block_id = b.block_id) AS queued"
            " FROM blocks b JOIN inodes i ON i.ino = b.ino) AS counted"
            " WHERE live >= 1 AND live + queued < CASE WHEN want < ? THEN want ELSE ? END"
            " ORDER BY live, block_id LIMIT ?",
            (want_replicas(0), len(alive), len(alive), budget * PLAN_LOOKAHEAD),
        )
        planned = 0
        n = len(targets)
        for c in candidates:
            if planned >= budget:
                break
            taken = {
                r[0]
                for r in tx.all(
                    "SELECT server_id FROM replicas WHERE block_id = ?"
                    " UNION SELECT server_id FROM garbage WHERE block_id = ?"
                    " UNION SELECT server_id FROM replication WHERE block_id = ?",
                    (c["block_id"],) * 3,
                )
            }
            # Striping: rotate the preference by the block's position, as alloc does, so
            # the copies of a dead server's blocks spread over every survivor; among those,
            # the least busy target first.
            start = (c["ino"] + c["idx"]) % n
            eligible = sorted(
                (
                    (busy.get(t["server_id"], 0), (k - start) % n, t)
                    for k, t in enumerate(targets)
                    if t["server_id"] not in taken
                    and busy.get(t["server_id"], 0) < cap
                    and self._has_room(t, c["block_size"])
                ),
                key=lambda x: (x[0], x[1]),
            )
            for _, _, t in eligible[: c["want"] - c["live"] - c["queued"]]:
                tx.run(
                    "INSERT INTO replication (block_id, server_id, created_ns) VALUES (?, ?, ?)",
                    (c["block_id"], t["server_id"], now),
                )
                busy[t["server_id"]] = busy.get(t["server_id"], 0) + 1
                planned += 1
        return planned

    def _expire_tasks(self, tx: Tx, now: int) -> int:
        """Forget tasks nobody reported on in time (the target died or lost them), every
        task of a dead target, and the queued ones of a target that is not up: they are
        planned again on servers that can do them."""
        cutoff = now - int(self.replication_timeout_s * NS_PER_S)
        n = tx.run("DELETE FROM replication WHERE COALESCE(sent_ns, created_ns) < ?", (cutoff,))
        states = self._server_states(tx, now)
        dead = [sid for sid, st in states.items() if st == DEAD]
        not_up = [sid for sid, st in states.items() if st != UP]
        if dead:
            n += tx.run(f"DELETE FROM replication WHERE server_id IN {id_list(dead)}")
        if not_up:
            n += tx.run(f"DELETE FROM replication WHERE sent_ns IS NULL AND server_id IN {id_list(not_up)}")
        if n:
            self.replan = True
        return n

    def _hand_out_tasks(self, tx: Tx, server_id: int, now: int) -> list[ReplicateTask]:
        """The queued tasks of a server that just beat, with their sources."""
        rows = tx.all(
            "SELECT block_id FROM replication WHERE server_id = ? AND sent_ns IS NULL"
            " ORDER BY created_ns, block_id LIMIT ?",
            (server_id, self.replication_per_heartbeat),
        )
        if not rows:
            return []
        states = self._server_states(tx, now)
        # The copying server reads the sources as itself: the read token is for its credential.
        me = tx.one("SELECT identity, address FROM servers WHERE server_id = ?", (server_id,))
        reader, address = (me["identity"] or "", me["address"]) if me is not None else ("", "")
        tasks = []
        for r in rows:
            block_id = r["block_id"]
            sources = [
                (s["address"], states.get(s["server_id"], DEAD), s["rank"])
                for s in tx.all(
                    "SELECT s.server_id, s.address, r.rank FROM replicas r JOIN servers s ON s.server_id = r.server_id"
                    " WHERE r.block_id = ? AND r.server_id != ?",
                    (block_id, server_id),
                )
            ]
            sources = [(a, st, rank) for a, st, rank in sources if st != DEAD]
            want = self._block_want(tx, block_id)
            # No source, no file, or back at R since it was queued (a server judged dead
            # came back with its copy): nothing to copy.
            if not sources or want is None or len(sources) >= want:
                tx.run("DELETE FROM replication WHERE block_id = ? AND server_id = ?", (block_id, server_id))
                self.replan = True
                continue
            sources.sort(key=lambda x: (x[1] != UP, x[2]))
            tx.run(
                "UPDATE replication SET sent_ns = ? WHERE block_id = ? AND server_id = ?", (now, block_id, server_id)
            )
            tasks.append(
                ReplicateTask(
                    block_id=block_id, sources=[a for a, _, _ in sources],
                    token=self._write_token(block_id, reader, address, now),
                    read_token=self._read_token(block_id, reader, now) if reader else b"",
                    digest=self._digest(tx, block_id),
                )
            )
        return tasks

    # ------------------------------------------------------------------ reports from data servers

    def _server_row(self, tx: Tx, server_id: int, caller: Caller = LOCAL) -> Row:
        """A registered data server, acting as itself: a data server credential speaks only
        for the server it registered (EPERM otherwise)."""
        row = tx.one("SELECT * FROM servers WHERE server_id = ?", (server_id,))
        if row is None:
            raise FsError(errno.ENOENT, f"unknown data server {server_id}")
        if caller.role != ADMIN and row["identity"] != str(caller):
            raise FsError(errno.EPERM, f"{caller} is not data server {server_id}")
        return row

    def replicated(self, req: ReplicatedReq, caller: Caller = LOCAL) -> Empty:
        with self.store.transaction() as tx:
            now = self.now_ns()
            self._server_row(tx, req.server_id, caller)
            sid = req.server_id
            # A slot freed, or a copy still missing: plan again.
            self.replan = True
            for block_id in req.block_ids:
                tx.run("DELETE FROM replication WHERE block_id = ? AND server_id = ?", (block_id, sid))
                if self._block_want(tx, block_id) is None:
                    # Deleted while being copied: the new copy is garbage already.
                    self._garbage(tx, block_id, [sid], now)
                elif tx.scalar("SELECT 1 FROM garbage WHERE block_id = ? AND server_id = ?", (block_id, sid)):
                    # A deletion of this copy may be on its way: never resurrect it.
                    pass
                else:
                    self._add_replica(tx, block_id, sid, now)
                    self._settle(tx, block_id, now)
            for block_id in req.failed:
                tx.run("DELETE FROM replication WHERE block_id = ? AND server_id = ?", (block_id, sid))
            if req.failed:
                log.warning("server %d could not copy %d blocks (planned again)", sid, len(req.failed))
            return Empty()

    def _drop_corrupt(self, tx: Tx, server_id: int, block_ids: list[int], now: int) -> None:
        """A data server found these copies corrupt (or gone) and moved them aside."""
        dropped = sum(self._drop_replica(tx, b, server_id) for b in block_ids)
        if dropped:
            self.replan = True
        if block_ids:
            log.warning(
                "server %d found %d corrupt blocks (%d were replicas): re-replicating from good copies",
                server_id, len(block_ids), dropped,
            )

    def report_bad_replica(self, req: BadReplicaReq) -> Empty:
        """A client could not read a copy. Its word is a hint, never a deletion: an
        unreachable server is judged by its heartbeats; a corrupt or missing copy is
        checked by the server that holds it (the `verify` list of its next heartbeat),
        which moves a bad copy aside and reports it itself."""
        if req.reason not in BAD_REPLICA_REASONS:
            raise FsError(errno.EINVAL, f"unknown reason {req.reason!r}")
        if req.reason == "unreachable":
            self.unreachable_reports += 1
            log.info("client reports %s unreachable for block %d", req.address, req.block_id)
            return Empty()
        with self.store.transaction() as tx:
            sid = tx.scalar("SELECT server_id FROM servers WHERE address = ?", (req.address,))
            if sid is None or not tx.scalar(
                "SELECT 1 FROM replicas WHERE block_id = ? AND server_id = ?", (req.block_id, sid)
            ):
                return Empty()  # already dealt with, or the block is gone
            tx.run("INSERT INTO verify (server_id, block_id) VALUES (?, ?) ON CONFLICT DO NOTHING", (sid, req.block_id))
            log.warning("block %d: a client reports the copy on %s %s: to be verified there",
                        req.block_id, req.address, req.reason)
            return Empty()

    @staticmethod
    def _digest(tx: Tx, block_id: int) -> bytes:
        """A committed block's digest (b"": none recorded), for whoever checks a copy of it."""
        return bytes(tx.scalar("SELECT digest FROM blocks WHERE block_id = ?", (block_id,)) or b"")

    def _hand_out_verifications(self, tx: Tx, server_id: int, now: int) -> tuple[list[int], list[bytes]]:
        """Blocks this server should check now, with their committed digests; one not
        answered within a task timeout is handed out again."""
        resend = now - int(self.replication_timeout_s * NS_PER_S)
        ids = [r[0] for r in tx.all(
            "SELECT block_id FROM verify WHERE server_id = ? AND (sent_ns IS NULL OR sent_ns < ?)"
            " ORDER BY block_id LIMIT ?", (server_id, resend, VERIFY_PER_HEARTBEAT),
        )]
        tx.run_many("UPDATE verify SET sent_ns = ? WHERE server_id = ? AND block_id = ?",
                    [(now, server_id, b) for b in ids])
        digests = [self._digest(tx, b) for b in ids]
        return ids, digests

    def block_report(self, req: BlockReportReq, caller: Caller = LOCAL) -> Empty:
        with self.store.transaction() as tx:
            now = self.now_ns()
            server = self._server_row(tx, req.server_id, caller)
            sid = req.server_id
            if req.first:
                tx.run("DELETE FROM reported WHERE server_id = ?", (sid,))
            tx.run_many(
                "INSERT INTO reported (server_id, block_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(sid, b) for b in req.block_ids],
            )
            if req.last:
                done = self._reconcile(tx, server, now)
                tx.run("DELETE FROM reported WHERE server_id = ?", (sid,))
                tx.run("UPDATE servers SET report_wanted_ns = NULL WHERE server_id = ?", (sid,))
                if any(done.values()):
                    log.info("block report of server %d: %s", sid, ", ".join(f"{k}={v}" for k, v in done.items()))
            return Empty()

    def _reconcile(self, tx: Tx, server: Row, now: int) -> dict[str, int]:
        sid = server["server_id"]
        # Rows added after the report was asked for may name copies stored after the
        # server listed its blocks; only older rows can be judged by this report.
        since = server["report_wanted_ns"] if server["report_wanted_ns"] is not None else -1
        missing = [
            r[0]
            for r in tx.all(
                "SELECT block_id FROM replicas WHERE server_id = ? AND created_ns < ?"
                " AND block_id NOT IN (SELECT block_id FROM reported WHERE server_id = ?)",
                (sid, since, sid),
            )
        ]
        tx.run_many("DELETE FROM replicas WHERE block_id = ? AND server_id = ?", [(b, sid) for b in missing])
        if missing:
            self.replan = True
        extra = tx.all(
            "SELECT p.block_id, b.block_id IS NOT NULL AS referenced,"
            " EXISTS (SELECT 1 FROM pending_servers q WHERE q.block_id = p.block_id AND q.server_id = p.server_id)"
            "  AS pending,"
            " EXISTS (SELECT 1 FROM garbage g WHERE g.block_id = p.block_id AND g.server_id = p.server_id)"
            "  AS doomed"
            " FROM reported p LEFT JOIN blocks b ON b.block_id = p.block_id"
            " LEFT JOIN replicas r ON r.block_id = p.block_id AND r.server_id = p.server_id"
            " WHERE p.server_id = ? AND r.block_id IS NULL",
            (sid,),
        )
        alive = self._alive_ids(tx, now)
        adopted = garbage = 0
        for row in extra:
            block_id = row["block_id"]
            if row["doomed"] or row["pending"]:
                continue  # deletion already on its way / a writer's copy awaiting commit
            if row["referenced"]:
                want = self._block_want(tx, block_id) or 0
                if self._counted_replicas(tx, block_id, alive) < want:
                    self._add_replica(tx, block_id, sid, now)
                    tx.run("DELETE FROM replication WHERE block_id = ? AND server_id = ?", (block_id, sid))
                    self._settle(tx, block_id, now)
                    adopted += 1
                    continue
            self._garbage(tx, block_id, [sid], now)
            garbage += 1
        return {"replicas_missing": len(missing), "copies_adopted": adopted, "copies_to_garbage": garbage}
