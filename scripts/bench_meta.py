"""Workload 7 of the benchmark: the metadata engines side by side (`scripts/bench --only 7`,
or `python scripts/bench_meta.py` alone).

For each configuration, SQLite with its one metaserver, PostgreSQL with one metaserver
and PostgreSQL with two, on a fresh cluster (tests/cluster.py; PostgreSQL is a private
instance, tests/pg.py):

- aggregate creates, stats and unlinks per second from 8 processes over 2 mounts (4 each;
  with two metaservers each mount starts at its own), each process in a directory of its
  own;
- the metaserver's cost of one create and one stat (lookup: one call at a time from the
  client library, no cache in the way) with N files already in the namespace, for each N
  of --fill (filled through the client library, 4 processes with many calls in flight
  each, 1,000 files a directory): the cost must stay flat as N grows;
- `ls` of a directory of --ls entries: the time to the first entry and to the last (the
  listing streams in pages; the mount's memory stays bounded).

Everything is torn down on the way out. docs/benchmark.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

#: (engine, metaservers) of each configuration, in the order measured.
CONFIGS = (("sqlite", 1), ("postgres", 1), ("postgres", 2))
PROCS = 8
MOUNTS = 2
FILES_PER_DIR = 1000
#: Client processes filling the namespace, and library calls in flight in each.
FILL_PROCS = 4
FILL_IN_FLIGHT = 32
#: Creates and stats timed for the per-operation cost at each fill level.
COST_OPS = 500


def log(msg: str) -> None:
    print(f"[bench-meta {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fill_job(meta_addr: str, credentials: str, top: str, n: int, per_dir: int, worker: int, workers: int,
             barrier, results) -> None:
    """Worker `worker` of `workers` filling /top (made by whichever comes first) with its
    share of n empty files through the client library, FILL_IN_FLIGHT calls at a time:
    per_dir a subdirectory, subdirectory k being worker k % workers's (per_dir 0: all in /top,
    file i being worker i % workers's). In a process of its own (a fresh client); puts
    ("ok", start, end) on the monotonic clock, or ("error", why, 0)."""
    try:
        import errno

        import trio

        from stripefs.client import Ctx, FsError, open_client
        from stripefs.proto.credentials import load_credentials
        from stripefs.proto.types import ROOT_INODE

        root = Ctx(0, 0, 0)

        async def main() -> tuple[float, float]:
            async with open_client(meta_addr, load_credentials(credentials)) as client:
                try:
                    top_ino = (await client.mkdir(ROOT_INODE, top.encode(), 0o755, root)).ino
                except FsError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                    top_ino = (await client.lookup(ROOT_INODE, top.encode())).ino
                limit = trio.Semaphore(FILL_IN_FLIGHT)
                barrier.wait()
                start = time.monotonic()

                async def make(d: int, i: int) -> None:
                    async with limit:
                        await client.mknod(d, f"f{i:07d}".encode(), 0o100644, root)

                if not per_dir:
                    async with trio.open_nursery() as nursery:
                        for i in range(worker, n, workers):
                            nursery.start_soon(make, top_ino, i)
                    return start, time.monotonic()
                for k in range(worker, -(-n // per_dir), workers):
                    d = (await client.mkdir(top_ino, f"d{k}".encode(), 0o755, root)).ino
                    async with trio.open_nursery() as nursery:
                        for i in range(k * per_dir, min(n, (k + 1) * per_dir)):
                            nursery.start_soon(make, d, i)
                return start, time.monotonic()

        results.put(("ok", *trio.run(main)))
    except BaseException as exc:  # reported to the parent
        results.put(("error", repr(exc), 0.0))


def fill(meta_addr: str, credentials: Path, top: str, n: int, per_dir: int = FILES_PER_DIR) -> float:
    """n files under /top from FILL_PROCS client processes at once (one, when all go into one
    directory: on PostgreSQL every create there updates that directory's row, so creates from
    several clients conflict and retry; one client's run one after the other); the
    seconds it took."""
    from bench import run_together

    procs = FILL_PROCS if per_dir else 1
    spans = run_together(fill_job, [(meta_addr, str(credentials), top, n, per_dir, w, procs) for w in range(procs)])
    return max(end for _, end in spans) - min(start for start, _ in spans)


def cost_job(meta_addr: str, credentials: str, top: str, n: int, results) -> None:
    """The metaserver's cost of one create and one stat (lookup) with the namespace as it is:
    COST_OPS creates in a new directory, then lookups of COST_OPS random files of /top's
    fill, each call sent alone and waited for (no client cache in the way: the raw call).
    Puts ("ok", (create_us, stat_us)) medians."""
    try:
        import trio

        from stripefs.client import Ctx, open_client
        from stripefs.proto import messages as m
        from stripefs.proto.credentials import load_credentials
        from stripefs.proto.types import ROOT_INODE

        root = Ctx(0, 0, 0)

        async def main() -> tuple[float, float]:
            async with open_client(meta_addr, load_credentials(credentials)) as client:
                fresh = (await client.mkdir(ROOT_INODE, f"cost-{top}".encode(), 0o755, root)).ino
                creates, stats = [], []
                for i in range(COST_OPS):
                    t0 = time.perf_counter()
                    await client._meta("mknod", m.MknodReq(fresh, f"c{i}".encode(), 0o100644, root))
                    creates.append(time.perf_counter() - t0)
                top_ino = (await client.lookup(ROOT_INODE, top.encode())).ino
                rnd = random.Random(n)
                picks = sorted(rnd.sample(range(n), min(COST_OPS, n)))
                dirs: dict[int, int] = {}
                for i in picks:
                    k = i // FILES_PER_DIR
                    if k not in dirs:
                        dirs[k] = (await client.lookup(top_ino, f"d{k}".encode())).ino
                rnd.shuffle(picks)
                for i in picks:
                    req = m.LookupReq(dirs[i // FILES_PER_DIR], f"f{i:07d}".encode(), root)
                    t0 = time.perf_counter()
                    await client._meta("lookup", req)
                    stats.append(time.perf_counter() - t0)
                return statistics.median(creates) * 1e6, statistics.median(stats) * 1e6

        results.put(("ok", trio.run(main)))
    except BaseException as exc:  # reported to the parent
        results.put(("error", repr(exc)))


def listing(directory: Path) -> tuple[float, float, int]:
    """(seconds to the first entry, to the last, entries) of one scandir."""
    t0 = time.perf_counter()
    first: Optional[float] = None
    n = 0
    with os.scandir(directory) as it:
        for _ in it:
            if first is None:
                first = time.perf_counter() - t0
            n += 1
    return first or 0.0, time.perf_counter() - t0, n


def measure(engine: str, metaservers: int, work: Path, postgres, args) -> dict:
    from bench import in_process, run_parallel
    from cluster import Cluster

    kw = {}
    if engine == "postgres":
        kw = {"meta_dsn": postgres.new_database(), "metaservers": metaservers}
    c = Cluster(work, dataservers=3, **kw)
    out: dict = {"engine": engine, "metaservers": metaservers}
    try:
        mounts = [c.mount() for _ in range(MOUNTS)]
        groups = []
        for k in range(PROCS):
            d = mounts[k % MOUNTS].path / f"p{k}"
            d.mkdir()
            groups.append([str(d / f"f{i}") for i in range(args.files)])
        for phase in ("create", "stat", "unlink"):
            out[phase] = run_parallel(phase, groups)
            log(f"{engine} x{metaservers}: {phase} {out[phase]:.0f} ops/s aggregate")
        out["cost"] = {}
        prev = 0
        for n in args.fill:
            # The namespace grows to n files: this step adds n - prev under /fill{n}.
            t = fill(c.meta_addr, c.client, f"fill{n}", n - prev)
            create_us, stat_us = in_process(cost_job, (c.meta_addr, str(c.client), f"fill{n}", n - prev),
                                            "measuring create and stat")
            out["cost"][n] = {"create_us": create_us, "stat_us": stat_us, "fill_s": t}
            log(f"{engine} x{metaservers}: {n} files: create {create_us:.0f} us, stat {stat_us:.0f} us"
                f" (filled in {t:.0f} s)")
            prev = n
        if args.ls:
            t = fill(c.meta_addr, c.client, "lsbig", args.ls, per_dir=0)
            first, last, n = listing(mounts[1].path / "lsbig")
            out["ls"] = {"entries": n, "first_s": first, "last_s": last, "fill_s": t}
            log(f"{engine} x{metaservers}: ls of {n} entries: first {first * 1e3:.0f} ms, last {last:.1f} s")
    finally:
        c.close()
    return out


def table(results: list[dict]) -> str:
    lines = ["| engine | metaservers | create/s | stat/s | unlink/s |", "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['engine']} | {r['metaservers']} | {r['create']:.0f} | {r['stat']:.0f} | {r['unlink']:.0f} |")
    lines += ["", "| engine | metaservers | files before | create (us) | stat (us) | fill (files/s) |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        prev = 0
        for n, c in r["cost"].items():
            lines.append(f"| {r['engine']} | {r['metaservers']} | {n:,} | {c['create_us']:.0f} | {c['stat_us']:.0f}"
                         f" | {(n - prev) / c['fill_s']:.0f} |")
            prev = n
    if any("ls" in r for r in results):
        lines += ["", "| engine | metaservers | entries | first entry (ms) | last entry (s) |", "|---|---:|---:|---:|---:|"]
        for r in results:
            if "ls" in r:
                ls = r["ls"]
                lines.append(f"| {r['engine']} | {r['metaservers']} | {ls['entries']:,} | {ls['first_s'] * 1e3:.0f}"
                             f" | {ls['last_s']:.3f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_meta.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=500, help="files per process in the aggregate phases (default 500)")
    p.add_argument("--fill", default="10000,100000",
                   help="namespace sizes to measure create/stat cost at, comma-separated (default 10000,100000;"
                        " 1000000 takes tens of minutes on PostgreSQL)")
    p.add_argument("--ls", type=int, default=100_000, help="entries of the listed directory (0: skip; default 100000)")
    p.add_argument("--only", default="", help="configurations to run, e.g. sqlite:1,postgres:2 (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    args = p.parse_args(argv)
    args.fill = [int(x) for x in args.fill.split(",") if x]
    if args.quick:
        args.files, args.fill, args.ls = 20, [200, 400], 300
    args.configs = [(e, int(k)) for e, k in (x.split(":") for x in args.only.split(","))] if args.only else CONFIGS
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from bench import alone

    results = []
    with alone("stripefs-bench-meta-", any(e == "postgres" for e, _ in args.configs)) as (work, postgres):
        for engine, metaservers in args.configs:
            results.append(measure(engine, metaservers, work / f"{engine}-{metaservers}", postgres, args))
    print(table(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
