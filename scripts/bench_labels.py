"""Workload 8 of the benchmark: label queries (`scripts/bench --only 8`, or
`python scripts/bench_labels.py` alone).

On a fresh cluster (tests/cluster.py), a labelled dataset of --files empty files is made
through the client library (4 processes, many calls in flight, 1,000 files a directory
/ds/dK): every directory gets `user.split` (train, one in five val) and `user.class`
(c0..c99, by K), and every tenth file a label of its own, `user.quality=bad`. Then each
query runs in a fresh client process, through the library's `paths.find` (what `stripefs
find` runs), twice: the time to the first file and to the last, and the count, checked
against what the dataset's rule says it must be.

Everything is torn down on the way out. docs/benchmark.md has the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

FILES_PER_DIR = 1000
#: Client processes labelling, and calls in flight in each.
LABEL_PROCS = 4
LABEL_IN_FLIGHT = 32
#: Every how many files one carries a label of its own (quality=bad).
OWN_EVERY = 10
CLASSES = 100

#: The queries timed: (what it shows, labels).
QUERIES = (
    ("one directory label, a fifth of the files", {"split": "val"}),
    ("one directory label, 1 % of the files", {"class": "c7"}),
    ("labels of the files themselves, a tenth", {"quality": "bad"}),
    ("a directory's and a file's own", {"split": "train", "quality": "bad"}),
    ("two directories' and a file's own, 0.1 %", {"split": "train", "class": "c7", "quality": "bad"}),
)


def log(msg: str) -> None:
    print(f"[bench-labels {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def split_of(k: int) -> str:
    return "val" if k % 5 == 0 else "train"


def expected(n: int, labels: dict[str, str]) -> int:
    """Files of the dataset that carry `labels`, by its rule."""
    count = 0
    for i in range(n):
        k = i // FILES_PER_DIR
        eff = {"split": split_of(k), "class": f"c{k % CLASSES}"}
        if i % OWN_EVERY == 0:
            eff["quality"] = "bad"
        count += all(eff.get(key) == value for key, value in labels.items())
    return count


def label_job(meta_addr: str, credentials: str, n: int, worker: int, workers: int, barrier, results) -> None:
    """Worker `worker` of `workers` labelling its share of /ds's directories and files."""
    try:
        import trio

        from stripefs.client import Ctx, open_client
        from stripefs.proto.credentials import load_credentials
        from stripefs.proto.types import ROOT_INODE

        root = Ctx(0, 0, 0)

        async def main() -> tuple[float, float]:
            async with open_client(meta_addr, load_credentials(credentials)) as client:
                top = (await client.lookup(ROOT_INODE, b"ds")).ino
                limit = trio.Semaphore(LABEL_IN_FLIGHT)
                barrier.wait()
                start = time.monotonic()

                async def setx(ino: int, name: str, value: str) -> None:
                    async with limit:
                        await client.setxattr(ino, b"user." + name.encode(), value.encode(), 0, root)

                async def one_dir(k: int) -> None:
                    async with limit:
                        d = (await client.lookup(top, f"d{k}".encode())).ino
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(setx, d, "split", split_of(k))
                        nursery.start_soon(setx, d, "class", f"c{k % CLASSES}")
                        for i in range(k * FILES_PER_DIR, min(n, (k + 1) * FILES_PER_DIR), OWN_EVERY):
                            async def own(i: int = i) -> None:
                                async with limit:
                                    f = (await client.lookup(d, f"f{i:07d}".encode())).ino
                                await setx(f, "quality", "bad")
                            nursery.start_soon(own)

                async with trio.open_nursery() as nursery:
                    for k in range(worker, -(-n // FILES_PER_DIR), workers):
                        nursery.start_soon(one_dir, k)
                return start, time.monotonic()

        results.put(("ok", *trio.run(main)))
    except BaseException as exc:  # reported to the parent
        results.put(("error", repr(exc), 0.0))


def query_job(meta_addr: str, credentials: str, labels: dict[str, str], results) -> None:
    """One find of /ds through the library in a fresh client: ("ok", (first_s, last_s, count))."""
    try:
        import trio

        from stripefs.client import open_client, paths
        from stripefs.proto.credentials import load_credentials

        async def main() -> tuple[float, float, int]:
            async with open_client(meta_addr, load_credentials(credentials)) as client:
                await paths.resolve(client, "/ds")  # the session is open: time the find only
                t0 = time.perf_counter()
                first: Optional[float] = None
                count = 0
                async for _ in paths.find(client, "/ds", labels):
                    if first is None:
                        first = time.perf_counter() - t0
                    count += 1
                return first or 0.0, time.perf_counter() - t0, count

        results.put(("ok", trio.run(main)))
    except BaseException as exc:  # reported to the parent
        results.put(("error", repr(exc)))


def measure(engine: str, work: Path, postgres, args) -> dict:
    from bench import in_process, run_together
    from bench_meta import fill
    from cluster import Cluster

    kw = {} if engine == "sqlite" else {"meta_dsn": postgres.new_database(), "metaservers": 1}
    out: dict = {"engine": engine, "files": args.files, "queries": []}
    with Cluster(work, dataservers=1, **kw) as c:
        log(f"{engine}: making {args.files:,} files")
        out["fill_s"] = fill(c.meta_addr, c.client, "ds", args.files, per_dir=FILES_PER_DIR)
        log(f"{engine}: labelling them")
        spans = run_together(label_job, [(c.meta_addr, str(c.client), args.files, w, LABEL_PROCS)
                                         for w in range(LABEL_PROCS)])
        out["label_s"] = max(e for _, e in spans) - min(s for s, _ in spans)
        for what, labels in QUERIES:
            want = expected(args.files, labels)
            runs = []
            for _ in range(2):
                first, last, count = in_process(query_job, (c.meta_addr, str(c.client), labels), f"find {labels}")
                if count != want:
                    raise RuntimeError(f"find {labels} found {count} files, the dataset has {want}")
                runs.append((first, last))
            log(f"{engine}: {labels}: {want:,} files, first after {runs[-1][0]:.3f} s, all after {runs[-1][1]:.2f} s")
            out["queries"].append({"what": what, "labels": labels, "count": want, "runs": runs})
    return out


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [f"{r['engine']}: {r['files']:,} files made in {r['fill_s']:.0f} s, labelled in {r['label_s']:.0f} s", "",
                  "| query | files found | first (s) | all (s), run 1 / 2 | files/s |",
                  "|---|---:|---:|---:|---:|"]
        for q in r["queries"]:
            (f1, l1), (f2, l2) = q["runs"]
            text = ", ".join(f"{k}={v}" for k, v in q["labels"].items())
            lines.append(f"| {text} ({q['what']}) | {q['count']:,} | {f2:.3f} | {l1:.2f} / {l2:.2f} |"
                         f" {q['count'] / l2:,.0f} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_labels.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=1_000_000, help="files of the dataset (default 1,000,000)")
    p.add_argument("--engines", default="sqlite", help="sqlite and/or postgres, comma-separated (default sqlite)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    args = p.parse_args(argv)
    if args.quick:
        args.files = 10_000  # ten directories: every query finds something
    args.engines = [e for e in args.engines.split(",") if e]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from bench import alone

    results = []
    with alone("stripefs-bench-labels-", "postgres" in args.engines) as (work, postgres):
        for engine in args.engines:
            results.append(measure(engine, work / engine, postgres, args))
    print(table(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
