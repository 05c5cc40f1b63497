"""What an admin write answers when PostgreSQL fails under it, on the real PostgreSQL of the shared
environment (the store called directly, as test_idempotency_clients does).

- A connection lost during COMMIT leaves the outcome unknown: PostgreSQL may have committed. Answered
  UNAVAILABLE, the recommended channel configuration (server/client_config.py) retries it at once,
  which is safe only with a request_id: without one, the retry wrote a second customer. The loss is
  made by a connection that sends COMMIT and then closes its socket (PostgreSQL reads the COMMIT
  before the end of the stream, so it commits; the client never hears the answer).
- A statement ended by the server's own limits (statement_timeout, lock_timeout: commonly set on the
  node's role by a DBA) escaped the error translation and answered INTERNAL "internal error", with a
  traceback logged per call.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import asyncpg
import grpc
import pytest

from devstack.environment import DevEnvironment
from server.admin import AdminHandlers
from server.caller import Caller
from server.client_config import RETRY_POLICY
from server.errors import status_for
from server.proto import crs_pb2 as pb
from server.resolver import Resolver
from server.store.admin import AdminStore
from server.store.db import active_data_key, create_pool

pytestmark = pytest.mark.integration
OPS = Caller("ops", frozenset({"admin:write"}), "mtls")


class CommitLost(asyncpg.Connection):  # type: ignore[misc]
    """Sends COMMIT, then closes the socket before the answer can arrive."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        if query.strip().rstrip(";").upper() != "COMMIT":
            return await super().execute(query, *args, timeout=timeout)
        sent = asyncio.ensure_future(super().execute(query, *args, timeout=timeout))
        await asyncio.sleep(0)          # the COMMIT message is written to the transport
        self._transport.close()         # flushed, then the end of the stream
        return await sent


async def _customers_named(pool: asyncpg.Pool, name: str) -> int:
    for _ in range(50):   # PostgreSQL commits as it reads the COMMIT; give it a moment
        n = int(await pool.fetchval("SELECT count(*) FROM customers WHERE display_name = $1", name))
        if n:
            return n
        await asyncio.sleep(0.05)
    return 0


def test_a_write_whose_commit_was_lost_is_never_answered_as_retryable_without_a_request_id(
        dev_env: DevEnvironment) -> None:
    settings = dev_env.settings()
    retried = set(RETRY_POLICY["retryableStatusCodes"])

    async def run() -> None:
        pool = await create_pool(settings)
        lossy = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=1, connection_class=CommitLost)
        try:
            keyring = settings.keyring()
            store = AdminStore(pool=lossy, keyring=keyring, data_key=await active_data_key(pool, keyring), timeout=5)
            # Without a request_id: committed, and answered with a status no client retries on its own.
            name = f"Commit Lost {uuid.uuid4()}"
            with pytest.raises(Exception) as caught:
                await store.create_customer(pb.CreateCustomerRequest(display_name=name), OPS)
            assert await _customers_named(pool, name) == 1            # it did commit
            code, message = status_for(caught.value)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, message)
            assert code.name not in retried
            assert "may have been applied" in message and "request_id" in message
            # With one: UNAVAILABLE (the channel retries it), and the retry answers the first write.
            rid, name = f"lost-{uuid.uuid4()}", f"Commit Lost {uuid.uuid4()}"
            with pytest.raises(Exception) as caught:
                await store.create_customer(pb.CreateCustomerRequest(request_id=rid, display_name=name), OPS)
            code, message = status_for(caught.value)
            assert code == grpc.StatusCode.UNAVAILABLE and code.name in retried, (code, message)
            assert "same request_id" in message
            sound = AdminStore(pool=pool, keyring=keyring, data_key=store.data_key, timeout=5)
            again = await sound.create_customer(pb.CreateCustomerRequest(request_id=rid, display_name=name), OPS)
            assert again.outbox_id is None                             # replayed, not written twice
            assert await _customers_named(pool, name) == 1
            # The audit trail through the handler the node runs: the write's own row says OK, and the
            # failure's says COMMIT_LOST (it said UNAVAILABLE: a failure beside a write that was applied).
            handlers = AdminHandlers(store=store, resolver=cast(Resolver, None))   # no cache on a failure
            for rid in (f"lost-{uuid.uuid4()}", ""):
                lost_before = await pool.fetchval("SELECT count(*) FROM audit_log WHERE result = 'COMMIT_LOST'")
                name = f"Commit Lost {uuid.uuid4()}"
                with pytest.raises(Exception) as caught:
                    await handlers.CreateCustomer(pb.CreateCustomerRequest(request_id=rid, display_name=name), OPS)
                assert status_for(caught.value)[0] == (grpc.StatusCode.UNAVAILABLE if rid
                                                       else grpc.StatusCode.DEADLINE_EXCEEDED)
                assert await _customers_named(pool, name) == 1
                lost = await pool.fetchval("SELECT count(*) FROM audit_log WHERE result = 'COMMIT_LOST'")
                assert lost == lost_before + 1
                if rid:
                    rows = await pool.fetch("SELECT result FROM audit_log WHERE request_id = $1 ORDER BY id", rid)
                    assert [r["result"] for r in rows] == ["OK", "COMMIT_LOST"]
        finally:
            await lossy.close()
            await pool.close()

    asyncio.run(run())


@pytest.mark.parametrize("limit", ["lock_timeout", "statement_timeout"])
def test_a_write_the_server_ends_for_its_time_limit_is_deadline_exceeded(dev_env: DevEnvironment,
                                                                          limit: str) -> None:
    settings = dev_env.settings()

    async def run() -> None:
        pool = await create_pool(settings)
        limited = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=1,
                                            server_settings={limit: "200"})
        try:
            keyring = settings.keyring()
            data_key = await active_data_key(pool, keyring)
            store = AdminStore(pool=pool, keyring=keyring, data_key=data_key, timeout=5)
            customer = pb.Customer.FromString((await store.create_customer(
                pb.CreateCustomerRequest(display_name=f"Held {uuid.uuid4()}"), OPS)).response)
            slow = AdminStore(pool=limited, keyring=keyring, data_key=data_key, timeout=5)
            async with pool.acquire() as holder, holder.transaction():
                await holder.execute("SELECT 1 FROM customers WHERE customer_id = $1 FOR UPDATE", customer.customer_id)
                with pytest.raises(Exception) as caught:
                    await slow.set_customer_status(pb.SetCustomerStatusRequest(
                        customer_id=customer.customer_id, status=pb.CUSTOMER_STATUS_SUSPENDED), OPS)
            code, message = status_for(caught.value)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, message, repr(caught.value))
            assert limit in message
        finally:
            await limited.close()
            await pool.close()

    asyncio.run(run())
