"""JSON log lines (orjson), one object per line, with masked numbers only.

Code never logs a PAN or account number; as defence in depth the formatter masks any 12-19 digit
run in the message and in string fields (first six / last four kept).

A line a call, a command or a poll can repeat while a fault lasts (a shard refusing every fill, a
bug failing every call) carries `extra={LIMIT_KEY: (...)}`: RepeatLimiter writes the first at once,
then one per (logger, message, key) per CRS_LOG_REPEAT_INTERVAL with `suppressed`, how many it left out.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Hashable
from typing import Any, Final

import orjson

from server.pan import redact_digits

LIMIT_KEY: Final = "limit_key"   # the record attribute RepeatLimiter reads (and removes)
DEFAULT_REPEAT_INTERVAL: Final = 60.0

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
            method = record.method = message[len(self.PREFIX):].split("]", 1)[0]
            record.__dict__[LIMIT_KEY] = (method,)   # a client can end its streams as fast as it likes: limited
            record.msg, record.args = "a stream's client went away while the node was sending to it", ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.INFO)   # the node's level, not grpc's WARNING
        return True


class RepeatLimiter(logging.Filter):
    """One line per (logger, message template, `limit_key`) per `interval` seconds. The first is
    written at once; those that follow within the interval are counted, not written; the first after it
    is written with `suppressed` (how many were left out since the last one written, 0 when none).
    A kind that left lines out and has been quiet for an interval has its last one written by `flush`
    (configure_logging runs it), so a burst that stopped still says how big it was.
    Records without a `limit_key` pass untouched: lines that say a state changed are never limited.
    Thread-safe (hybrid: grpc threads log too). At most `max_keys` kinds are tracked; past that, kinds
    not seen for an interval are forgotten, and a new kind that still finds no room is written."""

    def __init__(self, interval: float = DEFAULT_REPEAT_INTERVAL, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 1024) -> None:
        super().__init__()
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval}")
        self.interval, self._clock, self._max_keys = interval, clock, max_keys
        self._lock = threading.Lock()
        # kind -> [when last written, how many left out since, the last one left out]
        self._seen: dict[Hashable, list[Any]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        limit = record.__dict__.pop(LIMIT_KEY, None)
        if limit is None:
            return True
        kind = (record.name, record.msg, limit)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self.interval:
                seen[1] += 1
                seen[2] = record
                return False
            if seen is None and len(self._seen) >= self._max_keys:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
            record.suppressed = seen[1] if seen is not None else 0
            if seen is not None or len(self._seen) < self._max_keys:
                self._seen[kind] = [now, 0, None]
        return True

    def flush(self, write: Callable[[logging.LogRecord], object]) -> int:
        """Write (with `write`) the last line left out of each kind whose interval has passed since its
        last line written, with `suppressed`: how many others were left out. Returns how many."""
        now = self._clock()
        due: list[logging.LogRecord] = []
        with self._lock:
            for seen in self._seen.values():
                if seen[1] and now - seen[0] >= self.interval:
                    seen[2].suppressed = seen[1] - 1
                    due.append(seen[2])
                    seen[:] = [now, 0, None]
        for record in due:
            write(record)
        return len(due)


_flusher_stop: threading.Event | None = None   # the running flusher's (configure_logging replaces it)


def _flush_every(limiter: RepeatLimiter, handler: logging.Handler, stop: threading.Event) -> None:
    while not stop.wait(limiter.interval / 4):
        try:
            limiter.flush(handler.handle)
        except Exception:   # a record that will not format: said on stderr, and the thread goes on
            traceback.print_exc(file=sys.stderr)


def configure_logging(level: str, *, stream: Any = None, repeat_interval: float = DEFAULT_REPEAT_INTERVAL) -> None:
    global _flusher_stop
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    limiter = RepeatLimiter(repeat_interval)
    handler.addFilter(limiter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if _flusher_stop is not None:
        _flusher_stop.set()
    _flusher_stop = threading.Event()
    threading.Thread(target=_flush_every, args=(limiter, handler, _flusher_stop), name="log-repeats",
                     daemon=True).start()
    root.setLevel(level.upper())
    # Driver chatter at INFO can quote query parameters; keep third parties at WARNING.
    for noisy in ("asyncio", "grpc", "asyncpg", "redis"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, ClientGoneFilter) for f in cygrpc.filters):
        cygrpc.addFilter(ClientGoneFilter())
