"""The metadata shortcuts of the client, through two real mounts: statahead, negative
lookups answered from a complete listing, background releases, small files inline. Each
test checks the rule that keeps the shortcut right (docs/client.md): nothing is seen
older than the attribute/entry timeout, and a close on one mount is seen by an open on
the other."""

from __future__ import annotations

import os
import signal
import time

import pytest

from stripefs.client import ATTR_TTL_S, ENTRY_TTL_S
from stripefs.proto.types import DEFAULT_INLINE_MAX_BYTES

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180)]

#: What a change may take to show on the other mount: the timeout, plus scheduling slack
#: (a loaded machine delays the FUSE requests themselves, not the cache lifetimes).
SLACK_S = 0.5


def poll_until(check, deadline: float) -> None:
    """Waits until check() holds; fails if it still does not at `deadline` (monotonic)."""
    while True:
        try:
            if check():
                return
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("not seen by the deadline")
        time.sleep(0.02)


def test_statahead_never_serves_attributes_older_than_the_timeout(mount_pair_dirs):
    a, b = mount_pair_dirs
    for i in range(300):
        (a / f"e{i:03d}").write_bytes(b"x")
    # b stats the entries in order: statahead fetches them in batches.
    for i in range(300):
        assert os.stat(b / f"e{i:03d}").st_size == 1
    # Changed on a right after b's statahead fetched them; b keeps looking.
    for i in range(0, 300, 10):
        with open(a / f"e{i:03d}", "ab") as f:
            f.write(b"yy")
    deadline = time.monotonic() + ATTR_TTL_S + SLACK_S
    for i in range(0, 300, 10):
        poll_until(lambda: os.stat(b / f"e{i:03d}").st_size == 3, deadline)
    # A fresh scan after the timeout sees every change at once.
    time.sleep(ATTR_TTL_S)
    assert all(os.stat(b / f"e{i:03d}").st_size == (3 if i % 10 == 0 else 1) for i in range(300))


def test_negative_answers_while_filling_never_hide_another_mounts_file_past_the_timeout(mount_pair_dirs):
    a, b = mount_pair_dirs
    # b fills the directory (a complete listing answers its lookups of new names) ...
    for i in range(50):
        (b / f"b{i:03d}").write_bytes(b"")
    # ... while a creates a name b has not seen; b keeps filling and looking for it.
    (a / "from-a").write_bytes(b"hello")
    created = time.monotonic()
    i = 50
    while not os.path.exists(b / "from-a"):
        (b / f"b{i:03d}").write_bytes(b"")
        i += 1
        assert time.monotonic() - created <= ENTRY_TTL_S + SLACK_S, "hidden past the entry timeout"
    assert (b / "from-a").read_bytes() == b"hello"
    # b's own creates are seen by a (nothing is held back on b).
    assert len(os.listdir(a)) == i + 1


def test_a_reader_sees_a_new_file_at_once(mount_pair_dirs):
    """Only a mount that is filling a directory answers negative lookups from its listing:
    one that just reads it asks, so it sees another mount's new file at once."""
    a, b = mount_pair_dirs
    for i in range(20):
        (a / f"f{i}").write_bytes(b"")
    assert sorted(os.listdir(b)) == sorted(f"f{i}" for i in range(20))  # b holds the listing
    for i in range(20):
        assert os.path.exists(b / f"f{i}")
    (a / "new").write_bytes(b"now")
    assert (b / "new").read_bytes() == b"now"


def test_created_renamed_removed_rewritten_seen_on_the_other_mount(mount_pair_dirs):
    a, b = mount_pair_dirs
    (a / "f").write_bytes(b"one")
    assert (b / "f").read_bytes() == b"one"
    os.rename(a / "f", a / "g")
    poll_until(lambda: not os.path.exists(b / "f") and (b / "g").read_bytes() == b"one",
               time.monotonic() + ENTRY_TTL_S + SLACK_S)
    (a / "g").write_bytes(b"two!")
    assert (b / "g").read_bytes() == b"two!"  # close-to-open: at once
    os.unlink(a / "g")
    poll_until(lambda: not os.path.exists(b / "g"), time.monotonic() + ENTRY_TTL_S + SLACK_S)


def test_inline_file_across_mounts_grows_and_shrinks(mount_pair_dirs):
    a, b = mount_pair_dirs
    small = os.urandom(20_000)
    (a / "s").write_bytes(small)
    assert (b / "s").read_bytes() == small
    big = os.urandom(DEFAULT_INLINE_MAX_BYTES + 100_000)
    with open(a / "s", "ab") as f:
        f.write(big)
    assert (b / "s").read_bytes() == small + big
    with open(a / "s", "r+b") as f:
        f.truncate(1000)
    assert (b / "s").read_bytes() == small[:1000]
    (a / "s").write_bytes(small[:500])  # rewritten small: inline again
    assert (b / "s").read_bytes() == small[:500]
    # b appends; a reads it whole.
    with open(b / "s", "ab") as f:
        f.write(b"tail")
    assert (a / "s").read_bytes() == small[:500] + b"tail"


def test_release_in_the_background_keeps_unlinked_files_readable(mount_pair_dirs):
    a, b = mount_pair_dirs
    data = os.urandom(30_000)
    (a / "u").write_bytes(data)
    with open(b / "u", "rb") as held:
        os.unlink(a / "u")
        time.sleep(0.2)
        assert held.read() == data  # the open on b keeps it
    poll_until(lambda: not os.path.exists(b / "u"), time.monotonic() + ENTRY_TTL_S + SLACK_S)


def test_inline_files_survive_a_metaserver_sigkill(cluster):
    from conftest import mount_skip_reason

    if mount_skip_reason():
        pytest.skip(mount_skip_reason())
    m = cluster.mount()
    files = {f"s{i}": os.urandom(100 + 997 * i) for i in range(40)}
    for name, data in files.items():
        (m / name).write_bytes(data)  # closed: committed inline
    status = cluster.status()
    assert status["inline_files"] == 40
    cluster.meta.signal(signal.SIGKILL)
    cluster.meta.wait_exit(10)
    cluster.start_meta(listen=cluster.meta_addr)
    for name, data in files.items():
        assert (m / name).read_bytes() == data
    other = cluster.mount()
    for name, data in files.items():
        assert (other / name).read_bytes() == data
    assert cluster.status()["inline_bytes"] == sum(len(d) for d in files.values())
