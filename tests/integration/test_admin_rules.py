"""AdminService business rules the tenth audit (docs/audit-2026-12-04.md) found open: which state
changes are refused, with which status, and what a malformed request_id answers."""

from __future__ import annotations

import uuid

import grpc

from devstack.demo import demo_routing
from devstack.environment import DevEnvironment
from server.proto import crs_pb2 as pb
from tests.integration.support import (
    Clients,
    UsedSecrets,
    expect_code,
    fresh_account_number,
    fresh_pan,
    new_customer,
    sql,
)


def _account(c: Clients, used: UsedSecrets, owner: pb.Customer) -> pb.Account:
    reply: pb.Account = c.admin.CreateAccount(pb.CreateAccountRequest(
        routing_number=demo_routing(1), account_number=fresh_account_number(used), type=pb.ACCOUNT_TYPE_CHECKING,
        currency="USD", owner_customer_id=owner.customer_id), timeout=5)
    return reply


def _refused(call: object, code: grpc.StatusCode, message: str) -> None:
    err = expect_code(call, code)
    assert message in (err.details() or ""), f"expected {message!r} in {err.details()!r}"


def test_a_card_on_a_closed_account_is_not_activated_again(node_a: Clients, used_secrets: UsedSecrets) -> None:
    """IssueCard and LinkCard refuse a closed account; SetCardStatus ACTIVE did not: a card blocked
    before its account closed came back ACTIVE on it. Reporting it lost, stolen or closed still works
    (a pick-up code outranks the closed account's)."""
    admin = node_a.admin
    account = _account(node_a, used_secrets, new_customer(admin, "Card Holder"))
    pan = fresh_pan(used_secrets)
    card = admin.IssueCard(pb.IssueCardRequest(pan=pan, expiry="2030-01", account_id=account.account_id), timeout=5)
    blocked = admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token, status=pb.CARD_STATUS_BLOCKED),
                                  timeout=5)
    admin.CloseAccount(pb.CloseAccountRequest(account_id=account.account_id), timeout=5)
    _refused(lambda: admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token, status=pb.CARD_STATUS_ACTIVE),
                                         timeout=5),
             grpc.StatusCode.FAILED_PRECONDITION, "the card's account is closed")
    answer = node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5)
    assert answer.card.status == pb.CARD_STATUS_BLOCKED and answer.card.version == blocked.version
    for status in (pb.CARD_STATUS_LOST, pb.CARD_STATUS_STOLEN, pb.CARD_STATUS_CLOSED):
        assert admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token, status=status),
                                   timeout=5).status == status


def test_a_closed_customer_is_linked_to_no_account(node_a: Clients, used_secrets: UsedSecrets) -> None:
    """CreateAccount refuses a closed owner; LinkCustomer took a closed customer, as OWNER too."""
    admin = node_a.admin
    owner = new_customer(admin, "Open Owner")
    account = _account(node_a, used_secrets, owner)
    closed = new_customer(admin, "Closed Customer")
    admin.SetCustomerStatus(pb.SetCustomerStatusRequest(customer_id=closed.customer_id,
                                                        status=pb.CUSTOMER_STATUS_CLOSED), timeout=5)
    for role in (pb.RELATIONSHIP_ROLE_OWNER, pb.RELATIONSHIP_ROLE_JOINT):
        _refused(lambda role=role: admin.LinkCustomer(pb.LinkCustomerRequest(
            account_id=account.account_id, customer_id=closed.customer_id, role=role), timeout=5),
            grpc.StatusCode.FAILED_PRECONDITION, "customer is closed")
    profile = node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=closed.customer_id), timeout=5)
    assert not profile.accounts


def test_a_request_id_postgresql_cannot_keep_is_refused_and_audited(dev_env: DevEnvironment, node_a: Clients) -> None:
    """A NUL in a request_id failed in PostgreSQL: INTERNAL, a traceback, and no audit row (the
    refusal's own audit insert failed the same way). Control characters went into the audit log."""
    admin, run = node_a.admin, uuid.uuid4().hex[:12]
    for rid in (f"retry\x00nul-{run}", f"retry\nnewline-{run}", f"retry\x1b[31mescape-{run}"):
        _refused(lambda rid=rid: admin.CreateCustomer(pb.CreateCustomerRequest(request_id=rid, display_name="Ok"),
                                                      timeout=5),
                 grpc.StatusCode.INVALID_ARGUMENT, "request_id contains control characters")
    audited = {r["request_id"] for r in sql(dev_env.settings().pg_dsn, "SELECT request_id FROM audit_log"
                                            " WHERE request_id LIKE $1 AND result = 'INVALID_ARGUMENT'", f"%-{run}")}
    assert audited == {f"retry\ufffdnul-{run}", f"retry\ufffdnewline-{run}", f"retry\ufffd[31mescape-{run}"}


def test_a_negative_expected_version_is_an_invalid_argument(node_a: Clients, used_secrets: UsedSecrets) -> None:
    """expected_version 0 means "no check"; a negative one is no version at all: INVALID_ARGUMENT,
    not ABORTED (which tells a client to re-read and retry, for ever)."""
    admin = node_a.admin
    customer = new_customer(admin)
    account = _account(node_a, used_secrets, customer)
    card = admin.IssueCard(pb.IssueCardRequest(pan=fresh_pan(used_secrets), expiry="2030-01",
                                               account_id=account.account_id), timeout=5)
    calls = [
        lambda: admin.UpdateCustomer(pb.UpdateCustomerRequest(customer_id=customer.customer_id, expected_version=-1,
                                                              segment="x"), timeout=5),
        lambda: admin.SetAccountStatus(pb.SetAccountStatusRequest(account_id=account.account_id, expected_version=-1,
                                                                  status=pb.ACCOUNT_STATUS_FROZEN), timeout=5),
        lambda: admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token, expected_version=-1,
                                                            status=pb.CARD_STATUS_BLOCKED), timeout=5),
    ]
    for call in calls:
        _refused(call, grpc.StatusCode.INVALID_ARGUMENT, "expected_version must be")


def test_an_update_that_changes_nothing_is_refused(node_a: Clients) -> None:
    """Every field of UpdateCustomerRequest empty ("unchanged") moved the version anyway: a write that
    changed nothing made every other client's expected_version stale (ABORTED)."""
    admin = node_a.admin
    customer = new_customer(admin)
    _refused(lambda: admin.UpdateCustomer(pb.UpdateCustomerRequest(customer_id=customer.customer_id,
                                                                   expected_version=1), timeout=5),
             grpc.StatusCode.INVALID_ARGUMENT, "changes nothing")
    updated = admin.UpdateCustomer(pb.UpdateCustomerRequest(customer_id=customer.customer_id, expected_version=1,
                                                            segment="premier"), timeout=5)
    assert updated.version == 2


def test_a_blank_segment_is_no_segment(node_a: Clients) -> None:
    """display_name is stripped, segment was not: "   " was stored and answered as a customer's segment,
    and " premier " as another segment than "premier"."""
    admin = node_a.admin
    created = admin.CreateCustomer(pb.CreateCustomerRequest(display_name="Blank Segment", segment="   "), timeout=5)
    assert created.segment == "retail"
    _refused(lambda: admin.UpdateCustomer(pb.UpdateCustomerRequest(customer_id=created.customer_id, segment=" \t"),
                                          timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "segment must be 1-200")
    updated = admin.UpdateCustomer(pb.UpdateCustomerRequest(customer_id=created.customer_id, segment=" premier "),
                                   timeout=5)
    assert (updated.segment, updated.version) == ("premier", 2)


def test_a_deceased_customer_opens_no_account_and_joins_none(node_a: Clients, used_secrets: UsedSecrets) -> None:
    """A closed customer was already refused as a new account's owner; a deceased one was not, nor as
    LinkCustomer's customer: an account opened in a dead person's name. Their existing accounts keep
    them (the decision hints answer R15 / 05 for those)."""
    admin = node_a.admin
    deceased = new_customer(admin, "Late Customer")
    account = _account(node_a, used_secrets, deceased)
    admin.SetCustomerStatus(pb.SetCustomerStatusRequest(customer_id=deceased.customer_id,
                                                        status=pb.CUSTOMER_STATUS_DECEASED), timeout=5)
    number = fresh_account_number(used_secrets)
    _refused(lambda: admin.CreateAccount(pb.CreateAccountRequest(
        routing_number=demo_routing(1), account_number=number, type=pb.ACCOUNT_TYPE_CHECKING, currency="USD",
        owner_customer_id=deceased.customer_id), timeout=5),
        grpc.StatusCode.FAILED_PRECONDITION, "owner customer is deceased")
    other = _account(node_a, used_secrets, new_customer(admin, "Living Owner"))
    _refused(lambda: admin.LinkCustomer(pb.LinkCustomerRequest(
        account_id=other.account_id, customer_id=deceased.customer_id, role=pb.RELATIONSHIP_ROLE_JOINT), timeout=5),
        grpc.StatusCode.FAILED_PRECONDITION, "customer is deceased")
    profile = node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=deceased.customer_id), timeout=5)
    assert [a.account.account_id for a in profile.accounts] == [account.account_id]


def test_linking_a_customer_in_the_role_it_holds_writes_and_announces_nothing(
        dev_env: DevEnvironment, node_a: Clients, used_secrets: UsedSecrets) -> None:
    """A LinkCustomer that repeats the role already held was a write: a feed event
    `relationship.role_changed` with nothing changed, which every extract consumer acted on. Now it
    answers the relationship as it is, audited (OK_UNCHANGED), with no outbox row; a real role
    change still is one."""
    admin, dsn = node_a.admin, dev_env.settings().pg_dsn
    account = _account(node_a, used_secrets, new_customer(admin, "Owner"))
    joint = new_customer(admin, "Joint Holder")

    def link(role: int) -> pb.RelationshipResponse:
        reply: pb.RelationshipResponse = admin.LinkCustomer(pb.LinkCustomerRequest(
            request_id=str(uuid.uuid4()), account_id=account.account_id, customer_id=joint.customer_id, role=role),
            timeout=5)
        return reply

    def events() -> list[str]:
        return [r["event_type"] for r in sql(dsn, "SELECT event_type FROM outbox WHERE entity_id = $1 ORDER BY id",
                                             account.account_id)]

    first = link(pb.RELATIONSHIP_ROLE_JOINT)
    before = events()
    assert before[-1] == "relationship.linked"
    assert link(pb.RELATIONSHIP_ROLE_JOINT) == first
    assert events() == before, "a repeated link announced a change"
    audited = sql(dsn, "SELECT result, outbox_id FROM audit_log WHERE rpc = 'LinkCustomer' AND $1 = ANY(entity_ids)"
                       " ORDER BY id", account.account_id)
    assert [(r["result"], r["outbox_id"] is None) for r in audited][-2:] == [("OK", False), ("OK_UNCHANGED", True)]
    assert link(pb.RELATIONSHIP_ROLE_AUTHORIZED_SIGNER).role == pb.RELATIONSHIP_ROLE_AUTHORIZED_SIGNER
    assert events() == [*before, "relationship.role_changed"]


def test_a_lost_or_stolen_card_is_final(node_a: Clients, used_secrets: UsedSecrets) -> None:
    """A card reported lost or stolen is hot-carded: a new card replaces it (server/store/lifecycle.py).
    SetCardStatus set it ACTIVE again, and whoever held the old plastic had a working card (answered
    "00"). Lost may still become stolen, and either closed; BLOCKED stays the reversible hold."""
    admin, lookup = node_a.admin, node_a.lookup
    account = _account(node_a, used_secrets, new_customer(admin, "Card Holder"))
    pan = fresh_pan(used_secrets)
    card = admin.IssueCard(pb.IssueCardRequest(pan=pan, expiry="2030-01", account_id=account.account_id), timeout=5)

    def set_status(status: int) -> pb.Card:
        reply: pb.Card = admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token, status=status), timeout=5)
        return reply

    for status in (pb.CARD_STATUS_BLOCKED, pb.CARD_STATUS_ACTIVE, pb.CARD_STATUS_LOST, pb.CARD_STATUS_LOST):
        assert set_status(status).status == status      # a hold comes and goes; lost again is no change of state
    for status in (pb.CARD_STATUS_ACTIVE, pb.CARD_STATUS_BLOCKED):
        _refused(lambda status=status: set_status(status), grpc.StatusCode.FAILED_PRECONDITION,
                 "card was reported lost; it may only be reported stolen or closed: issue a new card")
    answer = lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5)
    assert answer.card.status == pb.CARD_STATUS_LOST and not answer.in_good_standing
    assert set_status(pb.CARD_STATUS_STOLEN).status == pb.CARD_STATUS_STOLEN
    for status in (pb.CARD_STATUS_ACTIVE, pb.CARD_STATUS_BLOCKED, pb.CARD_STATUS_LOST):
        _refused(lambda status=status: set_status(status), grpc.StatusCode.FAILED_PRECONDITION,
                 "card was reported stolen; it may only be closed: issue a new card")
    assert lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5).card.status == pb.CARD_STATUS_STOLEN
    assert set_status(pb.CARD_STATUS_CLOSED).status == pb.CARD_STATUS_CLOSED
