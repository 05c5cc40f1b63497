"""The hybrid model's Redis reads on gRPC threads, end to end through the Resolver on a real redis-server:
what `Resolver.now` answers from a thread, and what it leaves `resolve` to do on the loop (L2): a key
Redis was already asked for is not asked again, and a shard that failed gets no fill."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from devstack import RedisServer
from server.cache.breaker import BreakerPolicy
from server.cache.near import NearCache
from server.cache.thread_reads import L2, ThreadReads
from server.cache.tier import RedisTier
from server.cache_keys import NEGATIVE
from server.errors import NotFound
from server.metrics import Metrics
from server.resolver import CachePolicy, Lookup, Resolver
from server.store.read_route import ReadRoute
from shard_router.topology import Topology, TopologyShard
from tests.integration.support import redis_servers

pytestmark = pytest.mark.integration
PRIMARY = object()   # what each load is given: the fake loads below ignore it


class Loads:
    """A fake of the PostgreSQL load that counts its calls."""

    def __init__(self, value: bytes | None) -> None:
        self.value = value
        self.calls = 0

    async def __call__(self, _conn: object) -> bytes | None:
        self.calls += 1
        return self.value


def gets(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


async def test_now_reads_redis_on_a_thread_and_resolve_takes_over_what_it_left(tmp_path: Path) -> None:
    with redis_servers(tmp_path, ["thread-reads"]) as (server,):
        await _now_then_resolve(server)


async def _now_then_resolve(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.set("crd:hit", b"cached answer")
    client.set("crd:negative", NEGATIVE)
    tier = RedisTier(topology=Topology(version=1, shards=(TopologyShard("shard-0", server.url),)), pool_size=2,
                     timeout=0.5, policy=BreakerPolicy(), thread_connections=2)
    resolver = Resolver(near=NearCache(max_entries=100, ttl=60), tier=tier, policy=CachePolicy(),
                        metrics=Metrics(CollectorRegistry()),
                        route=ReadRoute.primary_only(PRIMARY, timeout=2.0, fill_window=60.0))
    try:
        hit = Lookup("crd:hit", Loads(b"from postgres"), "card")
        assert await asyncio.to_thread(resolver.now, hit) == L2.ASK       # thread reads off: the loop's
        resolver.thread_reads = ThreadReads(tier, asyncio.get_running_loop())
        assert await asyncio.to_thread(resolver.now, hit) == b"cached answer"
        assert resolver.near.get("crd:hit") == b"cached answer"           # kept as a loop fill keeps it
        with pytest.raises(NotFound, match="card not found"):
            await asyncio.to_thread(resolver.now, Lookup("crd:negative", Loads(None), "card"))

        loads = Loads(b"loaded")
        missing = Lookup("crd:missing", loads, "card")
        before = gets(client)
        told = await asyncio.to_thread(resolver.now, missing)
        assert told is L2.MISS
        assert await resolver.resolve(missing, told) == b"loaded"
        assert gets(client) - before == 1, "the loop asked Redis again for a key the thread had asked for"
        assert loads.calls == 1 and client.get("crd:missing") == b"loaded"   # filled as usual

        down = Loads(b"loaded while the shard failed")
        assert await resolver.resolve(Lookup("crd:down", down, "card"), L2.DOWN) == b"loaded while the shard failed"
        assert down.calls == 1 and client.get("crd:down") is None           # no fill on a failed shard
        assert tier.shards["shard-0"].is_up
    finally:
        await tier.close()
