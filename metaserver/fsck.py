"""fsck: check the metadata store's invariants, and with repair=True fix what can be fixed.

The checks, in order (a repair made by one is seen by the next):

- directory entries naming a missing inode, or held by a missing or non-directory parent;
- directories: exactly one entry names each (the root: none), and `parent` is that
  entry's directory;
- link counts: a file's nlink is the number of entries naming it, a directory's is
  2 + its subdirectories; an inode no entry names has nlink 0;
- orphans: nlink 0 and open by no session (purged: its blocks become garbage);
- directory usage counters (used_files, used_bytes) against the entries they count;
- opens of unknown sessions;
- block maps: blocks of missing inodes, replicas on unknown servers;
- inline block 0s: on a file that also has a stored block 0 or is not a regular file,
  longer than a block, or failing their checksum (lost: there is no other copy);
- replication: under-replicated blocks (re-replication is scheduled), lost ones
  (nothing to copy from: not repairable here), and over-replicated ones, with more
  copies than R on live servers and R on up ones (the rest become garbage, as when a
  copy lands: repair.py `_settle`);
- allocations pending past the pending timeout; garbage for unknown servers.

The whole check is one transaction, so it sees (and leaves) one consistent state. Each
problem is one line in `problems`; each repair made is one line in `repaired`, so a
report with as many repairs as problems left nothing unrepaired.
"""

from __future__ import annotations

import logging

import crc32c

from stripefs.proto.messages import FsckReply, FsckReq
from stripefs.proto.types import ROOT_INODE

from .base import NS_PER_S, is_dir, is_reg
from .repair import RepairOps
from .store import Tx, counted_usage

log = logging.getLogger("stripefs.metaserver.fsck")

#: Problem lines listed one by one per check; the rest are summed up in one line.
LINES_PER_CHECK = 50


class _Report:
    def __init__(self, repair: bool) -> None:
        self.repair = repair
        self.problems: list[str] = []
        self.repaired: list[str] = []
        self._shown: dict[str, int] = {}

    def problem(self, check: str, text: str, fix: str | None = None) -> None:
        """One problem; `fix` is the repair line when a repair was made."""
        n = self._shown.get(check, 0)
        self._shown[check] = n + 1
        if n < LINES_PER_CHECK:
            self.problems.append(text)
            if fix is not None:
                self.repaired.append(fix)
        elif n == LINES_PER_CHECK:
            self.problems.append(f"{check}: more problems of this kind not listed")
            if fix is not None:
                self.repaired.append(f"{check}: the rest repaired too")


class FsckOps(RepairOps):
    def fsck(self, req: FsckReq) -> FsckReply:
        with self.store.transaction() as tx:
            now = self.now_ns()
            rep = _Report(req.repair)
            self._fsck_dentries(tx, rep)
            self._fsck_dirs(tx, rep)
            self._fsck_nlink(tx, rep, now)
            self._fsck_xattr_counts(tx, rep)
            self._fsck_orphans(tx, rep, now)
            self._fsck_usage(tx, rep)
            self._fsck_blocks(tx, rep, now)
            self._fsck_inline(tx, rep)
            blocks, under, lost = self._replica_health(tx, now)
            if under or lost:
                queued = tx.scalar("SELECT COUNT(*) FROM replication")
                planned = self._plan(tx, now) if req.repair else 0
                if under - lost > 0:
                    fix = None
                    if req.repair and planned + queued > 0:
                        fix = f"re-replication: {planned} copies scheduled, {queued} already in progress"
                    rep.problem("replication", f"{under - lost} blocks under-replicated", fix)
                if lost:
                    rep.problem("replication", f"{lost} blocks lost: no replica on a live data server")
            over = self._over_replicated(tx, now)
            if over:
                fix = None
                if req.repair:
                    for block_id in over:
                        self._settle(tx, block_id, now)
                    fix = f"copies beyond the replica count of {len(over)} blocks sent to garbage"
                rep.problem("replication", f"{len(over)} blocks over-replicated", fix)
            if req.repair:
                # Check the block maps against the disks too: every live server reports
                # what it holds at its next heartbeat (reconciled as in repair.py).
                tx.run("UPDATE servers SET report_wanted_ns = COALESCE(report_wanted_ns, ?)", (now,))
            inodes = tx.scalar("SELECT COUNT(*) FROM inodes")
        if rep.problems:
            log.warning("fsck: %d problems, %d repaired", len(rep.problems), len(rep.repaired))
        return FsckReply(
            problems=rep.problems, repaired=rep.repaired, inodes=inodes, blocks=blocks,
            under_replicated=under, lost=lost,
        )

    # ------------------------------------------------------------------ namespace

    def _fsck_dentries(self, tx: Tx, rep: _Report) -> None:
        rows = tx.all(
            "SELECT d.cookie, d.parent, d.name, d.ino, i.ino IS NULL AS no_inode,"
            " p.ino IS NULL AS no_parent, p.mode AS parent_mode FROM dentries d"
            " LEFT JOIN inodes i ON i.ino = d.ino LEFT JOIN inodes p ON p.ino = d.parent"
            " WHERE i.ino IS NULL OR p.ino IS NULL OR (p.mode & 61440) != 16384"
        )
        for r in rows:
            if r["no_inode"]:
                why = f"names missing inode {r['ino']}"
            elif r["no_parent"]:
                why = f"is held by missing directory {r['parent']}"
            else:
                why = f"is held by inode {r['parent']}, which is not a directory"
            fix = None
            if rep.repair:
                tx.run("DELETE FROM dentries WHERE cookie = ?", (r["cookie"],))
                fix = f"removed entry {bytes(r['name'])!r} in {r['parent']}"
            rep.problem("entries", f"entry {bytes(r['name'])!r} in {r['parent']} {why}", fix)

    def _fsck_dirs(self, tx: Tx, rep: _Report) -> None:
        rows = tx.all(
            "SELECT i.ino, i.parent, i.nlink, (SELECT COUNT(*) FROM dentries d WHERE d.ino = i.ino) AS names,"
            " (SELECT d.parent FROM dentries d WHERE d.ino = i.ino ORDER BY d.cookie LIMIT 1) AS holder"
            " FROM inodes i WHERE (i.mode & 61440) = 16384"
        )
        for r in rows:
            ino = r["ino"]
            if ino == ROOT_INODE:
                if r["parent"] != ROOT_INODE:
                    fix = None
                    if rep.repair:
                        tx.run("UPDATE inodes SET parent = ? WHERE ino = ?", (ROOT_INODE, ROOT_INODE))
                        fix = "root: parent set to itself"
                    rep.problem("directories", f"root's parent is {r['parent']}", fix)
                if r["names"]:
                    fix = None
                    if rep.repair:
                        tx.run("DELETE FROM dentries WHERE ino = ?", (ROOT_INODE,))
                        fix = "removed entries naming the root"
                    rep.problem("directories", f"{r['names']} entries name the root", fix)
                continue
            if r["names"] > 1:
                fix = None
                if rep.repair:
                    tx.run(
                        "DELETE FROM dentries WHERE ino = ? AND cookie != (SELECT MIN(cookie) FROM dentries"
                        " WHERE ino = ?)",
                        (ino, ino),
                    )
                    fix = f"directory {ino}: kept its oldest entry only"
                rep.problem("directories", f"directory {ino} has {r['names']} entries (hard-linked)", fix)
            if r["names"] and r["parent"] != r["holder"]:
                fix = None
                if rep.repair:
                    tx.run("UPDATE inodes SET parent = ? WHERE ino = ?", (r["holder"], ino))
                    fix = f"directory {ino}: parent set to {r['holder']}"
                rep.problem(
                    "directories", f"directory {ino} has parent {r['parent']} but sits in {r['holder']}", fix
                )
            if not r["names"] and r["nlink"] and tx.scalar("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (ino,)):
                # Its entries would dangle if it were purged; re-attaching is a human's call.
                rep.problem("directories", f"directory {ino} is unreachable but not empty")

    def _fsck_nlink(self, tx: Tx, rep: _Report, now: int) -> None:
        rows = tx.all(
            "SELECT i.ino, i.mode, i.nlink,"
            " (SELECT COUNT(*) FROM dentries d WHERE d.ino = i.ino) AS names,"
            " (SELECT COUNT(*) FROM dentries d JOIN inodes c ON c.ino = d.ino"
            "   WHERE d.parent = i.ino AND (c.mode & 61440) = 16384) AS subdirs"
            " FROM inodes i"
        )
        for r in rows:
            ino = r["ino"]
            if is_dir(r):
                reachable = ino == ROOT_INODE or r["names"] > 0
                if not reachable and r["subdirs"] + (
                    tx.scalar("SELECT COUNT(*) FROM dentries WHERE parent = ?", (ino,)) or 0
                ):
                    continue  # reported by _fsck_dirs
                want = 2 + r["subdirs"] if reachable else 0
            else:
                want = r["names"]
            if r["nlink"] == want:
                continue
            fix = None
            if rep.repair:
                tx.run("UPDATE inodes SET nlink = ? WHERE ino = ?", (want, ino))
                fix = f"inode {ino}: nlink set to {want}"
            rep.problem("links", f"inode {ino} has nlink {r['nlink']}, expected {want}", fix)

    def _fsck_xattr_counts(self, tx: Tx, rep: _Report) -> None:
        # Clients answer getxattr from this count when it is 0: a wrong count hides xattrs.
        rows = tx.all(
            "SELECT i.ino, i.xattrs, (SELECT COUNT(*) FROM xattrs x WHERE x.ino = i.ino) AS actual"
            " FROM inodes i WHERE i.xattrs != (SELECT COUNT(*) FROM xattrs x WHERE x.ino = i.ino)"
        )
        for r in rows:
            fix = None
            if rep.repair:
                tx.run("UPDATE inodes SET xattrs = ? WHERE ino = ?", (r["actual"], r["ino"]))
                fix = f"inode {r['ino']}: xattr count set to {r['actual']}"
            rep.problem("xattrs", f"inode {r['ino']} counts {r['xattrs']} xattrs, has {r['actual']}", fix)

    def _fsck_usage(self, tx: Tx, rep: _Report) -> None:
        # After the entry and link repairs above: the counters must match what is there.
        files, size = counted_usage("p")
        rows = tx.all(
            f"SELECT * FROM (SELECT p.ino, p.used_files, p.used_bytes, {files} AS files, {size} AS bytes"
            " FROM inodes p WHERE (p.mode & 61440) = 16384) x"
            " WHERE x.used_files != x.files OR x.used_bytes != x.bytes"
        )
        for r in rows:
            fix = None
            if rep.repair:
                tx.run("UPDATE inodes SET used_files = ?, used_bytes = ? WHERE ino = ?",
                       (int(r["files"]), int(r["bytes"]), r["ino"]))
                fix = f"directory {r['ino']}: usage set to {r['files']} files, {r['bytes']} bytes"
            rep.problem("usage", f"directory {r['ino']} counts {r['used_files']} files, {r['used_bytes']} bytes;"
                        f" holds {r['files']}, {r['bytes']}", fix)

    def _fsck_orphans(self, tx: Tx, rep: _Report, now: int) -> None:
        stale_opens = tx.all(
            "SELECT o.session_id, o.ino FROM opens o LEFT JOIN sessions s ON s.session_id = o.session_id"
            " WHERE s.session_id IS NULL"
        )
        for r in stale_opens:
            fix = None
            if rep.repair:
                tx.run("DELETE FROM opens WHERE session_id = ? AND ino = ?", (r["session_id"], r["ino"]))
                fix = f"dropped open of inode {r['ino']} by unknown session {r['session_id']}"
            rep.problem("opens", f"inode {r['ino']} is open by unknown session {r['session_id']}", fix)
        # (Not those the sweep will purge: base.py `_purge_if_free`, an unlinked file with
        # blocks waits unlinked_hold_s for readers whose opens were not recorded.)
        orphans = tx.all(
            "SELECT ino FROM inodes WHERE nlink = 0 AND ino != ? AND NOT EXISTS"
            " (SELECT 1 FROM opens o WHERE o.ino = inodes.ino) AND NOT EXISTS"
            " (SELECT 1 FROM dentries d WHERE d.ino = inodes.ino) AND (ctime_ns <= ? OR NOT EXISTS"
            " (SELECT 1 FROM blocks b WHERE b.ino = inodes.ino))",
            (ROOT_INODE, self._hold_cutoff_ns(now)),
        )
        for r in orphans:
            fix = None
            if rep.repair:
                self._purge(tx, [r["ino"]], now)
                fix = f"purged orphan inode {r['ino']}"
            rep.problem("orphans", f"inode {r['ino']} has no links and is not open", fix)

    # ------------------------------------------------------------------ blocks

    def _fsck_blocks(self, tx: Tx, rep: _Report, now: int) -> None:
        for r in tx.all(
            "SELECT b.block_id, b.ino FROM blocks b LEFT JOIN inodes i ON i.ino = b.ino WHERE i.ino IS NULL"
        ):
            fix = None
            if rep.repair:
                self._garbage_committed(tx, r["block_id"], now)
                fix = f"block {r['block_id']}: sent to garbage"
            rep.problem("blocks", f"block {r['block_id']} belongs to missing inode {r['ino']}", fix)
        for table in ("replicas", "garbage", "pending_servers", "replication"):
            rows = tx.all(
                f"SELECT t.block_id, t.server_id FROM {table} t LEFT JOIN servers s ON s.server_id = t.server_id"
                " WHERE s.server_id IS NULL"
            )
            for r in rows:
                fix = None
                if rep.repair:
                    tx.run(f"DELETE FROM {table} WHERE block_id = ? AND server_id = ?", (r["block_id"], r["server_id"]))
                    fix = f"{table}: dropped block {r['block_id']} on unknown server {r['server_id']}"
                rep.problem(table, f"{table}: block {r['block_id']} on unknown server {r['server_id']}", fix)
        cutoff = now - int(self.pending_timeout_s * NS_PER_S)
        for r in tx.all("SELECT block_id, ino FROM pending WHERE created_ns < ?", (cutoff,)):
            fix = None
            if rep.repair:
                self._garbage_pending(tx, r["block_id"], now)
                fix = f"allocation of block {r['block_id']}: abandoned, sent to garbage"
            rep.problem(
                "pending", f"block {r['block_id']} allocated to inode {r['ino']} past the pending timeout", fix
            )

    def _fsck_inline(self, tx: Tx, rep: _Report) -> None:
        rows = tx.all(
            "SELECT n.ino, n.data, n.crc32c, i.mode, i.block_size,"
            " EXISTS (SELECT 1 FROM blocks b WHERE b.ino = n.ino AND b.idx = 0) AS has_block0"
            " FROM inline_data n JOIN inodes i ON i.ino = n.ino"
        )
        for r in rows:
            ino, data = r["ino"], bytes(r["data"])
            if not is_reg(r) or r["has_block0"] or not data:
                why = ("is not a regular file" if not is_reg(r) else
                       "also has a stored block 0" if r["has_block0"] else "is empty")
                fix = None
                if rep.repair:
                    # A stored block 0 is replicated and checked: it is the one to keep.
                    tx.run("DELETE FROM inline_data WHERE ino = ?", (ino,))
                    fix = f"inode {ino}: inline block 0 dropped"
                rep.problem("inline", f"inode {ino} has an inline block 0 but {why}", fix)
                continue
            if len(data) > r["block_size"]:
                rep.problem("inline", f"inode {ino}: inline block 0 of {len(data)} bytes exceeds its block size")
            if crc32c.crc32c(data) != r["crc32c"]:
                rep.problem("inline", f"inode {ino}: inline block 0 fails its checksum (lost: no other copy)")
