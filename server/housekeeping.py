"""Rows kept only for a while, removed on a schedule: change-feed events past CRS_FEED_RETENTION
(compacted: server/store/feed.py) and idempotency rows past CRS_IDEMPOTENCY_RETENTION
(server/store/envelope.py). Every node runs the jobs; each takes a transaction-level lock and does
nothing while another node holds it, so one node at a time does the work.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import asyncpg

from server.store.db import DB_ERRORS
from server.store.envelope import prune_idempotency
from server.store.feed import compact

log = logging.getLogger("crs.node")

PRUNE_EVERY: Final = 300.0   # seconds between idempotency prunings at most (a tenth of the retention if less)


async def run_every(interval: float, what: str, job: Callable[[], Awaitable[int]]) -> None:
    """Every `interval` seconds run `job` (it returns how many rows went); a database error is logged
    and the job runs again next interval."""
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await job()
            if removed:
                log.info(f"{what} removed rows", extra={"rows": removed})
        except DB_ERRORS as exc:
            log.warning(f"{what}: failed; retrying next interval", extra={"error": type(exc).__name__})


def compaction(pool: asyncpg.Pool, *, retention: float, interval: float) -> Coroutine[Any, Any, None]:
    """Feed events older than `retention` seconds compacted every `interval` seconds."""
    return run_every(interval, "feed compaction",
                     lambda: compact(pool, older_than=dt.timedelta(seconds=retention)))


def idempotency_pruning(pool: asyncpg.Pool, *, retention: float) -> Coroutine[Any, Any, None]:
    """Idempotency rows older than `retention` seconds pruned every tenth of it (at most PRUNE_EVERY):
    a row lives at most 1.1 x the retention."""
    return run_every(min(retention / 10, PRUNE_EVERY), "idempotency pruning",
                     lambda: prune_idempotency(pool, older_than=dt.timedelta(seconds=retention)))
