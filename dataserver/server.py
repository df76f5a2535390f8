"""The data server process: command line, gRPC server, and the registration/heartbeat
loop with the metaserver; the scrubber (scrub.py) and the re-replication workers
(replicate.py) run beside it.

The heartbeat loop runs on one background thread. It registers (retrying with backoff
until a metaserver answers), then heartbeats every interval with the store's counters
and the blocks found corrupt since the last beat. A heartbeat reply names garbage blocks
(deleted and reported back), replication tasks (handed to the Replicator, whose results
go back with the next beat) and may ask for a full block report (sent in chunks). Every
report that fails is retried with the next beat, so the metaserver eventually hears of
every deletion, copy and corrupt block. A metaserver outage is logged once when it
starts and once when it ends. Given several metaservers (`--meta a:p,b:p`), all of them
serving every data server, it talks to one and moves to the next when that one fails
(proto/rpc.py FailoverStub): the failed call is retried there with the next beat.

Signals: SIGTERM and SIGINT are blocked in every thread and taken synchronously by the
main thread with sigwait, so no handler ever runs in the middle of a lock.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import threading
from pathlib import Path
from typing import Optional, cast

from stripefs.proto import frames, malloc, metrics
from stripefs.proto.credentials import load_credentials
from stripefs.proto.errors import FsError
from stripefs.proto.logsetup import announce_ready, hold_stop_signals, setup_logging, wait_for_stop
from stripefs.proto.messages import BlockReportReq, DeletedReq, HeartbeatReq, RegisterReq, ReplicatedReq
from stripefs.proto.rpc import FailoverStub, parse_addresses, serve
from stripefs.proto.services import DATA_METHODS, DATA_SERVICE, META_METHODS, META_SERVICE

from .replicate import DEFAULT_REPLICATION_WORKERS, Replicator
from .scrub import DEFAULT_SCRUB_INTERVAL_S, DEFAULT_SCRUB_RATE_MIB_S, Scrubber
from .service import DataService
from .store import BlockStore

log = logging.getLogger("stripefs.dataserver")

REGISTER_BACKOFF_MIN_S = 0.2
REGISTER_BACKOFF_MAX_S = 2.0
#: Used when the metaserver answers a heartbeat interval that makes no sense.
FALLBACK_HEARTBEAT_INTERVAL_S = 3.0
META_CALL_TIMEOUT_S = 5.0
#: A heartbeat given up after this many heartbeat intervals (never less than
#: META_CALL_FLOOR_S, never more than META_CALL_TIMEOUT_S), so that with several
#: metaservers a hung one is left, and the next beat lands on another, before this server
#: has been silent long enough to look dead (suspect after 3 intervals by default).
META_CALL_INTERVALS = 3
META_CALL_FLOOR_S = 1.0
#: In-flight block reads and writes get this long to finish on SIGTERM.
STOP_GRACE_S = 5.0
#: Block ids per block_report call.
BLOCK_REPORT_CHUNK = 50_000
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def parse_address(value: str) -> str:
    """HOST:PORT (HOST may be a bracketed IPv6 address); returned unchanged if well-formed."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


def parse_meta_addresses(value: str) -> str:
    """HOST:PORT[,HOST:PORT...]: the metaservers; returned unchanged if well-formed."""
    try:
        parse_addresses(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stripefs.dataserver", description="stripefs data server")
    p.add_argument("--listen", required=True, type=parse_address, help="HOST:PORT to serve on (port 0 picks one)")
    p.add_argument("--meta", required=True, type=parse_meta_addresses,
                   help="metaserver HOST:PORT, or several: HOST:PORT,HOST:PORT,...")
    p.add_argument("--dir", required=True, help="data directory")
    p.add_argument("--credentials", required=True,
                   help="credential bundle of this data server (stripefs credential new --role data)")
    p.add_argument("--revoked", default=None, help="file of revoked credential names to refuse")
    p.add_argument("--max-connections", type=int, default=None,
                   help="connections held at most, more refused (default: half the descriptor limit, <= 4096)")
    frames.add_argument(p)
    p.add_argument(
        "--advertise",
        type=parse_address,
        default=None,
        help="HOST:PORT clients should use (default: the listen host with the bound port); clients"
             " reach its framed port on the same HOST with --frames-port's number: fix it and map it alike",
    )
    p.add_argument("--ready-file", default=None, help='write "HOST:PORT\\n" of the advertised address here once serving')
    p.add_argument("--log-file", default=None, help="log here instead of stderr")
    p.add_argument(
        "--heartbeat-interval-s",
        type=_positive_float,
        default=None,
        help="seconds between heartbeats (default: what the metaserver says at registration)",
    )
    p.add_argument(
        "--scrub-rate-mib-s",
        type=float,
        default=DEFAULT_SCRUB_RATE_MIB_S,
        help="re-verify stored blocks at most this fast in the background (0: no scrubbing)",
    )
    p.add_argument(
        "--scrub-interval-s",
        type=float,
        default=DEFAULT_SCRUB_INTERVAL_S,
        help="least time between the starts of two full scrub passes",
    )
    p.add_argument(
        "--replication-workers",
        type=int,
        default=DEFAULT_REPLICATION_WORKERS,
        help="blocks copied at once for re-replication",
    )
    metrics.add_arguments(p)
    return p


def advertised_address(listen: str, port: int, advertise: Optional[str]) -> str:
    if advertise:
        return advertise
    host = listen.rpartition(":")[0]
    # Nobody can connect to a wildcard address from another machine: name this host instead.
    if host in _WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"{host}:{port}"


class Heartbeater:
    """Registers with the metaserver and heartbeats until `stop` is set."""

    def __init__(
        self,
        store: BlockStore,
        meta: FailoverStub,
        address: str,
        stop: threading.Event,
        interval_s: Optional[float] = None,
        replicator: Optional[Replicator] = None,
        service: Optional[DataService] = None,
    ) -> None:
        self.store = store
        self.service = service  # gets the token key the metaserver answers registration with
        self.replicator = replicator
        self.meta = meta
        self.address = address
        self.stop = stop
        self._interval_override_s = interval_s
        self.interval_s = interval_s or FALLBACK_HEARTBEAT_INTERVAL_S
        self.server_id: Optional[int] = None
        self._meta_down = False
        self._unreported: list[int] = []  # deleted blocks the metaserver has not heard of yet
        self._verified: list[int] = []  # blocks checked on the metaserver's request, not reported yet
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        if self.thread.is_alive():  # not when the server stopped before starting it
            self.thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                if self.server_id is None:
                    self._register()
                    continue
                if self.stop.wait(self.interval_s):
                    break
                self._beat()
        except Exception:  # noqa: BLE001 - the data server keeps serving reads without it
            log.exception("heartbeat thread failed")

    def _call(self, name: str, req, timeout: float = META_CALL_TIMEOUT_S):
        address = self.meta.address
        try:
            reply = self.meta.call(name, req, timeout=timeout)
        except FsError as exc:
            if not self._meta_down:
                log.warning("metaserver %s: %s failed: %s (retrying)", address, name, exc)
                self._meta_down = True
            raise
        if self._meta_down:
            log.info("metaserver %s answers again", self.meta.address)
            self._meta_down = False
        return reply

    def _register(self) -> None:
        delay_s = REGISTER_BACKOFF_MIN_S
        while not self.stop.is_set():
            st = self.store.stats()
            req = RegisterReq(
                address=self.address,
                node_id=self.store.node_id,
                capacity_bytes=st.capacity_bytes,
                free_bytes=st.free_bytes,
                blocks=st.blocks,
            )
            try:
                reply = self._call("register", req)
            except FsError:
                self.stop.wait(delay_s)
                delay_s = min(delay_s * 2, REGISTER_BACKOFF_MAX_S)
                continue
            self.server_id = reply.server_id
            if self.service is not None and reply.token_key:
                self.service.token_key = reply.token_key
            if self._interval_override_s is None:
                given = reply.heartbeat_interval_s
                ok = isinstance(given, (int, float)) and not isinstance(given, bool) and given > 0
                self.interval_s = float(given) if ok else FALLBACK_HEARTBEAT_INTERVAL_S
            log.info(
                "registered with metaserver %s as server %s, heartbeat every %.3g s",
                self.meta.address, self.server_id, self.interval_s,
            )
            return

    def _beat(self) -> None:
        assert self.server_id is not None
        st = self.store.stats()
        corrupt = self.store.take_corrupt()
        verified, self._verified = self._verified, []
        req = HeartbeatReq(
            server_id=self.server_id,
            capacity_bytes=st.capacity_bytes,
            free_bytes=st.free_bytes,
            blocks=st.blocks,
            used_bytes=st.used_bytes,
            corrupt=corrupt,
            verified=verified,
        )
        try:
            patience = min(META_CALL_TIMEOUT_S, max(META_CALL_FLOOR_S, META_CALL_INTERVALS * self.interval_s))
            reply = self._call("heartbeat", req, patience)
        except FsError as exc:
            self.store.return_corrupt(corrupt)
            self._verified = verified + self._verified
            # EIO is the transport (or a metaserver fault): keep beating. Any other errno
            # means the metaserver answered and refused us, so introduce ourselves again.
            if exc.errno != errno.EIO:
                self.server_id = None
            return
        problem = reply.valid()
        if problem:
            self.store.return_corrupt(corrupt)
            log.warning("ignoring malformed heartbeat reply: %s", problem)
            return
        self._delete_garbage(reply.delete)
        self._check(reply.verify, reply.verify_digests or [b""] * len(reply.verify))
        if self.replicator is not None:
            if reply.replicate:
                self.replicator.submit(reply.replicate)
            self._report_copies()
        if reply.block_report:
            self._send_block_report()
        if reply.reregister:
            log.info("metaserver asks this server to register again")
            self.server_id = None

    def _delete_garbage(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            try:
                self.store.delete(block_id)
            except FsError as exc:
                log.warning("cannot delete garbage block %r: %s", block_id, exc)
                continue
            self._unreported.append(block_id)
        if block_ids:
            log.info("deleted %d garbage blocks", len(block_ids))
        if self._unreported:
            assert self.server_id is not None  # (called from _beat, registered)
            try:
                self._call("blocks_deleted", DeletedReq(server_id=self.server_id, block_ids=self._unreported))
            except FsError:
                pass  # kept in _unreported: the next beat tries again
            else:
                self._unreported = []

    def _check(self, block_ids: list[int], digests: list[bytes]) -> None:
        """Copies a client found bad: check them here, against our checksums and the
        writer's digest (a bad one is moved aside and goes out with the next beat's corrupt
        list) and say they were checked."""
        for block_id, digest in zip(block_ids, digests):
            try:
                result = self.store.check(block_id, digest)
            except FsError as exc:  # a malformed id from the metaserver
                log.warning("cannot check block %r: %s", block_id, exc)
                continue
            if result != "good":
                log.warning("block %d, reported bad by a client: %s here", block_id, result)
            self._verified.append(block_id)

    def _report_copies(self) -> None:
        assert self.replicator is not None and self.server_id is not None
        done, failed = self.replicator.take_results()
        if not done and not failed:
            return
        try:
            self._call("replicated", ReplicatedReq(server_id=self.server_id, block_ids=done, failed=failed))
        except FsError:
            self.replicator.give_back(done, failed)
            return
        log.info("re-replication: %d blocks copied, %d failed", len(done), len(failed))

    def _send_block_report(self) -> None:
        assert self.server_id is not None
        ids = cast(list[int], sorted(self.store.block_ids()))
        chunks = [ids[i : i + BLOCK_REPORT_CHUNK] for i in range(0, len(ids), BLOCK_REPORT_CHUNK)] or [[]]
        for k, chunk in enumerate(chunks):
            req = BlockReportReq(
                server_id=self.server_id, block_ids=chunk, first=k == 0, last=k == len(chunks) - 1
            )
            try:
                self._call("block_report", req)
            except FsError:
                return  # the metaserver asks again with a later beat
        log.info("sent a block report of %d blocks", len(ids))


def main(argv: list[str]) -> int:
    hold_stop_signals()
    args = build_parser().parse_args(argv)
    setup_logging(args.log_file)
    malloc.for_data_server()
    try:
        creds = load_credentials(args.credentials)
        store = BlockStore(Path(args.dir))
    except (OSError, ValueError, FsError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    if creds.role != "data":
        log.error("cannot start: %s holds a %s credential, not a data server's", args.credentials, creds.role)
        return 1
    service = DataService(store, creds)
    replicator = Replicator(store, creds, lambda: service.token_key, lambda: service.address,
                            max(1, args.replication_workers))
    try:
        server, port = serve(DATA_SERVICE, DATA_METHODS, service, creds, args.listen, revoked=args.revoked,
                             max_connections=args.max_connections, frames_port=args.frames_port)
    except (OSError, RuntimeError) as exc:
        log.error("cannot listen on %s: %s", args.listen, exc)
        return 1
    address = service.address = advertised_address(args.listen, port, args.advertise)
    stop = threading.Event()
    meta = FailoverStub(args.meta, creds, META_SERVICE, META_METHODS)
    heartbeater = Heartbeater(store, meta, address, stop, args.heartbeat_interval_s, replicator, service)
    scrubber = None
    if args.scrub_rate_mib_s > 0:
        scrubber = Scrubber(store, stop, args.scrub_rate_mib_s * 1024 * 1024, args.scrub_interval_s)
    try:  # from here on, whatever happens, the server is stopped and its threads joined
        if args.metrics_listen:
            metrics.data_store(store.stats, replicator.busy)
            metrics.data()
            if not metrics.start_for_server(args):
                return 1
        if not announce_ready(args.ready_file, address):
            return 1
        st = store.stats()
        log.info(
            "data server at %s (listening on %s, metaserver %s), dir %s, node_id %s, %d blocks",
            address, args.listen, args.meta, store.root, store.node_id, st.blocks,
        )
        heartbeater.start()
        if scrubber is not None:
            scrubber.start()
        log.info("got %s, stopping", wait_for_stop())
    finally:
        stop.set()
        server.stop(STOP_GRACE_S)
        heartbeater.join(META_CALL_TIMEOUT_S)
        if scrubber is not None:
            scrubber.join(META_CALL_TIMEOUT_S)
        replicator.close()
        service.close()
        meta.close()
    log.info("stopped")
    return 0
