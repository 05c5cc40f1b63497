"""Log volume under sustained faults, on a real node (fifteenth audit): a fault that lasts must not
write a line per call. Measured before the fix at 300 lookups/s: a shard at maxmemory (noeviction)
refusing every fill, 135 lines/s; 100 admin writes/s with the shards down, 100 lines/s. Now the first
line comes at once, then one per CRS_LOG_REPEAT_INTERVAL with `suppressed`, and every refusal is
either written or counted in a later line's `suppressed` (server/logs.py RepeatLimiter).
Own stack: these tests fill a shard's memory and kill shards.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis

from devstack.demo import demo_customer_id, demo_pan
from devstack.environment import DevEnvironment, NodeProcess
from server import rpc
from server.proto import crs_pb2 as pb
from shard_router import Ring, ShardSpec
from tests.integration.support import card_key, metric, own_env, until

CUSTOMERS = 60
INTERVAL = 2.0    # CRS_LOG_REPEAT_INTERVAL of the node here (the product's is 60 s)


@dataclass
class Stack:
    env: DevEnvironment
    node: NodeProcess
    lookup: rpc.Stub
    admin: rpc.Stub

    def lines(self, msg: str, since: int) -> list[dict[str, Any]]:
        with self.node.log_path.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return [e for e in entries if e["msg"] == msg]

    def log_size(self) -> int:
        return self.node.log_path.stat().st_size


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    env = own_env(shards=2, customers=CUSTOMERS)
    env.start()
    try:
        # No near-cache: every lookup of a card not in Redis goes to PostgreSQL, then fills its shard.
        node = env.start_node(workers=1, near_cache_size=0, log_repeat_interval=INTERVAL, redis_timeout=0.2,
                              shard_retry_interval=0.5)
        with grpc.insecure_channel(node.address) as channel:
            yield Stack(env, node, rpc.stub(channel, "LookupService"), rpc.stub(channel, "AdminService"))
    finally:
        env.stop()


REFUSED = "cache shard answered an error reply"


def test_a_full_shard_refusing_every_fill_is_one_line_per_interval_every_refusal_counted(stack: Stack) -> None:
    assert stack.env.stack is not None
    victim = stack.env.stack.redis[0]
    ring = Ring(ShardSpec(s.name) for s in stack.node.settings.redis_shards)
    owned = [i for i in range(CUSTOMERS) if ring.node_for(card_key(stack.node.settings, demo_pan(i))) == victim.name]
    assert len(owned) >= 10
    shard = redis.Redis.from_url(victim.url)
    shard.flushdb()
    shard.config_set("maxmemory-policy", "noeviction")
    shard.config_set("maxmemory", "1")           # every SET: -OOM; GETs still answer (misses)
    try:
        def refused() -> float:
            return metric(stack.node, "crs_cache_reply_errors_total", shard=victim.name)

        since = stack.log_size()
        stack.lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(owned[0])), timeout=5)
        until("the first refused fill counted", lambda: refused() >= 1, 10)
        until("the first refused fill logged at once", lambda: len(stack.lines(REFUSED, since)) == 1, 10)
        first = stack.lines(REFUSED, since)[0]
        assert (first["shard"], first["error"], first["suppressed"]) == (victim.name, "OOM", 0)

        started = time.monotonic()
        for n in range(300):                      # each one a miss whose fill is refused
            stack.lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(owned[n % len(owned)])), timeout=5)
        took = time.monotonic() - started
        until("every refused fill counted", lambda: refused() >= 301, 10)
        # Before: a line per refused fill (301). Now at most one an interval, whatever the machine's pace.
        assert len(stack.lines(REFUSED, since)) <= 2 + took / INTERVAL, (took, len(stack.lines(REFUSED, since)))

        def accounted() -> bool:
            lines = stack.lines(REFUSED, since)
            return len(lines) + sum(int(e["suppressed"]) for e in lines) == refused()

        # The burst has stopped: an interval after its last line written, its last refusal is written by
        # itself, with how many others were left out (before, only a later refusal brought the count).
        until("every refused fill written or counted as suppressed", accounted, INTERVAL + 10)
        assert any(e["suppressed"] > 0 for e in stack.lines(REFUSED, since)[1:])
    finally:
        shard.config_set("maxmemory", "0")


def test_writes_while_the_shards_are_down_are_one_line_per_interval(stack: Stack) -> None:
    """Each write's invalidation fails while its shard is out (the relay retries it later): a line per
    write before."""
    assert stack.env.stack is not None
    for shard in stack.env.stack.redis:
        shard.kill()
    try:
        since = stack.log_size()
        started = time.monotonic()
        for n in range(100):
            stack.admin.SetCustomerStatus(pb.SetCustomerStatusRequest(
                request_id=secrets.token_hex(8), customer_id=demo_customer_id(n % CUSTOMERS),
                status=pb.CUSTOMER_STATUS_ACTIVE), timeout=10)
        took = time.monotonic() - started
        lines = stack.lines("invalidation incomplete; the outbox relay will retry", since)
        assert 1 <= len(lines) <= 2 + took / INTERVAL, (took, len(lines))
        assert lines[0]["rpc"] == "SetCustomerStatus" and lines[0]["suppressed"] == 0
    finally:
        for shard in stack.env.stack.redis:
            shard.restart()
