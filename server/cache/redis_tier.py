"""L2: hash-sharded Redis. The ring (shard_router) picks the shard; this module does the I/O.

Failure policy (DESIGN.md §4): after `failure_threshold` consecutive errors a shard is marked down
for `retry_interval`; its keys go straight to PostgreSQL (never to a neighbour, which would serve
stale data later). When the interval has passed one probe runs: PING, then FLUSHDB — the shard may
have missed invalidations while we could not reach it — and only then does it serve again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from server.settings import ShardAddress
from shard_router import Ring, ShardSpec

log = logging.getLogger("crs.cache")

INVALIDATION_CHANNEL = "crs:invalidate"


class ShardUnavailable(Exception):
    """The shard owning a key cannot be used now; the caller goes to PostgreSQL."""

    def __init__(self, shard: str) -> None:
        super().__init__(f"cache shard {shard} is unavailable")
        self.shard = shard


# Raised by redis-py for a dead, slow or overloaded shard.
_SHARD_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class ShardPolicy:
    failure_threshold: int = 3
    retry_interval: float = 5.0


class Shard:
    __slots__ = ("_probe", "client", "down_until", "failures", "name", "on_state_change", "policy", "url")

    def __init__(self, address: ShardAddress, *, pool_size: int, timeout: float, policy: ShardPolicy,
                 on_state_change: Callable[[str, bool], None]) -> None:
        self.name = address.name
        self.url = address.url
        self.policy = policy
        self.failures = 0
        self.down_until = 0.0           # 0 = up; else monotonic time of the next probe
        self._probe: asyncio.Task[None] | None = None
        self.on_state_change = on_state_change
        pool = aioredis.BlockingConnectionPool.from_url(
            address.url, max_connections=pool_size, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
        )
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)

    @property
    def is_up(self) -> bool:
        return self.down_until == 0.0

    def usable(self) -> bool:
        if self.down_until == 0.0:
            return True
        if time.monotonic() >= self.down_until and self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._recover())
        return False

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.down_until == 0.0 and self.failures >= self.policy.failure_threshold:
            self.down_until = time.monotonic() + self.policy.retry_interval
            log.warning("cache shard marked down", extra={"shard": self.name, "error": type(exc).__name__,
                                                          "retry_in_s": self.policy.retry_interval})
            self.on_state_change(self.name, False)

    async def _recover(self) -> None:
        try:
            await self.client.ping()
            # It may have missed deletes while unreachable: nothing it holds can be trusted.
            await self.client.flushdb()
        except _SHARD_ERRORS as exc:
            self.down_until = time.monotonic() + self.policy.retry_interval
            log.info("cache shard still down", extra={"shard": self.name, "error": type(exc).__name__})
        else:
            self.failures = 0
            self.down_until = 0.0
            log.warning("cache shard back after flush", extra={"shard": self.name})
            self.on_state_change(self.name, True)
        finally:
            self._probe = None

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


class RedisTier:
    """The sharded cache: GET/MGET/SET/DEL routed by the ring, with per-shard failure handling."""

    def __init__(self, *, shards: Sequence[ShardAddress], pool_size: int, timeout: float,
                 policy: ShardPolicy, on_error: Callable[[str], None] | None = None,
                 on_state_change: Callable[[str, bool], None] | None = None) -> None:
        if not shards:
            raise ValueError("RedisTier needs at least one shard")
        self.ring = Ring(ShardSpec(name=s.name, weight=s.weight) for s in shards)
        self._on_error = on_error or (lambda shard: None)
        notify = on_state_change or (lambda shard, up: None)
        self.shards: dict[str, Shard] = {
            s.name: Shard(s, pool_size=pool_size, timeout=timeout, policy=policy, on_state_change=notify)
            for s in shards
        }

    def _fail(self, shard: Shard, exc: BaseException) -> None:
        shard.failed(exc)
        self._on_error(shard.name)

    async def get(self, key: str) -> bytes | None:
        shard = self.shards[self.ring.node_for(key)]
        if not shard.usable():
            raise ShardUnavailable(shard.name)
        try:
            value = cast("bytes | None", await shard.client.get(key))
        except _SHARD_ERRORS as exc:
            self._fail(shard, exc)
            raise ShardUnavailable(shard.name) from exc
        shard.succeeded()
        return value

    async def mget(self, keys: Sequence[str]) -> list[bytes | ShardUnavailable | None]:
        """One MGET per shard, all shards at once; a failed shard yields ShardUnavailable per key."""
        out: list[bytes | ShardUnavailable | None] = [None] * len(keys)

        async def one(name: str, idx: list[int]) -> None:
            shard = self.shards[name]
            if not shard.usable():
                for i in idx:
                    out[i] = ShardUnavailable(name)
                return
            try:
                values = await shard.client.mget([keys[i] for i in idx])
            except _SHARD_ERRORS as exc:
                self._fail(shard, exc)
                for i in idx:
                    out[i] = ShardUnavailable(name)
                return
            shard.succeeded()
            for i, v in zip(idx, values, strict=True):
                out[i] = cast("bytes | None", v)

        groups = self.ring.group_by_node(keys)
        if len(groups) == 1:
            name, idx = next(iter(groups.items()))
            await one(name, idx)
        else:
            await asyncio.gather(*(one(name, idx) for name, idx in groups.items()))
        return out

    async def set_many(self, items: Sequence[tuple[str, bytes, int]]) -> None:
        """Best effort: SET key value PX ttl_ms per item, pipelined per shard. Errors only count."""
        keys = [k for k, _, _ in items]

        async def one(name: str, idx: list[int]) -> None:
            shard = self.shards[name]
            if not shard.usable():
                return
            try:
                async with shard.client.pipeline(transaction=False) as pipe:
                    for i in idx:
                        pipe.set(items[i][0], items[i][1], px=items[i][2])
                    await pipe.execute()
            except _SHARD_ERRORS as exc:
                self._fail(shard, exc)
            else:
                shard.succeeded()

        await asyncio.gather(*(one(name, idx) for name, idx in self.ring.group_by_node(keys).items()))

    async def invalidate(self, keys: Iterable[str]) -> bool:
        """DEL the keys on their shards and publish them for every node's near-cache.

        True only if every owning shard acknowledged; the outbox relay retries otherwise. A shard that
        is marked down counts as not acknowledged: it will be flushed before it serves again, but the
        relay still retries so the record of the change is settled only once all shards saw it.
        """
        key_list = sorted(set(keys))
        if not key_list:
            return True
        ok = True

        async def one(name: str, idx: list[int]) -> None:
            nonlocal ok
            shard = self.shards[name]
            group = [key_list[i] for i in idx]
            try:
                async with shard.client.pipeline(transaction=False) as pipe:
                    pipe.delete(*group)
                    pipe.publish(INVALIDATION_CHANNEL, "\n".join(group))
                    await pipe.execute()
            except _SHARD_ERRORS as exc:
                self._fail(shard, exc)
                ok = False
            else:
                shard.succeeded()

        await asyncio.gather(*(one(name, idx) for name, idx in self.ring.group_by_node(key_list).items()))
        return ok

    async def listen_invalidations(self, on_keys: Callable[[list[str]], None],
                                   on_gap: Callable[[], None], *, retry_interval: float) -> None:
        """Subscribe on every shard until cancelled. `on_gap` runs when a subscription was lost and
        re-established: messages may have been missed, so the caller drops its near-cache."""
        await asyncio.gather(*(self._listen(shard, on_keys, on_gap, retry_interval)
                               for shard in self.shards.values()))

    async def _listen(self, shard: Shard, on_keys: Callable[[list[str]], None], on_gap: Callable[[], None],
                      retry_interval: float) -> None:
        first = True
        while True:
            pubsub = shard.client.pubsub()
            try:
                await pubsub.subscribe(INVALIDATION_CHANNEL)
                if not first:
                    on_gap()
                first = False
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg["type"] == "message":
                        on_keys(msg["data"].decode().split("\n"))
            except _SHARD_ERRORS:
                first = False
                on_gap()
                await asyncio.sleep(retry_interval)
            finally:
                with contextlib.suppress(*_SHARD_ERRORS):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    async def ping_all(self) -> dict[str, bool]:
        async def one(shard: Shard) -> bool:
            try:
                return bool(await shard.client.ping())
            except _SHARD_ERRORS:
                return False

        names = list(self.shards)
        results = await asyncio.gather(*(one(self.shards[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def close(self) -> None:
        for shard in self.shards.values():
            with contextlib.suppress(*_SHARD_ERRORS):
                await shard.close()
