"""stripefs client library (trio, no FUSE): `open_client(meta_address, secret)` yields a
Client with the whole file system API. Errors are proto.errors.FsError(errno)."""

from proto.errors import FsError
from proto.messages import Attr, Ctx, DirEntry

from .cache import ATTR_TTL_S, ENTRY_TTL_S, Entry
from .client import Client, open_client

__all__ = ["ATTR_TTL_S", "Attr", "Client", "Ctx", "DirEntry", "ENTRY_TTL_S", "Entry", "FsError", "open_client"]
