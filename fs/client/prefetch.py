"""Sampler-driven prefetch: a data loader says in which order it will read files, and the
client fetches them ahead of its readers, many at once, within a memory bound.

A plan is a list of paths (from the root of the file system) in the order they will be
read, handed over by `Client.prefetch` (or, through a mount, by writing them to
`MNT/.stripefs/prefetch`: fs/fuse/control.py). Each plan has an owner (a mount uses the
writing process); plans of different owners are served in turn, each in its own order, so
eight loader workers handing over their own shards all get theirs fetched. A new plan of
an owner is added to what that owner planned before, unless it replaces it.

For each path, in order, up to FILES_IN_FLIGHT at once and at most AHEAD_FILES beyond the
last planned file a reader opened, taken REFILL_FILES at a time (so that their calls
share messages: `_dispatch`): resolve it with the planner's ids, its last
component by a lookup that also brings the block map and read tokens (`want_map`: the
metaserver checks read permission as an open would, so nobody gets a byte they could not
read themselves; no open is recorded), many such lookups in one call
(`NameCache.ask_with_map`), which the name cache learns, so the lookup the reader makes
next is answered locally while the entry is fresh; the map is kept for the reader's open
to name (files.py KnownMaps). A file small enough to be inline needs nothing more (its
bytes come with the reader's open); a larger one has its blocks fetched whole, in file
order, into the data path's `prefetched` store (but for those cached, on their way, or
lately read here through a mount, whose kernel keeps them: `DataPath.read_lately`). A
plan whose files have lately been mostly small has its names resolved through the name
cache, which lists their directories ahead (SMALL_SHARE): a page of names a round trip,
not a lookup each.

What is held waits for its reader there, never in the block cache (where other reads
could evict it before it is used): a read of the block takes it out, into the block
cache, so what was read is no longer held (and no longer counted against the bound).
Blocks held longer than UNUSED_S (a plan that listed files nobody read) are dropped, as
are an owner's when its plan is replaced or cancelled. The bound: the bytes held plus the
bytes being fetched never exceed `limit_bytes`; the next fetch waits for readers to take
something.

Consistency: a block id names one content for ever (a write makes a new block, data.py),
and a reader reads the blocks of the map its own open fetched, so what was fetched ahead
can only serve the content the reader's open found: a file changed elsewhere after it
was prefetched is read as it is now (the new blocks are fetched then; the old ones are
dropped unread). The plan never changes what the reader sees, only when bytes arrive.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import stat
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, Iterable, Optional

import trio

from stripefs.proto import messages as m
from stripefs.proto.errors import FsError

from . import paths
from .data import written

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("stripefs.client")

#: Memory for blocks fetched ahead and not yet read, per client (`--prefetch-mib`).
DEFAULT_PREFETCH_BYTES = 256 * 1024 * 1024
#: Files resolved, opened or fetched at once.
FILES_IN_FLIGHT = 32
#: A block fetched ahead and not read within this long is dropped.
UNUSED_S = 60.0
#: Paths taken at most beyond the last one a reader opened: a small file costs only
#: lookups ahead, whose answers are fresh for ENTRY_TTL_S, so running far ahead of the
#: readers would only load the metaserver. After AHEAD_STALL_S without a reader opening a
#: planned file (readers that left the plan), the window moves on anyway.
AHEAD_FILES = 256
AHEAD_STALL_S = 5.0
#: Paths taken at once when the gate opens again after it shut (_dispatch).
REFILL_FILES = 16
#: Paths one plan may hold waiting (more is refused: EFBIG; ~100 bytes of memory each).
PLAN_MAX_PATHS = 2_000_000
#: A plan whose files were mostly small lately (this share of them, weighed over about the
#: last SMALL_WINDOW) resolves names as readers do: through the name cache, whose statahead
#: lists a directory in pages (one round trip for many names), not by a lookup each.
SMALL_SHARE = 0.75
SMALL_WINDOW = 8


@dataclass
class Plan:
    owner: Hashable
    ctx: m.Ctx
    paths: deque[str] = field(default_factory=deque)
    blocks: set[int] = field(default_factory=set)  # block ids fetched for it (to drop with it)
    active: int = 0  # its paths being prefetched now
    cancelled: bool = False
    small: float = 0.0  # the share of its files lately resolved that were small (_small)


@dataclass
class PrefetchStatus:
    """How far prefetch has got, summed over every plan since the client started."""

    waiting: int = 0  # paths planned and not yet started
    started: int = 0  # paths taken from the plans
    files: int = 0  # of those, regular files prefetched (resolved, and fetched if not inline)
    failed: int = 0  # paths that could not be resolved or opened (errno in last_error)
    fetched_bytes: int = 0  # block bytes fetched ahead
    used_bytes: int = 0  # of those, bytes a reader took
    dropped_bytes: int = 0  # of those, bytes dropped unread (unused too long, plan replaced)
    held_bytes: int = 0  # fetched and waiting for a reader now
    limit_bytes: int = 0  # the bound on held (and being fetched) bytes
    last_error: str = ""

    def lines(self) -> str:
        """One `name value` line each (what reading `.stripefs/prefetch` shows)."""
        return "".join(f"{name} {value}\n" for name, value in vars(self).items() if name != "last_error") + (
            f"last_error {self.last_error}\n" if self.last_error else "")


def _small(attr: m.Attr) -> bool:
    """Inline, or one short block: the reader's open brings it, nothing to fetch ahead."""
    return attr.size <= min(attr.inline_max, attr.block_size)


class Prefetcher:
    """The prefetch plans of one client, and the tasks that carry them out."""

    def __init__(self, client: "Client", limit_bytes: int = DEFAULT_PREFETCH_BYTES,
                 files_in_flight: int = FILES_IN_FLIGHT) -> None:
        self.client = client
        self.limit_bytes = limit_bytes
        self.files_in_flight = files_in_flight
        self.store = client.data.prefetched
        self.store.on_taken = self._taken
        self.store.on_freed = self._room_changed
        self._plans: OrderedDict[Hashable, Plan] = OrderedDict()
        self._reserved = 0  # bytes being fetched
        self._status = PrefetchStatus(limit_bytes=limit_bytes)
        self._more = trio.Event()  # set (and replaced) when a plan gets paths
        self._room_event = trio.Event()  # set (and replaced) when bytes are read, dropped or not fetched
        self._unserved: list[int] = []  # heap: paths taken (by seq) that may still need room
        self._waiting = 0  # paths waiting for room now
        self._room_waiters: dict[int, tuple[int, bool, trio.Event]] = {}  # seq -> (bytes, last, granted)
        self._running = 0  # paths being prefetched now
        self._seq = 0  # paths taken so far: their order
        self._swept_at = 0.0  # when blocks unused too long were last looked for
        self._ahead: OrderedDict[int, int] = OrderedDict()  # inode -> seq: files resolved, not yet opened
        self._read_seq = 0  # the latest path (by seq) a reader opened
        self._read_at = time.monotonic()  # when the window last moved
        self._started = False

    # ------------------------------------------------------------------ the plans

    def plan(self, owner: Hashable, items: Iterable[str | bytes], ctx: m.Ctx, *, replace: bool = False) -> int:
        """Add `items` (paths from the root, in reading order) to `owner`'s plan (replacing
        it with `replace`); returns how many paths it now waits with."""
        if replace:
            self.cancel(owner)
        plan = self._plans.get(owner)
        if plan is None:
            plan = self._plans[owner] = Plan(owner, ctx)
        plan.ctx = ctx
        before = len(plan.paths)
        try:
            for item in items:
                path = os.fsdecode(item)
                if not path:
                    continue
                if len(plan.paths) >= PLAN_MAX_PATHS:
                    raise FsError(errno.EFBIG, f"a prefetch plan holds at most {PLAN_MAX_PATHS} paths")
                plan.paths.append(path)
        finally:
            added = len(plan.paths) - before
            self._status.waiting += added
            if added:
                self._start()
                self._more.set()
                self._more = trio.Event()
        return len(plan.paths)

    def cancel(self, owner: Hashable) -> None:
        """Forget `owner`'s plan, and drop what was fetched for it and not read."""
        plan = self._plans.pop(owner, None)
        if plan is not None:
            plan.cancelled = True
            self._status.waiting -= len(plan.paths)
            self._status.dropped_bytes += self.store.drop(plan.blocks)

    def cancel_all(self) -> None:
        for owner in list(self._plans):
            self.cancel(owner)

    def status(self) -> PrefetchStatus:
        self._status.held_bytes = self.store.used_bytes
        return PrefetchStatus(**vars(self._status))

    def _next(self) -> Optional[tuple[Plan, str]]:
        """The next path, taking the plans in turn."""
        for _ in range(len(self._plans)):
            owner, plan = next(iter(self._plans.items()))
            self._plans.move_to_end(owner)
            if plan.paths:
                self._status.waiting -= 1
                self._status.started += 1
                return plan, plan.paths.popleft()
            plan.blocks = {b for b in plan.blocks if self.store.holds(b)}  # (some dropped unused)
            if not plan.blocks and not plan.active:
                del self._plans[owner]  # done, and nothing of it held
        return None

    # ------------------------------------------------------------------ the work

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self.client._spawn(self._dispatch)

    async def _dispatch(self) -> None:
        """Takes the paths in plan order and starts a task for each, FILES_IN_FLIGHT at
        most. Only this task waits at the gate (one wake-up per change, not one per
        task): no path is taken while the bound is reached, while one taken waits for
        room (what is taken has its map and waits for its turn with it), or while the
        prefetcher is AHEAD_FILES beyond the readers. Once shut, the gate opens again
        only when `refill` paths may pass, and they are taken at once: their lookups
        leave in one message (one transaction on the metaserver), their block reads too
        (one message to each data server, answered in one: proto/rpc.py QUICK_GROUP_MAX),
        where paths taken one at a time, as readers move on, cost a message each way
        apiece."""
        refill = max(1, min(REFILL_FILES, self.files_in_flight, AHEAD_FILES))
        while True:
            while (self._running + refill > self.files_in_flight or not self._fits(1) or self._waiting
                   or self._too_far_ahead(refill)):
                await self._wait_for_room()
            for _ in range(refill):
                item = self._next()
                if item is None:
                    break
                plan, path = item
                self._seq += 1
                heapq.heappush(self._unserved, self._seq)
                plan.active += 1
                self._running += 1
                self.client._spawn(self._run_one, plan, path, self._seq)
            else:
                continue
            more = self._more
            await more.wait()

    async def _run_one(self, plan: Plan, path: str, seq: int) -> None:
        try:
            await self._one(plan, path, seq)
        except FsError as exc:
            self._status.failed += 1
            self._status.last_error = f"{path}: {os.strerror(exc.errno)}"
            log.debug("prefetch of %s failed: %s", path, exc)
        except Exception as exc:  # noqa: BLE001 - a hint must never take the client down
            self._status.failed += 1
            self._status.last_error = f"{path}: {exc!r}"
            log.exception("prefetch of %s failed", path)
        finally:
            plan.active -= 1
            self._running -= 1
            self._served(seq)
            self._room_changed()  # (the dispatcher may take the next path)

    async def _one(self, plan: Plan, path: str, seq: int) -> None:
        """Resolve `path` and fetch its blocks. Its last component is looked up with its
        block map (LookupReq.want_map: the metaserver checks read permission as an open
        would): one round trip for both, and the reader's lookup is then answered here.
        A symbolic link there is followed and the file opened for its map instead."""
        client = self.client
        where, name = paths.split(paths.normalize(path))
        parent = await paths.resolve(client, where, ctx=plan.ctx)
        if not stat.S_ISDIR(parent.mode):
            raise FsError(errno.ENOTDIR, f"{where} is not a directory")
        entry = os.fsencode(name)
        attr = client.names.fresh(parent.ino, entry, plan.ctx)
        reply = None
        if attr is None and plan.small >= SMALL_SHARE:
            # Small files need no map, only their names known when the reader comes: the
            # directory is listed in pages (statahead, at once), where lookups one by one
            # cost a call each (measured: 3,113 lookups for a plan of 3,000 inline
            # samples in 100 directories, against 375 and 174 listings the readers'
            # lookups made without a plan, which ran 10-20% faster).
            client.names.list_ahead(parent.ino, plan.ctx)
            attr = (await client.names.lookup(parent.ino, entry, plan.ctx)).attr
            if attr is None:
                raise FsError(errno.ENOENT, f"{path}: no such file")
        if attr is None or (stat.S_ISREG(attr.mode) and not _small(attr)):
            # (A small file known here already, from statahead say, costs no round trip.)
            reply = await client.names.ask_with_map(parent.ino, entry, plan.ctx)
            attr = reply.attr
        if stat.S_ISLNK(attr.mode):
            attr = await paths.resolve(client, path, ctx=plan.ctx)
        if not stat.S_ISREG(attr.mode):
            return
        plan.small += (_small(attr) - plan.small) / SMALL_WINDOW
        self._status.files += 1
        self._ahead[attr.ino] = seq
        while len(self._ahead) > 4 * AHEAD_FILES:
            self._ahead.popitem(last=False)
        if _small(attr):
            return  # inline, or a single short block: nothing the reader's open does not bring
        if reply is not None and reply.attr.ino == attr.ino:
            if not reply.mapped:
                raise FsError(errno.EACCES, f"{path}: not readable as the plan's writer")
            client.maps.learn(reply.attr, reply.blocks)  # (the reader's open names it)
            await self._fetch(plan, seq, reply.blocks)
        else:  # (through a symbolic link)
            opened = await client.session.call("open", m.OpenReq(attr.ino, client.session.id, plan.ctx, os.O_RDONLY))
            try:
                await self._fetch(plan, seq, opened.blocks)
            finally:
                client.session.release_soon(attr.ino, opened.opened_in)  # (not counted by a replacement)

    async def _fetch(self, plan: Plan, seq: int, blocks: list[m.BlockRef]) -> None:
        """Fetch a file's blocks in order into the store, each once room is its turn."""
        client = self.client
        wanted = [ref for ref in sorted(blocks, key=lambda b: b.index)
                  if not (self.store.holds(ref.block_id) or client.data.read_lately(ref.block_id))]
        for i, ref in enumerate(wanted):
            size = written(ref)
            await self._room(seq, size, last=i == len(wanted) - 1)  # (reserves it)
            try:
                if plan.cancelled:
                    return
                got = await client.data.read_ahead(ref)
            finally:
                self._reserved -= size
                self._room_changed()
            if got and plan.cancelled:
                self._status.dropped_bytes += self.store.drop([ref.block_id])
            elif got:
                plan.blocks.add(ref.block_id)
                self._status.fetched_bytes += got

    def opened(self, ino: int) -> None:
        """A reader opened `ino` (Client.open): the window ahead moves past it if planned."""
        seq = self._ahead.pop(ino, None)
        if seq is not None and seq > self._read_seq:
            self._read_seq, self._read_at = seq, time.monotonic()
            self._room_changed()

    def _too_far_ahead(self, more: int = 1) -> bool:
        """Whether taking `more` paths would put the prefetcher beyond AHEAD_FILES."""
        if self._seq + more - self._read_seq <= AHEAD_FILES:
            return False
        if time.monotonic() - self._read_at < AHEAD_STALL_S:
            return True
        self._read_seq, self._read_at = self._seq - AHEAD_FILES // 2, time.monotonic()
        return False

    def _fits(self, size: int) -> bool:
        """`size` more bytes keep what is held and being fetched within the bound (a lone
        block always fits)."""
        busy = self.store.used_bytes + self._reserved
        return busy == 0 or busy + size <= self.limit_bytes

    async def _room(self, seq: int, size: int, last: bool) -> None:
        """Wait until `size` more bytes fit the bound and every path taken before this one
        (`seq`) has had the room it needed; the bytes are then reserved. Bytes are fetched
        in plan order even when the bound holds the prefetcher back. `last`: the path
        needs no more room after this (it is served, and the next one's turn comes)."""
        event = trio.Event()
        self._room_waiters[seq] = (size, last, event)
        self._grant()
        if event.is_set():
            return
        self._waiting += 1
        try:
            while not event.is_set():
                await self._wait_for_room(event)
        except BaseException:
            if event.is_set():
                self._reserved -= size  # granted as it was cancelled: not fetched
                self._room_changed()
            raise
        finally:
            self._waiting -= 1
            self._room_waiters.pop(seq, None)

    def _grant(self) -> None:
        """Give room to the paths waiting for it, in plan order, while each fits: paths
        whose lookups came back together go together (their block reads share messages),
        with no wait for one another."""
        while self._unserved:
            seq = self._unserved[0]
            waiter = self._room_waiters.get(seq)
            if waiter is None or not self._fits(waiter[0]):
                return  # the next in order has not asked yet, or does not fit
            size, last, event = self._room_waiters.pop(seq)
            self._reserved += size
            event.set()
            if not last:
                return  # it asks again for its next block, before anyone after it
            heapq.heappop(self._unserved)  # served: the next one's turn

    def _served(self, seq: int) -> None:
        """Path `seq` needs no more room (it has had it, or needs none): the next one's turn."""
        if seq in self._unserved:
            self._unserved.remove(seq)
            heapq.heapify(self._unserved)
            self._room_changed()

    async def _wait_for_room(self, event: Optional[trio.Event] = None) -> None:
        """Until bytes are read or dropped, or `event` (a path's grant) is set (at most a
        second), dropping first, at most once a second, what waited unread for longer than
        UNUSED_S."""
        t = time.monotonic()
        if t - self._swept_at >= 1.0:
            self._swept_at = t
            self._status.dropped_bytes += self.store.drop_older_than(t - UNUSED_S)
        event = self._room_event if event is None else event
        with trio.move_on_after(1.0):
            await event.wait()

    def _room_changed(self) -> None:
        self._grant()
        self._room_event.set()
        self._room_event = trio.Event()

    def _taken(self, block_id: int, size: int) -> None:
        self._status.used_bytes += size
        for plan in self._plans.values():
            plan.blocks.discard(block_id)
