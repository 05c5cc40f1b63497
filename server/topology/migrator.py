"""Drives a resharding move to its end: the I/O half of shard_router.topology's state machine.

`crs shards apply` and `crs shards abort` run `Migrator`. For the topology in force it does, step by
step (each step first waits until every live node runs the current version):

    preparing  -> flush the shards that join (nobody reads or fills them yet)      -> publish migrating
    migrating  -> copy the keys that change owner: SCAN each old owner, GET + PTTL,
                  SET NX PX on the new owner (rate-limited, resumable)              -> publish finishing
    finishing  -> delete the moved keys from their old owners (rate-limited, resumable)
                                                                                     -> publish stable

The key work of each step is key_steps.py; staging a change and the first version, staging.py.
Each step records its SCAN cursor per shard in shard_migration_progress after every batch, so an
interrupted run (Ctrl-C, a crash, a timeout) picks up where it stopped. One driver runs at a time (a
PostgreSQL advisory lock); `abort` publishes its reversal first, so a running `apply` notices the new
version after its current batch, stops, and hands the lock over.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TextIO

import asyncpg

from server.topology.errors import NODES_NAMED, MigrationError
from server.topology.key_steps import CLEANUP, COPY, KeySteps, StepStats, VersionWatch
from server.topology.policy import MigrationPolicy
from server.topology.store import (
    NodeReport,
    TopologyConflict,
    TopologyStore,
    clear_draft,
    lagging,
    live_nodes,
    load_draft,
    publish,
)
from shard_router.addresses import redact_url
from shard_router.moves import abort, add_replica, advance, begin, retire_replica, settle_replica
from shard_router.topology import Phase, Topology, TopologyError, ring_text

_LOCK_ID = 0x43525302          # "CRS" + 2: one resharding driver at a time (migrate uses 0x435253)
# `apply` never queues behind another driver: two at once is an operator mistake, refused at once.
# (`abort` waits up to the policy's wait_timeout: the running apply lets go after its current batch.)
APPLY_LOCK_WAIT = 0.0
# Seconds between tries of the driver lock while waiting for the other driver to let go.
LOCK_RETRY_SECONDS = 0.1
# A wait for nodes shorter than this (seconds) is not worth printing its duration.
QUIET_WAIT_SECONDS = 0.05


class Migrator:
    def __init__(self, *, pool: asyncpg.Pool, store: TopologyStore, policy: MigrationPolicy, out: TextIO,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.store = store
        self.policy = policy
        self.out = out
        self.clock = clock
        self.keys = KeySteps(pool=pool, store=store, policy=policy, out=out, clock=clock)

    @property
    def stats(self) -> list[StepStats]:
        """Every copy/cleanup step this driver ran, finished or not (for the summary `crs shards` prints)."""
        return self.keys.stats

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- entry points ------------------------------------------------------------------------------
    async def apply(self) -> Topology:
        """Start the staged change (if the topology is stable) and drive the move to stable."""
        async with self._driver_lock(wait=APPLY_LOCK_WAIT):
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

    async def change_replica(self, name: str, url: str, *, adding: bool) -> Topology:
        """`crs shards add-replica` / `remove-replica`: two published versions with the copy write-only
        in between (shard_router/moves.py); an added copy is flushed once every live node writes it.
        A run interrupted halfway is finished by either command."""
        async with self._driver_lock(wait=APPLY_LOCK_WAIT):
            current = await self.store.current()
            if current is None:
                raise MigrationError("no topology published yet")
            try:
                shard = current.shard(name)
                if url in shard.write_only:
                    self.say(f"{redact_url(url)} is a write-only copy of {name} (a run stopped halfway): finishing")
                else:
                    first = add_replica(current, name, url) if adding else retire_replica(current, name, url)
                    await self._publish(first, f"{'add' if adding else 'remove'}-replica {name}: write-only")
                    current = first
                last = settle_replica(current, name, url, keep=adding)
            except TopologyError as exc:
                raise MigrationError(str(exc)) from exc
            # Every node now deletes on the copy (added) or no longer reads it (removed).
            verb = "add" if adding else "remove"
            again = f"`crs shards {verb}-replica {name} {redact_url(url)}`"
            await self.wait_for_nodes(current.version, f"Rerun {again} to go on" + (
                f", or `crs shards remove-replica {name} {redact_url(url)}` to take the copy back." if adding
                else "."))
            await VersionWatch(self.store, current.version, self.clock).check()
            if adding:
                held = await self.keys.flush_copy(url, f"new copy of {name}")
                self.say(f"  flushed the new copy ({held:,} key(s) were on it)")
            await self._publish(last, f"{'add' if adding else 'remove'}-replica {name}")
            await self.wait_for_nodes(last.version, f"Version {last.version} is published, the change made:"
                                      " those nodes run it at their next poll.")
            return last

    # -- the loop ----------------------------------------------------------------------------------
    async def _drive(self, t: Topology) -> Topology:
        started = self.clock()
        while not t.is_stable:
            direction = " (abort)" if t.aborting else ""
            self.say(f"topology version {t.version}: {t.phase.value}{direction} — "
                     f"{ring_text(t.source_specs)} -> {ring_text(t.target_specs)}")
            nodes = await self.wait_for_nodes(t.version)
            self.keys.policy = self.policy.within_nodes(n.reinvalidate_delay_s for n in nodes)
            await VersionWatch(self.store, t.version, self.clock).check()
            if t.phase is Phase.PREPARING:
                await self.keys.flush_joining(t)
            elif t.phase is Phase.MIGRATING:
                await self.keys.scan_step(t, COPY)
            else:
                await self.keys.scan_step(t, CLEANUP)
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
                await asyncio.sleep(LOCK_RETRY_SECONDS)
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
        finally:
            await self.pool.release(conn)

    # -- waiting for nodes -------------------------------------------------------------------------
    async def wait_for_nodes(self, version: int, next_step: str = "Rerun `crs shards apply` to go on, or"
                             " `crs shards abort`.") -> list[NodeReport]:
        """Until every node with a heartbeat younger than the lease runs `version` (or newer); past the
        wait timeout MigrationError, ending with `next_step` (what the operator runs then)."""
        deadline = self.clock() + self.policy.wait_timeout
        started = self.clock()
        announced = False
        while True:
            nodes = await live_nodes(self.pool, self.policy.lease)
            behind = lagging(nodes, version)
            if not behind:
                took = self.clock() - started
                self.say(f"  all {len(nodes)} live node(s) run version {version}"
                         + (f" ({took:.1f}s)" if took > QUIET_WAIT_SECONDS else ""))
                return nodes
            if self.clock() >= deadline:
                names = ", ".join(f"{n.node_id} at {n.address} (version {n.topology_version})"
                                  for n in behind[:NODES_NAMED])
                raise MigrationError(
                    f"{len(behind)} live node(s) still run an older version after {self.policy.wait_timeout:.0f}s:"
                    f" {names}. A node that stopped heartbeating is presumed gone after its CRS_TOPOLOGY_LEASE"
                    f" (or this command's, {self.policy.lease:g}s, if longer). {next_step}")
            if not announced:
                self.say(f"  waiting for {len(behind)} of {len(nodes)} live node(s) to run version {version} ...")
                announced = True
            await asyncio.sleep(self.policy.poll)
