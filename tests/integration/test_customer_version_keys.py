"""A write that moves a customer's version (a merge or unmerge on its survivor, a record added or
changed by identification) must invalidate every cached answer that embeds the customer: its
profile, and the card and account answers of every account it is related to (their `customer` and
`related_customers` carry the version a caller sends back as expected_version). Checked on the
writer's node and on a second node, both warmed first."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from devstack.demo import demo_routing
from devstack.environment import DevEnvironment
from server.proto import crs_pb2 as pb
from tests.integration.support import Clients, UsedSecrets, sql, until
from tests.integration.test_identity import _person, _ref
from tests.integration.test_identity_merge import _account, _customer
from tests.integration.test_import import _import, _line, _row, _ssn, _write

# Well inside the Redis TTL; longer than the near-cache TTL (2 s), so that only an invalidation of
# the Redis copy makes these answers right.
BOUND_S = 3.0

def _rid() -> str:
    return "t-" + uuid.uuid4().hex

def _answers(c: Clients, pan: str, number: str) -> list[pb.Resolution]:
    card = c.lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5)
    by_token = c.lookup.ResolveCard(pb.ResolveCardRequest(token=card.card.token), timeout=5)
    account = c.lookup.ResolveAccount(pb.ResolveAccountRequest(routing_number=demo_routing(3),
                                                               account_number=number), timeout=5)
    return [card, by_token, account]

def _versions(c: Clients, customer_id: str, pan: str, number: str, alias: str = "") -> set[int]:
    """The versions of `customer_id` every answer about its account shows (and the profile asked by
    `alias`, a customer merged into it)."""
    seen = set()
    if alias:
        seen.add(c.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=alias), timeout=5).customer.version)
    for res in _answers(c, pan, number):
        seen |= {r.customer.version for r in res.related_customers if r.customer.customer_id == customer_id}
        if res.customer.customer_id == customer_id:
            seen.add(res.customer.version)
    return seen

def _check_after(env: DevEnvironment, nodes: list[Clients], customer_id: str, pan: str, number: str,
                 write: Callable[[], object], alias: str = "") -> None:
    # Earlier writes' second deletes (the relay's) done first: they must not clean up after this one.
    until("the outbox settled", lambda: not sql(env.settings().pg_dsn,
                                                "SELECT 1 FROM outbox WHERE settled_at IS NULL LIMIT 1"), 15)
    for c in nodes:   # warmed: near-cache and Redis hold the answers with the version before
        assert _versions(c, customer_id, pan, number, alias)
    write()
    now = nodes[0].lookup.GetCustomer(pb.GetCustomerRequest(customer_id=customer_id), timeout=5).customer.version
    for c in nodes:
        until(f"answers show version {now}", lambda c=c: _versions(c, customer_id, pan, number, alias) == {now},
              BOUND_S, poll=0.05)

def test_a_merge_and_an_unmerge_invalidate_the_survivors_own_accounts(
        dev_env: DevEnvironment, node_a: Clients, node_b: Clients, used_secrets: UsedSecrets) -> None:
    survivor, _ = _customer(node_a, used_secrets)
    merged, _ = _customer(node_a, used_secrets)
    _, number, pan = _account(node_a, used_secrets, survivor.customer_id)
    _account(node_a, used_secrets, merged.customer_id)
    nodes = [node_a, node_b]
    _check_after(dev_env, nodes, survivor.customer_id, pan, number, lambda: node_a.identity.MergeCustomers(
        pb.MergeCustomersRequest(request_id=_rid(), survivor_id=survivor.customer_id,
                                 merged_id=merged.customer_id), timeout=10))
    _check_after(dev_env, nodes, survivor.customer_id, pan, number, lambda: node_a.identity.UnmergeCustomer(
        pb.UnmergeCustomerRequest(request_id=_rid(), merged_id=merged.customer_id), timeout=10))

def test_identification_writes_invalidate_the_customers_accounts(
        dev_env: DevEnvironment, node_a: Clients, node_b: Clients, used_secrets: UsedSecrets) -> None:
    person = _person()
    used_secrets.identity.add(person.date_of_birth)
    ref = _ref()
    customer = node_a.admin.CreateCustomer(pb.CreateCustomerRequest(identity=person, source_ref=ref), timeout=10)
    _, number, pan = _account(node_a, used_secrets, customer.customer_id)
    nodes = [node_a, node_b]
    moved = pb.IdentityAttributes()
    moved.CopyFrom(person)
    moved.phone = "+1 212 555 0199"
    _check_after(dev_env, nodes, customer.customer_id, pan, number, lambda: node_a.identity.UpdateCustomerIdentity(
        pb.UpdateCustomerIdentityRequest(customer_id=customer.customer_id, source_ref=ref, attributes=moved),
        timeout=10))

    def same_person_again() -> None:   # another system's record of the same person: a MATCH joins it
        joined = node_a.admin.CreateCustomer(pb.CreateCustomerRequest(identity=person, source_ref=_ref("crm")),
                                             timeout=10)
        assert joined.customer_id == customer.customer_id

    _check_after(dev_env, nodes, customer.customer_id, pan, number, same_person_again)


@pytest.fixture
def operator_env(dev_env: DevEnvironment, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `crs import` reads, as tests/integration/test_import.py sets it."""
    for k, v in dev_env.keys.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CRS_PG_DSN", dev_env.operator_dsn)
    monkeypatch.setenv("CRS_REDIS_SHARDS", ",".join(f"{n}={u}" for n, u in dev_env.shard_urls().items()))


def test_a_bulk_import_row_joining_a_customer_invalidates_its_aliases_and_accounts(
        operator_env: None, dev_env: DevEnvironment, node_a: Clients, node_b: Clients, used_secrets: UsedSecrets,
        tmp_path: Path) -> None:
    row = _row(used_secrets, "B-1", national_id=_ssn(used_secrets), national_id_type="US_SSN")
    person = pb.IdentityAttributes(
        given_name=row["given_name"], family_name=row["family_name"], date_of_birth=row["date_of_birth"],
        national_id=row["national_id"], national_id_type="US_SSN",
        address=pb.PostalAddress(line1=row["address_line1"], postcode=row["postcode"], country="US"))
    customer = node_a.admin.CreateCustomer(pb.CreateCustomerRequest(identity=person, source_ref=_ref()), timeout=10)
    alias, _ = _customer(node_a, used_secrets)
    node_a.identity.MergeCustomers(pb.MergeCustomersRequest(
        request_id=_rid(), survivor_id=customer.customer_id, merged_id=alias.customer_id), timeout=10)
    _, number, pan = _account(node_a, used_secrets, customer.customer_id)
    file = _write(tmp_path / "join.csv", [_line(row)])

    def bulk_import() -> None:   # the same person from another system: the row joins the customer
        code, report, _ = _import(tmp_path, "customers", file, "bulk" + uuid.uuid4().hex[:6])
        assert code == 0 and report[0]["customer_id"] == customer.customer_id and report[0]["decision"] == "matched"

    _check_after(dev_env, [node_a, node_b], customer.customer_id, pan, number, bulk_import, alias=alias.customer_id)
