"""What a Redis shard says about itself (DBSIZE, INFO): keys, memory, hits and misses.

Read by `crs shards status` and, every `shard_stats_interval`, by each node for its metrics.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

STATS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class ShardStats:
    keys: int
    memory_bytes: int
    hits: int          # INFO stats keyspace_hits, since start or CONFIG RESETSTAT
    misses: int
    error_replies: int

    @property
    def hit_ratio(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


async def read_stats(client: aioredis.Redis, *, timeout: float) -> ShardStats:
    async def both() -> tuple[int, dict[str, Any]]:
        keys = int(await client.dbsize())
        info = await client.info()
        return keys, info

    async with asyncio.timeout(timeout):
        keys, info = await both()
    return ShardStats(keys=keys, memory_bytes=int(info.get("used_memory", 0)),
                      hits=int(info.get("keyspace_hits", 0)), misses=int(info.get("keyspace_misses", 0)),
                      error_replies=int(info.get("total_error_replies", 0)))


async def sample_keys(client: aioredis.Redis, *, limit: int, batch: int,
                      timeout: float) -> tuple[int, list[tuple[bytes | str, int]]]:
    """(DBSIZE, up to `limit` keys (0 = all) from SCAN with their MEMORY USAGE in bytes).

    SCAN walks Redis's own hash table, whose order is unrelated to the ring's MD5, so the first keys
    it returns are a fair sample for the planner."""
    async with asyncio.timeout(timeout):
        total = int(await client.dbsize())
    out: list[tuple[bytes | str, int]] = []
    cursor = 0
    while True:
        async with asyncio.timeout(timeout):
            cursor, keys = await client.scan(cursor=cursor, count=batch)
        if limit:
            keys = keys[: limit - len(out)]
        if keys:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.memory_usage(key)
                async with asyncio.timeout(timeout):
                    sizes = await pipe.execute(raise_on_error=False)
            out += [(key, size if isinstance(size, int) else 0) for key, size in zip(keys, sizes, strict=True)]
        if cursor == 0 or (limit and len(out) >= limit):
            return total, out
