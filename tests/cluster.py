"""The end-to-end test harness: a real cluster of real processes on loopback.

`Cluster` starts `python -m stripefs.cli meta` and N `... data` processes with their state and
logs under one directory, waits until the metaserver reports every data server up, and
mounts the file system with `... mount --foreground` under Popen. Each process can be
stopped, killed and restarted on its own. Teardown always runs and leaves no process and
no mount behind: an unmount (stripefs.mounts: retried, then lazy), SIGTERM, SIGKILL after a
grace period.

Every log file the harness creates is registered in LOGS, so that a test can be failed
when a server or a mount logged a traceback (see conftest.py).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from pki import Pki

from stripefs.mounts import is_mounted, unmount, wait_mounted  # noqa: F401  (is_mounted: for the tests)

REPO_ROOT = Path(__file__).resolve().parent.parent

#: How long a server may take to write its ready file, or a mount to appear.
start_timeout_s = 20.0
#: How long a process may take to exit after SIGTERM before it is SIGKILLed.
stop_grace_s = 10.0
#: Lines of a log shown when something does not come up.
log_tail_lines = 40

#: Every log file written by a harness process, in creation order.
LOGS: list[Path] = []
#: Processes still running, stopped at interpreter exit if a teardown was skipped.
_LIVE: list["Proc"] = []
#: Mount points of mounts not yet closed, for the same reason.
_LIVE_MOUNTS: list[Path] = []


class HarnessError(AssertionError):
    """A process of the cluster did not come up or misbehaved."""


def cli(*args: str, python: str = "") -> list[str]:
    """The command line running the stripefs CLI with `python`, by default the interpreter
    running the tests."""
    return [python or sys.executable, "-m", "stripefs.cli", *args]


def log_tail(path: Path, lines: int = log_tail_lines) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"---- {path}: missing ----"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"---- last lines of {path} ----\n{tail}\n----"


@dataclass
class Proc:
    """One process of the cluster and its log."""

    name: str
    argv: list[str]
    log: Path  # what the process writes with --log-file
    out: Path  # its stdout and stderr (crashes before logging is set up land here)
    popen: Optional[subprocess.Popen] = None
    address: str = ""  # HOST:PORT from its ready file (servers only)

    def start(self) -> None:
        for path in (self.log, self.out):
            if path not in LOGS:
                LOGS.append(path)
        # The process's own stdout and stderr: its user's only, like everything it writes.
        with os.fdopen(os.open(self.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            # A session of its own: a Ctrl-C on pytest reaches the harness, not the servers,
            # so teardown still runs in order.
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=REPO_ROOT, start_new_session=True,
            )
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def wait_exit(self, timeout: float) -> Optional[int]:
        """The exit code, or None if still running after `timeout` seconds."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = stop_grace_s) -> Optional[int]:
        """SIGTERM, then SIGKILL after `grace`; returns the exit code."""
        if self.popen is None:
            return None
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
            if self.wait_exit(grace) is None:
                self.popen.kill()
                self.popen.wait()
        if self in _LIVE:
            _LIVE.remove(self)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen is not None and self.running():
            self.popen.kill()
            self.popen.wait()
        if self in _LIVE:
            _LIVE.remove(self)

    def logs_tail(self) -> str:
        return log_tail(self.log) + "\n" + log_tail(self.out)


def _wait_ready_file(proc: Proc, ready: Path, timeout: float = start_timeout_s) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = ready.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        if not proc.running():
            raise HarnessError(
                f"{proc.name} exited with {proc.popen.returncode if proc.popen else None} "
                f"before writing {ready}\n{proc.logs_tail()}"
            )
        if time.monotonic() > deadline:
            raise HarnessError(f"{proc.name} not ready after {timeout}s\n{proc.logs_tail()}")
        time.sleep(0.05)


@dataclass
class Mount:
    """A FUSE mount of a cluster, run in the foreground under Popen."""

    path: Path
    proc: Proc

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __truediv__(self, other: str | os.PathLike) -> Path:
        return self.path / other

    def wait_mounted(self, timeout: float = start_timeout_s) -> None:
        problem = wait_mounted(self.path, self.proc.running, timeout)
        if problem is not None:
            code = self.proc.popen.returncode if self.proc.popen else None
            raise HarnessError(f"{problem} (its exit code: {code})\n{self.proc.logs_tail()}")

    def close(self) -> Optional[int]:
        """Unmounts and waits for the mount process to exit (SIGTERM, then SIGKILL)."""
        unmount(self.path)
        # After the unmount the process should end on its own.
        if self.proc.wait_exit(5.0) is None:
            self.proc.stop()
        else:
            self.proc.stop()  # bookkeeping only: it has exited
        if is_mounted(self.path):
            unmount(self.path)
        if self.path in _LIVE_MOUNTS:
            _LIVE_MOUNTS.remove(self.path)
        return self.proc.popen.returncode if self.proc.popen else None


@dataclass
class Cluster:
    """A metaserver and `dataservers` data servers as real processes, state under `base`.

    Started by the constructor; `close()` stops everything, mounts first.
    """

    base: Path
    dataservers: int = 3
    start: bool = True
    meta: Optional[Proc] = None
    data: list[Proc] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    meta_addr: str = ""
    meta_args: list[str] = field(default_factory=list)  # extra flags for the metaserver
    meta_prefix: list[str] = field(default_factory=list)  # a command prefix for it (e.g. `env VAR=...`)
    data_args: list[str] = field(default_factory=list)  # extra flags for every data server
    meta_listen: str = "127.0.0.1:0"  # where the metaserver listens at its first start
    # Per data server index: a command prefix (e.g. `ip netns exec NS`), and the host it
    # reaches the metaserver at (the metaserver's port is appended), for servers that
    # cannot reach the metaserver's listen address (another network namespace).
    data_prefix: dict[int, list[str]] = field(default_factory=dict)
    data_meta_host: dict[int, str] = field(default_factory=dict)
    data_listen: dict[int, str] = field(default_factory=dict)  # per index; default 127.0.0.1:0
    mount_args: list[str] = field(default_factory=list)  # extra flags for every mount
    # Metadata on PostgreSQL: the database's DSN, and how many metaservers share it (all
    # in `metas`, the first also `meta`; `meta_addr` is then their `a:p,b:p` list, which
    # every role and command takes).
    meta_dsn: str = ""
    metaservers: int = 1
    metas: list[Proc] = field(default_factory=list)
    meta_addrs: list[str] = field(default_factory=list)
    # The interpreter every process and command runs with (another virtualenv's stripefs,
    # say); by default the one running the tests.
    python: str = ""

    def cli(self, *args: str) -> list[str]:
        return cli(*args, python=self.python)

    def __post_init__(self) -> None:
        self.base = Path(self.base)
        self.logs_dir = self.base / "logs"
        self.run_dir = self.base / "run"
        # The cluster's CA and a credential bundle per process, as an operator makes them.
        self.pki = Pki(self.base / "credentials")
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._mount_count = 0
        if self.start:
            try:
                if self.meta_dsn:
                    for k in range(self.metaservers):
                        self.start_meta_k(k)
                else:
                    self.start_meta()
                for i in range(self.dataservers):
                    self.start_data(i)
                self.wait_servers_up(self.dataservers)
            except BaseException:
                self.close()
                raise

    @property
    def admin(self) -> Path:
        """The admin credential bundle (status, fsck, direct calls in tests)."""
        return self.pki.bundle("admin")

    @property
    def client(self) -> Path:
        """A client credential bundle for library users in tests."""
        return self.pki.bundle("client", "library")

    def meta_value(self, sql: str, *args: object):
        """One value from the metaserver's SQLite database, read alongside it (a test's
        look at what the metaserver has recorded)."""
        assert not self.meta_dsn, "meta_value reads the SQLite engine's database"
        db = sqlite3.connect(f"file:{self.base / 'meta' / 'meta.db'}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql, args).fetchone()[0]
        finally:
            db.close()

    # ------------------------------------------------------------------ metaserver

    def start_meta(self, listen: str | None = None) -> str:
        """Starts the metaserver and returns its bound address."""
        listen = listen or self.meta_listen
        assert self.meta is None or not self.meta.running(), "metaserver already running"
        ready = self.run_dir / "meta.ready"
        ready.unlink(missing_ok=True)
        (self.base / "meta").mkdir(exist_ok=True)
        argv = self.meta_prefix + self.cli(
            "meta", "--listen", listen, "--dir", str(self.base / "meta"),
            "--credentials", str(self.pki.bundle("meta")), "--ready-file", str(ready),
            "--log-file", str(self.logs_dir / "meta.log"), *self.meta_args,
        )
        self.meta = Proc("meta", argv, self.logs_dir / "meta.log", self.logs_dir / "meta.out")
        self.meta.start()
        self.meta_addr = _wait_ready_file(self.meta, ready)
        return self.meta_addr

    def start_meta_k(self, k: int, listen: str | None = None) -> str:
        """Starts metaserver k of a cluster on PostgreSQL (again on its old address if it
        had one); returns its address."""
        if listen is None:
            listen = self.meta_addrs[k] if k < len(self.meta_addrs) else self.meta_listen
        ready = self.run_dir / f"meta-{k}.ready"
        ready.unlink(missing_ok=True)
        (self.base / f"meta-{k}").mkdir(exist_ok=True)
        log = self.logs_dir / f"meta-{k}.log"
        argv = self.meta_prefix + self.cli(
            "meta", "--engine", "postgres", "--dsn", self.meta_dsn, "--listen", listen,
            "--dir", str(self.base / f"meta-{k}"), "--credentials", str(self.pki.bundle("meta")),
            "--ready-file", str(ready), "--log-file", str(log), *self.meta_args,
        )
        proc = Proc(f"meta-{k}", argv, log, self.logs_dir / f"meta-{k}.out")
        proc.start()
        address = _wait_ready_file(proc, ready)
        if k < len(self.metas):
            self.metas[k], self.meta_addrs[k] = proc, address
        else:
            self.metas.append(proc)
            self.meta_addrs.append(address)
        self.meta = self.metas[0]
        self.meta_addr = ",".join(self.meta_addrs)
        return address

    def stop_meta(self) -> Optional[int]:
        """SIGTERM the metaserver; returns its exit code."""
        return self.meta.stop() if self.meta else None

    def restart_meta(self) -> str:
        """Stops the metaserver and starts it again on the same address, so data servers
        and mounts that know it can reconnect."""
        self.stop_meta()
        return self.start_meta(listen=self.meta_addr or None)

    # ------------------------------------------------------------------ data servers

    def _data_argv(self, i: int, listen: str) -> list[str]:
        d = self.base / f"data-{i}"
        d.mkdir(exist_ok=True)
        meta = self.meta_addr
        if i in self.data_meta_host:
            meta = f"{self.data_meta_host[i]}:{meta.rsplit(':', 1)[1]}"
        return self.data_prefix.get(i, []) + self.cli(
            "data", "--listen", listen, "--meta", meta, "--dir", str(d),
            "--credentials", str(self.pki.bundle("data", f"data-{i}")),
            "--ready-file", str(self.run_dir / f"data-{i}.ready"),
            "--log-file", str(self.logs_dir / f"data-{i}.log"), *self.data_args,
        )

    def start_data(self, i: int, listen: str | None = None) -> Proc:
        """Starts data server `i` (0-based); a stopped one comes back on its data directory."""
        listen = listen or self.data_listen.get(i, "127.0.0.1:0")
        ready = self.run_dir / f"data-{i}.ready"
        ready.unlink(missing_ok=True)
        proc = Proc(f"data-{i}", self._data_argv(i, listen),
                    self.logs_dir / f"data-{i}.log", self.logs_dir / f"data-{i}.out")
        if i < len(self.data):
            assert not self.data[i].running(), f"data server {i} already running"
            self.data[i] = proc
        else:
            assert i == len(self.data), "start data servers in order"
            self.data.append(proc)
        proc.start()
        proc.address = _wait_ready_file(proc, ready)
        return proc

    def kill_data(self, i: int, sig: int = signal.SIGTERM) -> Optional[int]:
        """Stops data server `i` with `sig` (SIGKILL: no chance to clean up)."""
        proc = self.data[i]
        if sig == signal.SIGKILL:
            proc.kill()
        else:
            proc.signal(sig)
            if proc.wait_exit(stop_grace_s) is None:
                proc.kill()
            proc.stop()
        return proc.popen.returncode if proc.popen else None

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        """`stripefs status --json` of the running metaserver (the first of them that answers)."""
        return self.status_of(self.meta_addr)

    def status_of(self, meta: str) -> dict:
        """`stripefs status --json` asked of the metaserver(s) at `meta`."""
        res = subprocess.run(
            self.cli("status", "--meta", meta, "--credentials", str(self.admin), "--json"),
            capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
        )
        if res.returncode != 0:
            raise HarnessError(f"stripefs status failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        return json.loads(res.stdout)

    def servers_up(self) -> int:
        try:
            doc = self.status()
        except (HarnessError, ValueError, subprocess.TimeoutExpired):
            return 0
        return sum(1 for s in doc.get("servers", []) if s.get("state") == "up")

    def wait_servers_up(self, n: int, timeout: float = start_timeout_s) -> None:
        deadline = time.monotonic() + timeout
        while True:
            up = self.servers_up()
            if up >= n:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(p.logs_tail() for p in [self.meta, *self.data] if p)
                raise HarnessError(f"{up} of {n} data servers up after {timeout}s\n{tails}")
            time.sleep(0.2)

    # ------------------------------------------------------------------ mounts

    def mount(self, path: os.PathLike | str | None = None, timeout: float = start_timeout_s,
              args: Sequence[str] = ()) -> Mount:
        """Mounts the file system at `path` (created if missing) and waits until it is;
        `args`: more flags for this mount (after `mount_args`)."""
        self._mount_count += 1
        n = self._mount_count
        path = Path(path) if path is not None else self.base / f"mnt-{n}"
        path.mkdir(parents=True, exist_ok=True)
        name = f"mount-{n}"
        # With several metaservers, each mount starts at another one (the list rotated).
        k = (n - 1) % len(self.meta_addrs) if self.meta_addrs else 0
        meta = ",".join(self.meta_addrs[k:] + self.meta_addrs[:k]) if self.meta_addrs else self.meta_addr
        argv = self.cli(
            "mount", meta, str(path), "--credentials", str(self.pki.bundle("client", name)),
            "--foreground", "--log-file", str(self.logs_dir / f"{name}.log"), *self.mount_args,
            *args,
        )
        proc = Proc(name, argv, self.logs_dir / f"{name}.log", self.logs_dir / f"{name}.out")
        proc.start()
        m = Mount(path, proc)
        self.mounts.append(m)
        _LIVE_MOUNTS.append(path)
        m.wait_mounted(timeout)
        return m

    # ------------------------------------------------------------------ teardown

    def logs(self) -> list[Path]:
        return sorted(self.logs_dir.glob("*"))

    def close(self) -> None:
        """Stops everything, mounts first; never raises for a process that is already gone."""
        errors: list[BaseException] = []
        for m in self.mounts:
            try:
                m.close()
            except Exception as e:  # keep tearing down the rest
                errors.append(e)
        procs = [p for p in self.data if p.running()]
        for p in procs:
            p.signal(signal.SIGTERM)
        for p in procs:
            p.stop()
        for p in self.metas or [self.meta]:
            if p is not None:
                p.stop()
        if errors:
            raise errors[0]

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_log_text(offsets: dict[Path, int]) -> dict[Path, str]:
    """Text appended to each registered log since `offsets` (updated in place)."""
    out: dict[Path, str] = {}
    for path in list(LOGS):
        start = offsets.get(path, 0)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            continue
        offsets[path] = start + len(data)
        if data:
            out[path] = data.decode(errors="replace")
    return out


@atexit.register
def _stop_leftovers() -> None:
    # Last resort if a teardown was skipped (e.g. the test process was interrupted hard).
    for path in list(_LIVE_MOUNTS):
        try:
            unmount(path, attempts=1)
        except Exception:
            pass
    for proc in list(_LIVE):
        try:
            proc.kill()
        except Exception:
            pass


def sha256_file(path: os.PathLike | str | bytes, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file's content, read in large pieces."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def put_block(stub, block_id: int, servers: list[str], tokens: list[bytes], data: bytes, holder: str = "",
              sync: bool = True):
    """Write a block down the chain `servers` through the first of them (stub, a data
    service Stub), as the client does: the WriteBlockReply. FsError if the first refuses."""
    from stripefs.proto import codec
    from stripefs.proto.messages import WriteBlockHead

    head = WriteBlockHead(block_id, len(data), list(servers), list(tokens), holder=holder, sync=sync)
    return stub.upload("write_block", head, codec.BlockChunks(data).messages())
