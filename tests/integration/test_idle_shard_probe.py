"""A node process takes a returned cache shard back by itself when nothing asks for the shard
(CRS_SHARD_IDLE_PROBE; server/app.py `_probe_idle_shards`, server/cache/breaker.py `start_idle_probe`):
a quiet worker never did, so its crs_cache_shard_up stayed 0 and the pod's minimum kept
CRSCacheShardDown firing after the shard was back. The probe is the one a lookup starts, so the
returned shard is flushed before it serves (what it holds may be stale). Real node, Redis, PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import redis

from devstack.demo import demo_pan
from devstack.environment import DevEnvironment, NodeProcess
from server import rpc
from server.proto import crs_pb2 as pb
from shard_router import Ring, ShardSpec
from tests.integration.support import card_key, metric, own_env, running, until

pytestmark = pytest.mark.integration
IDLE = 4.0   # CRS_SHARD_IDLE_PROBE of the node below
SENTINEL = "crs-test:idle-probe-sentinel"


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    yield from running(own_env(shards=2, customers=100))


@pytest.fixture(scope="module")
def node(env: DevEnvironment) -> Iterator[NodeProcess]:
    started = env.start_node(workers=1, near_cache_size=0, redis_timeout=0.2, shard_failure_threshold=2,
                             shard_retry_interval=0.5, shard_idle_probe=IDLE)
    yield started
    started.stop()


def test_a_shard_back_with_no_traffic_for_it_is_taken_back_and_flushed(env: DevEnvironment,
                                                                         node: NodeProcess) -> None:
    assert env.stack is not None
    victim = env.stack.redis[1]
    ring = Ring(ShardSpec(s.name) for s in node.settings.redis_shards)
    owned = [i for i in range(1, 100) if ring.node_for(card_key(node.settings, demo_pan(i))) == victim.name]
    with grpc.insecure_channel(node.address) as channel:
        lookup = rpc.stub(channel, "LookupService")
        victim.kill()

        # When the last lookup for the shard was sent: no later than the node's last traffic for it (taken
        # after the lookups and the scrape, a stall there made a probe on time look early: 3.3 s for 4 s).
        last_asked = 0.0

        def marked_down() -> bool:   # the victim's cards are answered from PostgreSQL meanwhile
            nonlocal last_asked
            for i in owned[:5]:
                last_asked = time.monotonic()
                assert lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5).card.last4 \
                    == demo_pan(i)[-4:]
            return metric(node, "crs_cache_shard_up", shard=victim.name) == 0

        until("the node marked the killed shard down", marked_down, 10)
        # From here on nothing asks for the shard: no lookup, no write.
        victim.restart()
        client = redis.Redis.from_url(victim.url)
        client.set(SENTINEL, b"written while the node counted this shard down")
        planted_in = time.monotonic() - last_asked
        until("the node took the returned shard back with no traffic for it",
              lambda: metric(node, "crs_cache_shard_up", shard=victim.name) == 1, IDLE + 15)
        back_after = time.monotonic() - last_asked
        assert back_after >= IDLE - 0.5, f"probed {back_after:.1f} s after the last lookup, before CRS_SHARD_IDLE_PROBE"
        if planted_in < IDLE:   # planted before the probe could run: the probe's flush removed it
            assert client.exists(SENTINEL) == 0, "the returned shard was taken back without a flush"
        # And it serves again: a lookup of its card caches the answer there.
        i = owned[0]
        assert lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5).card.last4 == demo_pan(i)[-4:]
        assert client.exists(card_key(node.settings, demo_pan(i))) == 1
