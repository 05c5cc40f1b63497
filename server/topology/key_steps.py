"""The key work of a move's steps: flush the joining shards, copy the keys that change owner, delete
them from their old owners. Paced (`MigrationPolicy.rate`), resumable (a SCAN cursor per shard saved
in PostgreSQL after every batch), and stopped by a newer topology version (an abort).

The move driver (migrator.py) decides which step runs when; this module only does a step's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.cache.shard import PTTL_NO_KEY
from server.progress import ProgressBar
from server.topology.errors import MigrationError
from server.topology.policy import MigrationPolicy
from server.topology.store import Progress, TopologyStore, load_progress, save_progress
from shard_router import Ring
from shard_router.pacing import Pacer
from shard_router.topology import ShardState, Topology, redact_url

REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
# The steps that copy and delete keys, by the name their progress is saved under.
COPY, CLEANUP = "copy", "cleanup"
STEPS = (COPY, CLEANUP)
# A running step looks for a newer topology version (an abort) at most this often, in seconds: one cheap
# query, and an abort is noticed within a batch or two.
VERSION_CHECK_SECONDS = 0.25


@dataclass
class StepStats:
    step: str
    shards: dict[str, Progress] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def scanned(self) -> int:
        return sum(p.scanned for p in self.shards.values())

    @property
    def moved(self) -> int:
        return sum(p.moved for p in self.shards.values())

    @property
    def skipped(self) -> int:
        return sum(p.skipped for p in self.shards.values())


class VersionWatch:
    """Stops a step (MigrationError) when the topology version changes under it — an abort."""

    def __init__(self, store: TopologyStore, version: int, clock: Callable[[], float]) -> None:
        self.store = store
        self.version = version
        self.clock = clock
        self._next = 0.0

    async def check(self) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + VERSION_CHECK_SECONDS
        found = await self.store.current_version()
        if found != self.version:
            raise MigrationError(f"topology version {found} was published while this step ran on version"
                                 f" {self.version} (an abort?): stopping here")


class KeySteps:
    """Runs the key work of one step at a time; `stats` keeps every copy/cleanup step run, finished or not."""

    def __init__(self, *, pool: asyncpg.Pool, store: TopologyStore, policy: MigrationPolicy, out: TextIO,
                 clock: Callable[[], float]) -> None:
        self.pool = pool
        self.store = store
        self.policy = policy
        self.out = out
        self.clock = clock
        self.stats: list[StepStats] = []

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _clients(self, t: Topology) -> dict[str, aioredis.Redis]:
        timeout = self.policy.redis_timeout
        return {s.name: aioredis.Redis.from_url(s.address, socket_timeout=timeout, socket_connect_timeout=timeout)
                for s in t.shards}

    async def flush_joining(self, t: Topology) -> None:
        """Shards joining the ring may hold anything (nobody invalidated them): empty them while no node
        reads or fills them (preparing)."""
        joining = [s for s in t.shards if s.state is ShardState.WARMING]
        clients = self._clients(t)
        try:
            for s in joining:
                try:
                    held = int(await clients[s.name].dbsize())
                    await clients[s.name].flushdb()
                except REDIS_ERRORS as exc:
                    raise MigrationError(f"cannot flush joining shard {s.name} at {redact_url(s.address)}:"
                                         f" {exc}") from exc
                self.say(f"  flushed joining shard {s.name} ({held:,} key(s) were on it)")
        finally:
            await _close_all(clients)

    async def scan_step(self, t: Topology, step: str) -> None:
        """copy: every key an old owner holds whose owner changes goes to its new owner.
        cleanup: every key a shard of the old ring holds that it does not own in the new ring is deleted."""
        clients = self._clients(t)
        stats = StepStats(step)
        self.stats.append(stats)
        started = self.clock()
        try:
            saved = await load_progress(self.pool, t.version, step)
            sources = [spec.name for spec in t.source]
            totals: dict[str, int] = {}
            for name in sources:
                try:
                    totals[name] = int(await clients[name].dbsize())
                except REDIS_ERRORS as exc:
                    raise MigrationError(f"cannot reach shard {name}: {exc}") from exc
            for name in sources:
                stats.shards[name] = saved.get(name, Progress(name))
            resumed = sum(p.scanned for p in stats.shards.values())
            if resumed:
                self.say(f"  resuming {step}: {resumed:,} key(s) already examined")
            verb = "copied" if step == COPY else "deleted"
            label = "  copy   " if step == COPY else "  cleanup"
            bar = ProgressBar(self.out, label, sum(totals.values()) + resumed, unit="keys", done=resumed)
            pacer = Pacer(self.policy.rate, now=self.clock())
            watch = VersionWatch(self.store, t.version, self.clock)

            def draw(final: bool = False) -> None:
                bar.update(stats.scanned, f"{verb} {stats.moved:,}  skipped {stats.skipped:,}", final=final)

            async def run(name: str) -> None:
                p = stats.shards[name]
                if p.done:
                    return
                one = self._copy_batch if step == COPY else self._cleanup_batch
                while True:
                    try:
                        cursor, keys = await clients[name].scan(cursor=p.scan_cursor, count=self.policy.batch)
                        if keys:
                            await one(t, name, keys, clients, p)
                    except REDIS_ERRORS as exc:
                        raise MigrationError(f"{step} on shard {name} failed: {type(exc).__name__}: {exc}."
                                             " Rerun `crs shards apply` to resume from the last batch") from exc
                    p.scanned += len(keys)
                    p.scan_cursor = int(cursor)
                    p.done = p.scan_cursor == 0
                    await save_progress(self.pool, t.version, step, p)
                    draw()
                    if p.done:
                        return
                    await watch.check()
                    delay = pacer.delay(max(len(keys), 1), self.clock())
                    if delay:
                        await asyncio.sleep(delay)

            await _gather_or_cancel([run(name) for name in sources])
            draw(final=True)
        finally:
            stats.seconds = self.clock() - started
            await _close_all(clients)

    async def _copy_batch(self, t: Topology, name: str, keys: list[Any], clients: dict[str, aioredis.Redis],
                          p: Progress) -> None:
        source, target = t.source_ring, t.target_ring
        moving: dict[str, list[bytes]] = {}
        for key in keys:
            if source.node_for(key) != name:
                p.skipped += 1            # not this shard's key: the cleanup deletes it, nobody copies it
                continue
            owner = target.node_for(key)
            if owner != name:
                moving.setdefault(owner, []).append(key)
        if not moving:
            return
        order = [k for group in moving.values() for k in group]
        started = self.clock()
        async with clients[name].pipeline(transaction=False) as pipe:
            for key in order:
                pipe.get(key)
                pipe.pttl(key)
            replies = await pipe.execute(raise_on_error=False)
        found = {key: (replies[2 * i], replies[2 * i + 1]) for i, key in enumerate(order)}
        for owner, group in moving.items():
            items = [(k, *found[k]) for k in group
                     if isinstance(found[k][0], bytes) and isinstance(found[k][1], int) and found[k][1] != PTTL_NO_KEY]
            p.skipped += len(group) - len(items)
            if not items:
                continue
            async with clients[owner].pipeline(transaction=False) as pipe:
                for key, value, ttl in items:
                    pipe.set(key, value, px=ttl if ttl > 0 else None, nx=True)
                written = [k for (k, _, _), ok in zip(items, await pipe.execute(), strict=True) if ok]
            if written and self.clock() - started > self.policy.copy_budget:
                # Too slow to be sure a write did not delete the key in between (see RedisTier._copy).
                await clients[owner].delete(*written)
                p.skipped += len(written)
                written = []
            p.moved += len(written)
            p.skipped += len(items) - len(written)

    async def _cleanup_batch(self, t: Topology, name: str, keys: list[Any], clients: dict[str, aioredis.Redis],
                             p: Progress) -> None:
        target: Ring = t.target_ring
        gone = [key for key in keys if target.node_for(key) != name]
        if gone:
            p.moved += int(await clients[name].unlink(*gone))


async def _gather_or_cancel(jobs: Sequence[Awaitable[None]]) -> None:
    """Run all; on the first failure cancel the others and raise it."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _close_all(clients: dict[str, aioredis.Redis]) -> None:
    for client in clients.values():
        with contextlib.suppress(*REDIS_ERRORS):
            await client.aclose()
