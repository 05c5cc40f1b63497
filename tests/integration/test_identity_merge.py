"""Merge, unmerge and the review queue through gRPC on the real stack: what moves, the cached answers
on two node processes (near-cache and Redis warmed first), idempotent replay, chains, conflicting
relationships, every error status, the feed, paging and decisions, and `crs identity` end to end."""

from __future__ import annotations

import random
import string
import time
import uuid
from collections.abc import Callable

import grpc
import pytest

from devstack.demo import demo_routing
from server import rpc
from server.cli.identity import render_merge
from server.cli.main import main as crs_main
from server.proto import crs_pb2 as pb
from tests.integration.support import Clients, UsedSecrets, expect_code, fresh_account_number, fresh_pan, until
from tests.integration.test_identity import _person, _ref, random_dob

STALENESS_BOUND_S = 2.0   # README "Consistency", as tests/integration/test_admin.py
# Normally an invalidation lands in milliseconds. The near-cache TTL (2 s) alone would also meet
# STALENESS_BOUND_S, so the first answers after a merge must come well before it: that is what shows
# the merge invalidated (the warmed entries are younger than 1 s when the merge commits).
INVALIDATED_S = 0.75


def _until(what: str, condition: Callable[[], bool], bound: float = STALENESS_BOUND_S) -> None:
    until(what, condition, bound, poll=0.01)


def _rid() -> str:
    return "t-" + uuid.uuid4().hex


def _customer(c: Clients, used: UsedSecrets, **over: str) -> tuple[pb.Customer, pb.SourceRef]:
    person = _person(**over)
    used.identity.add(person.date_of_birth)
    ref = _ref()
    made = c.admin.CreateCustomer(pb.CreateCustomerRequest(identity=person, source_ref=ref, force_new=True),
                                  timeout=10)
    return made, ref


def _account(c: Clients, used: UsedSecrets, owner: str) -> tuple[pb.Account, str, str]:
    number = fresh_account_number(used)
    account = c.admin.CreateAccount(pb.CreateAccountRequest(
        routing_number=demo_routing(3), account_number=number, type=pb.ACCOUNT_TYPE_CHECKING, currency="USD",
        owner_customer_id=owner), timeout=5)
    pan = fresh_pan(used)
    c.admin.IssueCard(pb.IssueCardRequest(pan=pan, expiry="2031-01", account_id=account.account_id), timeout=5)
    return account, number, pan


def _merge(c: Clients, survivor: str, merged: str, request_id: str = "") -> pb.Merge:
    reply: pb.Merge = c.identity.MergeCustomers(pb.MergeCustomersRequest(
        request_id=request_id or _rid(), survivor_id=survivor, merged_id=merged), timeout=10)
    return reply


def _unmerge(c: Clients, merged: str) -> pb.Merge:
    reply: pb.Merge = c.identity.UnmergeCustomer(pb.UnmergeCustomerRequest(request_id=_rid(), merged_id=merged),
                                                 timeout=10)
    return reply


def _golden(c: Clients, cid: str) -> pb.CustomerIdentity:
    reply: pb.CustomerIdentity = c.identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(customer_id=cid),
                                                                timeout=5)
    return reply


def _roles(c: Clients, routing: str, number: str) -> dict[str, int]:
    res = c.lookup.ResolveAccount(pb.ResolveAccountRequest(routing_number=routing, account_number=number), timeout=5)
    return {r.customer.customer_id: r.role for r in res.related_customers}


def test_merge_and_unmerge_across_nodes(node_a: Clients, node_b: Clients, used_secrets: UsedSecrets) -> None:
    survivor, _ = _customer(node_a, used_secrets)
    merged, merged_ref = _customer(node_a, used_secrets)
    acc_s, _, _ = _account(node_a, used_secrets, survivor.customer_id)
    acc_m, number_m, pan_m = _account(node_a, used_secrets, merged.customer_id)
    before = {cid: _golden(node_a, cid) for cid in (survivor.customer_id, merged.customer_id)}
    card = pb.ResolveCardRequest(pan=pan_m)
    account = pb.ResolveAccountRequest(routing_number=demo_routing(3), account_number=number_m)
    for node in (node_a, node_b):
        for _ in range(3):   # warm each node's near-cache and the Redis shard with the current answers
            assert node.lookup.ResolveCard(card, timeout=5).customer.customer_id == merged.customer_id
            assert node.lookup.ResolveAccount(account, timeout=5).customer.customer_id == merged.customer_id
            assert node.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=merged.customer_id),
                                           timeout=5).customer.customer_id == merged.customer_id
            node.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=survivor.customer_id), timeout=5)

    # Near-cache entries live 2 s from their load: let node B's expire and reload them (from Redis)
    # just before the merge, so that only an invalidation can refresh them within INVALIDATED_S.
    time.sleep(2.1)
    assert node_b.lookup.ResolveCard(card, timeout=5).customer.customer_id == merged.customer_id
    assert node_b.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=merged.customer_id), timeout=5).merged_from == ""
    rid = _rid()
    answer = _merge(node_a, survivor.customer_id, merged.customer_id, rid)
    assert answer == pb.Merge(winner_customer_id=survivor.customer_id, loser_customer_id=merged.customer_id)
    _until("node B: the card answers the survivor", lambda: node_b.lookup.ResolveCard(
        card, timeout=5).customer.customer_id == survivor.customer_id, INVALIDATED_S)
    _until("node B: the merged id answers the survivor", lambda: node_b.lookup.GetCustomer(
        pb.GetCustomerRequest(customer_id=merged.customer_id), timeout=5).merged_from == merged.customer_id,
        INVALIDATED_S)
    assert _merge(node_a, survivor.customer_id, merged.customer_id, rid) == answer   # replayed, not redone
    for node in (node_b, node_a):
        _until("card answers the survivor", lambda n=node: n.lookup.ResolveCard(  # type: ignore[misc]
            card, timeout=5).customer.customer_id == survivor.customer_id)
        _until("account answers the survivor", lambda n=node: n.lookup.ResolveAccount(  # type: ignore[misc]
            account, timeout=5).customer.customer_id == survivor.customer_id)
        _until("the merged id answers the survivor", lambda n=node: n.lookup.GetCustomer(  # type: ignore[misc]
            pb.GetCustomerRequest(customer_id=merged.customer_id), timeout=5).merged_from == merged.customer_id)
        _until("the survivor's profile holds both accounts", lambda n=node: {  # type: ignore[misc]
            a.account.account_id for a in n.lookup.GetCustomer(pb.GetCustomerRequest(
                customer_id=survivor.customer_id), timeout=5).accounts} == {acc_s.account_id, acc_m.account_id})
    alias = node_b.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=merged.customer_id), timeout=5)
    assert alias.customer.customer_id == survivor.customer_id and len(alias.accounts) == 2
    ident = _golden(node_a, merged.customer_id)
    assert ident.customer_id == survivor.customer_id and ident.merged_from == merged.customer_id
    assert list(ident.merged_ids) == [merged.customer_id] and len(ident.source_refs) == 2
    assert node_a.identity.ResolveSourceRef(merged_ref, timeout=5).customer_id == survivor.customer_id
    # A merged customer takes no writes, and is not merged twice.
    for call in (
        lambda: node_a.admin.UpdateCustomer(pb.UpdateCustomerRequest(customer_id=merged.customer_id, segment="x"),
                                            timeout=5),
        lambda: node_a.admin.SetCustomerStatus(pb.SetCustomerStatusRequest(
            customer_id=merged.customer_id, status=pb.CUSTOMER_STATUS_SUSPENDED), timeout=5),
        lambda: node_a.admin.LinkCustomer(pb.LinkCustomerRequest(account_id=acc_s.account_id,
                                                                 customer_id=merged.customer_id,
                                                                 role=pb.RELATIONSHIP_ROLE_JOINT), timeout=5),
        lambda: _account(node_a, used_secrets, merged.customer_id),
        lambda: _merge(node_a, survivor.customer_id, merged.customer_id),
    ):
        err = expect_code(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert f"merged into {survivor.customer_id}" in (err.details() or ""), err.details()
    # A profile change of the survivor reaches its alias's cached answer too.
    node_a.admin.UpdateCustomer(pb.UpdateCustomerRequest(customer_id=survivor.customer_id, segment="private"),
                                timeout=5)
    _until("the alias answer follows the survivor", lambda: node_b.lookup.GetCustomer(pb.GetCustomerRequest(
        customer_id=merged.customer_id), timeout=5).customer.segment == "private")

    time.sleep(2.1)   # as before the merge: node A's entries reloaded just before the unmerge
    assert node_a.lookup.ResolveCard(card, timeout=5).customer.customer_id == survivor.customer_id
    undone = _unmerge(node_b, merged.customer_id)
    assert undone.unmerge and undone.winner_customer_id == survivor.customer_id
    _until("node A: the card answers the merged customer again", lambda: node_a.lookup.ResolveCard(
        card, timeout=5).customer.customer_id == merged.customer_id, INVALIDATED_S)
    for node in (node_a, node_b):
        _until("card answers the merged customer again", lambda n=node: n.lookup.ResolveCard(  # type: ignore[misc]
            card, timeout=5).customer.customer_id == merged.customer_id)
        _until("the merged id answers itself", lambda n=node: n.lookup.GetCustomer(  # type: ignore[misc]
            pb.GetCustomerRequest(customer_id=merged.customer_id), timeout=5).customer.customer_id
            == merged.customer_id)
        _until("the survivor's profile is its own again", lambda n=node: [  # type: ignore[misc]
            a.account.account_id for a in n.lookup.GetCustomer(pb.GetCustomerRequest(
                customer_id=survivor.customer_id), timeout=5).accounts] == [acc_s.account_id])
    assert node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=merged.customer_id), timeout=5).merged_from == ""
    for cid, golden in before.items():   # each golden record is what it was before the merge
        assert _golden(node_a, cid) == golden
    err = expect_code(lambda: _unmerge(node_a, merged.customer_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "not merged" in (err.details() or "")


def test_chain_and_conflicting_relationship(node_a: Clients, used_secrets: UsedSecrets) -> None:
    (a, _), (b, _), (c, _) = (_customer(node_a, used_secrets) for _ in range(3))
    shared, number, _ = _account(node_a, used_secrets, b.customer_id)
    node_a.admin.LinkCustomer(pb.LinkCustomerRequest(account_id=shared.account_id, customer_id=c.customer_id,
                                                     role=pb.RELATIONSHIP_ROLE_JOINT), timeout=5)
    own_a, number_a, _ = _account(node_a, used_secrets, a.customer_id)
    routing = demo_routing(3)
    _merge(node_a, b.customer_id, a.customer_id)
    _merge(node_a, c.customer_id, b.customer_id)   # C survives; A is re-pointed to C
    assert _golden(node_a, a.customer_id).customer_id == c.customer_id
    assert set(_golden(node_a, c.customer_id).merged_ids) == {a.customer_id, b.customer_id}
    # Both B (OWNER) and C (JOINT) on one account: one row for C, with the stronger role.
    assert _roles(node_a, routing, number) == {c.customer_id: pb.RELATIONSHIP_ROLE_OWNER}
    assert _roles(node_a, routing, number_a) == {c.customer_id: pb.RELATIONSHIP_ROLE_OWNER}
    assert node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=a.customer_id),
                                     timeout=5).customer.customer_id == c.customer_id
    err = expect_code(lambda: _unmerge(node_a, a.customer_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert f"unmerge {b.customer_id} first" in (err.details() or "")
    _unmerge(node_a, b.customer_id)   # the middle one: A goes back to B, C gets its JOINT role back
    assert _roles(node_a, routing, number) == {b.customer_id: pb.RELATIONSHIP_ROLE_OWNER,
                                               c.customer_id: pb.RELATIONSHIP_ROLE_JOINT}
    assert _roles(node_a, routing, number_a) == {b.customer_id: pb.RELATIONSHIP_ROLE_OWNER}
    assert _golden(node_a, a.customer_id).customer_id == b.customer_id
    assert list(_golden(node_a, b.customer_id).merged_ids) == [a.customer_id]
    assert node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=a.customer_id),
                                     timeout=5).customer.customer_id == b.customer_id
    _unmerge(node_a, a.customer_id)
    assert _roles(node_a, routing, number_a) == {a.customer_id: pb.RELATIONSHIP_ROLE_OWNER}
    assert own_a.account_id in [x.account.account_id for x in node_a.lookup.GetCustomer(
        pb.GetCustomerRequest(customer_id=a.customer_id), timeout=5).accounts]


def test_merge_errors(node_a: Clients, used_secrets: UsedSecrets) -> None:
    (x, _), (y, _) = _customer(node_a, used_secrets), _customer(node_a, used_secrets)
    unknown = "cus_" + "0" * 20
    fp, nf, bad = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                   grpc.StatusCode.INVALID_ARGUMENT)
    expect_code(lambda: _merge(node_a, x.customer_id, x.customer_id), fp)
    expect_code(lambda: _merge(node_a, unknown, unknown), nf)    # unknown first, then "into itself"
    expect_code(lambda: _merge(node_a, x.customer_id, unknown), nf)
    expect_code(lambda: _merge(node_a, unknown, x.customer_id), nf)
    pan = fresh_pan(used_secrets)
    err = expect_code(lambda: _merge(node_a, x.customer_id, pan), bad)
    assert pan not in (err.details() or "") and "merged_id is malformed" in (err.details() or "")
    err = expect_code(lambda: _merge(node_a, "", x.customer_id), bad)
    assert "survivor_id is empty" in (err.details() or "")
    expect_code(lambda: _unmerge(node_a, x.customer_id), fp)
    expect_code(lambda: _unmerge(node_a, unknown), nf)
    expect_code(lambda: _unmerge(node_a, "nope"), bad)
    _merge(node_a, x.customer_id, y.customer_id)
    err = expect_code(lambda: _merge(node_a, y.customer_id, x.customer_id), fp)   # into an alias
    assert f"merged into {x.customer_id}" in (err.details() or "")
    rid = _rid()
    _unmerge(node_a, y.customer_id)
    _merge(node_a, x.customer_id, y.customer_id, rid)
    err = expect_code(lambda: node_a.identity.UnmergeCustomer(   # a request_id is bound to its RPC
        pb.UnmergeCustomerRequest(request_id=rid, merged_id=y.customer_id), timeout=5), grpc.StatusCode.ALREADY_EXISTS)
    expect_code(lambda: node_a.identity.DecideReviewTask(pb.DecideReviewTaskRequest(
        review_id="rev_" + "0" * 20, accept=True), timeout=5), nf)
    expect_code(lambda: node_a.identity.DecideReviewTask(pb.DecideReviewTaskRequest(review_id="x; drop"), timeout=5),
                bad)
    expect_code(lambda: node_a.identity.ListReviewTasks(pb.ListReviewTasksRequest(page_token="garbage!"), timeout=5),
                bad)
    expect_code(lambda: node_a.identity.ListReviewTasks(pb.ListReviewTasksRequest(page_size=1001), timeout=5), bad)
    expect_code(lambda: node_a.identity.ListReviewTasks(pb.ListReviewTasksRequest(status=9), timeout=5), bad)
    switch = node_a.node.channel("switch")
    try:
        expect_code(lambda: rpc.stub(switch, "IdentityService").MergeCustomers(pb.MergeCustomersRequest(
            survivor_id=x.customer_id, merged_id=y.customer_id), timeout=5), grpc.StatusCode.PERMISSION_DENIED)
    finally:
        switch.close()


def test_merge_reaches_the_feed(node_a: Clients, used_secrets: UsedSecrets) -> None:
    (s, _), (m, _) = _customer(node_a, used_secrets), _customer(node_a, used_secrets)
    account, _, _ = _account(node_a, used_secrets, m.customer_id)
    _merge(node_a, s.customer_id, m.customer_id)
    feed = rpc.stub(node_a.channel, "ChangeFeedService")
    call = feed.Watch(pb.WatchRequest(entity_types=[pb.ENTITY_TYPE_MERGE, pb.ENTITY_TYPE_RELATIONSHIP]), timeout=20)
    seen: list[pb.ChangeEvent] = []
    try:
        for event in call:
            if event.WhichOneof("payload") == "progress":
                break
            if seen or (event.WhichOneof("payload") == "merge" and event.entity_id == m.customer_id):
                seen.append(event)
            if len(seen) == 3:
                break
    finally:
        call.cancel()
    assert seen and seen[0].merge == pb.Merge(winner_customer_id=s.customer_id, loser_customer_id=m.customer_id)
    moved = [(e.op, e.relationship.account_id, e.relationship.customer_id) for e in seen[1:]]
    assert moved == [(pb.OPERATION_DELETE, account.account_id, m.customer_id),
                     (pb.OPERATION_CREATE, account.account_id, s.customer_id)]
    assert [e.sequence for e in seen] == list(range(seen[0].sequence, seen[0].sequence + 3))   # one write


def _customer_events(c: Clients, cid: str) -> list[pb.ChangeEvent]:
    """Every customer and merge event about `cid` committed so far (up to the catch-up mark)."""
    call = rpc.stub(c.channel, "ChangeFeedService").Watch(pb.WatchRequest(
        entity_types=[pb.ENTITY_TYPE_CUSTOMER, pb.ENTITY_TYPE_MERGE]), timeout=20)
    try:
        events = []
        for event in call:
            if event.WhichOneof("payload") == "progress":
                return events
            if event.entity_id == cid:
                events.append(event)
    finally:
        call.cancel()
    raise AssertionError("the Watch ended before its catch-up mark")


def _snapshot_customer(c: Clients, cid: str) -> pb.Customer:
    chunks = rpc.stub(c.channel, "ChangeFeedService").Snapshot(pb.SnapshotRequest(
        entity_types=[pb.ENTITY_TYPE_CUSTOMER]), timeout=60)
    return next(x for chunk in chunks for x in chunk.customers if x.customer_id == cid)


def test_an_alias_is_one_in_snapshots_and_the_feed_alike_and_an_unmerge_names_what_it_could_not_restore(
        node_a: Clients, used_secrets: UsedSecrets) -> None:
    """A consumer that starts from a Snapshot after a merge sees no Merge event: the merged customer
    itself says whose alias it is (merged_into), in the snapshot and in the feed's customer events,
    so copies built either way agree. An unmerge that could not give an account back (the survivor
    was unlinked from it since) says so in its answer and in its Merge event."""
    (s, _), (m, _), (owner, _) = (_customer(node_a, used_secrets) for _ in range(3))
    shared, _, _ = _account(node_a, used_secrets, owner.customer_id)
    node_a.admin.LinkCustomer(pb.LinkCustomerRequest(account_id=shared.account_id, customer_id=m.customer_id,
                                                     role=pb.RELATIONSHIP_ROLE_JOINT), timeout=5)
    _merge(node_a, s.customer_id, m.customer_id)
    merged = _snapshot_customer(node_a, m.customer_id)
    assert merged.merged_into == s.customer_id and merged.version == m.version + 1
    last = _customer_events(node_a, m.customer_id)[-1]
    assert last.WhichOneof("payload") == "customer" and last.op == pb.OPERATION_UPDATE
    assert last.customer == merged                      # the feed's copy is the snapshot's

    node_a.admin.UnlinkCustomer(pb.UnlinkCustomerRequest(account_id=shared.account_id,
                                                         customer_id=s.customer_id), timeout=5)
    answer = _unmerge(node_a, m.customer_id)
    assert list(answer.skipped_account_ids) == [shared.account_id]
    assert render_merge(answer) == (f"unmerged {m.customer_id} from {s.customer_id}; not restored (unlinked"
                                    f" from {s.customer_id} since the merge): {shared.account_id}")   # crs identity
    restored = _snapshot_customer(node_a, m.customer_id)
    assert restored.merged_into == "" and restored.version == merged.version + 1
    events = _customer_events(node_a, m.customer_id)
    assert events[-1].customer == restored
    assert events[-2].merge == answer                   # the Merge event names the account too


def _unique_person(given: str, dob: str) -> pb.IdentityAttributes:
    """Made up at run time, unlike any other test's person: its own family name, phone and postcode."""
    family = "".join(random.choices(string.ascii_lowercase, k=9)).title()
    address = pb.PostalAddress(line1=f"{random.randint(1, 999)} Orchard Lane", locality="Springfield",
                               postcode=f"{random.randint(10000, 99999)}", country="US")
    return pb.IdentityAttributes(given_name=given, family_name=family, date_of_birth=dob, address=address,
                                 phone=f"+1 202 555 {random.randint(100, 199):04d}")


def _twins(c: Clients, used: UsedSecrets) -> tuple[str, str, pb.SourceRef, pb.IdentityAttributes]:
    """Two customers alike in all but the given name: a POSSIBLE_MATCH, so a review task (the second
    customer is created, the first is its candidate). Returns both ids, the second's record."""
    dob = random_dob()
    used.identity.add(dob)
    first = _unique_person("Alice", dob)
    existing = c.admin.CreateCustomer(pb.CreateCustomerRequest(identity=first, source_ref=_ref()), timeout=10)
    twin = pb.IdentityAttributes()
    twin.CopyFrom(first)
    twin.given_name = "Beatrice"
    ref = _ref()
    second = c.admin.CreateCustomer(pb.CreateCustomerRequest(identity=twin, source_ref=ref), timeout=10)
    assert second.customer_id != existing.customer_id
    return second.customer_id, existing.customer_id, ref, twin


def _open_tasks(c: Clients) -> list[pb.ReviewTask]:
    tasks: list[pb.ReviewTask] = []
    token = ""
    while True:
        page = c.identity.ListReviewTasks(pb.ListReviewTasksRequest(page_size=1000, page_token=token), timeout=10)
        tasks += page.tasks
        if not page.next_page_token:
            return tasks
        token = page.next_page_token


def test_review_queue(node_a: Clients, used_secrets: UsedSecrets) -> None:
    made = [_twins(node_a, used_secrets) for _ in range(3)]
    pairs = {(m[0], m[1]) for m in made}
    mine = {t.customer_id: t for t in _open_tasks(node_a) if (t.customer_id, t.candidate_id) in pairs}
    assert set(mine) == {m[0] for m in made}, "each twin should have queued a review task"
    task = mine[made[0][0]]
    assert task.status == pb.REVIEW_STATUS_OPEN and task.probability > 0 and task.evidence
    assert {e.attribute for e in task.evidence} >= {"given_name", "date_of_birth"}
    # Paging: small pages walk the same tasks, in order, with none twice.
    paged: list[str] = []
    token = ""
    for _ in range(4):
        page = node_a.identity.ListReviewTasks(pb.ListReviewTasksRequest(page_size=2, page_token=token), timeout=5)
        assert len(page.tasks) <= 2
        paged += [t.review_id for t in page.tasks]
        token = page.next_page_token
        if not token:
            break
    assert paged == [t.review_id for t in _open_tasks(node_a)][:len(paged)] and len(set(paged)) == len(paged)

    accepted = node_a.identity.DecideReviewTask(pb.DecideReviewTaskRequest(
        request_id=_rid(), review_id=task.review_id, accept=True), timeout=10)
    assert accepted.status == pb.REVIEW_STATUS_ACCEPTED and accepted.HasField("decided_at")
    assert _golden(node_a, task.customer_id).customer_id == task.candidate_id   # the existing customer survives
    err = expect_code(lambda: node_a.identity.DecideReviewTask(pb.DecideReviewTaskRequest(
        review_id=task.review_id, accept=False), timeout=5), grpc.StatusCode.FAILED_PRECONDITION)
    assert "review task is already accepted" in (err.details() or "")

    other = mine[made[1][0]]
    rejected = node_a.identity.DecideReviewTask(pb.DecideReviewTaskRequest(
        request_id=_rid(), review_id=other.review_id, accept=False), timeout=10)
    assert rejected.status == pb.REVIEW_STATUS_REJECTED
    listed = node_a.identity.ListReviewTasks(pb.ListReviewTasksRequest(status=pb.REVIEW_STATUS_REJECTED,
                                                                       page_size=1000), timeout=5)
    assert other.review_id in [t.review_id for t in listed.tasks] or listed.next_page_token
    # Re-identifying the same record no longer proposes the rejected pair (it would: the earlier task
    # is closed, so nothing else stops a new one).
    _, _, ref, attrs = made[1]
    node_a.identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
        request_id=_rid(), customer_id=other.customer_id, source_ref=ref, attributes=attrs), timeout=10)
    assert not [t for t in _open_tasks(node_a) if {t.customer_id, t.candidate_id}
                == {other.customer_id, other.candidate_id}]


def test_a_review_task_a_merge_moved_is_decided_older_first_and_moves_back_on_unmerge(
        node_a: Clients, used_secrets: UsedSecrets) -> None:
    """docs/audit-2026-12-04.md, identity 6. Task (C, X): C new, X its candidate. C merged into an older
    S re-points it to (S, X); accepting it merged S, the oldest, into X (the task's "new" side always
    joined the candidate). And after C's unmerge the task stayed on S, asking about a pair nobody proposed."""
    def merge(survivor: str, merged: str) -> None:
        node_a.identity.MergeCustomers(pb.MergeCustomersRequest(request_id=_rid(), survivor_id=survivor,
                                                                merged_id=merged), timeout=10)

    older, _ = _customer(node_a, used_secrets)
    c, x, _, _ = _twins(node_a, used_secrets)
    merge(older.customer_id, c)
    task = next(t for t in _open_tasks(node_a) if {t.customer_id, t.candidate_id} == {older.customer_id, x})
    node_a.identity.DecideReviewTask(pb.DecideReviewTaskRequest(request_id=_rid(), review_id=task.review_id,
                                                                accept=True), timeout=10)
    assert _golden(node_a, x).customer_id == older.customer_id, "the older customer survives"

    other, _ = _customer(node_a, used_secrets)
    c2, x2, _, _ = _twins(node_a, used_secrets)
    task2 = next(t for t in _open_tasks(node_a) if t.customer_id == c2)
    merge(other.customer_id, c2)
    assert {t.review_id: (t.customer_id, t.candidate_id) for t in _open_tasks(node_a)}[task2.review_id] \
        == (other.customer_id, x2)
    node_a.identity.UnmergeCustomer(pb.UnmergeCustomerRequest(request_id=_rid(), merged_id=c2), timeout=10)
    assert {t.review_id: (t.customer_id, t.candidate_id) for t in _open_tasks(node_a)}[task2.review_id] == (c2, x2)


def test_cli_merge_show_unmerge(node_a: Clients, used_secrets: UsedSecrets, capsys: pytest.CaptureFixture[str]) -> None:
    (s, _), (m, ref) = _customer(node_a, used_secrets), _customer(node_a, used_secrets)
    assert node_a.node.pki is not None
    conn = ["--target", node_a.node.address, "--tls-dir", str(node_a.node.pki.directory)]
    assert crs_main(["identity", "merge", s.customer_id, m.customer_id, *conn]) == 0
    assert capsys.readouterr().out.strip() == f"merged {m.customer_id} into {s.customer_id}"
    assert crs_main(["identity", "show", "--source", f"{ref.system}:{ref.key}", *conn]) == 0
    shown = capsys.readouterr().out
    assert f"customer     {s.customer_id}" in shown and m.customer_id in shown
    assert crs_main(["identity", "show", m.customer_id, "--json", *conn]) == 0
    assert f'"merged_from": "{m.customer_id}"' in capsys.readouterr().out
    assert crs_main(["identity", "reviews", "--status", "rejected", "--page-size", "1", *conn]) == 0
    capsys.readouterr()
    assert crs_main(["identity", "unmerge", m.customer_id, *conn]) == 0
    assert "unmerged" in capsys.readouterr().out
    assert crs_main(["identity", "unmerge", m.customer_id, *conn]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


def test_merges_into_one_survivor_sharing_an_account_are_undone_last_first(node_a: Clients,
                                                                          used_secrets: UsedSecrets) -> None:
    """A (JOINT) and C (OWNER) share an account; A then C merged into B (B takes C's OWNER row). Undoing
    A's merge first carried B's row, OWNER since C's merge, away to A as JOINT, and C's unmerge then
    found nothing: the account left without an owner, its cards declined. Refused: C's first."""
    (a, _), (b, _), (c, _) = (_customer(node_a, used_secrets) for _ in range(3))
    shared, number, pan = _account(node_a, used_secrets, c.customer_id)
    node_a.admin.LinkCustomer(pb.LinkCustomerRequest(account_id=shared.account_id, customer_id=a.customer_id,
                                                     role=pb.RELATIONSHIP_ROLE_JOINT), timeout=5)
    routing = demo_routing(3)
    before = _roles(node_a, routing, number)
    _merge(node_a, b.customer_id, a.customer_id)
    _merge(node_a, b.customer_id, c.customer_id)
    assert _roles(node_a, routing, number) == {b.customer_id: pb.RELATIONSHIP_ROLE_OWNER}
    err = expect_code(lambda: _unmerge(node_a, a.customer_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert f"unmerge {c.customer_id} first" in (err.details() or "")
    assert not _unmerge(node_a, c.customer_id).skipped_account_ids
    assert not _unmerge(node_a, a.customer_id).skipped_account_ids
    assert _roles(node_a, routing, number) == before == {c.customer_id: pb.RELATIONSHIP_ROLE_OWNER,
                                                         a.customer_id: pb.RELATIONSHIP_ROLE_JOINT}
    assert node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5).in_good_standing


def test_a_merge_never_lifts_or_imposes_a_hold(node_a: Clients, used_secrets: UsedSecrets) -> None:
    """The survivor's status decides the cards' answers: merging a SUSPENDED customer into an ACTIVE one
    approved its cards. Customers of different statuses are not merged until a person aligns them."""
    (held, _), (clean, _) = (_customer(node_a, used_secrets) for _ in range(2))
    _, _, pan = _account(node_a, used_secrets, held.customer_id)
    node_a.admin.SetCustomerStatus(pb.SetCustomerStatusRequest(customer_id=held.customer_id,
                                                               status=pb.CUSTOMER_STATUS_SUSPENDED), timeout=5)
    for survivor, merged in ((clean, held), (held, clean)):
        err = expect_code(lambda s=survivor, m=merged: _merge(node_a, s.customer_id, m.customer_id),
                          grpc.StatusCode.FAILED_PRECONDITION)
        assert "statuses differ" in (err.details() or "")
    assert node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5).decision.iso8583_response_code == "57"


def test_a_merge_moves_the_survivors_version(node_a: Clients, used_secrets: UsedSecrets) -> None:
    """The survivor's accounts and golden record change with a merge (and an unmerge): its version moves,
    so a write prepared against the survivor as it was is refused (ABORTED), not applied blind."""
    (s, _), (m, _) = _customer(node_a, used_secrets), _customer(node_a, used_secrets)
    before = node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=s.customer_id), timeout=5).customer.version
    _merge(node_a, s.customer_id, m.customer_id)
    expect_code(lambda: node_a.admin.SetCustomerStatus(pb.SetCustomerStatusRequest(
        customer_id=s.customer_id, expected_version=before, status=pb.CUSTOMER_STATUS_SUSPENDED), timeout=5),
        grpc.StatusCode.ABORTED)
    merged = node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=s.customer_id), timeout=5).customer.version
    _unmerge(node_a, m.customer_id)
    after = node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=s.customer_id), timeout=5).customer.version
    assert before < merged < after
