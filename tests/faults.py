"""Fault injection for the real-process harness (tests/cluster.py), shared by the
fault-injection tests (tests/test_faults_*.py) and the soak run (scripts/soak.py).

What is here: a cluster with short failure timeouts, pausing and killing processes,
flipping bytes in a stored block file, cutting a data server off in a network namespace,
the ledger of acknowledged writes (path -> sha256) and its verification, disk usage of
the data servers, `stripefs fsck --json` and waiting for R replicas to be back.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cluster import REPO_ROOT, Cluster, HarnessError, Proc, cli

#: Metaserver flags for quick failure handling: suspect after 1 s, dead after 3 s, garbage
#: handed out 1 s after it appears, sessions of a killed mount gone after 3 x 2 s; an
#: allocation outlives the 30 s block RPC deadline of a hung server (else its commit fails).
FAST_META_FLAGS = [
    "--server-suspect-after-s", "1", "--server-dead-after-s", "3", "--gc-grace-s", "1",
    "--session-lease-s", "2", "--pending-timeout-s", "90",
]
#: Data server flags: heartbeats three times a second, so state changes are seen quickly.
FAST_DATA_FLAGS = ["--heartbeat-interval-s", "0.3"]
#: What the fault tests promise: R copies back on live servers within this long after
#: the failed server is declared dead (3 s after its last heartbeat).
REPAIR_WITHIN_S = 30.0

MiB = 1024 * 1024


def fast_cluster(base: Path, dataservers: int = 3, meta_flags: list[str] | None = None,
                 data_flags: list[str] | None = None, **kwargs) -> Cluster:
    return Cluster(base, dataservers=dataservers,
                   meta_args=FAST_META_FLAGS + list(meta_flags or []),
                   data_args=FAST_DATA_FLAGS + list(data_flags or []), **kwargs)


# ---------------------------------------------------------------------------- waiting


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.2):
    """The first truthy value of `predicate()` within `timeout_s`, else AssertionError."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            last = predicate()
        except (HarnessError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            last = exc  # a server coming or going
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what} (last: {last!r})")
        time.sleep(interval_s)


def replication_healthy(cluster: Cluster) -> bool:
    st = cluster.status()
    return st["under_replicated"] == 0 and st["lost"] == 0


def wait_replicated(cluster: Cluster, timeout_s: float = REPAIR_WITHIN_S) -> float:
    """Waits until status shows no under-replicated and no lost block; returns the seconds taken."""
    t0 = time.monotonic()
    wait_for(lambda: replication_healthy(cluster), timeout_s, "under_replicated == 0 and lost == 0",
             interval_s=0.3)
    return time.monotonic() - t0


def server_states(cluster: Cluster) -> dict[str, str]:
    return {s["address"]: s["state"] for s in cluster.status()["servers"]}


def wait_state(cluster: Cluster, address: str, state: str, timeout_s: float = 20.0) -> None:
    wait_for(lambda: server_states(cluster).get(address) == state, timeout_s, f"{address} {state}")


# ---------------------------------------------------------------------------- fsck


def fsck(cluster: Cluster, *flags: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli("fsck", "--meta", cluster.meta_addr, "--credentials", str(cluster.admin), *flags),
        capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT,
    )


def fsck_json(cluster: Cluster) -> tuple[int, dict]:
    res = fsck(cluster, "--json")
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        doc = {"unparsed": res.stdout, "stderr": res.stderr}
    return res.returncode, doc


def wait_fsck_clean(cluster: Cluster, timeout_s: float = REPAIR_WITHIN_S) -> dict:
    """fsck is clean within `timeout_s` (repair may still be running at the first try)."""
    last: dict = {}

    def clean() -> bool:
        nonlocal last
        rc, last = fsck_json(cluster)
        return rc == 0

    try:
        wait_for(clean, timeout_s, "fsck clean", interval_s=1.0)
    except AssertionError:
        raise AssertionError(f"fsck not clean within {timeout_s} s: {json.dumps(last)[:4000]}") from None
    return last


# ---------------------------------------------------------------------------- processes


def pause(proc: Proc, timeout_s: float = 5.0) -> None:
    """SIGSTOP: the process hangs, its sockets stay open (a hung server, not a dead one).
    Returns once every thread of it has stopped: a loaded machine may let it run on a
    little after the signal, and answer a call that the test meant it to leave hanging."""
    proc.signal(signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    tasks = Path(f"/proc/{proc.pid}/task")
    while time.monotonic() < deadline:
        try:
            states = [(t / "stat").read_text().rpartition(")")[2].split()[0] for t in tasks.iterdir()]
        except OSError:
            return  # (gone, or a thread ended while we looked: nothing to wait for)
        if all(state in ("T", "t") for state in states):
            return
        time.sleep(0.01)


def resume(proc: Proc) -> None:
    proc.signal(signal.SIGCONT)


def data_index(cluster: Cluster, address: str) -> int:
    return next(i for i, p in enumerate(cluster.data) if p.address == address)


# ---------------------------------------------------------------------------- block files


def block_files(data_dir: Path) -> dict[int, Path]:
    """Block id -> file of every block stored in a data directory."""
    out = {}
    for p in (data_dir / "blocks").glob("*/*"):
        if p.name.isdigit():
            out[int(p.name)] = p
    return out


def resident_bytes(path: Path) -> int:
    """Bytes of a file in the kernel's page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def process_resident_kib(pid: int) -> int:
    """A process's resident set in KiB (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def disk_usage(cluster: Cluster) -> int:
    """Bytes of block files (and leftovers under tmp/) of every data server of `cluster`."""
    total = 0
    for d in cluster.base.glob("data-*"):
        for sub in ("blocks", "tmp"):
            for p in (d / sub).rglob("*"):
                try:
                    if p.is_file():
                        total += p.stat().st_size
                except FileNotFoundError:
                    pass  # deleted while we walked
    return total


def flip_byte(path: Path, rng: random.Random | None = None) -> int:
    """Flips one bit of a byte in the data part of a stored block file (past the header,
    whose CRC table is at most a few KiB), in place; returns the offset."""
    rng = rng or random.Random()
    size = path.stat().st_size
    lo = min(size - 1, 8192)
    offset = rng.randrange(lo, size)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
        f.flush()
        os.fsync(f.fileno())
    return offset


def flip_random_block(cluster: Cluster, rng: random.Random, min_size: int = 16384) -> Optional[tuple[int, int]]:
    """Flips a byte in a random stored block of a random data server; (server index, block id)."""
    order = list(range(len(cluster.data)))
    rng.shuffle(order)
    for i in order:
        files = [(b, p) for b, p in block_files(cluster.base / f"data-{i}").items()]
        rng.shuffle(files)
        for block_id, path in files[:20]:
            try:
                if path.stat().st_size < min_size:
                    continue
                flip_byte(path, rng)
            except (FileNotFoundError, ValueError):
                continue  # deleted meanwhile
            return i, block_id
    return None


# ---------------------------------------------------------------------------- content


def pattern(seed: int, size: int) -> bytes:
    """Deterministic incompressible-enough bytes for a file (fast: repeats a random MiB
    shifted by the seed, so every file differs)."""
    rng = random.Random(seed)
    chunk = rng.randbytes(min(size, MiB) or 1)
    out = bytearray()
    i = 0
    while len(out) < size:
        out += seed.to_bytes(8, "little") + i.to_bytes(8, "little") + chunk
        i += 1
    return bytes(out[:size])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def write_file(path: Path, data: bytes, chunk: int = MiB, fsync: bool = True) -> None:
    """Writes `data` in `chunk`-sized writes, fsyncs (optionally) and closes; raises OSError
    from any of them. Success means the content is acknowledged."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        for off in range(0, len(data), chunk):
            os.write(fd, view[off: off + chunk])
        if fsync:
            os.fsync(fd)
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    os.close(fd)


@dataclass
class Ledger:
    """Acknowledged state: relative path -> sha256 of what must be there, and paths that
    must be gone. Thread safe enough for appends from several threads (dict assignment)."""

    files: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)

    def wrote(self, rel: str, data: bytes) -> None:
        self.files[rel] = sha256(data)
        self.sizes[rel] = len(data)
        self.gone.discard(rel)

    def renamed(self, old: str, new: str) -> None:
        self.files[new] = self.files.pop(old)
        self.sizes[new] = self.sizes.pop(old)
        self.gone.add(old)
        self.gone.discard(new)

    def removed(self, rel: str) -> None:
        self.files.pop(rel, None)
        self.sizes.pop(rel, None)
        self.gone.add(rel)

    def verify(self, root: Path) -> tuple[int, list[str]]:
        """(bytes verified, problems) of every acknowledged file under `root`."""
        problems: list[str] = []
        verified = 0
        for rel, digest in sorted(self.files.items()):
            try:
                got = sha256_path(root / rel)
            except OSError as exc:
                problems.append(f"{rel}: {exc!r}")
                continue
            if got != digest:
                problems.append(f"{rel}: sha256 {got} != {digest}")
            else:
                verified += self.sizes[rel]
        for rel in sorted(self.gone):
            if os.path.lexists(root / rel):
                problems.append(f"{rel}: removed or renamed away, but still there")
        return verified, problems


# ---------------------------------------------------------------------------- network namespaces


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


@dataclass
class NetNamespaces:
    """One network namespace per data server, each joined by a veth pair to a bridge on
    the host: the bridge has NET.1/24, namespace i has NET.(10+i), NET a /24 of
    198.18.0.0/15 (reserved for benchmarking, so it collides with nothing real) that no
    interface of the host uses yet, so concurrent runs do not collide. Servers reach each
    other (re-replication) across the bridge and the host (metaserver, mounts) through it.
    `cut(i)` sets namespace i's bridge port down: the server keeps running, but nothing
    reaches it and it reaches nothing; packets vanish (a pulled cable, not a refusal)."""

    count: int
    tag: str = field(default_factory=lambda: f"sf{os.getpid() % 100000}")
    net: str = ""  # first three octets, chosen by setup()
    made: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def name(self, i: int) -> str:
        return f"{self.tag}n{i}"

    def link(self, i: int) -> str:
        return f"{self.tag}v{i}"  # host end, a bridge port; the namespace end is ...p{i}

    def _free_net(self) -> str:
        used = ip("-o", "addr", "show").stdout
        for k in range(512):
            idx = (os.getpid() + k) % 512
            net = f"198.{18 + idx // 256}.{idx % 256}"
            if f" {net}." not in used:
                return net
        raise AssertionError("no free /24 in 198.18.0.0/15")

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def host_addr(self, i: int = 0) -> str:
        return f"{self.net}.1"

    def ns_addr(self, i: int) -> str:
        return f"{self.net}.{10 + i}"

    def setup(self) -> None:
        self.net = self.net or self._free_net()
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            self.links.append(self.bridge)
            ip("addr", "add", f"{self.host_addr()}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for i in range(self.count):
                ns, host, peer = self.name(i), self.link(i), f"{self.tag}p{i}"
                ip("netns", "add", ns)
                self.made.append(ns)
                ip("link", "add", host, "type", "veth", "peer", "name", peer)
                self.links.append(host)
                ip("link", "set", peer, "netns", ns)
                ip("link", "set", host, "master", self.bridge)
                ip("link", "set", host, "up")
                ip("netns", "exec", ns, "ip", "addr", "add", f"{self.ns_addr(i)}/24", "dev", peer)
                ip("netns", "exec", ns, "ip", "link", "set", peer, "up")
                ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.cleanup()
            raise

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.name(i)]

    def wait_connected(self, timeout_s: float = 20.0) -> None:
        """Until every namespace can open a TCP connection to the host across the bridge
        (a new bridge may take a moment to forward)."""
        import socket
        import sys

        with socket.socket() as listener:
            listener.bind((self.host_addr(), 0))
            listener.listen(16)
            port = listener.getsockname()[1]
            probe = f"import socket; socket.create_connection(('{self.host_addr()}', {port}), 1).close()"
            deadline = time.monotonic() + timeout_s
            for i in range(self.count):
                while subprocess.run([*self.prefix(i), sys.executable, "-c", probe],
                                     capture_output=True, timeout=30).returncode != 0:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"namespace {self.name(i)} cannot reach {self.host_addr()}")
                    time.sleep(0.5)

    def cut(self, i: int) -> None:
        ip("link", "set", self.link(i), "down")

    def heal(self, i: int) -> None:
        ip("link", "set", self.link(i), "up")

    def cleanup(self) -> None:
        for link in reversed(self.links):
            ip("link", "del", link, check=False)  # a veth takes its peer along
        for ns in self.made:
            ip("netns", "del", ns, check=False)
        self.links.clear()
        self.made.clear()


def netns_skip_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"sfprobe{os.getpid() % 100000}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# ---------------------------------------------------------------------------- block maps


class Inspector:
    """Looks at a file's block map and every stored replica through the wire contract
    (what the client library would see), to check that each copy holds the right bytes."""

    def __init__(self, cluster: Cluster) -> None:
        from stripefs.proto.credentials import load_credentials
        from stripefs.proto.rpc import Stub
        from stripefs.proto.services import META_METHODS, META_SERVICE

        self._creds = load_credentials(cluster.admin)
        self.meta = Stub(cluster.meta_addr, self._creds, META_SERVICE, META_METHODS)
        self._data: dict = {}

    def close(self) -> None:
        for stub in [self.meta, *self._data.values()]:
            stub.close()

    def _stub(self, address: str):
        from stripefs.proto.rpc import Stub
        from stripefs.proto.services import DATA_METHODS, DATA_SERVICE

        if address not in self._data:
            self._data[address] = Stub(address, self._creds, DATA_SERVICE, DATA_METHODS)
        return self._data[address]

    def block_map(self, rel: str):
        from stripefs.proto.messages import BlockMapReq, LookupReq
        from stripefs.proto.types import ROOT_INODE

        ino = ROOT_INODE
        for part in Path(rel).parts:
            ino = self.meta.call("lookup", LookupReq(ino, os.fsencode(part))).attr.ino
        return self.meta.call("block_map", BlockMapReq(ino)).blocks

    def replica_problems(self, rel: str, data: bytes, block_bytes: int, want_replicas: int) -> list[str]:
        """Every replica of every block of `rel` holds its slice of `data`, with at least
        `want_replicas` replicas listed per block (excess replicas are kept, not trimmed)."""
        from stripefs.proto.errors import FsError
        from stripefs.proto.messages import GetBlockReq

        problems = []
        for ref in self.block_map(rel):
            want = data[ref.index * block_bytes: ref.index * block_bytes + ref.length]
            if len(ref.servers) < want_replicas:
                problems.append(f"block {ref.block_id} (index {ref.index}): servers {ref.servers}")
            for server in ref.servers:
                try:
                    got = self._stub(server).call("get_block", GetBlockReq(block_id=ref.block_id)).data
                except FsError as exc:
                    problems.append(f"block {ref.block_id} on {server}: {exc}")
                    continue
                if sha256(got) != sha256(want):
                    problems.append(f"block {ref.block_id} on {server}: wrong content")
        return problems


def run_within(fn: Callable[[], object], within_s: float, what: str) -> None:
    """fn() in a thread: fails (instead of hanging the test) when it is not done within
    `within_s`, and with its exception if it raised one."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(within_s)
    assert not t.is_alive(), f"{what} still running after {within_s} s"
    assert not errors, errors


def wait_replicas_right(cluster: Cluster, files: dict[str, bytes], block_bytes: int, replicas: int,
                        timeout_s: float = REPAIR_WITHIN_S) -> None:
    """Waits until every replica of every block of each file (path relative to the root:
    its content) holds the right bytes, with at least `replicas` of them per block."""
    ins = Inspector(cluster)
    try:
        for rel, data in files.items():
            problems: list[str] = []

            def right() -> bool:
                problems[:] = ins.replica_problems(rel, data, block_bytes, replicas)
                return not problems

            try:
                wait_for(right, timeout_s, f"every replica of {rel} right")
            except AssertionError:
                raise AssertionError(f"{rel}: {problems[:10]}") from None
    finally:
        ins.close()


# ---------------------------------------------------------------------------- workload


class Workload:
    """A mixed file workload under `root`: small files, checkpoint-style large writes
    (write a temporary, fsync, rename over the previous checkpoint), renames, unlinks,
    mkdirs and reads that check content against the ledger. What succeeded goes into the
    ledger; what failed with an unknown outcome is forgotten (neither must-exist nor
    must-be-gone). A read that returns wrong bytes is a corruption, never tolerated.

    Run it in a process of its own (`python tests/faults.py workload ...`): a process that
    holds files open on a mount must not start the metaserver, since exec closes those
    files and each close is a FUSE flush that waits for the metaserver."""

    WEIGHTS = {"small": 6, "ckpt": 1, "rename": 3, "unlink": 2, "mkdir": 1, "read": 3}

    def __init__(self, root: Path, seed: int, big_bytes: int = 4 * MiB,
                 weights: Optional[dict[str, int]] = None) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.seed = seed
        self.big_bytes = big_bytes
        self.weights = weights or self.WEIGHTS
        self.ledger = Ledger()
        self.ops: dict[str, int] = {}
        self.failed: dict[str, int] = {}  # errno name -> count
        self.corrupt: list[str] = []
        self.bytes_written = 0
        self.bytes_read = 0
        self.n = 0

    def _forget(self, *paths: str) -> None:
        for p in paths:
            self.ledger.files.pop(p, None)
            self.ledger.sizes.pop(p, None)
            self.ledger.gone.discard(p)

    def _fail(self, exc: OSError, *paths: str) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.failed[name] = self.failed.get(name, 0) + 1
        self._forget(*paths)
        time.sleep(0.05)  # a fault in progress: do not spin on it

    def _data(self, size: int) -> bytes:
        return pattern(self.seed * 1_000_003 + self.n, size)

    def step(self) -> None:
        rng, led = self.rng, self.ledger
        self.n += 1
        kind = rng.choices(list(self.weights), list(self.weights.values()))[0]
        existing = sorted(p for p in led.files if not p.endswith("/.keep"))
        if kind in ("rename", "unlink", "read") and not existing:
            kind = "small"
        dirs = ["", *sorted({str(Path(p).parent) for p in led.files if "/" in p})]
        try:
            if kind == "small":
                rel = f"{rng.choice(dirs)}/f{self.n}".lstrip("/")
                data = self._data(rng.randrange(200_000))
                try:
                    write_file(self.root / rel, data, fsync=rng.random() < 0.5)
                except OSError as exc:
                    return self._fail(exc, rel)
                led.wrote(rel, data)
                self.bytes_written += len(data)
            elif kind == "ckpt":
                slot = f"ckpt{rng.randrange(3)}"
                tmp = f"{slot}.tmp{self.n}"
                data = self._data(self.big_bytes + rng.randrange(MiB))
                try:
                    write_file(self.root / tmp, data, fsync=True)
                except OSError as exc:
                    return self._fail(exc, tmp)
                led.wrote(tmp, data)
                self.bytes_written += len(data)
                try:
                    os.rename(self.root / tmp, self.root / slot)
                except OSError as exc:
                    return self._fail(exc, tmp, slot)
                led.renamed(tmp, slot)
            elif kind == "rename":
                old = rng.choice(existing)
                new = f"{rng.choice(dirs)}/r{self.n}".lstrip("/")
                try:
                    os.rename(self.root / old, self.root / new)
                except OSError as exc:
                    return self._fail(exc, old, new)
                led.renamed(old, new)
            elif kind == "unlink":
                victim = rng.choice(existing)
                try:
                    os.unlink(self.root / victim)
                except OSError as exc:
                    return self._fail(exc, victim)
                led.removed(victim)
            elif kind == "mkdir":
                rel = f"d{self.n}"
                try:
                    os.mkdir(self.root / rel)
                    write_file(self.root / rel / ".keep", b"")
                except OSError as exc:
                    return self._fail(exc, f"{rel}/.keep")
                led.wrote(f"{rel}/.keep", b"")
            elif kind == "read":
                rel = rng.choice(existing)
                want = led.files[rel]
                try:
                    got = sha256_path(self.root / rel)
                except OSError as exc:
                    return self._fail(exc)
                if got != want:
                    self.corrupt.append(f"{rel}: read {got}, acknowledged {want}")
                self.bytes_read += led.sizes.get(rel, 0)
        finally:
            self.ops[kind] = self.ops.get(kind, 0) + 1

    def report(self) -> dict:
        return {"files": self.ledger.files, "sizes": self.ledger.sizes, "gone": sorted(self.ledger.gone),
                "ops": self.ops, "failed": self.failed, "corrupt": self.corrupt,
                "bytes_written": self.bytes_written, "bytes_read": self.bytes_read}


def load_report(path: Path) -> tuple[Ledger, dict]:
    doc = json.loads(Path(path).read_text())
    return Ledger(files=doc["files"], sizes=doc["sizes"], gone=set(doc["gone"])), doc


def _workload_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="faults.py workload")
    p.add_argument("--root", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON report written here at the end")
    p.add_argument("--stop-file", required=True, help="stop once this file exists")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop by then in any case")
    p.add_argument("--big-mib", type=float, default=4.0)
    p.add_argument("--weights", default="", help="kind=weight,... (default: the built-in mix)")
    p.add_argument("--dataset-files", type=int, default=0,
                   help="first write this many files of --dataset-mib each (retried until acknowledged)")
    p.add_argument("--dataset-mib", type=float, default=8.0)
    args = p.parse_args(argv)
    weights = None
    if args.weights:
        weights = {k: int(v) for k, v in (kv.split("=") for kv in args.weights.split(","))}
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    w = Workload(root, args.seed, int(args.big_mib * MiB), weights)
    stop = Path(args.stop_file)
    deadline = time.monotonic() + args.max_seconds
    signal.signal(signal.SIGTERM, lambda *_: stop.touch())
    for i in range(args.dataset_files):
        rel, data = f"data{i}", pattern(args.seed * 7919 + i, int(args.dataset_mib * MiB))
        while not stop.exists() and time.monotonic() < deadline:
            try:
                write_file(root / rel, data)
            except OSError:
                time.sleep(0.5)  # a fault in progress: try again
                continue
            w.ledger.wrote(rel, data)
            w.bytes_written += len(data)
            break
    while not stop.exists() and time.monotonic() < deadline:
        w.step()
    tmp = Path(f"{args.out}.tmp")
    tmp.write_text(json.dumps(w.report()))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "workload":
        sys.exit(_workload_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} workload --root DIR --out FILE --stop-file FILE")
