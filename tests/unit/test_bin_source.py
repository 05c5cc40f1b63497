"""BinSource's rule for caching card answers (server/bin_source.py): only while a poll confirmed the
held table's version within FILL_GRACE_POLLS intervals. A fake pool and clock; no servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from server.bin_source import FILL_GRACE_POLLS, BinSource, card_answer_life
from server.metrics import Metrics
from server.settings import Settings
from server.store.read_route import Uncacheable
from tests.clock import Clock

INTERVAL = 5.0


class Pool:
    """bin_tables as versions_in_use reads it: `active` (0: none); `down` refuses connections."""

    def __init__(self) -> None:
        self.active = 0
        self.down = False

    @contextlib.asynccontextmanager
    async def acquire(self, timeout: float | None = None) -> AsyncIterator[Pool]:
        if self.down:
            raise OSError("connection refused")
        yield self

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        if "FROM bin_tables" in query:
            return [{"version": self.active, "active": True}] if self.active else []
        return []     # the ranges of a version: none


async def _answer(conn: Any) -> bytes | Uncacheable | None:
    return b"answer"


async def _uncacheable(conn: Any) -> bytes | Uncacheable | None:
    return Uncacheable(b"other key version")


def _source(pool: Pool, clock: Clock) -> BinSource:
    return BinSource(pool=pool, metrics=Metrics(CollectorRegistry()), interval=INTERVAL, timeout=2.0, cached_for=400.0,  # type: ignore[arg-type]
                     clock=clock)


def test_card_answers_are_cached_only_while_a_poll_confirms_the_version() -> None:
    async def main() -> None:
        pool, clock = Pool(), Clock()
        source = _source(pool, clock)
        wrapped = source.cacheable(_answer)      # no poll yet: nothing is confirmed
        assert wrapped is not _answer and await wrapped(None) == Uncacheable(b"answer")
        await source.refresh()
        assert source.cacheable(_answer) is _answer
        clock.now += FILL_GRACE_POLLS * INTERVAL
        assert source.cacheable(_answer) is _answer
        pool.down = True
        with pytest.raises(OSError):
            await source.refresh()
        clock.now += 0.1                          # past the grace, the last poll failed
        assert await source.cacheable(_answer)(None) == Uncacheable(b"answer")
        assert await source.cacheable(_uncacheable)(None) == Uncacheable(b"other key version")
        pool.down = False
        await source.refresh()
        assert source.cacheable(_answer) is _answer

    asyncio.run(main())


def test_a_new_table_is_confirmed_as_of_the_poll_that_found_it() -> None:
    """The version read is in force from some time after the poll was sent: that time, not the end of
    the build (which may take seconds), is the confirmation."""
    async def main() -> None:
        pool, clock = Pool(), Clock()
        source = _source(pool, clock)
        await source.refresh()
        pool.active = 7
        clock.now += INTERVAL
        asked = clock.now
        assert await source.refresh()
        assert source.table.version == 7 and source.confirmed_at == asked

    asyncio.run(main())


def test_writers_delete_card_keys_for_as_long_as_a_node_may_cache_under_a_version() -> None:
    """A node last confirmed at C caches until C + grace; its keys then live up to the Redis TTL at its
    longest, and a near-cache copy the near-cache TTL: writers must delete under the version that long."""
    s = replace(Settings(), cache_ttl=300.0, cache_ttl_jitter=0.1, near_cache_ttl=2.0, bin_poll_interval=5.0,
                pg_timeout=2.0)
    assert card_answer_life(s) >= 300 * 1.1 + 2.0 + FILL_GRACE_POLLS * 5.0 + 2 * 2.0
