"""Where a cache miss reads: PostgreSQL replicas when configured, the primary otherwise (DESIGN.md §3).

A replica lags, and a value read from it must never be cached after the invalidation of a newer
write. The rule (docs/decisions.md, "Replica reads"): the node polls the primary's WAL insert
position every `position_interval` and keeps the recent (time, position) pairs. A replica read first
asks the replica how far it has replayed (`pg_last_wal_replay_lsn()`, in its own statement, so the
value is a lower bound of what the read then sees), then reads. The answer holds every write that
committed before the newest poll whose position the replica has replayed: it is as fresh as a
primary read made at that poll's start. The outbox relay deletes every write's keys again
`reinvalidate_delay` after its commit, so a fill made within that delay of the poll is cleaned like a
primary read that raced a write: the read may fill the cache until `covered + fill_window`
(`Loaded.fill_by`; the window is `reinvalidate_delay` less one Redis command's timeout, for the fill
itself), and later not at all.

That rule covers writes the node has not heard of. For the ones it has, it is stricter: every
invalidation carries the primary's position read after the write committed (`write_position()`,
published with the keys), and the node never uses a replica that has not replayed past the newest
such position it has seen (`saw_write()`). Once a change's invalidation reached a node, as its
near-cache entry is dropped, no read there answers older data, from a cache or from a replica.

A replica that cannot show it is fresh enough (paused replay, lag, no recent primary position) is
not used for that key: the primary answers. When the primary cannot (it is down), the replica's
answer is served but not cached. A replica that fails falls back to the primary. With no replica
configured every read goes to the primary.

A primary read is bound by the same rule: its snapshot holds every write committed before the query
was sent, so it may fill the caches until the query's start + `fill_window`, and later not at all. A
read that took longer (a slow plan, a lock, a stalled connection) is served but not cached:
otherwise a snapshot taken before a write commits could be written to Redis after the relay's second
delete of that write, and answer the old row for the whole TTL (docs/decisions.md, "Slow reads").
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from server.store.db import DB_ERRORS, bounded

log = logging.getLogger("crs.read_route")


@dataclass(frozen=True, slots=True)
class Uncacheable:
    """A query's answer that may be served but not cached: no write would ever invalidate the key it
    would be cached under (a row found under another fingerprint version than the reader's own:
    server/lookup.py, `_any_version`)."""
    value: bytes | None


Read = Callable[[Any], Awaitable[bytes | Uncacheable | None]]   # one lookup's query, given a pool or connection
# NULL on a primary (after a promotion pg_last_wal_replay_lsn() stays at the end of recovery).
REPLAY_SQL = "SELECT CASE WHEN pg_is_in_recovery() THEN (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8 END"
POSITION_SQL = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8"
NEVER = -math.inf


@dataclass(frozen=True, slots=True)
class Loaded:
    value: bytes | None
    fill_by: float   # monotonic time until which the value may be written to the caches


def _loaded(value: bytes | Uncacheable | None, fill_by: float) -> Loaded:
    if isinstance(value, Uncacheable):
        return Loaded(value.value, NEVER)
    return Loaded(value, fill_by)


class Positions:
    """Recent (monotonic time the poll started, primary WAL position) pairs, oldest first. Pure."""

    def __init__(self, *, keep: float) -> None:
        self.keep = keep
        self._polls: deque[tuple[float, int]] = deque()

    def add(self, started: float, position: int) -> None:
        self._polls.append((started, position))
        while self._polls and self._polls[0][0] < started - self.keep:
            self._polls.popleft()

    def covered_since(self, replayed: int) -> float | None:
        """Start time of the newest poll at or below `replayed`: the replica holds every commit
        made before it. None when the replica is behind every poll kept (or none was made). (Polls
        may finish out of order; any poll at or below `replayed` is a true bound, an older one only
        a more cautious one.)"""
        for started, position in reversed(self._polls):
            if position <= replayed:
                return started
        return None


class ReadRoute:
    def __init__(self, *, primary: Any, replica: asyncpg.Pool | None, fill_window: float,
                 position_interval: float, timeout: float, replica_timeout: float,
                 on_read: Callable[[str], None] | None = None, on_staleness: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.primary = primary
        self.replica = replica
        self.fill_window = fill_window
        self.position_interval = position_interval
        self.timeout = timeout                    # the primary position poll
        self.replica_timeout = replica_timeout    # one replica read, before falling back to the primary
        self._staleness = 0.0
        self._write_floor = 0       # newest primary position of a write whose invalidation this node saw
        self.positions = Positions(keep=max(60.0, fill_window * 4))
        self._on_read = on_read or (lambda _route: None)
        self._on_staleness = on_staleness or (lambda _seconds: None)
        self.clock = clock   # monotonic seconds: the fill deadlines (Loaded.fill_by) are on this clock

    @classmethod
    def primary_only(cls, primary: Any, *, timeout: float, fill_window: float,
                     clock: Callable[[], float] = time.monotonic) -> ReadRoute:
        """Every read on `primary` (a pool, or anything the queries accept), cacheable within
        `fill_window` of its start."""
        return cls(primary=primary, replica=None, fill_window=fill_window, position_interval=1.0,
                   timeout=timeout, replica_timeout=timeout, clock=clock)

    async def _primary(self, query: Read) -> Loaded:
        """A read on the primary: cacheable until its start + fill_window (the module's docstring). The
        clock starts once a pool connection is in hand, when the query is sent: its snapshot is taken
        after that. (Started before the pool wait, a burst of misses larger than the pool serves in
        the window cached nothing: a batch of 1,000 misses, 5 connections.)"""
        primary = self.primary
        if isinstance(primary, asyncpg.Pool):
            async with primary.acquire() as conn:
                started = self.clock()
                return _loaded(await query(conn), started + self.fill_window)
        started = self.clock()
        return _loaded(await query(primary), started + self.fill_window)

    async def read(self, query: Read) -> Loaded:
        """The value and until when it may be cached. Raises the driver's error only when neither
        a replica nor the primary answered."""
        if self.replica is None:
            return await self._primary(query)
        primary_out = False
        if self.lagging:   # the poller saw the replica behind: its answer could not be cached
            try:
                loaded = await self._primary(query)
            except DB_ERRORS:
                primary_out = True
            else:
                self._on_read("primary_replica_behind")
                return loaded
        started = self.clock()
        try:
            replayed, value = await self._replica_read(query)
        except DB_ERRORS as exc:
            if primary_out:
                raise
            self._on_read("primary_replica_failed")
            log.debug("replica read failed; reading the primary", extra={"error": type(exc).__name__})
            return await self._primary(query)
        if replayed is None:            # the read DSN reached a primary (e.g. one just promoted)
            self._on_read("replica")
            return _loaded(value, started + self.fill_window)
        covered = self.positions.covered_since(replayed)
        if self.usable(replayed) and covered is not None and self.clock() < covered + self.fill_window:
            self._on_read("replica")
            return _loaded(value, covered + self.fill_window)
        if not primary_out:
            try:
                loaded = await self._primary(query)
            except DB_ERRORS:
                pass
            else:
                self._on_read("primary_replica_behind")
                return loaded
        self._on_read("replica_uncached")   # the primary is out: answer, but cache nothing
        return _loaded(value, NEVER)

    async def _replica_read(self, query: Read) -> tuple[int | None, bytes | Uncacheable | None]:
        """(replayed position, value), within `replica_timeout`. A hung replica is abandoned, not
        waited for (asyncpg's cancel of a query on a hung server would hang too)."""
        assert self.replica is not None
        replica = self.replica

        async def attempt() -> tuple[int | None, bytes | Uncacheable | None]:
            async with replica.acquire(timeout=self.replica_timeout) as conn:
                replayed = await conn.fetchval(REPLAY_SQL, timeout=self.replica_timeout)
                return replayed, await query(conn)

        return await bounded(attempt(), self.replica_timeout)

    @property
    def lagging(self) -> bool:
        """The poller saw the replica too far behind for its answers to be cached. (Being behind the
        newest invalidated write is checked per read instead: under steady writes a replica is
        usually a few milliseconds behind the newest one, and soon past it.)"""
        return self._staleness >= self.fill_window

    def usable(self, replayed: int) -> bool:
        """Has a replica that replayed up to `replayed` every write this node saw invalidated?"""
        return replayed >= self._write_floor

    def saw_write(self, position: int | None) -> None:
        """An invalidation (this node's or another's) of a write committed at or before `position`."""
        if position is not None and position > self._write_floor:
            self._write_floor = position

    async def write_position(self) -> int | None:
        """With replicas: the primary's position now, for an invalidation of writes that committed
        before this call (None without replicas, or when the primary does not answer)."""
        if self.replica is None:
            return None
        started = self.clock()
        try:
            position = await self.primary.fetchval(POSITION_SQL, timeout=self.timeout)
        except DB_ERRORS:
            return None
        if position is None:
            return None
        self.positions.add(started, int(position))
        return int(position)

    # -- the primary's position, and what the replica shows of it ---------------------------------
    async def run(self) -> None:
        """Until cancelled: poll the primary's WAL position (and report the replica's staleness)."""
        if self.replica is None:
            return
        while True:
            await self.poll_once()
            await asyncio.sleep(self.position_interval)

    async def poll_once(self) -> None:
        if self.replica is None:
            return
        started = self.clock()
        try:
            position = await self.primary.fetchval(POSITION_SQL, timeout=self.timeout)
        except DB_ERRORS:
            pass   # the primary is out: no new position, so replica reads age out of being cacheable
        else:
            if position is not None:
                self.positions.add(started, int(position))
        try:
            replayed = await self.replica.fetchval(REPLAY_SQL, timeout=self.replica_timeout)
        except DB_ERRORS:
            return   # a replica that does not answer keeps its last verdict; reads fall back anyway
        if replayed is None:
            self._staleness = 0.0
        else:
            covered = self.positions.covered_since(int(replayed))
            self._staleness = self.clock() - covered if covered is not None else self.positions.keep
        self._on_staleness(self._staleness)
