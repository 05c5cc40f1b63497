"""What a Redis shard says about itself (DBSIZE, INFO): keys, memory, hits and misses.

Read by `crs shards status` and, every `shard_stats_interval`, by each node for its metrics.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.cache.resp import PipelinedReader, RespReplyError, command

STATS_ERRORS = (RedisError, OSError, asyncio.TimeoutError, RespReplyError, ValueError)
# What a node asks its shards every shard_stats_interval over the lean connection (read_stats_lean).
_STATS_COMMANDS = [command(b"DBSIZE"), command(b"INFO", b"memory"), command(b"INFO", b"stats")]


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


async def read_stats_lean(reader: PipelinedReader) -> ShardStats:
    """`read_stats` over the node's pipelined connection to the shard, for the node's periodic metrics:
    DBSIZE and the two INFO sections written at once, and only the four fields read from the text.
    redis-py's `dbsize()` + `info()` (every field parsed into Python values) cost ~450 µs of node CPU
    per shard per poll, with every node polling every shard. Times out as the connection does."""
    keys, memory, stats = await reader.call(_STATS_COMMANDS)
    if not (isinstance(keys, int) and isinstance(memory, bytes) and isinstance(stats, bytes)):
        raise ValueError(f"unexpected DBSIZE/INFO replies from {reader.address}")
    return ShardStats(keys=keys, memory_bytes=info_field(memory, b"used_memory"),
                      hits=info_field(stats, b"keyspace_hits"), misses=info_field(stats, b"keyspace_misses"),
                      error_replies=info_field(stats, b"total_error_replies"))


def info_field(text: bytes, name: bytes) -> int:
    """An integer field of an INFO reply ("name:value" lines); 0 if absent (as `read_stats`), ValueError
    if not an integer."""
    text = b"\n" + text   # every line, the first too, starts after a newline
    start = text.find(b"\n" + name + b":")
    if start < 0:
        return 0
    start += len(name) + 2
    end = text.find(b"\r", start)
    return int(text[start:end if end >= 0 else None])


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
