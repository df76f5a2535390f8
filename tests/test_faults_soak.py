"""Smoke test of scripts/soak: a 20-second run under random faults ends by itself, finds
nothing lost, leaves no process or mount behind, and prints its summary."""

from __future__ import annotations

import json
import subprocess

import pytest
from cluster import REPO_ROOT, is_mounted

pytestmark = [pytest.mark.mount, pytest.mark.allow_tracebacks, pytest.mark.timeout(240)]


def test_soak_smoke(tmp_path):
    state = tmp_path / "soak"
    res = subprocess.run(
        [str(REPO_ROOT / "scripts" / "soak"), "--minutes", "0.33", "--state", str(state), "--json", "--seed", "7"],
        capture_output=True, text=True, timeout=220, env={"STRIPEFS_SKIP_INSTALL": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["fsck_clean"] and not summary["lost_or_corrupt"]
    assert summary["operations_total"] > 0 and summary["bytes_verified"] > 0
    assert sum(summary["faults"].values()) >= 1
    assert not is_mounted(state / "mnt")
    leftovers = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
    assert not leftovers, leftovers
