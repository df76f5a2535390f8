"""The code checks the suite includes: ruff (pyflakes, pycodestyle and the async rules: no
blocking call or busy wait in a coroutine) over everything, and mypy over the installed
packages, both configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.timeout(600)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=540)


def test_ruff():
    out = run(str(BIN / "ruff"), "check", "--no-cache", "--output-format", "concise", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy():
    out = run(sys.executable, "-m", "mypy", "--cache-dir", "/dev/null")
    assert out.returncode == 0, out.stdout + out.stderr
