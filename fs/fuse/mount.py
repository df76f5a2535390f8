"""Running a mount: one trio run holding the client library and the pyfuse3 loop.

SIGTERM and SIGINT end the FUSE loop; the client then flushes what it still holds,
closes its session, and the mount point is unmounted before the process exits.
"""

from __future__ import annotations

import logging
import signal

import pyfuse3
import trio

from fs.client import open_client

from .ops import StripeOperations

log = logging.getLogger("stripefs.fuse")


def mount_options(fsname: str, extra: list[str]) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    opts |= {f"fsname={fsname}", "subtype=stripefs", "allow_other"}
    opts |= set(extra)
    return opts


async def _serve(meta: str, mountpoint: str, secret: bytes, extra_options: list[str], client_options: dict) -> None:
    async with open_client(meta, secret, mountpoint=mountpoint, **client_options) as client:
        ops = StripeOperations(client)
        pyfuse3.init(ops, mountpoint, mount_options(f"stripefs:{meta}", extra_options))
        log.info("mounted %s at %s (session %d)", meta, mountpoint, client.session)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_terminate_on_signal)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mountpoint)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def run_mount(meta: str, mountpoint: str, secret: bytes, extra_options: list[str] | None = None, **client_options) -> None:
    trio.run(_serve, meta, mountpoint, secret, extra_options or [], client_options)
