"""The BIN table a node answers from, hot-reloaded (docs/bins.md).

Every `bin_poll_interval` seconds the node reads the active version; when it changed, it loads
that version's rows and builds the index in a worker thread (a 500k-range table takes a few
seconds of CPU), then swaps one reference: a lookup sees the old table or the new one, never a mix,
and never waits for the build. A database that cannot be reached keeps the table the node has.

Card answers are cached under the table version they were built with, and writers delete a card's
keys under every version deactivated less than `cached_for` ago. A node that has not confirmed its
version for longer than FILL_GRACE_POLLS polls (it cannot read `bin_tables`, or a rollback went past it
while it was out) could still be caching under a version writers no longer delete: it serves its card
answers uncached until a poll confirms a version again (`cacheable`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import asyncpg

from server.bins import EMPTY, BinTable, build
from server.metrics import Metrics
from server.settings import Settings
from server.store import bins as store
from server.store.db import DB_ERRORS
from server.store.read_route import Read, Uncacheable

log = logging.getLogger("crs.bins")

# A node caches card answers for this many poll intervals after a poll confirmed its table's version:
# one poll may fail, or a new table's build run into the next, without the node's misses going uncached.
FILL_GRACE_POLLS = 2


def card_answer_life(s: Settings) -> float:
    """Seconds after its version's deactivation a card answer may still be in a cache: the Redis TTL
    at its longest, the near-cache's, and how long after its last confirmation a node still caches under
    a version (FILL_GRACE_POLLS polls, plus that poll's and the answer's read, each up to pg_timeout).
    Writers delete card keys under every version deactivated less than this ago."""
    grace = FILL_GRACE_POLLS * s.bin_poll_interval + 2 * s.pg_timeout
    return s.cache_ttl * (1 + s.cache_ttl_jitter) + s.near_cache_ttl + grace


class BinTableHolder(Protocol):
    """What lookups need of a BinSource (tests give them a stand-in)."""

    table: BinTable     # replaced whole when a new version is loaded
    known: bool         # the active version was read (False: the database was out since the start)

    def cacheable(self, load: Read) -> Read: ...


class BinSource:
    def __init__(self, *, pool: asyncpg.Pool, metrics: Metrics, interval: float, timeout: float,
                 cached_for: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.metrics = metrics
        self.interval = interval
        self.timeout = timeout
        self.cached_for = cached_for    # how long a card answer may stay cached (card_answer_life)
        self.clock = clock
        # When (self.clock) a poll that found the held table's version in force was sent: card answers
        # built with it are cached until FILL_GRACE_POLLS intervals after (`cacheable`).
        self.confirmed_at = -math.inf
        self.grace = FILL_GRACE_POLLS * interval
        self.table: BinTable = EMPTY
        # False until a poll has read which version is active (version 0 then means: none is): until then
        # an empty table is not an answer (ResolveBin UNAVAILABLE, not NOT_FOUND).
        self.known = False
        # The BIN versions card answers may be cached under, as of the last poll (cache_keys.invalidation_keys).
        self.versions: tuple[int, ...] = (0,)

    async def refresh(self) -> bool:
        """Load the active version if it is not the one held; True when the table changed."""
        asked = self.clock()   # the version read was in force at some time after this
        async with self.pool.acquire(timeout=self.timeout) as conn:
            version, recent = await store.versions_in_use(conn, within=self.cached_for)   # one query a poll
            self.versions = (0, *recent)
            if version == self.table.version:
                self.known = True
                self.confirmed_at = asked
                return False
            rows = await store.load_rows(conn, version) if version else []
        started = time.perf_counter()
        table = await asyncio.to_thread(build, rows, version)
        self.versions = tuple(sorted({*self.versions, version}))
        self.table = table
        self.known = True
        self.confirmed_at = asked   # the old table's confirmation covered the build, if it was recent
        self.metrics.bin_table_version.set(version)
        self.metrics.bin_table_ranges.set(len(table))
        log.info("BIN table loaded", extra={"version": version, "ranges": len(table),
                                            "build_seconds": round(time.perf_counter() - started, 3)})
        return True

    @property
    def confirmed(self) -> bool:
        """A poll confirmed the held table's version recently enough for its card answers to be cached."""
        return self.clock() - self.confirmed_at <= self.grace

    def cacheable(self, load: Read) -> Read:
        """`load`, while the held table's version is `confirmed`; else a load whose answers are served
        but not cached (Uncacheable): writers may no longer delete keys under that version. (Each card
        lookup asks: `confirmed` inlined.)"""
        if self.clock() - self.confirmed_at <= self.grace:
            return load

        async def uncached(conn: Any) -> bytes | Uncacheable | None:
            value = await load(conn)
            return value if isinstance(value, Uncacheable) else Uncacheable(value)
        return uncached

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except DB_ERRORS as exc:
                log.warning("could not refresh the BIN table; keeping the one held" + (
                            "" if self.confirmed else ", its card answers served uncached until a poll succeeds"),
                            extra={"error": type(exc).__name__, "version": self.table.version})
            await asyncio.sleep(self.interval)
