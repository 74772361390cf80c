"""Structured JSON logs: one object per line, with the domain keys when a record carries them.

Here, not in the gateway, because the actor processes log through it too (Thespian's logging
configuration, actors/system.py); the gateway's `configure` uses the same formatter.
"""

from __future__ import annotations

import logging
import time

import msgspec

FIELDS = ("organization_id", "variant_id", "warehouse_id", "reservation_id", "order_id", "request_id",
          "shard_id", "event_id")

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"  # INVENTORY_LOG_JSON=false

_encode = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode(out).decode()
