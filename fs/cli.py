"""The `stripefs` command: one subcommand per role and per operator task (docs/cli.md).

  stripefs meta   --listen HOST:PORT --dir DIR            the metadata server
  stripefs data   --listen HOST:PORT --meta METAS --dir DIR   a data server
  stripefs mount  METAS MOUNTPOINT                         mount (returns when ready)
  stripefs umount MOUNTPOINT
  stripefs status [--json]                                 metaservers, data servers, replication health
  stripefs fsck   [--repair] [--json]                      check (and repair) the metadata
  stripefs du     PATH... [--json] [-b]                    bytes, files, directories under each path
  stripefs info   PATH... [--json]                         inode, labels, blocks and their replicas
  stripefs cp     SRC... DST [-r] [-j N] [--json]          copy in, out of and within a cluster
  stripefs top    --metrics HOST:PORT... [--once] [--json] live operation rates of running roles
  stripefs ca init DIR                                     make the cluster's CA
  stripefs credential new --ca DIR --role ROLE --name NAME [--squash root|UID:GID] --out DIR
                                                           issue a credential
  stripefs credential revoke --ca DIR NAME                 refuse a credential from now on

METAS is the metaservers' HOST:PORT, or several of them: HOST:PORT,HOST:PORT,... (every
metaserver of a cluster serves every caller; a caller talks to one and moves to the next
when it fails). STATE/meta.addr holds the same, on one line.

Paths of du, info and cp: a path inside a stripefs mount is that cluster's file;
`stripefs://HOST:PORT[,...]/path` names a cluster and a path; `stripefs:/path` is a path of
the cluster --meta (or $STRIPEFS_META, or STATE/meta.addr) names. For du and info any
other path is a path of that cluster too; for cp it is a local file.

The server roles are imported only when their subcommand runs: this module is the
composition root, the one place that knows every role. Built on click; tables and
progress are rich's.
"""

from __future__ import annotations

import errno
import functools
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import click

from stripefs.mounts import unmount, wait_mounted
from stripefs.proto.types import CREDENTIALS_ENV, DEFAULT_REPLICAS, META_ENV

DEFAULT_STATE_DIR = ".stripefs"
MOUNT_READY_TIMEOUT_S = 30.0
#: Where scripts/up keeps a local cluster's CA and credential bundles, under the state dir.
CREDENTIALS_SUBDIR = "credentials"
#: How long `stripefs status` waits for each metaserver's answer.
STATUS_TIMEOUT_S = 10.0
#: fsck reads the whole store in one transaction: give a large one time.
FSCK_TIMEOUT_S = 600.0
#: Columns of tables written to something that is not a terminal (a pipe, a file).
PIPE_WIDTH = 200


class CliError(click.ClickException):
    """An expected failure: one line on stderr, `stripefs CMD: what failed and what to do`,
    exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        ctx = click.get_current_context(silent=True)  # shown after the command's context ended
        self.command_path = ctx.command_path if ctx else "stripefs"

    def show(self, file: Any = None) -> None:
        click.echo(f"{self.command_path}: {self.message}", err=True)


def _console(stderr: bool = False):
    """A rich console without markup (paths and addresses print as they are)."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False, markup=False)
    if not console.is_terminal and not stderr:
        console = Console(highlight=False, markup=False, width=PIPE_WIDTH)
    return console


def _table(*columns: str, title: Optional[str] = None, right: tuple[str, ...] = ()):
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for c in columns:
        table.add_column(c, justify="right" if c in right else "left", overflow="fold")
    return table


def _styled(text: str, style: str):
    from rich.text import Text

    return Text(text, style=style)


STATE_STYLES = {"up": "green", "suspect": "yellow", "dead": "red", "unknown": "red"}


def _human(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def _print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))


# ---------------------------------------------------------------------------- which cluster, as whom


@dataclass
class ClusterOptions:
    """--meta, --credentials, --state of a command that talks to a cluster."""

    meta: Optional[str] = None
    credentials: Optional[str] = None
    state: Optional[str] = None


def _cluster_options(fn: Callable) -> Callable:
    """--meta, --credentials and --state, handed to the command as `cluster`."""
    @click.option("--meta", metavar="HOST:PORT[,HOST:PORT...]",
                  help=f"the metaservers (default ${META_ENV}, else STATE/meta.addr)")
    @click.option("--credentials", metavar="DIR",
                  help=f"credential bundle (default ${CREDENTIALS_ENV}, else STATE/credentials/admin)")
    @click.option("--state", metavar="DIR",
                  help=f"local cluster state directory (default $STRIPEFS_STATE, else ./{DEFAULT_STATE_DIR})")
    @functools.wraps(fn)
    def wrapper(meta: Optional[str], credentials: Optional[str], state: Optional[str], **kwargs: Any) -> Any:
        return fn(cluster=ClusterOptions(meta, credentials, state), **kwargs)
    return wrapper


def _json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="print JSON (docs/cli.md has its shape)")(fn)


def _state_dir(opts: ClusterOptions) -> Path:
    return Path(opts.state or os.environ.get("STRIPEFS_STATE", DEFAULT_STATE_DIR))


def _resolve_meta(opts: ClusterOptions) -> list[str]:
    """--meta if given, else $STRIPEFS_META, else the local cluster's STATE/meta.addr."""
    meta = opts.meta or os.environ.get(META_ENV) or None
    if meta is None:
        addr_file = _state_dir(opts) / "meta.addr"
        if not addr_file.exists():
            raise CliError(f"no --meta given, no ${META_ENV} and no {addr_file}: is the cluster up? "
                           "(./scripts/up, or name it with --meta HOST:PORT)")
        meta = addr_file.read_text().strip()
    return _meta_addresses(meta)


#: The local cluster's client credential (scripts/up issues it for its mount): what a
#: command that writes file data uses by default, since data servers take blocks from
#: clients only.
WRITER_CREDENTIAL = "mount"


def _resolve_credentials(opts: ClusterOptions, writes: bool = False) -> str:
    """--credentials if given, else $STRIPEFS_CREDENTIALS, else STATE/credentials/admin (for
    a command that writes files into a cluster: STATE/credentials/mount, if there is one)."""
    given = opts.credentials or os.environ.get(CREDENTIALS_ENV)
    if given:
        return given
    local = _state_dir(opts) / CREDENTIALS_SUBDIR
    if writes and (local / WRITER_CREDENTIAL).is_dir():
        return str(local / WRITER_CREDENTIAL)
    return str(local / "admin")


def _resolve_meta_and_credentials(opts: ClusterOptions) -> tuple[list[str], str]:
    """The metaservers and the credential bundle a command talks to a cluster with."""
    return _resolve_meta(opts), _resolve_credentials(opts)


def _meta_addresses(value: str) -> list[str]:
    from stripefs.proto.rpc import parse_addresses

    try:
        return parse_addresses(value)
    except ValueError as exc:
        raise CliError(f"metaservers: {exc}") from None


def _load_credentials(path: str):
    from stripefs.proto.credentials import load_credentials
    from stripefs.proto.errors import FsError

    try:
        return load_credentials(path)
    except FsError as exc:
        raise CliError(exc.message) from None


# ---------------------------------------------------------------------------- the command group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """stripefs: a distributed file system for AI training. `stripefs COMMAND --help` for
    each command; docs/cli.md for all of them."""


_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


@cli.command("meta", context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def meta_cmd(argv: tuple[str, ...]) -> None:
    """run the metadata server (see: stripefs meta --help)"""
    sys.exit(cmd_role("stripefs.metaserver.server", list(argv)))


@cli.command("data", context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def data_cmd(argv: tuple[str, ...]) -> None:
    """run a data server (see: stripefs data --help)"""
    sys.exit(cmd_role("stripefs.dataserver.server", list(argv)))


def cmd_role(module: str, argv: list[str]) -> int:
    return importlib.import_module(module).main(argv)


# ---------------------------------------------------------------------------- mount, umount


def _mount_defaults() -> tuple[int, int, int]:
    from stripefs.client.client import DEFAULT_CACHE_BYTES, DEFAULT_PREFETCH_BYTES, DEFAULT_WRITEBACK_BYTES

    return DEFAULT_WRITEBACK_BYTES >> 20, DEFAULT_CACHE_BYTES >> 20, DEFAULT_PREFETCH_BYTES >> 20


_WRITEBACK_MIB, _CACHE_MIB, _PREFETCH_MIB = _mount_defaults()


@cli.command("mount")
@click.argument("meta")
@click.argument("mountpoint")
@click.option("--credentials", envvar=CREDENTIALS_ENV, required=True, metavar="DIR",
              help=f"client credential bundle (stripefs credential new --role client; default ${CREDENTIALS_ENV})")
@click.option("--foreground", is_flag=True, help="run in the foreground until unmounted")
@click.option("--log-file")
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--pid-file")
@click.option("-o", "options", help="extra FUSE mount options, comma separated")
@click.option("--writeback-mib", type=int, default=_WRITEBACK_MIB, show_default=True, help="memory for unflushed writes (MiB)")
@click.option("--cache-mib", type=int, default=_CACHE_MIB, show_default=True, help="memory for cached blocks (MiB)")
@click.option("--prefetch-mib", type=int, default=_PREFETCH_MIB, show_default=True,
              help="memory for blocks fetched ahead of readers by a prefetch plan (MiB; MNT/.stripefs/prefetch)")
@click.option("--cache-dir", metavar="DIR", help="keep blocks read on local disk here (survives a remount)")
@click.option("--cache-size", metavar="SIZE", default="10G", show_default=True,
              help="with --cache-dir: the most it holds (K, M, G, T)")
@click.option("--stage-size", metavar="SIZE", default="10G", show_default=True,
              help="with --cache-dir: the most local disk taken by files of async checkpoint directories "
                   "waiting for their upload (K, M, G, T)")
@click.option("--metrics-listen", metavar="HOST:PORT",
              help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port)")
@click.option("--metrics-ready-file", metavar="FILE", help="with --metrics-listen: write the bound HOST:PORT here once serving")
def mount_cmd(**kw: Any) -> None:
    """mount a cluster: META is HOST:PORT or HOST:PORT,HOST:PORT,... (returns once mounted,
    unless --foreground)"""
    sys.exit(cmd_mount(SimpleNamespace(**kw)))


def cmd_mount(args: SimpleNamespace) -> int:
    from stripefs.proto.logsetup import setup_logging

    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        raise CliError(f"{mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise CliError(f"{mountpoint} is already a mount point (stripefs umount {mountpoint} first)")
    _meta_addresses(args.meta)
    creds = _load_credentials(args.credentials)
    from stripefs.client.disktier import parse_size

    try:
        cache_dir_bytes = parse_size(args.cache_size)
    except ValueError as exc:
        raise CliError(f"--cache-size: {exc}") from None
    try:
        stage_bytes = parse_size(args.stage_size)
    except ValueError as exc:
        raise CliError(f"--stage-size: {exc}") from None
    if not args.foreground:
        return _mount_in_background(args, mountpoint)
    setup_logging(args.log_file, args.log_level)
    from stripefs.proto import malloc, metrics

    malloc.for_mount()  # before any thread starts (metrics' first): see its docstring
    if args.pid_file:
        from stripefs.proto.atomic import write_atomically

        write_atomically(args.pid_file, f"{os.getpid()}\n")
    from stripefs.fuse.mount import run_mount

    try:
        metrics.start(args)
    except (OSError, ValueError) as exc:
        raise CliError(f"metrics on {args.metrics_listen}: {exc}") from None

    from stripefs.proto.errors import FsError

    options = [o for o in (args.options or "").split(",") if o]
    try:
        run_mount(
            args.meta, mountpoint, creds, options,
            writeback_bytes=args.writeback_mib * 1024 * 1024,
            cache_bytes=args.cache_mib * 1024 * 1024,
            prefetch_bytes=args.prefetch_mib * 1024 * 1024,
            cache_dir=os.path.abspath(args.cache_dir) if args.cache_dir else "",
            cache_dir_bytes=cache_dir_bytes,
            stage_bytes=stage_bytes,
        )
    except FsError as exc:  # (a cache directory another mount holds)
        raise CliError(exc.message) from None
    return 0


def _mount_in_background(args: SimpleNamespace, mountpoint: str) -> int:
    argv = [sys.executable, "-m", "stripefs.cli", "mount", "--foreground", args.meta, mountpoint,
            "--writeback-mib", str(args.writeback_mib), "--cache-mib", str(args.cache_mib),
            "--prefetch-mib", str(args.prefetch_mib),
            "--log-level", args.log_level]
    for flag, value in (("--credentials", args.credentials), ("--log-file", args.log_file),
                        ("--pid-file", args.pid_file), ("--metrics-ready-file", args.metrics_ready_file),
                        ("-o", args.options), ("--metrics-listen", args.metrics_listen),
                        ("--cache-dir", args.cache_dir), ("--cache-size", args.cache_size),
                        ("--stage-size", args.stage_size)):
        if value:
            argv += [flag, os.path.abspath(value) if flag in ("--credentials", "--log-file", "--pid-file",
                                                              "--metrics-ready-file", "--cache-dir") else value]
    log_target = open(args.log_file, "ab") if args.log_file else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_target, stderr=log_target,
                            start_new_session=True)
    problem = wait_mounted(mountpoint, lambda: proc.poll() is None, MOUNT_READY_TIMEOUT_S)
    if problem is None:
        return 0
    if proc.poll() is not None:
        raise CliError(f"the mount process exited with {proc.returncode}"
                       + (f"; see {args.log_file}" if args.log_file else "; run with --log-file FILE to see why"))
    proc.terminate()
    raise CliError(problem + (f"; see {args.log_file}" if args.log_file else ""))


@cli.command("umount")
@click.argument("mountpoint")
def umount_cmd(mountpoint: str) -> None:
    """unmount (lazily if it is busy)"""
    mountpoint = os.path.abspath(mountpoint)
    outcome = unmount(mountpoint)
    if outcome == "not mounted":
        raise CliError(f"{mountpoint} is not mounted")
    if outcome == "lazily":
        click.echo(f"stripefs umount: {mountpoint} busy, detached lazily (gone when its last user lets go)", err=True)
    elif outcome == "failed":
        raise CliError(f"cannot unmount {mountpoint}")


# ---------------------------------------------------------------------------- ca, credential


@cli.group("ca")
def ca_group() -> None:
    """the cluster's certificate authority"""


@ca_group.command("init")
@click.argument("dir")
def ca_init_cmd(dir: str) -> None:
    """make a CA in DIR (ca.crt, ca.key 0600) unless one is there"""
    from stripefs.proto.credentials import init_ca

    click.echo(init_ca(dir))


@cli.group("credential")
def credential_group() -> None:
    """issue or revoke a credential of the cluster's CA"""


@credential_group.command("new")
@click.option("--ca", required=True, metavar="DIR", help="the CA directory (stripefs ca init)")
@click.option("--role", required=True, type=click.Choice(["meta", "data", "client", "admin"]))
@click.option("--name", required=True, help="who holds it: a host, a user, a data directory")
@click.option("--out", required=True, metavar="DIR", help="directory to write the bundle to (0700)")
@click.option("--squash", default="", metavar="root|UID:GID",
              help="client only: act as nobody (65534) where callers say root, or always as UID:GID")
def credential_new_cmd(ca: str, role: str, name: str, out: str, squash: str) -> None:
    """issue a credential bundle (ca.crt, cert.pem, key.pem) into --out"""
    from stripefs.proto.credentials import issue

    try:
        click.echo(issue(ca, role, name, out, squash=squash))
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None


@credential_group.command("revoke")
@click.option("--ca", required=True, metavar="DIR", help="the CA directory")
@click.argument("name")
def credential_revoke_cmd(ca: str, name: str) -> None:
    """list NAME (or ROLE:NAME) in the CA's revocation file (servers given --revoked refuse it)"""
    from stripefs.proto.credentials import revoke

    try:
        click.echo(revoke(ca, name))
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None


# ---------------------------------------------------------------------------- status, fsck


def _meta_call(opts: ClusterOptions, name: str, req, timeout: float):
    """One call to a metaserver named by opts (the first that can be reached): the address
    that answered and the reply; CliError if it fails."""
    from stripefs.proto.errors import FsError
    from stripefs.proto.rpc import FailoverStub
    from stripefs.proto.services import META_METHODS, META_SERVICE

    metas, creds = _resolve_meta_and_credentials(opts)
    stub = FailoverStub(metas, _load_credentials(creds), META_SERVICE, META_METHODS)
    try:
        reply = stub.call(name, req, timeout=timeout)
    except FsError as exc:
        raise CliError(f"{','.join(metas)}: {exc}") from None
    finally:
        stub.close()
    return stub.address, reply


def _status_of_each(metas: list[str], creds) -> list[tuple[str, Any]]:
    """(address, StatusReply or the FsError it failed with) for each metaserver, in order."""
    from stripefs.proto.errors import FsError, TransportError
    from stripefs.proto.messages import Empty
    from stripefs.proto.rpc import HUNG_AFTER_S, ChannelWatch, Stub
    from stripefs.proto.services import META_METHODS, META_SERVICE

    out: list[tuple[str, Any]] = []
    for address in metas:
        stub = Stub(address, creds, META_SERVICE, META_METHODS)
        watch = ChannelWatch(stub.channel)
        try:
            # One that cannot be reached (or hangs: no handshake) is told in a moment, not
            # after the call's timeout.
            if not watch.wait_ready(HUNG_AFTER_S):
                raise TransportError(f"{address}: cannot connect")
            out.append((address, stub.call("status", Empty(), timeout=STATUS_TIMEOUT_S)))
        except FsError as exc:
            out.append((address, exc))
        finally:
            watch.close()
            stub.close()
    return out


@cli.command("status")
@_cluster_options
@_json_option
def status_cmd(cluster: ClusterOptions, as_json: bool) -> None:
    """metaservers, data servers, their states and replication health"""
    sys.exit(cmd_status(cluster, as_json))


def cmd_status(opts: ClusterOptions, as_json: bool) -> int:
    """Every metaserver of the list, reachable or not; the cluster as the first that
    answered sees it. CliError if none answered."""
    from stripefs.proto.errors import FsError

    metas, creds = _resolve_meta_and_credentials(opts)
    each = _status_of_each(metas, _load_credentials(creds))
    answered = [(address, st) for address, st in each if not isinstance(st, FsError)]
    if not answered:
        raise CliError("; ".join(f"{address}: {exc}" for address, exc in each)
                       + " (are the metaservers up, and is the credential one of this cluster's CA?"
                         " check --meta and --credentials)")
    meta, st = answered[0]
    if as_json:
        out = st.to_wire()
        out["meta"] = meta
        out["addresses"] = [
            {"address": address, "reachable": False, "error": str(r)} if isinstance(r, FsError) else
            {"address": address, "reachable": True, "metaserver": r.metaserver,
             "duties": bool(r.metaserver) and r.metaserver == r.duties}
            for address, r in each
        ]
        _print_json(out)
        return 0
    # One line per metaserver first (scripts and tests read them), then the tables.
    for address, r in each:
        if isinstance(r, FsError):
            click.echo(f"metaserver {address} unreachable: {r}")
        else:
            name = f" ({r.metaserver})" if r.metaserver else ""
            duties = ", holds the background duties" if r.metaserver and r.metaserver == r.duties else ""
            click.echo(f"metaserver {address} up{name}{duties}")
    if st.engine:
        click.echo(f"store: {st.engine}")
    if st.metaservers:
        duties = st.duties_address or st.duties
        click.echo(f"metaservers on the store: {', '.join(st.metaservers)}"
                   + (f"; background duties: {duties}" if duties else ""))
    console = _console()
    table = _table("id", "address", "state", "used", "free", "capacity", "blocks", "beat", title="data servers",
                   right=("id", "used", "free", "capacity", "blocks", "beat"))
    for s in st.servers:
        table.add_row(str(s.server_id), s.address, _styled(s.state, STATE_STYLES.get(s.state, "")),
                      _human(s.used_bytes), _human(s.free_bytes), _human(s.capacity_bytes), str(s.blocks),
                      f"{s.last_heartbeat_s:.1f}s")
    console.print(table)
    table = _table("namespace", "", title=None, right=("",))
    for label, value in (("inodes", st.inodes), ("files", st.files), ("directories", st.directories),
                         ("bytes in files", _human(st.bytes)), ("inline files", f"{st.inline_files} ({_human(st.inline_bytes)})"),
                         ("blocks", st.blocks), ("client sessions", st.sessions), ("locks held", st.locks)):
        table.add_row(label, str(value))
    console.print(table)
    bad = st.under_replicated or st.lost
    click.echo(f"replication: {st.under_replicated} blocks under-replicated, {st.lost} lost"
               + (" (stripefs fsck lists them)" if bad else ""))
    return 0


@cli.command("fsck")
@_cluster_options
@click.option("--repair", is_flag=True, help="fix what can be fixed")
@_json_option
def fsck_cmd(cluster: ClusterOptions, repair: bool, as_json: bool) -> None:
    """check the metadata (read-only unless --repair); exit 1 if not clean"""
    sys.exit(cmd_fsck(cluster, repair, as_json))


def cmd_fsck(opts: ClusterOptions, repair: bool, as_json: bool) -> int:
    """Exit 0 when clean (or everything found was repaired), 1 otherwise."""
    from stripefs.proto.messages import FsckReq

    meta, rep = _meta_call(opts, "fsck", FsckReq(repair=repair), timeout=FSCK_TIMEOUT_S)
    unrepaired = len(rep.problems) - len(rep.repaired)
    if as_json:
        out = rep.to_wire()
        out["meta"] = meta
        out["clean"] = not rep.problems
        out["unrepaired"] = unrepaired
        _print_json(out)
    else:
        click.echo(f"metaserver {meta}: {rep.inodes} inodes, {rep.blocks} blocks checked; "
                   f"{rep.under_replicated} under-replicated, {rep.lost} lost")
        if rep.problems or rep.repaired:
            table = _table("", "what")
            for line in rep.problems:  # "problem:" and "repaired:" as before the table (tests read them)
                table.add_row(_styled("problem:", "red"), line)
            for line in rep.repaired:
                table.add_row(_styled("repaired:", "green"), line)
            _console().print(table)
        if not rep.problems:
            click.echo("clean")
        elif repair:
            click.echo(f"{len(rep.problems)} problems, {len(rep.repaired)} repaired")
        else:
            click.echo(f"{len(rep.problems)} problems (run with --repair to fix what can be fixed)")
    return 0 if unrepaired <= 0 and (repair or not rep.problems) else 1


# ---------------------------------------------------------------------------- du, info, cp: the library


def _with_clients(opts: ClusterOptions, work: Callable, writes: bool = False) -> Any:
    """trio.run(work(clients)) with a library session per cluster named (opened on first
    use, with the command's credential bundle); FsError from opening one is a CliError."""
    import trio
    from contextlib import AsyncExitStack

    from stripefs.cli_work import Clients
    from stripefs.proto.errors import FsError

    # The library logs what it retries and works around; what failed reaches the command
    # as an FsError, and is told as one line.
    logging.getLogger().addHandler(logging.NullHandler())
    credentials: list[Any] = []

    def creds():
        if not credentials:
            credentials.append(_load_credentials(_resolve_credentials(opts, writes)))
        return credentials[0]

    async def main() -> Any:
        async with AsyncExitStack() as stack:
            return await work(Clients(stack, creds))

    try:
        return trio.run(main)
    except FsError as exc:
        raise CliError(f"{exc} (is the cluster up? check --meta and --credentials)") from None
    except ValueError as exc:
        raise CliError(f"metaservers: {exc}") from None


def _places(opts: ClusterOptions, args: tuple[str, ...], *, bare_is_cluster: bool) -> list:
    from stripefs.cli_work import place_of, stripefs_mounts

    mounts = stripefs_mounts()
    return [place_of(a, lambda: ",".join(_resolve_meta(opts)), bare_is_cluster=bare_is_cluster, mounts=mounts)
            for a in args]


def _each_path(opts: ClusterOptions, args: tuple[str, ...], one: Callable) -> list[tuple[Any, Any]]:
    """one(client, place) for every path argument, in order: (place, its result or the
    exception it failed with)."""
    from stripefs.cli_work import Place
    from stripefs.proto.errors import FsError

    places: list[Place] = _places(opts, args, bare_is_cluster=True)

    async def work(clients) -> list[tuple[Any, Any]]:
        out: list[tuple[Any, Any]] = []
        for place in places:
            client = await clients.get(place.meta)
            try:
                out.append((place, await one(client, place)))
            except FsError as exc:
                out.append((place, exc))
        return out

    return _with_clients(opts, work)


def _report_failures(command: str, results: list[tuple[Any, Any]]) -> int:
    """Each path that failed, told on stderr; 1 if any did."""
    from stripefs.cli_work import errno_text

    failed = [(place, r) for place, r in results if isinstance(r, Exception)]
    for place, exc in failed:
        click.echo(f"stripefs {command}: {place.arg}: {errno_text(exc)}", err=True)
    return 1 if failed else 0


@cli.command("du")
@click.argument("paths", nargs=-1, required=True)
@click.option("-b", "--bytes", "exact", is_flag=True, help="sizes in bytes (default: human-readable)")
@_cluster_options
@_json_option
def du_cmd(paths: tuple[str, ...], exact: bool, cluster: ClusterOptions, as_json: bool) -> None:
    """bytes, files and directories under each PATH, from the metaserver's usage counters
    (one call per path, whatever the subtree holds; symbolic links followed)"""
    from stripefs.cli_work import usage_dict
    from stripefs.client import paths as cpaths

    results = _each_path(cluster, paths, lambda client, place: cpaths.usage(client, place.path))
    done = [(place, usage_dict(u)) for place, u in results if not isinstance(u, Exception)]
    if as_json:
        _print_json([{"path": place.arg, **u} for place, u in done])
    else:
        table = _table("path", "size", "files", "dirs", right=("size", "files", "dirs"))
        for place, u in done:
            table.add_row(place.arg, str(u["bytes"]) if exact else _human(u["bytes"]), str(u["files"]), str(u["dirs"]))
        if done:
            _console().print(table)
    sys.exit(_report_failures("du", results))


@cli.command("info")
@click.argument("paths", nargs=-1, required=True)
@_cluster_options
@_json_option
def info_cmd(paths: tuple[str, ...], cluster: ClusterOptions, as_json: bool) -> None:
    """the inode of each PATH (symbolic links followed), its labels, and a file's blocks
    with each replica's data server and that server's state (a directory: its usage)"""
    from stripefs.cli_work import info

    results = _each_path(cluster, paths, lambda client, place: info(client, place.path))
    done = [(place, doc) for place, doc in results if not isinstance(doc, Exception)]
    if as_json:
        _print_json([{**doc, "path": place.arg, "cluster_path": doc["path"]} for place, doc in done])
    else:
        console = _console()
        for place, doc in done:
            _show_info(console, place.arg, doc)
    sys.exit(_report_failures("info", results))


def _show_info(console, arg: str, doc: dict[str, Any]) -> None:
    from stripefs.cli_work import when

    table = _table("", "", title=f"{arg} ({doc['path']})")
    table.show_header = False
    replicas = str(doc["replicas"]) if doc["replicas"] else f"0 (the cluster's default: {DEFAULT_REPLICAS})"
    rows = [("inode", doc["ino"]), ("type", doc["type"]), ("mode", doc["mode"]), ("owner", f"{doc['uid']}:{doc['gid']}"),
            ("links", doc["nlink"]), ("size", f"{doc['size']} ({_human(doc['size'])})"),
            ("block size", _human(doc["block_size"])), ("replicas", replicas), ("inline max", doc["inline_max"]),
            ("generation", doc["generation"]), ("accessed", when(doc["atime_ns"])), ("modified", when(doc["mtime_ns"])),
            ("changed", when(doc["ctime_ns"]))]
    if "inline" in doc:
        rows.append(("block 0", "inline (in the metadata store)" if doc["inline"] else "on data servers"))
    if "usage" in doc:
        u = doc["usage"]
        rows.append(("usage", f"{_human(u['bytes'])} ({u['bytes']} bytes), {u['files']} files, {u['dirs']} directories"))
    for name, value in doc["labels"].items():
        rows.append((f"label {name}", value))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    if doc.get("blocks"):
        from rich.text import Text

        blocks = _table("index", "block id", "length", "replicas (server, state)", right=("index", "block id", "length"))
        for b in doc["blocks"]:
            cell = Text()
            for i, r in enumerate(b["replicas"]):
                cell.append(("  " if i else "") + f"{r['address']} ")
                cell.append(r["state"], style=STATE_STYLES.get(r["state"], ""))
            if not b["replicas"]:
                cell.append("no replica", style="red")
            blocks.add_row(str(b["index"]), str(b["block_id"]), str(b["length"]), cell)
        console.print(blocks)


def _label_option(values: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{text!r}: expected NAME=VALUE (the user.NAME attribute)", param_hint="--label")
        if key in labels:
            raise click.BadParameter(f"{key!r} given twice", param_hint="--label")
        labels[key] = value
    return labels


@cli.command("find")
@click.argument("paths", nargs=-1, required=True)
@click.option("-l", "--label", "label_texts", multiple=True, required=True, metavar="NAME=VALUE",
              help="a label every file found carries (repeat: all of them); NAME is the user.NAME attribute")
@_cluster_options
@_json_option
def find_cmd(paths: tuple[str, ...], label_texts: tuple[str, ...], cluster: ClusterOptions, as_json: bool) -> None:
    """the regular files under each directory PATH whose labels are all the --label ones,
    their own or a directory's above them (`setfattr -n user.split -v train DIR`), answered
    from the metaserver's label index without walking the tree; printed as they arrive"""
    from stripefs.cli_work import Place
    from stripefs.client import paths as cpaths
    from stripefs.proto.errors import FsError

    labels = _label_option(label_texts)
    places: list[Place] = _places(cluster, paths, bare_is_cluster=True)
    failures: list[tuple[Any, Any]] = []
    found = 0
    if as_json:
        click.echo("[")

    async def work(clients) -> None:
        nonlocal found
        for place in places:
            client = await clients.get(place.meta)
            base = len(cpaths.normalize(place.path).rstrip("/")) + 1
            try:
                async for path, ino, size in cpaths.find(client, place.path, labels):
                    shown = place.child(path[base:]).arg
                    if as_json:
                        doc = {"path": shown, "cluster_path": path, "ino": ino, "size": size}
                        click.echo(("," if found else "") + json.dumps(doc))
                    else:
                        click.echo(shown)
                    found += 1
            except FsError as exc:
                failures.append((place, exc))

    _with_clients(cluster, work)
    if as_json:
        click.echo("]")
    sys.exit(_report_failures("find", failures))


@cli.command("cp")
@click.argument("sources", nargs=-1, required=True)
@click.argument("dst")
@click.option("-r", "--recursive", is_flag=True, help="copy directories and what is under them")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=8, show_default=True, help="files copied at once")
@_cluster_options
@_json_option
def cp_cmd(sources: tuple[str, ...], dst: str, recursive: bool, jobs: int, cluster: ClusterOptions, as_json: bool) -> None:
    """copy files into, out of and within clusters through the client library (no mount
    needed). DST an existing directory: into it. Exit 1 if any file failed."""
    from stripefs.cli_work import copy
    from stripefs.proto.errors import FsError

    places = _places(cluster, sources + (dst,), bare_is_cluster=False)
    writes = not places[-1].local
    if writes:
        creds = _resolve_credentials(cluster, writes)
        if _load_credentials(creds).role == "admin":
            raise CliError(f"{creds} is an admin credential, and data servers take file data only from clients: "
                           f"give a client credential with --credentials DIR or ${CREDENTIALS_ENV} "
                           "(scripts/up makes STATE/credentials/mount)")
    progress, task, on_error = _transfer_progress("cp", "planning", as_json)

    def on_plan(files: int, size: int) -> None:
        progress.update(task, description=f"{files} files", total=size)

    async def work(clients):
        try:
            return await copy(clients, places[:-1], places[-1], recursive=recursive, jobs=jobs, on_plan=on_plan,
                              on_bytes=lambda n: progress.advance(task, n), on_error=on_error)
        except FsError as exc:
            if exc.errno == errno.EIO:  # the cluster cannot be reached: told with a hint
                raise
            raise CliError(exc.message) from None

    with progress:
        report = _with_clients(cluster, work, writes)
    if as_json:
        _print_json(report.to_json())
    else:
        click.echo(_transfer_summary("copied", report))
    sys.exit(1 if report.failed else 0)


def _transfer_progress(command: str, first: str, as_json: bool):
    """A progress bar of bytes on stderr (off for --json or when stderr is no terminal),
    its task, and how an error line is printed beside it."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    err = _console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err, transient=True,
                        disable=as_json or not err.is_terminal)

    def on_error(text: str) -> None:
        # One line an error, however long (soft_wrap): rich wraps at the console's width,
        # 80 columns where stderr is a pipe, which split a failed path's line in two for
        # whatever reads it (grep, a log).
        progress.console.print(f"stripefs {command}: {text}", style="red" if err.is_terminal else None,
                               soft_wrap=True)

    return progress, progress.add_task(first, total=None), on_error


def _transfer_summary(verb: str, report: Any) -> str:
    """`copied N files, SIZE (N bytes) in S s, R MB/s; K failed` of a copy or a warmup."""
    rate = report.bytes / report.seconds / 1e6 if report.seconds > 0 else 0.0
    return (f"{verb} {report.files} files, {_human(report.bytes)} ({report.bytes} bytes) in "
            f"{report.seconds:.2f} s, {rate:.1f} MB/s" + (f"; {len(report.failed)} failed" if report.failed else ""))


# ---------------------------------------------------------------------------- warmup


@cli.command("warmup")
@click.argument("paths", nargs=-1, required=True)
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=8, show_default=True, help="files read at once")
@_json_option
def warmup_cmd(paths: tuple[str, ...], jobs: int, as_json: bool) -> None:
    """read the files under PATHS (inside stripefs mounts) through their mount ahead of a
    job, so that the mount's local disk tier (mount --cache-dir) holds them. Exit 1 if
    any file failed."""
    from stripefs.cli_work import warmup

    progress, task, on_error = _transfer_progress("warmup", "listing", as_json)
    with progress:
        try:
            report = warmup(list(paths), jobs, on_plan=lambda f, b: progress.update(task, description=f"{f} files",
                                                                                      total=b),
                            on_bytes=lambda n: progress.advance(task, n), on_error=on_error)
        except ValueError as exc:
            raise CliError(f"{exc}: warmup fills a mount's caches, so it reads through the mount") from None
    if as_json:
        _print_json(report.to_json())
    else:
        click.echo(_transfer_summary("read", report))
        for point, tier in report.tiers.items():
            if tier.get("enabled"):
                click.echo(f"{point}: disk tier holds {_human(tier['kept_bytes'])} in {tier['blocks']} blocks "
                           f"(of {_human(tier['limit_bytes'])})")
            else:
                click.echo(f"{point}: no disk tier (mount --cache-dir): only its memory cache was filled")
    sys.exit(1 if report.failed else 0)


# ---------------------------------------------------------------------------- checkpoint


@cli.group("checkpoint")
def checkpoint_group() -> None:
    """checkpoint directories of a mount (setfattr -n stripefs.checkpoint -v async DIR)"""


def _checkpoint_status(directory: str) -> dict:
    """A checkpoint directory's state, as its mount reads it (stripefs.checkpoint.status)."""
    from stripefs.client.staging import STATUS_XATTR

    try:
        return json.loads(os.getxattr(directory, STATUS_XATTR.decode()))
    except OSError as exc:
        hint = " (not a checkpoint directory of a stripefs mount?)" if exc.errno in (errno.EINVAL, errno.ENODATA,
                                                                                     errno.EOPNOTSUPP) else ""
        raise CliError(f"{directory}: {os.strerror(exc.errno or errno.EIO)}{hint}") from None


def _checkpoint_wait(directory: str, committed: bool, timeout: Optional[float]) -> dict:
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.05
    while True:
        status = _checkpoint_status(directory)
        if status["committed"] if committed else not status["pending_files"]:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            raise CliError(f"{directory}: still {status['pending_files']} files "
                           f"({_human(status['pending_bytes'])}) pending after {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _checkpoint_print(directory: str, status: dict, as_json: bool) -> None:
    if as_json:
        _print_json(status)
        return
    state = "committed" if status["committed"] else "commit asked" if status["commit_asked"] else "open"
    click.echo(f"{directory}: {state}; {status['files']} files, {_human(status['bytes'])}; "
               f"{status['pending_files']} files ({_human(status['pending_bytes'])}) not yet uploaded")


@checkpoint_group.command("status")
@click.argument("directory")
@_json_option
def checkpoint_status_cmd(directory: str, as_json: bool) -> None:
    """how far a checkpoint directory's upload has got, and whether it is committed"""
    status = _checkpoint_status(directory)
    _checkpoint_print(directory, status, as_json)


@checkpoint_group.command("wait")
@click.argument("directory")
@click.option("--committed", is_flag=True, help="wait for the success marker, not only for durability")
@click.option("--timeout", type=float, metavar="S", help="give up (exit 1) after S seconds")
@_json_option
def checkpoint_wait_cmd(directory: str, committed: bool, timeout: Optional[float], as_json: bool) -> None:
    """return when everything written under DIRECTORY is durable on its data servers"""
    status = _checkpoint_wait(directory, committed, timeout)
    _checkpoint_print(directory, status, as_json)


@checkpoint_group.command("commit")
@click.argument("directory")
@click.option("--wait", "wait", is_flag=True, help="return once the marker is written")
@click.option("--timeout", type=float, metavar="S", help="with --wait: give up (exit 1) after S seconds")
@_json_option
def checkpoint_commit_cmd(directory: str, wait: bool, timeout: Optional[float], as_json: bool) -> None:
    """write DIRECTORY's success marker (_COMMITTED) once all under it is durable"""
    from stripefs.client.staging import COMMIT_XATTR

    try:
        os.setxattr(directory, COMMIT_XATTR.decode(), b"1")
    except OSError as exc:
        raise CliError(f"{directory}: {os.strerror(exc.errno or errno.EIO)}") from None
    status = _checkpoint_wait(directory, True, timeout) if wait else _checkpoint_status(directory)
    _checkpoint_print(directory, status, as_json)


# ---------------------------------------------------------------------------- top


@cli.command("top")
@click.option("--metrics", "addresses", multiple=True, required=True, metavar="HOST:PORT",
              help="a role's --metrics-listen address (repeat for several roles)")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True, help="seconds between scrapes")
@click.option("--once", is_flag=True, help="two scrapes --interval apart, one table (or JSON object), then exit")
@_json_option
def top_cmd(addresses: tuple[str, ...], interval: float, once: bool, as_json: bool) -> None:
    """live operation rates of running roles from their Prometheus metrics: per RPC method,
    FUSE operation and client metadata call (ops/s, errors/s, mean latency), bytes/s read
    and written, block cache hit ratio. Ctrl-C ends it."""
    from stripefs.cli_work import rates, scrape

    def scrape_all() -> tuple[float, dict[str, Any]]:
        out: dict[str, Any] = {}
        for address in addresses:
            try:
                out[address] = scrape(address)
            except (OSError, ValueError) as exc:
                out[address] = exc
        return time.monotonic(), out

    def snapshot(before: tuple[float, dict], after: tuple[float, dict]) -> dict[str, Any]:
        seconds = after[0] - before[0]
        sources = []
        for address in addresses:
            a, b = before[1][address], after[1][address]
            if isinstance(a, Exception) or isinstance(b, Exception):
                bad = b if isinstance(b, Exception) else a
                sources.append({"address": address, "error": str(bad)})
            else:
                sources.append({"address": address, **rates(a, b, seconds)})
        return {"interval_s": round(seconds, 3), "sources": sources}

    def unreachable(doc: dict[str, Any]) -> bool:
        return all("error" in s for s in doc["sources"])

    previous = scrape_all()
    if once or as_json:
        time.sleep(interval)
        doc = snapshot(previous, scrape_all())
        if as_json:
            _print_json(doc)
        else:
            _console().print(_top_table(doc))
        if unreachable(doc):
            raise CliError(f"no metrics from {', '.join(addresses)}: is each role started with --metrics-listen "
                           "HOST:PORT, and is that the address given?")
        sys.exit(0)
    from rich.live import Live

    with Live(_top_table(None), console=_console(), auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                current = scrape_all()
                live.update(_top_table(snapshot(previous, current)), refresh=True)
                previous = current
        except KeyboardInterrupt:
            pass


def _top_table(doc: Optional[dict[str, Any]]):
    from rich.console import Group

    ops = _table("source", "kind", "name", "ops/s", "errors/s", "mean ms", right=("ops/s", "errors/s", "mean ms"),
                 title="operations" + (f" (last {doc['interval_s']:.1f} s)" if doc else " (first interval under way)"))
    io = _table("source", "read/s", "written/s", "cache hits", right=("read/s", "written/s", "cache hits"))
    for s in (doc or {}).get("sources", []):
        if "error" in s:
            io.add_row(s["address"], _styled(f"unreachable: {s['error']}", "red"), "", "")
            continue
        for row in s["ops"]:
            ops.add_row(s["address"], row["kind"], row["name"], f"{row['ops_per_s']:.1f}",
                        _styled(f"{row['errors_per_s']:.1f}", "red") if row["errors_per_s"] else "0",
                        "" if row["mean_ms"] is None else f"{row['mean_ms']:.2f}")
        ratio = s["cache_hit_ratio"]
        io.add_row(s["address"], f"{_human(s['read_bytes_per_s'])}/s", f"{_human(s['written_bytes_per_s'])}/s",
                   "" if ratio is None else f"{ratio * 100:.1f}%")
    return Group(ops, io)


# ---------------------------------------------------------------------------- entry point


def main(argv: Optional[list[str]] = None) -> int:
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    # Server roles parse their own options: everything after the role, untouched.
    if argv and argv[0] == "meta":
        return cmd_role("stripefs.metaserver.server", argv[1:])
    if argv and argv[0] == "data":
        return cmd_role("stripefs.dataserver.server", argv[1:])
    code = 0
    try:
        cli.main(args=argv, prog_name="stripefs")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            click.echo(exc.code, err=True)
            code = 1
    if as_program and argv and argv[0] != "mount":
        _end(code)
    return code


def _end(code: int) -> None:
    """End a command's process with `code` without Python's interpreter teardown. Its work
    is done by then (every client session closed, every call answered) and what is left
    is our own output, flushed here. Commands that had printed everything were seen not to
    exit (`stripefs info`, `du` and `find`, three times in six runs of the test suite),
    and a script waiting on one would wait for ever; a normal exit has only the main
    thread left by then, so the wait is most likely in gRPC's C teardown (not shown: it
    never happened outside CI). (`mount` ends through its own shutdown: fs/fuse/mount.py.)"""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # (a closed pipe: nothing more to say)
        code = code or 1
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
