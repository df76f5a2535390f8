"""Micro-benchmark of one metadata round trip from the trio client (docs/client.md).

Starts a real metaserver process on loopback (`python -m stripefs.cli meta`, state in a
temporary directory), connects the client library's transport to it and times
`getattr` of the root, the cheapest call there is, so the figure is the cost of the
round trip itself: the latency of one caller (median and 90th percentile of --calls
sequential calls), then the throughput of --callers callers at once.

    ./scripts/bench-rpc [--calls N] [--callers N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from stripefs.client import open_client
from stripefs.proto.credentials import init_ca, issue, load_credentials
from stripefs.proto.messages import InodeReq
from stripefs.proto.types import ROOT_INODE

REPO = Path(__file__).resolve().parent.parent

START_TIMEOUT_S = 30.0


def start_metaserver(state: Path) -> tuple[subprocess.Popen, str]:
    ready = state / "ready"
    ca = init_ca(state / "ca")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stripefs.cli", "meta", "--listen", "127.0.0.1:0", "--dir", str(state / "meta"),
         "--ready-file", str(ready), "--log-file", str(state / "meta.log"),
         "--credentials", str(issue(ca, "meta", "meta", state / "meta-credentials"))],
        cwd=REPO, stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"metaserver did not start; see {state / 'meta.log'}")
        time.sleep(0.05)
    return proc, ready.read_text().strip()


async def measure(address: str, creds, calls: int, callers: int) -> dict:
    async with open_client(address, creds, mountpoint="bench-rpc") as client:
        call = client.session.call
        req = InodeReq(ROOT_INODE)
        for _ in range(200):  # warm up: connection, stream, caches
            await call("getattr", req)
        latencies = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await call("getattr", req)
            latencies.append(time.perf_counter() - t0)
        latencies.sort()
        per_caller = max(1, calls // callers * 4)

        async def caller() -> None:
            for _ in range(per_caller):
                await call("getattr", req)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(callers):
                nursery.start_soon(caller)
        elapsed = time.perf_counter() - t0
    return {
        "calls": calls,
        "latency_median_ms": statistics.median(latencies) * 1e3,
        "latency_p90_ms": latencies[int(len(latencies) * 0.9)] * 1e3,
        "callers": callers,
        "throughput_calls_per_s": callers * per_caller / elapsed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=5000, help="sequential calls of the one caller")
    p.add_argument("--callers", type=int, default=64, help="concurrent callers for the throughput figure")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="stripefs-bench-rpc-") as tmp:
        state = Path(tmp)
        proc, address = start_metaserver(state)
        try:
            client = load_credentials(issue(state / "ca", "client", "bench-rpc", state / "client-credentials"))
            result = trio.run(measure, address, client,
                              args.calls, args.callers)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result["load_average"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"one caller: median {result['latency_median_ms']:.3f} ms, p90 {result['latency_p90_ms']:.3f} ms "
              f"({result['calls']} calls)")
        print(f"{result['callers']} callers: {result['throughput_calls_per_s']:,.0f} calls/s "
              f"(load average {result['load_average']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
