"""Credentials for tests: a CA in a directory and bundles issued from it on demand, the
way an operator would with `stripefs ca init` and `stripefs credential new`."""

from __future__ import annotations

from pathlib import Path

from stripefs.proto.credentials import Credentials, init_ca, issue, load_credentials


class Pki:
    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.ca = init_ca(self.base / "ca")

    def bundle(self, role: str, name: str | None = None, squash: str = "") -> Path:
        """The bundle of role:name (name defaults to the role), issued the first time (with
        the client squash rule `squash`, see proto/credentials.py)."""
        name = name or role
        out = self.base / f"{role}-{name}"
        if not (out / "cert.pem").exists():
            issue(self.ca, role, name, out, squash=squash)
        return out

    def creds(self, role: str, name: str | None = None, squash: str = "") -> Credentials:
        return load_credentials(self.bundle(role, name, squash))
