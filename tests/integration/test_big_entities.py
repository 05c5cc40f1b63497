"""Big entities through a real node, read with a client as gRPC configures it by default (4 MiB):
a corporate customer whose profile is too large for one answer, and a batch of big profiles.

Demo data of 20,000 customers (30,000 accounts, 40,000 cards), rearranged in SQL: cus_demo0 owns
accounts 0-23,999 (34,000 cards, a ~5 MB profile), cus_demo1 accounts 24,000-29,999 (6,000 cards, ~0.9 MB).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from devstack.environment import DevEnvironment
from server.proto import crs_pb2 as pb
from tests.integration.support import Clients, clients_of, expect_code, own_env, running, sql

BIG, MEDIUM = "cus_demo0000000000", "cus_demo0000000001"


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    for started in running(own_env(shards=2, customers=20_000)):
        sql(started.admin_dsn, "DELETE FROM account_customers WHERE customer_id = ANY($1::text[]) AND role <> 1",
            [BIG, MEDIUM])
        sql(started.admin_dsn, "UPDATE account_customers SET customer_id = CASE WHEN account_id < 'acc_demo0000024000'"
            " THEN $1 ELSE $2 END WHERE role = 1", BIG, MEDIUM)
        sql(started.admin_dsn, "ANALYZE")
        yield started


@pytest.fixture(scope="module")
def clients(env: DevEnvironment) -> Clients:
    return clients_of(env.start_node(workers=1))


def test_a_customer_too_big_for_one_answer_is_refused_with_a_status_that_says_why(clients: Clients) -> None:
    """Before: the node sent 5 MB and the caller's own library refused it, RESOURCE_EXHAUSTED
    "CLIENT: Received message larger than max", every time."""
    for _ in range(2):   # refused again, not cached as anything else
        err = expect_code(lambda: clients.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=BIG), timeout=30),
                          grpc.StatusCode.FAILED_PRECONDITION)
        assert "24,000 accounts and 34,000 cards" in (err.details() or "") and "4 MiB" in (err.details() or "")
    medium = clients.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=MEDIUM), timeout=30)
    assert len(medium.accounts) == 6_000 and len(medium.cards) == 6_000


def test_a_batch_of_big_profiles_answers_what_fits_and_the_rest_key_by_key(clients: Clients) -> None:
    """Five ~0.9 MB profiles are more than 4 MiB together: before, the whole batch was refused by
    the caller's library, no key answered."""
    keys = [pb.LookupKey(customer_id=MEDIUM, correlation_id=f"m{i}") for i in range(5)]
    keys.append(pb.LookupKey(customer_id=BIG, correlation_id="big"))
    answer = clients.lookup.BatchResolve(pb.BatchResolveRequest(keys=keys), timeout=30)
    assert answer.ByteSize() <= 4 * 1024 * 1024
    assert [r.correlation_id for r in answer.results] == ["m0", "m1", "m2", "m3", "m4", "big"]
    assert [r.code for r in answer.results] == [0, 0, 0, 0, 8, 9]
    assert len(answer.results[0].customer.cards) == 6_000 and "another batch" in answer.results[4].message
    streamed = list(clients.lookup.StreamResolve(iter([pb.LookupKey(customer_id=BIG, correlation_id="s")]),
                                                 timeout=30))
    assert [(r.correlation_id, r.code) for r in streamed] == [("s", 9)]
