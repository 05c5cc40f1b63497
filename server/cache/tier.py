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

A shard may have replicas (server/cache/replicas.py): reads go to one copy and fail over to the
next, fills, copies and deletes go to every copy, and each copy has its own breaker. Placement is
by shard name only: the copies never change which shard owns a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, cast

from server.cache.breaker import BreakerPolicy
from server.cache.invalidation import InvalidationListeners, delete_everywhere
from server.cache.replicas import ReplicatedShard
from server.cache.shard import SHARD_ERRORS, Shard, ShardReplyError, ShardUnavailable, copy_label, copy_px, copyable
from shard_router import Ring
from shard_router.topology import Routing, ShardState, Topology, TopologyShard, routing_for

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

    def __init__(self, topology: Topology, shards: dict[str, ReplicatedShard]) -> None:
        self.topology = topology
        self.routing: Routing = routing_for(topology)
        self.shards = shards
        self.writes = 0


class RedisTier:
    """The sharded cache: GET/MGET/SET/DEL routed by the topology, with per-shard failure handling."""

    def __init__(self, *, topology: Topology, pool_size: int, timeout: float, policy: BreakerPolicy,
                 copy_budget: float = DEFAULT_COPY_BUDGET, warm_window: float = 0.0, preferred_copy: str = "",
                 thread_connections: int = 0,
                 on_error: Callable[[str], None] | None = None,
                 on_state_change: Callable[[str, bool], None] | None = None,
                 on_copy: Callable[[int], None] | None = None,
                 on_reply_error: Callable[[str], None] | None = None,
                 on_copy_state: Callable[[str, str, bool], None] | None = None,
                 on_copy_error: Callable[[str, str], None] | None = None) -> None:
        """`on_state_change(shard, up)`: the shard as a whole (up while any copy serves);
        `on_copy_state(shard, copy, up)` and `on_copy_error(shard, copy)`: per copy.
        `thread_connections` > 0 (the hybrid serving model): each copy keeps up to that many connections
        for reads from gRPC threads (server/cache/thread_reads.py)."""
        self._pool_size = pool_size
        self._thread_connections = thread_connections
        self._timeout = timeout
        self._policy = policy
        # A value copied from an old owner is kept only if read and written within this many seconds:
        # the outbox relay's second delete (reinvalidate_delay after a write) then always comes after it.
        self.copy_budget = copy_budget
        self._warm_window = warm_window     # a copy back from a flush asks its siblings on a miss this long
        self._preferred_copy = preferred_copy   # the copy label reads try first ("" = round robin)
        self._on_error = on_error or (lambda shard: None)
        self._on_reply_error = on_reply_error or (lambda shard: None)
        self._notify = on_state_change or (lambda shard, up: None)
        self._on_copy = on_copy or (lambda n: None)
        self._on_copy_state = on_copy_state or (lambda shard, copy, up: None)
        self._on_copy_error = on_copy_error or (lambda shard, copy: None)
        self._reported: dict[str, bool] = {}     # the shard-level state last told on_state_change
        # Fills and copies stop when the node has not confirmed its topology for too long (the lease
        # the topology watcher renews); reads and deletes go on.
        self.fill_lease_until = math.inf
        self._listeners = InvalidationListeners()
        self._retiring: set[asyncio.Task[None]] = set()
        # The keys whose deletes a copy back from an outage may have missed (the node sets it: the
        # outbox's unsettled rows, server/relay.py); None: not known, so such a copy is flushed.
        self.missed_deletes: Callable[[], Awaitable[Sequence[str] | None]] | None = None
        self._view = TierView(topology, {s.name: self._group(s, None) for s in topology.shards})
        for s in topology.shards:
            if s.state is ShardState.DOWN:
                self._view.shards[s.name].take_out()

    def _new_copy(self, name: str, url: str, copy: str) -> Shard:
        return Shard(name, url, copy=copy, pool_size=self._pool_size, timeout=self._timeout, policy=self._policy,
                     warm_window=self._warm_window, thread_connections=self._thread_connections,
                     on_state_change=self._copy_state, on_error=self._copy_error, on_reply_error=self._on_reply_error,
                     missed=self._missed)

    async def _missed(self) -> Sequence[str] | None:
        return None if self.missed_deletes is None else await self.missed_deletes()

    def _group(self, spec: TopologyShard, current: ReplicatedShard | None) -> ReplicatedShard:
        """The copies of shard `spec`: a copy whose URL and place are unchanged keeps its client and
        breaker (a write-only copy made readable too: the operator flushed it meanwhile); a new copy of
        a shard that existed is probed and flushed before it is used (whatever that server holds was
        never invalidated)."""
        name, urls = spec.name, spec.copies
        if current is not None and current.urls == urls and current.write_only == frozenset(spec.write_only):
            return current   # (the preference is a node setting: it cannot differ between versions)
        kept = {(c.copy, c.url): c for c in current.copies} if current is not None else {}
        copies = []
        for i, url in enumerate(urls):
            copy = kept.get((copy_label(i), url))
            if copy is None:
                copy = self._new_copy(name, url, copy_label(i))
                if current is not None:
                    copy.put_back()
            copies.append(copy)
        return ReplicatedShard(name, copies, preferred=self._preferred_copy, write_only=spec.write_only)

    def _copy_state(self, name: str, copy: str, up: bool) -> None:
        self._on_copy_state(name, copy, up)
        self._report(name)

    def _copy_error(self, name: str, copy: str) -> None:
        self._on_error(name)
        self._on_copy_error(name, copy)

    def _report(self, name: str) -> None:
        """Tell on_state_change when the shard as a whole goes down (no copy serves) or comes back."""
        group = self._view.shards.get(name)
        if group is None:
            return
        up = group.is_up
        if self._reported.get(name, True) != up:
            self._reported[name] = up
            self._notify(name, up)

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
    def shards(self) -> dict[str, ReplicatedShard]:
        return self._view.shards

    def copies(self) -> list[Shard]:
        """Every copy of every shard in force."""
        return [c for group in self._view.shards.values() for c in group.copies]

    def apply_topology(self, topology: Topology) -> TierView:
        """Run `topology` from now on; returns the previous view (see `drain`). Copies whose shard,
        address and place are unchanged keep their client, breaker and subscription."""
        old = self._view
        shards = {spec.name: self._group(spec, old.shards.get(spec.name)) for spec in topology.shards}
        self._view = TierView(topology, shards)
        for spec in topology.shards:
            if spec.state is ShardState.DOWN:
                shards[spec.name].take_out()
            else:
                shards[spec.name].release_held()   # marked active again: probed and flushed before it serves
        for name in shards:
            self._report(name)
        in_force = {id(c) for c in self.copies()}
        retired = [c for group in old.shards.values() for c in group.copies if id(c) not in in_force]
        self._listeners.follow(self.copies(), retired)
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
        group = view.shards[view.routing.read.node_for(key)]
        shard = group.only
        if shard is None:                # replicas: one copy, failing over (server/cache/replicas.py)
            try:
                value = await group.get(key, copy_budget=self.copy_budget, may_copy=self._may_write(view))
            except ShardReplyError:
                value = None
        else:
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
            group = view.shards[name]
            wanted = [keys[i] for i in idx]
            try:
                values = await group.read(lambda copy: copy.read_many(wanted))
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

        async def read_with_ttl(shard: Shard, idx: list[int]) -> list[object]:
            async with shard.client.pipeline(transaction=False) as pipe:
                for i in idx:
                    pipe.get(keys[i])
                    pipe.pttl(keys[i])
                return cast("list[object]", await pipe.execute())

        async def one(name: str, idx: list[int]) -> None:
            started = time.monotonic()
            try:
                replies = await view.shards[name].read(lambda copy: read_with_ttl(copy, idx))
            except (ShardUnavailable, ShardReplyError):
                return
            found: list[tuple[str, bytes, int]] = []
            for n, i in enumerate(idx):
                value, ttl = replies[2 * n], replies[2 * n + 1]
                if value is not None and copyable(ttl):
                    out[i] = cast("bytes", value)
                    found.append((keys[i], cast("bytes", value), cast("int", ttl)))
            if found:
                await self._copy(view, found, started)

        await asyncio.gather(*(one(name, idx) for name, idx in groups.items()))

    async def _copy(self, view: TierView, items: list[tuple[str, bytes, int]], started: float) -> None:
        if not self._may_write(view) or time.monotonic() - started > self.copy_budget:
            return
        keys = [k for k, _, _ in items]

        async def to_copy(shard: Shard, idx: list[int], copied: list[int]) -> None:
            async with shard.client.pipeline(transaction=False) as pipe:
                for i in idx:
                    key, value, ttl = items[i]
                    pipe.set(key, value, px=copy_px(ttl), nx=True)
                replies = await pipe.execute()
            written = [keys[i] for i, ok in zip(idx, replies, strict=True) if ok]
            if written and time.monotonic() - started > self.copy_budget:
                # Too slow: a write may have deleted the key after we read it, and the relay's
                # second delete may already have run. Drop the copy (a refused delete is a failure).
                with shard.delete_guard:
                    await shard.client.delete(*written)
                written = []
            copied.append(len(written))

        async def one(name: str, idx: list[int]) -> None:
            copied: list[int] = []        # keys written, per copy of the new owner
            await view.shards[name].write_all(lambda copy: to_copy(copy, idx, copied))
            if copied:
                self._on_copy(max(copied))

        view.writes += 1
        try:
            await asyncio.gather(*(one(name, idx) for name, idx in view.routing.read.group_by_node(keys).items()))
        finally:
            view.writes -= 1

    # -- writes ------------------------------------------------------------------------------------
    async def set_many(self, items: Sequence[tuple[str, bytes, int]], *, not_after: float = math.inf) -> bool:
        """Best effort: SET key value PX ttl_ms per item, pipelined per shard. Errors only count. Not
        sent to a copy once `not_after` (time.monotonic()) has passed: a fill's window (Loaded.fill_by).
        False when some copy was sent nothing for that reason, or fills are paused (the topology lease):
        not cached in Redis, the caller counts the fill as dropped if the near-cache skips it too."""
        view = self._view
        if not self._may_write(view):
            return False
        keys = [k for k, _, _ in items]
        late = False

        async def fill(copy: Shard, batch: list[tuple[str, bytes, int]]) -> None:
            nonlocal late
            if not await copy.fill(batch, not_after):
                late = True

        async def one(name: str, idx: list[int]) -> None:
            # Every copy; a failure is counted by the copy's guard and the next miss fills again.
            batch = [items[i] for i in idx]
            await view.shards[name].write_all(lambda copy: fill(copy, batch))

        view.writes += 1
        try:
            await asyncio.gather(*(one(name, idx) for name, idx in view.routing.read.group_by_node(keys).items()))
        finally:
            view.writes -= 1
        return not late

    async def invalidate(self, keys: Iterable[str], *, position: int | None = None) -> bool:
        """DEL the keys on their owners and announce them (server/cache/invalidation.py), with the
        write's primary WAL position when known; True only if every owning shard acknowledged."""
        view = self._view
        return await delete_everywhere(view.routing, view.shards, keys, position=position)

    async def listen_invalidations(self, on_keys: Callable[[list[str], int | None], None],
                                   on_gap: Callable[[str, str], None], *, retry_interval: float) -> None:
        """Subscribe on every shard of the topology in force (following its changes) until cancelled.
        `on_keys(keys, position)` gets each announcement; `on_gap(shard, copy)` runs when a subscription
        was lost (and at each failed try to subscribe again): messages may have been missed, so the
        caller drops its near-cache."""
        await self._listeners.run(self.copies, on_keys, on_gap,
                                  retry_interval=retry_interval)

    # -- health and shutdown -----------------------------------------------------------------------
    async def ping_all(self) -> dict[str, bool]:
        """Per copy (`shard-0`, `shard-0/replica-1`, ...): does it answer PING?"""
        async def one(shard: Shard) -> bool:
            try:
                return bool(await shard.client.ping())
            except SHARD_ERRORS:
                return False

        copies = self.copies()
        results = await asyncio.gather(*(one(c) for c in copies))
        return {c.ident: ok for c, ok in zip(copies, results, strict=True)}

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for shard in self.copies():
            with contextlib.suppress(*SHARD_ERRORS):
                await shard.close()
