"""Credentials carried by every RPC, and block write tokens.

Every call carries the cluster secret's digest in the `x-stripefs-auth` metadata; a
server refuses calls without it. A data server stores a block only with a token that
the metaserver computed for that block id: HMAC-SHA256(secret, "block:<id>"). Block ids
are never reused, so a token cannot be replayed to overwrite other data.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

AUTH_METADATA_KEY = "x-stripefs-auth"
SECRET_ENV = "STRIPEFS_SECRET_FILE"


def call_credential(secret: bytes) -> str:
    """What a caller puts in AUTH_METADATA_KEY: a digest, so the secret itself never travels."""
    return hmac.new(secret, b"stripefs-call", hashlib.sha256).hexdigest()


def check_credential(secret: bytes, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(call_credential(secret), presented)


def block_token(secret: bytes, block_id: int) -> bytes:
    return hmac.new(secret, b"block:%d" % block_id, hashlib.sha256).digest()


def check_block_token(secret: bytes, block_id: int, token: bytes) -> bool:
    return hmac.compare_digest(block_token(secret, block_id), token)


def load_secret(path: str | os.PathLike | None, create: bool = False) -> bytes:
    """Read the cluster secret from `path` (or $STRIPEFS_SECRET_FILE). With create=True a
    missing file is made with a random secret, readable by its owner only."""
    if path is None:
        path = os.environ.get(SECRET_ENV)
    if path is None:
        raise FileNotFoundError(f"no cluster secret: pass --secret-file or set {SECRET_ENV}")
    p = Path(path)
    if not p.exists() and create:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    value = p.read_text().strip().encode()
    if len(value) < 16:
        raise ValueError(f"cluster secret in {p} is shorter than 16 characters")
    return value
