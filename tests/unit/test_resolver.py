"""Resolver logic without servers: single-flight, negative caching, error mapping (no Redis tier)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from server.cache.near import NearCache
from server.errors import BackendTimeout, BackendUnavailable, InternalError, NotFound
from server.metrics import Metrics
from server.resolver import CachePolicy, Lookup, Resolver
from server.store.read_route import ReadRoute

PRIMARY = object()   # what each query is given: these fakes of the PostgreSQL load ignore it


def _resolver() -> Resolver:
    return Resolver(near=NearCache(max_entries=100, ttl=60), tier=None, policy=CachePolicy(),
                    metrics=Metrics(CollectorRegistry()),
                    route=ReadRoute.primary_only(PRIMARY, timeout=2.0, fill_window=60.0))


def tiers(resolver: Resolver) -> dict[str, int]:
    """crs_lookups_total by tier, as a scrape would see it: how each caller's answer was obtained."""
    resolver.metrics.flush()
    counts: dict[str, int] = {}
    for metric in resolver.metrics.lookups.collect():
        for sample in metric.samples:
            if sample.name == "crs_lookups_total" and sample.value:
                counts[sample.labels["tier"]] = int(sample.value)
    return counts


class SlowLoader:
    """A fake of the PostgreSQL load: records every call and holds each one until released."""

    def __init__(self, result: bytes | None = b"\x08\x01", error: BaseException | None = None) -> None:
        self.result = result
        self.error = error
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, _conn: object) -> bytes | None:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.result


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the other tasks run until `condition` holds; a bound on loop turns, not on time."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


@pytest.mark.parametrize("callers", [2, 50])
async def test_concurrent_misses_share_one_load(callers: int) -> None:
    resolver = _resolver()
    loader = SlowLoader()
    lookup = Lookup("crd:1:ab", loader, "card")
    waiters = [asyncio.create_task(resolver.resolve(lookup)) for _ in range(callers)]
    await loader.started.wait()
    # Every other caller is now parked on the one load in flight (the loader is still held).
    await until(lambda: tiers(resolver).get("coalesced") == callers - 1, f"{callers - 1} callers coalesced")
    assert loader.calls == 1 and not any(w.done() for w in waiters)
    loader.release.set()
    assert await asyncio.gather(*waiters) == [b"\x08\x01"] * callers
    # One load, everyone else coalesced onto it, every caller counted exactly once.
    assert loader.calls == 1
    assert tiers(resolver) == {"l3": 1, "coalesced": callers - 1}
    assert await resolver.resolve(lookup) == b"\x08\x01"           # now a near-cache hit
    assert loader.calls == 1 and tiers(resolver) == {"l3": 1, "coalesced": callers - 1, "l1": 1}


async def test_a_failed_load_fails_every_coalesced_caller_and_is_not_remembered() -> None:
    resolver = _resolver()
    failing = SlowLoader(error=asyncpg.exceptions.ConnectionDoesNotExistError("gone"))
    lookup = Lookup("crd:1:ba", failing, "card")
    waiters = [asyncio.create_task(resolver.resolve(lookup)) for _ in range(10)]
    await failing.started.wait()
    await until(lambda: tiers(resolver).get("coalesced") == 9, "9 callers coalesced")
    failing.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    assert failing.calls == 1 and tiers(resolver) == {"coalesced": 9}
    # Nothing in flight or cached for the key: the next caller loads afresh.
    working = SlowLoader()
    working.release.set()
    assert await resolver.resolve(Lookup("crd:1:ba", working, "card")) == b"\x08\x01"
    assert working.calls == 1 and tiers(resolver) == {"coalesced": 9, "l3": 1}


async def test_different_keys_are_not_coalesced() -> None:
    resolver = _resolver()
    loaders = [SlowLoader(result=bytes([i])) for i in range(5)]
    waiters = [asyncio.create_task(resolver.resolve(Lookup(f"crd:1:{i}", ld, "card"))) for i, ld in enumerate(loaders)]
    for ld in loaders:
        await ld.started.wait()
        ld.release.set()
    assert await asyncio.gather(*waiters) == [bytes([i]) for i in range(5)]
    assert [ld.calls for ld in loaders] == [1] * 5
    assert tiers(resolver) == {"l3": 5}


async def test_duplicate_keys_in_a_batch_share_one_load() -> None:
    resolver = _resolver()
    loader = SlowLoader()
    loader.release.set()
    batch = [Lookup("crd:1:dd", loader, "card")] * 4
    assert await resolver.resolve_many(batch) == [b"\x08\x01"] * 4
    assert loader.calls == 1 and tiers(resolver) == {"l3": 1, "coalesced": 3}


async def test_unknown_keys_are_cached_negatively() -> None:
    resolver = _resolver()
    calls = 0

    async def load(_conn: object) -> None:
        nonlocal calls
        calls += 1

    for _ in range(3):
        with pytest.raises(NotFound, match="card not found"):
            await resolver.resolve(Lookup("crd:1:cd", load, "card"))
    assert calls == 1


async def test_database_errors_become_backend_errors_and_are_not_cached() -> None:
    resolver = _resolver()
    failures = [asyncpg.exceptions.ConnectionDoesNotExistError("gone"), TimeoutError()]

    async def load(_conn: object) -> bytes:
        if failures:
            raise failures.pop(0)
        return b"ok"

    lookup = Lookup("crd:1:ef", load, "card")
    with pytest.raises(BackendUnavailable):
        await resolver.resolve(lookup)
    with pytest.raises(BackendTimeout):
        await resolver.resolve(lookup)
    assert await resolver.resolve(lookup) == b"ok"


async def test_batch_mixes_hits_misses_and_not_found_in_order() -> None:
    resolver = _resolver()
    resolver.near.put("k1", b"one")

    async def two(_conn: object) -> bytes:
        return b"two"

    async def nothing(_conn: object) -> None:
        return None

    async def never(_conn: object) -> bytes:
        raise AssertionError("a near-cache hit must not load")

    answers = await resolver.resolve_many([Lookup("k1", never, "card"), Lookup("k2", two, "card"),
                                           Lookup("k3", nothing, "account"), Lookup("k2", two, "card")])
    assert answers[0] == b"one" and answers[1] == b"two" and answers[3] == b"two"
    assert isinstance(answers[2], NotFound) and answers[2].message == "account not found"


async def test_a_bug_while_loading_is_internal_for_its_key_only_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected error in a load (a bug, not a database error): INTERNAL for that key, logged once
    however many callers waited; the batch's other keys are answered. It was UNAVAILABLE (retry: it
    will fail again), and unlogged, for a batch key, and it ended a whole stream."""
    resolver = _resolver()

    async def broken(_conn: object) -> bytes:
        raise KeyError("a column the query no longer returns")

    async def fine(_conn: object) -> bytes:
        return b"fine"

    with caplog.at_level("ERROR", logger="crs.resolver"):
        answers = await resolver.resolve_many([Lookup("k1", broken, "card"), Lookup("k2", fine, "card"),
                                               Lookup("k1", broken, "card")])
        with pytest.raises(InternalError, match="internal error while loading"):
            await resolver.resolve(Lookup("k3", broken, "account"))
    assert isinstance(answers[0], InternalError) and answers[0].code.name == "INTERNAL"
    assert answers[1] == b"fine" and isinstance(answers[2], InternalError)
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error while loading"]
    assert [r.kind for r in logged] == ["card", "account"] and logged[0].exc_info   # type: ignore[attr-defined]
    assert resolver.near.get("k1") is None   # nothing cached


async def test_refresh_ahead_reloads_a_hot_entry_in_the_background() -> None:
    """A hit on a due entry answers at once and reloads the key on the loop; the reload is counted
    as a refresh, not as an answer, and a failed reload leaves the entry to expire."""
    now = [0.0]
    near = NearCache(max_entries=100, ttl=1.0, refresh=0.25, clock=lambda: now[0])
    resolver = Resolver(near=near, tier=None, policy=CachePolicy(), metrics=Metrics(CollectorRegistry()),
                        route=ReadRoute.primary_only(PRIMARY, timeout=2.0, fill_window=60.0))
    resolver.start_refreshing(asyncio.get_running_loop())
    loader = SlowLoader(result=b"\x08\x01")
    lookup = Lookup("crd:1:re", loader, "card")
    loader.release.set()
    assert await resolver.resolve(lookup) == b"\x08\x01"          # a miss: loaded once
    assert loader.calls == 1
    now[0] = 0.79
    loader.result = b"\x08\x02"
    assert resolver.cached(lookup) == b"\x08\x01"                  # due: still answered from L1 now
    await until(lambda: loader.calls == 2, "the background reload")
    await until(lambda: near.get("crd:1:re") == b"\x08\x02", "the reloaded value in L1")
    assert tiers(resolver) == {"l1": 1, "l3": 1}                   # one answer each: the reload is no answer

    def refreshed() -> dict[str, float]:
        return {s.labels["outcome"]: s.value for m in resolver.metrics.near_refreshes.collect()
                for s in m.samples if s.name == "crs_near_cache_refreshes_total"}

    await until(lambda: refreshed() != {}, "the reload counted")   # once its wait for the fill returns
    assert refreshed() == {"refreshed": 1.0}
    now[0] = 0.79 + 0.79
    loader.error = asyncpg.PostgresConnectionError("down")
    assert resolver.cached(lookup) == b"\x08\x02"
    await until(lambda: loader.calls == 3, "the failing reload")
    await until(lambda: any(s.labels.get("outcome") == "failed" for m in resolver.metrics.near_refreshes.collect()
                            for s in m.samples), "the failure counted")
    assert resolver.cached(lookup) == b"\x08\x02" and loader.calls == 3   # not retried
    now[0] += 0.3
    assert resolver.cached(lookup) is None                         # expired, never served past it
    resolver.stop()


def test_a_fill_s_ttl_is_a_whole_millisecond_at_least() -> None:
    """Redis refuses SET ... PX 0 (every fill of such a node failed), and a TTL under 1 ms passes the
    settings' check (> 0); seventeenth audit, open item."""
    policy = CachePolicy(ttl=0.0004, ttl_jitter=0.1, negative_ttl=0.0002)
    assert policy.ttl_ms(False) == 1 and policy.ttl_ms(True) == 1
    assert CachePolicy().ttl_ms(True) == 30_000 and 270_000 <= CachePolicy().ttl_ms(False) <= 330_000


class _RecordingTier:
    """A tier whose deletes succeed after one pass of the event loop; it records each call's keys."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def invalidate(self, keys: list[str], *, position: int | None = None) -> bool:
        self.calls.append(len(keys))
        await asyncio.sleep(0)
        return True


async def test_a_write_naming_a_big_customers_keys_leaves_the_event_loop_free_between_steps() -> None:
    """97,000 keys (a customer with 34,000 cards): expanded, discarded, sorted and hashed at once they
    held the node's event loop for most of a second, every lookup it served waiting. Now a step of
    INVALIDATE_STEP keys at a time, with other tasks run between steps; every key still goes."""
    tier = _RecordingTier()
    near = NearCache(max_entries=200_000, ttl=60)
    resolver = Resolver(near=near, tier=tier, policy=CachePolicy(),  # type: ignore[arg-type]
                        metrics=Metrics(CollectorRegistry()),
                        route=ReadRoute.primary_only(PRIMARY, timeout=2.0, fill_window=60.0))
    keys = [f"tok:tok_{i:024d}" for i in range(97_000)]
    for key in keys[::1000]:
        near.put(key, b"\x08\x01")
    ticks: list[int] = []

    async def ticker() -> None:
        while True:
            ticks.append(len(tier.calls))
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    assert await resolver.invalidate(keys, position=0, bin_versions=[3])
    task.cancel()
    assert sum(tier.calls) == 97_000 * 2 * 2                       # generations 1-2, BIN versions 0 and 3
    assert max(tier.calls) <= 5_000 * 4 and len(set(ticks)) >= 20   # the loop ran other tasks between steps
    assert all(near.get(key) is None for key in keys[::1000])
