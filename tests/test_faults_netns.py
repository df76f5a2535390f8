"""A data server cut off by the network: each data server runs in a network namespace of
its own, joined by a veth pair to a bridge on the host (addresses from 198.18.0.0/15,
see tests/faults.py NetNamespaces); the metaserver listens on 0.0.0.0 and the mount runs on
the host. Setting one server's link down leaves the process running but unreachable:
reads and writes go on without error, the metaserver declares it dead and restores R
replicas; when the link comes back the server is reconciled and fsck is clean.
"""

from __future__ import annotations

import os
import time

import pytest
from faults import (
    REPAIR_WITHIN_S,
    MiB,
    NetNamespaces,
    fast_cluster,
    netns_skip_reason,
    pattern,
    run_within,
    sha256,
    sha256_path,
    wait_fsck_clean,
    wait_replicas_right,
    wait_replicated,
    wait_state,
)

pytestmark = [pytest.mark.mount, pytest.mark.allow_tracebacks, pytest.mark.timeout(180)]


#: A write while a server is cut off must end by then (30 s put deadline, then elsewhere).
CUT_WRITE_WITHIN_S = 60.0


def write_bounded(path, data: bytes) -> None:
    """Writes and closes `path` in a thread: fails (instead of hanging the test) when the
    write is not done within CUT_WRITE_WITHIN_S."""
    run_within(lambda: path.write_bytes(data), CUT_WRITE_WITHIN_S, f"write of {path.name} with a cut-off server")


@pytest.fixture
def namespaces():
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    ns = NetNamespaces(3)
    ns.setup()
    try:
        ns.wait_connected()
        yield ns
    finally:
        ns.cleanup()


def cut_cluster(tmp_path, ns: NetNamespaces):
    return fast_cluster(
        tmp_path / "cluster", meta_listen="0.0.0.0:0",
        data_prefix={i: ns.prefix(i) for i in range(3)},
        data_listen={i: f"{ns.ns_addr(i)}:0" for i in range(3)},
        data_meta_host={i: ns.host_addr(i) for i in range(3)},
    )


def check_replicas(c, files: dict[str, bytes]) -> None:
    wait_replicas_right(c, files, MiB, 2)


def test_data_server_cut_off_by_link_down(tmp_path, namespaces):
    ns = namespaces
    c = cut_cluster(tmp_path, ns)
    try:
        assert all(p.address.startswith(ns.net) for p in c.data), [p.address for p in c.data]
        m = c.mount()
        d = m.path / "d"
        d.mkdir()
        os.setxattr(d, "stripefs.block_size", str(MiB).encode())
        old = pattern(1, 24 * MiB)
        (d / "old").write_bytes(old)
        reader = c.mount()
        ns.cut(0)
        cut_at = time.monotonic()
        # Reads fail over to the replicas still reachable.
        assert sha256_path(reader / "d/old") == sha256(old)
        print(f"read with a cut-off server took {time.monotonic() - cut_at:.1f} s")
        assert c.data[0].running()  # cut off, not dead
        wait_state(c, c.data[0].address, "dead")
        took = wait_replicated(c, REPAIR_WITHIN_S)
        print(f"R=2 restored {took:.1f} s after the cut-off server was declared dead")
        # Written while it is known dead: placed on the others.
        new = pattern(2, 24 * MiB)
        write_bounded(d / "new", new)
        fresh = c.mount()
        for name, data in (("old", old), ("new", new)):
            assert sha256_path(fresh / "d" / name) == sha256(data)
        # The link comes back: the server is heard from again and reconciled.
        ns.heal(0)
        wait_state(c, c.data[0].address, "up", timeout_s=30)
        wait_replicated(c, REPAIR_WITHIN_S)
        check_replicas(c, {"d/old": old, "d/new": new})
        wait_fsck_clean(c)
    finally:
        c.close()


def test_write_while_a_data_server_is_cut_off(tmp_path, namespaces):
    ns = namespaces
    c = cut_cluster(tmp_path, ns)
    try:
        m = c.mount()
        d = m.path / "d"
        d.mkdir()
        os.setxattr(d, "stripefs.block_size", str(MiB).encode())
        (d / "first").write_bytes(pattern(4, 8 * MiB))  # connections to every server are open
        ns.cut(0)  # before the metaserver notices: blocks still get placed there
        new = pattern(3, 24 * MiB)
        write_bounded(d / "new", new)
        assert sha256_path(c.mount() / "d/new") == sha256(new)
    finally:
        c.close()
