"""Block write tokens: what lets a data server store a block the metaserver allocated.

A data server stores a block only with a token that the metaserver computed for that block
id: HMAC-SHA256(token key, "block:<id>"). Block ids are never reused, so a token cannot be
replayed to overwrite other data. The token key is made by the metaserver on its first
start (`token.key` in its state directory, 0600) and handed to data servers when they
register, over mutual TLS, to data-server credentials only (proto/credentials.py): clients
never hold it, so a client cannot make a token for a block it was not allocated.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

#: Bytes of a token key.
TOKEN_KEY_BYTES = 32


def block_token(key: bytes, block_id: int) -> bytes:
    return hmac.new(key, b"block:%d" % block_id, hashlib.sha256).digest()


def check_block_token(key: bytes, block_id: int, token: bytes) -> bool:
    return bool(key) and hmac.compare_digest(block_token(key, block_id), token)


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
