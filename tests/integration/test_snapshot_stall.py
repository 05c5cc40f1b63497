"""A Snapshot whose reader stops reading no longer holds its REPEATABLE READ transaction for good
(CRS_FEED_SNAPSHOT_STALL): PostgreSQL ends the transaction once a chunk waits that long unread, and the
reader, if it comes back, is told so (RESOURCE_EXHAUSTED, start again). It held the transaction, hence
VACUUM, for as long as the job stayed connected (an outside check: 60 s and counting, dead rows left).
The handler's generator on a real PostgreSQL; a generator left suspended at its yield is what gRPC's
flow control does to it when the reader stops."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from devstack.environment import DevEnvironment
from server.caller import Caller
from server.errors import BackendTimeout, FeedOverload
from server.feed.service import FeedHandlers
from server.proto import crs_pb2 as pb

pytestmark = pytest.mark.integration
STALL = 1.0


def _snapshot(pool: asyncpg.Pool, entity_type: int) -> tuple[FeedHandlers, AsyncIterator[bytes]]:
    """A Snapshot of one entity type through the real handler, one entity a chunk, STALL as its bound."""
    handlers = FeedHandlers(pool=pool, tailer=None, timeout=5.0, batch=10,  # type: ignore[arg-type]
                            progress_interval=1.0, snapshot_chunk=1, snapshot_max=1, snapshot_stall=STALL)
    return handlers, handlers.Snapshot(pb.SnapshotRequest(entity_types=[entity_type]),  # type: ignore[list-item]
                                       Caller("extract", frozenset(), "mtls"))


async def _close(chunks: AsyncIterator[bytes], pool: asyncpg.Pool) -> None:
    """A failed check must not leave the snapshot's connection holding pool.close()."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await chunks.aclose()  # type: ignore[attr-defined]  # an async generator
    try:
        async with asyncio.timeout(5):
            await pool.close()
    except TimeoutError:
        pool.terminate()


def test_a_stalled_snapshot_reader_loses_its_transaction_and_is_told(dev_env: DevEnvironment) -> None:
    async def scenario() -> None:
        pool = await asyncpg.create_pool(dev_env.admin_dsn, min_size=1, max_size=2)
        handlers, chunks = _snapshot(pool, pb.ENTITY_TYPE_CUSTOMER)
        try:
            assert pb.SnapshotChunk.FromString(await chunks.__anext__()).customers
            pid = await pool.fetchval("SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction'"
                                      " AND query LIKE '%FROM customers%' LIMIT 1")
            assert pid is not None, "the snapshot's transaction is not open"
            stalled = time.monotonic()
            # The reader stops reading. PostgreSQL ends the idle transaction STALL s on: wait for its
            # backend to go, not a fixed STALL + 1.5 s (a backend that slow to run its timeout looked kept).
            deadline = time.monotonic() + STALL + 10
            while await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                assert time.monotonic() < deadline, "the stalled snapshot still holds its transaction"
                await asyncio.sleep(0.1)
            await asyncio.sleep(max(0.0, STALL + 0.1 - (time.monotonic() - stalled)))   # past the node's stall too
            with pytest.raises(FeedOverload, match="CRS_FEED_SNAPSHOT_STALL"):
                while True:
                    await chunks.__anext__()
            assert handlers._snapshots.running == 0
        finally:
            await _close(chunks, pool)

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 20


def test_a_snapshot_read_waiting_on_a_lock_is_ended_not_left_waiting(dev_env: DevEnvironment) -> None:
    """A snapshot read that runs (here: waits on a lock a migration holds) longer than the stall bound
    is cancelled and the reader told DEADLINE_EXCEEDED; it waited on with its connection for as long as
    the lock was held, whatever the reader's own patience."""
    async def scenario() -> None:
        pool = await asyncpg.create_pool(dev_env.admin_dsn, min_size=1, max_size=3)
        handlers, chunks = _snapshot(pool, pb.ENTITY_TYPE_ACCOUNT)
        try:
            async with pool.acquire() as migration, migration.transaction():
                await migration.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
                with pytest.raises(BackendTimeout, match="CRS_FEED_SNAPSHOT_STALL"):
                    async with asyncio.timeout(STALL + 4):
                        await chunks.__anext__()
            assert handlers._snapshots.running == 0
        finally:
            await _close(chunks, pool)

    asyncio.run(scenario())
