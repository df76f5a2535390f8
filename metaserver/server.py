"""The metadata server process: command line, gRPC serving, the sweep thread, signals.

With the default engine (--engine sqlite) all state is under --dir: the database
(meta.db) and the key of block write tokens (token.key, made on first start, handed to
data servers when they register). With --engine postgres the database is at --dsn and
shared by any number of metaservers: the token key is kept in it too (every metaserver
must sign with the same one), and --dir holds only what is this process's own. Either
way the process holds a meta credential (--credentials, proto/credentials.py).

Background duties (the sweep: session expiry, abandoned allocations, garbage, re-
replication planning, request-record cleanup) run on one metaserver of a store at a time:
every SWEEP_INTERVAL_S each beats (store.beat), and the one holding the duties' lease
(DUTIES_LEASE_S, on the database's clock) sweeps. A holder that dies or hangs loses
them to another within the lease.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import threading
from pathlib import Path
from typing import Optional

from stripefs.proto import frames, metrics
from stripefs.proto.auth import TOKEN_KEY_BYTES, load_token_key
from stripefs.proto.credentials import META, load_credentials
from stripefs.proto.errors import FsError
from stripefs.proto.logsetup import announce_ready, hold_stop_signals, setup_logging, wait_for_stop
from stripefs.proto.messages import Empty
from stripefs.proto.rpc import serve
from stripefs.proto.services import META_METHODS, META_SERVICE

from .base import UNLINKED_HOLD_S
from .core import MetaCore
from .store import ENGINES, DutiesLost, open_store

log = logging.getLogger("stripefs.metaserver")

DB_NAME = "meta.db"
TOKEN_KEY_NAME = "token.key"
#: How often the sweep (session expiry, abandoned allocations, re-replication planning) runs.
SWEEP_INTERVAL_S = 1.0
#: The background duties' lease: a holder silent this long (dead, stopped, cut off from
#: the database) loses them to the next metaserver that beats. Several sweeps long, so a
#: slow sweep on a loaded machine does not hand them back and forth.
DUTIES_LEASE_S = 5.0
#: How long in-flight calls may finish after SIGTERM.
STOP_GRACE_S = 2.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stripefs.metaserver", description="stripefs metadata server")
    p.add_argument("--listen", default="127.0.0.1:7100", help="HOST:PORT to serve on (port 0: any free port)")
    p.add_argument("--dir", required=True,
                   help="state directory (created if missing); with --engine sqlite the database is DIR/meta.db")
    p.add_argument("--engine", choices=ENGINES, default="sqlite",
                   help="metadata database: sqlite (one file, one metaserver) or postgres (shared by several)")
    p.add_argument("--dsn", help="--engine postgres: the database, as a libpq connection string"
                                 " (e.g. 'host=/run/pg dbname=stripefs user=stripefs')")
    p.add_argument("--credentials", required=True,
                   help="credential bundle of this metaserver (stripefs credential new --role meta)")
    p.add_argument("--revoked", help="file of revoked credential names to refuse (stripefs credential revoke)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="connections held at most, more refused (default: half the descriptor limit, <= 4096)")
    frames.add_argument(p)
    p.add_argument("--ready-file", help="after binding, write HOST:PORT here (atomically)")
    p.add_argument("--log-file", help="log here instead of stderr")
    p.add_argument("--log-level", default="INFO")
    metrics.add_arguments(p)
    p.add_argument("--server-suspect-after-s", type=float, default=3.0,
                   help="a data server silent this long is suspect: no new blocks, its replicas still count")
    p.add_argument("--server-dead-after-s", type=float, default=10.0,
                   help="a data server silent this long is dead: its blocks are re-replicated elsewhere")
    p.add_argument("--session-lease-s", type=float, default=30.0,
                   help="client session lease; sessions silent for 3 leases are closed")
    p.add_argument("--gc-grace-s", type=float, default=30.0,
                   help="delay before a replaced or deleted block is handed out for deletion")
    p.add_argument("--unlinked-hold-s", type=float, default=UNLINKED_HOLD_S,
                   help="a file with blocks is purged no sooner than this after its last link goes, so that"
                   " readers whose opens went unrecorded keep it (0: every open of such a file is recorded)")
    p.add_argument("--pending-timeout-s", type=float, default=600.0,
                   help="an allocation not committed within this long is abandoned (its blocks become garbage)")
    p.add_argument("--reserve-bytes", type=int, default=0,
                   help="a data server with less free space than this (and never less than 2 blocks) gets no new blocks")
    p.add_argument("--replication-per-heartbeat", type=int, default=8,
                   help="re-replication tasks in flight per target data server (the repair rate bound)")
    p.add_argument("--replication-timeout-s", type=float, default=60.0,
                   help="a re-replication task not reported within this long is planned again")
    p.add_argument("--server-forget-after-s", type=float, default=86400.0,
                   help="a data server silent this long is removed from the registry (it registers anew if it returns)")
    return p.parse_args(argv)


def _sweep_loop(core: MetaCore, address: str, stop: threading.Event) -> None:
    held = False
    while True:
        try:
            # Operations that are not durable on return become durable here, within
            # SWEEP_INTERVAL_S (see the store: the journal-commit interval of the metadata).
            core.store.checkpoint()
            holds = core.beat(address, DUTIES_LEASE_S)
            if holds != held:
                log.info("background duties: %s", "taken by this metaserver" if holds else f"held by {core.duties}")
                held = holds
            done = core.sweep() if holds else {}
        except DutiesLost as exc:
            log.info("background duties: taken over by %s during a sweep, which stopped", exc)
            held, done = False, {}
        except Exception:  # noqa: BLE001 - housekeeping must keep running
            log.exception("sweep failed")
            done = {}
        if any(done.values()):
            log.info("sweep: %s", ", ".join(f"{k}={v}" for k, v in done.items()))
            for duty, items in done.items():
                metrics.meta_duties().labels(duty).inc(items)
        if stop.wait(SWEEP_INTERVAL_S):
            return


def main(argv: Optional[list[str]] = None) -> int:
    hold_stop_signals()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_file, args.log_level)
    state = Path(args.dir)
    state.mkdir(parents=True, exist_ok=True)
    try:
        creds = load_credentials(args.credentials)
    except FsError as exc:
        log.error("cannot start: %s", exc.message)
        return 1
    if creds.role != META:
        log.error("cannot start: %s holds a %s credential, not a metaserver's", args.credentials, creds.role)
        return 1
    if args.engine == "postgres" and not args.dsn:
        log.error("cannot start: --engine postgres needs --dsn")
        return 1
    try:
        store = open_store(args.engine, args.dsn if args.engine == "postgres" else str(state / DB_NAME))
    except Exception as exc:  # noqa: BLE001 - say why and stop, not a traceback
        log.error("cannot start: the %s metadata database: %s", args.engine, exc)
        return 1
    if args.engine == "postgres":
        token_key = store.setting("token_key", lambda: secrets.token_bytes(TOKEN_KEY_BYTES))
    else:
        token_key = load_token_key(state / TOKEN_KEY_NAME, create=True)
    core = MetaCore(
        store,
        token_key,
        server_suspect_after_s=args.server_suspect_after_s,
        server_dead_after_s=args.server_dead_after_s,
        session_lease_s=args.session_lease_s,
        gc_grace_s=args.gc_grace_s,
        unlinked_hold_s=args.unlinked_hold_s,
        pending_timeout_s=args.pending_timeout_s,
        reserve_bytes=args.reserve_bytes,
        replication_per_heartbeat=args.replication_per_heartbeat,
        replication_timeout_s=args.replication_timeout_s,
        server_forget_after_s=args.server_forget_after_s,
    )
    stop = threading.Event()
    try:
        server, port = serve(META_SERVICE, META_METHODS, core, creds, args.listen, revoked=args.revoked,
                             max_connections=args.max_connections, frames_port=args.frames_port)
    except BaseException:
        core.close()
        raise
    host = args.listen.rsplit(":", 1)[0]
    sweeper: Optional[threading.Thread] = None
    try:  # from here on, whatever happens, the server is stopped and the store closed
        if args.metrics_listen:
            metrics.meta_status(lambda: core.status(Empty()))
            metrics.meta_duties()
            if not metrics.start_for_server(args):
                return 1
        if not announce_ready(args.ready_file, f"{host}:{port}"):
            return 1
        log.info("metaserver %s serving on %s:%d, %s metadata, state in %s", core.name, host, port, args.engine,
                 state)
        sweeper = threading.Thread(target=_sweep_loop, args=(core, f"{host}:{port}", stop), name="sweep",
                                   daemon=True)
        sweeper.start()
        log.info("got %s, stopping", wait_for_stop())
    finally:
        stop.set()
        server.stop(STOP_GRACE_S)
        if sweeper is not None:
            sweeper.join()
        core.close()
    log.info("metaserver stopped")
    return 0
