"""L2: hash-sharded Redis. The topology (shard_router) says which shard owns a key; this module routes
reads and fills to it. Each shard's failure policy is its breaker (server/cache/breaker.py): a shard
that fails is skipped — its keys go to PostgreSQL, never to a neighbour — and flushed before it
serves again. Every command runs under the shard's guard (server/cache/shard.py). Deletes and the
invalidation listener are in server/cache/invalidation.py.

Topology changes (docs/runbooks/resharding.md): `apply_topology` swaps in a new `TierView` — the
rings, the shard clients and the routing of the new version — in one assignment; every operation
reads `self._view` once and runs to its end on that view. While keys move, reads fall back to the old
owner (copying what they find to the new one) and deletes go to both owners; see shard_router.topology.

An error reply from a shard (not a lost connection: see server/cache/shard.py) fails one command
only: a read that gets one is a miss, a fill or copy that gets one is not written.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final, cast

from server.cache.breaker import BreakerPolicy
from server.cache.invalidation import InvalidationListeners, delete_everywhere
from server.cache.shard import SHARD_ERRORS, Shard, ShardReplyError, ShardUnavailable
from shard_router import Ring
from shard_router.topology import Routing, ShardState, Topology, routing_for

DEFAULT_COPY_BUDGET: Final = 0.25
# How often `drain` looks whether the writes of a view have landed.
DRAIN_POLL_SECONDS: Final = 0.005


def _retire_delay(timeout: float) -> float:
    """How long retired shard clients stay open: operations that started on the old view may use
    them for a few command timeouts more."""
    return 4 * timeout + 1


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

    def __init__(self, *, topology: Topology, pool_size: int, timeout: float, policy: BreakerPolicy,
                 copy_budget: float = DEFAULT_COPY_BUDGET, on_error: Callable[[str], None] | None = None,
                 on_state_change: Callable[[str, bool], None] | None = None,
                 on_copy: Callable[[int], None] | None = None,
                 on_reply_error: Callable[[str], None] | None = None) -> None:
        self._pool_size = pool_size
        self._timeout = timeout
        self._policy = policy
        # A value copied from an old owner is kept only if read and written within this many seconds:
        # the outbox relay's second delete (reinvalidate_delay after a write) then always comes after it.
        self.copy_budget = copy_budget
        self._on_error = on_error or (lambda shard: None)
        self._on_reply_error = on_reply_error or (lambda shard: None)
        self._notify = on_state_change or (lambda shard, up: None)
        self._on_copy = on_copy or (lambda n: None)
        # Fills and copies stop when the node has not confirmed its topology for too long (the lease
        # the topology watcher renews); reads and deletes go on.
        self.fill_lease_until = math.inf
        self._listeners = InvalidationListeners()
        self._retiring: set[asyncio.Task[None]] = set()
        shards = {s.name: self._new_shard(s.name, s.address) for s in topology.shards}
        for s in topology.shards:
            if s.state is ShardState.DOWN:
                shards[s.name].take_out()
        self._view = TierView(topology, shards)

    def _new_shard(self, name: str, url: str) -> Shard:
        return Shard(name, url, pool_size=self._pool_size, timeout=self._timeout, policy=self._policy,
                     on_state_change=self._notify, on_error=self._on_error, on_reply_error=self._on_reply_error)

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
        address are unchanged keep their client, breaker and subscription."""
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
            elif shard.breaker.held:
                shard.put_back()    # marked active again: probed and flushed before it serves
            shards[spec.name] = shard
        self._view = TierView(topology, shards)
        retired = [s for name, s in old.shards.items() if shards.get(name) is not s]
        self._listeners.follow(shards.values(), retired)
        if retired:
            # Operations that started on the old view may still use these clients for a moment.
            task = asyncio.get_running_loop().create_task(self._close_later(retired, _retire_delay(self._timeout)))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return old

    async def drain(self, view: TierView, timeout: float) -> bool:
        """Wait until no write started under `view` is in flight (True), or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while view.writes:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_SECONDS)
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
                with contextlib.suppress(*SHARD_ERRORS):
                    await asyncio.shield(shard.close())

    # -- reads -------------------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        """The cached value, None on a miss; ShardUnavailable when the owning shard cannot be used."""
        view = self._view
        shard = view.shards[view.routing.read.node_for(key)]
        # `with shard.guard:` spelled out (server/cache/shard.py): this is the Redis-hit lookup.
        breaker = shard.breaker
        if not breaker.serving:
            shard.guard.refuse()
        try:
            value = await shard.read(key)
        except Exception as exc:
            error = shard.guard.classify(exc)
            if error is None:
                raise
            if not isinstance(error, ShardReplyError):
                raise error from exc
            value = None                 # an error reply to a read: a miss
        else:
            breaker.record_success()
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
            try:
                with shard.guard:
                    values = await shard.read_many([keys[i] for i in idx])
            except ShardUnavailable:
                unavailable = ShardUnavailable(name)   # without the traceback, kept in `out`
                for i in idx:
                    out[i] = unavailable
                return
            except ShardReplyError:
                return                   # misses
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
            started = time.monotonic()
            try:
                with shard.guard:
                    async with shard.client.pipeline(transaction=False) as pipe:
                        for i in idx:
                            pipe.get(keys[i])
                            pipe.pttl(keys[i])
                        replies = await pipe.execute()
            except (ShardUnavailable, ShardReplyError):
                return
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
        keys = [k for k, _, _ in items]

        async def one(name: str, idx: list[int]) -> None:
            shard = view.shards[name]
            try:
                with shard.guard:
                    async with shard.client.pipeline(transaction=False) as pipe:
                        for i in idx:
                            key, value, ttl = items[i]
                            pipe.set(key, value, px=ttl if ttl > 0 else None, nx=True)
                        replies = await pipe.execute()
                written = [keys[i] for i, ok in zip(idx, replies, strict=True) if ok]
                if written and time.monotonic() - started > self.copy_budget:
                    # Too slow: a write may have deleted the key after we read it, and the relay's
                    # second delete may already have run. Drop the copy (a refused delete is a failure).
                    with shard.delete_guard:
                        await shard.client.delete(*written)
                    written = []
            except (ShardUnavailable, ShardReplyError):
                return
            self._on_copy(len(written))

        view.writes += 1
        try:
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
            try:
                with shard.guard:
                    await shard.fill([items[i] for i in idx])
            except (ShardUnavailable, ShardReplyError):
                pass                     # counted by the guard; the next miss fills again

        view.writes += 1
        try:
            await asyncio.gather(*(one(name, idx) for name, idx in view.routing.read.group_by_node(keys).items()))
        finally:
            view.writes -= 1

    async def invalidate(self, keys: Iterable[str]) -> bool:
        """DEL the keys on their owners and announce them (server/cache/invalidation.py); True only if
        every owning shard acknowledged."""
        view = self._view
        return await delete_everywhere(view.routing, view.shards, keys)

    async def listen_invalidations(self, on_keys: Callable[[list[str]], None],
                                   on_gap: Callable[[], None], *, retry_interval: float) -> None:
        """Subscribe on every shard of the topology in force (following its changes) until cancelled.
        `on_gap` runs when a subscription was lost and re-established: messages may have been missed,
        so the caller drops its near-cache."""
        await self._listeners.run(lambda: self._view.shards.values(), on_keys, on_gap,
                                  retry_interval=retry_interval)

    # -- health and shutdown -----------------------------------------------------------------------
    async def ping_all(self) -> dict[str, bool]:
        async def one(shard: Shard) -> bool:
            try:
                return bool(await shard.client.ping())
            except SHARD_ERRORS:
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
            with contextlib.suppress(*SHARD_ERRORS):
                await shard.close()
