"""The outbox relay's second delete reaches every write while some rows stay owed to a down shard: rows
never tried go first, then the ones tried longest ago (migration 0013). Ordered by id alone, a batch of
rows a shard never acknowledged took every pass, and no newer write was re-invalidated, on any shard
(reproduced: a card set LOST answered BLOCKED for the cache TTL with 521 rows owed to one shard).
Real PostgreSQL (a database of its own, no node: no other relay); the cache tier is a fake that
refuses the down shard's keys."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable, Iterator, Sequence

import asyncpg
import pytest

from devstack.environment import DevEnvironment
from server import relay
from tests.integration.support import own_env, running

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quiet_db() -> Iterator[DevEnvironment]:
    yield from running(own_env(shards=1, customers=0))


class Route:
    async def write_position(self) -> int | None:
        return None


class Tier:
    """What relay_once asks of the Resolver: keys on shard "down" are never acknowledged."""

    route = Route()

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def invalidate(self, keys: Sequence[str], *, position: int | None = None,
                         bin_versions: Iterable[int] | None = None) -> bool:
        self.asked += keys
        return not any(k.startswith("down:") for k in keys)


def test_rows_owed_to_a_down_shard_do_not_hold_back_newer_writes(quiet_db: DevEnvironment,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "BATCH", 3)

    async def scenario() -> tuple[list[bool], list[str]]:
        pool = await asyncpg.create_pool(quiet_db.admin_dsn, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await conn.execute("DELETE FROM outbox")
                for keys in [[f"down:{i}"] for i in range(5)] + [["ok:newer-write"]]:   # the owed rows, older
                    # The writers' own deletes: refused by the down shard, done for the newer write.
                    await conn.execute("INSERT INTO outbox (event_type, entity_type, entity_id, cache_keys, created_at,"
                                       " invalidated_at) VALUES ('card.updated', 'card', 'x', $1,"
                                       " clock_timestamp() - interval '1 h', $2)",
                                       keys, None if keys[0].startswith("down:") else dt.datetime.now(dt.UTC)
                                       - dt.timedelta(hours=1))
            tier = Tier()
            for _ in range(2):   # two passes of three rows
                await relay.relay_once(pool, tier, delay=0.5, cached_for=300.0)   # type: ignore[arg-type]
            rows = await pool.fetch("SELECT cache_keys, settled_at IS NOT NULL AS settled FROM outbox ORDER BY id")
            return [r["settled"] for r in rows], tier.asked
        finally:
            await pool.close()

    settled, asked = asyncio.run(scenario())
    assert settled == [False] * 5 + [True], "the newer write's second delete waited behind the owed rows"
    assert asked.count("ok:newer-write") == 1 and sorted(set(asked) - {"ok:newer-write"}) == [
        f"down:{i}" for i in range(5)], asked   # every owed row tried in two passes, none starved


def test_the_second_delete_comes_the_delay_after_the_first_not_after_the_insert(quiet_db: DevEnvironment) -> None:
    """A commit that takes longer than the re-invalidation delay (a synchronous standby or an fsync that
    stalls): the outbox row's created_at is its insert, seconds before the commit, so the relay's
    second delete came at once, beside the writer's first, and a read whose snapshot missed the write
    (taken just before the commit) filled the old row after both, for the whole TTL: the race the
    second delete exists for. It now comes the delay after the first: the writer's (invalidated_at,
    after its commit), or, where none is recorded yet (its delete failed, or it has not marked the
    row yet), the relay's own first one."""
    # The re-invalidation delay of these relay passes: long enough that the steps which must come within
    # it (the inserts and the first two passes) do, even on a busy machine (with 0.5 s, a stall that long
    # there made the first pass find the writer's delete already a delay old).
    delay = 2.0

    async def scenario() -> tuple[list[str], list[str], list[str], list[bool]]:
        pool = await asyncpg.create_pool(quiet_db.admin_dsn, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await conn.execute("DELETE FROM outbox")
                # Inserted two delays ago, committed and deleted by its writer just now.
                await conn.execute("INSERT INTO outbox (event_type, entity_type, entity_id, cache_keys, created_at,"
                                   " invalidated_at) VALUES ('card.updated', 'card', 'x', $1,"
                                   " clock_timestamp() - 2 * $2::interval, clock_timestamp())", ["crd:slow-commit"],
                                   dt.timedelta(seconds=delay))
                # The same, its writer's delete not recorded (failed, or not marked yet).
                await conn.execute("INSERT INTO outbox (event_type, entity_type, entity_id, cache_keys, created_at)"
                                   " VALUES ('card.updated', 'card', 'y', $1, clock_timestamp() - 2 * $2::interval)",
                                   ["crd:not-marked"], dt.timedelta(seconds=delay))
            at_once, again, later = Tier(), Tier(), Tier()
            await relay.relay_once(pool, at_once, delay=delay, cached_for=300.0)   # type: ignore[arg-type]
            await relay.relay_once(pool, again, delay=delay, cached_for=300.0)   # type: ignore[arg-type]
            await asyncio.sleep(delay + 0.1)
            await relay.relay_once(pool, later, delay=delay, cached_for=300.0)   # type: ignore[arg-type]
            rows = await pool.fetch("SELECT settled_at IS NOT NULL AS settled FROM outbox ORDER BY id")
            return at_once.asked, again.asked, later.asked, [r["settled"] for r in rows]
        finally:
            await pool.close()

    at_once, again, later, settled = asyncio.run(scenario())
    assert "crd:slow-commit" not in at_once, "the second delete came at once, beside the writer's first"
    assert at_once == ["crd:not-marked"], at_once                 # its first delete, not yet its second
    assert again == [], "a second delete beside the first"
    assert sorted(later) == ["crd:not-marked", "crd:slow-commit"] and settled == [True, True], (later, settled)


def test_a_pass_holds_at_most_keys_max_keys_however_big_the_rows(quiet_db: DevEnvironment,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A write to a corporate customer names ~97,000 keys (34,000 cards). A pass took BATCH rows
    whatever their size: 40 such rows held 463 MB, 500 would be past a node's memory limit. Now a pass
    takes rows up to KEYS_MAX keys (one row at least, however big); the rest go in later passes.
    Here KEYS_MAX is 1,000 and the rows hold 600 keys (and one 1,500)."""
    monkeypatch.setattr(relay, "KEYS_MAX", 1_000, raising=False)

    async def scenario() -> tuple[list[int], list[bool]]:
        pool = await asyncpg.create_pool(quiet_db.admin_dsn, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await conn.execute("DELETE FROM outbox")
                for row, size in enumerate([600, 600, 1_500, 600]):
                    await conn.execute("INSERT INTO outbox (event_type, entity_type, entity_id, cache_keys, created_at,"
                                       " invalidated_at) VALUES ('customer.updated', 'customer', 'x', $1,"
                                       " clock_timestamp() - interval '1 h', clock_timestamp() - interval '1 h')",
                                       [f"ok:{row}:{i}" for i in range(size)])
            asked = []
            for _ in range(5):
                tier = Tier()
                await relay.relay_once(pool, tier, delay=0.5, cached_for=300.0)   # type: ignore[arg-type]
                asked.append(len(tier.asked))
            rows = await pool.fetch("SELECT settled_at IS NOT NULL AS settled FROM outbox ORDER BY id")
            return asked, [r["settled"] for r in rows]
        finally:
            await pool.close()

    asked, settled = asyncio.run(scenario())
    assert asked == [600, 600, 1_500, 600, 0] and settled == [True] * 4, asked


def test_a_copy_coming_back_is_flushed_when_the_owed_keys_are_more_than_keys_max(
        quiet_db: DevEnvironment, monkeypatch: pytest.MonkeyPatch) -> None:
    """unsettled_keys, for a copy that comes back: past MISSED_ROWS_MAX rows it answered None (FLUSHDB
    is cheaper), but 2,000 rows of a corporate customer's writes are ~190 million keys. Now past
    KEYS_MAX keys too."""
    monkeypatch.setattr(relay, "KEYS_MAX", 1_000, raising=False)

    async def scenario() -> tuple[int | None, int | None]:
        pool = await asyncpg.create_pool(quiet_db.admin_dsn, min_size=1, max_size=2)
        try:
            await pool.execute("DELETE FROM outbox")
            insert = ("INSERT INTO outbox (event_type, entity_type, entity_id, cache_keys)"
                      " VALUES ('customer.updated', 'customer', 'x', $1)")
            await pool.execute(insert, [f"crd:1:{i:04x}" for i in range(600)])
            under = await relay.unsettled_keys(pool, cached_for=300.0, timeout=5.0)
            await pool.execute(insert, [f"crd:1:{i:04x}" for i in range(600, 1_200)])
            over = await relay.unsettled_keys(pool, cached_for=300.0, timeout=5.0)
            return (None if under is None else len(under)), (None if over is None else len(over))
        finally:
            await pool.close()

    under, over = asyncio.run(scenario())
    assert under is not None and under >= 600 and over is None, (under, over)
