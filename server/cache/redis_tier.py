"""L2: hash-sharded Redis. The topology (shard_router) says which shard owns a key; this module does the I/O.

Failure policy (DESIGN.md §4): after `failure_threshold` consecutive errors a shard is marked down
for `retry_interval`; its keys go straight to PostgreSQL (never to a neighbour, which would serve
stale data later). When the interval has passed one probe runs: PING, then FLUSHDB — the shard may
have missed invalidations while we could not reach it — and only then does it serve again. A shard an
operator marks down in the topology is treated the same way, and flushed when it is marked active.

Topology changes (docs/runbooks/resharding.md): `apply_topology` swaps in a new `TierView` — the
rings, the shard clients and the routing of the new version — in one assignment; every operation
reads `self._view` once and runs to its end on that view. While keys move, reads fall back to the old
owner (copying what they find to the new one) and deletes go to both owners; see shard_router.topology.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from server.cache.resp import PipelinedReader
from shard_router import Ring
from shard_router.topology import Routing, ShardState, Topology, routing_for

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
    __slots__ = ("_probe", "admin_down", "client", "down_until", "failures", "name", "on_state_change", "policy",
                 "reader", "url")

    def __init__(self, name: str, url: str, *, pool_size: int, timeout: float, policy: ShardPolicy,
                 on_state_change: Callable[[str, bool], None]) -> None:
        self.name = name
        self.url = url
        self.policy = policy
        self.failures = 0
        self.down_until = 0.0           # 0 = up; else monotonic time of the next probe
        self.admin_down = False         # marked down in the topology by an operator
        self._probe: asyncio.Task[None] | None = None
        self.on_state_change = on_state_change
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
        )
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        # Lookup reads (GET/MGET) go through a lean pipelined connection; everything else via redis-py.
        self.reader = PipelinedReader(url, timeout=timeout) if url.startswith("redis://") else None

    async def read(self, key: str) -> bytes | None:
        if self.reader is not None:
            return await self.reader.get(key)
        return cast("bytes | None", await self.client.get(key))

    async def fill(self, items: list[tuple[str, bytes, int]]) -> None:
        if self.reader is not None:
            await self.reader.set_px(items)
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for key, value, ttl_ms in items:
                pipe.set(key, value, px=ttl_ms)
            await pipe.execute()

    async def read_many(self, keys: list[str]) -> list[bytes | None]:
        if self.reader is not None:
            return await self.reader.mget(keys)
        return cast("list[bytes | None]", await self.client.mget(keys))

    @property
    def is_up(self) -> bool:
        return self.down_until == 0.0 and not self.admin_down

    def usable(self) -> bool:
        if self.admin_down:
            return False
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

    def take_out(self) -> None:
        """The topology marks it down: skip it (its keys go to PostgreSQL) until it is marked active."""
        if not self.admin_down:
            self.admin_down = True
            log.warning("cache shard marked down by the topology", extra={"shard": self.name})
            self.on_state_change(self.name, False)

    def put_back(self) -> None:
        """Marked active again (or its address changed): it may have missed deletes, so it is probed
        and flushed before it serves, exactly like a shard that recovers by itself."""
        self.admin_down = False
        self.failures = 0
        self.down_until = time.monotonic()

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
        if self.reader is not None:
            self.reader.close()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


class TierView:
    """One topology version as the tier runs it: its routing, the shards it names, and how many writes
    (fills, copies) started under it are still in flight — a node reports a new version only once the
    writes of the previous one have landed, so the warmer's next step never races them."""

    __slots__ = ("routing", "shards", "topology", "writes")

    def __init__(self, topology: Topology, shards: dict[str, Shard]) -> None:
        self.topology = topology
        self.routing: Routing = routing_for(topology)
        self.shards = shards
        self.writes = 0


class RedisTier:
    """The sharded cache: GET/MGET/SET/DEL routed by the topology, with per-shard failure handling."""

    def __init__(self, *, topology: Topology, pool_size: int, timeout: float, policy: ShardPolicy,
                 copy_budget: float = 0.25, on_error: Callable[[str], None] | None = None,
                 on_state_change: Callable[[str, bool], None] | None = None,
                 on_copy: Callable[[int], None] | None = None) -> None:
        self._pool_size = pool_size
        self._timeout = timeout
        self._policy = policy
        # A value copied from an old owner is kept only if read and written within this many seconds:
        # the outbox relay's second delete (reinvalidate_delay after a write) then always comes after it.
        self.copy_budget = copy_budget
        self._on_error = on_error or (lambda shard: None)
        self._notify = on_state_change or (lambda shard, up: None)
        self._on_copy = on_copy or (lambda n: None)
        # Fills and copies stop when the node has not confirmed its topology for too long (the lease
        # the topology watcher renews); reads and deletes go on.
        self.fill_lease_until = math.inf
        self._listening: tuple[Callable[[list[str]], None], Callable[[], None], float] | None = None
        self._listeners: dict[str, tuple[Shard, asyncio.Task[None]]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        shards = {s.name: self._new_shard(s.name, s.address) for s in topology.shards}
        for s in topology.shards:
            if s.state is ShardState.DOWN:
                shards[s.name].take_out()
        self._view = TierView(topology, shards)

    def _new_shard(self, name: str, url: str) -> Shard:
        return Shard(name, url, pool_size=self._pool_size, timeout=self._timeout, policy=self._policy,
                     on_state_change=self._notify)

    # -- the topology in force --------------------------------------------------------------------
    @property
    def view(self) -> TierView:
        return self._view

    @property
    def topology(self) -> Topology:
        return self._view.topology

    @property
    def ring(self) -> Ring:
        """The ring reads go to first."""
        return self._view.routing.read

    @property
    def shards(self) -> dict[str, Shard]:
        return self._view.shards

    def apply_topology(self, topology: Topology) -> TierView:
        """Run `topology` from now on; returns the previous view (see `drain`). Shards whose name and
        address are unchanged keep their client, failure state and subscription."""
        old = self._view
        shards: dict[str, Shard] = {}
        for spec in topology.shards:
            current = old.shards.get(spec.name)
            if current is not None and current.url == spec.address:
                shard = current
            else:
                shard = self._new_shard(spec.name, spec.address)
                if current is not None:
                    shard.put_back()   # a new address: whatever that server holds was never invalidated
            if spec.state is ShardState.DOWN:
                shard.take_out()
            elif shard.admin_down:
                shard.put_back()
            shards[spec.name] = shard
        self._view = TierView(topology, shards)
        retired = [s for name, s in old.shards.items() if shards.get(name) is not s]
        for shard in retired:
            entry = self._listeners.get(shard.name)
            if entry is not None and entry[0] is shard:
                del self._listeners[shard.name]
                entry[1].cancel()
        if self._listening is not None:
            for shard in shards.values():
                self._start_listener(shard)
        if retired:
            # Operations that started on the old view may still use these clients for a moment.
            task = asyncio.get_running_loop().create_task(self._close_later(retired, delay=4 * self._timeout + 1))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return old

    async def drain(self, view: TierView, timeout: float) -> bool:
        """Wait until no write started under `view` is in flight (True), or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while view.writes:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def renew_lease(self, until: float) -> None:
        self.fill_lease_until = until

    def _may_write(self, view: TierView) -> bool:
        return view is self._view and time.monotonic() < self.fill_lease_until

    @staticmethod
    async def _close_later(shards: list[Shard], delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            for shard in shards:
                with contextlib.suppress(*_SHARD_ERRORS):
                    await asyncio.shield(shard.close())

    def _fail(self, shard: Shard, exc: BaseException) -> None:
        shard.failed(exc)
        self._on_error(shard.name)

    # -- reads -------------------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        view = self._view
        shard = view.shards[view.routing.read.node_for(key)]
        if not shard.usable():
            raise ShardUnavailable(shard.name)
        try:
            value = await shard.read(key)
        except _SHARD_ERRORS as exc:
            self._fail(shard, exc)
            raise ShardUnavailable(shard.name) from exc
        shard.succeeded()
        if value is None and view.routing.fallback is not None:
            out: list[bytes | ShardUnavailable | None] = [None]
            await self._from_old_owners(view, [key], [0], out)
            return cast("bytes | None", out[0])
        return value

    async def mget(self, keys: Sequence[str]) -> list[bytes | ShardUnavailable | None]:
        """One MGET per shard, all shards at once; a failed shard yields ShardUnavailable per key."""
        view = self._view
        out: list[bytes | ShardUnavailable | None] = [None] * len(keys)

        async def one(name: str, idx: list[int]) -> None:
            shard = view.shards[name]
            if not shard.usable():
                for i in idx:
                    out[i] = ShardUnavailable(name)
                return
            try:
                values = await shard.read_many([keys[i] for i in idx])
            except _SHARD_ERRORS as exc:
                self._fail(shard, exc)
                for i in idx:
                    out[i] = ShardUnavailable(name)
                return
            shard.succeeded()
            for i, v in zip(idx, values, strict=True):
                out[i] = v

        groups = view.routing.read.group_by_node(keys)
        if len(groups) == 1:
            name, idx = next(iter(groups.items()))
            await one(name, idx)
        else:
            await asyncio.gather(*(one(name, idx) for name, idx in groups.items()))
        if view.routing.fallback is not None:
            misses = [i for i, v in enumerate(out) if v is None]
            if misses:
                await self._from_old_owners(view, keys, misses, out)
        return out

    async def _from_old_owners(self, view: TierView, keys: Sequence[str], misses: list[int],
                               out: list[bytes | ShardUnavailable | None]) -> None:
        """Migrating: keys missing on their new owner are read from their old owner (GET + PTTL) and
        copied to the new owner with the remaining TTL (SET NX: a fresher fill wins). A failing old
        owner only means a miss."""
        read, fallback = view.routing.read, view.routing.fallback
        assert fallback is not None
        groups: dict[str, list[int]] = {}
        for i in misses:
            old = fallback.node_for(keys[i])
            if old != read.node_for(keys[i]):
                groups.setdefault(old, []).append(i)

        async def one(name: str, idx: list[int]) -> None:
            shard = view.shards[name]
            if not shard.usable():
                return
            started = time.monotonic()
            try:
                async with shard.client.pipeline(transaction=False) as pipe:
                    for i in idx:
                        pipe.get(keys[i])
                        pipe.pttl(keys[i])
                    replies = await pipe.execute()
            except _SHARD_ERRORS as exc:
                self._fail(shard, exc)
                return
            shard.succeeded()
            found: list[tuple[str, bytes, int]] = []
            for n, i in enumerate(idx):
                value, ttl = replies[2 * n], replies[2 * n + 1]
                if value is not None and ttl != -2:
                    out[i] = cast("bytes", value)
                    found.append((keys[i], value, ttl))
            if found:
                await self._copy(view, found, started)

        await asyncio.gather(*(one(name, idx) for name, idx in groups.items()))

    async def _copy(self, view: TierView, items: list[tuple[str, bytes, int]], started: float) -> None:
        if not self._may_write(view) or time.monotonic() - started > self.copy_budget:
            return
        view.writes += 1
        try:
            keys = [k for k, _, _ in items]

            async def one(name: str, idx: list[int]) -> None:
                shard = view.shards[name]
                if not shard.usable():
                    return
                try:
                    async with shard.client.pipeline(transaction=False) as pipe:
                        for i in idx:
                            key, value, ttl = items[i]
                            pipe.set(key, value, px=ttl if ttl > 0 else None, nx=True)
                        replies = await pipe.execute()
                    written = [keys[i] for i, ok in zip(idx, replies, strict=True) if ok]
                    if written and time.monotonic() - started > self.copy_budget:
                        # Too slow: a write may have deleted the key after we read it, and the
                        # relay's second delete may already have run. Drop the copy.
                        await shard.client.delete(*written)
                        written = []
                except _SHARD_ERRORS as exc:
                    self._fail(shard, exc)
                    return
                shard.succeeded()
                self._on_copy(len(written))

            await asyncio.gather(*(one(name, idx) for name, idx in view.routing.read.group_by_node(keys).items()))
        finally:
            view.writes -= 1

    # -- writes ------------------------------------------------------------------------------------
    async def set_many(self, items: Sequence[tuple[str, bytes, int]]) -> None:
        """Best effort: SET key value PX ttl_ms per item, pipelined per shard. Errors only count."""
        view = self._view
        if not self._may_write(view):
            return
        keys = [k for k, _, _ in items]

        async def one(name: str, idx: list[int]) -> None:
            shard = view.shards[name]
            if not shard.usable():
                return
            try:
                await shard.fill([items[i] for i in idx])
            except _SHARD_ERRORS as exc:
                self._fail(shard, exc)
            else:
                shard.succeeded()

        view.writes += 1
        try:
            await asyncio.gather(*(one(name, idx) for name, idx in view.routing.read.group_by_node(keys).items()))
        finally:
            view.writes -= 1

    async def invalidate(self, keys: Iterable[str]) -> bool:
        """DEL the keys on their shards — both owners while keys move — and publish them for every
        node's near-cache.

        True only if every owning shard acknowledged; the outbox relay retries otherwise. A shard that
        is marked down counts as not acknowledged: it will be flushed before it serves again, but the
        relay still retries so the record of the change is settled only once all shards saw it.
        """
        key_list = sorted(set(keys))
        if not key_list:
            return True
        view = self._view
        per_shard: dict[str, dict[str, None]] = {}
        for ring in (view.routing.read, view.routing.also_invalidate):
            if ring is None:
                continue
            for name, idx in ring.group_by_node(key_list).items():
                per_shard.setdefault(name, {}).update(dict.fromkeys(key_list[i] for i in idx))
        ok = True

        async def one(name: str, group: list[str]) -> None:
            nonlocal ok
            shard = view.shards[name]
            if not shard.usable():
                # Not acknowledged: the relay retries (from any node that can reach the shard), and the
                # write does not wait a timeout here for a shard this node already knows is down.
                ok = False
                return
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

        await asyncio.gather(*(one(name, list(group)) for name, group in per_shard.items()))
        return ok

    # -- invalidation messages -----------------------------------------------------------------------
    async def listen_invalidations(self, on_keys: Callable[[list[str]], None],
                                   on_gap: Callable[[], None], *, retry_interval: float) -> None:
        """Subscribe on every shard of the topology in force (following its changes) until cancelled.
        `on_gap` runs when a subscription was lost and re-established: messages may have been missed,
        so the caller drops its near-cache."""
        self._listening = (on_keys, on_gap, retry_interval)
        for shard in self._view.shards.values():
            self._start_listener(shard)
        try:
            await asyncio.get_running_loop().create_future()   # until cancelled
        finally:
            self._listening = None
            tasks = [task for _, task in self._listeners.values()]
            self._listeners.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start_listener(self, shard: Shard) -> None:
        entry = self._listeners.get(shard.name)
        if entry is not None and entry[0] is shard:
            return
        if entry is not None:
            entry[1].cancel()
        assert self._listening is not None
        on_keys, on_gap, retry_interval = self._listening
        task = asyncio.get_running_loop().create_task(self._listen(shard, on_keys, on_gap, retry_interval))
        self._listeners[shard.name] = (shard, task)

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

        shards = self._view.shards
        names = list(shards)
        results = await asyncio.gather(*(one(shards[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for shard in self._view.shards.values():
            with contextlib.suppress(*_SHARD_ERRORS):
                await shard.close()
