"""stripefs client library (trio, no FUSE): `open_client(meta_address, secret)` yields a
Client with the whole file system API. Errors are proto.errors.FsError(errno)."""

from proto.errors import FsError
from proto.messages import Attr, Ctx, DirEntry

from .client import Client, open_client

__all__ = ["Attr", "Client", "Ctx", "DirEntry", "FsError", "open_client"]
