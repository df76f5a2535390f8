"""What `pip install .` gives, installed as a user installs it: into a fresh virtualenv,
from the source tree (a real wheel build, not the editable install the suite runs on),
next to proto-plus, whose import name `proto` stripefs's own proto/ folder used to take.

Everything stripefs installs lives under the one import name `stripefs`; both packages
import in one interpreter; the `stripefs` command, the fsspec entry point and the schema
files are there; and a cluster run entirely by the installed copy serves a
`stripefs://` round trip and `stripefs du`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from cluster import REPO_ROOT, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: The import names of packages stripefs must sit beside: proto-plus (`proto`, used by
#: many Google Cloud libraries) and PyFilesystem2 (`fs`).
FOREIGN = ("proto", "fs")


def source_copy(to: Path) -> Path:
    """What pyproject.toml and setup.py (the compiled part) build from, copied (a build
    writes build/ and *.egg-info beside its source: not into the repository)."""
    table = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    for name in ["pyproject.toml", "setup.py", table["project"].get("readme", "README.md")]:
        shutil.copy2(REPO_ROOT / name, to / name)
    for folder in table["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(REPO_ROOT / folder, to / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return to


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with stripefs (built from this tree) and proto-plus installed."""
    where = tmp_path_factory.mktemp("venv") / "v"
    source = source_copy(tmp_path_factory.mktemp("source"))
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    py = where / "bin" / "python"
    out = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source), "proto-plus"],
        capture_output=True, text=True, timeout=800, cwd=where,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return where


def run_in(venv: Path, code: str, cwd: Path) -> str:
    """Runs `code` with the virtualenv's interpreter, away from the repository (so that
    nothing of the source tree is on its path)."""
    out = subprocess.run([str(venv / "bin" / "python"), "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_everything_installs_under_stripefs(venv, tmp_path):
    listed = run_in(venv, """
        import json
        from importlib.metadata import distribution
        dist = distribution("stripefs")
        print(json.dumps(sorted({str(f).split("/")[0] for f in dist.files})))
    """, tmp_path)
    tops = json.loads(listed)
    # The package, its metadata, and the console script (../../../bin/stripefs).
    assert [t for t in tops if not t.endswith(".dist-info") and t != ".."] == ["stripefs"], tops


def test_imports_beside_proto_plus(venv, tmp_path):
    out = run_in(venv, f"""
        import importlib, pkgutil, sys
        import proto                      # proto-plus
        import stripefs
        import stripefs.proto.messages

        class Point(proto.Message):       # proto-plus still works with stripefs imported
            x = proto.Field(proto.INT32, number=1)
        assert Point(x=3).x == 3
        assert "site-packages/proto/" in proto.__file__, proto.__file__

        # Every module of the package imports (a __main__ runs its program when imported).
        names = [m.name for m in pkgutil.walk_packages(stripefs.__path__, "stripefs.")
                 if not m.name.endswith(".__main__")]
        for name in names:
            importlib.import_module(name)
        assert {{"stripefs.client", "stripefs.fuse.ops", "stripefs.metaserver.core", "stripefs.dataserver.store",
                 "stripefs.proto.rpc", "stripefs.cli", "stripefs.fsspec"}} <= set(names), names

        # Nothing of stripefs answers to a foreign import name.
        for foreign in {FOREIGN!r}:
            mod = sys.modules.get(foreign)
            assert mod is None or "stripefs" not in (getattr(mod, "__file__", "") or ""), mod
        try:
            import fs
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError(f"fs importable: {{fs.__file__}}")

        # The public API named in stripefs/__init__.py, and the package data.
        for name in stripefs.__all__:
            getattr(stripefs, name)
        from stripefs.metaserver import store_pg, store_sqlite
        assert store_sqlite.SCHEMA_PATH.is_file() and store_pg.SCHEMA_PATH.is_file()
        import fsspec
        from stripefs.fsspec import StripeFileSystem
        assert fsspec.get_filesystem_class("stripefs") is StripeFileSystem
        print(len(names))
    """, tmp_path)
    assert int(out) > 40


def test_the_stripefs_command(venv, tmp_path):
    out = subprocess.run([str(venv / "bin" / "stripefs"), "--help"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for command in ("meta", "data", "mount", "status", "fsck", "du", "find", "info", "cp", "top"):
        assert command in out.stdout, out.stdout


def test_a_cluster_run_by_the_installed_copy(venv, tmp_path):
    """Metaserver, data servers and commands all from the fresh virtualenv; a library user
    there writes and reads through a stripefs:// URL with proto-plus imported beside it."""
    py = str(venv / "bin" / "python")
    with Cluster(tmp_path / "c", dataservers=2, python=py) as c:
        url = f"stripefs://{c.meta_addr}/installed/f.bin"
        run_in(venv, f"""
            import os, proto, fsspec
            data = os.urandom(3 * 1024 * 1024 + 5)
            with fsspec.open({url!r}, "wb", credentials={str(c.client)!r}) as f:
                f.write(data)
            with fsspec.open({url!r}, "rb", credentials={str(c.client)!r}) as f:
                assert f.read() == data

            # The library through the package's public names (README's example).
            import trio, stripefs

            async def main():
                creds = stripefs.load_credentials({str(c.client)!r})
                async with stripefs.open_client({c.meta_addr!r}, creds) as client:
                    usage = await stripefs.paths.usage(client, "/installed")
                    assert (usage.bytes, usage.files) == (len(data), 1), usage
                    assert await stripefs.paths.read_file(client, "/installed/f.bin", 5, 10) == data[5:10]
                    try:
                        await stripefs.paths.resolve(client, "/installed/none")
                    except stripefs.FsError as e:
                        assert e.errno == 2, e
                    else:
                        raise AssertionError("no ENOENT")

            trio.run(main)
        """, tmp_path)
        du_url = f"stripefs://{c.meta_addr}/installed"
        out = subprocess.run([py, "-m", "stripefs.cli", "du", "--credentials", str(c.client), "--json", du_url],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        usage = json.loads(out.stdout)
        assert usage == [{"path": du_url, "bytes": 3 * 1024 * 1024 + 5, "files": 1, "dirs": 1}], usage
