"""Logging for the gateway processes: JSON lines (actors.logs.JsonFormatter) or plain text, on stderr."""

from __future__ import annotations

import logging
import sys

from actors.logs import PLAIN_FORMAT, JsonFormatter


def configure(level: str = "INFO", json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
