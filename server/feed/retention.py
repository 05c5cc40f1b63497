"""Feed retention: events older than CRS_FEED_RETENTION are compacted, one node at a time."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import asyncpg

from server.store.feed import compact

log = logging.getLogger("crs.feed")

COMPACTION_LOCK = 0x43525343   # "CRSC": one compaction at a time across nodes


async def run_compaction(pool: asyncpg.Pool, *, retention: float, interval: float) -> None:
    """Every `interval` seconds, if no other node is at it, compact events older than `retention`."""
    while True:
        await asyncio.sleep(interval)
        try:
            async with pool.acquire() as conn:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", COMPACTION_LOCK):
                    continue
                try:
                    removed = await compact(pool, older_than=dt.timedelta(seconds=retention))
                    if removed:
                        log.info("feed compacted", extra={"events": removed})
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", COMPACTION_LOCK)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("feed compaction failed; retrying next interval", extra={"error": type(exc).__name__})
