"""Background scrubbing: re-verify every stored block's checksums at a bounded rate.

Blocks are checked oldest-verified first (never-verified ones, e.g. after a restart,
first of all), whole, at most `rate_bytes_s` bytes per second, so scrubbing takes a
bounded share of the disk whatever else is going on. A pass starts at most every
`interval_s`. A corrupt block is moved aside (BlockStore.quarantine) and reported in the
next heartbeat, which makes the metaserver re-replicate it from a good copy.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Callable

from stripefs.proto import metrics
from stripefs.proto.errors import FsError

from .store import BlockStore

log = logging.getLogger("stripefs.dataserver.scrub")

#: Default pace: a 4 MiB block every ~125 ms; a full 1 TiB disk in about 9 hours.
DEFAULT_SCRUB_RATE_MIB_S = 32.0
#: Default least time between the starts of two full passes.
DEFAULT_SCRUB_INTERVAL_S = 3600.0
#: Shortest sleep between passes, so an empty store does not spin.
MIN_PASS_GAP_S = 1.0


class Scrubber:
    def __init__(
        self,
        store: BlockStore,
        stop: threading.Event,
        rate_bytes_s: float,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.stop = stop
        self.rate_bytes_s = rate_bytes_s
        self.interval_s = interval_s
        self.clock = clock
        self._verified: dict[int, float] = {}  # block id -> clock() of its last good check
        self.passes = 0
        self.thread = threading.Thread(target=self._run, name="scrub", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                started = self.clock()
                done = self.run_pass()
                if done["corrupt"]:
                    log.warning("scrub pass: %d blocks checked, %d corrupt", done["blocks"], done["corrupt"])
                self.stop.wait(max(MIN_PASS_GAP_S, self.interval_s - (self.clock() - started)))
        except Exception:  # noqa: BLE001 - the server keeps serving without its scrubber
            log.exception("scrub thread failed")

    def run_pass(self) -> dict[str, int]:
        """Check every block once, oldest-verified first, at the configured rate."""
        ids = sorted(self.store.block_ids(), key=lambda b: (self._verified.get(b, 0.0), b))
        present = set(ids)
        for gone in [b for b in self._verified if b not in present]:
            del self._verified[gone]
        checked = corrupt = 0
        nbytes = 0
        started = self.clock()
        for block_id in ids:
            if self.stop.is_set():
                break
            try:
                nbytes += self.store.verify(block_id)
            except FsError as exc:
                if exc.errno == errno.EIO and self.store.is_corrupt(block_id):
                    if self.store.quarantine(block_id):
                        corrupt += 1
                elif exc.errno != errno.ENOENT:  # ENOENT: deleted meanwhile (garbage), not lost
                    log.warning("scrub: cannot read block %d: %s", block_id, exc)
                self._verified.pop(block_id, None)
                continue
            self._verified[block_id] = self.clock()
            checked += 1
            metrics.data().scrub_blocks.inc()
            # Pace: never ahead of rate_bytes_s averaged over the pass.
            ahead_s = nbytes / self.rate_bytes_s - (self.clock() - started)
            if ahead_s > 0 and self.stop.wait(ahead_s):
                break
        self.passes += 1
        metrics.data().scrub_passes.inc()
        return {"blocks": checked, "corrupt": corrupt, "bytes": nbytes}
