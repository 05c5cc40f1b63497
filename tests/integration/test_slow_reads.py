"""A cache-miss read slower than its fill window is served, not cached (docs/decisions.md, "Slow reads").

The outbox relay deletes every write's keys a second time `reinvalidate_delay` after its commit. A read
whose snapshot was taken before a write committed, and whose answer arrives after that second delete,
would otherwise leave the old row in Redis for the whole TTL (a card set LOST answering "00"). The
route's clock is a fake one the loads advance, so "slow" is exact; Redis is a real redis-server."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from server.cache.breaker import BreakerPolicy
from server.cache.near import NearCache
from server.cache.tier import RedisTier
from server.errors import NotFound
from server.metrics import Metrics
from server.resolver import CachePolicy, Lookup, Resolver
from server.store.read_route import ReadRoute
from shard_router.topology import Topology, TopologyShard
from tests.clock import Clock
from tests.integration.support import redis_servers

pytestmark = pytest.mark.integration
PRIMARY = object()   # what each load is given: the fake loads below ignore it
WINDOW = 0.25        # reinvalidate_delay 0.5 less redis_timeout 0.25, the defaults


class TakesSeconds:
    """A fake of the PostgreSQL load whose query takes `seconds` on the route's clock."""

    def __init__(self, clock: Clock, seconds: float, value: bytes | None) -> None:
        self.clock, self.seconds, self.value = clock, seconds, value
        self.calls = 0

    async def __call__(self, _conn: object) -> bytes | None:
        self.calls += 1
        self.clock.now += self.seconds
        return self.value


def _tier(url: str) -> RedisTier:
    redis.Redis.from_url(url).flushall()
    return RedisTier(topology=Topology(version=1, shards=(TopologyShard("shard-0", url),)), pool_size=2, timeout=0.5,
                     policy=BreakerPolicy())


def _resolver(tier: RedisTier, clock: Clock, metrics: Metrics) -> Resolver:
    return Resolver(near=NearCache(max_entries=100, ttl=60), tier=tier, policy=CachePolicy(), metrics=metrics,
                    route=ReadRoute.primary_only(PRIMARY, timeout=2.0, fill_window=WINDOW, clock=clock))


async def test_a_read_past_its_fill_window_is_answered_but_cached_nowhere(tmp_path: Path) -> None:
    with redis_servers(tmp_path, ["slow-reads"]) as (server,):
        client, clock, tier = redis.Redis.from_url(server.url), Clock(), _tier(server.url)
        metrics = Metrics(CollectorRegistry())
        resolver = _resolver(tier, clock, metrics)
        try:
            slow = TakesSeconds(clock, WINDOW + 0.01, b"ACTIVE, read before the LOST commit")
            lookup = Lookup("crd:slow", slow, "card")
            assert await resolver.resolve(lookup) == b"ACTIVE, read before the LOST commit"
            assert client.get("crd:slow") is None and resolver.near.get("crd:slow") is None
            assert await resolver.resolve(lookup) == b"ACTIVE, read before the LOST commit"
            assert slow.calls == 2, "the slow answer was kept somewhere: the second call did not load"

            unknown = TakesSeconds(clock, WINDOW + 0.01, None)   # NOT_FOUND read before an IssueCard commit
            with pytest.raises(NotFound):
                await resolver.resolve(Lookup("crd:unknown", unknown, "card"))
            assert client.get("crd:unknown") is None and resolver.near.get("crd:unknown") is None
            assert metrics.fills_dropped._value.get() == 3

            quick = TakesSeconds(clock, WINDOW - 0.01, b"fresh")   # within the window: cached as always
            assert await resolver.resolve(Lookup("crd:quick", quick, "card")) == b"fresh"
            assert client.get("crd:quick") == b"fresh" and resolver.near.get("crd:quick") == b"fresh"
            assert metrics.fills_dropped._value.get() == 3
        finally:
            await tier.close()


async def test_a_fill_whose_redis_set_ends_past_the_window_is_cached_in_redis_only(tmp_path: Path) -> None:
    """The SET went out within the window, so Redis holds the answer (it lands before the relay's second
    delete); only the near-cache copy, put after the SET, is skipped. Not counted as dropped: the next
    lookup is an L2 hit, not another PostgreSQL read (CI once saw 1,000 reads against 1,008 "dropped")."""
    with redis_servers(tmp_path, ["slow-set"]) as (server,):
        client, clock, tier = redis.Redis.from_url(server.url), Clock(), _tier(server.url)
        metrics = Metrics(CollectorRegistry())
        sent = tier.set_many

        async def slow_set(items: list[tuple[str, bytes, int]], *, not_after: float) -> bool:
            done = await sent(items)   # sent in time (`not_after` is on the real clock; this test's runs on `clock`)
            clock.now += 0.02   # the reply came back past the fill window
            return done

        tier.set_many = slow_set   # type: ignore[method-assign]
        resolver = _resolver(tier, clock, metrics)
        try:
            read = TakesSeconds(clock, WINDOW - 0.01, b"ACTIVE")
            lookup = Lookup("crd:edge", read, "card")
            assert await resolver.resolve(lookup) == b"ACTIVE"
            assert client.get("crd:edge") == b"ACTIVE" and resolver.near.get("crd:edge") is None
            assert metrics.fills_dropped._value.get() == 0
            assert await resolver.resolve(lookup) == b"ACTIVE"
            assert read.calls == 1, "answered from Redis, not read again"
        finally:
            await tier.close()


async def test_a_fill_that_never_reached_redis_is_counted_as_dropped(tmp_path: Path) -> None:
    """The SET was not sent at all: its window passed while the shard's connection (re)opened, so
    `set_px` wrote nothing. Nothing holds the answer, the next lookup reads PostgreSQL again, and the
    drop is counted (CI saw 1,004 reads of 1,000 keys against 1 counted drop)."""
    with redis_servers(tmp_path, ["never-set"]) as (server,):
        client, clock, tier = redis.Redis.from_url(server.url), Clock(), _tier(server.url)
        metrics = Metrics(CollectorRegistry())
        sent = tier.set_many

        async def late_set(items: list[tuple[str, bytes, int]], *, not_after: float) -> bool:
            clock.now += 0.02                               # the connection took the rest of the window
            return await sent(items, not_after=0.0)         # ... so nothing is sent

        tier.set_many = late_set   # type: ignore[method-assign]
        resolver = _resolver(tier, clock, metrics)
        try:
            read = TakesSeconds(clock, WINDOW - 0.01, b"ACTIVE")
            lookup = Lookup("crd:never", read, "card")
            assert await resolver.resolve(lookup) == b"ACTIVE"
            assert client.get("crd:never") is None and resolver.near.get("crd:never") is None
            assert metrics.fills_dropped._value.get() == 1
            assert await resolver.resolve(lookup) == b"ACTIVE"
            assert read.calls == 2
        finally:
            await tier.close()
