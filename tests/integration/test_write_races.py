"""Writes that overlap: each test drives a real interleaving on the shared stack, a side transaction
(admin DSN) holding one lock for a moment so that two RPCs overlap every time (docs/decisions.md,
"Lock order")."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc
import pytest

from devstack.demo import demo_routing
from devstack.environment import DevEnvironment
from server.proto import crs_pb2 as pb
from server.store.envelope import FEED_LOCK
from tests.integration.support import Clients, UsedSecrets, fresh_account_number, fresh_pan, sql
from tests.integration.test_identity import _person, _ref


class Side:
    """A transaction on its own connection, in its own thread: runs `statements`, then holds until release()."""

    def __init__(self, dsn: str, statements: list[tuple[str, tuple[Any, ...]]], commit: bool = False) -> None:
        self.dsn, self.statements, self.commit = dsn, statements, commit
        self.ready, self.go = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            tr = conn.transaction()
            await tr.start()
            for q, args in self.statements:
                await conn.execute(q, *args)
            self.ready.set()
            await asyncio.to_thread(self.go.wait)
            await (tr.commit() if self.commit else tr.rollback())
        finally:
            await conn.close()

    def release(self) -> None:
        self.go.set()
        self.thread.join(10)


Outcome = dict[str, Any]   # {"ok": the answer} or {"err": (status code name, details)}


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, Outcome]:
    out: Outcome = {}

    def run() -> None:
        try:
            out["ok"] = call()
        except grpc.RpcError as exc:
            out["err"] = (exc.code().name, exc.details())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def overlap(side: Side, first: Callable[[], Any], second: Callable[[], Any], *, settle: float = 0.5,
            first_waits: str = "", hold: float = 0.7,
            while_held: Callable[[Outcome, Outcome], None] | None = None) -> tuple[Outcome, Outcome]:
    """`first`, then `second` once `first` waits on the side's lock: when a backend waits on a lock of
    kind `first_waits` (pg_stat_activity's wait_event: "advisory", "transactionid"), else `settle`
    later, where the order does not decide the outcome (a fixed wait can be too short on a
    busy machine: `second` came first). The side released `hold` after that (`while_held` checks the
    outcomes so far just before), both outcomes once both ended."""
    t1, r1 = in_thread(first)
    if first_waits:
        _until(lambda: _waiting(side.dsn, first_waits))
    else:
        time.sleep(settle)
    t2, r2 = in_thread(second)
    time.sleep(hold)
    if while_held is not None:
        while_held(r1, r2)
    side.release()
    t1.join(15), t2.join(15)
    return r1, r2


def code(outcome: Outcome) -> str:
    return str(outcome.get("err", ("",))[0])


def _rid() -> str:
    return "race-" + uuid.uuid4().hex


def _account(c: Clients, used: UsedSecrets, owner: str) -> tuple[pb.Account, str]:
    number = fresh_account_number(used)
    acc = c.admin.CreateAccount(pb.CreateAccountRequest(
        request_id=_rid(), routing_number=demo_routing(3), account_number=number, type=pb.ACCOUNT_TYPE_CHECKING,
        currency="USD", owner_customer_id=owner), timeout=5)
    return acc, number


def _plain_customer(c: Clients) -> pb.Customer:
    return c.admin.CreateCustomer(pb.CreateCustomerRequest(request_id=_rid(), display_name="Audit Person"), timeout=5)


def _identity_customer(c: Clients, used: UsedSecrets) -> tuple[pb.Customer, pb.IdentityAttributes]:
    person = _person()
    used.identity.add(person.date_of_birth)
    made = c.admin.CreateCustomer(pb.CreateCustomerRequest(request_id=_rid(), identity=person, source_ref=_ref(),
                                                           force_new=True), timeout=10)
    return made, person


# A retry that overlaps its original waits for it and gets the original's answer.
def test_a_retry_overlapping_its_issue_card_is_replayed(dev_env: DevEnvironment, node_a: Clients,
                                                        used_secrets: UsedSecrets) -> None:
    owner = _plain_customer(node_a)
    acc, _ = _account(node_a, used_secrets, owner.customer_id)
    req = pb.IssueCardRequest(request_id=_rid(), pan=fresh_pan(used_secrets), expiry="2031-01",
                              account_id=acc.account_id)
    side = Side(dev_env.admin_dsn, [("SELECT pg_advisory_xact_lock($1)", (FEED_LOCK,))])   # commit of the 1st waits
    r1, r2 = overlap(side, lambda: node_a.admin.IssueCard(req, timeout=15),
                     lambda: node_a.admin.IssueCard(req, timeout=15))   # the client's retry, same request
    assert "ok" in r1 and "ok" in r2 and r1["ok"].token == r2["ok"].token, (r1, r2)


def test_a_retry_overlapping_its_merge_is_replayed(dev_env: DevEnvironment, node_a: Clients,
                                                   used_secrets: UsedSecrets) -> None:
    s, _ = _identity_customer(node_a, used_secrets)
    m, _ = _identity_customer(node_a, used_secrets)
    req = pb.MergeCustomersRequest(request_id=_rid(), survivor_id=s.customer_id, merged_id=m.customer_id)
    side = Side(dev_env.admin_dsn, [("SELECT pg_advisory_xact_lock($1)", (FEED_LOCK,))])
    r1, r2 = overlap(side, lambda: node_a.identity.MergeCustomers(req, timeout=15),
                     lambda: node_a.identity.MergeCustomers(req, timeout=15))
    assert "ok" in r1 and "ok" in r2, (r1, r2)


# A card issued while its owner's status changes: the issue waits for the status change (the account
# is locked FOR SHARE by it), so the card's first answer already carries the new status.
def test_a_card_issued_during_its_customers_suspension_answers_suspended(
        dev_env: DevEnvironment, node_a: Clients, used_secrets: UsedSecrets) -> None:
    owner = _plain_customer(node_a)
    acc, _ = _account(node_a, used_secrets, owner.customer_id)
    hold = _rid()
    # The suspension's own idempotency insert waits on this uncommitted row, after its stale keys are found
    # (the same client and request_id: migration 0017 keys them together).
    side = Side(dev_env.admin_dsn, [("INSERT INTO idempotency (request_id, rpc, response, client_id)"
                                     " VALUES ($1, 'x', '', 'admin')", (hold,))])
    pan = fresh_pan(used_secrets)

    def issue_waited(_r1: Outcome, r2: Outcome) -> None:
        assert "ok" not in r2, "the card was issued while its customer's status change was uncommitted"

    r1, r2 = overlap(side, lambda: node_a.admin.SetCustomerStatus(pb.SetCustomerStatusRequest(
        request_id=hold, customer_id=owner.customer_id, status=pb.CUSTOMER_STATUS_SUSPENDED), timeout=15),
                     lambda: node_a.admin.IssueCard(pb.IssueCardRequest(
                         request_id=_rid(), pan=pan, expiry="2031-01", account_id=acc.account_id), timeout=15),
                     # longer than the re-invalidation delay: the old code cached the card ACTIVE here
                     first_waits="transactionid", hold=1.5, while_held=issue_waited)
    assert "ok" in r1 and "ok" in r2, (r1, r2)
    time.sleep(3.0)   # > near-cache TTL (2 s) and the relay's second delete (0.5 s)
    later = node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5)
    assert later.customer.status == pb.CUSTOMER_STATUS_SUSPENDED and not later.in_good_standing


# DecideReviewTask(accept) locks the customers before the task, as a merge does: no deadlock.
def test_accepting_a_review_beside_a_merge_is_no_internal_error(dev_env: DevEnvironment, node_a: Clients,
                                                                used_secrets: UsedSecrets) -> None:
    x, _ = _identity_customer(node_a, used_secrets)
    y, _ = _identity_customer(node_a, used_secrets)
    z, _ = _identity_customer(node_a, used_secrets)
    _account(node_a, used_secrets, x.customer_id)
    review = "rev_" + uuid.uuid4().hex[:20]
    sql(dev_env.admin_dsn, "INSERT INTO identity_reviews (review_id, customer_id, candidate_id, probability, evidence,"
        " status) VALUES ($1, $2, $3, 0.9, '[]', 1)", review, x.customer_id, y.customer_id)
    side = Side(dev_env.admin_dsn, [("SELECT 1 FROM account_customers WHERE customer_id = $1 FOR UPDATE",
                                     (x.customer_id,))])
    merged, decided = overlap(side, lambda: node_a.identity.MergeCustomers(pb.MergeCustomersRequest(
        request_id=_rid(), survivor_id=z.customer_id, merged_id=x.customer_id), timeout=15),
                              lambda: node_a.identity.DecideReviewTask(pb.DecideReviewTaskRequest(
                                  request_id=_rid(), review_id=review, accept=True), timeout=15), hold=0.5)
    assert "INTERNAL" not in (code(merged), code(decided)), (merged, decided)


# A record matched to a customer whose merge commits before the record's write locks it joins the
# survivor (live_customer follows merged_into), never the merged customer.
def test_a_record_matched_to_a_customer_being_merged_joins_the_survivor(dev_env: DevEnvironment, node_a: Clients,
                                                                         used_secrets: UsedSecrets) -> None:
    x, person = _identity_customer(node_a, used_secrets)
    y, _ = _identity_customer(node_a, used_secrets)
    ref = _ref("branch")
    # The merge takes x first and waits here; the create matches x meanwhile and waits behind the merge.
    side = Side(dev_env.admin_dsn, [("SELECT 1 FROM customers WHERE customer_id = $1 FOR UPDATE", (x.customer_id,))])
    merged, created = overlap(side, lambda: node_a.identity.MergeCustomers(pb.MergeCustomersRequest(
        request_id=_rid(), survivor_id=y.customer_id, merged_id=x.customer_id), timeout=15),
                              lambda: node_a.admin.CreateCustomer(pb.CreateCustomerRequest(
                                  request_id=_rid(), identity=person, source_ref=ref), timeout=15),
                              first_waits="transactionid")
    assert "ok" in merged and "ok" in created, (merged, created)
    assert created["ok"].customer_id == y.customer_id
    owner = sql(dev_env.admin_dsn, "SELECT customer_id FROM source_records WHERE source_system = $1"
                " AND source_key = $2", ref.system, ref.key)
    assert [r["customer_id"] for r in owner] == [y.customer_id], "the record joined the merged customer"


# LinkCustomer may not demote an account's only owner (UnlinkCustomer may not remove it).
def test_link_customer_refuses_to_demote_the_only_owner(dev_env: DevEnvironment, node_a: Clients,
                                                         used_secrets: UsedSecrets) -> None:
    owner = _plain_customer(node_a)
    acc, _ = _account(node_a, used_secrets, owner.customer_id)
    with pytest.raises(grpc.RpcError) as refused:
        node_a.admin.LinkCustomer(pb.LinkCustomerRequest(request_id=_rid(), account_id=acc.account_id,
                                                         customer_id=owner.customer_id,
                                                         role=pb.RELATIONSHIP_ROLE_AUTHORIZED_SIGNER), timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    roles = sql(dev_env.admin_dsn, "SELECT role FROM account_customers WHERE account_id = $1", acc.account_id)
    assert any(r["role"] == pb.RELATIONSHIP_ROLE_OWNER for r in roles), "account left without an owner"


# Two creates of one source reference with different attributes (no shared blocking key).
def test_two_creates_of_one_source_ref_answer_already_exists(dev_env: DevEnvironment, node_a: Clients,
                                                             used_secrets: UsedSecrets) -> None:
    ref = _ref("core")
    p1, p2 = _person(given_name="Wilhelmina"), _person(given_name="Bartholomew", phone="+1 212 555 0199")
    used_secrets.identity.update({p1.date_of_birth, p2.date_of_birth})
    side = Side(dev_env.admin_dsn, [("SELECT pg_advisory_xact_lock($1)", (FEED_LOCK,))])
    r1, r2 = overlap(side, lambda: node_a.admin.CreateCustomer(pb.CreateCustomerRequest(
        request_id=_rid(), identity=p1, source_ref=ref), timeout=15),
                     lambda: node_a.admin.CreateCustomer(pb.CreateCustomerRequest(
                         request_id=_rid(), identity=p2, source_ref=ref), timeout=15), first_waits="advisory")
    assert "ok" in r1, r1
    assert code(r2) == "ALREADY_EXISTS", r2


# UnlinkCustomer takes the customer, then the account, as a merge does: no deadlock.
def test_unlinking_beside_a_merge_is_no_internal_error(dev_env: DevEnvironment, node_a: Clients,
                                                       used_secrets: UsedSecrets) -> None:
    c1, _ = _identity_customer(node_a, used_secrets)
    c2, _ = _identity_customer(node_a, used_secrets)
    s, m = sorted([c1.customer_id, c2.customer_id])        # the survivor sorts first on the account
    t = _plain_customer(node_a)
    acc, _ = _account(node_a, used_secrets, s)
    for cid in (m, t.customer_id):
        node_a.admin.LinkCustomer(pb.LinkCustomerRequest(request_id=_rid(), account_id=acc.account_id,
                                                         customer_id=cid, role=pb.RELATIONSHIP_ROLE_JOINT), timeout=5)
    side = Side(dev_env.admin_dsn, [("SELECT 1 FROM account_customers WHERE account_id = $1 AND customer_id = $2"
                                     " FOR UPDATE", (acc.account_id, m))])
    merged, unlinked = overlap(side, lambda: node_a.identity.MergeCustomers(pb.MergeCustomersRequest(
        request_id=_rid(), survivor_id=s, merged_id=m), timeout=15),
                               lambda: node_a.admin.UnlinkCustomer(pb.UnlinkCustomerRequest(
                                   request_id=_rid(), account_id=acc.account_id, customer_id=t.customer_id),
                                   timeout=15), hold=0.5)
    assert "INTERNAL" not in (code(merged), code(unlinked)), (merged, unlinked)


# UpdateCustomerIdentity's answer is kept for replays sealed (address, phone, email).
def test_update_identity_answer_is_stored_sealed(dev_env: DevEnvironment, node_a: Clients,
                                                 used_secrets: UsedSecrets) -> None:
    c, person = _identity_customer(node_a, used_secrets)
    ref = sql(dev_env.admin_dsn, "SELECT source_system, source_key FROM source_records WHERE customer_id = $1",
              c.customer_id)[0]
    rid = _rid()
    node_a.identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
        request_id=rid, customer_id=c.customer_id, source_ref=pb.SourceRef(system=ref["source_system"],
                                                                           key=ref["source_key"]),
        attributes=person), timeout=10)
    row = sql(dev_env.admin_dsn, "SELECT response, answer_dek_id FROM idempotency WHERE request_id = $1", rid)[0]
    assert row["answer_dek_id"] is not None
    for clear in (person.email, person.phone, person.address.line1):
        assert clear and clear.encode() not in bytes(row["response"])
    # A retry is answered the stored answer, opened again
    again = node_a.identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
        request_id=rid, customer_id=c.customer_id, source_ref=pb.SourceRef(system=ref["source_system"],
                                                                           key=ref["source_key"]),
        attributes=person), timeout=10)
    assert again.attributes.email == person.email and again.customer_id == c.customer_id


# Two records joining one customer at once (two imports, or an import beside an online create, which
# share no blocking-key lock): each locked the customer FOR SHARE, then raised its version, which needs
# the row for update: each waited on the other's share lock, and PostgreSQL aborted one (deadlock).
def test_two_records_joining_one_customer_at_once_both_commit(dev_env: DevEnvironment, node_a: Clients) -> None:
    from server.store.identity_writes import live_customer

    cid = _plain_customer(node_a).customer_id

    async def join(arrived: asyncio.Event, other: asyncio.Event) -> str:
        conn = await asyncpg.connect(dev_env.admin_dsn)
        try:
            async with conn.transaction():
                joined = await live_customer(conn, cid)
                arrived.set()
                with contextlib.suppress(TimeoutError):   # both hold the customer now, or the other waits for it
                    async with asyncio.timeout(1.5):
                        await other.wait()
                await conn.execute("UPDATE customers SET version = version + 1 WHERE customer_id = $1", joined)
                return joined
        finally:
            await conn.close()

    async def both() -> list[str]:
        a, b = asyncio.Event(), asyncio.Event()
        return list(await asyncio.gather(join(a, b), join(b, a)))

    before = sql(dev_env.admin_dsn, "SELECT version FROM customers WHERE customer_id = $1", cid)[0]["version"]
    assert asyncio.run(both()) == [cid, cid]
    after = sql(dev_env.admin_dsn, "SELECT version FROM customers WHERE customer_id = $1", cid)[0]["version"]
    assert after == before + 2


def _waiting(dsn: str, event: str) -> list[str]:
    """The queries of the backends waiting on a lock of this kind now (pg_stat_activity's wait_event)."""
    return [r["query"] for r in sql(dsn, "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                         " AND wait_event = $1", event)]


def _until(what: Callable[[], list[str]], within: float = 10.0) -> list[str]:
    deadline = time.monotonic() + within
    while not (found := what()):
        assert time.monotonic() < deadline, "nothing waited as expected"
        time.sleep(0.05)
    return found


def test_a_merge_cannot_commit_between_a_card_writes_alias_read_and_its_commit(
        dev_env: DevEnvironment, node_a: Clients, used_secrets: UsedSecrets) -> None:
    """A card write lists its account's customers and their aliases (a merged id answers its survivor's
    profile, which embeds the card) among the keys it invalidates; a merge into the account's owner
    adds an alias. Were the merge to commit between that read and the card write's commit, nobody
    would invalidate the new alias's profile, filled meanwhile with the card's old status. The card
    write holds the account FOR SHARE from before its read to its commit, and the merge locks the
    survivor's accounts FOR NO KEY UPDATE before its own changes: held at FEED_LOCK after its read,
    the card write must make the merge wait on the account's row (not on FEED_LOCK, as any write
    would), and the merge then lists what the card write changed."""
    survivor, _ = _identity_customer(node_a, used_secrets)
    merged, _ = _identity_customer(node_a, used_secrets)
    acc, _ = _account(node_a, used_secrets, survivor.customer_id)
    card = node_a.admin.IssueCard(pb.IssueCardRequest(request_id=_rid(), pan=fresh_pan(used_secrets),
                                                      expiry="2031-01", account_id=acc.account_id), timeout=5)
    dsn = dev_env.admin_dsn
    side = Side(dsn, [("SELECT pg_advisory_xact_lock($1)", (FEED_LOCK,))])
    try:
        t1, r1 = in_thread(lambda: node_a.admin.SetCardStatus(pb.SetCardStatusRequest(
            request_id=_rid(), card_token=card.token, status=pb.CARD_STATUS_BLOCKED), timeout=15))
        assert len(_until(lambda: _waiting(dsn, "advisory"))) == 1     # the card write, its keys read
        t2, r2 = in_thread(lambda: node_a.identity.MergeCustomers(pb.MergeCustomersRequest(
            request_id=_rid(), survivor_id=survivor.customer_id, merged_id=merged.customer_id), timeout=15))
        on_row = _until(lambda: _waiting(dsn, "transactionid"))
        assert any("accounts" in q for q in on_row), on_row             # the merge, on the account's row
        time.sleep(0.3)
        assert len(_waiting(dsn, "advisory")) == 1, "the merge got past the card write's account"
        assert not r2
    finally:
        side.release()
    t1.join(15), t2.join(15)
    assert "ok" in r1 and "ok" in r2, (r1, r2)
    last = {r["entity_id"]: r["id"] for r in sql(dsn, "SELECT entity_id, max(id) AS id FROM outbox"
                                                      " WHERE entity_id = ANY($1::text[]) GROUP BY entity_id",
                                                 [card.token, survivor.customer_id])}
    assert last[card.token] < last[survivor.customer_id], last      # the card write committed first
