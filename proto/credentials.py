"""Who is calling: per-role X.509 credentials issued by the cluster's own CA, and mutual TLS.

Every process of a cluster holds a credential bundle, a directory with `ca.crt` (the
cluster CA), `cert.pem` and `key.pem` (0600). The certificate's common name is
`<role>:<name>`: the role is one of ROLES, the name identifies the holder (a data server's
name is bound to its data directory at its first registration, see metaserver/registry.py;
a session belongs to the name that opened it). Servers (metaserver, data servers) also
carry a DNS name of their role (SERVER_NAMES) that clients check, so only a credential
the CA issued for that role can answer as a metaserver or a data server.

Every channel is TLS with client certificates required: a peer without a certificate of
the cluster's CA does not get past the handshake, so it can neither send a request nor
read one off the wire, and the server learns the caller's role and name from the
certificate, never from the request. proto/services.py says which roles may call each
method; proto/rpc.py checks it on every call.

A client credential can carry a squash rule (NFS's root_squash and all_squash), in its
subject's OU as `squash:root` or `squash:UID:GID`: the metaserver maps the uid and groups
every request states (the requests' Ctx) through it before it checks access
(metaserver/perm.py), so a host holding such a credential cannot act as root, or as
anyone but UID:GID. Without one, a client is trusted to state its callers' ids, as an
NFS client with AUTH_SYS is; see docs/security.md.

`stripefs ca init DIR` makes a CA; `stripefs credential new --ca DIR --role ROLE --name NAME
[--squash root|UID:GID] --out BUNDLE` issues a bundle; `stripefs credential revoke --ca DIR NAME` lists a name in
the CA's `revoked` file, which servers given `--revoked FILE` refuse (re-read when it
changes). Keys are ECDSA P-256.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import FsError

#: The roles a credential can have.
META, DATA, CLIENT, ADMIN = "meta", "data", "client", "admin"
ROLES = (META, DATA, CLIENT, ADMIN)
#: The DNS name a server's certificate carries for its role, and clients expect.
SERVER_NAMES = {META: "stripefs-meta", DATA: "stripefs-data"}
#: Files of a bundle and of a CA directory.
CA_CERT, CERT, KEY = "ca.crt", "cert.pem", "key.pem"
CA_KEY, REVOKED = "ca.key", "revoked"
#: Lifetimes of what `stripefs` issues.
CA_VALID_DAYS = 3650
CREDENTIAL_VALID_DAYS = 825
#: Names: printable, no separator of the common name.
NAME_MAX = 128
#: Who a squashed root becomes: nobody / nogroup.
SQUASH_ID = 65534
#: The squash rule in a certificate subject's OU: "squash:root" or "squash:UID:GID".
_SQUASH_OU = re.compile(r"(?:^|,)OU=squash:(root|\d{1,10}:\d{1,10})(?:,|$)")


def parse_squash(rule: str) -> str:
    """A checked squash rule ("", "root" or "UID:GID"); ValueError when malformed."""
    if rule in ("", "root"):
        return rule
    uid, sep, gid = rule.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit() and int(uid) < 1 << 32 and int(gid) < 1 << 32):
        raise ValueError(f"squash rule {rule!r}: expected root or UID:GID")
    return f"{int(uid)}:{int(gid)}"


@dataclass(frozen=True)
class Caller:
    """The authenticated peer of a call, and the squash rule its certificate carries."""

    role: str
    name: str
    squash: str = ""  # "" (ids as stated), "root" (uid/gid 0 -> SQUASH_ID), "UID:GID" (everyone)

    def __str__(self) -> str:
        return f"{self.role}:{self.name}"

    def identity(self, ctx: Any) -> Any:
        """The ids a request's Ctx may speak for under this caller's squash rule."""
        if not self.squash:
            return ctx
        if self.squash == "root":
            if ctx.uid != 0 and ctx.gid != 0 and 0 not in ctx.groups:
                return ctx
            return dataclasses.replace(
                ctx, uid=SQUASH_ID if ctx.uid == 0 else ctx.uid, gid=SQUASH_ID if ctx.gid == 0 else ctx.gid,
                groups=[g for g in ctx.groups if g != 0],
            )
        uid, gid = (int(x) for x in self.squash.split(":"))
        return dataclasses.replace(ctx, uid=uid, gid=gid, groups=[])


#: The caller of in-process calls (tests, tools that open the store themselves).
LOCAL = Caller(ADMIN, "local")


@dataclass(frozen=True)
class Credentials:
    """One process's credential bundle."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    role: str
    name: str
    directory: str = ""

    @property
    def caller(self) -> Caller:
        return Caller(self.role, self.name)


def parse_common_name(cn: str) -> Optional[Caller]:
    role, sep, name = cn.partition(":")
    if not sep or role not in ROLES or not valid_name(name):
        return None
    return Caller(role, name)


def valid_name(name: str) -> bool:
    return 0 < len(name) <= NAME_MAX and name.isprintable() and ":" not in name and "/" not in name


def load_credentials(directory: str | os.PathLike) -> Credentials:
    """Read a bundle; FsError(EACCES) with a clear message when it is missing or not ours."""
    from cryptography import x509

    d = Path(directory)
    try:
        ca, cert, key = ((d / f).read_bytes() for f in (CA_CERT, CERT, KEY))
    except FileNotFoundError as exc:
        raise FsError(errno.EACCES, f"no credential bundle in {d}: {exc.filename} is missing "
                                    "(make one with `stripefs credential new`)") from None
    who = parse_common_name(_cn_of(cert))
    if who is None:
        subject = x509.load_pem_x509_certificate(cert).subject.rfc4514_string()
        raise FsError(errno.EACCES, f"{d / CERT}: not a stripefs credential ({subject})")
    return Credentials(ca, cert, key, who.role, who.name, str(d))


def _cn_of(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    attrs = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


# ---------------------------------------------------------------------------- gRPC glue


def channel_credentials(creds: Credentials) -> Any:
    import grpc

    return grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)


def channel_options(server_role: str) -> list[tuple[str, str]]:
    """Check the server's certificate against the name of its role, not its address:
    addresses change (ports, hosts, namespaces); the CA vouches for roles."""
    return [("grpc.ssl_target_name_override", SERVER_NAMES[server_role])]


def server_credentials(creds: Credentials) -> Any:
    import grpc

    return grpc.ssl_server_credentials(
        [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem, require_client_auth=True
    )


def caller_of(context: Any) -> Optional[Caller]:
    """The peer of a gRPC call, from the certificate it presented in the TLS handshake."""
    auth = context.auth_context()
    names = [n.decode(errors="replace") for n in auth.get("x509_common_name") or []]
    subjects = [s.decode(errors="replace") for s in auth.get("x509_subject") or []]
    return _caller(names, subjects)


def caller_of_certificate(der: bytes) -> Optional[Caller]:
    """The peer of a framed connection (proto/frames.py), from its certificate (DER), by the
    same rules as caller_of."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        subject = x509.load_der_x509_certificate(der).subject
    except ValueError:
        return None
    names = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return _caller(names, [subject.rfc4514_string()])


def _caller(common_names: list[str], subjects: list[str]) -> Optional[Caller]:
    caller = parse_common_name(common_names[0]) if len(common_names) == 1 else None
    if caller is None or caller.role != CLIENT:
        return caller
    found = _SQUASH_OU.search(subjects[0]) if len(subjects) == 1 else None
    return dataclasses.replace(caller, squash=found.group(1)) if found else caller


class Revocations:
    """Names refused although their certificate is valid; the file is re-read when it changes."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self._stamp: Optional[tuple[int, int]] = None
        self._names: frozenset[str] = frozenset()

    def revoked(self, caller: Caller) -> bool:
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                with open(self.path) as f:
                    self._names = frozenset(line.strip() for line in f if line.strip())
                self._stamp = stamp
        except FileNotFoundError:
            self._names, self._stamp = frozenset(), None
        return str(caller) in self._names or caller.name in self._names


# ---------------------------------------------------------------------------- issuing


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: str | os.PathLike, data: bytes) -> None:
    """`data` into a file readable by its owner only (a key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def init_ca(directory: str | os.PathLike, name: str = "stripefs cluster CA") -> Path:
    """Make a CA in `directory` (0700) unless one is there; returns the directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    if (d / CA_CERT).exists() and (d / CA_KEY).exists():
        return d
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(d / CA_KEY, _pem_key(key))
    (d / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d


def issue(ca_dir: str | os.PathLike, role: str, name: str, out: str | os.PathLike,
          valid_days: int = CREDENTIAL_VALID_DAYS, squash: str = "") -> Path:
    """Issue a credential bundle for `role:name` into `out` (0700, key 0600); a client's
    may carry a squash rule ("root" or "UID:GID", see Caller.identity)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not valid_name(name):
        raise ValueError(f"name must be 1..{NAME_MAX} printable characters without ':' or '/'")
    squash = parse_squash(squash)
    if squash and role != CLIENT:
        raise ValueError("only client credentials carry a squash rule")
    ca_dir = Path(ca_dir)
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    ca_pem = (ca_dir / CA_CERT).read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    key = _new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"{role}:{name}")]
            + ([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"squash:{squash}")] if squash else [])
        ))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if role in SERVER_NAMES:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(SERVER_NAMES[role])]), critical=False
        )
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir / CA_KEY} is not the EC key `stripefs ca init` makes")
    cert = builder.sign(ca_key, hashes.SHA256())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    (out / CA_CERT).write_bytes(ca_pem)
    (out / CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(out / KEY, _pem_key(key))
    return out


def revoke(ca_dir: str | os.PathLike, name: str) -> Path:
    """Add `name` (or `role:name`) to the CA's revocation list; returns the list's path."""
    path = Path(ca_dir) / REVOKED
    with open(path, "a") as f:
        f.write(name.strip() + "\n")
    return path


