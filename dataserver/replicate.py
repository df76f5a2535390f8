"""Re-replication on the receiving side: copy blocks named by the metaserver's
ReplicateTasks from a source data server into this one's store.

Tasks arrive in heartbeat replies and run on a small thread pool, so a slow source never
delays a heartbeat. The source verifies its checksums as it reads; the copy is stored
with fresh checksums under the task's token, exactly as a client write would be. Each
finished task is reported (done or failed) with the next heartbeat; a report that does
not get through is sent again. A task for a block already being copied is ignored (the
metaserver may repeat one after its timeout).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from stripefs.proto import metrics
from stripefs.proto.auth import check_write_token
from stripefs.proto.credentials import Credentials
from stripefs.proto.errors import FsError
from stripefs.proto.integrity import leaf_hashes, leaves_match, matches
from stripefs.proto.messages import GetBlockReq, ReplicateTask
from stripefs.proto.rpc import Stub
from stripefs.proto.services import DATA_METHODS, DATA_SERVICE

from .store import BlockStore

log = logging.getLogger("stripefs.dataserver.replicate")

#: Copies made at once.
DEFAULT_REPLICATION_WORKERS = 4
#: How long one block fetch from a source may take.
FETCH_TIMEOUT_S = 30.0


class Replicator:
    def __init__(self, store: BlockStore, creds: Credentials, token_key: Callable[[], bytes],
                 address: Callable[[], str], workers: int = DEFAULT_REPLICATION_WORKERS) -> None:
        self.store = store
        self._creds = creds
        self._token_key = token_key  # known once registered
        self._address = address  # ours, as registered: the task's write token names it
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="replicate")
        self._lock = threading.Lock()
        self._active: set[int] = set()
        self._done: list[int] = []
        self._failed: list[int] = []
        self._stubs: dict[str, Stub] = {}

    def submit(self, tasks: list[ReplicateTask]) -> None:
        for task in tasks:
            with self._lock:
                if task.block_id in self._active:
                    continue
                self._active.add(task.block_id)
            self._pool.submit(self._copy, task)

    def take_results(self) -> tuple[list[int], list[int]]:
        """(copied, failed) block ids since the last call."""
        with self._lock:
            done, self._done = self._done, []
            failed, self._failed = self._failed, []
        return done, failed

    def give_back(self, done: list[int], failed: list[int]) -> None:
        """Results whose report did not get through: report them next time."""
        with self._lock:
            self._done.extend(done)
            self._failed.extend(failed)

    def busy(self) -> int:
        with self._lock:
            return len(self._active)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            stubs, self._stubs = list(self._stubs.values()), {}
        for stub in stubs:
            stub.close()

    def _stub(self, address: str) -> Stub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                stub = self._stubs[address] = Stub(address, self._creds, DATA_SERVICE, DATA_METHODS)
            return stub

    def _copy(self, task: ReplicateTask) -> None:
        ok = False
        try:
            ok = self._fetch_and_store(task)
        except Exception:  # noqa: BLE001 - one bad task must not stop the others
            log.exception("copying block %d failed", task.block_id)
        finally:
            with self._lock:
                self._active.discard(task.block_id)
                (self._done if ok else self._failed).append(task.block_id)
            metrics.data().replicated.labels("ok" if ok else "failed").inc()

    def _fetch_and_store(self, task: ReplicateTask) -> bool:
        if not check_write_token(self._token_key(), task.block_id, str(self._creds.caller), self._address(),
                                 task.token, time.time()):
            log.warning("replication task for block %d has a bad token: ignored", task.block_id)
            return False
        for source in task.sources:
            try:
                head, chunks = self._stub(source).download(
                    "read_block", GetBlockReq(block_id=task.block_id, token=task.read_token, leaves=True),
                    timeout=FETCH_TIMEOUT_S,
                )
                data = b"".join(chunks)
            except FsError as exc:
                log.warning("block %d: source %s failed: %s", task.block_id, source, exc)
                continue
            # The source's leaf hashes are kept if the digest vouches for them, else made here.
            leaves = head.leaves if task.digest else b""
            if task.digest and not leaves_match(task.digest, len(data), leaves):
                leaves = leaf_hashes(data, task.digest)
            if task.digest and not (matches(task.digest, data) and leaves_match(task.digest, len(data), leaves)):
                # The source's CRCs passed, so the copy there is not what its writer wrote:
                # a bad server, not a bad disk. Copy from another; the metaserver hears of
                # it from readers, whose reports make that server check its copy.
                log.error("block %d: the copy on %s does not match its writer's digest", task.block_id, source)
                continue
            try:
                self.store.put(task.block_id, data, leaves=leaves)
            except FsError as exc:
                log.warning("block %d: cannot store the copy: %s", task.block_id, exc)
                return False
            return True
        return False
