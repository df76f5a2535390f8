"""Prometheus metrics (proto/metrics.py) scraped over HTTP from every role of a real
cluster (metaserver, data servers, mounts), before and after real work: the numbers move
with what was done."""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster
from stripefs.proto.services import DATA_SERVICE

pytestmark = [pytest.mark.mount, pytest.mark.timeout(240)]

METRICS_LINE = re.compile(r"metrics on http://(\S+)/metrics")


def metrics_address(log: Path, timeout: float = 30.0) -> str:
    """The address a role logged it serves metrics on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            found = METRICS_LINE.search(log.read_text(errors="replace"))
            if found:
                return found.group(1)
        time.sleep(0.1)
    raise AssertionError(f"no metrics address in {log}")


def scrape(address: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def eventually(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_every_role_serves_metrics_that_follow_real_work(tmp_path):
    meta_file = tmp_path / "meta.metrics"
    listen = ["--metrics-listen", "127.0.0.1:0"]
    with Cluster(tmp_path / "c", dataservers=2, meta_args=[*listen, "--metrics-ready-file", str(meta_file)],
                 data_args=[*listen, "--scrub-interval-s", "1", "--scrub-rate-mib-s", "1000"],
                 mount_args=listen) as c:
        meta = meta_file.read_text().strip()
        data = [metrics_address(c.logs_dir / f"data-{i}.log") for i in range(2)]
        writer_mount = c.mount()
        writer = metrics_address(c.logs_dir / "mount-1.log")
        m0, d0, w0 = scrape(meta), [scrape(a) for a in data], scrape(writer)

        # Work: 20 small files, one 10 MiB file (R = 2: on both data servers), a failed
        # lookup and getxattr, and a cold read of the big file on a second mount.
        for i in range(20):
            (writer_mount / f"small-{i}").write_bytes(b"x" * 100)
        big = os.urandom(10 * 1024 * 1024)
        (writer_mount / "big").write_bytes(big)
        assert not (writer_mount / "missing").exists()
        with pytest.raises(OSError):
            os.getxattr(writer_mount / "small-0", "user.none")  # ENODATA
        reader_mount = c.mount()
        reader = metrics_address(c.logs_dir / "mount-2.log")
        r0 = scrape(reader)
        with open(reader_mount / "big", "rb") as f:
            got = f.read(1024 * 1024)
            # While its reader is inside a block, the mount's cache holds it.
            assert value(scrape(reader), "stripefs_client_block_cache_bytes") >= 4 * 1024 * 1024
            got += f.read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()

        # The metaserver: calls by method and result, their latency, and its status figures.
        m1 = scrape(meta)
        creates = value(m1, "stripefs_rpc_requests_total", method="mknod", result="ok") - \
            value(m0, "stripefs_rpc_requests_total", method="mknod", result="ok")
        assert creates >= 21
        assert value(m1, "stripefs_rpc_seconds_count", method="mknod") >= creates
        assert value(m1, "stripefs_rpc_requests_total", method="lookup", result="ENOENT") >= 1
        assert value(m1, "stripefs_meta_duties_holder") == 1
        assert value(m1, "stripefs_meta_dataservers", state="up") == 2
        assert "process_resident_memory_bytes" in {n for n, _ in m1}

        def status_moved():
            s = scrape(meta)
            assert value(s, "stripefs_meta_files") >= 21
            assert value(s, "stripefs_meta_sessions") >= 2
            assert value(s, "stripefs_meta_blocks") >= 3
            assert value(s, "stripefs_meta_file_bytes") >= len(big) + 2000
            assert value(s, "stripefs_meta_dataserver_capacity_bytes") > 0
        eventually(status_moved)

        # The data servers: bytes stored and sent, store figures, the scrubber.
        d1 = [scrape(a) for a in data]
        written = sum(value(d1[i], "stripefs_data_written_bytes_total") - value(d0[i], "stripefs_data_written_bytes_total")
                      for i in range(2))
        assert written >= 2 * len(big)
        sent = sum(value(d1[i], "stripefs_data_read_bytes_total") - value(d0[i], "stripefs_data_read_bytes_total")
                   for i in range(2))
        assert sent >= len(big)
        assert sum(value(s, "stripefs_data_blocks") for s in d1) >= 6
        assert all(value(s, "stripefs_data_capacity_bytes") > value(s, "stripefs_data_free_bytes") > 0 for s in d1)
        assert sum(value(s, "stripefs_rpc_requests_total", service=DATA_SERVICE, result="ok") for s in d1) > 0
        eventually(lambda: _assert(all(value(scrape(a), "stripefs_data_scrub_blocks_total") >= 3 for a in data)))

        # The mounts: FUSE operations by result, bytes, metadata calls, the block cache.
        w1 = scrape(writer)
        assert value(w1, "stripefs_fuse_ops_total", op="create", result="ok") - \
            value(w0, "stripefs_fuse_ops_total", op="create", result="ok") >= 21
        assert value(w1, "stripefs_fuse_ops_total", op="getxattr", result="ENODATA") >= 1
        assert value(w1, "stripefs_fuse_op_seconds_count", op="write") >= 1
        assert value(w1, "stripefs_client_written_bytes_total") - value(w0, "stripefs_client_written_bytes_total") \
            >= len(big) + 2000
        assert value(w1, "stripefs_client_meta_calls_total", method="mknod", result="ok") >= 21
        assert value(w1, "stripefs_client_writeback_limit_bytes") > 0
        r1 = scrape(reader)
        assert value(r1, "stripefs_client_read_bytes_total") - value(r0, "stripefs_client_read_bytes_total") >= len(big)
        assert value(r1, "stripefs_client_block_cache_misses_total") >= 3  # cold: three blocks fetched
        # Read whole and closed: its blocks left the mount's cache (the kernel's holds them).
        assert value(r1, "stripefs_client_block_cache_bytes") == 0
        assert value(r1, "stripefs_client_open_files") == 0

        # The sample dashboard and alert rules name only metrics that exist.
        exported = {name for samples in (m1, *d1, w1, r1) for name, _ in samples}
        monitoring = Path(__file__).resolve().parent.parent / "docs" / "monitoring"
        for f in ("grafana-dashboard.json", "alerts.yml"):
            named = set(re.findall(r"\b((?:stripefs|process)_[a-z0-9_]+)", (monitoring / f).read_text()))
            assert named and named <= exported, f"{f} names metrics no role exports: {sorted(named - exported)}"


def _assert(ok: bool) -> None:
    assert ok


def test_a_bad_metrics_address_stops_the_role_with_a_clear_error(tmp_path):
    from cluster import cli

    import subprocess

    c = Cluster(tmp_path / "c", dataservers=0, start=False)
    c.pki  # noqa: B018 - the credentials exist
    out = subprocess.run(cli("meta", "--listen", "127.0.0.1:0", "--dir", str(tmp_path / "m"),
                             "--credentials", str(c.pki.bundle("meta")), "--metrics-listen", "nonsense"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "--metrics-listen wants HOST:PORT" in out.stderr


def test_the_capability_check_before_each_write_is_answered_in_pyfuse3(tmp_path):
    """The kernel asks for security.capability before every write(2) (FUSE has no
    S_NOSEC): once the mount knows an open file has none, pyfuse3 answers it (ENODATA)
    without calling the mount's Python (fs/fuse/ops.py _capability_known)."""
    with Cluster(tmp_path / "c", dataservers=1, mount_args=["--metrics-listen", "127.0.0.1:0"]) as c:
        m = c.mount()
        address = metrics_address(c.logs_dir / "mount-1.log")
        (m / "old").write_bytes(b"x")

        def getxattrs() -> float:
            return value(scrape(address), "stripefs_fuse_ops_total", op="getxattr")

        for path in (m / "new", m / "old"):  # created by the writer; opened
            before = getxattrs()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT)
            try:
                for i in range(200):
                    os.pwrite(fd, b"y" * 4096, i * 4096)
            finally:
                os.close(fd)
            assert getxattrs() - before <= 1, path  # (an opened file: the first is asked)
            assert path.read_bytes() == b"y" * 4096 * 200
            with pytest.raises(OSError) as e:  # the answer pyfuse3 gave, asked of the mount
                os.getxattr(path, "security.capability")
            assert e.value.errno == 61  # ENODATA


def test_a_sequential_read_reaches_the_mount_in_requests_of_a_whole_block(tmp_path):
    """Where the kernel allows it (fs.fuse.max_pages_limit, Linux 6.13+, raised by a mount
    run as root), the INIT reply asks for READ requests of 1,024 pages and the mount's
    readahead is as large: a cold sequential read of 64 MiB reaches the mount as ~16 READs
    of 4 MiB instead of 64 of 1 MiB (fs/fuse/mount.py READ_PAGES), every byte intact."""
    limit = Path("/proc/sys/fs/fuse/max_pages_limit")
    if os.geteuid() != 0 or not limit.exists():
        pytest.skip("needs root and a kernel with fs.fuse.max_pages_limit (6.13+)")
    data = os.urandom(64 << 20)
    with Cluster(tmp_path / "c", dataservers=2, mount_args=["--metrics-listen", "127.0.0.1:0"]) as c:
        (c.mount() / "f").write_bytes(data)
        m = c.mount()  # a fresh mount: nothing of the file in its page cache
        address = metrics_address(c.logs_dir / "mount-2.log")
        assert int(limit.read_text()) >= 1024
        before = value(scrape(address), "stripefs_fuse_ops_total", op="read")
        got = bytearray()
        with open(m / "f", "rb", buffering=0) as f:
            while piece := f.read(8 << 20):
                got += piece
        reads = value(scrape(address), "stripefs_fuse_ops_total", op="read") - before
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        # 16 whole blocks, and the kernel's first, smaller readahead windows.
        assert 16 <= reads <= 24, reads
