"""JSON log lines (orjson), one object per line, with masked numbers only.

Code never logs a PAN or account number; as defence in depth the formatter masks any 12-19 digit
run in the message and in string fields (first six / last four kept).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from server.pan import redact_digits

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact_digits(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = redact_digits(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
            entry["trace"] = redact_digits(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str, *, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Driver chatter at INFO can quote query parameters; keep third parties at WARNING.
    for noisy in ("asyncio", "grpc", "asyncpg", "redis"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
