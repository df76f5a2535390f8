"""mypy over the installed packages, under the names they install as.

The repository keeps fs/, proto/, metaserver/ and dataserver/ where pyproject.toml installs
them as `stripefs`, `stripefs.proto`, ... ([tool.setuptools.package-dir]), a mapping mypy
cannot follow. This lays the package out as it installs, as a temporary tree of symbolic
links made from that table, checks `-p stripefs` there with the settings of [tool.mypy],
and prints what mypy says with the repository's paths.

    .venv/bin/python scripts/typecheck.py [MYPY OPTIONS...]     (also run by tests/test_lint.py)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def link_tree(top: Path) -> dict[str, str]:
    """Lays the packages out under `top` as they install; returns {tree path prefix: repo prefix}."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    back = {}
    # Parents first, so that a mapped subpackage is linked inside its parent's directory.
    for package, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        where = top.joinpath(*package.split("."))
        where.mkdir(parents=True, exist_ok=True)
        for entry in (ROOT / folder).iterdir():
            if entry.name != "__pycache__" and not (where / entry.name).exists():
                (where / entry.name).symlink_to(entry)
        back[f"{where}/"] = f"{folder}/"
    return back


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="stripefs-typecheck-") as tmp:
        back = link_tree(Path(tmp))
        out = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", os.devnull, "-p", "stripefs", *sys.argv[1:]],
                             cwd=ROOT, env={**os.environ, "MYPYPATH": tmp}, capture_output=True, text=True)
    text = out.stdout + out.stderr
    # Longest prefix first: stripefs/proto/ before stripefs/.
    for tree_prefix, repo_prefix in sorted(back.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(tree_prefix, repo_prefix)
    sys.stdout.write(text)
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
