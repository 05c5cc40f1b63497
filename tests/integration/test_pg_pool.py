"""The node's PostgreSQL pool hands connections back without asyncpg's reset query (server/store/db.py
NoSessionReset): session state survives a release, so the node's code must keep none; an open
transaction is still rolled back. The default pool (the CLIs') resets as before."""

from __future__ import annotations

import asyncio
import dataclasses

from devstack.environment import DevEnvironment
from server.settings import Settings
from server.store.db import create_pool


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
