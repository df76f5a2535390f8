"""End to end with the real scripts: `scripts/up` a cluster, write files, `scripts/down`
(nothing mounted, no process left), `scripts/up` again, and every file reads back the same;
with each metadata engine (postgres: two metaservers and the PostgreSQL in STATE/pg).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cluster import LOGS, REPO_ROOT, is_mounted, sha256_file, unmount

pytestmark = [pytest.mark.mount, pytest.mark.slow]

script_timeout_s = 120


def script(name: str, *args: os.PathLike | str) -> str:
    res = subprocess.run(
        [os.fspath(REPO_ROOT / "scripts" / name), *map(os.fspath, args)],
        capture_output=True, text=True, timeout=script_timeout_s,
    )
    assert res.returncode == 0, f"scripts/{name} exited with {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (our state directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state not in ("Z", "X"):
            found.append(f"{entry}: {cmdline}")
    return found


def write_tree(root: Path, seed: int = 5) -> dict[str, str]:
    """Files of assorted sizes in nested directories; returns sha256 per relative path."""
    rng = random.Random(seed)
    sizes = [0, 1, 4096, 100_000, 1024 * 1024, 4 * 1024 * 1024 + 1, 12 * 1024 * 1024]
    sizes += [rng.randint(0, 300_000) for _ in range(40)]
    digests = {}
    for i, size in enumerate(sizes):
        rel = f"d{i % 4}/sub{i % 3}/file{i:03d}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        digests[rel] = sha256_file(path)
    os.symlink("d0/sub0/file000", root / "link")
    os.setxattr(root / "d1", "user.label", b"kept")
    return digests


def check_tree(root: Path, digests: dict[str, str]) -> None:
    changed = [rel for rel, digest in digests.items() if sha256_file(root / rel) != digest]
    assert not changed, f"content changed across the restart: {changed}"
    assert os.readlink(root / "link") == "d0/sub0/file000"
    assert os.getxattr(root / "d1", "user.label") == b"kept"


@pytest.mark.timeout(280)
@pytest.mark.parametrize("engine, metaservers", [("sqlite", 1), ("postgres", 2)])
def test_down_and_up_keep_every_file(tmp_path: Path, engine: str, metaservers: int):
    state, mnt = tmp_path / "state", tmp_path / "mnt"
    try:
        out = script("up", "--state", state, "--mount", mnt, "--dataservers", "3", "--meta-engine", engine)
        assert "is up" in out
        assert len((state / "meta.addr").read_text().strip().split(",")) == metaservers
        for log in (state / "logs").glob("*.log"):
            LOGS.append(log)  # a traceback there fails the test, as for the harness's own
        assert is_mounted(mnt)
        assert "already up" in script("up", "--state", state, "--mount", mnt)

        digests = write_tree(mnt)
        check_tree(mnt, digests)
        pids = [int(p.read_text()) for p in (state / "pids").glob("*.pid")]
        assert len(pids) == 4 + metaservers, sorted(p.name for p in (state / "pids").glob("*.pid"))

        script("down", "--state", state, "--mount", mnt)
        assert not is_mounted(mnt), "scripts/down left the mount behind"
        assert not processes_mentioning(os.fspath(state)), "scripts/down left processes behind"
        assert not list((state / "pids").glob("*.pid"))
        assert "not running" in script("down", "--state", state)

        # Without --mount or --meta-engine: up and down remember where the state was
        # mounted and where its metadata is.
        script("up", "--state", state)
        assert is_mounted(mnt)
        assert len((state / "meta.addr").read_text().strip().split(",")) == metaservers
        check_tree(mnt, digests)
        (mnt / "after-restart").write_bytes(b"new")
        script("down", "--state", state)
        assert not is_mounted(mnt)
        assert not processes_mentioning(os.fspath(state))
    finally:
        # Whatever happened above, leave nothing behind.
        subprocess.run([os.fspath(REPO_ROOT / "scripts" / "down"), "--state", os.fspath(state),
                        "--mount", os.fspath(mnt)], capture_output=True, timeout=script_timeout_s)
        if is_mounted(mnt):
            unmount(mnt)
        for line in processes_mentioning(os.fspath(state)):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        time.sleep(0.1)
