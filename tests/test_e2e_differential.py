"""End to end, differential: random file operations applied both to a directory in a
stripefs mount and to a local directory must give the same results, step by step.

A Hypothesis state machine opens files with every open mode, writes and reads at random
offsets around block boundaries (the test directories use 64 KiB blocks), truncates up
and down, appends, renames onto existing files, unlinks files that are still open and
keeps using their handles, fsyncs and closes. Each step's result — bytes, sizes, offsets,
or the errno — must be identical on both sides.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cluster import Cluster

pytestmark = [pytest.mark.mount, pytest.mark.slow]

#: Layout of the test directories: small blocks, so that a few MiB cross many boundaries.
block_size_bytes = 64 * 1024
BLOCK_SIZE_XATTR = "stripefs.block_size"
max_io_bytes = 64 * 1024
max_offset_bytes = 3 * 1024 * 1024
max_open_handles = 6

NAMES = ["a", "b", "c", "d"]
OPEN_MODES = {
    "r": os.O_RDONLY,
    "r+": os.O_RDWR,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "x+": os.O_RDWR | os.O_CREAT | os.O_EXCL,
}

names = st.sampled_from(NAMES)
# Offsets are either anywhere or within a few bytes of a block boundary.
offsets = st.one_of(
    st.integers(0, max_offset_bytes),
    st.builds(
        lambda k, d: max(0, k * block_size_bytes + d),
        st.integers(0, max_offset_bytes // block_size_bytes),
        st.integers(-3, 3),
    ),
)
sizes = st.one_of(
    st.integers(0, max_io_bytes),
    st.sampled_from([1, block_size_bytes - 1, block_size_bytes, block_size_bytes + 1]),
)
handles = st.integers(min_value=0, max_value=1000)
seeds = st.integers(0, 2**32 - 1)


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def attempt(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """("ok", result) or ("err", errno name), so two sides compare as values."""
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


class Handle:
    def __init__(self, mfd: int, lfd: int, what: str) -> None:
        self.mfd, self.lfd, self.what = mfd, lfd, what


class DifferentialMachine(RuleBasedStateMachine):
    #: Set by the test: where the example directories go.
    mount_base: Path
    local_base: Path
    _counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[Handle] = []
        n = next(self._counter)
        self.mdir = self.mount_base / f"ex{n:04d}"
        self.ldir = self.local_base / f"ex{n:04d}"
        self.mdir.mkdir()
        self.ldir.mkdir()
        os.setxattr(self.mdir, BLOCK_SIZE_XATTR, str(block_size_bytes).encode())

    # ---------------------------------------------------------------- helpers

    def both(self, what: str, fn: Callable[[Path], Any]) -> tuple[str, Any]:
        """Runs fn on both directories' paths; the results must match."""
        rm = attempt(fn, self.mdir)
        rl = attempt(fn, self.ldir)
        assert rm == rl, f"{what}: mount gave {rm!r:.300}, local gave {rl!r:.300}"
        return rm

    def both_fd(self, h: Handle, what: str, fn: Callable[[int], Any]) -> tuple[str, Any]:
        rm = attempt(fn, h.mfd)
        rl = attempt(fn, h.lfd)
        assert rm == rl, f"{what} on {h.what}: mount gave {rm!r:.300}, local gave {rl!r:.300}"
        return rm

    def pick(self, i: int) -> Handle:
        return self.handles[i % len(self.handles)]

    # ---------------------------------------------------------------- namespace

    @initialize(name=names, seed=seeds, size=sizes)
    def seed_file(self, name: str, seed: int, size: int) -> None:
        data = payload(seed, size)
        self.both(f"create {name}", lambda d: (d / name).write_bytes(data))

    @precondition(lambda self: len(self.handles) < max_open_handles)
    @rule(name=names, mode=st.sampled_from(sorted(OPEN_MODES)))
    def open(self, name: str, mode: str) -> None:
        flags = OPEN_MODES[mode]
        rm = attempt(os.open, self.mdir / name, flags, 0o644)
        rl = attempt(os.open, self.ldir / name, flags, 0o644)
        if rm[0] == "ok" and rl[0] == "ok":
            self.handles.append(Handle(rm[1], rl[1], f"{name} opened {mode!r}"))
            return
        for r in (rm, rl):
            if r[0] == "ok":
                os.close(r[1])
        assert rm == rl, f"open {name} {mode!r}: mount gave {rm!r}, local gave {rl!r}"

    @rule(src=names, dst=names)
    def rename(self, src: str, dst: str) -> None:
        self.both(f"rename {src} {dst}", lambda d: os.rename(d / src, d / dst))

    @rule(name=names)
    def unlink(self, name: str) -> None:
        self.both(f"unlink {name}", lambda d: os.unlink(d / name))

    @rule(name=names)
    def stat_size(self, name: str) -> None:
        self.both(f"stat {name}", lambda d: os.stat(d / name).st_size)

    @rule(name=names)
    def read_whole(self, name: str) -> None:
        self.both(f"read whole {name}", lambda d: (d / name).read_bytes())

    @invariant()
    def same_names(self) -> None:
        self.both("listdir", lambda d: sorted(os.listdir(d)))

    # ---------------------------------------------------------------- handles

    @precondition(lambda self: self.handles)
    @rule(h=handles, offset=offsets, size=sizes, seed=seeds)
    def write_at(self, h: int, offset: int, size: int, seed: int) -> None:
        handle, data = self.pick(h), payload(seed, size)

        def op(fd: int) -> tuple[int, int, int]:
            pos = os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, data)
            return pos, written, os.lseek(fd, 0, os.SEEK_CUR)

        self.both_fd(handle, f"write {size} bytes at {offset}", op)

    @precondition(lambda self: self.handles)
    @rule(h=handles, size=sizes, seed=seeds)
    def append(self, h: int, size: int, seed: int) -> None:
        handle, data = self.pick(h), payload(seed, size)

        def op(fd: int) -> tuple[int, int, int]:
            end = os.lseek(fd, 0, os.SEEK_END)
            written = os.write(fd, data)
            return end, written, os.lseek(fd, 0, os.SEEK_CUR)

        self.both_fd(handle, f"append {size} bytes", op)

    @precondition(lambda self: self.handles)
    @rule(h=handles, offset=offsets, size=sizes)
    def read_at(self, h: int, offset: int, size: int) -> None:
        def op(fd: int) -> tuple[int, bytes, int]:
            pos = os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, size)
            return pos, data, os.lseek(fd, 0, os.SEEK_CUR)

        self.both_fd(self.pick(h), f"read {size} bytes at {offset}", op)

    @precondition(lambda self: self.handles)
    @rule(h=handles, offset=offsets, size=sizes)
    def pread(self, h: int, offset: int, size: int) -> None:
        self.both_fd(self.pick(h), f"pread {size} at {offset}", lambda fd: os.pread(fd, size, offset))

    @precondition(lambda self: self.handles)
    @rule(h=handles, length=offsets)
    def ftruncate(self, h: int, length: int) -> None:
        self.both_fd(self.pick(h), f"ftruncate to {length}", lambda fd: os.ftruncate(fd, length))

    @precondition(lambda self: self.handles)
    @rule(h=handles)
    def fstat_size(self, h: int) -> None:
        self.both_fd(self.pick(h), "fstat", lambda fd: os.fstat(fd).st_size)

    @precondition(lambda self: self.handles)
    @rule(h=handles)
    def fsync(self, h: int) -> None:
        self.both_fd(self.pick(h), "fsync", os.fsync)

    @precondition(lambda self: self.handles)
    @rule(h=handles)
    def close(self, h: int) -> None:
        handle = self.handles.pop(h % len(self.handles))
        self.both_fd(handle, "close", os.close)

    def teardown(self) -> None:
        for handle in self.handles:
            for fd in (handle.mfd, handle.lfd):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.handles.clear()


@pytest.mark.timeout(600)
def test_mount_behaves_like_a_local_directory(engine_module_cluster: Cluster, tmp_path: Path) -> None:
    in_ci = os.environ.get("CI") == "true"
    # Two mounts, the test through the second: on PostgreSQL it starts at the second
    # metaserver, while the first mount holds a session at the other.
    first = engine_module_cluster.mount(tmp_path / "mnt0")
    m = engine_module_cluster.mount(tmp_path / "mnt")
    try:
        (tmp_path / "local").mkdir()
        (m.path / "diff").mkdir()
        os.setxattr(m.path / "diff", BLOCK_SIZE_XATTR, str(block_size_bytes).encode())
        DifferentialMachine.mount_base = m.path / "diff"
        DifferentialMachine.local_base = tmp_path / "local"
        run_state_machine_as_test(
            DifferentialMachine,
            settings=settings(
                max_examples=25,
                stateful_step_count=30,
                deadline=None,
                database=None,
                # CI runs the same examples every time; developers explore new ones.
                derandomize=in_ci,
                # Shrinking through a mount can take minutes; CI reports the unshrunk
                # case (at most stateful_step_count steps) and leaves shrinking to a
                # developer rerunning it.
                phases=[p for p in Phase if p != Phase.shrink or not in_ci],
                report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck),
                print_blob=True,
            ),
        )
    finally:
        m.close()
        first.close()
