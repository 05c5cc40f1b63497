"""The BIN table a node answers from, hot-reloaded (docs/bins.md).

Every `bin_poll_interval` seconds the node reads the active version; when it changed, it loads
that version's rows and builds the index in a worker thread (a 500k-range table takes a few
seconds of CPU), then swaps one reference: a lookup sees the old table or the new one, never a mix,
and never waits for the build. A database that cannot be reached keeps the table the node has.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from server.bins import EMPTY, BinTable, build
from server.metrics import Metrics
from server.store import bins as store
from server.store.db import DB_ERRORS

log = logging.getLogger("crs.bins")


class BinSource:
    def __init__(self, *, pool: asyncpg.Pool, metrics: Metrics, interval: float, timeout: float,
                 cached_for: float) -> None:
        self.pool = pool
        self.metrics = metrics
        self.interval = interval
        self.timeout = timeout
        self.cached_for = cached_for    # how long a card answer may stay cached (the Redis TTL, at most)
        self.table: BinTable = EMPTY
        # False until a poll has read which version is active (version 0 then means: none is): until then
        # an empty table is not an answer (ResolveBin UNAVAILABLE, not NOT_FOUND).
        self.known = False
        # The BIN versions card answers may be cached under, as of the last poll (cache_keys.with_bin_versions).
        self.versions: tuple[int, ...] = (0,)

    async def refresh(self) -> bool:
        """Load the active version if it is not the one held; True when the table changed."""
        async with self.pool.acquire(timeout=self.timeout) as conn:
            version, recent = await store.versions_in_use(conn, within=self.cached_for)   # one query a poll
            self.versions = (0, *recent)
            if version == self.table.version:
                self.known = True
                return False
            rows = await store.load_rows(conn, version) if version else []
        started = time.perf_counter()
        table = await asyncio.to_thread(build, rows, version)
        self.versions = tuple(sorted({*self.versions, version}))
        self.table = table
        self.known = True
        self.metrics.bin_table_version.set(version)
        self.metrics.bin_table_ranges.set(len(table))
        log.info("BIN table loaded", extra={"version": version, "ranges": len(table),
                                            "build_seconds": round(time.perf_counter() - started, 3)})
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except DB_ERRORS as exc:
                log.warning("could not refresh the BIN table; keeping the one held",
                            extra={"error": type(exc).__name__, "version": self.table.version})
            await asyncio.sleep(self.interval)
