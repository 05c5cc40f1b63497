"""The read path: L1 near-cache → L2 Redis shard → L3 PostgreSQL (DESIGN.md §2).

Everything a lookup does after validation happens here, top to bottom:
- values are the serialized response messages, returned as they are (no parse on a hit);
- a miss is loaded once per key per node process however many callers wait (single-flight);
- keys that match nothing are cached negatively (shorter TTL);
- a Redis shard that fails is skipped, its keys served from PostgreSQL; PostgreSQL failing is the
  only thing that turns into UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from server.cache.near import NearCache
from server.cache.shard import ShardUnavailable
from server.cache.tier import RedisTier
from server.cache_keys import NEGATIVE
from server.errors import BackendTimeout, BackendUnavailable, CrsError, NotFound
from server.metrics import Metrics

Loader = Callable[[], Awaitable[bytes | None]]


def _consume(task: asyncio.Future[bytes | None]) -> None:
    if not task.cancelled():
        task.exception()   # retrieved: no "exception was never retrieved" noise


@dataclass(frozen=True)
class CachePolicy:
    ttl: float = 300.0
    ttl_jitter: float = 0.1
    negative_ttl: float = 30.0

    def ttl_ms(self, negative: bool) -> int:
        if negative:
            return int(self.negative_ttl * 1000)
        spread = self.ttl * self.ttl_jitter
        return int((self.ttl + random.uniform(-spread, spread)) * 1000)


@dataclass(frozen=True)
class Lookup:
    """One key to resolve: its cache key, how to load it from PostgreSQL, and how to name it in errors."""

    cache_key: str
    load: Loader
    what: str  # "card", "account", "customer": for NOT_FOUND messages (never the key itself)


class Resolver:
    def __init__(self, *, near: NearCache, tier: RedisTier | None, policy: CachePolicy,
                 metrics: Metrics, load_timeout: float = 2.0) -> None:
        self.near = near
        self.tier = tier
        self.policy = policy
        self.metrics = metrics
        # Bounds the whole load, pool wait and (re)connect included, not just the query.
        self.load_timeout = load_timeout
        self._inflight: dict[str, asyncio.Future[bytes]] = {}

    # -- one key ---------------------------------------------------------------------------------
    def cached(self, lookup: Lookup) -> bytes | None:
        """The answer if the near-cache holds it (NotFound for a negative entry), else None. No I/O:
        the hybrid serving model calls it on gRPC threads and answers a hit there."""
        value = self.near.get(lookup.cache_key)
        if value is None:
            return None
        self.metrics.tier_hit("l1")
        if value == NEGATIVE:
            raise NotFound(f"{lookup.what} not found")
        return value

    async def resolve(self, lookup: Lookup) -> bytes:
        """The serialized answer for one key, or NotFound / BackendUnavailable."""
        value = self.cached(lookup)
        if value is not None:
            return value
        value = await self._single_flight(lookup)
        if value == NEGATIVE:
            raise NotFound(f"{lookup.what} not found")
        return value

    async def _single_flight(self, lookup: Lookup) -> bytes:
        key = lookup.cache_key
        pending = self._inflight.get(key)
        if pending is not None:
            self.metrics.tier_hit("coalesced")
            return await asyncio.shield(pending)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value = await self._fill(lookup)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: no "never retrieved" warning when nobody else waited
            raise
        else:
            fut.set_result(value)
            return value
        finally:
            del self._inflight[key]

    async def _fill(self, lookup: Lookup) -> bytes:
        key = lookup.cache_key
        tier_ok = self.tier is not None
        if self.tier is not None:
            try:
                cached = await self.tier.get(key)
            except ShardUnavailable:
                tier_ok = False
                cached = None
            if cached is not None:
                self.metrics.tier_hit("l2")
                self.near.put(key, cached)
                return cached
        value = await self._load(lookup)
        if tier_ok and self.tier is not None:
            await self.tier.set_many([(key, value, self.policy.ttl_ms(value == NEGATIVE))])
        self.near.put(key, value)
        return value

    async def _load(self, lookup: Lookup) -> bytes:
        try:
            loaded = await self._bounded(lookup.load())
        except CrsError:
            raise
        except TimeoutError as exc:
            raise BackendTimeout("the database did not answer in time") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise BackendUnavailable("the database is unavailable") from exc
        self.metrics.tier_hit("l3" if loaded is not None else "l3_negative")
        return NEGATIVE if loaded is None else loaded

    async def _bounded(self, load: Awaitable[bytes | None]) -> bytes | None:
        """Await `load` at most load_timeout. On timeout it is cancelled but not waited for: asyncpg's
        cleanup of a cancelled query (a cancel request to the server) would hang on a hung database."""
        task = asyncio.ensure_future(load)
        try:
            done, _ = await asyncio.wait((task,), timeout=self.load_timeout)
        except asyncio.CancelledError:   # the caller went away: so does its load
            task.cancel()
            task.add_done_callback(_consume)
            raise
        if not done:
            task.cancel()
            task.add_done_callback(_consume)
            raise BackendTimeout("the database did not answer in time")
        return task.result()

    # -- many keys -------------------------------------------------------------------------------
    async def resolve_many(self, lookups: Sequence[Lookup]) -> list[bytes | CrsError]:
        """Answers in order; each key fails on its own. L2 is read with one MGET per shard, all
        shards concurrently; the misses load from PostgreSQL concurrently (bounded by the pool)."""
        out: list[bytes | CrsError | None] = [None] * len(lookups)
        missing: list[int] = []
        for i, lk in enumerate(lookups):
            value = self.near.get(lk.cache_key)
            if value is None:
                missing.append(i)
            else:
                self.metrics.tier_hit("l1")
                out[i] = value
        if missing and self.tier is not None:
            values = await self.tier.mget([lookups[i].cache_key for i in missing])
            still: list[int] = []
            for i, v in zip(missing, values, strict=True):
                if isinstance(v, bytes):
                    self.metrics.tier_hit("l2")
                    self.near.put(lookups[i].cache_key, v)
                    out[i] = v
                else:
                    still.append(i)
            missing = still
        if missing:
            # Duplicate keys in one batch load once: _single_flight coalesces them.
            results = await asyncio.gather(*(self._single_flight(lookups[i]) for i in missing),
                                           return_exceptions=True)
            for i, r in zip(missing, results, strict=True):
                if isinstance(r, CrsError | bytes):
                    out[i] = r
                elif isinstance(r, BaseException):
                    if not isinstance(r, Exception):
                        raise r
                    out[i] = BackendUnavailable("internal error while loading")
        final: list[bytes | CrsError] = []
        for lk, answer in zip(lookups, out, strict=True):
            assert answer is not None
            final.append(NotFound(f"{lk.what} not found") if answer == NEGATIVE else answer)
        return final

    # -- invalidation --------------------------------------------------------------------------
    async def invalidate(self, keys: Sequence[str]) -> bool:
        """Drop keys here, on their shards, and (via pub/sub) on every other node. True if all acked."""
        self.near.discard(keys)
        if self.tier is None:
            return True
        return await self.tier.invalidate(keys)
