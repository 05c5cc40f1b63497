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

from server.cache.shard import copy_label, copy_px, copyable
from server.progress import ProgressBar
from server.topology.errors import MigrationError, ShardUnreachable
from server.topology.policy import MigrationPolicy
from server.topology.store import Progress, TopologyStore, load_progress, save_progress
from shard_router import Ring
from shard_router.addresses import redact_url
from shard_router.pacing import Pacer
from shard_router.topology import ShardState, Topology

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


async def flush_copy(url: str, what: str, timeout: float) -> int:
    """FLUSHDB on the Redis at `url` (`what` names it in the error); how many keys it held."""
    client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        held = int(await client.dbsize())
        await client.flushdb()
        return held
    except REDIS_ERRORS as exc:
        raise ShardUnreachable(f"cannot flush {what} at {redact_url(url)}: {exc}") from exc
    finally:
        with contextlib.suppress(*REDIS_ERRORS):
            await client.aclose()


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

    def _clients(self, t: Topology) -> dict[str, list[aioredis.Redis]]:
        """Per shard name, a client per copy, the primary first (docs/decisions.md "Replicated shards")."""
        timeout = self.policy.redis_timeout
        return {s.name: [aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
                         for url in s.copies] for s in t.shards}

    async def flush_joining(self, t: Topology) -> None:
        """Shards joining the ring may hold anything (nobody invalidated them): empty every copy of
        them while no node reads or fills them (preparing)."""
        for s in (s for s in t.shards if s.state is ShardState.WARMING):
            held = 0
            for url in s.copies:
                held += await self.flush_copy(url, f"joining shard {s.name}")
            copies = f" on {len(s.copies)} copies" if len(s.copies) > 1 else ""
            self.say(f"  flushed joining shard {s.name} ({held:,} key(s) were on it{copies})")

    async def flush_copy(self, url: str, what: str) -> int:
        return await flush_copy(url, what, self.policy.redis_timeout)

    async def scan_step(self, t: Topology, step: str) -> None:
        """copy: every key an old owner holds whose owner changes goes to its new owner (read from the
        old owner's primary, written to every copy of the new one).
        cleanup: every key a shard of the old ring holds that it does not own in the new ring is deleted,
        on each copy (each is scanned: a copy may hold keys another lost in a flush)."""
        shard_clients = self._clients(t)
        # The scanned sources, by progress name: the old owners' primaries for the copy, every copy
        # of the old owners for the cleanup ("shard-0", "shard-0/replica-1", ...).
        clients: dict[str, aioredis.Redis] = {}
        for spec in t.source:
            copies = shard_clients[spec.name] if step == CLEANUP else shard_clients[spec.name][:1]
            for i, client in enumerate(copies):
                clients[spec.name if i == 0 else f"{spec.name}/{copy_label(i)}"] = client
        stats = StepStats(step)
        self.stats.append(stats)
        started = self.clock()
        try:
            saved = await load_progress(self.pool, t.version, step)
            sources = list(clients)
            totals: dict[str, int] = {}
            for name in sources:
                try:
                    totals[name] = int(await clients[name].dbsize())
                except REDIS_ERRORS as exc:
                    raise ShardUnreachable(f"cannot reach shard {name}: {exc}") from exc
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
                while True:
                    try:
                        cursor, keys = await clients[name].scan(cursor=p.scan_cursor, count=self.policy.batch)
                        if keys and step == COPY:
                            await self._copy_batch(t, name, keys, clients[name], shard_clients, p)
                        elif keys:
                            await self._cleanup_batch(t, name.partition("/")[0], keys, clients[name], p)
                    except REDIS_ERRORS as exc:
                        raise ShardUnreachable(f"{step} on shard {name} failed: {type(exc).__name__}: {exc}."
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
            # Every source scanned to its end: what the scans found is the total. DBSIZE at the start
            # only estimated it (keys expire meanwhile, and a cleanup of a shard's primary deletes on its
            # copies before their own scans reach those keys), and the bar stopped short of 100%.
            bar.total = stats.scanned
            draw(final=True)
        finally:
            stats.seconds = self.clock() - started
            await _close_all(shard_clients)

    async def _copy_batch(self, t: Topology, name: str, keys: list[Any], client: aioredis.Redis,
                          shard_clients: dict[str, list[aioredis.Redis]], p: Progress) -> None:
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
        async with client.pipeline(transaction=False) as pipe:
            for key in order:
                pipe.get(key)
                pipe.pttl(key)
            replies = await pipe.execute(raise_on_error=False)
        found = {key: (replies[2 * i], replies[2 * i + 1]) for i, key in enumerate(order)}
        for owner, group in moving.items():
            items = [(k, *found[k]) for k in group
                     if isinstance(found[k][0], bytes) and copyable(found[k][1])]
            p.skipped += len(group) - len(items)
            if not items:
                continue
            written: set[bytes] = set()
            for copy in shard_clients[owner]:     # every copy of the new owner
                async with copy.pipeline(transaction=False) as pipe:
                    for key, value, ttl in items:
                        pipe.set(key, value, px=copy_px(ttl), nx=True)
                    on_copy = [k for (k, _, _), ok in zip(items, await pipe.execute(), strict=True) if ok]
                if on_copy and self.clock() - started > self.policy.copy_budget:
                    # Too slow to be sure a write did not delete the key in between (see RedisTier._copy).
                    await copy.delete(*on_copy)
                    on_copy = []
                written.update(on_copy)
            p.moved += len(written)
            p.skipped += len(items) - len(written)

    async def _cleanup_batch(self, t: Topology, name: str, keys: list[Any], client: aioredis.Redis,
                             p: Progress) -> None:
        target: Ring = t.target_ring
        gone = [key for key in keys if target.node_for(key) != name]
        if gone:
            p.moved += int(await client.unlink(*gone))


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


async def _close_all(clients: dict[str, list[aioredis.Redis]]) -> None:
    for copies in clients.values():
        for client in copies:
            with contextlib.suppress(*REDIS_ERRORS):
                await client.aclose()
