"""errno is the error currency of stripefs, end to end.

A server handler raises FsError(errno.X); the glue turns it into a reply whose header
carries `errno`; the client glue raises FsError again. Transport failures (server
down, deadline) become FsError(EIO) on the client with the gRPC status kept in the
message. Only the FUSE adapter turns FsError into pyfuse3.FUSEError.
"""

from __future__ import annotations

import errno as _errno
import os


class FsError(Exception):
    """An operation failed with a POSIX errno."""

    def __init__(self, errno: int, message: str = "") -> None:
        if not isinstance(errno, int) or errno <= 0:
            errno = _errno.EIO
        self.errno = errno
        self.message = message
        super().__init__(errno, message or os.strerror(errno))

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"[{name}] {self.message or os.strerror(self.errno)}"


class TransportError(FsError):
    """EIO because the server could not be reached or did not answer in time (as opposed
    to a server that answered with an error). Safe to retry only for idempotent calls."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EIO, message)


def errno_name(code: int) -> str:
    return _errno.errorcode.get(code, str(code))
