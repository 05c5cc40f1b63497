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
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from server import cache_keys as ck
from server.cache.near import NearCache
from server.cache.shard import ShardUnavailable
from server.cache.thread_reads import L2, ThreadReads
from server.cache.tier import RedisTier
from server.cache_keys import NEGATIVE
from server.errors import BackendUnavailable, CrsError, InternalError, NotFound
from server.logs import LIMIT_KEY
from server.metrics import Metrics
from server.store.db import DB_ERRORS, bounded, pool_timeout
from server.store.read_route import NEVER, Loaded, Read, ReadRoute

log = logging.getLogger("crs.resolver")

# Keys a write names, invalidated a step at a time, the event loop free between steps. A write to a
# corporate customer names every key of its cards (34,000 cards: 97,000 keys, 390,000 with their
# generation and BIN forms); expanded, dropped from the near-cache, sorted and hashed to their shards
# at once, that held the node process's event loop for most of a second, and every lookup it served
# waited (measured: 9 ms at most before, 930 ms during the write).
INVALIDATE_STEP = 5_000
REFRESH_LIMIT = 256   # near-cache refreshes in flight per node process


@dataclass(frozen=True)
class CachePolicy:
    ttl: float = 300.0
    ttl_jitter: float = 0.1
    negative_ttl: float = 30.0

    def ttl_ms(self, negative: bool) -> int:
        """The PX of a fill: at least 1 (Redis refuses PX 0, and a TTL under 1 ms passes the settings)."""
        if negative:
            return max(1, int(self.negative_ttl * 1000))
        spread = self.ttl * self.ttl_jitter
        return max(1, int((self.ttl + random.uniform(-spread, spread)) * 1000))


class Lookup(NamedTuple):
    """One key to resolve: its cache key, how to load it from PostgreSQL (a query given a pool or
    connection: the read route picks replica or primary), and how to name it in errors. A tuple, not
    a frozen dataclass: one is built per key on the hit path, and a frozen dataclass's __init__ costs
    0.6 µs to a tuple's 0.25."""

    cache_key: str
    load: Read
    what: str  # "card", "account", "customer": for NOT_FOUND messages (never the key itself)


class Resolver:
    def __init__(self, *, near: NearCache, tier: RedisTier | None, policy: CachePolicy,
                 metrics: Metrics, route: ReadRoute, load_timeout: float = 2.0, batch_loads: int = 0) -> None:
        self.route = route
        self.near = near
        self.tier = tier
        self.policy = policy
        self.metrics = metrics
        # Bounds the whole load, pool wait and (re)connect included, not just the query.
        self.load_timeout = load_timeout
        # One batch's PostgreSQL loads at once (0: all): the others wait their turn, outside load_timeout,
        # instead of queueing for the pool inside it (1,000 misses timed out behind each other).
        self.batch_loads = batch_loads
        # The hybrid serving model sets it: `now` reads Redis on the gRPC thread (server/cache/thread_reads.py).
        self.thread_reads: ThreadReads | None = None
        # The BIN table versions card answers may be cached under (server/bin_source.py sets it).
        self.bin_versions: Callable[[], Iterable[int]] = lambda: (0,)
        self._inflight: dict[str, asyncio.Task[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None   # refresh-ahead runs here once started
        self._refreshes: set[asyncio.Task[None]] = set()

    # -- one key ---------------------------------------------------------------------------------
    def cached(self, lookup: Lookup) -> bytes | None:
        """The answer if the near-cache holds it (NotFound for a negative entry), else None. No I/O:
        the hybrid serving model calls it on gRPC threads and answers a hit there."""
        value = self.peek(lookup)
        if value is not None:
            self.metrics.tier_hit("l1")
        return value

    def now(self, lookup: Lookup) -> bytes | L2:
        """What can be answered without the event loop: the near-cache, then (with `thread_reads`, on a
        gRPC thread) one blocking GET on the key's shard. The answer (NotFound for a negative entry),
        or what that GET leaves `resolve` to do on the loop. A Redis hit is counted and kept in the
        near-cache as `resolve` does it."""
        value = self.cached(lookup)
        if value is not None:
            return value
        if self.thread_reads is None:
            return L2.ASK
        got = self.thread_reads.get(lookup.cache_key)
        if isinstance(got, L2):
            return got
        self.metrics.tier_hit("l2")
        self.near.put(lookup.cache_key, got)
        if got == NEGATIVE:
            raise NotFound(f"{lookup.what} not found")
        return got

    def peek(self, lookup: Lookup) -> bytes | None:
        """cached() without counting the hit: a batch counts its hits once."""
        value, due = self.near.read(lookup.cache_key)
        if due:
            self.refresh_soon(lookup)
        if value == NEGATIVE:
            self.metrics.tier_hit("l1")
            raise NotFound(f"{lookup.what} not found")
        return value

    # -- refresh-ahead (server/cache/near.py): a hot entry reloads before it expires -----------------
    def start_refreshing(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload near-cache entries a hit found due, on `loop`, at most REFRESH_LIMIT at once (more
        are skipped: those entries expire and refill on a caller's miss, as without refresh-ahead)."""
        self._loop = loop

    def stop(self) -> None:
        """The node is stopping (its server has): no more refreshes, and the refreshes and fills
        still in flight are cancelled (their callers have ended)."""
        self._loop = None
        for task in [*self._refreshes, *self._inflight.values()]:
            task.cancel()

    def refresh_soon(self, lookup: Lookup) -> None:   # any thread: a gRPC thread or the loop
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._start_refresh, lookup)
            except RuntimeError:   # the loop closed under us: the node is stopping
                pass

    def _start_refresh(self, lookup: Lookup) -> None:   # on the loop
        if self._loop is None:
            return
        if len(self._refreshes) >= REFRESH_LIMIT:
            self.metrics.near_refresh("skipped")
            return
        task = asyncio.get_running_loop().create_task(self._refresh(lookup))
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _refresh(self, lookup: Lookup) -> None:
        try:
            await self._single_flight(lookup, count=False)
        except Exception:   # the entry expires; the next caller's miss reports what is wrong
            self.metrics.near_refresh("failed")
        else:
            self.metrics.near_refresh("refreshed")

    async def resolve(self, lookup: Lookup, l2: L2 = L2.ASK) -> bytes:
        """The serialized answer for one key, or NotFound / BackendUnavailable. `l2`: what `now` left
        to do (a key Redis was already asked for is not asked again)."""
        value = self.cached(lookup)
        if value is not None:
            return value
        value = await self._single_flight(lookup, l2=l2)
        if value == NEGATIVE:
            raise NotFound(f"{lookup.what} not found")
        return value

    async def _single_flight(self, lookup: Lookup, *, count: bool = True, l2: L2 = L2.ASK) -> bytes:
        """`count`: the answer goes to a caller (counted by tier), not to a refresh. A caller that
        joins a fill in flight takes its answer, whatever its own `l2`.

        The fill is a task of its own, not the first caller's: every caller, the first included,
        only waits for it (shielded), so a caller that leaves (its deadline, a cancel) stops its own
        wait and nobody else's. When the fill ran inside the first caller, its cancellation was
        handed to every caller that had joined (CANCELLED at once, or a stream key never answered).
        A fill nobody waits for any more still ends (bounded by load_timeout) and fills the caches."""
        key = lookup.cache_key
        fill = self._inflight.get(key)
        if fill is None:
            fill = asyncio.get_running_loop().create_task(self._fill(lookup, count, l2))
            self._inflight[key] = fill
            fill.add_done_callback(partial(self._filled, key))
        elif count:
            self.metrics.tier_hit("coalesced")
        return await asyncio.shield(fill)

    def _filled(self, key: str, fill: asyncio.Task[bytes]) -> None:
        if self._inflight.get(key) is fill:
            del self._inflight[key]
        if not fill.cancelled():
            fill.exception()   # retrieved: no "never retrieved" warning when every caller had left

    async def _fill(self, lookup: Lookup, count: bool = True, l2: L2 = L2.ASK) -> bytes:
        try:
            return await self._fill_now(lookup, count, l2)
        except CrsError:
            raise
        except Exception as exc:   # a bug: logged once per fill; each caller's key answers INTERNAL
            log.exception("unhandled error while loading",
                          extra={"kind": lookup.what, LIMIT_KEY: (lookup.what, type(exc).__name__)})
            raise InternalError("internal error while loading") from exc

    async def _fill_now(self, lookup: Lookup, count: bool, l2: L2) -> bytes:
        key = lookup.cache_key
        tier_ok = self.tier is not None and l2 is not L2.DOWN
        if self.tier is not None and l2 is L2.ASK:
            try:
                cached = await self.tier.get(key)
            except ShardUnavailable:
                tier_ok = False
                cached = None
            if cached is not None:
                if count:
                    self.metrics.tier_hit("l2")
                self.near.put(key, cached)
                return cached
        loaded = await self._load(lookup, count)
        value = NEGATIVE if loaded.value is None else loaded.value
        # An answer may be cached only within its read's freshness window (server/store/read_route.py).
        clock = self.route.clock
        if clock() < loaded.fill_by:
            tier = self.tier if tier_ok else None
            in_redis = False
            if tier is not None:   # sent within the window too, a connection (re)opened meanwhile included
                in_redis = await tier.set_many([(key, value, self.policy.ttl_ms(value == NEGATIVE))],
                                               not_after=time.monotonic() + loaded.fill_by - clock())
            if clock() < loaded.fill_by:
                self.near.put(key, value)
            elif not in_redis:   # sent to Redis in time, it is cached there: only the near-cache copy is skipped
                self.metrics.fill_dropped()
        elif loaded.fill_by != NEVER:   # NEVER: not cacheable at all (Uncacheable, a replica while the primary is out)
            self.metrics.fill_dropped()
        return value

    async def _load(self, lookup: Lookup, count: bool = True) -> Loaded:
        try:
            # Bounds the whole load, pool wait, reconnect and replica fallback included.
            loaded = await bounded(self.route.read(lookup.load), self.load_timeout)
        except CrsError:
            raise
        except TimeoutError as exc:
            raise pool_timeout(self.route.primary) from exc
        except DB_ERRORS as exc:
            raise BackendUnavailable("the database is unavailable") from exc
        if count:
            self.metrics.tier_hit("l3" if loaded.value is not None else "l3_negative")
        return loaded

    # -- many keys -------------------------------------------------------------------------------
    async def resolve_many(self, lookups: Sequence[Lookup]) -> list[bytes | CrsError]:
        """Answers in order; each key fails on its own. L2 is read with one MGET per shard, all
        shards concurrently; the misses load from PostgreSQL concurrently, `batch_loads` at a time."""
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
            turns = asyncio.Semaphore(self.batch_loads or len(missing))

            async def load(lookup: Lookup) -> bytes:
                async with turns:
                    return await self._single_flight(lookup)

            results = await asyncio.gather(*(load(lookups[i]) for i in missing), return_exceptions=True)
            for i, r in zip(missing, results, strict=True):
                if isinstance(r, CrsError | bytes):
                    out[i] = r
                elif isinstance(r, BaseException):
                    raise r   # a cancellation: _fill turns every error into a CrsError
        final: list[bytes | CrsError] = []
        for lk, answer in zip(lookups, out, strict=True):
            assert answer is not None
            final.append(NotFound(f"{lk.what} not found") if answer == NEGATIVE else answer)
        return final

    # -- invalidation --------------------------------------------------------------------------
    async def invalidate(self, keys: Sequence[str], *, position: int | None = None,
                         bin_versions: Iterable[int] | None = None) -> bool:
        """Drop keys here, on their shards, and (via pub/sub) on every other node. True if all acked.

        Call it after the write committed. With read replicas the announcement carries the primary's
        position (`position`, else read now), so no node answers from a replica older than the write.
        Each key goes under the cache format generations either side of this release's too, and card
        keys under every BIN table version their answers may be cached under (`bin_versions`, else
        this node's): cache_keys.invalidation_keys."""
        versions = list(self.bin_versions() if bin_versions is None else bin_versions)
        if position is None:
            position = await self.route.write_position()
        acked = True
        for start in range(0, max(len(keys), 1), INVALIDATE_STEP):
            part = ck.invalidation_keys(keys[start:start + INVALIDATE_STEP], versions)
            self.on_invalidated(part, position)
            if self.tier is not None:
                acked = await self.tier.invalidate(part, position=position) and acked
            elif len(keys) > INVALIDATE_STEP:
                await asyncio.sleep(0)
        return acked

    def on_invalidated(self, keys: Sequence[str], position: int | None) -> None:
        """Keys another node (or this one) invalidated, with the write's primary position if known."""
        self.route.saw_write(position)
        self.near.discard(keys)
