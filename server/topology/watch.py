"""Keeps one node process on the shard topology in force, without a restart.

At start the node reads the topology (PostgreSQL, or CRS_TOPOLOGY_FILE; CRS_REDIS_SHARDS while none
was ever published) and registers its heartbeat with that version, both under a shared lock that
publishing takes exclusively. Then every `topology_poll_interval` seconds it checks the version,
swaps a new one into the RedisTier (one assignment: rings, clients, routing), waits for the writes it
started under the old version to land, and only then reports the new version in its `node_status`
heartbeat — the row `crs shards apply` waits on before each step of a move, and `crs shards status`
shows. Heartbeats are written when the version changes and every third of `topology_lease`.

The heartbeat doubles as a lease: a node that has not confirmed its topology for `topology_lease`
seconds stops writing to Redis (fills and copies; reads and deletes go on), so a node cut off from
PostgreSQL long enough to be presumed gone by the migrator cannot put a key where it no longer belongs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter

import asyncpg

from server.cache.breaker import BreakerPolicy
from server.cache.replicas import ReplicatedShard
from server.cache.shard import SHARD_ERRORS, Shard
from server.cache.tier import RedisTier
from server.metrics import Metrics
from server.settings import Settings
from server.store.db import DB_ERRORS
from server.topology.policy import COPY_BUDGET_FRACTION
from server.topology.shard_stats import STATS_ERRORS, read_stats, read_stats_lean
from server.topology.store import (
    NodeReport,
    forget_node,
    heartbeat,
    open_store,
    prune_nodes,
    registration,
)
from shard_router.addresses import seed_text
from shard_router.topology import Phase, ShardState, Topology, TopologyError, diff, ring_text

log = logging.getLogger("crs.topology")

_CHECK_ERRORS = (TopologyError, *DB_ERRORS)
# Heartbeat rows of processes that vanished without a clean stop are deleted after this long.
FORGET_NODES_AFTER = 24 * 3600.0
# A heartbeat every this fraction of CRS_TOPOLOGY_LEASE (but not more often than the poll): a node
# can miss two in a row before the migrator presumes it gone.
HEARTBEATS_PER_LEASE = 3
# How long a switch waits for the writes started under the previous version to land: a write is at
# most two Redis commands in a row (a copy's SET and the DEL that undoes a late one), each bounded by
# CRS_REDIS_TIMEOUT, plus DRAIN_SLACK seconds for a busy event loop to run their callbacks.
DRAIN_COMMANDS = 2
DRAIN_SLACK = 1.0
# The INFO for metrics may take this many CRS_REDIS_TIMEOUTs: it is DBSIZE plus INFO, a far larger
# reply than a lookup's, and it runs apart from lookups, so a slow answer costs nothing but a sample.
STATS_TIMEOUT_FACTOR = 4


async def probe_copies(tier: RedisTier, *, timeout: float) -> None:
    """At start, one PING per copy: a copy that does not answer is marked down (its breaker probes it
    again after CRS_SHARD_RETRY_INTERVAL, and flushes it before it serves), so `crs_cache_shard_up` and
    `crs_cache_copy_up` say from the first scrape what the first lookups would find out. A copy that
    answers is asked its server's run_id: the server whose contents survive an outage of this node's
    connection to it (server/cache/shard.py `_recover`)."""
    async def one(copy: Shard) -> None:
        if not copy.is_up:
            return   # marked down by the topology
        try:
            async with asyncio.timeout(timeout):
                await copy.client.ping()
                await copy.remember_server()
        except SHARD_ERRORS as exc:
            copy.breaker.mark_down(exc)

    await asyncio.gather(*(one(copy) for copy in tier.copies()))


def node_identity() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


class TopologyWatcher:
    def __init__(self, *, settings: Settings, pool: asyncpg.Pool, metrics: Metrics) -> None:
        self.settings = settings
        self._seed = seed_text((a.name, a.weight, a.copies) for a in settings.redis_shards)
        self.pool = pool
        self.metrics = metrics
        self.store = open_store(pool, settings.topology_file)
        self.node_id = node_identity()
        self.address = ""
        self.topology: Topology | None = None
        self.tier: RedisTier | None = None
        self.shard_errors: Counter[str] = Counter()
        self._failing = False
        self._exported: dict[str, set[str]] = {}   # shard -> copies whose series this process exports
        self._reported = -1             # the version in the last heartbeat
        self._next_beat = 0.0
        self._unreadable_reason = ""   # why the topology in force was last found unreadable (logged once)

    async def open_tier(self) -> RedisTier | None:
        """The Redis tier for the topology in force, or None when there is no shard at all. The node
        registers its heartbeat with the version it read before anyone can publish the next one."""
        s = self.settings
        async with registration(self.pool, exclusive=False) as conn:
            topology = await self.store.current()
            if topology is None and s.redis_shards:
                topology = Topology.bootstrap((a.name, a.url, a.weight, a.replicas) for a in s.redis_shards)
            self.topology = topology
            if topology is not None:
                self.tier = RedisTier(
                    topology=topology, pool_size=s.redis_pool_size, timeout=s.redis_timeout,
                    policy=BreakerPolicy(failure_threshold=s.shard_failure_threshold,
                                         retry_interval=s.shard_retry_interval),
                    copy_budget=s.reinvalidate_delay * COPY_BUDGET_FRACTION, on_error=self._shard_error,
                    warm_window=s.cache_ttl,   # by then traffic has refilled an emptied copy anyway
                    preferred_copy=s.cache_preferred_copy,
                    thread_connections=s.redis_thread_connections if s.serving_model == "hybrid" else 0,
                    on_state_change=self._shard_state, on_copy=self.metrics.copied,
                    on_reply_error=self.metrics.shard_reply_error, on_copy_state=self._copy_state,
                    on_copy_error=self.metrics.copy_error)
            started = time.monotonic()
            await heartbeat(conn, self.report())
        if self.tier is not None:
            self.tier.renew_lease(started + s.topology_lease)
            await probe_copies(self.tier, timeout=s.redis_timeout)
        if topology is not None:
            self._export(topology)
        return self.tier

    def in_force(self) -> dict[str, object]:
        """The topology this node runs, for its start-up log line: version, phase, where it comes from
        and its shards (with their state where not active); CRS_REDIS_SHARDS only while none is published."""
        t = self.topology
        if t is None:
            return {"topology": "none: no shard (CRS_REDIS_SHARDS is empty), every miss reads PostgreSQL"}
        source = self.store.where if t.version else "CRS_REDIS_SHARDS (no topology published yet)"
        return {"topology_version": t.version, "topology_phase": t.phase.value, "topology_source": source,
                "shards": [s.name if s.state is ShardState.ACTIVE else f"{s.name} ({s.state.value})" for s in t.shards]}

    def _shard_error(self, shard: str) -> None:
        self.shard_errors[shard] += 1
        self.metrics.shard_error(shard)

    # A copy of a shard that left the topology may still change state while its client closes: its
    # series are gone (`_export`) and must stay gone.
    def _shard_state(self, shard: str, up: bool) -> None:
        if self.tier is not None and shard in self.tier.shards:
            self.metrics.shard_state(shard, up)

    def _copy_state(self, shard: str, copy: str, up: bool) -> None:
        group = self.tier.shards.get(shard) if self.tier is not None else None
        if group is not None and any(c.copy == copy for c in group.copies):
            self.metrics.copy_state(shard, copy, up)

    async def run(self, *, host: str, port: int) -> None:
        """Poll, swap, heartbeat, until cancelled. Database errors keep the current version."""
        self.address = f"{socket.gethostname() if host in ('0.0.0.0', '::', '') else host}:{port}"
        s = self.settings
        self._next_beat = 0.0          # the first check reports the address
        try:
            await prune_nodes(self.pool, FORGET_NODES_AFTER)
        except _CHECK_ERRORS:
            pass
        stats = asyncio.create_task(self._stats_loop()) if s.shard_stats_interval else None
        try:
            await self._poll_loop()
        finally:
            if stats is not None:
                stats.cancel()
                await asyncio.gather(stats, return_exceptions=True)

    async def _poll_loop(self) -> None:
        s = self.settings
        while True:
            try:
                await self.check()
            except _CHECK_ERRORS as exc:
                if not self._failing:
                    log.warning("topology check failed; staying on the current version",
                                extra={"error": type(exc).__name__, "reason": str(exc)[:200],
                                       "version": self.topology.version if self.topology else None})
                self._failing = True
            else:
                if self._failing:
                    log.info("topology check works again")
                self._failing = False
            await asyncio.sleep(s.topology_poll_interval)

    async def _stats_loop(self) -> None:
        """Apart from the poll loop, so a slow shard never delays a topology switch."""
        while True:
            await self.collect_stats()
            await asyncio.sleep(self.settings.shard_stats_interval)

    async def check(self) -> None:
        """One poll: switch to a newer version if there is one, then report the version in force."""
        running = self.topology.version if self.topology is not None else 0
        confirmed = True
        try:
            version = await self.store.current_version()
            topology = await self.store.current() if version > running else None
        except TopologyError as exc:
            # A document this release cannot read (one a newer release published mid-rollout, or a file
            # that does not parse): stay on the running version and go on reporting it, so `crs shards
            # apply` waits for this node instead of presuming it gone after its lease while it serves on
            # the old ring. Not confirmed: CRSTopologyNodeBehind says so.
            self._unreadable(exc)
            confirmed = False
        else:
            if topology is not None and topology.version > running:
                await self.switch(topology)
            elif version < running and version:
                log.error("the stored topology version went backwards; keeping the one in force",
                          extra={"stored": version, "running": running})
        report = self.report()
        now = time.monotonic()
        if report.topology_version != self._reported or now >= self._next_beat:
            # A heartbeat when the version changes (the migrator waits for it) and every third of the
            # lease; the lease runs from before the write, so it ends before the database's view of it.
            await heartbeat(self.pool, report)
            self._reported = report.topology_version
            beat_every = max(self.settings.topology_lease / HEARTBEATS_PER_LEASE, self.settings.topology_poll_interval)
            self._next_beat = now + beat_every
            if self.tier is not None:
                self.tier.renew_lease(now + self.settings.topology_lease)
        if confirmed:
            self.metrics.topology_confirmed.set(time.time())
            self._unreadable_reason = ""

    def _unreadable(self, exc: TopologyError) -> None:
        reason = str(exc)[:200]
        if reason != self._unreadable_reason:     # once per document, not once per poll
            log.error("the shard topology in force is not one this release can read: staying on the running"
                      " version (a newer release's command published it? finish the rollout first)",
                      extra={"running": self.topology.version if self.topology else 0, "reason": reason})
        self._unreadable_reason = reason

    async def switch(self, topology: Topology) -> None:
        old = self.topology
        if self.tier is None:
            if old is None or topology.version > old.version:
                log.warning("a shard topology was published but this node started without Redis shards:"
                            " restart it to use them", extra={"version": topology.version})
            self.topology = topology
            return
        previous_view = self.tier.apply_topology(topology)
        drain_timeout = DRAIN_COMMANDS * self.settings.redis_timeout + DRAIN_SLACK
        drained = await self.tier.drain(previous_view, timeout=drain_timeout)
        self.topology = topology
        self._export(topology)
        log.info("shard topology switched", extra={
            "version": topology.version, "phase": topology.phase.value, "aborting": topology.aborting,
            "changes": [str(c) for c in diff(old.shards, topology.shards)] if old is not None else [],
            "writes_drained": drained})

    def report(self) -> NodeReport:
        t = self.topology
        tier = self.tier
        down = tuple(sorted(name for name, shard in tier.shards.items() if not shard.is_up)) if tier else ()
        return NodeReport(node_id=self.node_id, address=self.address or "(starting)",
                          topology_version=t.version if t else 0,
                          phase=t.phase.value if t else Phase.STABLE.value,
                          ring=ring_text(tier.view.routing.read.shards) if tier else "",
                          shards_down=down, shard_errors=dict(self.shard_errors),
                          lease_s=self.settings.topology_lease, reinvalidate_delay_s=self.settings.reinvalidate_delay,
                          bootstrap_shards=self._seed)

    def _export(self, t: Topology) -> None:
        m = self.metrics
        m.topology_version.set(t.version)
        for phase in Phase:
            m.topology_phase.labels(phase.value).set(1 if phase is t.phase else 0)
        share = t.target_ring.share()
        exported: dict[str, set[str]] = {}
        for s in t.shards:
            draining = s.state is ShardState.DRAINING
            m.shard_weight.labels(s.name).set(0 if draining else s.weight)
            m.shard_share.labels(s.name).set(share.get(s.name, 0.0))
            for state in ShardState:
                m.shard_topology_state.labels(s.name, state.value).set(1 if state is s.state else 0)
            copies: set[str] = set()
            if self.tier is not None:
                group = self.tier.shards[s.name]
                m.shard_state(s.name, group.is_up)
                for copy in group.copies:
                    m.copy_state(s.name, copy.copy, copy.is_up)
                copies = {copy.copy for copy in group.copies}
            for label in self._exported.get(s.name, set()) - copies:   # a replica removed
                m.forget_copy(s.name, label)
            exported[s.name] = copies
        for name in self._exported.keys() - exported.keys():   # removed from the topology: its series go
            m.forget_shard(name, copies=self._exported[name], states=[state.value for state in ShardState])
        self._exported = exported

    async def collect_stats(self) -> None:
        if self.tier is None:
            return

        async def one(name: str, group: ReplicatedShard) -> None:
            shard = group.serving_copy()      # one copy speaks for the shard: they hold the same keys
            if shard is None:
                return
            try:
                if shard.reader is not None:   # plain redis://: the lean connection, a tenth of the CPU
                    stats = await read_stats_lean(shard.reader)
                else:
                    stats = await read_stats(shard.client, timeout=self.settings.redis_timeout * STATS_TIMEOUT_FACTOR)
            except STATS_ERRORS:
                return
            if self.tier is None or name not in self.tier.shards:
                return   # removed from the topology while INFO ran: its series are gone
            self.metrics.shard_keys.labels(name).set(stats.keys)
            self.metrics.shard_memory.labels(name).set(stats.memory_bytes)
            if stats.hit_ratio is not None:
                self.metrics.shard_hit_ratio.labels(name).set(stats.hit_ratio)

        await asyncio.gather(*(one(name, shard) for name, shard in self.tier.shards.items() if shard.is_up))

    async def forget(self) -> None:
        """A clean stop: remove this process's heartbeat so no migration waits for it."""
        try:
            await forget_node(self.pool, self.node_id)
        except _CHECK_ERRORS:
            pass
