"""Feed retention: events older than CRS_FEED_RETENTION are compacted, one node at a time."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import asyncpg

from server.store.db import DB_ERRORS
from server.store.feed import compact

log = logging.getLogger("crs.feed")


async def run_compaction(pool: asyncpg.Pool, *, retention: float, interval: float) -> None:
    """Every `interval` seconds compact events older than `retention` (one node at a time: see compact)."""
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await compact(pool, older_than=dt.timedelta(seconds=retention))
            if removed:
                log.info("feed compacted", extra={"events": removed})
        except DB_ERRORS as exc:
            log.warning("feed compaction failed; retrying next interval", extra={"error": type(exc).__name__})
