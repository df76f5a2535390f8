"""The `stripefs` command line (fs/cli.py, fs/cli_work.py) run as users run it, a
subprocess, against a real cluster: status, fsck, du, info, cp and top, each with and
without --json; `du` agreeing with a walk of the mount after every kind of change and
after a metaserver restart; errors as one line and an exit code."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cluster import REPO_ROOT, Cluster, cli
from stripefs.client.cache import ENTRY_TTL_S

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A cluster with metrics on its metaserver, and one mount with metrics on too."""
    base = tmp_path_factory.mktemp("cli")
    listen = ["--metrics-listen", "127.0.0.1:0"]
    meta_ready, mount_ready = base / "meta.metrics", base / "mount.metrics"
    with Cluster(base / "c", dataservers=3, meta_args=[*listen, "--metrics-ready-file", str(meta_ready)],
                 mount_args=[*listen, "--metrics-ready-file", str(mount_ready)]) as c:
        m = c.mount()
        deadline = time.monotonic() + 20
        while not (meta_ready.exists() and mount_ready.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        c.meta_metrics_file = meta_ready  # read when used: a restarted metaserver serves on another port
        c.mount_metrics = mount_ready.read_text().strip()
        c.mnt = m.path
        yield c


def run(c: Cluster, *args: str, rc: int | None = 0, env: dict | None = None, timeout: float = 120):
    """`stripefs ARGS...` with the cluster's metaserver and admin credential given by
    environment (so every command also sees the defaults work); its CompletedProcess."""
    e = {**os.environ, "STRIPEFS_META": c.meta_addr, "STRIPEFS_CREDENTIALS": str(c.admin), "PYTHONFAULTHANDLER": "1",
         **(env or {})}
    proc = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                            env=e)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack on stderr
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"stripefs {' '.join(args)} did not end within {timeout} s\n{out[-4000:]}\n{err[-8000:]}")
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if rc is not None:
        assert res.returncode == rc, f"stripefs {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    return res


def run_json(c: Cluster, *args: str, rc: int = 0):
    return json.loads(run(c, *args, "--json", rc=rc).stdout)


def walk_usage(root: Path) -> dict:
    """du by walking the mount: every non-directory entry's lstat size (each link of a file
    counted), directories counted (the root too), their own sizes not."""
    out = {"bytes": 0, "files": 0, "dirs": 1}
    stack = [os.fspath(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    out["dirs"] += 1
                    stack.append(e.path)
                else:
                    out["bytes"] += e.stat(follow_symlinks=False).st_size
                    out["files"] += 1
    return out


def tree_digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of each file, '->target' of each symlink, 'dir' of each directory."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(top) / name
            rel = os.path.relpath(p, root)
            if p.is_symlink():
                out[rel] = "->" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------- status, fsck


def test_status(env):
    c = env
    res = run(c, "status")
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"metaserver {c.meta_addr} up")
    for d in c.data:
        assert d.address in res.stdout
    assert "data servers" in res.stdout and "inodes" in res.stdout and "replication:" in res.stdout
    doc = run_json(c, "status", "--meta", c.meta_addr, "--credentials", str(c.admin))
    assert doc["meta"] == c.meta_addr and doc["addresses"][0]["reachable"] is True
    assert sorted(s["address"] for s in doc["servers"]) == sorted(d.address for d in c.data)
    assert {s["state"] for s in doc["servers"]} == {"up"}


def test_fsck(env):
    c = env
    res = run(c, "fsck")
    assert res.stdout.startswith(f"metaserver {c.meta_addr}:") and "clean" in res.stdout
    doc = run_json(c, "fsck")
    assert doc["clean"] is True and doc["unrepaired"] == 0 and doc["meta"] == c.meta_addr
    assert {"problems", "repaired", "inodes", "blocks", "under_replicated", "lost"} <= set(doc)


def test_errors_say_what_failed_and_what_to_do(env, tmp_path):
    c = env
    res = run(c, "status", "--state", str(tmp_path), rc=1, env={"STRIPEFS_META": ""})
    assert res.stderr.count("\n") == 1 and "is the cluster up" in res.stderr
    res = run(c, "fsck", "--meta", "nonsense", rc=1)
    assert "HOST:PORT" in res.stderr
    res = run(c, "du", "stripefs:/no/such/thing", rc=1)
    assert res.stderr.strip() == "stripefs du: stripefs:/no/such/thing: No such file or directory [ENOENT]"
    res = run(c, "info", "stripefs:/missing", "--json", rc=1)
    assert json.loads(res.stdout) == [] and "ENOENT" in res.stderr
    res = run(c, "du", "/", "--credentials", str(tmp_path / "none"), rc=1, env={"STRIPEFS_CREDENTIALS": ""})
    assert "credential" in res.stderr
    run(c, "du", rc=2)  # a usage error: click's exit code
    res = run(c, "top", "--metrics", "127.0.0.1:1", "--once", "--interval", "0.2", rc=1)
    assert "--metrics-listen" in res.stderr


def test_ca_and_credentials(env, tmp_path):
    c = env
    res = run(c, "ca", "init", str(tmp_path / "ca"))
    assert res.stdout.strip() == str(tmp_path / "ca") and (tmp_path / "ca" / "ca.key").exists()
    run(c, "credential", "new", "--ca", str(tmp_path / "ca"), "--role", "admin", "--name", "ops",
        "--out", str(tmp_path / "ops"))
    assert (tmp_path / "ops" / "cert.pem").exists()
    run(c, "credential", "new", "--ca", str(tmp_path / "ca"), "--role", "client", "--name", "n",
        "--out", str(tmp_path / "n"), "--squash", "1000:1000")
    run(c, "credential", "new", "--ca", str(tmp_path / "ca"), "--role", "nobody", "--name", "x",
        "--out", str(tmp_path / "x"), rc=2)
    res = run(c, "credential", "revoke", "--ca", str(tmp_path / "ca"), "n")
    assert "revoked" in res.stdout and "n" in (tmp_path / "ca" / "revoked").read_text()
    # a credential of another CA is refused by this cluster
    res = run(c, "status", "--credentials", str(tmp_path / "ops"), rc=1)
    assert res.stderr.splitlines()[-1].startswith("stripefs status: ")  # after grpc's own log line


# ---------------------------------------------------------------------------- du


def du_all(c: Cluster, rel: str) -> list[dict]:
    """du of one directory named three ways: in the mount, stripefs:/..., stripefs://HOSTS/..."""
    doc = run_json(c, "du", str(c.mnt / rel), f"stripefs:/{rel}", f"stripefs://{c.meta_addr}/{rel}")
    return [{k: d[k] for k in ("bytes", "files", "dirs")} for d in doc]


def assert_du_matches(c: Cluster, rel: str) -> None:
    want = walk_usage(c.mnt / rel)
    got = du_all(c, rel)
    assert got == [want] * 3, (got, want)
    top = run_json(c, "du", str(c.mnt))[0]
    assert {k: top[k] for k in ("bytes", "files", "dirs")} == walk_usage(c.mnt)


def test_du_agrees_with_a_walk(env):
    c = env
    d = c.mnt / "du"
    (d / "a" / "b").mkdir(parents=True)
    (d / "c").mkdir()
    for i in range(10):
        (d / "a" / f"f{i}").write_bytes(os.urandom(i * 1000))
    (d / "a" / "b" / "big").write_bytes(os.urandom(5 * MiB + 7))
    (d / "c" / "empty").touch()
    os.symlink("a/f1", d / "link")
    assert_du_matches(c, "du")

    with open(d / "a" / "f3", "ab") as f:  # writes: growing, and in the middle
        f.write(b"x" * 12345)
    with open(d / "a" / "b" / "big", "r+b") as f:
        f.seek(100)
        f.write(b"y" * 100)
    os.truncate(d / "a" / "b" / "big", 3 * MiB)  # truncates: shorter and longer
    os.truncate(d / "a" / "f2", 50_000)
    assert_du_matches(c, "du")

    os.rename(d / "a" / "f4", d / "c" / "f4")  # a file to another directory
    os.rename(d / "a" / "b", d / "c" / "b")  # a directory and what is under it
    os.rename(d / "a" / "f5", d / "a" / "f6")  # over another file
    assert_du_matches(c, "du")
    assert du_all(c, "du/c")[0] == walk_usage(d / "c")

    os.link(d / "a" / "f7", d / "c" / "hard")  # hard links: each counted
    os.link(d / "c" / "b" / "big", d / "a" / "big2")
    assert_du_matches(c, "du")
    os.unlink(d / "a" / "f7")
    os.unlink(d / "a" / "f8")
    os.unlink(d / "link")
    (d / "c" / "empty").unlink()
    assert_du_matches(c, "du")

    # A file: its own size; text output and -b.
    one = run_json(c, "du", str(d / "a" / "f3"))[0]
    assert one["bytes"] == os.path.getsize(d / "a" / "f3") and one["files"] == 1 and one["dirs"] == 0
    res = run(c, "du", str(d), "-b")
    assert str(walk_usage(d)["bytes"]) in res.stdout and str(d) in res.stdout
    assert "MiB" in run(c, "du", str(d)).stdout

    # The counters survive a metaserver restart, and go on counting after it.
    c.restart_meta()
    c.wait_servers_up(3)
    assert_du_matches(c, "du")
    (d / "after").write_bytes(b"z" * 4321)
    os.unlink(d / "c" / "hard")
    deadline = time.monotonic() + 30
    while True:  # the mount reconnects on its own
        try:
            assert_du_matches(c, "du")
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert run_json(c, "fsck")["clean"] is True


# ---------------------------------------------------------------------------- info


def test_info(env):
    c = env
    d = c.mnt / "info"
    d.mkdir()
    big = d / "big"
    big.write_bytes(os.urandom(9 * MiB + 5))  # three 4 MiB blocks, the last partial
    os.setxattr(big, "user.split", b"train")
    (d / "small").write_bytes(b"tiny")
    servers = {s.address for s in c.data}

    docs = run_json(c, "info", str(big), "stripefs:/info/small", str(d))
    f, small, dirdoc = docs
    assert f["path"] == str(big) and f["cluster_path"] == "/info/big"
    assert f["type"] == "file" and f["size"] == 9 * MiB + 5 and f["mode"] == f"{os.stat(big).st_mode & 0o7777:04o}"
    assert f["ino"] == os.stat(big).st_ino and f["nlink"] == 1 and f["labels"] == {"split": "train"}
    assert f["inline"] is False and [b["index"] for b in f["blocks"]] == [0, 1, 2]
    assert [b["length"] for b in f["blocks"]] == [4 * MiB, 4 * MiB, MiB + 5]
    for b in f["blocks"]:
        assert len(b["replicas"]) == 2 and {r["state"] for r in b["replicas"]} == {"up"}
        assert {r["address"] for r in b["replicas"]} <= servers
    assert small["inline"] is True and small["size"] == 4
    # A client credential is entitled to a map by an open of the file (recorded for it,
    # though a reader's open of a file without blocks is not otherwise).
    [small_as_client] = run_json(c, "info", "stripefs:/info/small", "--credentials", str(c.client))
    assert small_as_client["inline"] is True and small_as_client["size"] == 4
    assert dirdoc["type"] == "directory" and dirdoc["usage"] == {"bytes": 9 * MiB + 9, "files": 2, "dirs": 1}
    assert "blocks" not in dirdoc

    text = run(c, "info", str(big), str(d)).stdout
    for b in f["blocks"]:
        assert str(b["block_id"]) in text
    assert "split" in text and "train" in text and " up" in text and "usage" in text

    # A data server down: its replicas say so.
    c.kill_data(0)
    try:
        deadline = time.monotonic() + 60
        while True:
            doc = run_json(c, "info", str(big))[0]
            states = {r["address"]: r["state"] for b in doc["blocks"] for r in b["replicas"]}
            if c.data[0].address not in states or states[c.data[0].address] != "up":
                break
            assert time.monotonic() < deadline, states
            time.sleep(1)
    finally:
        c.start_data(0, listen=c.data[0].address)
        c.wait_servers_up(3, timeout=60)


# ---------------------------------------------------------------------------- cp


def make_local_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for i, size in enumerate([0, 1, 4096, 100_000, 5 * MiB + 3, 300]):
        (root / ("sub" if i % 2 else "") / f"f{i}").write_bytes(os.urandom(size))
    (root / "sub" / "deeper" / "g").write_bytes(os.urandom(9 * MiB))
    os.symlink("sub/f1", root / "link")


def test_cp(env, tmp_path):
    c = env
    src = tmp_path / "src"
    make_local_tree(src)
    want = tree_digests(src)
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    files = sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())

    # Data servers take file data only from clients: an admin credential is refused up front.
    (c.mnt / "cp").mkdir()
    res = run(c, "cp", str(src / "f0"), "stripefs:/cp/x", rc=1)
    assert "client credential" in res.stderr and not (c.mnt / "cp" / "x").exists()
    client = ("--credentials", str(c.client))

    # In: local -> cluster (stripefs:/ names a path that does not exist yet: the copy's name).
    doc = run_json(c, "cp", "-r", "-j", "4", str(src), "stripefs:/cp/in", *client)
    assert doc["files"] == files and doc["bytes"] == total and doc["failed"] == [] and doc["seconds"] > 0
    # The mount made `cp` well under a second ago and knows it empty: between clients,
    # close-to-open holds within ENTRY_TTL_S (fs/client/cache.py), and the copy's name
    # shows once that negative answer ages out.
    deadline = time.monotonic() + 10 * ENTRY_TTL_S
    while not (c.mnt / "cp" / "in").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tree_digests(c.mnt / "cp" / "in") == want

    # A directory without -r: refused, named, on one line however long (a narrow console
    # wrapped it at its width); the other sources still copied.
    res = run(c, "cp", str(src), str(src / "f0"), str(src / "sub" / "f1"), "stripefs:/cp", *client, rc=1,
              env={"COLUMNS": "40"})
    assert f"stripefs cp: {src}: is a directory: not copied (use -r)\n" in res.stderr
    assert (c.mnt / "cp" / "f0").exists() and (c.mnt / "cp" / "f1").read_bytes() == (src / "sub" / "f1").read_bytes()
    assert "copied 2 files" in res.stdout and "1 failed" in res.stdout

    # Out: cluster (a path in the mount) -> local, into an existing directory.
    out = tmp_path / "out"
    out.mkdir()
    res = run(c, "cp", "-r", str(c.mnt / "cp" / "in"), str(out))
    assert f"copied {files} files" in res.stdout and "MB/s" in res.stdout
    assert tree_digests(out / "in") == want

    # Within: cluster -> cluster, named by URL, then several files into a directory.
    doc = run_json(c, "cp", "-r", f"stripefs://{c.meta_addr}/cp/in", "stripefs:/cp/again", *client)
    assert doc["files"] == files and doc["failed"] == []
    assert tree_digests(c.mnt / "cp" / "again") == want
    (c.mnt / "cp" / "several").mkdir()
    doc = run_json(c, "cp", "stripefs:/cp/in/sub/deeper/g", str(c.mnt / "cp" / "in" / "f4"), str(src / "f2"),
                   "stripefs:/cp/several", *client)
    assert doc["files"] == 3 and doc["bytes"] == 9 * MiB + 5 * MiB + 3 + 4096
    assert sorted(os.listdir(c.mnt / "cp" / "several")) == ["f2", "f4", "g"]
    assert (c.mnt / "cp" / "several" / "g").read_bytes() == (src / "sub" / "deeper" / "g").read_bytes()

    # Failures: a missing source is named with its errno text, the rest goes on, exit 1;
    # several sources into something that is not a directory is refused whole.
    res = run(c, "cp", str(tmp_path / "missing"), str(src / "f0"), str(out), "--json", rc=1)
    doc = json.loads(res.stdout)
    assert doc["files"] == 1 and [f["src"] for f in doc["failed"]] == [str(tmp_path / "missing")]
    assert "No such file or directory" in doc["failed"][0]["error"] and "missing" in res.stderr
    res = run(c, "cp", str(src / "f0"), str(src / "f2"), str(tmp_path / "nodir"), rc=1)
    assert "not a directory" in res.stderr
    assert run_json(c, "fsck")["clean"] is True


# ---------------------------------------------------------------------------- top


def test_top(env):
    c = env
    work = c.mnt / "top"
    work.mkdir()
    meta_metrics = c.meta_metrics_file.read_text().strip()
    sources = ["--metrics", meta_metrics, "--metrics", c.mount_metrics]
    proc = subprocess.Popen(cli("top", *sources, "--once", "--interval", "3", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        # Busy until top has taken both its samples, however long it takes to start.
        deadline = time.monotonic() + 60
        i = 0
        while proc.poll() is None and time.monotonic() < deadline:
            (work / f"f{i}").write_bytes(os.urandom(64 * 1024))
            (work / f"f{i}").read_bytes()
            i += 1
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert 2.5 < doc["interval_s"] < 10
    meta, mount = doc["sources"]
    assert meta["address"] == meta_metrics and mount["address"] == c.mount_metrics
    rpc = {o["name"]: o for o in meta["ops"] if o["kind"] == "rpc"}
    mknod = [o for name, o in rpc.items() if name.endswith(".mknod")]
    assert mknod and mknod[0]["ops_per_s"] > 0 and mknod[0]["mean_ms"] is not None, rpc
    assert all(o["ops_per_s"] > 0 for o in meta["ops"])
    fuse = {o["name"]: o for o in mount["ops"] if o["kind"] == "fuse"}
    assert fuse["create"]["ops_per_s"] > 0 and fuse["write"]["ops_per_s"] > 0 and fuse["write"]["mean_ms"] >= 0
    assert any(o["kind"] == "meta-call" for o in mount["ops"])
    assert mount["written_bytes_per_s"] > 0
    assert mount["cache_hit_ratio"] is None or 0 <= mount["cache_hit_ratio"] <= 1

    res = run(c, "top", *sources, "--once", "--interval", "0.5")
    assert "operations" in res.stdout and meta_metrics in res.stdout and c.mount_metrics in res.stdout


def test_mount_and_umount(env, tmp_path):
    """`stripefs mount` returns once mounted; `umount` of a busy mount retries, then
    detaches it lazily and says so; of a path not mounted, an error (fs/mounts.py)."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    log = tmp_path / "mount.log"
    res = subprocess.run(cli("mount", env.meta_addr, str(mnt), "--credentials", str(env.client),
                             "--log-file", str(log)), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert os.path.ismount(mnt)
    # A process with its working directory inside keeps the mount busy.
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt)
    try:
        started = time.monotonic()
        res = subprocess.run(cli("umount", str(mnt)), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "detached lazily" in res.stderr, res.stderr
        assert time.monotonic() - started >= 1.0  # it tried a while before detaching
        assert not os.path.ismount(mnt)
    finally:
        holder.kill()
        holder.wait()
    res = subprocess.run(cli("umount", str(mnt)), capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "is not mounted" in res.stderr, (res.returncode, res.stderr)
    # The mount process ends once its last user is gone.
    deadline = time.monotonic() + 30
    while not _mount_process_gone(mnt) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _mount_process_gone(mnt)


def _mount_process_gone(mnt: Path) -> bool:
    res = subprocess.run(["pgrep", "-f", f"mount .* {mnt}"], capture_output=True)
    return res.returncode != 0
