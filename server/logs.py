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


class ClientGoneFilter(logging.Filter):
    """grpc.aio logs at ERROR, with a traceback, a stream's send that failed because the call had
    already ended: the client went away (killed, cancelled, its deadline) while the node was writing
    to it, which is no fault of the node's and would page on every extract job restarted. Said here
    in one INFO line naming the method; grpc's own (grpc/grpc#32551) is replaced."""

    PREFIX = "ExecuteBatchError raised in core by servicer method ["

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            record.method = message[len(self.PREFIX):].split("]", 1)[0]
            record.msg, record.args = "a stream's client went away while the node was sending to it", ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.INFO)   # the node's level, not grpc's WARNING
        return True


def configure_logging(level: str, *, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Driver chatter at INFO can quote query parameters; keep third parties at WARNING.
    for noisy in ("asyncio", "grpc", "asyncpg", "redis"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, ClientGoneFilter) for f in cygrpc.filters):
        cygrpc.addFilter(ClientGoneFilter())
