"""ChangeFeedService on the real stack: commit order under a forced interleaving, resume without
loss, snapshot + watch = an exact copy, progress marks, a slow consumer caught up from the table, a
draining node, bad requests, scopes, and compaction -> OUT_OF_RANGE (in a database of its own)."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import asyncpg
import grpc
import pytest

from devstack.demo import demo_routing
from devstack.environment import DevEnvironment, open_channel
from server import rpc
from server.caller import Caller
from server.feed.tailer import FeedTailer
from server.proto import crs_pb2 as pb
from server.store.envelope import Change, WriteEnvelope
from server.store.feed import compact, head
from tests.integration.support import (
    Clients,
    UsedSecrets,
    clients_of,
    expect_code,
    fresh_account_number,
    fresh_pan,
    new_customer,
    on_database,
    own_env,
    running,
    sql,
    until,
)

WAIT_S = 10.0   # generous bound for an event to arrive (the latency target is 1 s; see docs/feed.md)


class Watcher:
    """A Watch stream read on a thread into a list, so a test can write while it watches."""

    def __init__(self, channel: grpc.Channel, request: pb.WatchRequest) -> None:
        self.call = rpc.stub(channel, "ChangeFeedService").Watch(request)
        self.events: list[pb.ChangeEvent] = []
        self.error: grpc.RpcError | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                with self._lock:
                    self.events.append(event)
        except grpc.RpcError as exc:
            self.error = exc

    def changes(self) -> list[pb.ChangeEvent]:
        with self._lock:
            return [e for e in self.events if e.WhichOneof("payload") != "progress"]

    def wait_for(self, predicate: object, timeout: float = WAIT_S) -> list[pb.ChangeEvent]:
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            changes = self.changes()
            if predicate(changes):
                return changes
            if self.error is not None:
                raise AssertionError(f"watch ended: {self.error.code().name}: {self.error.details()}")
            time.sleep(0.02)
        raise AssertionError(f"condition not met within {timeout}s; got {len(self.changes())} change(s)")

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(5)


@pytest.fixture
def feed_channel(node_a: Clients) -> Iterator[grpc.Channel]:
    channel = node_a.node.channel("feed")
    yield channel
    channel.close()


def _ids(events: list[pb.ChangeEvent]) -> list[str]:
    return [e.entity_id for e in events]


def _assert_ordered(events: list[pb.ChangeEvent]) -> None:
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences), sequences


def test_a_write_arrives_with_its_state_after_the_change(node_a: Clients, feed_channel: grpc.Channel,
                                                           used_secrets: UsedSecrets) -> None:
    watcher = Watcher(feed_channel, pb.WatchRequest())
    try:
        customer = new_customer(node_a.admin, "Feed Example")
        account = node_a.admin.CreateAccount(pb.CreateAccountRequest(
            routing_number=demo_routing(1), account_number=fresh_account_number(used_secrets),
            type=pb.ACCOUNT_TYPE_CHECKING, currency="USD", owner_customer_id=customer.customer_id), timeout=5)
        pan = fresh_pan(used_secrets)
        card = node_a.admin.IssueCard(pb.IssueCardRequest(pan=pan, expiry="2031-01", account_id=account.account_id),
                                      timeout=5)
        blocked = node_a.admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token,
                                                                     status=pb.CARD_STATUS_BLOCKED), timeout=5)
        events = watcher.wait_for(lambda ev: sum(e.entity_id == card.token for e in ev) >= 2)
    finally:
        watcher.close()
    _assert_ordered(events)
    mine = [e for e in events if e.entity_id in (customer.customer_id, account.account_id, card.token)]
    assert [(e.entity_type, e.op) for e in mine] == [
        (pb.ENTITY_TYPE_CUSTOMER, pb.OPERATION_CREATE), (pb.ENTITY_TYPE_ACCOUNT, pb.OPERATION_CREATE),
        (pb.ENTITY_TYPE_CARD, pb.OPERATION_CREATE), (pb.ENTITY_TYPE_CARD, pb.OPERATION_UPDATE)]
    assert mine[0].customer == customer and mine[1].account == account
    assert mine[2].card == card and mine[3].card == blocked and mine[3].version == blocked.version == 2
    assert all(e.committed_at.seconds > 0 for e in mine)
    # CreateAccount's OWNER relationship is part of the same write: the very next sequence.
    owned = next(e for e in events if e.entity_type == pb.ENTITY_TYPE_RELATIONSHIP
                 and e.relationship.account_id == account.account_id)
    assert owned.sequence == mine[1].sequence + 1 and owned.op == pb.OPERATION_CREATE
    assert owned.relationship == pb.Relationship(account_id=account.account_id, customer_id=customer.customer_id,
                                                 role=pb.RELATIONSHIP_ROLE_OWNER)
    assert pan not in str(events) and pan[6:-4] not in "".join(e.card.masked_pan for e in mine)


class HoldingEnvelope(WriteEnvelope):
    """Holds its transaction open after drawing its feed sequence, until released: the window in
    which a sequence drawn at insert time would let a later writer commit a higher number first."""

    appended: asyncio.Event
    release: asyncio.Event

    async def _append_to_feed(self, conn: Any, outbox_id: int, change: Change, state: bytes) -> None:
        await super()._append_to_feed(conn, outbox_id, change, state)
        self.appended.set()
        await self.release.wait()


def test_a_sequence_drawn_but_not_committed_holds_back_later_writers(
        dev_env: DevEnvironment, node_a: Clients, feed_channel: grpc.Channel) -> None:
    """T1 draws its sequence and stays open; T2 (another node process) writes meanwhile. T2 must not
    commit a higher sequence before T1's is visible, or a reader that saw T2 would skip T1 for good."""
    target = new_customer(node_a.admin, "Holder")
    watcher = Watcher(feed_channel, pb.WatchRequest(entity_types=[pb.ENTITY_TYPE_CUSTOMER]))

    async def scenario() -> str:
        pool = await asyncpg.create_pool(dev_env.settings().pg_dsn, min_size=1, max_size=2)
        try:
            envelope = HoldingEnvelope(pool=pool, keyring=dev_env.settings().keyring(), timeout=5.0)
            envelope.appended, envelope.release = asyncio.Event(), asyncio.Event()

            async def body(conn: asyncpg.Connection) -> Change:
                row = await conn.fetchrow(
                    "UPDATE customers SET version = version + 1 WHERE customer_id = $1"
                    " RETURNING customer_id, display_name, segment, status, kyc_status, version", target.customer_id)
                return Change(pb.Customer(**dict(row)), [], "customer.updated", "customer", target.customer_id, {})

            t1 = asyncio.create_task(envelope._write("UpdateCustomer", pb.UpdateCustomerRequest(), body,
                                                         Caller("test", frozenset(), "test")))
            await envelope.appended.wait()
            t2 = asyncio.create_task(asyncio.to_thread(new_customer, node_a.admin, "Behind The Holder"))
            await asyncio.sleep(0.5)      # T2's chance to commit first, if anything let it
            envelope.release.set()
            await t1
            return (await t2).customer_id
        finally:
            await pool.close()

    try:
        second = asyncio.run(scenario())
        events = watcher.wait_for(lambda ev: second in _ids(ev) and any(
            e.entity_id == target.customer_id and e.op == pb.OPERATION_UPDATE for e in ev))
    finally:
        watcher.close()
    _assert_ordered(events)
    t1_at = next(i for i, e in enumerate(events) if e.entity_id == target.customer_id and e.op == pb.OPERATION_UPDATE)
    assert t1_at < _ids(events).index(second), "T2 was delivered before the sequence T1 drew first"


def test_resume_after_a_disconnect_loses_nothing(node_a: Clients, node_b: Clients) -> None:
    first = Watcher(node_a.node.channel("feed"), pb.WatchRequest(entity_types=[pb.ENTITY_TYPE_CUSTOMER]))
    made = [new_customer(node_a.admin, f"Resume {i}").customer_id for i in range(3)]
    got = first.wait_for(lambda ev: set(made) <= set(_ids(ev)))
    first.close()
    checkpoint = next(e.sequence for e in got if e.entity_id == made[-1])
    later = [new_customer(node_b.admin, f"While away {i}").customer_id for i in range(5)]   # another node writes
    second = Watcher(node_b.node.channel("feed"), pb.WatchRequest(from_sequence=checkpoint,
                                                                 entity_types=[pb.ENTITY_TYPE_CUSTOMER]))
    try:
        events = second.wait_for(lambda ev: set(later) <= set(_ids(ev)))
    finally:
        second.close()
    _assert_ordered(events)
    assert all(e.sequence > checkpoint for e in events)
    assert [i for i in _ids(events) if i in later] == later       # in commit order, none missing
    assert not set(made) & set(_ids(events))


def test_snapshot_then_watch_is_an_exact_copy(node_a: Clients, node_b: Clients, used_secrets: UsedSecrets) -> None:
    feed = rpc.stub(node_a.node.channel("feed"), "ChangeFeedService")
    # A customer of this test's own: the environment is shared, and another test's merge into a customer
    # picked from the snapshot (after the Watch below ended) gave it accounts the copy never heard of.
    mine = new_customer(node_a.admin, "Before The Snapshot")
    chunks = list(feed.Snapshot(pb.SnapshotRequest(), timeout=60))
    point = chunks[0].sequence
    assert chunks[-1].last and all(c.sequence == point for c in chunks)
    customers = {c.customer_id: c for ch in chunks for c in ch.customers}
    accounts = {a.account_id: a for ch in chunks for a in ch.accounts}
    cards = {c.token: c for ch in chunks for c in ch.cards}
    relationships = {(r.account_id, r.customer_id): r for ch in chunks for r in ch.relationships}
    assert customers and accounts and cards and relationships

    # Changes after the snapshot, from two nodes, then follow them from the snapshot's sequence.
    someone = customers[mine.customer_id]
    changed = node_b.admin.SetCustomerStatus(pb.SetCustomerStatusRequest(
        customer_id=someone.customer_id, status=pb.CUSTOMER_STATUS_SUSPENDED), timeout=5)
    fresh = new_customer(node_a.admin, "After The Snapshot")
    account = node_a.admin.CreateAccount(pb.CreateAccountRequest(
        routing_number=demo_routing(2), account_number=fresh_account_number(used_secrets),
        type=pb.ACCOUNT_TYPE_SAVINGS, currency="USD", owner_customer_id=fresh.customer_id), timeout=5)
    card = node_b.admin.IssueCard(pb.IssueCardRequest(pan=fresh_pan(used_secrets), expiry="2032-03",
                                                      account_id=account.account_id), timeout=5)
    node_a.admin.LinkCustomer(pb.LinkCustomerRequest(account_id=account.account_id, customer_id=someone.customer_id,
                                                     role=pb.RELATIONSHIP_ROLE_JOINT), timeout=5)
    watcher = Watcher(node_b.node.channel("feed"), pb.WatchRequest(from_sequence=point))
    try:
        events = watcher.wait_for(lambda ev: any(e.entity_type == pb.ENTITY_TYPE_RELATIONSHIP
                                                 and e.relationship.account_id == account.account_id for e in ev))
    finally:
        watcher.close()
    _assert_ordered(events)
    for e in events:
        kind = e.WhichOneof("payload")
        if kind == "customer":
            customers[e.entity_id] = e.customer
        elif kind == "account":
            accounts[e.entity_id] = e.account
        elif kind == "card":
            cards[e.entity_id] = e.card
        elif kind == "relationship":
            key = (e.relationship.account_id, e.relationship.customer_id)
            if e.op == pb.OPERATION_DELETE:
                relationships.pop(key, None)
            else:
                relationships[key] = e.relationship

    # The copy answers what the service answers, for every touched entity.
    for cid in (someone.customer_id, fresh.customer_id):
        profile = node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=cid), timeout=5)
        assert customers[cid] == profile.customer
        held = {(a.account.account_id, a.role) for a in profile.accounts}
        assert held == {(acc, r.role) for (acc, c), r in relationships.items() if c == cid}
    assert customers[someone.customer_id] == changed
    resolved = node_b.lookup.ResolveCard(pb.ResolveCardRequest(token=card.token), timeout=5)
    assert cards[card.token] == resolved.card and accounts[account.account_id] == resolved.account


def test_an_idle_filtered_watcher_gets_progress_marks_past_what_it_filtered(node_a: Clients,
                                                                            feed_channel: grpc.Channel) -> None:
    watcher = Watcher(feed_channel, pb.WatchRequest(entity_types=[pb.ENTITY_TYPE_CARD]))
    try:
        customer = new_customer(node_a.admin, "Not A Card")       # filtered out
        filtered = _seq_of(node_a, customer.customer_id)
        deadline = time.monotonic() + WAIT_S
        marks: list[int] = []
        while time.monotonic() < deadline and not (marks and marks[-1] >= filtered):
            time.sleep(0.1)
            with watcher._lock:
                marks = [e.progress.high_water_sequence for e in watcher.events
                         if e.WhichOneof("payload") == "progress"]
        assert all(e.entity_type == pb.ENTITY_TYPE_CARD for e in watcher.changes())
    finally:
        watcher.close()
    assert marks and marks == sorted(marks)
    assert marks[-1] >= filtered, "the mark must pass the filtered event"


def _seq_of(node: Clients, entity_id: str) -> int:
    feed = rpc.stub(node.node.channel("feed"), "ChangeFeedService")
    call = feed.Watch(pb.WatchRequest(entity_types=[pb.ENTITY_TYPE_CUSTOMER]), timeout=WAIT_S)
    try:
        for event in call:
            if event.entity_id == entity_id:
                return int(event.sequence)
    except grpc.RpcError:
        pass
    finally:
        call.cancel()
    raise AssertionError(f"{entity_id} not in the feed")


def _newest(env: DevEnvironment) -> int:
    return on_database(env.admin_dsn, head)


def _committed(env: DevEnvironment, after: int, through: int) -> list[int]:
    return [int(r["seq"]) for r in sql(env.admin_dsn, "SELECT seq FROM outbox WHERE seq > $1 AND seq <= $2"
                                       " ORDER BY seq", after, through)]


def test_a_watch_marks_the_moment_it_has_caught_up_however_busy_the_feed(
        dev_env: DevEnvironment, node_a: Clients, feed_channel: grpc.Channel) -> None:
    """With a write every 0.1 s the feed is never idle for the 2 s an idle mark waits, yet a Watch
    sends a Progress mark as soon as it has delivered everything committed when it began (what
    `crs feed tail --no-follow` stops at), and no event at or below the mark comes after it."""
    stop = threading.Event()
    written = [0]

    def write() -> None:
        while not stop.is_set():
            new_customer(node_a.admin, "Keeps The Feed Busy")
            written[0] += 1
            time.sleep(0.1)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        # A few committed events to catch up on: the writer's first five (not those of a fixed 0.5 s,
        # which a slow writer left fewer than five of, and a test run alone a negative from_sequence).
        until("the writer's first writes", lambda: written[0] >= 5, WAIT_S)
        start = _newest(dev_env) - 5
        began = time.monotonic()
        watcher = Watcher(feed_channel, pb.WatchRequest(from_sequence=start))
        try:
            deadline = began + WAIT_S
            while True:
                with watcher._lock:
                    events = list(watcher.events)
                marks = [i for i, e in enumerate(events) if e.WhichOneof("payload") == "progress"]
                if marks:
                    break
                assert time.monotonic() < deadline, f"no Progress mark in {WAIT_S}s of a busy feed"
                time.sleep(0.02)
            # Later events, to check none falls below the mark: wait for a few (a writer slower than
            # a fixed 0.5 s on a busy machine left none, and nothing checked).
            deadline = time.monotonic() + WAIT_S
            while True:
                with watcher._lock:
                    events = list(watcher.events)
                if sum(e.WhichOneof("payload") != "progress" for e in events[marks[0] + 1:]) >= 3:
                    break
                assert time.monotonic() < deadline, f"no events after the mark in {WAIT_S}s of a busy feed"
                time.sleep(0.02)
        finally:
            watcher.close()
    finally:
        stop.set()
        writer.join(5)
    at = marks[0]
    mark = events[at].progress.high_water_sequence
    assert events[at].sequence == mark and mark >= start + 5
    before, after = events[:at], [e for e in events[at + 1:] if e.WhichOneof("payload") != "progress"]
    assert [e.sequence for e in before] == _committed(dev_env, start, mark), "everything up to the mark, first"
    assert after and all(e.sequence > mark for e in after)


def test_a_watch_from_beyond_the_newest_sequence_is_refused(dev_env: DevEnvironment,
                                                            feed_channel: grpc.Channel) -> None:
    """A checkpoint ahead of the database (restored from an older backup, another environment's):
    waiting for the sequence would silently skip every change up to it, so it is OUT_OF_RANGE at once.
    The newest sequence itself is a valid place to start (it is where a caught-up consumer stands)."""
    feed = rpc.stub(feed_channel, "ChangeFeedService")
    newest = _newest(dev_env)
    for ahead in (newest + 1_000, 2**63 - 1):
        err = expect_code(lambda ahead=ahead: next(iter(feed.Watch(pb.WatchRequest(from_sequence=ahead), timeout=5))),
                          grpc.StatusCode.OUT_OF_RANGE)
        assert "beyond the newest committed one" in (err.details() or ""), err.details()
    first = next(iter(feed.Watch(pb.WatchRequest(from_sequence=newest), timeout=WAIT_S)))
    assert first.WhichOneof("payload") == "progress" and first.progress.high_water_sequence >= newest


def test_polling_alone_keeps_the_feed_moving(dev_env: DevEnvironment, node_a: Clients) -> None:
    """CRS_FEED_LISTEN=false (PgBouncer in transaction mode): no LISTEN, the tailer polls."""
    node = dev_env.start_node(workers=1, feed_listen=False, feed_poll_interval=0.2)
    watcher = Watcher(node.channel("feed"), pb.WatchRequest(entity_types=[pb.ENTITY_TYPE_CUSTOMER]))
    try:
        made = new_customer(node_a.admin, "Seen By Polling")       # written through another node
        watcher.wait_for(lambda ev: made.customer_id in _ids(ev))
        url = f"http://127.0.0.1:{node.settings.metrics_port}/metrics"
        deadline = time.monotonic() + WAIT_S
        while "crs_feed_watchers 1.0" not in urllib.request.urlopen(url, timeout=5).read().decode():
            assert time.monotonic() < deadline, "crs_feed_watchers never showed the open Watch"
            time.sleep(0.2)
    finally:
        watcher.close()
        node.stop()


def test_a_lost_listen_connection_is_reopened(dev_env: DevEnvironment, node_a: Clients) -> None:
    """With polling slowed to 30 s, only NOTIFY can deliver within seconds: after every LISTEN
    connection is killed, the node listens again and a write still arrives long before a poll."""
    node = dev_env.start_node(workers=1, feed_poll_interval=30.0)
    watcher = Watcher(node.channel("feed"), pb.WatchRequest(entity_types=[pb.ENTITY_TYPE_CUSTOMER]))

    async def kill_listeners() -> int:
        conn = await asyncpg.connect(dev_env.admin_dsn)
        try:
            killed = await conn.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                         " WHERE query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()")
            return int(killed)
        finally:
            await conn.close()

    try:
        first = new_customer(node_a.admin, "Before The Cut")
        watcher.wait_for(lambda ev: first.customer_id in _ids(ev))
        assert asyncio.run(kill_listeners()) >= 1
        time.sleep(3)    # the tailer notices, waits its retry second, and listens again
        second = new_customer(node_a.admin, "After The Cut")
        watcher.wait_for(lambda ev: second.customer_id in _ids(ev), timeout=10)
    finally:
        watcher.close()
        node.stop()


def test_bad_requests_and_scopes(node_a: Clients, feed_channel: grpc.Channel) -> None:
    feed = rpc.stub(feed_channel, "ChangeFeedService")

    def first(request: pb.WatchRequest) -> object:
        return lambda: next(iter(feed.Watch(request, timeout=5)))

    expect_code(first(pb.WatchRequest(from_sequence=-1)), grpc.StatusCode.INVALID_ARGUMENT)
    expect_code(first(pb.WatchRequest(entity_types=[99])), grpc.StatusCode.INVALID_ARGUMENT)   # type: ignore[list-item]
    expect_code(lambda: list(feed.Snapshot(pb.SnapshotRequest(entity_types=[pb.ENTITY_TYPE_MERGE]), timeout=5)),
                grpc.StatusCode.INVALID_ARGUMENT)
    with node_a.node.channel("switch") as switch:    # a payment switch may look up, not follow the feed
        expect_code(lambda: next(iter(rpc.stub(switch, "ChangeFeedService").Watch(pb.WatchRequest(), timeout=5))),
                    grpc.StatusCode.PERMISSION_DENIED)
    with node_a.node.channel("feed") as reader:      # and the feed reader may not look up or write
        lookup = rpc.stub(reader, "LookupService")
        expect_code(lambda: lookup.GetCustomer(pb.GetCustomerRequest(customer_id="cus_00000000000000000001"),
                                               timeout=5), grpc.StatusCode.PERMISSION_DENIED)


def test_a_slow_consumer_catches_up_from_the_table_and_rejoins(dev_env: DevEnvironment, node_a: Clients) -> None:
    """A queue of 8 and bursts of 4000 and 3000 events: the watcher's queue overflows at once, and again
    while it catches up, yet it is never ended. Reading slowly through a small HTTP/2 window, it gets
    every committed event exactly once and in order (from PostgreSQL while it is behind), then rejoins
    the live broadcast: a write after the bursts arrives too, and no Progress mark overtakes an event."""
    node = dev_env.start_node(workers=1, feed_queue_size=8, feed_batch=200)
    channel = open_channel(node.address, node.pki, "feed", options=[("grpc.http2.bdp_probe", 0)])
    call = rpc.stub(channel, "ChangeFeedService").Watch(pb.WatchRequest(entity_types=[pb.ENTITY_TYPE_CUSTOMER]),
                                                       timeout=120)
    try:
        stream = iter(call)
        before = new_customer(node_a.admin, "Before The Burst")
        seen: list[pb.ChangeEvent] = []
        while not any(e.entity_id == before.customer_id for e in seen):
            seen.append(next(stream))
        start = max(e.sequence for e in seen)
        asyncio.run(_commit_many(dev_env, 4000))
        bulk, second_burst, after = 0, False, None
        while after is None or not any(e.entity_id == after.customer_id for e in seen):
            event = next(stream)          # an RpcError here is the failure: the stream was ended
            seen.append(event)
            if event.entity_id.startswith("cus_bulk"):
                bulk += 1
                time.sleep(0.0005)        # a consumer slower than the burst
            if bulk == 1000 and not second_burst:   # the head moves on while the watcher reads the table
                second_burst = True
                asyncio.run(_commit_many(dev_env, 3000))
            if bulk == 7000 and after is None:      # all of both: now a live write
                after = new_customer(node_a.admin, "After The Burst")
        assert "a watcher fell behind its queue" in node.log_path.read_text(), "the queue never overflowed"
    finally:
        call.cancel()
        channel.close()
        node.stop()
    events = [e for e in seen if e.WhichOneof("payload") != "progress" and e.sequence > start]
    last = events[-1].sequence
    committed = [int(r["seq"]) for r in sql(dev_env.admin_dsn, "SELECT seq FROM outbox WHERE seq > $1 AND seq <= $2"
                                            " AND feed_type = $3 ORDER BY seq", start, last, pb.ENTITY_TYPE_CUSTOMER)]
    assert [e.sequence for e in events] == committed, "a hole, a repeat or a reordering"
    assert sum(e.entity_id.startswith("cus_bulk") for e in events) == 7000
    marked = 0
    for e in seen:                        # a mark is never ahead of an event at or below it
        if e.WhichOneof("payload") == "progress":
            marked = e.progress.high_water_sequence
        else:
            assert e.sequence > marked, (e.sequence, marked)


async def _commit_many(env: DevEnvironment, n: int, name_size: int = 200) -> None:
    """n customer events in one transaction, the way the envelope appends them (under the feed lock),
    each carrying a customer state with a `name_size`-character name."""
    conn = await asyncpg.connect(env.admin_dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", 0x43525346)
            await conn.execute(
                "INSERT INTO outbox (seq, event_type, entity_type, entity_id, feed_type, feed_op, feed_id, state,"
                " settled_at)"
                " SELECT nextval('feed_seq'), 'customer.updated', 'customer', 'cus_bulk' || i, $1, $2,"
                " 'cus_bulk' || i, $3, now() FROM generate_series(1, $4) AS i",
                pb.ENTITY_TYPE_CUSTOMER, pb.OPERATION_UPDATE,
                pb.Customer(customer_id="cus_bulk", display_name="x" * name_size).SerializeToString(), n)
            await conn.execute("SELECT pg_notify('crs_feed', '')")
    finally:
        await conn.close()


def test_a_draining_node_ends_its_watches_unavailable_at_once(dev_env: DevEnvironment) -> None:
    node = dev_env.start_node(workers=1, grace_seconds=30)
    channel = node.channel("feed")
    call = rpc.stub(channel, "ChangeFeedService").Watch(pb.WatchRequest(), timeout=60)
    try:
        next(iter(call))   # connected (a progress mark or an event)
        started = time.monotonic()
        node.proc.terminate()
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert time.monotonic() - started < 15, "the stream waited for the drain grace instead of ending"
        assert node.proc.wait(30) == 0
    finally:
        channel.close()
        node.stop()


def test_the_tailer_ends_when_cancelled_as_a_change_arrives(dev_env: DevEnvironment) -> None:
    """A node's stop cancels the tailer; a feed NOTIFY waking it at that very moment must not swallow
    the cancel (asyncio.wait_for on 3.11 did, gh-86296: the tailer polled on and the node never
    exited). The wake-up is placed 0 to 3 loop turns before the cancel, so some trial hits the turn
    where the woken wait has finished but the tailer has not run yet."""
    async def trial(turns: int, pool: asyncpg.Pool) -> bool:
        tailer = FeedTailer(pool=pool, poll_interval=60.0, batch=100, queue_size=10, timeout=5.0)
        task = asyncio.create_task(tailer.run())
        await tailer.subscribe(frozenset())      # it has read the head...
        await asyncio.sleep(0.2)                 # ...and waits for a wake-up (or the 60 s poll)
        tailer._wake.set()                       # what a NOTIFY on the feed channel does
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        return bool(done)

    async def scenario() -> list[bool]:
        pool = await asyncpg.create_pool(dev_env.settings().pg_dsn, min_size=1, max_size=2)
        try:
            return [await trial(turns, pool) for turns in range(4)]
        finally:
            await pool.close()

    assert asyncio.run(scenario()) == [True] * 4


@pytest.fixture(scope="module")
def feed_db() -> Iterator[DevEnvironment]:
    """A database of its own for the tests that compact the feed: the shared one keeps its outbox for
    the PCI scan."""
    yield from running(own_env(shards=1, customers=0, tls=True))


def test_compaction_answers_out_of_range_with_the_oldest_retained(feed_db: DevEnvironment) -> None:
    """A node with a one-second retention compacts (as the service role, on its own schedule)."""
    node = feed_db.start_node(workers=1, feed_retention=1.0, feed_compact_interval=0.5,
                              reinvalidate_delay=0.3, outbox_poll_interval=0.1)
    try:
        _compaction_scenario(feed_db, clients_of(node))
    finally:
        node.stop()
        feed_db.nodes.remove(node)


def test_compaction_while_a_watch_catches_up_ends_it_out_of_range(feed_db: DevEnvironment) -> None:
    """A Watch reading old events in batches (catch-up) while compaction removes the rows ahead of it
    would skip them silently: it ends OUT_OF_RANGE instead, naming the oldest retained sequence. The
    consumer stops reading after the first event, so the node's catch-up waits (HTTP/2 flow control)
    between batches, far short of the 12 MB of events, while the feed is compacted past it."""
    start = _newest(feed_db)
    asyncio.run(_commit_many(feed_db, 3000, name_size=4000))
    # Started after the commit, its feed reader starts at the head: all 3000 are catch-up, none live.
    node = feed_db.start_node(workers=1, feed_batch=20)     # its own retention (7 days) compacts nothing
    # No BDP probing: the stream's window stays at its initial 64 KiB instead of growing to megabytes.
    channel = open_channel(node.address, node.pki, "feed", options=[("grpc.http2.bdp_probe", 0)])
    call = rpc.stub(channel, "ChangeFeedService").Watch(
        pb.WatchRequest(from_sequence=start, entity_types=[pb.ENTITY_TYPE_CUSTOMER]), timeout=20)
    try:
        first = next(call)
        assert first.sequence == start + 1 and first.entity_id.startswith("cus_bulk"), first.entity_id
        time.sleep(0.5)                               # the node fills the window and waits on the consumer

        async def compact_everything() -> int:
            pool = await asyncpg.create_pool(feed_db.admin_dsn, min_size=1, max_size=1)
            try:
                return await compact(pool, older_than=dt.timedelta(0))
            finally:
                await pool.close()

        assert asyncio.run(compact_everything()) >= 3000
        received = 1
        with pytest.raises(grpc.RpcError) as info:
            for _event in call:
                received += 1
        err = info.value
        assert err.code() == grpc.StatusCode.OUT_OF_RANGE, f"{err.code().name}: {err.details()}"
        details = err.details() or ""
        assert "was compacted while this Watch caught up" in details, details
        oldest = int(details.split("oldest retained is ")[1].split(":")[0])
        assert oldest > start + 3000 and received < 3000, (oldest, received)
    finally:
        call.cancel()
        channel.close()
        node.stop()
        feed_db.nodes.remove(node)


def _compaction_scenario(env: DevEnvironment, c: Clients) -> None:
    for i in range(3):
        new_customer(c.admin, f"Before Compaction {i}")

    async def horizon() -> int:
        conn = await asyncpg.connect(env.admin_dsn)
        try:
            return int(await conn.fetchval("SELECT compacted_through FROM feed_horizon"))
        finally:
            await conn.close()

    deadline = time.monotonic() + 20
    while asyncio.run(horizon()) < 2:
        assert time.monotonic() < deadline, "the node never compacted the feed"
        time.sleep(0.3)
    with c.node.channel("feed") as channel:
        feed = rpc.stub(channel, "ChangeFeedService")
        err = expect_code(lambda: next(iter(feed.Watch(pb.WatchRequest(from_sequence=1), timeout=5))),
                          grpc.StatusCode.OUT_OF_RANGE)
        oldest = int((err.details() or "").split("oldest retained is ")[1].split(":")[0])
        assert oldest > 2
        # From 0 (the oldest retained) a Watch works and starts above the horizon; a Snapshot gives a
        # point to resume from.
        after = new_customer(c.admin, "After Compaction")
        watcher = Watcher(channel, pb.WatchRequest(from_sequence=0, entity_types=[pb.ENTITY_TYPE_CUSTOMER]))
        try:
            events = watcher.wait_for(lambda ev: after.customer_id in _ids(ev))
        finally:
            watcher.close()
        assert all(e.sequence >= oldest - 1 for e in events) and "Before Compaction 0" not in str(events)
        point = next(iter(feed.Snapshot(pb.SnapshotRequest(entity_types=[pb.ENTITY_TYPE_CUSTOMER]),
                                        timeout=30))).sequence
        assert point >= after_sequence(events, after.customer_id)


def after_sequence(events: list[pb.ChangeEvent], entity_id: str) -> int:
    return next(e.sequence for e in events if e.entity_id == entity_id)
