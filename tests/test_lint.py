"""The code checks the suite includes: ruff (pyflakes, pycodestyle and the async rules: no
blocking call or busy wait in a coroutine) over everything, mypy over the installed package
(scripts/typecheck.py), both configured in pyproject.toml; and no code naming a module by
its folder (`fs`, `proto`, ...) rather than by the name it installs as (`stripefs...`)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
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
    out = run(sys.executable, str(ROOT / "scripts" / "typecheck.py"))
    assert out.returncode == 0, out.stdout + out.stderr


def folder_imports(tree: ast.AST, folders: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in `tree` whose first name is one of `folders`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in folders]
    return found


def test_modules_are_named_as_they_install():
    """The source tree is on the path of tests and of processes started from it, so an
    `import proto.x` there would work, and then fail (or import proto-plus) once installed."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    folders = {folder for folder in package_dir.values() if "/" not in folder}
    assert folders == {"fs", "proto", "metaserver", "dataserver"}, package_dir
    assert folder_imports(ast.parse("import proto.codec\nfrom fs.client import x\nfrom .fs import y\n"), folders) == [
        (1, "proto.codec"), (2, "fs.client")]
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith("."):
            continue
        bad += [f"{rel}:{line}: {name}" for line, name in folder_imports(ast.parse(path.read_text()), folders)]
    assert not bad, "import these as stripefs.<...>:\n" + "\n".join(bad)
