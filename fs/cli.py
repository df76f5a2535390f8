"""The `stripefs` command: one subcommand per role and per operator task.

  stripefs meta   --listen HOST:PORT --dir DIR            the metadata server
  stripefs data   --listen HOST:PORT --meta METAS --dir DIR   a data server
  stripefs mount  METAS MOUNTPOINT                         mount (returns when ready)
  stripefs umount MOUNTPOINT
  stripefs status [--json]                                 metaservers, data servers, replication health
  stripefs fsck   [--repair] [--json]                      check (and repair) the metadata
  stripefs ca init DIR                                     make the cluster's CA
  stripefs credential new --ca DIR --role ROLE --name NAME [--squash root|UID:GID] --out DIR
                                                           issue a credential
  stripefs credential revoke --ca DIR NAME                 refuse a credential from now on

METAS is the metaservers' HOST:PORT, or several of them: HOST:PORT,HOST:PORT,... (every
metaserver of a cluster serves every caller; a caller talks to one and moves to the next
when it fails). STATE/meta.addr holds the same, on one line.

The server roles are imported only when their subcommand runs: this module is the
composition root, the one place that knows every role.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from proto.types import CREDENTIALS_ENV, META_ENV

DEFAULT_STATE_DIR = ".stripefs"
MOUNT_READY_TIMEOUT_S = 30.0


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state or os.environ.get("STRIPEFS_STATE", DEFAULT_STATE_DIR))


#: Where scripts/up keeps a local cluster's CA and credential bundles, under the state dir.
CREDENTIALS_SUBDIR = "credentials"


def _resolve_meta_and_credentials(args: argparse.Namespace) -> tuple[list[str], str]:
    """--meta/--credentials if given, else $STRIPEFS_META/$STRIPEFS_CREDENTIALS, else the
    local cluster's addresses and admin bundle under the state dir."""
    state = _state_dir(args)
    meta = args.meta or os.environ.get(META_ENV)
    if meta is None:
        addr_file = state / "meta.addr"
        if not addr_file.exists():
            sys.exit(f"stripefs: no --meta given and no {addr_file} (is the cluster up?)")
        meta = addr_file.read_text().strip()
    creds = args.credentials or os.environ.get(CREDENTIALS_ENV) or str(state / CREDENTIALS_SUBDIR / "admin")
    return _meta_addresses(meta), creds


def _meta_addresses(value: str) -> list[str]:
    from proto.rpc import parse_addresses

    try:
        return parse_addresses(value)
    except ValueError as exc:
        sys.exit(f"stripefs: metaservers: {exc}")


def _load_credentials(path: str, cmd: str):
    from proto.credentials import load_credentials
    from proto.errors import FsError

    try:
        return load_credentials(path)
    except FsError as exc:
        sys.exit(f"stripefs {cmd}: {exc.message}")


def cmd_role(module: str, argv: list[str]) -> int:
    return importlib.import_module(module).main(argv)


def cmd_mount(args: argparse.Namespace) -> int:
    from proto.logsetup import setup_logging

    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        sys.exit(f"stripefs mount: {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        sys.exit(f"stripefs mount: {mountpoint} is already a mount point")
    _meta_addresses(args.meta)
    creds = _load_credentials(args.credentials, "mount")
    if not args.foreground:
        return _mount_in_background(args, mountpoint)
    setup_logging(args.log_file, args.log_level)
    if args.pid_file:
        _write_atomic(args.pid_file, f"{os.getpid()}\n")
    from fs.fuse.mount import run_mount
    from proto import metrics

    try:
        metrics.start(args)
    except (OSError, ValueError) as exc:
        sys.exit(f"stripefs mount: metrics on {args.metrics_listen}: {exc}")

    options = [o for o in (args.options or "").split(",") if o]
    run_mount(
        args.meta, mountpoint, creds, options,
        writeback_bytes=args.writeback_mib * 1024 * 1024,
        cache_bytes=args.cache_mib * 1024 * 1024,
    )
    return 0


def _mount_in_background(args: argparse.Namespace, mountpoint: str) -> int:
    argv = [sys.executable, "-m", "fs.cli", "mount", "--foreground", args.meta, mountpoint,
            "--writeback-mib", str(args.writeback_mib), "--cache-mib", str(args.cache_mib),
            "--log-level", args.log_level]
    for flag, value in (("--credentials", args.credentials), ("--log-file", args.log_file),
                        ("--pid-file", args.pid_file), ("--metrics-ready-file", args.metrics_ready_file),
                        ("-o", args.options), ("--metrics-listen", args.metrics_listen)):
        if value:
            argv += [flag, os.path.abspath(value) if flag not in ("-o", "--metrics-listen") else value]
    log_target = open(args.log_file, "ab") if args.log_file else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_target, stderr=log_target,
                            start_new_session=True)
    deadline = time.monotonic() + MOUNT_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            return 0
        if proc.poll() is not None:
            sys.exit(f"stripefs mount: the mount process exited with {proc.returncode}"
                     + (f"; see {args.log_file}" if args.log_file else ""))
        time.sleep(0.05)
    proc.terminate()
    sys.exit(f"stripefs mount: {mountpoint} not mounted after {MOUNT_READY_TIMEOUT_S:.0f} s")


def cmd_ca_init(args: argparse.Namespace) -> int:
    from proto.credentials import init_ca

    print(init_ca(args.dir))
    return 0


def cmd_credential_new(args: argparse.Namespace) -> int:
    from proto.credentials import issue

    try:
        print(issue(args.ca, args.role, args.name, args.out, squash=args.squash))
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"stripefs credential new: {exc}")
    return 0


def cmd_credential_revoke(args: argparse.Namespace) -> int:
    from proto.credentials import revoke

    print(revoke(args.ca, args.name))
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if subprocess.run(["fusermount3", "-u", mountpoint]).returncode == 0:
        return 0
    print(f"stripefs umount: {mountpoint} busy, detaching lazily", file=sys.stderr)
    return subprocess.run(["fusermount3", "-u", "-z", mountpoint]).returncode


def _meta_call(args: argparse.Namespace, cmd: str, name: str, req, timeout: float):
    """One call to a metaserver named by args (the first that can be reached): the address
    that answered and the reply; exits with a message if it fails."""
    from proto.errors import FsError
    from proto.rpc import FailoverStub
    from proto.services import META_METHODS, META_SERVICE

    metas, creds = _resolve_meta_and_credentials(args)
    stub = FailoverStub(metas, _load_credentials(creds, cmd), META_SERVICE, META_METHODS)
    try:
        reply = stub.call(name, req, timeout=timeout)
    except FsError as exc:
        sys.exit(f"stripefs {cmd}: {','.join(metas)}: {exc}")
    finally:
        stub.close()
    return stub.address, reply


#: How long `stripefs status` waits for each metaserver's answer.
STATUS_TIMEOUT_S = 10.0


def _status_of_each(metas: list[str], creds) -> list[tuple[str, Any]]:
    """(address, StatusReply or the FsError it failed with) for each metaserver, in order."""
    from proto.errors import FsError, TransportError
    from proto.messages import Empty
    from proto.rpc import HUNG_AFTER_S, ChannelWatch, Stub
    from proto.services import META_METHODS, META_SERVICE

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


def cmd_status(args: argparse.Namespace) -> int:
    """Every metaserver of the list, reachable or not; the cluster as the first that
    answered sees it. Exits with a message if none answered."""
    from proto.errors import FsError

    metas, creds = _resolve_meta_and_credentials(args)
    each = _status_of_each(metas, _load_credentials(creds, "status"))
    answered = [(address, st) for address, st in each if not isinstance(st, FsError)]
    if not answered:
        sys.exit("stripefs status: " + "; ".join(f"{address}: {exc}" for address, exc in each))
    meta, st = answered[0]
    if args.json:
        out = st.to_wire()
        out["meta"] = meta
        out["addresses"] = [
            {"address": address, "reachable": False, "error": str(r)} if isinstance(r, FsError) else
            {"address": address, "reachable": True, "metaserver": r.metaserver,
             "duties": bool(r.metaserver) and r.metaserver == r.duties}
            for address, r in each
        ]
        print(json.dumps(out, indent=2))
        return 0
    for address, r in each:
        if isinstance(r, FsError):
            print(f"metaserver {address} unreachable: {r}")
        else:
            name = f" ({r.metaserver})" if r.metaserver else ""
            duties = ", holds the background duties" if r.metaserver and r.metaserver == r.duties else ""
            print(f"metaserver {address} up{name}{duties}")
    if st.engine:
        print(f"store: {st.engine}")
    if st.metaservers:
        duties = st.duties_address or st.duties
        print(f"metaservers on the store: {', '.join(st.metaservers)}"
              + (f"; background duties: {duties}" if duties else ""))
    print(f"{'id':>3} {'address':<22} {'state':<7} {'used':>10} {'free':>10} {'capacity':>10} {'blocks':>8} {'beat':>6}")
    for s in st.servers:
        print(f"{s.server_id:>3} {s.address:<22} {s.state:<7} {_human(s.used_bytes):>10} "
              f"{_human(s.free_bytes):>10} {_human(s.capacity_bytes):>10} {s.blocks:>8} {s.last_heartbeat_s:>5.1f}s")
    print(f"namespace: {st.inodes} inodes, {st.files} files, {st.directories} directories, "
          f"{_human(st.bytes)} in files, {st.blocks} blocks, {st.sessions} client sessions, {st.locks} locks held")
    print(f"replication: {st.under_replicated} blocks under-replicated, {st.lost} lost")
    return 0


#: fsck reads the whole store in one transaction: give a large one time.
FSCK_TIMEOUT_S = 600.0


def cmd_fsck(args: argparse.Namespace) -> int:
    """Exit 0 when clean (or everything found was repaired), 1 otherwise."""
    from proto.messages import FsckReq

    meta, rep = _meta_call(args, "fsck", "fsck", FsckReq(repair=args.repair), timeout=FSCK_TIMEOUT_S)
    unrepaired = len(rep.problems) - len(rep.repaired)
    if args.json:
        out = rep.to_wire()
        out["meta"] = meta
        out["clean"] = not rep.problems
        out["unrepaired"] = unrepaired
        print(json.dumps(out, indent=2))
    else:
        print(f"metaserver {meta}: {rep.inodes} inodes, {rep.blocks} blocks checked; "
              f"{rep.under_replicated} under-replicated, {rep.lost} lost")
        for line in rep.problems:
            print(f"problem: {line}")
        for line in rep.repaired:
            print(f"repaired: {line}")
        if not rep.problems:
            print("clean")
        elif args.repair:
            print(f"{len(rep.problems)} problems, {len(rep.repaired)} repaired")
        else:
            print(f"{len(rep.problems)} problems (run with --repair to fix what can be fixed)")
    return 0 if unrepaired <= 0 and (args.repair or not rep.problems) else 1


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Server roles parse their own options.
    if argv and argv[0] == "meta":
        return cmd_role("metaserver.server", argv[1:])
    if argv and argv[0] == "data":
        return cmd_role("dataserver.server", argv[1:])

    parser = argparse.ArgumentParser(prog="stripefs", description="stripefs: a distributed file system for AI training")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("meta", help="run the metadata server (see: stripefs meta --help)")
    sub.add_parser("data", help="run a data server (see: stripefs data --help)")

    from fs.client.client import DEFAULT_CACHE_BYTES, DEFAULT_WRITEBACK_BYTES
    from proto import metrics

    p = sub.add_parser("mount", help="mount a cluster")
    p.add_argument("meta", help="metaserver HOST:PORT, or several: HOST:PORT,HOST:PORT,...")
    p.add_argument("mountpoint")
    p.add_argument("--credentials", default=os.environ.get(CREDENTIALS_ENV),
                   required=CREDENTIALS_ENV not in os.environ,
                   help=f"client credential bundle (stripefs credential new --role client; default ${CREDENTIALS_ENV})")
    p.add_argument("--foreground", action="store_true", help="run in the foreground until unmounted")
    p.add_argument("--log-file")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--pid-file")
    p.add_argument("-o", dest="options", help="extra FUSE mount options, comma separated")
    p.add_argument("--writeback-mib", type=int, default=DEFAULT_WRITEBACK_BYTES >> 20,
                   help="memory for unflushed writes (MiB)")
    p.add_argument("--cache-mib", type=int, default=DEFAULT_CACHE_BYTES >> 20, help="memory for cached blocks (MiB)")
    metrics.add_arguments(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("ca", help="the cluster's certificate authority")
    ca_sub = p.add_subparsers(dest="ca_cmd", required=True)
    q = ca_sub.add_parser("init", help="make a CA in DIR (ca.crt, ca.key 0600) unless one is there")
    q.add_argument("dir")
    q.set_defaults(func=cmd_ca_init)

    p = sub.add_parser("credential", help="issue or revoke a credential of the cluster's CA")
    cred_sub = p.add_subparsers(dest="cred_cmd", required=True)
    q = cred_sub.add_parser("new", help="issue a credential bundle (ca.crt, cert.pem, key.pem) into --out")
    q.add_argument("--ca", required=True, help="the CA directory (stripefs ca init)")
    q.add_argument("--role", required=True, choices=["meta", "data", "client", "admin"])
    q.add_argument("--name", required=True, help="who holds it: a host, a user, a data directory")
    q.add_argument("--out", required=True, help="directory to write the bundle to (0700)")
    q.add_argument("--squash", default="", metavar="root|UID:GID",
                   help="client only: act as nobody (65534) where callers say root, or always as UID:GID")
    q.set_defaults(func=cmd_credential_new)
    q = cred_sub.add_parser("revoke", help="list NAME in the CA's revocation file (servers given --revoked refuse it)")
    q.add_argument("--ca", required=True)
    q.add_argument("name", help="NAME or ROLE:NAME")
    q.set_defaults(func=cmd_credential_revoke)

    p = sub.add_parser("umount", help="unmount")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("status", help="metaservers, data servers, their states and replication health")
    p.add_argument("--meta", help="metaserver HOST:PORT[,HOST:PORT...] (default: STATE/meta.addr)")
    p.add_argument("--credentials", help=f"credential bundle (default ${CREDENTIALS_ENV}, else STATE/credentials/admin)")
    p.add_argument("--state", help=f"local cluster state directory (default: ./{DEFAULT_STATE_DIR})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("fsck", help="check the metadata (read-only unless --repair); exit 1 if not clean")
    p.add_argument("--meta", help="metaserver HOST:PORT[,HOST:PORT...] (default: STATE/meta.addr)")
    p.add_argument("--credentials", help=f"credential bundle (default ${CREDENTIALS_ENV}, else STATE/credentials/admin)")
    p.add_argument("--state", help=f"local cluster state directory (default: ./{DEFAULT_STATE_DIR})")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fsck)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
