"""Faults on real servers: a Redis shard crashing or hanging, PostgreSQL going away.

The bar: no failed lookup while a cache shard is gone, correct answers throughout, the node stays
SERVING, a shard comes back only when it holds nothing a missed delete left behind (flushed, or its
missed deletes done), and no accepted write is ever lost.
These tests have their own stack: they kill servers the other tests rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack import free_port
from devstack.demo import demo_pan, demo_routing
from devstack.environment import DevEnvironment, NodeProcess
from devstack.processes import LogFile
from server import rpc
from server.db_health import DATABASE_SERVICE
from server.proto import crs_pb2 as pb
from shard_router import Ring, ShardSpec
from tests.integration import load
from tests.integration.support import (
    UsedSecrets,
    card_key,
    fresh_account_number,
    fresh_pan,
    log_records,
    metric,
    own_env,
    until,
    wait_metric,
    worker_pids,
)

CARDS = 150
SENTINEL = "crs-test:sentinel"
KEPT = "crs-test:kept"


@dataclass
class FaultStack:
    env: DevEnvironment
    node: NodeProcess
    channel: grpc.Channel
    lookup: rpc.Stub
    admin: rpc.Stub
    ring: Ring
    expected_last4: dict[int, str] = field(default_factory=dict)

    def card_key(self, i: int) -> str:
        return card_key(self.node.settings, demo_pan(i))

    def shard_of_card(self, i: int) -> str:
        return self.ring.node_for(self.card_key(i))

    def cached_value(self, i: int) -> bytes | None:
        """Card i's answer as cached on its shard (looked up first, so that it is there)."""
        self.lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5)
        assert self.env.stack is not None
        shard = next(r for r in self.env.stack.redis if r.name == self.shard_of_card(i))
        value = redis.Redis.from_url(shard.url).get(self.card_key(i))
        assert value is None or isinstance(value, bytes)
        return value

    def shard_up(self, name: str) -> float:
        """The node's crs_cache_shard_up gauge for this shard (1 in use, 0 marked down)."""
        url = f"http://127.0.0.1:{self.node.settings.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        prefix = f'crs_cache_shard_up{{shard="{name}"}} '
        values = [float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)]
        assert len(values) == 1, f"no {prefix.strip()} in the node's metrics"
        return values[0]

    def serving(self, service: str = "") -> bool:
        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=5)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_database(self, serving: bool, within: float = 10.0) -> None:
        """The node's crs.v1.Database health status reaches `serving` in time (it probes every second)."""
        deadline = time.monotonic() + within
        while self.serving(DATABASE_SERVICE) != serving:
            state = "SERVING" if serving else "NOT_SERVING"
            assert time.monotonic() < deadline, f"crs.v1.Database never became {state}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultStack]:
    env = own_env(shards=3, customers=CARDS // 2)
    env.start()
    try:
        # No near-cache, so every lookup exercises the shards; fail fast, probe often.
        node = env.start_node(workers=1, near_cache_size=0, redis_timeout=0.2, shard_failure_threshold=2,
                              shard_retry_interval=0.5, pg_timeout=1.0, outbox_poll_interval=0.2)
        channel = grpc.insecure_channel(node.address)
        stack = FaultStack(env, node, channel, rpc.stub(channel, "LookupService"), rpc.stub(channel, "AdminService"),
                           Ring(ShardSpec(s.name) for s in node.settings.redis_shards))
        yield stack
        channel.close()
    finally:
        env.stop()


def LookupLoad(stack: FaultStack, threads: int = 4) -> load.LookupLoad:
    """Client threads resolving the demo cards; an answer is good when it names the card asked for."""
    return load.LookupLoad(addresses=[stack.node.address], cards=lambda: range(CARDS), threads=threads,
                           check=lambda n, r: r.card.last4 == demo_pan(n)[-4:])


def test_killed_shard_loses_no_lookup_and_is_flushed_before_it_serves_again(faults: FaultStack) -> None:
    """While the node cannot reach a shard it may miss invalidations, so whatever the shard holds when it
    returns must be flushed before the node reads from it. Proof: entries written into the returned
    shard while the node still counts it down (a sentinel key, and a wrong answer under a card key it
    owns) are gone once the node uses the shard again, and the wrong answer is never served."""
    assert faults.env.stack is not None
    victim = faults.env.stack.redis[1]
    owned = [i for i in range(CARDS) if faults.shard_of_card(i) == victim.name]
    other = next(i for i in range(CARDS) if faults.shard_of_card(i) != victim.name)
    with LookupLoad(faults) as load:
        time.sleep(1.0)
        before = load.ok
        victim.kill()
        time.sleep(2.0)
        assert load.ok > before, "lookups continued while the shard was down"
        assert faults.serving()
    assert load.failures == []
    assert faults.shard_up(victim.name) == 0, "the node marked the dead shard down"
    # Its invalidation subscription went with it: the node may miss announcements, so it dropped its
    # near-cache and says so per copy (the other shards' subscriptions were not touched).
    # (Counted when the listener's read fails; allowed a few seconds on a loaded machine. One CI run saw
    # 0 here, never reproduced: the message carries the node's log for the next time.)
    deadline = time.monotonic() + 5
    while metric(faults.node, "crs_invalidation_gaps_total", shard=victim.name, copy="primary") < 1:
        assert time.monotonic() < deadline, f"no invalidation gap counted for {victim.name}:\n" \
                                            f"{faults.node.log_tail(40)}"
        time.sleep(0.1)
    assert all(metric(faults.node, "crs_invalidation_gaps_total", shard=r.name) == 0
               for r in faults.env.stack.redis if r is not victim)

    # No lookups and no writes now: nothing routes to the shard, so the node cannot start its
    # recovery probe. The shard comes back empty; plant what a missed invalidation leaves behind.
    victim.restart()
    client = redis.Redis.from_url(victim.url)
    client.set(SENTINEL, b"written while the node counted this shard down")
    stale_card = owned[0]
    wrong_answer = faults.cached_value(other)     # another card's answer, cached on its own shard
    assert wrong_answer is not None
    client.set(faults.card_key(stale_card), wrong_answer)
    assert faults.shard_up(victim.name) == 0, "the sentinel must be written before the node's probe"

    with LookupLoad(faults) as load:              # the victim's cards drive the probe
        deadline = time.monotonic() + 15
        while faults.shard_up(victim.name) != 1:
            assert time.monotonic() < deadline, "the node never took the returned shard back"
            time.sleep(0.1)
        for i in owned[:20]:
            faults.lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5)
    assert load.failures == []                    # includes: the wrong answer was never served
    assert faults.serving()
    got = faults.lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(stale_card)), timeout=5)
    assert got.card.last4 == demo_pan(stale_card)[-4:]
    assert client.exists(SENTINEL) == 0, "the returned shard was used without a flush"
    assert client.get(faults.card_key(stale_card)) != wrong_answer
    # Back in use: the cards it owns are cached on it again.
    assert sum(client.exists(faults.card_key(i)) for i in owned[:20]) == 20


def test_hung_shard_never_serves_a_value_changed_while_it_was_away_and_keeps_the_rest(faults: FaultStack) -> None:
    """SIGSTOP a shard holding a card's cached answer, change the card, SIGCONT: never the old status.
    The redis-server kept running, so the node deletes the keys of the writes whose deletes are not
    acknowledged (the unsettled outbox rows) before it reads there again, and keeps the rest: another
    card's cached answer and a key planted before the hang are still there (a flush would empty it)."""
    assert faults.env.stack is not None
    shard_name = "shard-2"
    victim = next(r for r in faults.env.stack.redis if r.name == shard_name)
    n, other = [i for i in range(CARDS) if faults.shard_of_card(i) == shard_name][:2]
    req = pb.ResolveCardRequest(pan=demo_pan(n))
    card = faults.lookup.ResolveCard(req, timeout=5).card
    faults.lookup.ResolveCard(req, timeout=5)    # cached on the shard now
    other_answer = faults.cached_value(other)
    assert other_answer is not None
    client = redis.Redis.from_url(victim.url)
    client.set(KEPT, b"on the shard before it hung")
    new_status = pb.CARD_STATUS_LOST if card.status != pb.CARD_STATUS_LOST else pb.CARD_STATUS_STOLEN
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        with LookupLoad(faults, threads=2) as load:
            time.sleep(1.0)
            # The write is accepted even though its invalidation cannot reach the shard.
            faults.admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token, status=new_status), timeout=5)
            missed = asyncio.run(owed_deletes(faults))
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                assert faults.lookup.ResolveCard(req, timeout=5).card.status == new_status
                time.sleep(0.05)
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    assert load.failures == []
    assert missed["all"] is not None and faults.card_key(n) in missed["all"], "the missed delete is owed"
    assert missed["past the limit"] is None and missed["no database"] is None
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:   # the shard comes back: still never the old status
        assert faults.lookup.ResolveCard(req, timeout=5).card.status == new_status
        time.sleep(0.02)
    assert faults.serving()
    assert faults.shard_up(shard_name) == 1
    assert client.get(KEPT) == b"on the shard before it hung", "the shard was flushed, not kept"
    assert client.get(faults.card_key(other)) == other_answer
    client.delete(KEPT)


async def owed_deletes(faults: FaultStack) -> dict[str, list[str] | None]:
    """relay.unsettled_keys as the node asks it when a copy comes back; past its row limit, and
    without PostgreSQL, it says it does not know (None: the copy is flushed)."""
    from server.relay import unsettled_keys

    settings = faults.node.settings
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=1)
    nowhere = await asyncpg.create_pool(f"postgresql://crs@127.0.0.1:{free_port()}/crs", min_size=0, max_size=1)
    try:
        return {"all": await unsettled_keys(pool, cached_for=settings.cache_ttl, timeout=5),
                "past the limit": await unsettled_keys(pool, cached_for=settings.cache_ttl, timeout=5, limit=0),
                "no database": await unsettled_keys(nowhere, cached_for=settings.cache_ttl, timeout=5)}
    finally:
        await pool.close()
        await nowhere.close()


def _needs_postgres(stack: FaultStack, used: UsedSecrets, before: list[pb.Customer],
                    card: pb.Resolution) -> dict[str, Callable[[float], object]]:
    """One well-formed call of each RPC that must read or write PostgreSQL (nothing it asks is
    cached): the admin writes, the identity RPCs, and lookup misses of each kind. Each takes the
    client's deadline."""
    admin, lookup, identity = stack.admin, stack.lookup, rpc.stub(stack.channel, "IdentityService")
    customer, other = before[0].customer_id, before[1].customer_id
    account, token = card.account.account_id, card.card.token
    person = pb.IdentityAttributes(given_name="Outage", family_name="Tester", date_of_birth="1980-03-04")
    ref = pb.SourceRef(system="core", key="outage-1")
    return {
        "ResolveCard (a miss)": lambda t: lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(CARDS + 11)),
                                                             timeout=t),
        "ResolveAccount (a miss)": lambda t: lookup.ResolveAccount(pb.ResolveAccountRequest(
            routing_number=demo_routing(1), account_number=fresh_account_number(used)), timeout=t),
        "GetCustomer (a miss)": lambda t: lookup.GetCustomer(pb.GetCustomerRequest(customer_id=other), timeout=t),
        "CreateCustomer": lambda t: admin.CreateCustomer(pb.CreateCustomerRequest(display_name="During outage"),
                                                         timeout=t),
        "UpdateCustomer": lambda t: admin.UpdateCustomer(pb.UpdateCustomerRequest(
            customer_id=customer, segment="outage"), timeout=t),
        "SetCustomerStatus": lambda t: admin.SetCustomerStatus(pb.SetCustomerStatusRequest(
            customer_id=customer, status=pb.CUSTOMER_STATUS_SUSPENDED), timeout=t),
        "CreateAccount": lambda t: admin.CreateAccount(pb.CreateAccountRequest(
            routing_number=demo_routing(1), account_number=fresh_account_number(used),
            type=pb.ACCOUNT_TYPE_CHECKING, currency="USD", owner_customer_id=customer), timeout=t),
        "SetAccountStatus": lambda t: admin.SetAccountStatus(pb.SetAccountStatusRequest(
            account_id=account, status=pb.ACCOUNT_STATUS_FROZEN), timeout=t),
        "CloseAccount": lambda t: admin.CloseAccount(pb.CloseAccountRequest(account_id=account), timeout=t),
        "LinkCustomer": lambda t: admin.LinkCustomer(pb.LinkCustomerRequest(
            account_id=account, customer_id=other, role=pb.RELATIONSHIP_ROLE_JOINT), timeout=t),
        "UnlinkCustomer": lambda t: admin.UnlinkCustomer(pb.UnlinkCustomerRequest(
            account_id=account, customer_id=other), timeout=t),
        "IssueCard": lambda t: admin.IssueCard(pb.IssueCardRequest(
            pan=fresh_pan(used), expiry="2031-01", account_id=account), timeout=t),
        "LinkCard": lambda t: admin.LinkCard(pb.LinkCardRequest(card_token=token, account_id=account), timeout=t),
        "SetCardStatus": lambda t: admin.SetCardStatus(pb.SetCardStatusRequest(
            card_token=token, status=pb.CARD_STATUS_BLOCKED), timeout=t),
        "IdentifyCustomer": lambda t: identity.IdentifyCustomer(pb.IdentifyCustomerRequest(attributes=person),
                                                                timeout=t),
        "GetCustomerIdentity": lambda t: identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(
            customer_id=customer), timeout=t),
        "ResolveSourceRef": lambda t: identity.ResolveSourceRef(ref, timeout=t),
        "ListReviewTasks": lambda t: identity.ListReviewTasks(pb.ListReviewTasksRequest(), timeout=t),
        "UpdateCustomerIdentity": lambda t: identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
            customer_id=customer, source_ref=ref, attributes=person), timeout=t),
        "MergeCustomers": lambda t: identity.MergeCustomers(pb.MergeCustomersRequest(
            survivor_id=customer, merged_id=other), timeout=t),
        "UnmergeCustomer": lambda t: identity.UnmergeCustomer(pb.UnmergeCustomerRequest(merged_id=other),
                                                              timeout=t),
        "DecideReviewTask": lambda t: identity.DecideReviewTask(pb.DecideReviewTaskRequest(
            review_id="rev_" + "0" * 20, accept=True), timeout=t),
    }


# What the node says when PostgreSQL is down (server/store/db.py, server/resolver.py).
DATABASE_DOWN = ("the database is unavailable", "cannot connect to PostgreSQL")


def test_postgres_outage_keeps_node_up_and_loses_no_accepted_write(faults: FaultStack,
                                                                   used_secrets: UsedSecrets) -> None:
    """PostgreSQL killed: cached answers still come from Redis, and every RPC that needs the database
    is refused by the node itself, UNAVAILABLE naming the database, well within the client's deadline
    (which is longer than anything the node waits for PostgreSQL, so a DEADLINE_EXCEEDED could only be
    the node hanging). The node stays SERVING and no accepted write is lost."""
    assert faults.env.stack is not None
    pg = faults.env.stack.postgres
    # The node waits for a PostgreSQL connection at most pg_timeout x 5 (the pools' connect timeout,
    # server/store/db.py); a refused connection fails at once.
    deadline_s = faults.node.settings.pg_timeout * 5 + 5
    cached = pb.ResolveCardRequest(pan=demo_pan(3))
    card = faults.lookup.ResolveCard(cached, timeout=5)
    accepted = [faults.admin.CreateCustomer(pb.CreateCustomerRequest(display_name=f"Before outage {i}"), timeout=5)
                for i in range(5)]
    calls = _needs_postgres(faults, used_secrets, accepted, card)
    faults.wait_database(True)
    pg.kill()
    answers: dict[str, tuple[str, str, float]] = {}
    try:
        # Probes can tell a PostgreSQL outage from a node outage: the node stays SERVING, its
        # database status does not.
        faults.wait_database(False)
        # Cached answers still come from Redis; the rest is UNAVAILABLE from the node, not a crash.
        assert faults.lookup.ResolveCard(cached, timeout=5).card.last4 == demo_pan(3)[-4:]
        for name, call in calls.items():
            started = time.monotonic()
            try:
                call(deadline_s)
                answers[name] = ("OK", "", 0.0)
            except grpc.RpcError as exc:
                answers[name] = (exc.code().name, exc.details() or "", time.monotonic() - started)
        assert faults.serving() and faults.node.proc.poll() is None
    finally:
        pg.start()
    wrong = {name: answer for name, answer in answers.items()
             if answer[0] != "UNAVAILABLE" or answer[1] not in DATABASE_DOWN}
    assert wrong == {}, f"not UNAVAILABLE from the node with a database message: {wrong}"
    slow = {name: round(took, 2) for name, (_, _, took) in answers.items() if took > deadline_s / 2}
    assert slow == {}, f"refused, but only after waiting for PostgreSQL: {slow}"
    faults.wait_database(True, within=20)
    deadline = time.monotonic() + 15
    while True:
        try:
            for c in accepted:
                got = faults.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=c.customer_id), timeout=5)
                assert got.customer.display_name == c.display_name
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc.details()
            time.sleep(0.3)
    faults.admin.CreateCustomer(pb.CreateCustomerRequest(display_name="After outage"), timeout=5)


def test_postgres_restart_ends_a_watch_unavailable_and_a_resume_loses_nothing(faults: FaultStack) -> None:
    assert faults.env.stack is not None
    pg = faults.env.stack.postgres
    feed = rpc.stub(faults.channel, "ChangeFeedService")
    customers_only = [pb.ENTITY_TYPE_CUSTOMER]
    call = feed.Watch(pb.WatchRequest(entity_types=customers_only), timeout=60)
    before = [faults.admin.CreateCustomer(pb.CreateCustomerRequest(display_name=f"Watched {i}"), timeout=5).customer_id
              for i in range(3)]
    seen: dict[str, int] = {}
    for event in call:
        if event.entity_id:
            seen[event.entity_id] = event.sequence
        if set(before) <= set(seen):
            break
    checkpoint = max(seen.values())
    pg.kill()
    try:
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    finally:
        pg.start()
    after: list[str] = []
    deadline = time.monotonic() + 15
    while len(after) < 3:
        try:
            request = pb.CreateCustomerRequest(display_name=f"After restart {len(after)}")
            after.append(faults.admin.CreateCustomer(request, timeout=5).customer_id)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc.details()
            time.sleep(0.3)
    resumed: list[pb.ChangeEvent] = []
    for event in feed.Watch(pb.WatchRequest(from_sequence=checkpoint, entity_types=customers_only), timeout=30):
        if event.entity_id:
            resumed.append(event)
        if set(after) <= {e.entity_id for e in resumed}:
            break
    assert [e.entity_id for e in resumed] == after          # every later change, in order, nothing before
    assert all(e.sequence > checkpoint for e in resumed)


@contextlib.contextmanager
def _postgres_hung(stack: FaultStack) -> Iterator[None]:
    """PostgreSQL (the postmaster and its children) stopped with SIGSTOP: it neither answers nor
    refuses, until the block ends."""
    assert stack.env.stack is not None and stack.env.stack.postgres.pid is not None
    pid = stack.env.stack.postgres.pid
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    tree = [pid, *(int(p) for p in out.split())]
    for p in tree:
        os.kill(p, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in tree:
            os.kill(p, signal.SIGCONT)


def test_a_node_stops_promptly_while_postgres_hangs(faults: FaultStack) -> None:
    """SIGTERM while the database does not answer: the node still drains and exits within its grace
    period and a few seconds, instead of waiting on PostgreSQL for ever (a rollout or a failover
    would wait for the kubelet's SIGKILL)."""
    node = faults.env.start_node(workers=1, pg_timeout=1.0, grace_seconds=2.0)
    try:
        with _postgres_hung(faults):
            started = time.monotonic()
            code = node.stop(timeout=40)
            took = time.monotonic() - started
    finally:
        faults.env.nodes.remove(node)
    assert code == 0, node.log_tail()
    # drain delay 1 s + grace (no call in flight) + background tasks 2 s + heartbeat 1 s + pool 1 s
    assert took < 10, f"stopping took {took:.1f} s\n{node.log_tail()}"


def test_a_worker_that_cannot_start_while_postgres_is_down_never_takes_its_sibling_down(faults: FaultStack) -> None:
    """PostgreSQL down and one worker of two crashes: its replacement cannot start (exit 3). The parent
    gave up after 5 exits per worker and SIGTERMed the sibling that still answered from Redis, and the
    pod went into CrashLoopBackOff. Now it backs off (1, 2, 4 s...) for as long as the sibling serves, and the
    replacement serves once the database is back."""
    assert faults.env.stack is not None
    pg = faults.env.stack.postgres
    node = faults.env.start_node(workers=2, near_cache_size=0, pg_timeout=1.0)
    log = LogFile(node.log_path)
    try:
        until("both workers serve", lambda: log.text().count('"msg":"node serving"') == 2, within=30, poll=0.1)
        with grpc.insecure_channel(node.address) as channel:
            lookup = rpc.stub(channel, "LookupService")
            cached = pb.ResolveCardRequest(pan=demo_pan(5))
            lookup.ResolveCard(cached, timeout=5)   # now in Redis
            victim = min(worker_pids(node))
            pg.kill()
            try:
                os.kill(victim, signal.SIGKILL)
                until("the replacement failed to start twice", lambda: len(_restarts(log)) >= 3, within=40,
                      poll=0.2)
                assert node.proc.poll() is None, log.text()[-3000:]
                # The sibling answers throughout (this connection went to it or the kernel moved it there).
                assert lookup.ResolveCard(cached, timeout=5).card.last4 == demo_pan(5)[-4:]
            finally:
                pg.start()
        restarts = _restarts(log)
        assert [r["exitcode"] for r in restarts[:3]] == [-9, 3, 3], restarts
        assert [r["restart_in_s"] for r in restarts[:3]] == [1.0, 2.0, 4.0], restarts
        until("the replacement serves", lambda: log.text().count('"msg":"node serving"') == 3, within=40, poll=0.2)
        assert "giving up" not in log.text()
    finally:
        assert node.stop() == 0, log.text()[-3000:]
        faults.env.nodes.remove(node)
    faults.wait_database(True, within=20)


def _restarts(log: LogFile) -> list[dict[str, Any]]:
    return log_records(log.text(), "worker exited; restarting")


def _callers(lookup: Any, cards: range, codes: list[str]) -> list[threading.Thread]:
    """One thread per card of `cards` (not started) that looks it up and notes its status code in `codes`."""
    def miss(card: int) -> None:
        try:
            lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(card)), timeout=10)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)

    return [threading.Thread(target=miss, args=(card,)) for card in cards]


# The near-cache life of the hits the two tests below look up while PostgreSQL hangs. With the default
# 2 s, a loaded machine could take that long from caching the hit to asking for it (the ps, the callers
# getting to their waits): the "hit" was then a Redis read on the full loop and was refused with the misses.
HIT_TTL = 60.0


@contextlib.contextmanager
def _misses_on_hung_postgres(stack: FaultStack, node: NodeProcess, lookup: Any, cards: range,
                             codes: list[str]) -> Iterator[None]:
    """PostgreSQL hung, and one caller per unknown card of `cards` sent before the block runs; the block
    runs once the node's share of them (6 of 8 threads) waits on the loop (the others are refused). Each
    one's status code in `codes`. (A fixed 0.5 s for the callers to get there was not always enough on a
    loaded machine: the block's own miss then took a place in the share and waited with them.)"""
    with _postgres_hung(stack):
        callers = _callers(lookup, cards, codes)
        for t in callers:
            t.start()
        try:
            # Waiting misses end at pg_timeout (3 s): the block must run before.
            wait_metric(node, "crs_grpc_calls_on_loop", 6, within=3.0)
            yield
        finally:
            for t in callers:
                t.join(15)


@pytest.mark.parametrize("active", [8, 2], ids=["all-active", "2-active"])
def test_misses_waiting_on_a_hung_postgres_leave_threads_for_hits(faults: FaultStack, active: int) -> None:
    """Hybrid: a miss holds a gRPC thread while it waits. With PostgreSQL hung, twenty callers of
    unknown cards must not take all eight threads of a node: the waits beyond its share are refused
    UNAVAILABLE at once (clients retry on another node), and a near-cache hit is still answered
    promptly instead of queueing behind them. With 2 of the 8 threads active, a waiting miss must give
    its turn away, or the two first misses would hold both and the hit would wait for them."""
    node = faults.env.start_node(workers=1, serving_model="hybrid", serving_threads=8, serving_active=active,
                                 pg_timeout=3.0, near_cache_ttl=HIT_TTL)
    channel = grpc.insecure_channel(node.address)
    lookup = rpc.stub(channel, "LookupService")
    known = pb.ResolveCardRequest(pan=demo_pan(1))
    lookup.ResolveCard(known, timeout=5)                  # now in the near-cache
    codes: list[str] = []
    try:
        with _misses_on_hung_postgres(faults, node, lookup, range(CARDS + 100, CARDS + 120), codes):
            started = time.monotonic()
            assert lookup.ResolveCard(known, timeout=5).card.token
            hit_took = time.monotonic() - started
            # The node's share (6 of 8 threads) waits on the loop, and the metric says so within its second.
            wait_metric(node, "crs_grpc_calls_on_loop", 6, within=2.0)
            assert metric(node, "crs_grpc_calls_queued") == 0
    finally:
        channel.close()
        node.stop()
        faults.env.nodes.remove(node)
    assert hit_took < 1.0, f"a near-cache hit took {hit_took:.2f} s behind the waiting misses"
    assert "UNAVAILABLE" in codes, codes                 # shed beyond the share of threads
    assert set(codes) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, codes


def test_a_batch_the_loop_cannot_take_answers_its_hits_and_refuses_only_its_misses(faults: FaultStack) -> None:
    """Hybrid: with PostgreSQL hung and a node's share of threads already waiting on it, a
    BatchResolve of a near-cache hit and an unknown card must answer the hit and refuse the miss
    alone, UNAVAILABLE for that key (retry it elsewhere). It was refused whole, its hits worked out
    and thrown away, and the caller had to send them again."""
    node = faults.env.start_node(workers=1, serving_model="hybrid", serving_threads=8, pg_timeout=3.0,
                                 near_cache_ttl=HIT_TTL)
    channel = grpc.insecure_channel(node.address)
    lookup = rpc.stub(channel, "LookupService")
    lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(1)), timeout=5)   # now in the near-cache
    try:
        with _misses_on_hung_postgres(faults, node, lookup, range(CARDS + 300, CARDS + 310), []):   # six wait
            answer = lookup.BatchResolve(pb.BatchResolveRequest(keys=[
                pb.LookupKey(pan=demo_pan(1), correlation_id="hit"),
                pb.LookupKey(pan=demo_pan(CARDS + 299), correlation_id="miss")]), timeout=5)
    finally:
        channel.close()
        node.stop()
        faults.env.nodes.remove(node)
    hit, refused = answer.results
    assert hit.correlation_id == "hit" and hit.code == 0 and hit.resolution.card.token
    assert refused.correlation_id == "miss" and refused.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "calls waiting" in refused.message and "retry" in refused.message, refused.message


def test_a_burst_of_misses_on_a_slow_database_waits_instead_of_being_refused(faults: FaultStack) -> None:
    """Hybrid, default threads: 24 misses at once on a database that answers 0.5 s late (a failover,
    a Redis shard down sending its keys to PostgreSQL) all wait and are answered. With 16 gRPC threads
    only 12 might wait and the rest were refused UNAVAILABLE (docs/decisions.md "Shedding where the
    queue is"): the default must leave room for a miss storm."""
    node = faults.env.start_node(workers=1, serving_model="hybrid", pg_timeout=5.0)
    channel = grpc.insecure_channel(node.address)
    lookup = rpc.stub(channel, "LookupService")
    codes: list[str] = []
    callers = _callers(lookup, range(CARDS + 500, CARDS + 524), codes)
    try:
        with _postgres_hung(faults):
            for t in callers:
                t.start()
            time.sleep(0.5)
        for t in callers:
            t.join(15)
    finally:
        channel.close()
        node.stop()
        faults.env.nodes.remove(node)
    assert codes == ["NOT_FOUND"] * 24, codes


def test_hung_postgres_answers_deadline_exceeded_then_recovers(faults: FaultStack) -> None:
    """A database that stops answering (not refusing) costs the caller pg_timeout, never a hang."""
    unknown = pb.ResolveCardRequest(pan=demo_pan(CARDS + 23))
    with _postgres_hung(faults):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            faults.lookup.ResolveCard(unknown, timeout=10)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        assert time.monotonic() - started < 5
        assert faults.serving()
    deadline = time.monotonic() + 10
    while True:
        try:
            faults.lookup.ResolveCard(unknown, timeout=5)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                break
            assert time.monotonic() < deadline, exc.details()
            time.sleep(0.2)
