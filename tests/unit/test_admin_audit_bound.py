"""A failed write's audit row, after a database failure, waits at most one CRS_PG_TIMEOUT: the database
that just failed held the caller's answer up to 5 x more (its statements' bound) for the audit insert
(the PostgreSQL failover audit measured 7 s for a 1 s CRS_PG_TIMEOUT on a stopped server). A refusal
(the caller's fault, the database fine) is still recorded however long the insert takes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from server.admin import AdminHandlers
from server.caller import Caller
from server.errors import BackendUnavailable, CrsError, InvalidKey

CALLER = Caller("ops", frozenset({"admin:write"}), "mtls")


class HungDatabase:
    """An AdminStore whose write fails with `error` and whose audit insert takes `audit_seconds`."""

    timeout = 0.2

    def __init__(self, error: CrsError, audit_seconds: float) -> None:
        self.error, self.audit_seconds = error, audit_seconds
        self.audited: list[str] = []

    async def create_customer(self, request: Any, caller: Caller) -> Any:
        raise self.error

    async def audit_failure(self, caller: Caller, rpc: str, request: Any, result: str) -> None:
        await asyncio.sleep(self.audit_seconds)
        self.audited.append(result)

    def __getattr__(self, name: str) -> Any:   # the other writes: not called here
        return self.create_customer


async def _answer(store: HungDatabase) -> tuple[float, CrsError]:
    handlers = AdminHandlers(store=store, resolver=None)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(CrsError) as info:
        await handlers.CreateCustomer(object(), CALLER)  # type: ignore[attr-defined]
    return time.monotonic() - started, info.value


async def test_after_a_database_failure_the_audit_waits_one_timeout_at_most() -> None:
    store = HungDatabase(BackendUnavailable("the database is unavailable"), audit_seconds=5.0)
    took, error = await _answer(store)
    assert isinstance(error, BackendUnavailable)
    assert took < 1.0, f"answered after {took:.1f} s"


async def test_a_refusal_is_audited_however_long_the_insert_takes() -> None:
    store = HungDatabase(InvalidKey("display_name must be 1-100 characters"), audit_seconds=0.4)
    took, error = await _answer(store)
    assert isinstance(error, InvalidKey) and store.audited == ["INVALID_ARGUMENT"] and took >= 0.4
