"""Prometheus metrics of every role: the one home of their names, help texts, labels and
buckets (docs/metrics.md lists them all). A role started with `--metrics-listen HOST:PORT`
serves them at `http://HOST:PORT/metrics` (`serve_metrics`, prometheus_client's HTTP
server on a thread of its own: a scrape never runs on an event loop).

The metrics of a kind are made the first time a role asks for them (`rpc()`, `client()`,
`fuse()`, `meta_status(...)`, `data()`), so a process exports its own role's only, beside
prometheus_client's `process_*` (CPU seconds, resident memory, open descriptors) and
`python_*` (garbage collector) metrics. Updating a metric is a lock and an addition
(about a microsecond): cheap beside any call that is counted.

Labels are bounded sets: methods and FUSE operations (the tables in proto/services.py and
fs/fuse), results (`ok` or an errno name), data-server addresses and states. Never a path,
an inode or a uid.
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .atomic import write_atomically

log = logging.getLogger("stripefs.metrics")

#: Latency buckets (seconds): 100 us to 10 s, about three a decade.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
#: The metaserver's namespace and replication figures come from a whole `status` (a scan
#: of the inode table): a scrape reuses the last one while it is younger than this.
META_STATUS_MAX_AGE_S = 10.0


def result(exc: Optional[BaseException]) -> str:
    """The `result` label of a call: `ok`, or the errno's name (EIO for anything else)."""
    if exc is None:
        return "ok"
    code = getattr(exc, "errno", None)
    return errno.errorcode.get(code, "EIO") if isinstance(code, int) else "EIO"


def serve_metrics(listen: str) -> str:
    """Serve this process's metrics on `HOST:PORT` (port 0: any free one); the bound
    `HOST:PORT`. Raises OSError when the address cannot be bound."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--metrics-listen wants HOST:PORT, not {listen!r}")
    server, _ = start_http_server(int(port), addr=host.strip("[]"))
    bound = f"{host}:{server.server_port}"
    log.info("metrics on http://%s/metrics", bound)
    return bound


def add_arguments(parser: Any) -> None:
    """Every role's metrics options (an argparse parser)."""
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port)")
    parser.add_argument("--metrics-ready-file", metavar="FILE",
                        help="with --metrics-listen: write the bound HOST:PORT here once serving")


def start(args: Any) -> Optional[str]:
    """Serve metrics if the role was asked to (add_arguments); the bound address or None."""
    if not getattr(args, "metrics_listen", None):
        return None
    bound = serve_metrics(args.metrics_listen)
    if args.metrics_ready_file:
        write_atomically(args.metrics_ready_file, bound + "\n")
    return bound


def start_for_server(args: Any) -> bool:
    """`start` for a server: False, with the reason logged, when its metrics address cannot
    be served (taken, malformed); the server then stops, as for any other failure to start."""
    try:
        start(args)
    except (OSError, ValueError) as exc:
        log.error("cannot start: metrics on %s: %s", args.metrics_listen, exc)
        return False
    return True


# ---------------------------------------------------------------------------- every server


class CallMetrics:
    """A counter by (labels..., result) and a latency histogram by (labels...), with the
    labelled children kept: prometheus_client's labels() costs several microseconds a call,
    the dictionary lookup here a fraction of one."""

    def __init__(self, calls: Counter, seconds: Histogram) -> None:
        self.calls = calls
        self.seconds = seconds
        self._children: dict[tuple, tuple[Any, Any]] = {}

    def observe(self, labels: tuple[str, ...], outcome: Optional[BaseException], started: float) -> None:
        """One call ended (`outcome`: the exception it ended with, or None) after
        starting at `started` (time.perf_counter())."""
        key = (*labels, result(outcome))
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.calls.labels(*key), self.seconds.labels(*labels))
        children[0].inc()
        children[1].observe(time.perf_counter() - started)


@dataclass(frozen=True)
class RpcMetrics:
    calls: CallMetrics
    durability_wait: Histogram
    stream_messages: Counter

    def observe(self, service: str, method: str, outcome: Any, started: float) -> None:
        """One call answered: `outcome` the reply or the FsError it ended with."""
        self.calls.observe((service, method), outcome if isinstance(outcome, BaseException) else None, started)


@functools.cache
def rpc() -> RpcMetrics:
    return RpcMetrics(
        CallMetrics(
            Counter("stripefs_rpc_requests", "Calls a server answered, by method and result (ok or errno name)",
                    ["service", "method", "result"]),
            Histogram("stripefs_rpc_seconds", "Time from a call's arrival (decoded) to its reply, by method",
                      ["service", "method"], buckets=LATENCY_BUCKETS)),
        Histogram("stripefs_rpc_durability_wait_seconds",
                  "Time replies of durable metadata operations waited for their fsync (group commit)",
                  ["service"], buckets=LATENCY_BUCKETS),
        Counter("stripefs_rpc_stream_messages",
                "Messages of the multiplexed streams, received (each a batch of calls) and sent (of replies)",
                ["service", "direction"]),
    )


# ---------------------------------------------------------------------------- clients (mount, library)


class _Clients:
    """The live clients of this process, summed by the gauges at scrape time."""

    def __init__(self) -> None:
        self._clients: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, client: Any) -> None:
        with self._lock:
            self._clients.add(client)

    def sum(self, fn: Callable[[Any], int]) -> int:
        with self._lock:
            clients = list(self._clients)
        return sum(fn(c) for c in clients)


@dataclass(frozen=True)
class ClientMetrics:
    meta_calls: CallMetrics
    read_bytes: Counter
    written_bytes: Counter
    cache_hits: Counter
    cache_misses: Counter
    clients: _Clients


@functools.cache
def client() -> ClientMetrics:
    clients = _Clients()
    for name, doc, fn in (
        ("stripefs_client_block_cache_bytes", "Bytes of blocks in the clients' block caches (readahead lands here)",
         lambda c: c.data.cache.used_bytes),
        ("stripefs_client_writeback_bytes", "Bytes written and not yet uploaded (write-back buffers)",
         lambda c: c._budget.used_bytes),
        ("stripefs_client_writeback_limit_bytes", "The write-back budget: a writer past it waits",
         lambda c: c._budget.limit_bytes),
        ("stripefs_client_fetches_in_flight", "Blocks being fetched from data servers (reads and readahead)",
         lambda c: len(c.data._fetching)),
        ("stripefs_client_open_files", "Files open through the clients", lambda c: len(c._files)),
        ("stripefs_client_maps_reused", "Opens whose reply left the block map out, the client's standing (a running count)",
         lambda c: c.maps.reused),
        ("stripefs_client_prefetch_held_bytes", "Bytes fetched ahead by prefetch plans and not yet read",
         lambda c: c.data.prefetched.used_bytes),
        ("stripefs_client_prefetch_waiting_paths", "Paths of prefetch plans not yet started",
         lambda c: c.prefetcher.status().waiting),
        ("stripefs_client_disk_tier_bytes", "Bytes of blocks kept in the clients' local disk tiers",
         lambda c: c.data.disk.used_bytes if c.data.disk is not None else 0),
        ("stripefs_client_disk_tier_hits", "Blocks read from the local disk tiers (a running count)",
         lambda c: c.data.disk.hits if c.data.disk is not None else 0),
        ("stripefs_client_disk_tier_corrupt", "Blocks found damaged in the local disk tiers and fetched again (a running count)",
         lambda c: c.data.disk.corrupt if c.data.disk is not None else 0),
        ("stripefs_client_staged_bytes", "Bytes of checkpoint files staged on local disk and not yet uploaded",
         lambda c: c.stager.used_bytes if c.stager is not None else 0),
        ("stripefs_client_staged_files", "Checkpoint files staged on local disk and not yet uploaded",
         lambda c: len(c.stager.files) if c.stager is not None else 0),
        ("stripefs_client_staged_uploaded_bytes", "Bytes of staged checkpoint files uploaded (a running count)",
         lambda c: c.stager.uploaded_bytes if c.stager is not None else 0),
    ):
        Gauge(name, doc).set_function(functools.partial(clients.sum, fn))
    return ClientMetrics(
        CallMetrics(
            Counter("stripefs_client_meta_calls", "Metadata calls made, by method and result", ["method", "result"]),
            Histogram("stripefs_client_meta_call_seconds", "Metadata call time seen by the client, retries included",
                      ["method"], buckets=LATENCY_BUCKETS)),
        Counter("stripefs_client_read_bytes", "Bytes read by programs through the clients"),
        Counter("stripefs_client_written_bytes", "Bytes written by programs through the clients"),
        Counter("stripefs_client_block_cache_hits", "Block lookups answered by the block cache"),
        Counter("stripefs_client_block_cache_misses", "Block lookups the block cache did not hold"),
        clients,
    )


@functools.cache
def fuse() -> CallMetrics:
    return CallMetrics(
        Counter("stripefs_fuse_ops", "FUSE requests answered, by operation and result", ["op", "result"]),
        Histogram("stripefs_fuse_op_seconds", "Time to answer a FUSE request, by operation", ["op"],
                  buckets=LATENCY_BUCKETS),
    )


@functools.cache
def mount_memory() -> Counter:
    """Hand-backs of what glibc held free (fs/fuse/memory.py), by why."""
    return Counter("stripefs_fuse_memory_trims", "Times the mount handed back what glibc held free, by why: "
                   "idle, or a write after a spell of reads", ["why"])


# ---------------------------------------------------------------------------- metaserver


class _MetaStatus(Collector):
    """Gauges from the metaserver's `status` (the same figures `stripefs status` shows),
    at most one status every META_STATUS_MAX_AGE_S whatever the scrape rate."""

    def __init__(self, status: Callable[[], Any]) -> None:
        self._status = status
        self._last: Optional[Any] = None
        self._at = 0.0
        self._lock = threading.Lock()

    def _get(self) -> Optional[Any]:
        with self._lock:
            if self._last is None or time.monotonic() - self._at > META_STATUS_MAX_AGE_S:
                try:
                    self._last, self._at = self._status(), time.monotonic()
                except Exception as exc:  # noqa: BLE001 - a store outage: no figures this scrape
                    log.warning("metrics: no status: %s", exc)
                    return None
            return self._last

    def describe(self) -> list:
        """Nothing: registering must not run a status (the registry collects anything
        that cannot describe itself, and the answer would then be kept for a while)."""
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self._get()
        if s is None:
            return
        for name, doc, value in (
            ("inodes", "Inodes in the namespace", s.inodes),
            ("files", "Regular files", s.files),
            ("directories", "Directories", s.directories),
            ("file_bytes", "Bytes of all regular files (their sizes)", s.bytes),
            ("blocks", "Stored blocks the block maps refer to", s.blocks),
            ("under_replicated_blocks", "Blocks with fewer live replicas than their files ask", s.under_replicated),
            ("lost_blocks", "Blocks with no live replica", s.lost),
            ("sessions", "Client sessions (mounts and library clients)", s.sessions),
            ("locks", "File locks held", s.locks),
            ("inline_files", "Files whose bytes are kept in the metadata", s.inline_files),
            ("metaservers", "Metaservers beating on this metadata", len(s.metaservers)),
            ("duties_holder", "1 when this metaserver runs the background duties", int(s.duties == s.metaserver)),
        ):
            yield GaugeMetricFamily(f"stripefs_meta_{name}", doc, value=value)
        states = GaugeMetricFamily("stripefs_meta_dataservers", "Data servers by state", labels=["state"])
        for state in ("up", "suspect", "dead"):
            states.add_metric([state], sum(1 for d in s.servers if d.state == state))
        yield states
        per = {key: GaugeMetricFamily(f"stripefs_meta_dataserver_{key}", doc, labels=["server"])
               for key, doc in (("capacity_bytes", "A data server's disk size"),
                                ("free_bytes", "A data server's free disk space"),
                                ("used_bytes", "Bytes of blocks a data server stores"),
                                ("up", "1 when a data server is up (heartbeating)"),
                                ("heartbeat_age_seconds", "Seconds since a data server's last heartbeat"))}
        for d in s.servers:
            per["capacity_bytes"].add_metric([d.address], d.capacity_bytes)
            per["free_bytes"].add_metric([d.address], d.free_bytes)
            per["used_bytes"].add_metric([d.address], d.used_bytes)
            per["up"].add_metric([d.address], int(d.state == "up"))
            per["heartbeat_age_seconds"].add_metric([d.address], d.last_heartbeat_s)
        yield from per.values()


@functools.cache
def meta_duties() -> Counter:
    return Counter("stripefs_meta_duty_items", "Items the background duties handled, by duty", ["duty"])


def meta_status(status: Callable[[], Any]) -> None:
    """Export the metaserver's status figures (call once, at start)."""
    REGISTRY.register(_MetaStatus(status))


# ---------------------------------------------------------------------------- data servers


@dataclass(frozen=True)
class DataMetrics:
    read_bytes: Counter
    written_bytes: Counter
    scrub_blocks: Counter
    scrub_passes: Counter
    replicated: Counter


@functools.cache
def data() -> DataMetrics:
    m = DataMetrics(
        Counter("stripefs_data_read_bytes", "Block bytes sent to readers"),
        Counter("stripefs_data_written_bytes", "Block bytes received and stored (writes, forwards, copies)"),
        Counter("stripefs_data_scrub_blocks", "Blocks the scrubber verified"),
        Counter("stripefs_data_scrub_passes", "Full scrub passes finished"),
        Counter("stripefs_data_replicated_blocks", "Block copies this server made for re-replication, by result",
                ["result"]),
    )
    for outcome in ("ok", "failed"):  # exported at 0 before the first copy (rate() needs a start)
        m.replicated.labels(outcome)
    return m


def data_store(stats: Callable[[], Any], replicating: Callable[[], int]) -> None:
    """Export a data server's store figures, read at scrape time (call once, at start)."""
    for name, doc, fn in (
        ("capacity_bytes", "This data server's disk size", lambda: stats().capacity_bytes),
        ("free_bytes", "Free space on this data server's disk", lambda: stats().free_bytes),
        ("used_bytes", "Bytes of blocks stored", lambda: stats().used_bytes),
        ("blocks", "Blocks stored", lambda: stats().blocks),
        ("corrupt_blocks", "Blocks found corrupt (by a read or the scrubber) since start; quarantined",
         lambda: stats().corrupt_blocks),
        ("replications_in_flight", "Block copies under way for re-replication", replicating),
    ):
        Gauge(f"stripefs_data_{name}", doc).set_function(fn)
