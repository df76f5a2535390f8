"""stripefs: a distributed file system for AI training clusters.

Everything installs under this one import name (the repository's folders in brackets):

- `stripefs.client` (fs/client): the client library, the whole file system API as trio
  coroutines with no FUSE in it; its public names are re-exported here.
- `stripefs.fuse` (fs/fuse): the pyfuse3 adapter over it; `stripefs.fsspec` (fs/fsspec.py):
  `stripefs://` URLs for fsspec, pandas, pyarrow and Hugging Face datasets;
  `stripefs.cli` (fs/cli.py): the `stripefs` command.
- `stripefs.proto` (proto/): what clients and servers share (messages, RPC, credentials).
- `stripefs.metaserver` (metaserver/), `stripefs.dataserver` (dataserver/): the servers.

The library, without a mount::

    import trio
    import stripefs

    async def main():
        creds = stripefs.load_credentials("/var/lib/stripefs/credentials/node17")
        async with stripefs.open_client("meta-host:7000", creds) as c:
            data = await stripefs.paths.read_file(c, "/datasets/train/00001.bin")
            for e in await stripefs.paths.listdir(c, "/datasets"):
                print(e.name.decode(), e.attr.size)

    trio.run(main)

`Client.prefetch(paths)` takes a data loader's reading order and fetches ahead of it;
`open_client(..., disk_tier=stripefs.DiskTier(DIR, size_bytes))` keeps blocks read on
local disk. Errors are `FsError(errno)`. The names below are imported on first use, so that importing
one server does not load the client library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stripefs.client import Attr, Client, Credentials, Ctx, DirEntry, FsError, load_credentials, open_client
    from stripefs.client import paths
    from stripefs.client.disktier import DiskTier
    from stripefs.client.prefetch import PrefetchStatus

#: public name -> the module that defines it (`paths` is a module of its own)
_PUBLIC = {
    "Attr": "stripefs.client",
    "Client": "stripefs.client",
    "Credentials": "stripefs.client",
    "Ctx": "stripefs.client",
    "DirEntry": "stripefs.client",
    "DiskTier": "stripefs.client.disktier",
    "FsError": "stripefs.client",
    "load_credentials": "stripefs.client",
    "open_client": "stripefs.client",
    "paths": "stripefs.client.paths",
    "PrefetchStatus": "stripefs.client.prefetch",
}

__all__ = ["Attr", "Client", "Credentials", "Ctx", "DirEntry", "DiskTier", "FsError", "PrefetchStatus", "load_credentials",
           "open_client", "paths"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'stripefs' has no attribute {name!r}")
    value = importlib.import_module(module)
    if not module.endswith("." + name):
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
