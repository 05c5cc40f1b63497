"""Drives a resharding move to its end: the I/O half of shard_router.topology's state machine.

`crs shards apply` and `crs shards abort` run `Migrator`. For the topology in force it does, step by
step (each step first waits until every live node runs the current version):

    preparing  -> flush the shards that join (nobody reads or fills them yet)      -> publish migrating
    migrating  -> copy the keys that change owner: SCAN each old owner, GET + PTTL,
                  SET NX PX on the new owner (rate-limited, resumable)              -> publish finishing
    finishing  -> delete the moved keys from their old owners (rate-limited, resumable)
                                                                                     -> publish stable

Each step records its SCAN cursor per shard in shard_migration_progress after every batch, so an
interrupted run (Ctrl-C, a crash, a timeout) picks up where it stopped. One driver runs at a time (a
PostgreSQL advisory lock); `abort` publishes its reversal first, so a running `apply` notices the new
version after its current batch, stops, and hands the lock over.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.progress import ProgressBar
from server.settings import Settings
from server.topology.store import (
    Draft,
    NodeReport,
    Progress,
    TopologyConflict,
    TopologyStore,
    clear_draft,
    lagging,
    live_nodes,
    load_draft,
    load_progress,
    publish,
    save_draft,
    save_progress,
)
from shard_router import Ring
from shard_router.pacing import Pacer
from shard_router.topology import (
    Phase,
    ShardState,
    Topology,
    TopologyError,
    TopologyShard,
    abort,
    advance,
    begin,
    redact_url,
    ring_text,
)

_LOCK_ID = 0x43525302          # "CRS" + 2: one resharding driver at a time (migrate uses 0x435253)
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class MigrationError(Exception):
    """The move cannot go on now; the message says why and what to do. Nothing is left half-done:
    rerunning `crs shards apply` resumes, `crs shards abort` goes back."""


@dataclass(frozen=True)
class MigrationPolicy:
    rate: float = 20_000.0         # keys examined per second, all shards together
    batch: int = 500               # SCAN COUNT
    lease: float = 10.0            # a node heartbeat older than this is a node that is gone
    wait_timeout: float = 60.0     # how long to wait for live nodes to run a new version
    poll: float = 0.2              # how often to look at the heartbeats while waiting
    copy_budget: float = 0.25      # a copy is kept only if read and written within this many seconds
    redis_timeout: float = 5.0     # per Redis command of the driver

    @classmethod
    def from_settings(cls, s: Settings, *, rate: float | None = None, batch: int | None = None,
                      wait_timeout: float | None = None) -> MigrationPolicy:
        return cls(rate=float(rate or s.migration_rate), batch=batch or s.migration_batch, lease=s.topology_lease,
                   wait_timeout=wait_timeout if wait_timeout is not None else max(60.0, 3 * s.topology_lease),
                   poll=min(0.5, s.topology_poll_interval / 2), copy_budget=s.reinvalidate_delay / 2,
                   redis_timeout=max(2.0, 8 * s.redis_timeout))


# --------------------------------------------------------------------------------------------------
# Staging (crs shards add / remove / reweight) and the first version
# --------------------------------------------------------------------------------------------------


async def ensure_published(store: TopologyStore, pool: asyncpg.Pool, settings: Settings,
                           out: TextIO | None = None) -> Topology:
    """The topology in force; when none was ever published, version 1 from CRS_REDIS_SHARDS — but only
    if every live node runs that same ring (they all run the bootstrap until then)."""
    current = await store.current()
    if current is not None:
        return current
    if not settings.redis_shards:
        raise MigrationError(f"no topology in {store.where} and CRS_REDIS_SHARDS is empty: set CRS_REDIS_SHARDS"
                             " to the shards the nodes run")
    boot = Topology.bootstrap((a.name, a.url, a.weight) for a in settings.redis_shards)
    ring = ring_text(boot.target_specs)
    odd = [n for n in await live_nodes(pool, settings.topology_lease) if n.ring != ring]
    if odd:
        raise MigrationError(
            f"CRS_REDIS_SHARDS here is {ring}, but live node(s) run another ring: "
            + "; ".join(f"{n.node_id} runs {n.ring or 'no shard'}" for n in odd[:5])
            + ". Run this command with the nodes' CRS_REDIS_SHARDS.")
    first = Topology(version=1, shards=boot.shards)
    await publish(store, pool, first, reason="seeded from CRS_REDIS_SHARDS")
    if out is not None:
        out.write(f"topology version 1 published from CRS_REDIS_SHARDS ({ring})\n")
    return first


async def stage_change(store: TopologyStore, pool: asyncpg.Pool, settings: Settings,
                       change: Callable[[Sequence[TopologyShard]], Sequence[TopologyShard]],
                       out: TextIO | None = None) -> tuple[Topology, Draft]:
    """Apply `change` to the draft (starting from the stable topology in force) and save it."""
    current = await ensure_published(store, pool, settings, out)
    if not current.is_stable:
        raise MigrationError(f"topology version {current.version} is {current.phase.value}: finish that move"
                             " (crs shards apply) or abort it (crs shards abort) before staging another change")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE shard_topology_draft IN EXCLUSIVE MODE")
        draft = await load_draft(conn)
        if draft is not None and draft.base_version != current.version:
            raise MigrationError(f"the staged change was made against topology version {draft.base_version},"
                                 f" but version {current.version} is in force: discard it with"
                                 " `crs shards abort` and stage it again")
        base = draft.shards if draft is not None else tuple(s for s in current.shards)
        try:
            shards = tuple(change(base))
        except (TopologyError, TypeError) as exc:
            raise MigrationError(str(exc)) from exc
        new = Draft(current.version, shards)
        await save_draft(conn, new)
    return current, new


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


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


class Migrator:
    def __init__(self, *, pool: asyncpg.Pool, store: TopologyStore, policy: MigrationPolicy, out: TextIO,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.store = store
        self.policy = policy
        self.out = out
        self.clock = clock
        self.stats: list[StepStats] = []

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- entry points ------------------------------------------------------------------------------
    async def apply(self) -> Topology:
        """Start the staged change (if the topology is stable) and drive the move to stable."""
        async with self._driver_lock(wait=0):
            current = await self.store.current()
            if current is None:
                raise MigrationError("no topology published yet: stage a change first (crs shards add ...)")
            draft = await load_draft(self.pool)
            if current.is_stable:
                if draft is None:
                    self.say(f"topology version {current.version} is stable and no change is staged: nothing to do")
                    return current
                if draft.base_version != current.version:
                    raise MigrationError(f"the staged change was made against version {draft.base_version} but"
                                         f" version {current.version} is in force: `crs shards abort` discards it")
                try:
                    first = begin(current, draft.shards)
                except TopologyError as exc:
                    raise MigrationError(str(exc)) from exc
                await self._publish(first, "apply: staged change")
                await clear_draft(self.pool)
                current = first
            elif draft is not None:
                self.say(f"note: a staged change waits; it can be applied once version {current.version}"
                         " is finished")
            return await self._drive(current)

    async def abort(self) -> Topology | None:
        """Discard the staged change, or turn the move in progress back to the ring it left."""
        dropped = await clear_draft(self.pool)
        if dropped:
            self.say("staged change discarded")
        while True:
            current = await self.store.current()
            if current is None or current.is_stable:
                if not dropped:
                    self.say("no move in progress and no staged change: nothing to abort")
                return current
            back = abort(current)
            try:
                await self._publish(back, "abort")
                break
            except MigrationError:
                continue     # someone published meanwhile: abort what is there now
        # A running apply notices the new version after its current batch and lets go of the lock.
        async with self._driver_lock(wait=self.policy.wait_timeout):
            current = await self.store.current()
            assert current is not None
            return await self._drive(current)

    # -- the loop ----------------------------------------------------------------------------------
    async def _drive(self, t: Topology) -> Topology:
        started = self.clock()
        while not t.is_stable:
            direction = " (abort)" if t.aborting else ""
            self.say(f"topology version {t.version}: {t.phase.value}{direction} — "
                     f"{ring_text(t.source_specs)} -> {ring_text(t.target_specs)}")
            await self.wait_for_nodes(t.version)
            await _VersionWatch(self.store, t.version, self.clock).check()
            if t.phase is Phase.PREPARING:
                await self._flush_joining(t)
            elif t.phase is Phase.MIGRATING:
                await self._scan_step(t, "copy")
            else:
                await self._scan_step(t, "cleanup")
            nxt = advance(t)
            await self._publish(nxt, f"{'abort' if t.aborting else 'apply'}: {t.phase.value} done")
            t = nxt
        await self.wait_for_nodes(t.version)
        self.say(f"topology version {t.version} is stable: {ring_text(t.target_specs)}"
                 f" ({self.clock() - started:.1f}s)")
        return t

    async def _publish(self, t: Topology, reason: str) -> None:
        try:
            await publish(self.store, self.pool, t, reason=reason)
        except TopologyConflict as exc:
            raise MigrationError(
                f"{exc}: someone else changed the topology (an abort?); see crs shards status") from exc
        self.say(f"published topology version {t.version} ({t.phase.value})")

    @contextlib.asynccontextmanager
    async def _driver_lock(self, *, wait: float) -> AsyncIterator[None]:
        conn = await self.pool.acquire()
        try:
            deadline = self.clock() + wait
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_ID):
                if self.clock() >= deadline:
                    raise MigrationError("another `crs shards apply` or `abort` is running (advisory lock held);"
                                         " wait for it or stop it")
                await asyncio.sleep(0.1)
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
        finally:
            await self.pool.release(conn)

    # -- waiting for nodes -------------------------------------------------------------------------
    async def wait_for_nodes(self, version: int) -> list[NodeReport]:
        """Until every node with a heartbeat younger than the lease runs `version` (or newer)."""
        deadline = self.clock() + self.policy.wait_timeout
        started = self.clock()
        announced = False
        while True:
            nodes = await live_nodes(self.pool, self.policy.lease)
            behind = lagging(nodes, version)
            if not behind:
                took = self.clock() - started
                self.say(f"  all {len(nodes)} live node(s) run version {version}" + (f" ({took:.1f}s)" if took > 0.05
                                                                                  else ""))
                return nodes
            if self.clock() >= deadline:
                names = ", ".join(f"{n.node_id} at {n.address} (version {n.topology_version})" for n in behind[:5])
                raise MigrationError(
                    f"{len(behind)} live node(s) still run an older version after {self.policy.wait_timeout:.0f}s:"
                    f" {names}. A node that stopped heartbeating is presumed gone after CRS_TOPOLOGY_LEASE"
                    f" ({self.policy.lease:g}s). Rerun `crs shards apply` to go on, or `crs shards abort`.")
            if not announced:
                self.say(f"  waiting for {len(behind)} of {len(nodes)} live node(s) to run version {version} ...")
                announced = True
            await asyncio.sleep(self.policy.poll)

    # -- steps -------------------------------------------------------------------------------------
    def _clients(self, t: Topology) -> dict[str, aioredis.Redis]:
        timeout = self.policy.redis_timeout
        return {s.name: aioredis.Redis.from_url(s.address, socket_timeout=timeout, socket_connect_timeout=timeout)
                for s in t.shards}

    async def _flush_joining(self, t: Topology) -> None:
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

    async def _scan_step(self, t: Topology, step: str) -> None:
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
            verb = "copied" if step == "copy" else "deleted"
            label = "  copy   " if step == "copy" else "  cleanup"
            bar = ProgressBar(self.out, label, sum(totals.values()) + resumed, unit="keys", done=resumed)
            pacer = Pacer(self.policy.rate, now=self.clock())
            watch = _VersionWatch(self.store, t.version, self.clock)

            def draw(final: bool = False) -> None:
                bar.update(stats.scanned, f"{verb} {stats.moved:,}  skipped {stats.skipped:,}", final=final)

            async def run(name: str) -> None:
                p = stats.shards[name]
                if p.done:
                    return
                one = self._copy_batch if step == "copy" else self._cleanup_batch
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
                     if isinstance(found[k][0], bytes) and isinstance(found[k][1], int) and found[k][1] != -2]
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


class _VersionWatch:
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
        self._next = now + 0.25
        found = await self.store.current_version()
        if found != self.version:
            raise MigrationError(f"topology version {found} was published while this step ran on version"
                                 f" {self.version} (an abort?): stopping here")


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
