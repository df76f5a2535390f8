"""What the client knows of the namespace without asking, and the rule that keeps each
piece of it true (docs/client.md has the prose version).

- `AttrCache`: inode -> attributes, each with the time it was fetched. An attribute is
  used for at most ATTR_TTL_S after the metaserver sent it, and the kernel is told to keep
  it only for what is left of that (so nothing is ever seen older than ATTR_TTL_S). Every
  change this client makes replaces or drops the inode's entry.
- `Listing` per directory: names -> inode, each mapping with the time it was learned (a
  name is used for ENTRY_TTL_S after that); and, when the client holds every entry of the
  directory, the directory's `generation` (the metaserver bumps it on every entry change)
  and when that was last confirmed. A complete listing confirmed less than ENTRY_TTL_S ago
  answers "no such entry" without a round trip in a directory this client is filling (it
  added or removed an entry there in the last ENTRY_TTL_S: cp -a, rsync, a dataset
  writer), so a create there is one round trip; elsewhere a name not known is asked for,
  so a reader sees another mount's new file at once, as without a listing. A listing
  stays complete through this client's own changes as long as each reply shows the
  generation moving by exactly one (nobody else changed the directory in between);
  otherwise it is no longer complete. A listing whose confirmation is older is confirmed
  again by one getattr of the directory.
- Statahead (`Listing.ahead_*`): when a process looks up entries of one directory one after
  the other, the client fetches their attributes in batches (readdir with attributes) ahead
  of it, as Lustre's statahead does, and stops doing so for a directory where the batches go
  unused.

Memory is bounded: ATTR_CACHE_ENTRIES inodes, LISTING_NAMES_MAX names over all listings
(the least recently used listings go first).
"""

from __future__ import annotations

import errno
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import trio

from stripefs.proto.errors import FsError
from stripefs.proto.messages import (
    Attr,
    AttrReply,
    Ctx,
    LOOKUPS_MAX,
    InodeReq,
    LookupReq,
    LookupsReq,
    Message,
    ReaddirReply,
    ReaddirReq,
    RenameReply,
    check_name,
)

#: How long attributes and entries from the metaserver are trusted, here and (whatever is
#: left of it) by the kernel: close-to-open between mounts within about this (DESIGN.md).
ATTR_TTL_S = 1.0
ENTRY_TTL_S = 1.0
#: Inodes whose attributes are remembered; expired ones are dropped past it.
ATTR_CACHE_ENTRIES = 100_000
#: Names remembered over all directory listings.
LISTING_NAMES_MAX = 500_000
#: Entries per readdir round trip (statahead batches and listings).
READDIR_BATCH = 1000
#: A complete listing is fetched for negative answers only for directories up to this many
#: entries; a larger one is not listed again for LISTING_RETRY_S.
LISTING_FETCH_MAX = 20_000
LISTING_RETRY_S = 10.0
#: Lookups answered by the metaserver in one directory, within ENTRY_TTL_S of each other,
#: that start statahead there.
STATAHEAD_TRIGGER = 2
#: A directory whose statahead batches served fewer lookups than this fraction of their
#: entries gets no statahead for STATAHEAD_BACKOFF_S.
STATAHEAD_MIN_USE = 0.125
STATAHEAD_BACKOFF_S = 10.0
#: Changes of this client to one directory whose replies may arrive out of order before
#: the listing gives up on staying complete.
OWN_CHANGES_MAX = 1024


def now() -> float:
    return time.monotonic()


@dataclass(frozen=True)
class Entry:
    """A lookup's answer and how long the kernel may keep it."""

    attr: Optional[Attr]  # None: there is no such entry
    entry_ttl: float  # seconds the name (or its absence) stays right
    attr_ttl: float  # seconds the attributes stay right


class AttrCache:
    """inode -> (attributes, monotonic time they were fetched)."""

    def __init__(self, limit: int = ATTR_CACHE_ENTRIES) -> None:
        self.limit = limit
        self._entries: dict[int, tuple[Attr, float]] = {}
        #: inode -> time before which nothing fetched may be put (forget())
        self._floors: dict[int, float] = {}
        self.forgot_at = 0.0  # the last forget()

    def put(self, attr: Attr, at: Optional[float] = None) -> Attr:
        """Remember `attr` as fetched at `at` (default: now); returns it."""
        t = now() if at is None else at
        floor = self._floors.get(attr.ino)
        if floor is not None and t < floor:
            return attr  # fetched before a change of ours that it may not show
        if len(self._entries) >= self.limit and attr.ino not in self._entries:
            fresh = t - ATTR_TTL_S
            self._entries = {i: e for i, e in self._entries.items() if e[1] > fresh}
            if len(self._entries) >= self.limit:
                self._entries.clear()
        old = self._entries.get(attr.ino)
        if old is None or old[1] <= t:
            self._entries[attr.ino] = (attr, t)
        return attr

    def get(self, ino: int) -> Optional[tuple[Attr, float]]:
        """(attributes, seconds the kernel may still keep them), if still fresh."""
        entry = self._entries.get(ino)
        if entry is None:
            return None
        left = ATTR_TTL_S - (now() - entry[1])
        return (entry[0], left) if left > 0 else None

    def last(self, ino: int) -> Optional[Attr]:
        """The attributes last fetched, however old: what the kernel may still hold."""
        entry = self._entries.get(ino)
        return None if entry is None else entry[0]

    def drop(self, ino: int) -> None:
        self._entries.pop(ino, None)

    def forget(self, ino: int) -> None:
        """drop, and refuse attributes fetched before now: a reply that was on its way
        while we changed the inode (a statahead listing, a lookup) must not put back what
        the change made wrong (its xattr count: getxattr answers ENODATA from it)."""
        self.drop(ino)
        t = self.forgot_at = now()
        if len(self._floors) >= self.limit:
            self._floors = {i: f for i, f in self._floors.items() if f > t - ATTR_TTL_S}
        self._floors[ino] = t


@dataclass
class Listing:
    """What this client knows of one directory's entries."""

    names: dict[bytes, tuple[int, float, int]] = field(default_factory=dict)  # name -> (ino, learned at, cookie)
    complete: bool = False  # `names` holds every entry, as of `generation`
    generation: int = -1  # the directory's generation `names` reflects (when complete)
    confirmed_at: float = 0.0  # when completeness was last confirmed
    own: dict[int, float] = field(default_factory=dict)  # generations of our changes not yet contiguous
    filling_until: float = 0.0  # this client changed an entry here recently: negatives are answered
    files_need_blocks: bool = False  # the last file this client created here outgrew inline storage
    # a fetch of pages from the start: complete if it reaches the end at one generation
    run_generation: Optional[int] = None
    run_started: float = 0.0
    run_next: int = -1  # the offset that continues the run
    run_entries: int = 0
    listing_after: float = 0.0  # no complete fetch before this (directory too large)
    # statahead
    served: list[float] = field(default_factory=list)  # times of metaserver-answered lookups
    ahead_active: bool = False
    ahead_off_until: float = 0.0  # statahead disabled until
    ahead_next: int = 0  # cookie after which the next batch starts
    ahead_more: bool = True  # entries remain after ahead_next
    ahead_mark: int = 0  # a hit at or past this cookie starts the next batch
    ahead_small: bool = False  # the whole directory fit in one batch: refetch from the start
    fetching: Optional[trio.Event] = None  # a page in flight
    ahead_fetched: int = 0  # entries fetched by statahead since it was (re)started
    ahead_used: int = 0  # lookups they answered

    def negative_ttl(self) -> float:
        """Seconds a negative answer from this listing stays right (<= 0: not usable)."""
        t = now()
        if not self.complete or t > self.filling_until:
            return 0.0
        return ENTRY_TTL_S - (t - self.confirmed_at)


class Listings:
    """Directory inode -> Listing, bounded in names (least recently used first)."""

    def __init__(self, names_max: int = LISTING_NAMES_MAX) -> None:
        self.names_max = names_max
        self._dirs: OrderedDict[int, Listing] = OrderedDict()
        self._names = 0

    def get(self, ino: int) -> Optional[Listing]:
        listing = self._dirs.get(ino)
        if listing is not None:
            self._dirs.move_to_end(ino)
        return listing

    def of(self, ino: int) -> Listing:
        listing = self.get(ino)
        if listing is None:
            listing = self._dirs[ino] = Listing()
        return listing

    def drop(self, ino: int) -> None:
        listing = self._dirs.pop(ino, None)
        if listing is not None:
            self._names -= len(listing.names)

    def learn(self, listing: Listing, name: bytes, child: int, at: float, cookie: int) -> None:
        if name not in listing.names:
            self._names += 1
        listing.names[name] = (child, at, cookie)
        if self._names > self.names_max:
            self._trim()

    def forget(self, listing: Listing, name: bytes) -> None:
        if listing.names.pop(name, None) is not None:
            self._names -= 1

    def _trim(self) -> None:
        while self._names > self.names_max and len(self._dirs) > 1:
            _, oldest = self._dirs.popitem(last=False)
            self._names -= len(oldest.names)


@dataclass
class _Asked:
    """A lookup on its way, and its outcome for those waiting for it."""

    sent_at: float
    done: trio.Event = field(default_factory=trio.Event)
    reply: Optional[AttrReply] = None
    error: Optional[FsError] = None


@dataclass
class _Lookups:
    """Lookups with maps leaving together (NameCache.ask_with_map)."""

    lookups: list[LookupReq] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    heard: list[AttrReply | FsError] = field(default_factory=list)  # each lookup's answer
    error: Optional[FsError] = None


class NameCache:
    """Lookups answered from what the client knows, statahead, and the bookkeeping of this
    client's own changes (module docstring). `call` makes a metadata call (the session's);
    `spawn` starts a background task (the client's nursery)."""

    def __init__(self, call: Callable[[str, Message], Awaitable[Any]], spawn: Callable[..., None]) -> None:
        self._call = call
        self._spawn = spawn
        self.attrs = AttrCache()
        self.listings = Listings()
        self._asking: dict[tuple, _Asked] = {}  # lookups on their way (_lookup_remote)
        self._asking_maps: dict[tuple, _Lookups] = {}  # lookups with maps still gathering (ask_with_map)
        self._changed_at = 0.0  # this client's last change of an entry (_changed, distrust)

    # ------------------------------------------------------------------ lookups

    async def lookup(self, parent: int, name: bytes, ctx: Ctx) -> Entry:
        """The entry `name` of directory `parent` (attr None: there is none), from what is
        known if it is fresh, else from the metaserver, asked as `ctx` (whose lookups
        also start statahead as `ctx`: pages it may not read are not fetched)."""
        if name in (b".", b"..") or check_name(name) is not None:
            return await self._lookup_remote(parent, name, ctx)  # the metaserver's answer or errno
        for _ in range(2):
            listing = self.listings.get(parent)
            if listing is None:
                break
            known = self._known(listing, parent, name, ctx)
            if known is not None:
                return known
            if listing.fetching is None:
                break
            # A page of this directory is on its way: it likely holds the answer.
            await listing.fetching.wait()
        listing = self.listings.get(parent)
        if (listing is not None and listing.complete and name not in listing.names
                and now() <= listing.filling_until and listing.negative_ttl() <= 0):
            if await self._confirm(parent, listing) and name not in listing.names:
                return Entry(None, listing.negative_ttl(), 0.0)
        return await self._lookup_remote(parent, name, ctx)

    def ino_of(self, parent: int, name: bytes) -> Optional[int]:
        """The inode `name` of `parent` last led to here, however old (None: not known)."""
        listing = self.listings.get(parent)
        hit = listing.names.get(name) if listing is not None else None
        return hit[0] if hit is not None else None

    def fresh(self, parent: int, name: bytes, ctx: Ctx) -> Optional[Attr]:
        """The attributes of the entry `name` of `parent` if they are known here and fresh
        (no round trip); None otherwise, or if it is known not to exist."""
        listing = self.listings.get(parent)
        known = self._known(listing, parent, name, ctx) if listing is not None else None
        return known.attr if known is not None else None

    def _known(self, listing: Listing, parent: int, name: bytes, ctx: Ctx) -> Optional[Entry]:
        t = now()
        hit = listing.names.get(name)
        if hit is None:
            ttl = listing.negative_ttl()
            return Entry(None, ttl, 0.0) if ttl > 0 else None
        ino, learned, cookie = hit
        entry_ttl = ENTRY_TTL_S - (t - learned)
        got = self.attrs.get(ino)
        if entry_ttl <= 0 or got is None:
            return None
        listing.ahead_used += 1
        if listing.ahead_active and listing.ahead_more and cookie >= listing.ahead_mark and listing.fetching is None:
            self._begin(self._ahead, parent, listing, ctx, listing.ahead_next)
        return Entry(got[0], entry_ttl, got[1])

    async def _confirm(self, parent: int, listing: Listing) -> bool:
        """Is the complete listing still the directory's? One getattr says, by generation."""
        t = now()
        try:
            attr = (await self._call("getattr", InodeReq(parent))).attr
        except FsError:
            return False
        self.attrs.put(attr, t)
        if listing.complete and attr.generation == listing.generation:
            listing.confirmed_at = max(listing.confirmed_at, t)
            return True
        listing.complete = False
        return False

    async def _lookup_remote(self, parent: int, name: bytes, ctx: Ctx) -> Entry:
        """Ask the metaserver; lookups of the same name by the same caller made while one
        is on its way wait for its answer rather than asking again (a prefetcher's tasks
        resolving paths of one directory at once asked for it 32 times), unless this
        client changed an entry or an inode since that one was sent (its answer may not
        show the change; a lookup made after it must)."""
        key = (parent, name, ctx.uid, ctx.gid, tuple(ctx.groups))
        shared = self._asking.get(key)
        if shared is not None and max(self._changed_at, self.attrs.forgot_at) >= shared.sent_at:
            shared = None
        if shared is None:
            shared = self._asking[key] = _Asked(now())
            try:
                reply = shared.reply = await self.ask(parent, name, ctx)
            except FsError as exc:
                shared.error = exc
                raise
            finally:
                if self._asking.get(key) is shared:
                    del self._asking[key]
                shared.done.set()
        else:
            await shared.done.wait()
            if shared.error is not None:
                raise FsError(shared.error.errno, shared.error.message)
            # (None: the one asking was cancelled, so ask ourselves)
            reply = shared.reply if shared.reply is not None else await self.ask(parent, name, ctx)
        return Entry(reply.attr, ENTRY_TTL_S, ATTR_TTL_S)

    async def ask(self, parent: int, name: bytes, ctx: Ctx) -> AttrReply:
        """Look `name` up at the metaserver, whatever is known of it here, and learn the
        answer (a cue for statahead)."""
        t = now()
        listing = self.listings.of(parent)
        try:
            reply = await self._call("lookup", LookupReq(parent, name, ctx))
        except FsError as exc:
            self._heard(parent, listing, name, t, exc, ctx, statahead=True)
            raise
        self._heard(parent, listing, name, t, reply, ctx, statahead=True)
        return reply

    async def ask_with_map(self, parent: int, name: bytes, ctx: Ctx) -> AttrReply:
        """`ask`, but a regular file `ctx` may read comes with its block map and read
        tokens (LookupReq.want_map, for a prefetcher: prefetch.py), and the lookups asked
        within two scheduling rounds of each other by one caller leave in one `lookups`
        call (up to LOOKUPS_MAX): a metadata call a file cost the metaserver as much again
        as the lookup. Not a cue for statahead (a prefetcher knows which names it wants;
        listing their whole directories cost it a fifth of the mount's time in a shuffled
        epoch)."""
        key = (ctx.uid, ctx.gid, tuple(ctx.groups))
        batch = self._asking_maps.get(key)
        if batch is None or len(batch.lookups) >= LOOKUPS_MAX:
            batch = self._asking_maps[key] = _Lookups()
            self._spawn(self._ask_many, key, batch)
        i = len(batch.lookups)
        batch.lookups.append(LookupReq(parent, name, ctx, want_map=True))
        await batch.done.wait()
        if batch.error is not None:
            raise FsError(batch.error.errno, batch.error.message)
        heard = batch.heard[i]
        if isinstance(heard, FsError):
            raise FsError(heard.errno, f"lookup of {name!r} in {parent} failed")
        return heard

    async def _ask_many(self, key: tuple, batch: "_Lookups") -> None:
        try:
            for _ in range(2):  # (the tasks woken with the first asker, and those they wake, join it)
                await trio.lowlevel.checkpoint()
            if self._asking_maps.get(key) is batch:
                del self._asking_maps[key]
            t = now()
            listings = [self.listings.of(one.parent) for one in batch.lookups]
            reply = await self._call("lookups", LookupsReq(list(batch.lookups)))
            if len(reply.replies) != len(batch.lookups):
                raise FsError(errno.EIO, "lookups answered a different number of lookups")
            for one, listing, got in zip(batch.lookups, listings, reply.replies):
                heard = got.reply if not got.errno and got.reply is not None else FsError(got.errno or errno.EIO)
                self._heard(one.parent, listing, one.name, t, heard, one.ctx, statahead=False)
                batch.heard.append(heard)
        except FsError as exc:
            batch.error = exc
        except BaseException:
            batch.error = FsError(errno.EIO, "lookups did not complete")
            raise
        finally:
            if self._asking_maps.get(key) is batch:
                del self._asking_maps[key]
            batch.done.set()

    def _heard(self, parent: int, listing: "Listing", name: bytes, t: float, heard: AttrReply | FsError,
               ctx: Ctx, statahead: bool) -> None:
        """What the metaserver answered to a lookup of `name` in `parent` sent at `t`."""
        if isinstance(heard, FsError):
            if heard.errno == errno.ENOENT:
                self.listings.forget(listing, name)
                if statahead:
                    self._served(parent, listing, t, None, ctx)
            return
        self.attrs.put(heard.attr, t)
        self.listings.learn(listing, name, heard.attr.ino, t, heard.cookie)
        if statahead:
            self._served(parent, listing, t, heard.cookie, ctx)

    def _served(self, parent: int, listing: Listing, t: float, cookie: Optional[int], ctx: Ctx) -> None:
        """A lookup the metaserver answered: the cue for statahead and listings."""
        listing.served = [s for s in listing.served if t - s < ENTRY_TTL_S] + [t]
        if len(listing.served) < STATAHEAD_TRIGGER or listing.fetching is not None:
            return
        if cookie is None:
            # Names that are not there: a directory being filled. Its whole listing answers
            # the next ones locally, if it is not too large to hold.
            if not listing.complete and t >= listing.listing_after:
                self._begin(self._list_all, parent, listing, ctx)
            return
        self._statahead(parent, listing, t, cookie, ctx)

    def list_ahead(self, parent: int, ctx: Ctx) -> None:
        """Start statahead of `parent` now, not after STATAHEAD_TRIGGER lookups went to the
        metaserver: for a caller that will look up many of its names soon (a prefetcher
        whose plan is of small files), whose lookups then wait for the page. Nothing
        starts while a page is under way or statahead is backed off there."""
        listing = self.listings.of(parent)
        if listing.fetching is None:
            self._statahead(parent, listing, now(), None, ctx)

    def _statahead(self, parent: int, listing: Listing, t: float, cookie: Optional[int], ctx: Ctx) -> None:
        """Fetch the next statahead batch of `parent`: from the start for a directory that
        fits in one, else from `cookie` (a name just looked up) or, without one, where
        the last batch ended."""
        if t < listing.ahead_off_until:
            return
        if not listing.ahead_active:
            listing.ahead_active, listing.ahead_fetched, listing.ahead_used = True, 0, 0
            start = 0
        elif listing.ahead_fetched >= 2 * READDIR_BATCH and listing.ahead_used < STATAHEAD_MIN_USE * listing.ahead_fetched:
            # The batches go unused (a random pattern in a large directory): stop for a while.
            listing.ahead_active, listing.ahead_off_until = False, t + STATAHEAD_BACKOFF_S
            return
        elif listing.ahead_small:
            start = 0
        elif cookie is not None:
            start = cookie - 1
        else:
            start = listing.ahead_next if listing.ahead_more else 0
        self._begin(self._ahead, parent, listing, ctx, start)

    # ------------------------------------------------------------------ fetching pages

    def _begin(self, job: Callable[..., Awaitable[None]], parent: int, listing: Listing, *args: Any) -> None:
        """Start fetching pages of `parent` in the background, unless a fetch is under way.
        `listing.fetching` is set at once: lookups arriving before the task runs wait for
        it instead of asking the metaserver themselves."""
        if listing.fetching is not None:
            return
        done = listing.fetching = trio.Event()

        async def run() -> None:
            try:
                await job(parent, listing, *args)
            finally:
                listing.fetching = None
                done.set()

        self._spawn(run)

    async def _ahead(self, parent: int, listing: Listing, ctx: Ctx, offset: int) -> None:
        """One statahead batch, starting after cookie `offset`."""
        reply = await self._page(parent, listing, offset, ctx)
        if reply is None:
            return
        listing.ahead_fetched += len(reply.entries)
        listing.ahead_more = reply.more
        if offset == 0 and not reply.more:
            listing.ahead_small = True
        if reply.entries:
            listing.ahead_next = reply.entries[-1].cookie
            listing.ahead_mark = reply.entries[len(reply.entries) // 2].cookie

    async def _list_all(self, parent: int, listing: Listing, ctx: Ctx) -> None:
        """Fetch every entry of a directory (up to LISTING_FETCH_MAX) to make it complete."""
        offset = 0
        while True:
            reply = await self._page(parent, listing, offset, ctx)
            if reply is None or not reply.more or not reply.entries:
                return
            if listing.run_entries >= LISTING_FETCH_MAX:
                listing.listing_after = now() + LISTING_RETRY_S
                return
            offset = reply.entries[-1].cookie

    async def _page(self, parent: int, listing: Listing, offset: int, ctx: Ctx) -> Optional[ReaddirReply]:
        t = now()
        try:
            reply = await self._call("readdir", ReaddirReq(parent, offset, READDIR_BATCH, ctx))
        except FsError:
            return None  # statahead is a hint: the lookups ask for themselves
        self.listed(parent, offset, reply, t)
        return reply

    def listed(self, parent: int, offset: int, reply: ReaddirReply, at: float) -> None:
        """A page of `parent` fetched at `at` (by statahead, or for a readdir of the kernel):
        remember its names and attributes; pages from the start that reach the end at one
        generation make the listing complete."""
        listing = self.listings.of(parent)
        for e in reply.entries:
            self.attrs.put(e.attr, at)
            self.listings.learn(listing, e.name, e.attr.ino, at, e.cookie)
        if offset == 0:
            listing.run_generation, listing.run_started, listing.run_entries = reply.generation, at, 0
        elif offset != listing.run_next or reply.generation != listing.run_generation:
            listing.run_generation = None
        listing.run_entries += len(reply.entries)
        listing.run_next = reply.entries[-1].cookie if reply.entries else -1
        if not reply.more and listing.run_generation == reply.generation:
            if not listing.complete or listing.generation != reply.generation:
                # Names learned before the run may be gone: keep only what the run saw.
                for name in [n for n, v in listing.names.items() if v[1] < listing.run_started]:
                    self.listings.forget(listing, name)
            listing.complete, listing.generation = True, reply.generation
            listing.confirmed_at = max(listing.confirmed_at, listing.run_started)
            listing.own.clear()
            listing.run_generation = None

    # ------------------------------------------------------------------ own changes

    def new_directory(self, attr: Attr, at: float) -> None:
        """A directory this client just made: empty, so its listing is complete."""
        self.attrs.put(attr, at)
        self.listings.drop(attr.ino)
        listing = self.listings.of(attr.ino)
        listing.complete, listing.generation, listing.confirmed_at = True, attr.generation, at
        listing.filling_until = at + ENTRY_TTL_S

    def added(self, parent: int, name: bytes, attr: Attr, parent_attr: Optional[Attr], at: float) -> None:
        """This client made entry `name` -> attr.ino in `parent` (the call was sent at `at`)."""
        self.attrs.put(attr, at)
        listing = self.listings.of(parent)
        self.listings.learn(listing, name, attr.ino, at, 0)
        self._changed(parent, listing, parent_attr, at)

    def removed(self, parent: int, name: bytes, parent_attr: Optional[Attr], at: float) -> None:
        listing = self.listings.get(parent)
        if listing is not None:
            self.listings.forget(listing, name)
        self._changed(parent, listing, parent_attr, at)

    def new_files_need_blocks(self, parent: int) -> bool:
        """Did the last file this client created in `parent` need a stored block 0? Then the
        next create there asks for one to be allocated with it."""
        listing = self.listings.get(parent)
        return listing is not None and listing.files_need_blocks

    def note_new_file(self, parent: int, needs_blocks: bool) -> None:
        self.listings.of(parent).files_need_blocks = needs_blocks

    def renamed(self, parent: int, name: bytes, new_parent: int, new_name: bytes, reply: RenameReply,
                exchange: bool, at: float) -> None:
        """A rename by this client (sent at `at`) went through."""
        for ino in (reply.moved, reply.replaced):
            self.attrs.drop(ino)  # ctime, and a replaced inode's link count
        src = self.listings.get(parent)
        if src is not None:
            self.listings.forget(src, name)
            if exchange:
                self.listings.learn(src, name, reply.replaced, at, 0)
        dst = self.listings.get(new_parent)
        if dst is not None:
            self.listings.learn(dst, new_name, reply.moved, at, 0)
        self._changed(parent, src, reply.parent, at)
        if new_parent != parent:
            self._changed(new_parent, dst, reply.new_parent, at)

    def distrust(self, parent: int, *names: bytes) -> None:
        """A change of this client failed in a way that says its listing of `parent` was
        wrong (EEXIST for a name it did not know): forget what it knew there."""
        self._changed_at = now()
        listing = self.listings.get(parent)
        if listing is not None:
            for name in names:
                self.listings.forget(listing, name)
            listing.complete = False
        self.attrs.drop(parent)

    def _changed(self, parent: int, listing: Optional[Listing], parent_attr: Optional[Attr], at: float) -> None:
        self._changed_at = now()
        if listing is not None:
            listing.filling_until = now() + ENTRY_TTL_S
        if parent_attr is None:
            self.attrs.drop(parent)
            if listing is not None:
                listing.complete = False
            return
        self.attrs.put(parent_attr, at)
        if listing is None or not listing.complete:
            return
        generation = parent_attr.generation
        if generation <= listing.generation or len(listing.own) >= OWN_CHANGES_MAX:
            listing.complete = False
            listing.own.clear()
            return
        # Replies of concurrent changes may come back out of order: the listing moves on
        # once the generations it has seen are contiguous (none was someone else's).
        listing.own[generation] = at
        while listing.generation + 1 in listing.own:
            listing.generation += 1
            listing.confirmed_at = max(listing.confirmed_at, listing.own.pop(listing.generation))
