"""stripefs client library (trio, no FUSE): `open_client(meta_addresses, credentials)` yields a
Client with the whole file system API (meta_addresses: `HOST:PORT[,HOST:PORT...]` or a list).
Errors are stripefs.proto.errors.FsError(errno). Credentials are a client bundle:
`load_credentials(DIR)` (proto/credentials.py). Paths rather than inodes: `paths.py`."""

from stripefs.proto import metrics
from stripefs.proto.credentials import Credentials, load_credentials
from stripefs.proto.errors import FsError
from stripefs.proto.messages import F_RDLCK, F_UNLCK, F_WRLCK, Attr, Ctx, DirEntry
from stripefs.proto.types import CREDENTIALS_ENV, LOCK_FLOCK, LOCK_RECORD, META_ENV, OFFSET_MAX, ROOT_INODE

from .cache import ATTR_TTL_S, ENTRY_TTL_S, Entry
from .client import CAPABILITY_XATTR, Client, open_client
from .locks import signed64

__all__ = ["ATTR_TTL_S", "Attr", "CAPABILITY_XATTR", "CREDENTIALS_ENV", "Client", "Credentials", "Ctx", "DirEntry",
           "ENTRY_TTL_S", "Entry", "FsError", "F_RDLCK", "F_UNLCK", "F_WRLCK", "LOCK_FLOCK", "LOCK_RECORD", "META_ENV",
           "OFFSET_MAX", "load_credentials", "metrics", "open_client", "ROOT_INODE", "signed64"]
