"""Resolver logic without servers: single-flight, negative caching, error mapping (no Redis tier)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from server.cache.near import NearCache
from server.errors import BackendTimeout, BackendUnavailable, NotFound
from server.metrics import Metrics
from server.resolver import CachePolicy, Lookup, Resolver


def _resolver() -> Resolver:
    return Resolver(near=NearCache(max_entries=100, ttl=60), tier=None, policy=CachePolicy(),
                    metrics=Metrics(CollectorRegistry()))


async def test_concurrent_misses_load_once() -> None:
    resolver = _resolver()
    calls = 0
    gate = asyncio.Event()

    async def load() -> bytes:
        nonlocal calls
        calls += 1
        await gate.wait()          # slow database: every caller arrives while the load is in flight
        return b"\x08\x01"

    lookup = Lookup("crd:1:ab", load, "card")
    waiters = [asyncio.create_task(resolver.resolve(lookup)) for _ in range(50)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.gather(*waiters) == [b"\x08\x01"] * 50
    assert calls == 1
    assert await resolver.resolve(lookup) == b"\x08\x01" and calls == 1   # now a near-cache hit


async def test_unknown_keys_are_cached_negatively() -> None:
    resolver = _resolver()
    calls = 0

    async def load() -> None:
        nonlocal calls
        calls += 1

    for _ in range(3):
        with pytest.raises(NotFound, match="card not found"):
            await resolver.resolve(Lookup("crd:1:cd", load, "card"))
    assert calls == 1


async def test_database_errors_become_backend_errors_and_are_not_cached() -> None:
    resolver = _resolver()
    failures = [asyncpg.exceptions.ConnectionDoesNotExistError("gone"), TimeoutError()]

    async def load() -> bytes:
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

    async def two() -> bytes:
        return b"two"

    async def nothing() -> None:
        return None

    async def never() -> bytes:
        raise AssertionError("a near-cache hit must not load")

    answers = await resolver.resolve_many([Lookup("k1", never, "card"), Lookup("k2", two, "card"),
                                           Lookup("k3", nothing, "account"), Lookup("k2", two, "card")])
    assert answers[0] == b"one" and answers[1] == b"two" and answers[3] == b"two"
    assert isinstance(answers[2], NotFound) and answers[2].message == "account not found"
