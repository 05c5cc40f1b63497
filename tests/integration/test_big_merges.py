"""Merges and unmerges of customers with many accounts (docs/audit-2026-12-04.md, "Twentieth audit"):
the statements a merge or an unmerge sends do not grow with the accounts that move.

A statement a relationship (and one more a feed event) took a 24,000-account customer's merge 15 s
and its unmerge 17 s, past any deadline a person would give it, with the customers' accounts locked
all along. Counted here through the write path itself (IdentityStore on a real PostgreSQL), with a
connection that counts what is sent: the same for 5 accounts as for 300.

Demo data of 2,000 customers, rearranged in SQL: a small merged customer owns accounts 0-4, a big
one accounts 100-399; each one's survivor is a joint holder on 1 and 50 of them (a conflict each).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from devstack.environment import DevEnvironment
from server.caller import Caller
from server.proto import crs_pb2 as pb
from server.store.merge import IdentityStore
from tests.integration.support import own_env, running, sql

SMALL = ("cus_demo0000001000", "cus_demo0000001001")   # (survivor, merged)
BIG = ("cus_demo0000001002", "cus_demo0000001003")
SENDS = {"execute", "executemany", "fetch", "fetchrow", "fetchval"}
OWNER, JOINT = pb.RELATIONSHIP_ROLE_OWNER, pb.RELATIONSHIP_ROLE_JOINT


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    for started in running(own_env(shards=2, customers=2_000)):
        everyone = [*SMALL, *BIG]
        sql(started.admin_dsn, "UPDATE customers SET status = $2 WHERE customer_id = ANY($1::text[])", everyone,
            pb.CUSTOMER_STATUS_ACTIVE)
        sql(started.admin_dsn, "DELETE FROM account_customers WHERE customer_id = ANY($1::text[])", everyone)
        sql(started.admin_dsn, "UPDATE account_customers SET customer_id = CASE WHEN account_id < 'acc_demo0000000005'"
            " THEN $1 ELSE $2 END WHERE role = $3 AND (account_id < 'acc_demo0000000005' OR account_id BETWEEN"
            " 'acc_demo0000000100' AND 'acc_demo0000000399')", SMALL[1], BIG[1], OWNER)
        for (survivor, merged), shared in ((SMALL, 1), (BIG, 50)):
            sql(started.admin_dsn, "INSERT INTO account_customers (account_id, customer_id, role) SELECT account_id,"
                " $1, $2 FROM account_customers WHERE customer_id = $3 ORDER BY account_id LIMIT $4", survivor, JOINT,
                merged, shared)
        yield started


class Counting:
    """A connection that counts the statements sent through it (a round trip each; executemany one)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn, self.sent = conn, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.conn, name)
        if name not in SENDS:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.sent += 1
            return attr(*args, **kwargs)
        return counted


class OnePool:
    """A pool of one counting connection, for the write path's `acquire`."""

    def __init__(self, conn: Counting) -> None:
        self.conn = conn

    async def acquire(self, *, timeout: float) -> Counting:
        return self.conn

    async def release(self, conn: Counting) -> None:
        pass


def _relationships(dsn: str, ids: tuple[str, str]) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in sql(dsn, "SELECT account_id, customer_id, role, created_at FROM account_customers"
                                             " WHERE customer_id = ANY($1::text[])", list(ids)))


def _merge_and_unmerge(dsn: str, survivor: str, merged: str) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        conn = Counting(await asyncpg.connect(dsn))
        try:
            store = IdentityStore(pool=OnePool(conn), keyring=None, data_key=None, timeout=30,  # type: ignore[arg-type]
                                  codec=None, model=None, thresholds=None, policy="")  # type: ignore[arg-type]
            caller = Caller(client_id="test", scopes=frozenset(), via="anonymous")
            await store.merge_customers(pb.MergeCustomersRequest(survivor_id=survivor, merged_id=merged), caller)
            merging, conn.sent = conn.sent, 0
            await store.unmerge_customer(pb.UnmergeCustomerRequest(merged_id=merged), caller)
            return merging, conn.sent
        finally:
            await conn.conn.close()
    return asyncio.run(run())


def test_a_merge_and_its_unmerge_send_as_many_statements_for_300_accounts_as_for_5(env: DevEnvironment) -> None:
    """Before: 5 accounts (1 shared) took 41 statements to merge and 45 to unmerge; 300 (50 shared) 975
    and 1,274. Now 27 each, whatever the count."""
    dsn = env.admin_dsn
    before = {ids: _relationships(dsn, ids) for ids in (SMALL, BIG)}
    assert len(before[BIG]) == 350 and len(before[SMALL]) == 6
    small, big = _merge_and_unmerge(dsn, *SMALL), _merge_and_unmerge(dsn, *BIG)
    assert big == small
    # What the merge moved, the unmerge moved back: roles, rows made again, their created_at.
    assert {ids: _relationships(dsn, ids) for ids in (SMALL, BIG)} == before
    merges = sql(dsn, "SELECT jsonb_array_length(relationships) AS n FROM customer_merges WHERE merged_id = $1", BIG[1])
    assert [m["n"] for m in merges] == [300]
    last = "(SELECT max(seq) FROM outbox WHERE event_type = $2 AND entity_id = $1)"
    events = sql(dsn, "SELECT event_type, count(*) AS n FROM outbox WHERE event_type LIKE 'relationship.%'"
                      f" AND seq > {last} AND seq < {last.replace('$2', '$3')} GROUP BY 1",
                 BIG[1], "customer.merged", "customer.unmerged")
    assert {e["event_type"]: e["n"] for e in events} == {"relationship.unlinked": 300, "relationship.linked": 250,
                                                         "relationship.role_changed": 50}
