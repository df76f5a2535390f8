"""Block tokens: what lets a data server store or serve a block, as the metaserver decided.

A data server stores a block only with a write token that the metaserver computed for that
block id: HMAC-SHA256(token key, "block:<id>"). Block ids are never reused, so a token cannot
be replayed to overwrite other data. It serves a block only with a read token the
metaserver made for that block, for the credential asking (role:name, from its TLS
certificate) and until an expiry: another client's token, or an old one, is refused. The token key is made by the metaserver on its first
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
#: How long a read token is good for. A reader holding an older one gets EACCES and asks
#: the metaserver for the block map again (fs/client/reader.py).
READ_TOKEN_TTL_S = 3600
#: Clock difference between the metaserver and a data server that is forgiven.
CLOCK_SKEW_S = 300
_EXPIRY = struct.Struct(">Q")


def block_token(key: bytes, block_id: int) -> bytes:
    return hmac.new(key, b"block:%d" % block_id, hashlib.sha256).digest()


def check_block_token(key: bytes, block_id: int, token: bytes) -> bool:
    return bool(key) and hmac.compare_digest(block_token(key, block_id), token)


def read_token(key: bytes, block_id: int, holder: str, expires_s: int) -> bytes:
    """A token letting `holder` (role:name) read block_id until expires_s (epoch seconds)."""
    mac = hmac.new(key, b"read:%d:%s:%d" % (block_id, holder.encode(), expires_s), hashlib.sha256).digest()
    return _EXPIRY.pack(expires_s) + mac


def check_read_token(key: bytes, block_id: int, holder: str, token: bytes, now_s: float) -> bool:
    if not key or len(token) != _EXPIRY.size + hashlib.sha256().digest_size:
        return False
    (expires_s,) = _EXPIRY.unpack_from(token)
    if expires_s + CLOCK_SKEW_S < now_s:
        return False
    return hmac.compare_digest(read_token(key, block_id, holder, expires_s), token)


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
