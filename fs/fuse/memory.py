"""The mount hands what glibc holds free back to the system (proto/malloc.py `trim`) at two
moments: once it has gone idle, and when a spell of reads ends in a write.

A 1 GiB read left a mount 385-468 MiB resident with its block cache empty: freed
fragments glibc keeps in its heaps, which the buffers of a write do not reuse. Trimmed
when idle, 81-93 MiB, and a 1 GiB write after it peaked at 338-349 MiB instead of 438-477
(the bound is the write-back budget + 100 MiB; docs/client.md, "Memory"). A write straight
after a read, with no idle second between them, is the second moment: the first write
after READ_SPELL_BYTES or more were read with no write between them (loading a
checkpoint, then saving one). A copy through the mount, which reads and writes by turns,
never makes such a spell, and is not trimmed while it runs: each trim costs the pages it
hands back a fault each (~2.3 us a 4 KiB page here) when they are used again.
"""

from __future__ import annotations

import logging

import trio

from stripefs.proto import malloc, metrics

log = logging.getLogger("stripefs.fuse")

_trims = metrics.mount_memory()

#: Idle: no READ, WRITE or RELEASE of a file for a whole IDLE_TRIM_INTERVAL_S after some came.
IDLE_TRIM_INTERVAL_S = 1.0
#: Nothing is handed back unless glibc holds more than this free.
TRIM_ABOVE_BYTES = 32 * 1024 * 1024
#: A spell of reads: this many bytes read with no write between them.
READ_SPELL_BYTES = 64 * 1024 * 1024


class DataActivity:
    """What the mount's READ, WRITE and RELEASE requests of files have been doing, counted
    by ops.py as it answers them: how many came (an idle mount's count stands still) and
    how many bytes were read since the last write (`spell_ended` is set by a write that
    ends a spell of reads). A RELEASE counts once it is answered: a file's close is when
    the mount lets go of the blocks its reader's last reads left in the cache, so the idle
    trim comes a second after it, not before it."""

    __slots__ = ("requests", "read_run", "spell_ended")

    def __init__(self) -> None:
        self.requests = 0
        self.read_run = 0
        self.spell_ended = trio.Event()

    def read(self, size: int) -> None:
        self.requests += 1
        self.read_run += size

    def write(self) -> None:
        self.requests += 1
        if self.read_run >= READ_SPELL_BYTES:
            self.spell_ended.set()
        self.read_run = 0

    def released(self) -> None:
        self.requests += 1


async def hand_back_memory(activity: DataActivity) -> None:
    """Runs for the mount's life. A mount that stays idle is trimmed once for its idle spell,
    not again and again (what was handed back stays counted as free by glibc)."""
    seen = trimmed_at = activity.requests
    while True:
        with trio.move_on_after(IDLE_TRIM_INTERVAL_S):
            await activity.spell_ended.wait()
        now = activity.requests
        if activity.spell_ended.is_set():
            activity.spell_ended = trio.Event()
            why, due = "spell", True
        else:
            why, due = "idle", now == seen and now != trimmed_at  # a whole interval, after some I/O
        seen = now
        if due:
            trimmed_at = now
            free = await trio.to_thread.run_sync(malloc.trim, TRIM_ABOVE_BYTES)
            if free > TRIM_ABOVE_BYTES:
                _trims.labels(why).inc()
                log.debug("%s: handed back what glibc held free (%d MiB)", why, free >> 20)
