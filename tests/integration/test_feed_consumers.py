"""The change feed end to end with several consumers at once: writers on two node processes while
three consumers follow the feed. Consumer 1 takes a Snapshot and watches on node A; consumer 2 does
the same on node B, is killed mid-run and resumes from its checkpoint on node A; consumer 3 starts
mid-run from a Snapshot. At the end every consumer's copy answers what the lookup service answers
for every touched entity, and the events the consumers received are exactly the outbox's rows."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import grpc

from devstack.demo import demo_routing
from devstack.environment import DevEnvironment
from server import rpc
from server.proto import crs_pb2 as pb
from tests.integration.support import Clients, UsedSecrets, fresh_account_number, fresh_pan, until

WAIT_S = 30.0            # generous bound on any condition (a loaded 2-core machine)
WRITES_PER_WRITER = 80   # two writers: 160 writes, ~200 feed events
# Each writer's last writes wait for consumer 3's snapshot: left running, the writers could finish
# all their writes while it was taken (a slow Snapshot on a loaded machine), and consumer 3 would
# not start mid-run at all.
HELD_BACK = 20


def _until(what: str, condition: Callable[[], bool], timeout: float = WAIT_S,
           check: Callable[[], None] = lambda: None) -> None:
    until(what, condition, timeout, check=check)


class Consumer:
    """A feed consumer as docs/feed.md describes one: a copy of every entity (from a Snapshot), then
    every Watch event applied in order, checkpointing the last sequence applied. Events are read on a
    thread; `kill()` cancels the stream the way a crashed consumer loses it, and `watch()` resumes
    from the checkpoint, on any node."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.customers: dict[str, pb.Customer] = {}
        self.accounts: dict[str, pb.Account] = {}
        self.cards: dict[str, pb.Card] = {}
        self.relationships: dict[tuple[str, str], pb.Relationship] = {}
        self.start = 0                                   # the snapshot's sequence
        self.checkpoint = 0                              # the last sequence applied (or progress mark)
        self.segments: list[list[pb.ChangeEvent]] = []   # what each Watch stream delivered, in order
        self.duplicates = 0                              # events at or below the checkpoint (not applied)
        self.error: grpc.RpcError | None = None
        self._lock = threading.Lock()
        self._call: grpc.Future | None = None
        self._thread: threading.Thread | None = None

    def snapshot(self, channel: grpc.Channel) -> None:
        chunks = list(rpc.stub(channel, "ChangeFeedService").Snapshot(pb.SnapshotRequest(), timeout=WAIT_S))
        assert chunks and chunks[-1].last, f"{self.name}: an incomplete snapshot"
        point = chunks[0].sequence
        assert all(c.sequence == point for c in chunks), f"{self.name}: a snapshot at more than one point"
        for ch in chunks:
            self.customers.update((c.customer_id, c) for c in ch.customers)
            self.accounts.update((a.account_id, a) for a in ch.accounts)
            self.cards.update((c.token, c) for c in ch.cards)
            self.relationships.update(((r.account_id, r.customer_id), r) for r in ch.relationships)
        self.start = self.checkpoint = point

    def watch(self, channel: grpc.Channel) -> None:
        assert self._thread is None or not self._thread.is_alive()
        call = rpc.stub(channel, "ChangeFeedService").Watch(pb.WatchRequest(from_sequence=self.checkpoint))
        segment: list[pb.ChangeEvent] = []
        self.segments.append(segment)
        self._call = call
        self._thread = threading.Thread(target=self._read, args=(call, segment), daemon=True,
                                        name=f"consumer-{self.name}")
        self._thread.start()

    def _read(self, call: grpc.Future, segment: list[pb.ChangeEvent]) -> None:
        try:
            for event in call:
                with self._lock:
                    segment.append(event)
                    self._apply(event)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc

    def _apply(self, event: pb.ChangeEvent) -> None:
        kind = event.WhichOneof("payload")
        if kind == "progress":
            self.checkpoint = max(self.checkpoint, event.progress.high_water_sequence)
            return
        if event.sequence <= self.checkpoint:           # delivered again after a resume: already applied
            self.duplicates += 1
            return
        if kind == "customer":
            self.customers[event.entity_id] = event.customer
        elif kind == "account":
            self.accounts[event.entity_id] = event.account
        elif kind == "card":
            self.cards[event.entity_id] = event.card
        elif kind == "relationship":
            key = (event.relationship.account_id, event.relationship.customer_id)
            if event.op == pb.OPERATION_DELETE:
                self.relationships.pop(key, None)
            else:
                self.relationships[key] = event.relationship
        self.checkpoint = event.sequence

    def at(self) -> int:
        with self._lock:
            return self.checkpoint

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"consumer {self.name}: watch ended {self.error.code().name}: "
                                 f"{self.error.details()}")

    def kill(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._thread is not None:
            self._thread.join(10)
            assert not self._thread.is_alive(), f"consumer {self.name}'s reader did not stop"

    def changes(self) -> list[pb.ChangeEvent]:
        """Every change event received, in order, over every stream (duplicates included)."""
        return [e for seg in self.segments for e in seg if e.WhichOneof("payload") != "progress"]


@dataclass
class Touched:
    """What the writers created: every id the final comparison covers."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    customers: list[str] = field(default_factory=list)
    accounts: dict[str, tuple[str, str]] = field(default_factory=dict)   # account_id -> (routing, number)
    cards: list[str] = field(default_factory=list)
    writes: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)

    def done(self) -> int:
        with self.lock:
            return self.writes

    def check(self) -> None:
        if self.errors:
            raise AssertionError(f"a writer failed: {self.errors[0]!r}") from self.errors[0]


def _writer(admin: rpc.Stub, seed: int, touched: Touched, used: UsedSecrets, stop: threading.Event,
            resume: threading.Event) -> None:
    """A mix of writes through one node: customers (its own, and the other writer's for status changes
    and joint links), accounts with an owner, cards, card and customer status changes, and joint
    holders linked and unlinked on its own accounts. The last HELD_BACK writes wait for `resume`."""
    rng = random.Random(seed)
    mine: dict[str, set[str]] = {}          # my account -> its customers (owner included)
    joint: set[tuple[str, str]] = set()     # (my account, joint customer)
    cards: dict[str, int] = {}              # my card -> its status
    suspended: set[str] = set()

    def shared_customers() -> list[str]:
        with touched.lock:
            return list(touched.customers)

    def create_customer() -> None:
        c = admin.CreateCustomer(pb.CreateCustomerRequest(display_name=f"Consumer Test {seed}-{rng.randrange(10**6)}",
                                                          segment=rng.choice(["retail", "premier"])), timeout=10)
        with touched.lock:
            touched.customers.append(c.customer_id)

    def create_account() -> None:
        owner = rng.choice(shared_customers())
        routing, number = demo_routing(rng.randrange(100)), fresh_account_number(used)
        a = admin.CreateAccount(pb.CreateAccountRequest(
            routing_number=routing, account_number=number, currency="USD", owner_customer_id=owner,
            type=rng.choice([pb.ACCOUNT_TYPE_CHECKING, pb.ACCOUNT_TYPE_SAVINGS])), timeout=10)
        mine[a.account_id] = {owner}
        with touched.lock:
            touched.accounts[a.account_id] = (routing, number)

    def issue_card() -> None:
        card = admin.IssueCard(pb.IssueCardRequest(pan=fresh_pan(used), expiry="2031-07",
                                                   account_id=rng.choice(sorted(mine))), timeout=10)
        cards[card.token] = card.status
        with touched.lock:
            touched.cards.append(card.token)

    def card_status() -> None:
        token = rng.choice(sorted(cards))
        status = pb.CARD_STATUS_ACTIVE if cards[token] == pb.CARD_STATUS_BLOCKED else pb.CARD_STATUS_BLOCKED
        cards[token] = admin.SetCardStatus(pb.SetCardStatusRequest(card_token=token, status=status), timeout=10).status

    def customer_status() -> None:
        cid = rng.choice(shared_customers())        # possibly the other writer's: two nodes, one row
        status = pb.CUSTOMER_STATUS_ACTIVE if cid in suspended else pb.CUSTOMER_STATUS_SUSPENDED
        admin.SetCustomerStatus(pb.SetCustomerStatusRequest(customer_id=cid, status=status), timeout=10)
        (suspended.discard if status == pb.CUSTOMER_STATUS_ACTIVE else suspended.add)(cid)

    def link() -> None:
        account = rng.choice(sorted(mine))
        free = [c for c in shared_customers() if c not in mine[account]]
        if not free:
            return create_customer()
        cid = rng.choice(free)
        admin.LinkCustomer(pb.LinkCustomerRequest(account_id=account, customer_id=cid,
                                                  role=pb.RELATIONSHIP_ROLE_JOINT), timeout=10)
        mine[account].add(cid)
        joint.add((account, cid))

    def unlink() -> None:
        account, cid = rng.choice(sorted(joint))
        admin.UnlinkCustomer(pb.UnlinkCustomerRequest(account_id=account, customer_id=cid), timeout=10)
        mine[account].discard(cid)
        joint.discard((account, cid))

    try:
        for n in range(WRITES_PER_WRITER):
            if n == WRITES_PER_WRITER - HELD_BACK:
                while not resume.wait(0.1):
                    if stop.is_set():
                        return
            if stop.is_set():
                return
            choices: list[tuple[Callable[[], None], int]] = [(create_customer, 2)]
            if len(shared_customers()) >= 2:
                choices += [(create_account, 3), (customer_status, 2)]
            if mine:
                choices += [(issue_card, 3), (link, 3)]
            if cards:
                choices.append((card_status, 3))
            if joint:
                choices.append((unlink, 2))
            op = rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]
            op()
            with touched.lock:
                touched.writes += 1
                touched.ops[op.__name__] = touched.ops.get(op.__name__, 0) + 1
    except BaseException as exc:   # reported by the test's main thread
        touched.errors.append(exc)
        stop.set()


def _outbox_after(env: DevEnvironment, after: int) -> dict[int, tuple[int, str]]:
    """seq -> (entity type, entity id) of every feed row above `after`."""
    async def read() -> dict[int, tuple[int, str]]:
        conn = await asyncpg.connect(env.admin_dsn)
        try:
            rows = await conn.fetch("SELECT seq, feed_type, feed_id FROM outbox WHERE seq > $1", after)
            return {r["seq"]: (r["feed_type"], r["feed_id"]) for r in rows}
        finally:
            await conn.close()
    return asyncio.run(read())


def _outbox_head(env: DevEnvironment) -> int:
    async def read() -> int:
        conn = await asyncpg.connect(env.admin_dsn)
        try:
            return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM outbox"))
        finally:
            await conn.close()
    return asyncio.run(read())


def test_writers_on_two_nodes_and_three_consumers_end_with_the_same_copy(
        dev_env: DevEnvironment, node_a: Clients, node_b: Clients, used_secrets: UsedSecrets) -> None:
    feed_a, feed_b = node_a.node.channel("feed"), node_b.node.channel("feed")
    first, second, third = Consumer("1 (node A)"), Consumer("2 (node B, killed, resumed on node A)"), \
        Consumer("3 (snapshot mid-run, node B)")
    consumers = (first, second, third)
    touched, stop, third_has_snapshot = Touched(), threading.Event(), threading.Event()
    writers = [threading.Thread(target=_writer, args=(admin, seed, touched, used_secrets, stop, third_has_snapshot),
                                daemon=True)
               for seed, admin in ((1, node_a.admin), (2, node_b.admin))]

    def healthy() -> None:
        touched.check()
        for c in consumers:
            c.check()

    try:
        first.snapshot(feed_a)
        first.watch(feed_a)
        second.snapshot(feed_b)
        second.watch(feed_b)
        start = _outbox_head(dev_env)           # every feed row above this one is the writers'
        for w in writers:
            w.start()
        total = WRITES_PER_WRITER * len(writers)

        _until("a third of the writes", lambda: touched.done() >= total // 3, check=healthy)
        second.kill()
        killed_at = second.checkpoint
        _until("half of the writes", lambda: touched.done() >= total // 2, check=healthy)
        third.snapshot(feed_b)                  # writes go on meanwhile, and the held-back ones after it
        third_has_snapshot.set()
        third.watch(feed_b)
        _until("two thirds of the writes", lambda: touched.done() >= 2 * total // 3, check=healthy)
        gap = _outbox_head(dev_env) - killed_at
        second.watch(feed_a)                    # resumed from its checkpoint, on the other node

        for w in writers:
            w.join(WAIT_S * 4)
            assert not w.is_alive(), "a writer did not finish"
        touched.check()
        last = _outbox_head(dev_env)
        _until("every consumer at the outbox's last sequence", lambda: all(c.at() >= last for c in consumers),
               check=healthy)
    finally:
        stop.set()
        for w in writers:
            w.join(WAIT_S)
        for c in consumers:
            c.kill()
        feed_a.close()
        feed_b.close()
    healthy()
    assert touched.done() == total and gap > 0
    assert first.start <= start and second.start <= start and start < third.start < last

    # Nothing missing, nothing invented: each consumer received exactly the outbox's rows after its
    # snapshot (right type and entity, strictly increasing, repeats only identical), and together
    # they received every row the writers made.
    outbox = _outbox_after(dev_env, min(c.start for c in consumers))
    for c in consumers:
        seen: dict[int, bytes] = {}
        for segment in c.segments:
            sequences = [e.sequence for e in segment if e.WhichOneof("payload") != "progress"]
            assert sequences == sorted(set(sequences)), f"consumer {c.name}: out of order or repeated in one stream"
        order: list[int] = []
        for e in c.changes():
            data = e.SerializeToString()
            if e.sequence in seen:
                assert seen[e.sequence] == data, f"consumer {c.name}: sequence {e.sequence} came again, different"
                continue
            seen[e.sequence] = data
            order.append(e.sequence)
            assert outbox.get(e.sequence) == (e.entity_type, e.entity_id), \
                f"consumer {c.name}: event {e.sequence} is not the outbox's {outbox.get(e.sequence)}"
        assert order == sorted(order), f"consumer {c.name}: sequences not strictly increasing across the resume"
        expected = {s for s in outbox if c.start < s <= last}
        missing, extra = sorted(expected - set(seen)), sorted(set(seen) - expected)
        assert not missing and not extra, f"consumer {c.name}: missing {missing[:20]}, unexpected {extra[:20]}"
    union = {e.sequence for c in consumers for e in c.changes() if e.sequence > start}
    assert union == {s for s in outbox if s > start}, "the consumers' events together are not the outbox's"
    assert len(union) > total, "fewer feed events than writes"

    # Every consumer's copy answers what the service answers, for every touched entity (a cache
    # entry may lag a write briefly: the service's answer is read again until it settles).
    def mismatches(c: Consumer) -> list[str]:
        wrong: list[str] = []

        def related(account_id: str) -> set[tuple[str, int]]:
            return {(cid, r.role) for (acc, cid), r in c.relationships.items() if acc == account_id}

        for cid in touched.customers:
            profile = node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=cid), timeout=10)
            held = {(acc, r.role) for (acc, cus), r in c.relationships.items() if cus == cid}
            accounts = {a.account.account_id for a in profile.accounts}
            if (c.customers.get(cid) != profile.customer
                    or held != {(a.account.account_id, a.role) for a in profile.accounts}
                    or any(c.accounts.get(a.account.account_id) != a.account for a in profile.accounts)
                    or {t: c.cards[t] for t in c.cards if c.cards[t].account_id in accounts}
                    != {card.token: card for card in profile.cards}):
                wrong.append(f"customer {cid}")
        for account_id, (routing, number) in touched.accounts.items():
            res = node_b.lookup.ResolveAccount(pb.ResolveAccountRequest(routing_number=routing,
                                                                        account_number=number), timeout=10)
            if (c.accounts.get(account_id) != res.account
                    or related(account_id) != {(r.customer.customer_id, r.role) for r in res.related_customers}
                    or any(c.customers.get(r.customer.customer_id) != r.customer for r in res.related_customers)):
                wrong.append(f"account {account_id}")
        for token in touched.cards:
            res = node_a.lookup.ResolveCard(pb.ResolveCardRequest(token=token), timeout=10)
            if c.cards.get(token) != res.card or c.accounts.get(res.card.account_id) != res.account:
                wrong.append(f"card {token}")
        return wrong

    assert touched.customers and touched.accounts and touched.cards
    for c in consumers:
        deadline = time.monotonic() + WAIT_S
        while (wrong := mismatches(c)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not wrong, f"consumer {c.name}'s copy differs from the service for {len(wrong)}: {wrong[:10]}"
