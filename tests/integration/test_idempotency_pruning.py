"""Idempotency rows are kept CRS_IDEMPOTENCY_RETENTION, then pruned (migration 0018). Before, nothing
removed them: one row per admin write for ever. Within the retention a retry replays its answer;
after it, the same request_id is a new write. One node at a time prunes (a transaction-level lock)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import asyncpg
import pytest

from devstack.environment import DevEnvironment
from server.caller import Caller
from server.proto import crs_pb2 as pb
from server.store.admin import AdminStore
from server.store.db import active_data_key, create_pool
from server.store.envelope import PRUNE_LOCK, prune_idempotency
from tests.integration.support import clients_of, sql, until

pytestmark = pytest.mark.integration
OPS = Caller("ops", frozenset({"admin:write"}), "mtls")
WEEK = dt.timedelta(days=7)


def _kept(dsn: str, *request_ids: str) -> set[str]:
    return {r["request_id"] for r in sql(dsn, "SELECT request_id FROM idempotency WHERE request_id = ANY($1)",
                                         list(request_ids))}


async def _age(dsn: str, *request_ids: str) -> None:
    """Written eight days ago, as far as the table says (the schema owner may change it)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE idempotency SET created_at = now() - interval '8 days' WHERE request_id = ANY($1)",
                           list(request_ids))
    finally:
        await conn.close()


def test_rows_past_the_retention_are_pruned_and_their_ids_write_again(dev_env: DevEnvironment) -> None:
    settings = dev_env.settings()
    old_a, old_b, fresh = (f"prune-{uuid.uuid4()}" for _ in range(3))

    async def run() -> None:
        pool = await create_pool(settings)     # the service role: what a node prunes as
        try:
            keyring = settings.keyring()
            store = AdminStore(pool=pool, keyring=keyring, data_key=await active_data_key(pool, keyring), timeout=5)

            async def create(rid: str) -> bytes:
                return (await store.create_customer(pb.CreateCustomerRequest(request_id=rid, display_name="Kept Ltd"),
                                                    OPS)).response

            first = {rid: await create(rid) for rid in (old_a, old_b, fresh)}
            await _age(dev_env.admin_dsn, old_a, old_b)
            assert await prune_idempotency(pool, older_than=WEEK, batch=1) >= 2   # one row a transaction
            kept = await pool.fetch("SELECT request_id FROM idempotency WHERE request_id = ANY($1)",
                                    [old_a, old_b, fresh])
            assert [r["request_id"] for r in kept] == [fresh]
            assert await create(fresh) == first[fresh]                      # within the retention: replayed
            again = await store.create_customer(pb.CreateCustomerRequest(request_id=old_a, display_name="Kept Ltd"),
                                                OPS)
            assert again.outbox_id is not None and again.response != first[old_a]   # past it: a new write
        finally:
            await pool.close()

    asyncio.run(run())


def test_one_node_at_a_time_prunes(dev_env: DevEnvironment) -> None:
    settings = dev_env.settings()
    rid = f"prune-{uuid.uuid4()}"

    async def run() -> None:
        pool = await create_pool(settings)
        try:
            keyring = settings.keyring()
            store = AdminStore(pool=pool, keyring=keyring, data_key=await active_data_key(pool, keyring), timeout=5)
            await store.create_customer(pb.CreateCustomerRequest(request_id=rid, display_name="Locked Ltd"), OPS)
            await _age(dev_env.admin_dsn, rid)
            async with pool.acquire() as other, other.transaction():   # another node is pruning
                await other.execute("SELECT pg_advisory_xact_lock($1)", PRUNE_LOCK)
                assert await prune_idempotency(pool, older_than=WEEK) == 0
                assert await pool.fetchval("SELECT count(*) FROM idempotency WHERE request_id = $1", rid) == 1
            assert await prune_idempotency(pool, older_than=WEEK) >= 1
            assert await pool.fetchval("SELECT count(*) FROM idempotency WHERE request_id = $1", rid) == 0
        finally:
            await pool.close()

    asyncio.run(run())


def test_a_node_prunes_on_its_own_schedule(dev_env: DevEnvironment) -> None:
    """CRS_IDEMPOTENCY_RETENTION=2: checked every 0.2 s, the row goes within about 2.2 s."""
    retention = 2.0
    node = dev_env.start_node(idempotency_retention=retention)
    try:
        admin = clients_of(node).admin
        for _ in range(5):
            rid = f"prune-{uuid.uuid4()}"
            sent = time.monotonic()
            first = admin.CreateCustomer(pb.CreateCustomerRequest(request_id=rid, display_name="Node Ltd"), timeout=10)
            if admin.CreateCustomer(pb.CreateCustomerRequest(request_id=rid, display_name="Node Ltd"),
                                    timeout=10) == first:
                break
            # Not replayed: only right if the row may have been pruned first, the two calls a retention
            # apart (a stall that long between them on a busy machine); then again, with another id.
            assert time.monotonic() - sent >= retention, "a retry within the retention was not replayed"
        else:
            pytest.fail("every replay came a retention after its first call: the machine is too slow for this test")
        until("the node pruned the row", lambda: not _kept(dev_env.admin_dsn, rid), within=10, poll=0.1)
        later = admin.CreateCustomer(pb.CreateCustomerRequest(request_id=rid, display_name="Node Ltd"), timeout=10)
        assert later.customer_id != first.customer_id
    finally:
        node.stop()
        dev_env.nodes.remove(node)
