"""Block tokens: what lets a data server store or serve a block, as the metaserver decided.

A token is HMAC-SHA256(token key, "<operation>:<block id>:<holder>:<expiry>") with the
expiry in front: it lets one credential (role:name, from its TLS certificate) do one thing
(read or write) to one block until a time, as HDFS's block access tokens. A data server
serves a block only with a read token for it and for the credential asking, and stores one
only with a write token for it, for the client that wrote it and for itself: a write token
names one data server too (its address), so a block forwarded down a write chain
(dataserver/chain.py) carries one token per server of the chain, and a token made out to
one server is no good at another. Another client's token, an old one, or one for the
other operation is refused. Block ids are never reused (a block is immutable, its id is
its version), so a token cannot be replayed against other data. The token key is made by the metaserver on its first
start (`token.key` in its state directory, 0600) and handed to data servers when they
register, over mutual TLS, to data-server credentials only (proto/credentials.py): clients
never hold it, so a client cannot make a token for a block it was not allocated.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from pathlib import Path

#: Bytes of a token key.
TOKEN_KEY_BYTES = 32
#: How long a token is good for at most (a write token: as long as its allocation, the
#: metaserver's pending timeout, if shorter). A reader holding an older one gets EACCES and
#: asks the metaserver for the block map again (fs/client/reader.py); a writer's block is
#: refused and allocated again (fs/client/writer.py).
TOKEN_TTL_S = 3600
#: Clock difference between the metaserver and a data server that is forgiven.
CLOCK_SKEW_S = 300
_EXPIRY = struct.Struct(">Q")


def _token(op: bytes, key: bytes, block_id: int, holder: str, expires_s: int) -> bytes:
    # (hmac.digest: OpenSSL's one-shot HMAC, 1.7 us against hmac.new's 2.8; one for each
    # block of each map the metaserver hands out, and for each block a data server serves)
    mac = hmac.digest(key, b"%s:%d:%s:%d" % (op, block_id, holder.encode(), expires_s), hashlib.sha256)
    return _EXPIRY.pack(expires_s) + mac


def _check(op: bytes, key: bytes, block_id: int, holder: str, token: bytes, now_s: float) -> bool:
    if not key or not isinstance(token, bytes) or len(token) != _EXPIRY.size + hashlib.sha256().digest_size:
        return False
    (expires_s,) = _EXPIRY.unpack_from(token)
    if expires_s + CLOCK_SKEW_S < now_s:
        return False
    return hmac.compare_digest(_token(op, key, block_id, holder, expires_s), token)


def _write_op(server: str) -> bytes:
    # The server's address goes into the operation, so "write at A" and "write at B" are
    # different operations ("\n" cannot occur in an address nor in a holder's name).
    return b"write@" + server.encode() + b"\n"


def read_token(key: bytes, block_id: int, holder: str, expires_s: int) -> bytes:
    """A token letting `holder` (role:name) read block_id until expires_s (epoch seconds)."""
    return _token(b"read", key, block_id, holder, expires_s)


def check_read_token(key: bytes, block_id: int, holder: str, token: bytes, now_s: float) -> bool:
    return _check(b"read", key, block_id, holder, token, now_s)


def write_token(key: bytes, block_id: int, holder: str, server: str, expires_s: int) -> bytes:
    """A token letting `holder` (role:name) store block_id on the data server at `server`
    (its registered address) until expires_s (epoch seconds)."""
    return _token(_write_op(server), key, block_id, holder, expires_s)


def check_write_token(key: bytes, block_id: int, holder: str, server: str, token: bytes, now_s: float) -> bool:
    return _check(_write_op(server), key, block_id, holder, token, now_s)


def open_grant(key: bytes, ino: int, holder: str, write: bool) -> bytes:
    """Proof that `holder` (role:name) was let open inode `ino` for reading, or for writing
    (and reading), handed out with such an open. After its session is lost (a metaserver
    failover, an expiry) a client registers its open handles again in a new session
    (fs/client/client.py `_reopen_files`; and it records a reader's open that went
    unrecorded a while after it was made: `_record`), and a handle stays open for what it was opened
    for whatever the file's mode says now, as a descriptor does after a chmod (a file
    created 0444 by its writer, as git's objects are, would fail the check for writing):
    the grant lets that open through without the permission check. It names no expiry and
    no session: it is good for as long as the file lives (inode numbers are never reused),
    to that client only, and for nothing but an open (no truncate)."""
    return _token(b"open-write" if write else b"open-read", key, ino, holder, 0)


def check_open_grant(key: bytes, ino: int, holder: str, write: bool, grant: bytes) -> bool:
    """`grant` lets `holder` open `ino` for writing (write=True), or reading: a grant for
    writing lets it read too."""
    if not key or not isinstance(grant, bytes):
        return False
    return any(hmac.compare_digest(open_grant(key, ino, holder, w), grant) for w in ((True,) if write else (True, False)))


def load_token_key(path: str | os.PathLike, create: bool = False) -> bytes:
    """The token key in `path`; with create=True a missing one is made, readable by its
    owner only."""
    p = Path(path)
    if not p.exists() and create:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(TOKEN_KEY_BYTES) + "\n")
    value = bytes.fromhex(p.read_text().strip())
    if len(value) < 16:
        raise ValueError(f"token key in {p} is shorter than 16 bytes")
    return value
