"""RedisTier with replicated shards, on real redis-servers (no PostgreSQL, no node): reads go to one
copy and fail over, fills and deletes go to every copy, a delete a copy missed is not acknowledged,
and a copy that was away (or joins) is flushed before it serves. See server/cache/replicas.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.client import Pipeline

from devstack import RedisServer
from server.cache.breaker import BreakerPolicy
from server.cache.shard import ShardUnavailable
from server.cache.tier import RedisTier
from shard_router.topology import Topology, TopologyShard
from tests.integration.support import redis_servers


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    with redis_servers(Path(tmp_path_factory.mktemp("replicas")), [f"copy-{i}" for i in range(3)]) as started:
        yield started


@pytest.fixture
def sync(servers: list[RedisServer]) -> list[redis.Redis]:
    for s in servers:
        if not s.is_running:
            s.restart()
    clients = [redis.Redis.from_url(s.url) for s in servers]
    for c in clients:
        c.flushdb()
    return clients


def one_shard(servers: list[RedisServer], copies: int = 2) -> Topology:
    urls = [s.url for s in servers[:copies]]
    return Topology(version=1, shards=(TopologyShard("shard-0", urls[0], replicas=tuple(urls[1:])),))


class Events:
    def __init__(self) -> None:
        self.copies: list[tuple[str, str, bool]] = []
        self.shards: list[tuple[str, bool]] = []
        self.errors: list[tuple[str, str]] = []


@pytest.fixture
async def tier(servers: list[RedisServer], sync: list[redis.Redis]) -> AsyncIterator[tuple[RedisTier, Events]]:
    events = Events()
    t = RedisTier(topology=one_shard(servers), pool_size=4, timeout=0.3,
                  policy=BreakerPolicy(failure_threshold=1, retry_interval=0.05),
                  on_state_change=lambda s, up: events.shards.append((s, up)),
                  on_copy_state=lambda s, c, up: events.copies.append((s, c, up)),
                  on_copy_error=lambda s, c: events.errors.append((s, c)))
    yield t, events
    await t.close()


async def test_fills_and_deletes_reach_every_copy_reads_spread(tier: tuple[RedisTier, Events],
                                                                sync: list[redis.Redis]) -> None:
    t, _ = tier
    await t.set_many([("crd:a", b"A", 60_000), ("crd:b", b"B", 60_000)])
    assert [c.get("crd:a") for c in sync[:2]] == [b"A", b"A"]
    sync[1].set("crd:x", b"on the replica only")
    seen = {await t.get("crd:x") for _ in range(4)}
    assert seen == {None, b"on the replica only"}, "reads alternate between the copies"
    assert await t.mget(["crd:a", "crd:b"]) == [b"A", b"B"]
    assert await t.invalidate(["crd:a"])
    assert [c.get("crd:a") for c in sync[:2]] == [None, None]
    assert await t.ping_all() == {"shard-0": True, "shard-0/replica-1": True}


async def test_a_dead_primary_fails_over_and_its_missed_delete_is_not_acknowledged(
        tier: tuple[RedisTier, Events], servers: list[RedisServer], sync: list[redis.Redis]) -> None:
    t, events = tier
    await t.set_many([("crd:a", b"A", 60_000)])
    servers[0].kill()
    for _ in range(6):                               # never ShardUnavailable: the replica answers
        assert await t.get("crd:a") == b"A"
        assert await t.mget(["crd:a", "crd:none"]) == [b"A", None]
    assert ("shard-0", "primary", False) in events.copies and events.shards == []
    assert ("shard-0", "primary") in events.errors
    assert t.shards["shard-0"].is_up
    assert not await t.invalidate(["crd:a"]), "a copy missed the delete: the outbox row stays unsettled"
    assert sync[1].get("crd:a") is None
    # The primary comes back holding a stale value (what a missed delete leaves behind): flushed first.
    servers[0].restart()
    sync[0].set("crd:a", b"stale")
    for _ in range(200):
        assert await t.get("crd:a") != b"stale"
        if t.shards["shard-0"].primary.is_up:
            break
        await asyncio.sleep(0.02)
    assert t.shards["shard-0"].primary.is_up and sync[0].get("crd:a") is None
    assert ("shard-0", "primary", True) in events.copies
    assert await t.invalidate(["crd:a"]), "every copy acknowledges again"


async def test_the_shard_is_down_only_when_no_copy_serves(tier: tuple[RedisTier, Events],
                                                          servers: list[RedisServer]) -> None:
    t, events = tier
    assert servers[0].pid is not None and servers[1].pid is not None
    os.kill(servers[0].pid, signal.SIGSTOP)
    os.kill(servers[1].pid, signal.SIGSTOP)
    try:
        for _ in range(2):
            with pytest.raises(ShardUnavailable):
                await t.get("crd:a")
        assert events.shards == [("shard-0", False)]
    finally:
        os.kill(servers[0].pid, signal.SIGCONT)
        os.kill(servers[1].pid, signal.SIGCONT)
    for _ in range(200):
        try:
            await t.get("crd:a")
        except ShardUnavailable:
            pass
        if t.shards["shard-0"].is_up:
            break
        await asyncio.sleep(0.02)
    assert events.shards == [("shard-0", False), ("shard-0", True)]


async def test_a_replica_added_by_the_topology_is_flushed_before_it_serves(
        tier: tuple[RedisTier, Events], servers: list[RedisServer], sync: list[redis.Redis]) -> None:
    t, _ = tier
    sync[2].set("crd:a", b"whatever that server held")
    urls = [s.url for s in servers]
    kept = t.shards["shard-0"].copies
    t.apply_topology(Topology(version=2, shards=(TopologyShard("shard-0", urls[0], replicas=(urls[1], urls[2])),)))
    group = t.shards["shard-0"]
    assert group.copies[:2] == kept, "unchanged copies keep their clients and breakers"
    for _ in range(200):
        assert await t.get("crd:a") != b"whatever that server held"
        if group.copies[2].is_up:
            break
        await asyncio.sleep(0.02)
    assert group.copies[2].is_up and sync[2].get("crd:a") is None
    await t.set_many([("crd:b", b"B", 60_000)])
    assert [c.get("crd:b") for c in sync] == [b"B"] * 3


async def test_a_warming_copy_does_not_copy_a_key_in_its_last_millisecond_without_a_ttl(
        servers: list[RedisServer], sync: list[redis.Redis], monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy back from a flush takes a sibling's key on a miss (GET + PTTL): PTTL 0, the key's last
    millisecond, was written without PX, a key that never expired there."""
    t = RedisTier(topology=one_shard(servers), pool_size=4, timeout=0.3, warm_window=60.0,
                  policy=BreakerPolicy(failure_threshold=1, retry_interval=0.05))
    try:
        group = t.shards["shard-0"]
        group.copies[1].warm_until = time.monotonic() + 60.0   # as after its recovery flush
        sync[0].set("crd:w", b"v", px=60_000)
        monkeypatch.setattr(Pipeline, "pttl", lambda self, name: self.execute_command("EVAL", "return 0", 0))
        for _ in range(4):                                     # round robin: each copy answers some
            await t.get("crd:w")
        assert sync[1].pttl("crd:w") == -2
    finally:
        await t.close()
