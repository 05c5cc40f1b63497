"""A batch's misses load from PostgreSQL a few at a time (Resolver.batch_loads), not all at once.

Each key's load is bounded by CRS_PG_TIMEOUT, pool wait included: 1,000 misses started together
queued for a pool of 20 inside that bound, and on a busy machine the keys at the back answered
DEADLINE_EXCEEDED though PostgreSQL was healthy (CI: test_a_batch_of_misses_does_not_take_healthy_
shards_down, one key in 1,000). Now the keys wait their turn outside it. A real PostgreSQL pool of
two connections; each load takes 10 ms; 200 keys take 1 s together, over the 0.5 s bound."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from devstack.environment import DevEnvironment
from server.cache.near import NearCache
from server.errors import NotFound
from server.metrics import Metrics
from server.resolver import CachePolicy, Lookup, Resolver
from server.store.read_route import ReadRoute

pytestmark = pytest.mark.integration


async def _ten_ms_miss(conn: asyncpg.Connection) -> bytes | None:
    value: bytes | None = await conn.fetchval("SELECT NULL::bytea FROM pg_sleep(0.01)")
    return value


@pytest.mark.parametrize("batch_loads", [1, 2])
def test_a_batch_larger_than_the_pool_waits_its_turn_outside_the_load_bound(dev_env: DevEnvironment,
                                                                            batch_loads: int) -> None:
    async def run() -> list[bytes | Exception]:
        pool = await asyncpg.create_pool(dev_env.admin_dsn, min_size=2, max_size=2)
        try:
            resolver = Resolver(near=NearCache(max_entries=1000, ttl=60), tier=None, policy=CachePolicy(),
                                metrics=Metrics(CollectorRegistry()), load_timeout=0.5, batch_loads=batch_loads,
                                route=ReadRoute.primary_only(pool, timeout=2.0, fill_window=60.0))
            return list(await resolver.resolve_many([Lookup(f"k{i}", _ten_ms_miss, "card") for i in range(200)]))
        finally:
            await pool.close()

    answers = asyncio.run(run())
    assert all(isinstance(a, NotFound) for a in answers), {type(a).__name__ for a in answers}
