"""Running a mount: one trio run holding the client library and the pyfuse3 loop.

SIGTERM and SIGINT end the FUSE loop; the client then flushes what it still holds,
closes its session, and the mount point is unmounted before the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Optional

import pyfuse3
import trio

from stripefs.client import Credentials, open_client
from stripefs.client.disktier import DiskTier

from .memory import hand_back_memory
from .ops import StripeOperations

log = logging.getLogger("stripefs.fuse")


def mount_options(fsname: str, extra: list[str]) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    # libfuse splits an option string at commas (a list of metaservers has them) unless
    # they are escaped.
    fsname = fsname.replace("\\", "\\\\").replace(",", "\\,")
    opts |= {f"fsname={fsname}", "subtype=stripefs", "allow_other"}
    opts |= set(extra)
    return opts


#: The version of the stripefs additions to pyfuse3 this mount needs (lock requests,
#: fallocate, the lock owner at flush, passthrough, killpriv, larger reads;
#: scripts/pyfuse3-stripefs.patch, built by scripts/_common.sh). Without them the kernel
#: would keep locks local to this mount.
PYFUSE3_ADDITIONS = 6


def check_pyfuse3() -> None:
    have = getattr(pyfuse3, "STRIPEFS_ADDITIONS", 0)
    if have < PYFUSE3_ADDITIONS:
        raise SystemExit(
            f"this pyfuse3 lacks the stripefs additions (version {have}, need {PYFUSE3_ADDITIONS}):"
            " without them locks would be local to one mount. ./scripts/up builds it"
            " (scripts/_common.sh ensure_pyfuse3).")


async def _serve(meta: str, mountpoint: str, creds: Credentials, extra_options: list[str], client_options: dict) -> None:
    """`meta`: the metaservers, HOST:PORT[,HOST:PORT...]."""
    # A mount never forks: its streams run on one asyncio loop (fs/client/transport.py).
    async with open_client(meta, creds, mountpoint=mountpoint, rpc_loop=True, kernel_page_cache=True,
                           **client_options) as client:
        ops = StripeOperations(client, mountpoint)
        if ops.passthrough.enabled:
            pyfuse3.enable_passthrough()  # staged files' local copies (passthrough.py)
        # The mount drops set-user/group-ID bits on write and truncate itself (ops.py,
        # kill_suidgid), so the kernel need not ask for security.capability before each write.
        pyfuse3.handle_killpriv()
        allow_large_reads()
        pyfuse3.max_read_pages(READ_PAGES)
        pyfuse3.init(ops, mountpoint, mount_options(f"stripefs:{meta}", extra_options))
        log.info("mounted %s at %s (session %d)", meta, mountpoint, client.session.id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_terminate_on_signal)
                # stat() of our own mount point is answered by the loop started below: in a thread.
                nursery.start_soon(trio.to_thread.run_sync, tune_connection, mountpoint)
                nursery.start_soon(hand_back_memory, ops.activity)
                await pyfuse3.main(min_tasks=MIN_WORKER_TASKS, max_tasks=MAX_WORKER_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mountpoint)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


#: pyfuse3 worker tasks kept waiting for requests, and the most it starts. Its default (1)
#: ends a worker after every burst and starts another for the next: with 8 processes
#: creating files, 16 standing workers took ~10% less CPU per create (1,018-1,180 ->
#: 1,219-1,278 creates/s on this 2-core machine).
MIN_WORKER_TASKS = 16
MAX_WORKER_TASKS = 64
#: FUSE requests the kernel keeps in flight in the background (readahead, async reads);
#: the kernel default is 12. Only root can raise it.
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
#: Pages a READ request may carry: 1,024 (4 MiB, a whole block) where the kernel allows
#: it; libfuse 3.14 asks for 256. The kernel grants at most fs.fuse.max_pages_limit, which
#: a mount run by root raises to this before it mounts (allow_large_reads). The mount's
#: readahead (read_ahead_kb) is set to as many pages as were granted: no READ is larger
#: than the readahead window (the default 128 KiB made every buffered read a 128 KiB
#: request; 1 MiB was +10% on a cold read, DESIGN.md; 4 MiB, docs/client.md "Reads").
READ_PAGES = 1024
#: What libfuse 3.14 asks for, and the kernel's ceiling where it has no sysctl for it.
LIBFUSE_PAGES = 256
MAX_PAGES_LIMIT = "/proc/sys/fs/fuse/max_pages_limit"
FUSECTL = "/sys/fs/fuse/connections"


def _pages_limit() -> Optional[int]:
    """fs.fuse.max_pages_limit (None: not readable, a kernel before 6.13)."""
    try:
        with open(MAX_PAGES_LIMIT) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def allow_large_reads() -> None:
    """Root only: raise the kernel's limit on pages a FUSE request may carry
    (fs.fuse.max_pages_limit, Linux 6.13+, read when a mount starts; a host-wide ceiling,
    each FUSE file system still asks for its own) to READ_PAGES. Best effort."""
    if os.geteuid() != 0:
        return
    limit = _pages_limit()
    if limit is None:
        log.info("READ requests stay at most 1 MiB: %s cannot be read", MAX_PAGES_LIMIT)
        return
    if limit >= READ_PAGES:
        return
    try:
        with open(MAX_PAGES_LIMIT, "w") as f:
            f.write(f"{READ_PAGES}\n")
        log.info("fs.fuse.max_pages_limit %d -> %d", limit, READ_PAGES)
    except OSError as exc:
        log.info("READ requests stay at most 1 MiB: %s", exc)


def read_pages_granted() -> int:
    """Pages a READ request of this mount may carry: what its INIT reply asked for, within
    the kernel's limit."""
    return min(pyfuse3.max_pages_sent() or LIBFUSE_PAGES, _pages_limit() or LIBFUSE_PAGES)


def tune_connection(mountpoint: str) -> None:
    """Raise the connection's background limit and readahead through fusectl and the
    bdi, when we are root. Best effort: a mount that cannot be tuned works the same."""
    if os.geteuid() != 0:
        return
    try:
        minor = os.minor(os.stat(mountpoint).st_dev)
        if not os.path.isdir(f"{FUSECTL}/{minor}"):
            subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], capture_output=True, timeout=10)
        read_ahead_kb = read_pages_granted() * os.sysconf("SC_PAGE_SIZE") // 1024
        settings = {
            f"{FUSECTL}/{minor}/max_background": MAX_BACKGROUND,
            f"{FUSECTL}/{minor}/congestion_threshold": CONGESTION_THRESHOLD,
            f"/sys/class/bdi/0:{minor}/read_ahead_kb": read_ahead_kb,
        }
        for path, value in settings.items():
            with open(path, "w") as f:
                f.write(f"{value}\n")
        log.info("connection %d: max_background %d, read_ahead_kb %d", minor, MAX_BACKGROUND, read_ahead_kb)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not tune the FUSE connection: %s", exc)


#: Mount options that are stripefs's, not the kernel's: atime (reads move atime, by
#: relatime's rules) and noatime (the default: they do not).
ATIME_OPTIONS = {"atime": True, "relatime": True, "noatime": False}


def run_mount(meta: str, mountpoint: str, creds: Credentials, extra_options: list[str] | None = None,
              cache_dir: str = "", cache_dir_bytes: int = 0, **client_options) -> None:
    """Serve the mount until it is unmounted or signalled; `cache_dir`: the local disk
    tier's directory (fs/client/disktier.py), holding at most `cache_dir_bytes`."""
    check_pyfuse3()
    options = []
    for option in extra_options or []:
        if option in ATIME_OPTIONS:
            client_options["atime"] = ATIME_OPTIONS[option]
        else:
            options.append(option)
    disk = None
    if cache_dir:
        # Indexed here, before the trio thread serves anything.
        disk = client_options["disk_tier"] = DiskTier(cache_dir, cache_dir_bytes)
    try:
        trio.run(_serve, meta, mountpoint, creds, options, client_options)
    finally:
        if disk is not None:
            disk.close()
