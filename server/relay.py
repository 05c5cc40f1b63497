"""The outbox relay: the second, guaranteed invalidation of every write (DESIGN.md §3).

Every node runs one. It takes unsettled outbox rows older than `reinvalidate_delay` (SKIP LOCKED, so
nodes share the work), deletes their cache keys again and publishes them, then marks them settled.
The delay closes the read/write race: a reader that loaded the old row from PostgreSQL just before
the commit may SET it into Redis just after the writer's delete; the relay's delete comes later.
A row whose shards did not all acknowledge stays unsettled and is retried on the next pass. A row
whose writer recorded no delete (`invalidated_at`: its shard was down, it failed, or a slow commit's
writer had not marked it yet) gets two from the relay, `reinvalidate_delay` apart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import asyncpg

from server import cache_keys as ck
from server.logs import LIMIT_KEY
from server.metrics import Metrics
from server.resolver import Resolver
from server.store.bins import versions_in_use
from server.store.db import DB_ERRORS

log = logging.getLogger("crs.relay")
BATCH = 500
# A cache copy coming back deletes the keys of at most this many unsettled rows (a few ms); past it,
# FLUSHDB is the cheaper way to drop what it may have missed (unsettled_keys).
MISSED_ROWS_MAX = 2_000
# The backlog gauge counts unsettled rows up to this (past it, it says this): above CRSOutboxBacklog's
# 10,000, and a bounded read for every pass of every node process however long the backlog grows.
BACKLOG_COUNTED = 20_000
# Cache keys a pass holds at most (and a copy coming back deletes at most: past it, FLUSHDB). A write
# to a corporate customer names every key of its cards: 97,000 at 34,000 cards, 9 MB of the node's
# memory once read. A pass took BATCH rows whatever their size, and rows stay unsettled while a shard
# copy is down: 40 such rows took a pass from 90 to 463 MB, and 500 would be ~4.6 GB, past a node's
# 2 GiB limit, on every node that took them in turn.
KEYS_MAX = 500_000


async def relay_once(pool: asyncpg.Pool, resolver: Resolver, *, delay: float, cached_for: float) -> int:
    """One pass; returns how many rows it deleted (settled, or given their first delete). Card keys go
    under every BIN table version the database says their answers may be cached under (`cached_for`:
    the cache TTL), not only the ones this node knows of: a node that has not loaded a newly activated
    table yet still deletes the keys of nodes that have; and every key under the cache format
    generations either side of this release's, so a pass of either release of a rollout deletes the
    other's keys (server/cache_keys.py)."""
    async with pool.acquire() as conn, conn.transaction():
        # Rows never tried first, then the ones tried longest ago (migration 0013): rows a down shard
        # keeps unsettled go round behind the others instead of taking every pass.
        # The second delete comes `delay` after the first (invalidated_at: the writer's, after its
        # commit), not only after the row's insert: a commit that took longer than `delay` (a synchronous
        # standby, an fsync that stalls) got both at once, and a read racing the commit filled the old
        # row after both, for the TTL (docs/decisions.md "Slow reads"). A row no first delete was
        # recorded for (the writer's failed, or is not marked yet) gets one here, and its second later.
        candidates = await conn.fetch(
            "SELECT id, coalesce(cardinality(cache_keys), 0) AS n, invalidated_at IS NOT NULL AS first_done"
            " FROM outbox WHERE settled_at IS NULL"
            " AND created_at < clock_timestamp() - $1::interval"
            " AND (invalidated_at IS NULL OR invalidated_at < clock_timestamp() - $1::interval)"
            " ORDER BY attempted_at NULLS FIRST, id LIMIT $2"
            " FOR UPDATE SKIP LOCKED", dt.timedelta(seconds=delay), BATCH)
        # Their keys, as many rows as KEYS_MAX allows (one at least); the others wait for the next pass.
        taken: list[asyncpg.Record] = []
        total = 0
        for c in candidates:
            if taken and total + c["n"] > KEYS_MAX:
                break
            taken.append(c)
            total += c["n"]
        keys: dict[int, list[str] | None] = {}
        if taken:
            keys = {r["id"]: r["cache_keys"] for r in await conn.fetch(
                "SELECT id, cache_keys FROM outbox WHERE id = ANY($1::bigint[])", [c["id"] for c in taken])}
        rows = [{"id": c["id"], "first_done": c["first_done"], "cache_keys": keys[c["id"]] or []} for c in taken]
        # These rows' writes committed before this read of the primary's position (read replicas).
        position = await resolver.route.write_position() if rows else None
        versions = (await versions_in_use(conn, within=cached_for))[1] if rows else []
        acked = [r for r in rows
                 if await resolver.invalidate(r["cache_keys"], position=position, bin_versions=versions)]
        settled = [r["id"] for r in acked if r["first_done"]]
        if settled:
            await conn.execute("UPDATE outbox SET settled_at = clock_timestamp() WHERE id = ANY($1::bigint[])",
                               settled)
        if first := [r["id"] for r in acked if not r["first_done"]]:
            await conn.execute("UPDATE outbox SET invalidated_at = clock_timestamp() WHERE id = ANY($1::bigint[])",
                               first)
        done = {r["id"] for r in acked}
        owed = [r["id"] for r in rows if r["id"] not in done]
        if owed:
            await conn.execute("UPDATE outbox SET attempted_at = clock_timestamp() WHERE id = ANY($1::bigint[])",
                               owed)
    return len(acked)


async def unsettled_keys(pool: asyncpg.Pool, *, cached_for: float, timeout: float,
                         limit: int = MISSED_ROWS_MAX) -> list[str] | None:
    """Every cache key a delete may still owe: the keys of every unsettled outbox row (card keys under
    every BIN table version in use within `cached_for`, as the relay deletes them), or None when that
    is not known: more than `limit` rows or KEYS_MAX keys, PostgreSQL unreachable or slower than `timeout`.

    A row stays unsettled until every copy of every owning shard acknowledged its delete, and the
    feed's compaction removes only settled rows, so a Redis server that kept running while this node
    could not reach it has missed, at most, the deletes of these rows (server/cache/shard.py)."""
    try:
        async with asyncio.timeout(timeout), pool.acquire() as conn:
            # In created_at order, outbox_unsettled's: it holds the unsettled rows alone. In id order the plan
            # could walk the primary key through the settled history first (5 million rows: 0.94 s). The
            # sizes first, of as many rows as may be taken: their keys are read only when they fit KEYS_MAX.
            owed = await conn.fetchrow(
                "SELECT count(*) AS n, coalesce(sum(k), 0) AS keys FROM (SELECT cardinality(cache_keys) AS k"
                " FROM outbox WHERE settled_at IS NULL ORDER BY created_at LIMIT $1) u", limit + 1)
            if owed is None or owed["n"] > limit or owed["keys"] > KEYS_MAX:
                return None
            rows = await conn.fetch("SELECT cache_keys FROM outbox WHERE settled_at IS NULL ORDER BY created_at"
                                    " LIMIT $1", limit + 1)
            if len(rows) > limit:
                return None
            versions = (await versions_in_use(conn, within=cached_for))[1] if rows else []
    except DB_ERRORS:
        return None
    return ck.invalidation_keys(dict.fromkeys(k for r in rows for k in r["cache_keys"]), versions)


async def backlog(pool: asyncpg.Pool, *, counted: int = BACKLOG_COUNTED) -> tuple[int, float]:
    """(unsettled rows, counted up to `counted`; the oldest one's age in seconds, 0 when none). Both
    read the partial index outbox_unsettled: the age its first entry; the count stops at `counted`.
    Every pass of every node process asks (each CRS_OUTBOX_POLL_INTERVAL), and counting them all cost
    44 ms at 500,000 unsettled rows (124 ms before a vacuum), about 1.4 PostgreSQL cores for 16
    processes, in a shard outage that keeps rows unsettled (eighteenth audit)."""
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox WHERE settled_at IS NULL LIMIT $1) u) AS n,"
        " coalesce(extract(epoch FROM clock_timestamp() - (SELECT min(created_at) FROM outbox"
        " WHERE settled_at IS NULL)), 0)::float8 AS age", counted)
    assert row is not None   # scalar subqueries: always the one row
    return int(row["n"]), float(row["age"])


async def run_relay(pool: asyncpg.Pool, resolver: Resolver, metrics: Metrics, *, delay: float,
                    interval: float, cached_for: float) -> None:
    """Until cancelled. Database errors are logged and retried; they never stop the relay.

    Each pass first reads the backlog (count and age, for the metrics) and takes rows only when there
    are some: at rest a pass is that one query, not four (BEGIN, the SELECT ... FOR UPDATE, COMMIT and
    the count), with every node process running a pass every `interval`. The gauges show the backlog
    as the pass began, so a settled row leaves them one pass later."""
    while True:
        try:
            pending, age = await backlog(pool)
            metrics.outbox_pending.set(pending)
            metrics.outbox_age.set(age)
            if pending:
                deleted = await relay_once(pool, resolver, delay=delay, cached_for=cached_for)
                if deleted == BATCH:
                    continue
        except asyncio.CancelledError:
            raise
        except DB_ERRORS as exc:
            log.warning("outbox relay pass failed; retrying",   # each pass while PostgreSQL is out: limited
                        extra={"error": type(exc).__name__, LIMIT_KEY: (type(exc).__name__,)})
        await asyncio.sleep(interval)
