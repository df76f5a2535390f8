"""Fault injection for tests: what a server process is told to do wrong, from STRIPEFS_FAULTS
in its environment (comma-separated NAME=N or NAME=N/M). Each role reads the names it knows
(dataserver/chain.py, metaserver/core.py); an empty environment arms nothing."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("stripefs.faults")


def armed() -> dict[str, tuple[int, ...]]:
    """The faults STRIPEFS_FAULTS arms, each with its numbers; logged when any is."""
    out = {}
    for item in os.environ.get("STRIPEFS_FAULTS", "").split(","):
        name, _, value = item.partition("=")
        numbers = value.strip().split("/")
        if name.strip() and all(n.isdigit() for n in numbers):
            out[name.strip()] = tuple(int(n) for n in numbers)
    if out:
        log.warning("fault injection armed: %s", out)
    return out
