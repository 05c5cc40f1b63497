"""PostgreSQL read replica and failover on real servers (docs/decisions.md "Replica reads"): an
embedded primary with a synchronous hot standby (pg_basebackup), nodes with CRS_PG_READ_DSN on the
standby and a two-host CRS_PG_DSN (target_session_attrs=read-write).

- Cache misses are read from the standby, and a stale standby answer is never cached: with replay
  paused, a change written on the primary is answered at once and the cache never holds the old one.
- The primary killed under load, the standby promoted: no lookup fails, writes answer UNAVAILABLE
  only during the gap, every write that was acknowledged is on the new primary, and the nodes
  reconnect by themselves.
These tests have their own stack: they pause, kill and promote servers.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from devstack.demo import demo_pan
from devstack.environment import DevEnvironment, NodeProcess
from server import rpc
from server.db_health import probe_database
from server.metrics import Metrics
from server.proto import crs_pb2 as pb
from server.settings import fill_window_of
from tests.integration import load
from tests.integration.support import card_key as support_card_key
from tests.integration.support import metric, own_env, until

CARDS = 120
NODE = dict(workers=1, pg_timeout=2.0, outbox_poll_interval=0.2, near_cache_ttl=0.5)
# Short cache lifetimes for the failover, so that lookups keep missing (and reading PostgreSQL) throughout.
ROUTES = ("replica", "replica_uncached", "primary_replica_behind", "primary_replica_failed")
CHURN = NODE | dict(cache_ttl=1.0, cache_ttl_jitter=0.3)


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    env = own_env(shards=2, pg_replica=True, customers=CARDS // 2)
    env.start()
    try:
        yield env
    finally:
        env.stop()


def replay(env: DevEnvironment, *, paused: bool) -> None:
    assert env.stack is not None and env.stack.pg_replica is not None
    env.stack.pg_replica.execute("SELECT pg_wal_replay_pause()" if paused else "SELECT pg_wal_replay_resume()")


def card_key(node: NodeProcess, i: int) -> str:
    """Card i's cache key as the node names it: under the active BIN table version too (a key built
    without it names no entry the node ever writes)."""
    return support_card_key(node.settings, demo_pan(i))


def flush_caches(env: DevEnvironment) -> None:
    for url in env.shard_urls().values():
        with redis.Redis.from_url(url) as client:
            client.flushdb()


def staleness(node: NodeProcess) -> float:
    """The node's crs_pg_replica_staleness_seconds; -1 before its first poll has set it (a gauge the
    node exports only once set)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.settings.metrics_port}/metrics", timeout=5).read().decode()
    values = [float(line.split()[1]) for line in text.splitlines()
              if line.startswith("crs_pg_replica_staleness_seconds ")]
    return values[0] if values else -1.0


def test_misses_read_the_standby(env: DevEnvironment) -> None:
    node = env.start_node(**NODE)
    flush_caches(env)
    # A node uses the standby once it has seen it replay the primary's recent positions (staleness
    # under the fill window, 0.25 s here). Right after its start it may not have: the start's own
    # WAL, or WAL that waits for the primary's WAL writer, can keep the standby that far behind on a
    # busy machine, and every miss then reads the primary ("primary_replica_behind"), as it must.
    window = fill_window_of(node.settings)
    until("the node sees the standby fresh", lambda: 0 <= staleness(node) < window, within=15, poll=0.2)
    # It may also fall behind again for a moment while it serves (the suite's other worker keeps the
    # machine busy): those misses read the primary, correctly. So distinct cards, each one miss, are
    # asked ten at a time until 15 misses were read from the standby; no miss may take another route.
    lookup = rpc.stub(node.channel(), "LookupService")
    routes: dict[str, float] = {}
    for first in range(0, CARDS, 10):
        for i in range(first, first + 10):
            assert lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5).card.last4 == demo_pan(i)[-4:]
        if first < 10:
            continue      # the first count after 20 cards
        time.sleep(1.2)   # metrics flush
        routes = {r: metric(node, "crs_pg_reads_total", route=r) for r in ROUTES}
        assert routes["replica"] + routes["primary_replica_behind"] == first + 10, f"a miss read neither: {routes}"
        if routes["replica"] >= 15:
            break
    assert routes["replica"] >= 15, f"misses should read the standby: {routes}"
    assert routes["replica_uncached"] == routes["primary_replica_failed"] == 0, routes
    assert metric(node, "crs_pg_replica_staleness_seconds") < 1.0


def test_a_stale_standby_answer_is_never_cached(env: DevEnvironment) -> None:
    """Replay paused: the standby keeps the old status. After the change, every node answers the new
    one (the primary answers what the standby cannot prove fresh) and no cache holds the old one."""
    writer, reader = env.start_node(**NODE), env.start_node(**NODE)
    admin = rpc.stub(writer.channel(), "AdminService")
    lookup = rpc.stub(reader.channel(), "LookupService")
    n = 7
    req = pb.ResolveCardRequest(pan=demo_pan(n))
    card = lookup.ResolveCard(req, timeout=5).card
    new_status = pb.CARD_STATUS_LOST if card.status != pb.CARD_STATUS_LOST else pb.CARD_STATUS_STOLEN
    key = card_key(reader, n)
    replay(env, paused=True)
    try:
        admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token, status=new_status), timeout=5)
        flush_caches(env)    # every answer from here on is a miss: it must come from the primary
        assert env.stack is not None and env.stack.pg_replica is not None
        [old] = env.stack.pg_replica.execute(f"SELECT status FROM cards WHERE token = '{card.token}'",
                                             database=env.database or "crs")
        assert old == card.status, "the paused standby still holds the old status"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert lookup.ResolveCard(req, timeout=5).card.status == new_status
            time.sleep(0.05)
        # The primary's answer was cached (on the one shard the key belongs to), never the standby's.
        cached = []
        for url in env.shard_urls().values():
            with redis.Redis.from_url(url) as client:
                value = client.get(key)
                if value is not None:
                    cached.append(pb.Resolution.FromString(value).card.status)
        assert cached == [new_status], f"cached {cached} under {key}: expected the new status, once"
        time.sleep(1.2)
        assert metric(reader, "crs_pg_reads_total", route="primary_replica_behind") >= 1
        assert metric(reader, "crs_pg_replica_staleness_seconds") > 0.3
    finally:
        replay(env, paused=False)
    deadline = time.monotonic() + 10
    while metric(reader, "crs_pg_replica_staleness_seconds") > 0.3:
        assert time.monotonic() < deadline, "the standby never caught up after replay resumed"
        time.sleep(0.2)
    for node in (writer, reader):
        node.stop()
        env.nodes.remove(node)


@dataclass
class Writes:
    """A writer thread: card status changes, each with its own request id and retried with that id
    until acknowledged (at most RETRY_FOR seconds). Records the acknowledged state of each card, how
    many writes were acknowledged, and every failed attempt's code."""

    node: NodeProcess
    tokens: list[str]
    acknowledged: dict[str, int] = field(default_factory=dict)   # token -> status it was last set to
    acks: int = 0
    attempts_failed: list[str] = field(default_factory=list)
    in_doubt: list[str] = field(default_factory=list)            # gave up before an acknowledgement
    stop: threading.Event = field(default_factory=threading.Event)

    RETRY_FOR = 20.0

    def run(self) -> None:
        with grpc.insecure_channel(self.node.address) as channel:
            admin = rpc.stub(channel, "AdminService")
            i = 0
            while not self.stop.is_set():
                token = self.tokens[i % len(self.tokens)]
                status = (pb.CARD_STATUS_BLOCKED, pb.CARD_STATUS_ACTIVE)[(i // len(self.tokens)) % 2]
                request = pb.SetCardStatusRequest(request_id=str(uuid.uuid4()), card_token=token, status=status)
                give_up = time.monotonic() + self.RETRY_FOR
                while True:
                    try:
                        admin.SetCardStatus(request, timeout=5)
                    except grpc.RpcError as exc:
                        self.attempts_failed.append(exc.code().name)
                        if time.monotonic() > give_up:
                            self.in_doubt.append(token)
                            return
                        time.sleep(0.1)
                    else:
                        self.acknowledged[token] = status
                        self.acks += 1
                        break
                i += 1
                time.sleep(0.02)


def test_the_database_status_is_not_serving_on_a_read_only_server(env: DevEnvironment) -> None:
    """A pool that reaches a standby (a demoted primary during a failover) answered `SELECT 1`: the
    crs.v1.Database status said SERVING while every write failed UNAVAILABLE."""
    statuses: dict[str, list[int]] = {"primary": [], "standby": []}

    class Servicer:
        def __init__(self, name: str) -> None:
            self.name = name
            self.answered = asyncio.Event()

        async def set(self, service: str, status: Any) -> None:
            statuses[self.name].append(status)
            self.answered.set()

    async def probe(name: str, dsn: str) -> None:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            servicer = Servicer(name)
            task = asyncio.create_task(probe_database(pool, servicer, Metrics(CollectorRegistry()),
                                                      interval=0.05, timeout=2.0))
            # Its first answer (a probe slower than a fixed 0.3 s on a busy machine had set none), then a
            # few more rounds, in which it must not change its mind.
            async with asyncio.timeout(10):
                await servicer.answered.wait()
            await asyncio.sleep(0.3)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            await pool.close()

    asyncio.run(probe("primary", env.admin_dsn))
    asyncio.run(probe("standby", env.read_dsn))
    assert statuses == {"primary": [health_pb2.HealthCheckResponse.SERVING],
                        "standby": [health_pb2.HealthCheckResponse.NOT_SERVING]}


def test_the_primary_dies_and_the_standby_is_promoted(env: DevEnvironment) -> None:
    assert env.stack is not None and env.stack.pg_replica is not None
    node = env.start_node(**CHURN)
    probe = rpc.stub(node.channel(), "LookupService")
    # Cards on open accounts: a card on a closed one (2% of demo accounts) may not be set ACTIVE again.
    answers = [probe.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5) for i in range(CARDS // 2, CARDS)]
    tokens = [a.card.token for a in answers if a.account.status != pb.ACCOUNT_STATUS_CLOSED][:8]
    assert len(tokens) == 8
    writes = Writes(node, tokens)
    writer = threading.Thread(target=writes.run, daemon=True)
    # Lookups of cards the writer does not touch: their answers never change.
    cards = [i for i in range(CARDS // 2)]
    with load.LookupLoad(addresses=[node.address], cards=lambda: cards, threads=3,
                         check=lambda n, r: r.card.last4 == demo_pan(n)[-4:]) as running:
        writer.start()
        time.sleep(2.0)
        env.stack.postgres.kill()
        time.sleep(1.0)                      # the gap: no primary
        env.stack.pg_replica.promote()
        time.sleep(3.0)
        acked_before = writes.acks
        time.sleep(2.0)
        writes.stop.set()
        writer.join(30)
    time.sleep(1.2)   # metrics flush
    routes = {r: metric(node, "crs_pg_reads_total", route=r) for r in ROUTES}
    print(f"failover: {running.ok} lookups ok, {len(running.failures)} failed; {writes.acks} writes acknowledged,"
          f" {len(writes.attempts_failed)} attempts failed ({sorted(set(writes.attempts_failed))}); reads {routes}")
    assert running.failures == [], running.failures[:5]
    assert running.ok > 0
    assert writes.in_doubt == []
    assert set(writes.attempts_failed) <= {"UNAVAILABLE"}, writes.attempts_failed
    assert writes.attempts_failed, "some write should have met the gap"
    assert writes.acks > acked_before, "writes resume on the promoted standby"
    assert routes["replica_uncached"] > 0, "misses during the gap were answered by the standby"
    # Every acknowledged write is on the new primary.
    rows = env.stack.pg_replica.execute(*(f"SELECT status FROM cards WHERE token = '{t}'" for t in writes.acknowledged),
                                        database=env.database or "crs")
    lost = [t for t, status in zip(writes.acknowledged, rows, strict=True) if status != writes.acknowledged[t]]
    assert lost == [], f"{len(lost)} acknowledged writes lost"
