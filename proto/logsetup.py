"""One logging setup for every process: to a file when given, else stderr."""

from __future__ import annotations

import logging
from typing import Optional


def setup_logging(path: Optional[str], level: str = "INFO") -> None:
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
