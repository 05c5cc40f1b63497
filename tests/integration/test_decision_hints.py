"""Decision hints through gRPC (docs/decision-hints.md): every card and account state, the precedence
rules, error hints as google.rpc.ErrorInfo for unary calls and as LookupResult.decision for batch and
stream, and the per-network code substitution configured on a node."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from devstack.demo import demo_routing
from devstack.environment import DevEnvironment
from server.proto import crs_pb2 as pb
from server.store import bins as bin_store
from tests.integration.support import Clients, UsedSecrets, clients_of, expect_code, fresh_account_number, fresh_pan


def _error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)   # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo in the status details")


class Card:
    """A customer, an account and a card, put into the states asked for before the first lookup."""

    def __init__(self, c: Clients, used: UsedSecrets, *, card: int = pb.CARD_STATUS_ACTIVE, expiry: str = "2031-01",
                 account: int = pb.ACCOUNT_STATUS_OPEN, owner: int = pb.CUSTOMER_STATUS_ACTIVE,
                 account_type: int = pb.ACCOUNT_TYPE_CHECKING, joint: int | None = None, pan: str = "") -> None:
        admin = c.admin
        self.customer = admin.CreateCustomer(pb.CreateCustomerRequest(display_name="Hint Holder"), timeout=5)
        self.routing, self.number = demo_routing(3), fresh_account_number(used)
        self.account = admin.CreateAccount(pb.CreateAccountRequest(
            routing_number=self.routing, account_number=self.number, type=account_type, currency="USD",
            owner_customer_id=self.customer.customer_id), timeout=5)
        self.pan = pan or fresh_pan(used)
        self.card = admin.IssueCard(pb.IssueCardRequest(pan=self.pan, expiry=expiry,
                                                        account_id=self.account.account_id), timeout=5)
        if joint is not None:
            other = admin.CreateCustomer(pb.CreateCustomerRequest(display_name="Joint Holder"), timeout=5)
            admin.LinkCustomer(pb.LinkCustomerRequest(account_id=self.account.account_id,
                                                      customer_id=other.customer_id,
                                                      role=pb.RELATIONSHIP_ROLE_JOINT), timeout=5)
            admin.SetCustomerStatus(pb.SetCustomerStatusRequest(customer_id=other.customer_id, status=joint),
                                    timeout=5)
        if card != pb.CARD_STATUS_ACTIVE:
            admin.SetCardStatus(pb.SetCardStatusRequest(card_token=self.card.token, status=card), timeout=5)
        if account != pb.ACCOUNT_STATUS_OPEN:
            admin.SetAccountStatus(pb.SetAccountStatusRequest(account_id=self.account.account_id, status=account),
                                   timeout=5)
        if owner != pb.CUSTOMER_STATUS_ACTIVE:
            admin.SetCustomerStatus(pb.SetCustomerStatusRequest(customer_id=self.customer.customer_id, status=owner),
                                    timeout=5)

    def by_pan(self, c: Clients) -> pb.DecisionHint:
        return c.lookup.ResolveCard(pb.ResolveCardRequest(pan=self.pan), timeout=5).decision

    def by_account(self, c: Clients) -> pb.DecisionHint:
        return c.lookup.ResolveAccount(pb.ResolveAccountRequest(routing_number=self.routing,
                                                                account_number=self.number), timeout=5).decision


def test_card_hints_state_by_state_and_precedence(node_a: Clients, used_secrets: UsedSecrets) -> None:
    cases = [
        ({}, "00", "APPROVED"),
        ({"card": pb.CARD_STATUS_STOLEN}, "43", "CARD_STOLEN"),
        ({"card": pb.CARD_STATUS_LOST}, "41", "CARD_LOST"),
        ({"expiry": "2020-01"}, "54", "CARD_EXPIRED"),
        ({"card": pb.CARD_STATUS_BLOCKED}, "62", "CARD_BLOCKED"),
        ({"card": pb.CARD_STATUS_CLOSED}, "05", "CARD_CLOSED"),
        ({"account": pb.ACCOUNT_STATUS_CLOSED}, "46", "ACCOUNT_CLOSED"),
        ({"account": pb.ACCOUNT_STATUS_FROZEN}, "05", "ACCOUNT_FROZEN"),
        ({"owner": pb.CUSTOMER_STATUS_SUSPENDED}, "57", "CUSTOMER_SUSPENDED"),
        ({"owner": pb.CUSTOMER_STATUS_DECEASED}, "05", "CUSTOMER_DECEASED"),
        ({"owner": pb.CUSTOMER_STATUS_CLOSED}, "05", "CUSTOMER_CLOSED"),
        ({"account": pb.ACCOUNT_STATUS_DORMANT}, "05", "ACCOUNT_DORMANT"),
        # Precedence: a stolen card on a closed account is picked up; expired beats blocked.
        ({"card": pb.CARD_STATUS_STOLEN, "account": pb.ACCOUNT_STATUS_CLOSED}, "43", "CARD_STOLEN"),
        ({"card": pb.CARD_STATUS_BLOCKED, "expiry": "2020-01"}, "54", "CARD_EXPIRED"),
        ({"card": pb.CARD_STATUS_BLOCKED, "owner": pb.CUSTOMER_STATUS_SUSPENDED}, "62", "CARD_BLOCKED"),
    ]
    made = []
    for states, code, reason in cases:
        card = Card(node_a, used_secrets, **states)   # type: ignore[arg-type]
        hint = card.by_pan(node_a)
        assert (hint.iso8583_response_code, hint.reason, hint.nacha_return_code) == (code, reason, ""), states
        assert hint.table_version
        made.append((card, code, reason))
    # The same hints by token, and in batch and stream answers (the cached Resolution carries them).
    keys = [pb.LookupKey(pan=c.pan, correlation_id=f"p{i}") for i, (c, _, _) in enumerate(made)]
    keys += [pb.LookupKey(card_token=c.card.token, correlation_id=f"t{i}") for i, (c, _, _) in enumerate(made)]
    batch = {r.correlation_id: r for r in node_a.lookup.BatchResolve(pb.BatchResolveRequest(keys=keys),
                                                                      timeout=5).results}
    streamed = {r.correlation_id: r for r in node_a.lookup.StreamResolve(iter(keys), timeout=10)}
    for results in (batch, streamed):
        for i, (_, code, reason) in enumerate(made):
            for kind in "pt":
                got = results[f"{kind}{i}"].resolution.decision
                assert (got.iso8583_response_code, got.reason) == (code, reason)


def test_account_hints_state_by_state_and_precedence(node_a: Clients, used_secrets: UsedSecrets) -> None:
    cases = [
        ({}, "", "APPROVED"),
        ({"account": pb.ACCOUNT_STATUS_CLOSED}, "R02", "ACCOUNT_CLOSED"),
        ({"owner": pb.CUSTOMER_STATUS_DECEASED}, "R15", "ACCOUNT_HOLDER_DECEASED"),
        ({"joint": pb.CUSTOMER_STATUS_DECEASED}, "R14", "REPRESENTATIVE_PAYEE_DECEASED"),
        ({"account": pb.ACCOUNT_STATUS_FROZEN}, "R16", "ACCOUNT_FROZEN"),
        ({"account": pb.ACCOUNT_STATUS_DORMANT}, "R16", "ACCOUNT_DORMANT"),
        ({"owner": pb.CUSTOMER_STATUS_SUSPENDED}, "R16", "CUSTOMER_SUSPENDED"),
        ({"account_type": pb.ACCOUNT_TYPE_CREDIT}, "R20", "NON_TRANSACTION_ACCOUNT"),
        ({"owner": pb.CUSTOMER_STATUS_CLOSED}, "R03", "CUSTOMER_CLOSED"),
        ({"account": pb.ACCOUNT_STATUS_CLOSED, "owner": pb.CUSTOMER_STATUS_DECEASED}, "R02", "ACCOUNT_CLOSED"),
        ({"account": pb.ACCOUNT_STATUS_FROZEN, "owner": pb.CUSTOMER_STATUS_DECEASED}, "R15",
         "ACCOUNT_HOLDER_DECEASED"),
        ({"account": pb.ACCOUNT_STATUS_FROZEN, "account_type": pb.ACCOUNT_TYPE_CREDIT}, "R16", "ACCOUNT_FROZEN"),
    ]
    made = []
    for states, code, reason in cases:
        card = Card(node_a, used_secrets, **states)   # type: ignore[arg-type]
        hint = card.by_account(node_a)
        assert (hint.nacha_return_code, hint.reason, hint.iso8583_response_code) == (code, reason, ""), states
        made.append((card, code, reason))
    keys = [pb.LookupKey(account=pb.AccountKey(routing_number=c.routing, account_number=c.number),
                         correlation_id=str(i)) for i, (c, _, _) in enumerate(made)]
    batch = node_a.lookup.BatchResolve(pb.BatchResolveRequest(keys=keys), timeout=5).results
    streamed = {r.correlation_id: r for r in node_a.lookup.StreamResolve(iter(keys), timeout=10)}
    for i, (_, code, reason) in enumerate(made):
        for result in (batch[i], streamed[str(i)]):
            assert (result.resolution.decision.nacha_return_code, result.resolution.decision.reason) == (code, reason)


def test_error_hints_unary_batch_and_stream(node_a: Clients, used_secrets: UsedSecrets) -> None:
    unknown_pan = fresh_pan(used_secrets)
    err = expect_code(lambda: node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=unknown_pan), timeout=5),
                      grpc.StatusCode.NOT_FOUND)
    info = _error_info(err)
    assert (info.reason, info.domain, info.metadata["iso8583_response_code"]) == ("CARD_NOT_FOUND", "crs.v1", "14")
    err = expect_code(lambda: node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=unknown_pan[:-1] + "x"),
                                                        timeout=5), grpc.StatusCode.INVALID_ARGUMENT)
    assert _error_info(err).reason == "CARD_NUMBER_INVALID" and unknown_pan[:12] not in (err.details() or "")
    good_routing = demo_routing(3)
    bad_routing = good_routing[:-1] + str((int(good_routing[-1]) + 1) % 10)
    cases = [
        (good_routing, fresh_account_number(used_secrets), grpc.StatusCode.NOT_FOUND, "R03", "ACCOUNT_NOT_FOUND"),
        (good_routing, "12", grpc.StatusCode.INVALID_ARGUMENT, "R04", "ACCOUNT_NUMBER_INVALID"),
        (bad_routing, "123456789", grpc.StatusCode.INVALID_ARGUMENT, "R13", "ROUTING_NUMBER_INVALID"),
    ]
    for routing, number, status, code, reason in cases:
        err = expect_code(lambda r=routing, n=number: node_a.lookup.ResolveAccount(  # type: ignore[misc]
            pb.ResolveAccountRequest(routing_number=r, account_number=n), timeout=5), status)
        info = _error_info(err)
        assert (info.reason, info.metadata["nacha_return_code"]) == (reason, code)
    keys = [pb.LookupKey(pan=unknown_pan, correlation_id="pan"),
            pb.LookupKey(pan="1234", correlation_id="badpan"),
            pb.LookupKey(account=pb.AccountKey(routing_number=good_routing, account_number="12"), correlation_id="acc"),
            pb.LookupKey(account=pb.AccountKey(routing_number=bad_routing, account_number="123456789"),
                         correlation_id="routing"),
            pb.LookupKey(customer_id="cus_doesnotexist000000", correlation_id="customer")]
    batch = {r.correlation_id: r for r in node_a.lookup.BatchResolve(pb.BatchResolveRequest(keys=keys),
                                                                      timeout=5).results}
    streamed = {r.correlation_id: r for r in node_a.lookup.StreamResolve(iter(keys), timeout=5)}
    for results in (batch, streamed):
        assert (results["pan"].code, results["pan"].decision.iso8583_response_code) == (5, "14")
        assert results["badpan"].decision.reason == "CARD_NUMBER_INVALID"
        assert results["acc"].decision.nacha_return_code == "R04"
        assert results["routing"].decision.nacha_return_code == "R13"
        assert not results["customer"].HasField("decision")


def test_per_network_codes_are_configuration(dev_env: DevEnvironment, node_a: Clients,
                                             used_secrets: UsedSecrets) -> None:
    """Test cards are in the synthetic BIN table's `testnet` range: a node told that testnet answers
    05 for a closed account does so; the default node answers 46."""
    closed = Card(node_a, used_secrets, account=pb.ACCOUNT_STATUS_CLOSED)
    assert closed.by_pan(node_a).iso8583_response_code == "46"
    node = clients_of(dev_env.start_node(workers=1, decision_network_codes="testnet:46=05"))
    try:
        other = Card(node, used_secrets, account=pb.ACCOUNT_STATUS_CLOSED)
        assert (other.by_pan(node).iso8583_response_code, other.by_pan(node).reason) == ("05", "ACCOUNT_CLOSED")
        stolen = Card(node, used_secrets, card=pb.CARD_STATUS_STOLEN)
        assert stolen.by_pan(node).iso8583_response_code == "43"
    finally:
        node.channel.close()
        node.node.stop()
        dev_env.nodes.remove(node.node)


def test_a_new_bin_table_changes_cached_card_answers_at_once(dev_env: DevEnvironment,
                                                             used_secrets: UsedSecrets) -> None:
    """A card's decision code depends on its BIN's network: a table that moves the test range to
    another network is answered from the moment the node loads it, by PAN and by token, although
    the old answers are still cached (near-cache and Redis): card keys name the BIN table version.
    Going back to the previous table answers from what is cached under it, which the writes made
    meanwhile invalidated."""
    node = clients_of(dev_env.start_node(workers=1, bin_poll_interval=0.2, decision_network_codes="othernet:46=05"))

    async def moved(conn: asyncpg.Connection, active: int) -> int:
        rows = [dataclasses.replace(r, network="othernet") if r.network == "testnet" else r
                for r in await bin_store.load_rows(conn, active)]
        return await bin_store.import_table(conn, rows, source_file="moved.csv", sha256="-", rejected=0)

    def tables(change: Callable[[asyncpg.Connection, int], Awaitable[int]]) -> int:
        return _tables(dev_env, change)

    def version() -> int:
        return _table_version(node, closed.pan)

    def wait_for(wanted: int) -> None:
        _wait_for_table(node, closed.pan, wanted)

    def by_token() -> str:
        return node.lookup.ResolveCard(pb.ResolveCardRequest(token=closed.card.token), timeout=5) \
            .decision.iso8583_response_code

    try:
        closed = Card(node, used_secrets, account=pb.ACCOUNT_STATUS_CLOSED)
        before = version()
        assert (closed.by_pan(node).iso8583_response_code, by_token()) == ("46", "46")   # testnet: 46, now cached
        after = tables(moved)
        try:
            wait_for(after)
            assert (closed.by_pan(node).iso8583_response_code, by_token()) == ("05", "05")
            assert closed.by_pan(node).reason == "ACCOUNT_CLOSED"
            # A write now must also reach the answers cached under the previous table (a node, or
            # this one after a rollback, may read them): a card key is deleted under both versions.
            node.admin.SetCardStatus(pb.SetCardStatusRequest(card_token=closed.card.token,
                                                             status=pb.CARD_STATUS_STOLEN), timeout=5)
        finally:
            tables(lambda conn, _active: _activate(conn, before))
        wait_for(before)
        assert (closed.by_pan(node).iso8583_response_code, by_token()) == ("43", "43")
    finally:
        node.channel.close()
        node.node.stop()
        dev_env.nodes.remove(node.node)


async def _activate(conn: asyncpg.Connection, version: int) -> int:
    await bin_store.activate(conn, version)
    return version


def _tables(dev_env: DevEnvironment, change: Callable[[asyncpg.Connection, int], Awaitable[int]]) -> int:
    """`change(conn, active table version)` on the admin connection; its answer (a table version)."""
    async def run() -> int:
        conn = await asyncpg.connect(dev_env.admin_dsn)
        try:
            return await change(conn, await bin_store.active_version(conn))
        finally:
            await conn.close()
    return asyncio.run(run())


def _table_version(node: Clients, pan: str) -> int:
    # By the card number: its 6 digits are split between two ranges in the narrowed table (FAILED_PRECONDITION).
    return node.lookup.ResolveBin(pb.ResolveBinRequest(pan=pan), timeout=5).table_version


def _wait_for_table(node: Clients, pan: str, wanted: int) -> None:
    deadline = time.monotonic() + 30
    while _table_version(node, pan) != wanted:
        assert time.monotonic() < deadline, f"the node never loaded BIN table {wanted}"
        time.sleep(0.1)


def test_a_card_in_an_eight_digit_range_gets_that_ranges_network(dev_env: DevEnvironment,
                                                                  used_secrets: UsedSecrets) -> None:
    """An 8-digit range inside the test cards' 6-digit block, on another network: a card in it answers
    that network's code. (Hints used the card's stored 6 digits, whose first number, ...00, is in the
    6-digit range: the wrong network.)"""
    from server.pan import luhn_check_digit

    base = fresh_pan(used_secrets)
    body = base[:6] + "57" + base[8:-1]           # digits 7-8 not "00": outside what the 6 digits pointed at
    pan = body + luhn_check_digit(body)
    used_secrets.pans.add(pan)
    node = clients_of(dev_env.start_node(workers=1, bin_poll_interval=0.2, decision_network_codes="othernet:46=05"))

    async def narrowed(conn: asyncpg.Connection, active: int) -> int:
        rows = await bin_store.load_rows(conn, active)
        [block] = [r for r in rows if r.start <= int(pan[:11]) <= r.end and len(r.low) <= 6]
        rows.append(dataclasses.replace(block, low=pan[:8], high=pan[:8], network="othernet"))
        return await bin_store.import_table(conn, rows, source_file="narrowed.csv", sha256="-", rejected=0)

    try:
        before = _table_version(node, pan)
        after = _tables(dev_env, narrowed)
        try:
            _wait_for_table(node, pan, after)
            closed = Card(node, used_secrets, account=pb.ACCOUNT_STATUS_CLOSED, pan=pan)
            assert (closed.by_pan(node).iso8583_response_code, closed.by_pan(node).reason) == ("05", "ACCOUNT_CLOSED")
            neighbour = Card(node, used_secrets, account=pb.ACCOUNT_STATUS_CLOSED)   # digits 7-8 "00": testnet
            assert neighbour.by_pan(node).iso8583_response_code == "46"
        finally:
            _tables(dev_env, lambda conn, _active: _activate(conn, before))
        _wait_for_table(node, pan, before)
    finally:
        node.channel.close()
        node.node.stop()
        dev_env.nodes.remove(node.node)
