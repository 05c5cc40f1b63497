"""How a cache copy comes back after the node lost it, on real redis-servers (no node, no PostgreSQL):
a server that kept running keeps its contents and loses only the keys whose deletes it may have
missed; anything else is flushed (server/cache/shard.py `_recover`; the node's own outbox part is in
tests/integration/test_faults.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import redis

from devstack import RedisServer
from server.cache.breaker import BreakerPolicy
from server.cache.shard import ShardUnavailable
from server.cache.tier import RedisTier
from server.topology.watch import probe_copies
from shard_router import Ring, ShardSpec
from shard_router.moves import set_state
from shard_router.topology import ShardState, Topology, TopologyShard
from tests.integration.support import redis_servers

RING = Ring(ShardSpec(name) for name in ("shard-0", "shard-1"))   # placement is by name (shard_router/)
KEPT, MISSED = (next(k for k in (f"crd:1:{what}-{i}" for i in range(1000)) if RING.node_for(k) == "shard-0")
                for what in ("kept", "missed"))

@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """shard-0 is the one lost and recovered; shard-1 is there so that shard-0 can be marked down."""
    with redis_servers(Path(tmp_path_factory.mktemp("recovery")), ["shard-0", "shard-1"]) as started:
        yield started


@pytest.fixture(scope="module")
def server(servers: list[RedisServer]) -> RedisServer:
    return servers[0]


def two_shards(servers: list[RedisServer]) -> Topology:
    return Topology(version=1, shards=tuple(TopologyShard(s.name, s.url) for s in servers))


@pytest.fixture
def sync(server: RedisServer) -> redis.Redis:
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    return client


class Missed:
    """The tier's missed_deletes: what the outbox would say (None: not known), and how often asked."""

    def __init__(self, keys: Sequence[str] | None) -> None:
        self.keys = keys
        self.asked = 0

    async def __call__(self) -> Sequence[str] | None:
        self.asked += 1
        return self.keys


@pytest.fixture
async def tier(servers: list[RedisServer], sync: redis.Redis) -> AsyncIterator[RedisTier]:
    t = RedisTier(topology=two_shards(servers), pool_size=4, timeout=0.3, warm_window=60.0,
                  policy=BreakerPolicy(failure_threshold=1, retry_interval=0.05))
    await probe_copies(t, timeout=1.0)      # as the node does at start: the server's run_id is remembered
    sync.set(KEPT, b"kept")
    sync.set(MISSED, b"stale: its delete was missed")
    yield t
    await t.close()


async def lose_it(server: RedisServer, t: RedisTier) -> None:
    """The node loses the server without it stopping: SIGSTOP, a read times out, the copy is down."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ShardUnavailable):
            await t.get(KEPT)
        assert not t.shards["shard-0"].primary.is_up
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def back(t: RedisTier) -> None:
    """Read until the copy serves again; while it probes nothing is read from it."""
    for _ in range(200):
        try:
            value = await t.get(MISSED)
        except ShardUnavailable:
            await asyncio.sleep(0.02)
            continue
        assert value != b"stale: its delete was missed", "a missed delete's stale value was served"
        return
    pytest.fail("the copy never came back")


async def test_a_server_that_kept_running_keeps_its_contents_less_its_missed_deletes(
        server: RedisServer, sync: redis.Redis, tier: RedisTier) -> None:
    missed = Missed([MISSED, "crd:1:never-cached"])
    tier.missed_deletes = missed
    await lose_it(server, tier)
    await back(tier)
    assert missed.asked == 1
    assert sync.get(KEPT) == b"kept" and await tier.get(KEPT) == b"kept"
    assert sync.get(MISSED) is None
    assert not tier.shards["shard-0"].primary.warming, "nothing was emptied: no warming from siblings"


@pytest.mark.parametrize("how", ["the outbox is not known", "no outbox is wired", "the server restarted",
                                 "the topology marked it down"])
async def test_otherwise_the_copy_is_flushed(servers: list[RedisServer], server: RedisServer, sync: redis.Redis,
                                            tier: RedisTier, how: str) -> None:
    missed = Missed(None if how == "the outbox is not known" else [])
    tier.missed_deletes = None if how == "no outbox is wired" else missed
    if how == "the server restarted":
        server.kill()
        with pytest.raises(ShardUnavailable):
            await tier.get(KEPT)             # the copy is down
        server.restart()                     # a new run_id; a snapshot could hold what it had acknowledged deleting
        sync.set(KEPT, b"kept")
        sync.set(MISSED, b"stale: its delete was missed")
    elif how == "the topology marked it down":
        down = set_state(two_shards(servers), "shard-0", ShardState.DOWN)
        tier.apply_topology(down)
        tier.apply_topology(set_state(down, "shard-0", ShardState.ACTIVE))
    else:
        await lose_it(server, tier)
    await back(tier)
    assert sync.get(KEPT) is None and sync.get(MISSED) is None
    assert tier.shards["shard-0"].primary.warming
    assert missed.asked == (1 if how == "the outbox is not known" else 0)


async def test_a_failed_recovery_after_the_topology_marked_it_down_still_flushes_next_time(
        servers: list[RedisServer], server: RedisServer, sync: redis.Redis, tier: RedisTier) -> None:
    """The flush the topology asked for is owed until a recovery completes, even if a recovery fails."""
    tier.missed_deletes = Missed([])
    down = set_state(two_shards(servers), "shard-0", ShardState.DOWN)
    tier.apply_topology(down)
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        tier.apply_topology(set_state(down, "shard-0", ShardState.ACTIVE))
        with pytest.raises(ShardUnavailable):
            await tier.get(KEPT)             # starts the probe, which times out on the stopped server
        for _ in range(100):
            if not tier.shards["shard-0"].primary.breaker.probing:
                break
            await asyncio.sleep(0.02)
        assert not tier.shards["shard-0"].primary.is_up
    finally:
        os.kill(server.pid, signal.SIGCONT)
    await back(tier)
    assert sync.get(KEPT) is None, "the topology's flush was dropped with the failed probe"
