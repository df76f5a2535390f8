"""One setup for every process: files it makes are its user's only, it may hold as many
descriptors as its hard limit allows, its cyclic garbage collector runs less often than
Python's default, it logs to a rotating file when given one, else stderr, a server says it
serves through a ready file, and it takes its stop signals by waiting for them, never in a
handler."""

from __future__ import annotations

import gc
import logging
import logging.handlers
import os
import resource
import signal
from typing import Optional

from .atomic import write_atomically

log = logging.getLogger("stripefs.process")

#: Files and directories a process makes (state, blocks, database, logs) are readable by
#: the service user only: another local user of a server must not read a cluster's data.
PRIVATE_UMASK = 0o077
#: A log file is rotated at this size, keeping this many old ones: a caller must not be
#: able to fill a server's disk with what it makes the server log.
LOG_FILE_MAX_BYTES = 64 * 1024 * 1024
LOG_FILES_KEPT = 4
#: Python's cyclic garbage collector: a young-generation pass every this many allocations
#: (Python's default: 700), an older one every this many passes of the one below (10). A
#: metadata operation allocates thousands of short-lived objects on each side (messages,
#: frames, coroutines), nearly none of them in cycles, while the mount's caches and the
#: metaserver's tables make every older pass long. 2,000 files created, stat'ed and
#: unlinked through a mount (one data server), five alternations with the default: unlinks
#: 13-22% faster in four and 13% slower in one, creates -4% to +11%, the mount's and the
#: metaserver's CPU an unlink lower in all but that one (docs/benchmark.md).
GC_THRESHOLDS = (50_000, 20, 20)
#: What stops a server: its service manager's SIGTERM, or Ctrl-C.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def setup_logging(path: Optional[str], level: str = "INFO") -> None:
    os.umask(PRIVATE_UMASK)
    gc.set_threshold(*GC_THRESHOLDS)
    # The soft limit (often 1,024) is for interactive programs: thousands of connections
    # (idle ones, or an attacker's) must not leave a server unable to open a block file.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    handler: logging.Handler
    if path:
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILES_KEPT)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def hold_stop_signals() -> None:
    """Keep the stop signals pending until `wait_for_stop` takes them. Called first in a
    server's main, before any thread exists (so every thread inherits the mask) and before
    its log file is made (so a signal sent once that file exists is never lost). A Python
    handler would run between two bytecodes of the main thread, wherever it was: in the
    middle of writing a log line, a handler that logs raises "reentrant call" (CI saw one
    at the metaserver's start)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def wait_for_stop() -> str:
    """Block the calling (main) thread until a stop signal arrives; its name. A signal sent
    while the server was still starting was held and is taken here at once."""
    return signal.Signals(signal.sigwait(STOP_SIGNALS)).name


def announce_ready(path: Optional[str], address: str) -> bool:
    """Write the address a server serves on to its ready file (`--ready-file`), which
    scripts and service managers wait for; False, with the reason logged, when it cannot
    be written (a missing directory, a full disk): the server then stops, as for any
    other failure to start."""
    if not path:
        return True
    try:
        write_atomically(path, address + "\n")
    except OSError as exc:
        log.error("cannot start: the ready file %s: %s", path, exc.strerror or exc)
        return False
    return True
