"""server/logs.py: JSON lines, and grpc.aio's ERROR for a send to a client that went away said as INFO."""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from server.logs import configure_logging


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    root, cygrpc = logging.getLogger(), logging.getLogger("grpc._cython.cygrpc")
    handlers, level, filters = root.handlers[:], root.level, cygrpc.filters[:]
    levels = {name: logging.getLogger(name).level for name in ("asyncio", "grpc", "asyncpg", "redis")}
    yield
    root.handlers[:], cygrpc.filters[:] = handlers, filters
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


def _grpc_failed_send(logger: logging.Logger) -> None:
    try:
        raise RuntimeError('Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object>,)')
    except RuntimeError:
        logger.exception("ExecuteBatchError raised in core by servicer method [%s]",
                         "/crs.v1.ChangeFeedService/Snapshot")


def test_a_send_to_a_client_gone_is_one_info_line_naming_the_method() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    configure_logging("INFO", stream=out)            # configured twice (tests, workers): one filter
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    assert len(cygrpc.filters) == 1
    _grpc_failed_send(cygrpc)
    cygrpc.error("Unexpected [ValueError] raised by servicer method [/crs.v1.LookupService/ResolveCard]")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "INFO" and first["method"] == "/crs.v1.ChangeFeedService/Snapshot"
    assert first["msg"] == "a stream's client went away while the node was sending to it" and "trace" not in first
    assert second["level"] == "ERROR" and "Unexpected [ValueError]" in second["msg"]   # other errors stay errors


def test_at_warning_the_client_gone_line_is_not_written() -> None:
    out = io.StringIO()
    configure_logging("WARNING", stream=out)
    _grpc_failed_send(logging.getLogger("grpc._cython.cygrpc"))
    assert out.getvalue() == ""
