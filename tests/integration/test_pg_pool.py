"""A node's PostgreSQL round trips. Its pool hands connections back without asyncpg's reset query
(server/store/db.py NoSessionReset): session state survives a release, so the node's code must keep
none; an open transaction is still rolled back. The default pool (the CLIs') resets as before. And the
outbox relay at rest asks one query a pass (server/relay.py). A wait for a connection past its bound
says whether the node's own pool was the limit."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from prometheus_client import CollectorRegistry

from devstack.environment import DevEnvironment
from server.errors import BackendTimeout
from server.metrics import Metrics
from server.relay import run_relay
from server.settings import Settings
from server.store.db import acquire, create_pool


async def _after_release(settings: Settings, *, session_reset: bool) -> tuple[str | None, str | None, bool]:
    """(a session setting after a release, a transaction-local one after a release inside an open
    transaction, whether the connection came back in a transaction), on a pool of one connection."""
    pool = await create_pool(dataclasses.replace(settings, pg_pool_min=1, pg_pool_max=1), session_reset=session_reset)
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET crs.probe = 'kept'")
        async with pool.acquire() as conn:
            session = await conn.fetchval("SELECT current_setting('crs.probe', true)")
            await conn.execute("BEGIN")
            await conn.execute("SET LOCAL crs.in_tx = 'open'")
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, _ctx: None)   # asyncpg reports the open transaction
        async with pool.acquire() as conn:
            local = await conn.fetchval("SELECT current_setting('crs.in_tx', true)")
            in_tx = conn.is_in_transaction()
        return session, local, in_tx
    finally:
        await pool.close()


def test_the_nodes_pool_skips_the_reset_query_but_still_ends_open_transactions(dev_env: DevEnvironment) -> None:
    settings = dev_env.settings()
    session, local, in_tx = asyncio.run(_after_release(settings, session_reset=False))
    assert session == "kept"                  # no RESET ALL: one round trip less per pool use
    assert local in (None, "") and not in_tx  # the open transaction was rolled back on release
    session, local, in_tx = asyncio.run(_after_release(settings, session_reset=True))
    assert session in (None, "") and local in (None, "") and not in_tx


class _Counted:
    """A real pool that counts what the relay asks of it."""

    def __init__(self, pool: Any, passes: int) -> None:
        self.pool, self.acquired, self.fetchrows = pool, 0, 0
        self.enough = asyncio.Event()   # `passes` backlog queries answered
        self.passes = passes

    def acquire(self) -> Any:
        self.acquired += 1
        return self.pool.acquire()

    async def fetchrow(self, *args: Any) -> Any:
        self.fetchrows += 1
        try:
            return await self.pool.fetchrow(*args)
        finally:
            if self.fetchrows >= self.passes:
                self.enough.set()


def test_the_relay_at_rest_asks_one_query_a_pass(dev_env: DevEnvironment) -> None:
    """With nothing unsettled a pass is the backlog query alone: no transaction, no SELECT ... FOR UPDATE
    (it was four round trips a pass, every node process, every CRS_OUTBOX_POLL_INTERVAL)."""
    settings = dev_env.settings()

    async def main() -> tuple[int, int, float]:
        pool = await create_pool(dataclasses.replace(settings, pg_pool_min=1, pg_pool_max=2), session_reset=False)
        try:
            for _ in range(100):   # other tests' writes are settled by their nodes' relays
                if not await pool.fetchval("SELECT count(*) FROM outbox WHERE settled_at IS NULL"):
                    break
                await asyncio.sleep(0.1)
            counted, metrics = _Counted(pool, passes=4), Metrics(CollectorRegistry())
            relay = asyncio.create_task(run_relay(counted, None, metrics, delay=0.05, interval=0.05, cached_for=300.0))  # type: ignore[arg-type]
            # Four passes, however long they take (a fixed 0.5 s held fewer when each query was slow).
            enough = asyncio.ensure_future(counted.enough.wait())
            await asyncio.wait([relay, enough], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            for task in (relay, enough):
                task.cancel()
            await asyncio.gather(relay, enough, return_exceptions=True)
            return counted.fetchrows, counted.acquired, metrics.outbox_pending._value.get()
        finally:
            await pool.close()

    passes, transactions, pending = asyncio.run(main())
    assert passes >= 4 and transactions == 0 and pending == 0


def test_a_wait_for_a_full_pool_says_the_pool_was_full(dev_env: DevEnvironment) -> None:
    """Every connection in use answered "the database did not answer in time", which sent operators to
    a database that was fine: the node's own pool (CRS_PG_POOL_MAX) was the limit, and now it says so."""
    async def main() -> tuple[str, str]:
        pool = await create_pool(dataclasses.replace(dev_env.settings(), pg_pool_min=1, pg_pool_max=1))
        try:
            async with acquire(pool, 1.0) as held:
                assert await held.fetchval("SELECT 1") == 1
                try:
                    async with acquire(pool, 0.2):
                        raise AssertionError("a second connection from a pool of one")
                except BackendTimeout as exc:
                    full = exc.message
            async with acquire(pool, 1.0) as conn:      # released: it is there again
                assert await conn.fetchval("SELECT 2") == 2
            return full, str(pool.get_idle_size())
        finally:
            await pool.close()

    full, idle = asyncio.run(main())
    assert "all 1 of this node's (CRS_PG_POOL_MAX) were in use" in full, full
    assert idle == "1"
