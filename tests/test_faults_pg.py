"""Metadata on PostgreSQL with two metaservers, under faults, through real mounts.

- Metaserver failover: a mixed workload (creates with writes and fsync, checkpoint-style
  write+fsync+rename, renames, unlinks, mkdirs, reads) runs from two mounts, each
  starting at a different metaserver, while a metaserver is SIGKILLed 20 times at random
  instants (and restarted on its address), then one is SIGSTOPped for longer than the
  clients' hang bound and the duties' lease. No call fails (no EIO), every acknowledged
  file reads back as written (sha256 through a fresh mount), nothing is applied twice
  (the workload's ledger: a repeated create, rename or unlink would leave a file too many
  or too few), the background duties move to the other metaserver within their lease
  when their holder dies or stops, and fsck is clean.
- The database restarted mid-workload (`pg_ctl -m immediate`, then start): the
  metaservers reconnect by themselves and nothing acknowledged is lost.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from faults import MiB, fast_cluster, load_report, wait_fsck_clean, wait_for, wait_replicated
from test_faults_meta import OP_BOUND_S, start_workload, stop_workloads

pytestmark = [pytest.mark.mount, pytest.mark.allow_tracebacks, pytest.mark.timeout(420)]

KILLS = 20
#: Time a metaserver runs between its restart and the next kill, drawn uniformly.
UP_BETWEEN_KILLS_S = (0.3, 1.5)
#: Time it stays down after a kill, drawn uniformly.
DOWN_S = (0.0, 0.5)
#: How long a metaserver is stopped: past the clients' hang bound and the duties' lease.
STOPPED_S = 8.0
#: The duties' lease (metaserver/server.py DUTIES_LEASE_S) and the sweep interval: a new
#: holder is seen within both, plus the status call's own time.
DUTIES_MOVE_WITHIN_S = 5.0 + 1.0 + 4.0


def _duties(c) -> str:
    """The address of the metaserver holding the background duties, as status says."""
    return c.status().get("duties_address", "")


def _start_workloads(c, tmp_path: Path, mounts) -> list:
    procs = []
    for seed, m in zip((1, 2), mounts):
        root = m.path / f"w{seed}"
        root.mkdir()
        os.setxattr(root, "stripefs.block_size", str(MiB).encode())
        procs.append(start_workload(root, tmp_path, seed))
    return procs


def _finish(procs) -> None:
    for _, _, stop in procs:
        stop.touch()
    for p, _, _ in procs:
        assert p.wait(OP_BOUND_S) == 0, "workload failed or hung"


def _check_ledgers(procs, fresh, ops_floor: int) -> None:
    for seed, (_, out, _) in zip((1, 2), procs):
        ledger, doc = load_report(out)
        print(f"workload {seed}: ops {doc['ops']}, failures {doc['failed']}")
        assert not doc["corrupt"], doc["corrupt"]
        assert not doc["failed"], doc["failed"]
        assert sum(doc["ops"].values()) > ops_floor
        _, problems = ledger.verify(fresh.path / f"w{seed}")
        assert not problems, problems[:20]
        assert len(ledger.files) > 10


def test_two_metaservers_sigkill_and_sigstop_during_mixed_workload(tmp_path, postgres):
    c = fast_cluster(tmp_path / "cluster", meta_dsn=postgres.new_database(), metaservers=2)
    procs = []
    try:
        mounts = [c.mount(), c.mount()]  # each starts at its own metaserver
        procs = _start_workloads(c, tmp_path, mounts)
        rng = random.Random(4321)
        time.sleep(1.0)
        moves = []
        for i in range(KILLS):
            time.sleep(rng.uniform(*UP_BETWEEN_KILLS_S))
            k = rng.randrange(2)
            if i == KILLS // 2:
                # Kill the duties' holder and see them move to the other one.
                holder = _duties(c)
                k = c.meta_addrs.index(holder)
                c.metas[k].kill()
                t0 = time.monotonic()
                other = c.meta_addrs[1 - k]
                wait_for(lambda: _duties(c) == other, DUTIES_MOVE_WITHIN_S, "the duties move")
                moves.append(time.monotonic() - t0)
            else:
                c.metas[k].kill()
                time.sleep(rng.uniform(*DOWN_S))
            c.start_meta_k(k)
            assert all(p.poll() is None for p, _, _ in procs), "a workload ended by itself"
        # A hung metaserver: stopped, its connections still open. Clients move away after
        # their hang bound; the duties move after their lease if it held them.
        time.sleep(1.0)
        holder = _duties(c)
        k = c.meta_addrs.index(holder)
        c.metas[k].signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            other = c.meta_addrs[1 - k]
            wait_for(lambda: c.status_of(other).get("duties_address") == other, DUTIES_MOVE_WITHIN_S,
                     "the duties leave a stopped metaserver")
            moves.append(time.monotonic() - t0)
            time.sleep(max(0.0, STOPPED_S - (time.monotonic() - t0)))
            assert all(p.poll() is None for p, _, _ in procs), "a workload ended while a metaserver was stopped"
        finally:
            c.metas[k].signal(signal.SIGCONT)
        time.sleep(1.0)
        _finish(procs)
        print(f"duties moved in {', '.join(f'{s:.1f}' for s in moves)} s")
        fresh = c.mount()
        _check_ledgers(procs, fresh, KILLS)
        wait_replicated(c)
        wait_fsck_clean(c)
    finally:
        stop_workloads(procs)
        c.close()


def test_database_restart_mid_workload(tmp_path, postgres):
    c = fast_cluster(tmp_path / "cluster", meta_dsn=postgres.new_database(), metaservers=2)
    procs = []
    try:
        mounts = [c.mount(), c.mount()]
        procs = _start_workloads(c, tmp_path, mounts)
        time.sleep(2.0)
        for _ in range(2):
            postgres.restart("immediate")  # as a crash: no checkpoint, recovery from the WAL
            time.sleep(2.0)
            assert all(p.poll() is None for p, _, _ in procs), "a workload ended by itself"
        _finish(procs)
        fresh = c.mount()
        _check_ledgers(procs, fresh, 10)
        for proc in c.metas:
            assert proc.running(), "a metaserver died with its database"
        wait_fsck_clean(c)
    finally:
        stop_workloads(procs)
        c.close()
