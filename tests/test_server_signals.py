"""A server process takes its stop signals by waiting for them (proto/logsetup.py
`hold_stop_signals`, `wait_for_stop`), never in a handler that runs wherever the main
thread happened to be: a signal sent the moment a server starts, or several sent while it
is logging, stop it cleanly with exit code 0 and no traceback. A server that cannot say it
serves (its ready file) stops with exit code 1 and says why, as for any failure to start."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0


def _argv(role: str, tmp_path: Path, pki, ready: str = "ready", extra: tuple[str, ...] = ()) -> list[str]:
    common = ["--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / ready),
              "--log-file", str(tmp_path / "server.log"), *extra]
    if role == "meta":
        return [sys.executable, "-m", "stripefs.metaserver", *common, "--dir", str(tmp_path / "meta"),
                "--credentials", str(pki.bundle("meta"))]
    # No metaserver: the data server keeps trying to register, and logging that, meanwhile.
    return [sys.executable, "-m", "stripefs.dataserver", *common, "--dir", str(tmp_path / "data"),
            "--meta", "127.0.0.1:1", "--heartbeat-interval-s", "0.05",
            "--credentials", str(pki.bundle("data", "d0"))]


@contextlib.contextmanager
def _server(role: str, tmp_path: Path, pki, ready: str = "ready",
            extra: tuple[str, ...] = ()) -> Iterator[subprocess.Popen]:
    """The server process, its output in server.out; killed on the way out if still running."""
    with (tmp_path / "server.out").open("wb") as sink:
        proc = subprocess.Popen(_argv(role, tmp_path, pki, ready, extra), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for(path: Path, proc: subprocess.Popen, poll_s: float) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        assert proc.poll() is None, f"the server exited with {proc.returncode} before {path.name} existed"
        assert time.monotonic() < deadline, f"no {path.name} after {START_TIMEOUT_S} s"
        time.sleep(poll_s)


@pytest.mark.parametrize("role", ["meta", "data"])
@pytest.mark.parametrize("when", ["starting", "serving"])
def test_a_stop_signal_stops_a_server_cleanly_whenever_it_comes(role, when, tmp_path, pki):
    """"starting": SIGTERM as soon as the server's log file exists, long before it serves
    (a handler installed late would let the default action kill it: exit -15).
    "serving": three SIGTERMs and a SIGINT in a row while it logs (a handler that logs
    could be run inside a log write: "reentrant call", a traceback on stderr)."""
    log, ready, out = tmp_path / "server.log", tmp_path / "ready", tmp_path / "server.out"
    with _server(role, tmp_path, pki) as proc:
        if when == "starting":
            _wait_for(log, proc, 0.001)
            proc.send_signal(signal.SIGTERM)
        else:
            _wait_for(ready, proc, 0.02)
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
                proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    # One of the "serving" case's signals stops it (pending together, SIGINT is taken
    # first); the rest wait, blocked, until the process exits.
    assert text.count(", stopping") == 1, text
    assert "got SIGTERM, stopping" in text or (when == "serving" and "got SIGINT, stopping" in text), text
    assert text.rstrip().endswith("stopped"), text
    for bad in ("Traceback", "Logging error", "reentrant"):
        assert bad not in text and bad not in out.read_text(), out.read_text()


@pytest.mark.parametrize("role", ["meta", "data"])
def test_a_server_that_cannot_write_its_ready_file_stops_and_says_why(role, tmp_path, pki):
    """Its directory is missing: exit code 1, the reason in the log, no traceback (the
    data server used to raise joining a heartbeat thread it had not started, hiding the
    cause; the metaserver left its store open and printed the OSError's traceback)."""
    log, out = tmp_path / "server.log", tmp_path / "server.out"
    with _server(role, tmp_path, pki, ready="missing/ready") as proc:
        assert proc.wait(timeout=30) == 1
    text = log.read_text()
    assert f"cannot start: the ready file {tmp_path / 'missing/ready'}: No such file or directory" in text, text
    assert "Traceback" not in text and "Traceback" not in out.read_text(), out.read_text()


@pytest.mark.parametrize("role", ["meta", "data"])
def test_a_server_whose_metrics_address_is_taken_stops_and_says_why(role, tmp_path, pki):
    """Another process listens on the metrics address: exit code 1 and the reason in the
    log, the server's own listener stopped on the way out like any other stop."""
    log, out = tmp_path / "server.log", tmp_path / "server.out"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        with _server(role, tmp_path, pki, extra=("--metrics-listen", address)) as proc:
            assert proc.wait(timeout=30) == 1
    text = log.read_text()
    assert f"cannot start: metrics on {address}" in text, text
    assert not (tmp_path / "ready").exists()
    assert "Traceback" not in text and "Traceback" not in out.read_text(), out.read_text()
