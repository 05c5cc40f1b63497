"""What `crs shards status` and `crs shards plan` report, gathered from PostgreSQL and the shards.

Gathering only, read-only: each report is a typed value with its JSON form (`as_dict`, whose keys
scripts and tests/integration/test_resharding.py read — keep them). The tables are drawn from the
same values by server/cli/shards_render.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from server.settings import Settings
from server.topology.errors import ShardUnreachable
from server.topology.key_steps import STEPS
from server.topology.shard_stats import STATS_ERRORS, ShardStats, read_stats, sample_keys
from server.topology.staging import current_or_bootstrap
from server.topology.store import (
    NodeReport,
    PgTopologyStore,
    Progress,
    TopologyStore,
    live_nodes,
    load_draft,
    load_progress,
)
from shard_router import Ring
from shard_router.addresses import redact_url
from shard_router.planner import MovePlan, ShardSample, plan_moves
from shard_router.topology import Phase, diff, ring_text

# `status` answers promptly even with a shard down: seconds to connect to and hear from a shard, and
# for its DBSIZE + INFO together.
STATUS_REDIS_TIMEOUT = 2.0
STATUS_STATS_TIMEOUT = 3.0
# `plan` reads whole SCAN steps and MEMORY USAGE pipelines of CRS_MIGRATION_BATCH keys on shards that
# may be large and busy: seconds per connection/command, and per step.
PLAN_REDIS_TIMEOUT = 5.0
PLAN_STEP_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publication:
    """Who published the version in force, when and why (PostgreSQL only; a file keeps no history)."""

    at: dt.datetime
    by: str
    reason: str


@dataclass(frozen=True)
class CopyRow:
    """A replica of a shard (server/cache/replicas.py): its address and what its server holds."""

    label: str                   # replica-1, replica-2, ...
    address: str
    stats: ShardStats | None     # None: unreachable, and `error` says why
    error: str | None
    write_only: bool = False     # being added or removed: written, not read (shard_router/moves.py)

    def as_dict(self) -> dict[str, Any]:
        st = self.stats
        return {"copy": self.label, "address": self.address, "keys": st.keys if st else None,
                "memory_bytes": st.memory_bytes if st else None, "hit_ratio": st.hit_ratio if st else None,
                "reachable": st is not None, "error": self.error, "write_only": self.write_only}


@dataclass(frozen=True)
class ShardRow:
    name: str
    state: str
    address: str
    weight: int
    share: float                 # of the hash space, in the ring in force (the target ring during a move)
    source_share: float          # in the ring keys move from; = share when stable
    stats: ShardStats | None     # None: unreachable, and `error` says why
    error: str | None
    node_errors: int             # failed operations on it, summed over the live nodes' heartbeats
    down_on_nodes: int           # live nodes that see it down
    replicas: tuple[CopyRow, ...] = ()   # the copies besides the primary (this row's address and stats)

    def as_dict(self) -> dict[str, Any]:
        st = self.stats
        return {"name": self.name, "state": self.state, "address": self.address, "weight": self.weight,
                "share": self.share, "source_share": self.source_share,
                "keys": st.keys if st else None, "memory_bytes": st.memory_bytes if st else None,
                "hit_ratio": st.hit_ratio if st else None, "hits": st.hits if st else None,
                "misses": st.misses if st else None, "reachable": st is not None, "error": self.error,
                "node_errors": self.node_errors, "down_on_nodes": self.down_on_nodes,
                "replicas": [r.as_dict() for r in self.replicas]}


@dataclass(frozen=True)
class StagedChange:
    base_version: int
    changes: tuple[str, ...]     # one line per change, e.g. "+ shard-3 (redis://... weight 1)"


@dataclass(frozen=True)
class StatusReport:
    version: int                 # 0: none published yet, nodes run CRS_REDIS_SHARDS
    phase: Phase
    aborting: bool
    stored_in: str
    ring: str                    # the ring in force (the target ring during a move), as text
    source_ring: str             # the ring keys move from; = ring when stable
    publication: Publication | None
    shards: tuple[ShardRow, ...]
    lease: float                 # CRS_TOPOLOGY_LEASE: a node is live if heard from within it
    nodes: tuple[NodeReport, ...]
    progress: Mapping[str, Mapping[str, Progress]]   # step -> shard -> progress, steps with rows only
    draft: StagedChange | None

    @property
    def stable(self) -> bool:
        return self.phase is Phase.STABLE

    @property
    def node_versions(self) -> list[int]:
        return sorted({n.topology_version for n in self.nodes})

    def as_dict(self) -> dict[str, Any]:
        p = self.publication
        return {
            "version": self.version, "phase": self.phase.value, "aborting": self.aborting,
            "stored_in": self.stored_in, "published": self.version > 0,
            "published_at": p.at.isoformat() if p else None, "published_by": p.by if p else None,
            "reason": p.reason if p else None,
            "shards": [s.as_dict() for s in self.shards],
            "nodes": [{"node_id": n.node_id, "address": n.address, "topology_version": n.topology_version,
                       "phase": n.phase, "ring": n.ring, "shards_down": list(n.shards_down),
                       "seen_s_ago": round(n.age_s, 2)} for n in self.nodes],
            "node_versions": self.node_versions,
            "progress": {step: {name: dataclasses.asdict(pr) for name, pr in rows.items()}
                         for step, rows in self.progress.items() if rows},
            "draft": None if self.draft is None else {
                "base_version": self.draft.base_version, "changes": list(self.draft.changes)},
        }


async def gather_status(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> StatusReport:
    """The topology in force, each shard's INFO (or why not), the live nodes, a move's progress and
    the staged change. An unreachable shard is a row with its error, not a failure."""
    t = await current_or_bootstrap(store, settings)
    publication = None
    if isinstance(store, PgTopologyStore) and t.version:
        history = await store.history(1)
        if history:
            publication = Publication(history[0].created_at, history[0].created_by, history[0].reason)
    nodes = await live_nodes(pool, settings.topology_lease)
    draft = await load_draft(pool)
    progress = {step: await load_progress(pool, t.version, step) for step in STEPS}
    stats = await asyncio.gather(*(_shard_stats(s.address) for s in t.shards))
    replica_stats = await asyncio.gather(*(_shard_stats(url) for s in t.shards for url in s.replicas))
    copies: dict[str, tuple[CopyRow, ...]] = {}
    it = iter(replica_stats)
    for s in t.shards:
        copies[s.name] = tuple(
            CopyRow(f"replica-{i}", redact_url(url), st if isinstance(st, ShardStats) else None,
                    None if isinstance(st, ShardStats) else st, write_only=url in s.write_only)
            for i, (url, st) in enumerate(((u, next(it)) for u in s.replicas), start=1))
    share = t.target_ring.share()
    source_share = t.source_ring.share() if not t.is_stable else share
    rows = tuple(
        ShardRow(name=s.name, state=s.state.value, address=redact_url(s.address), weight=s.weight,
                 share=share.get(s.name, 0.0), source_share=source_share.get(s.name, 0.0),
                 stats=st if isinstance(st, ShardStats) else None, error=None if isinstance(st, ShardStats) else st,
                 node_errors=sum(int((n.shard_errors or {}).get(s.name, 0)) for n in nodes),
                 down_on_nodes=sum(1 for n in nodes if s.name in n.shards_down), replicas=copies[s.name])
        for s, st in zip(t.shards, stats, strict=True))
    return StatusReport(
        version=t.version, phase=t.phase, aborting=t.aborting, stored_in=store.where,
        ring=ring_text(t.target_specs), source_ring=ring_text(t.source_specs), publication=publication,
        shards=rows, lease=settings.topology_lease, nodes=tuple(nodes),
        progress={step: rows_ for step, rows_ in progress.items() if rows_},
        draft=None if draft is None else StagedChange(draft.base_version,
                                                       tuple(str(c) for c in diff(t.shards, draft.shards))))


async def _shard_stats(address: str) -> ShardStats | str:
    client = aioredis.Redis.from_url(address, socket_timeout=STATUS_REDIS_TIMEOUT,
                                     socket_connect_timeout=STATUS_REDIS_TIMEOUT)
    try:
        return await read_stats(client, timeout=STATUS_STATS_TIMEOUT)
    except STATS_ERRORS as exc:
        return f"unreachable ({type(exc).__name__})"
    finally:
        await client.aclose()


# --------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NothingToPlan:
    """The topology in force is stable and no change is staged."""

    version: int

    def as_dict(self) -> dict[str, Any]:
        """`plan --json`'s object for "nothing moves": PlanReport's keys, nothing counted (keys_total and
        bytes_total unknown: no shard was read), and `staged` false."""
        return {"what": f"nothing staged: topology version {self.version} is stable", "staged": False,
                "version": self.version, "exact": True, "hash_fraction": 0.0, "key_fraction": 0.0,
                "keys_total": None, "keys_moving": 0, "bytes_total": None, "bytes_moving": 0, "shards": {},
                "pairs": []}


@dataclass(frozen=True)
class PlanReport:
    what: str                    # "staged change against version N: ..." or "move in progress, version N (...)"
    sample: int                  # keys examined per shard (0 = all)
    plan: MovePlan
    weights_before: Mapping[str, int]
    weights_after: Mapping[str, int]

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "what": self.what, "exact": plan.exact, "hash_fraction": plan.hash_fraction,
            "key_fraction": plan.key_fraction, "keys_total": plan.keys_total, "keys_moving": plan.keys_moving,
            "bytes_total": plan.bytes_total, "bytes_moving": plan.bytes_moving,
            "shards": {name: {**dataclasses.asdict(m), "keys_after": m.keys_after, "bytes_after": m.bytes_after}
                       for name, m in plan.shards.items()},
            "pairs": [{"from": a, "to": b, "keys": n} for (a, b), n in sorted(plan.pairs.items())],
        }


async def gather_plan(settings: Settings, pool: asyncpg.Pool, store: TopologyStore, *,
                      sample: int) -> PlanReport | NothingToPlan:
    """Count what the staged change (or the move in progress) moves, on the real shards: up to `sample`
    keys per shard (0 = every key), extrapolated to DBSIZE. Raises ShardUnreachable."""
    t = await current_or_bootstrap(store, settings)
    draft = await load_draft(pool)
    if draft is not None and t.is_stable:
        source, target = t.target_ring, Ring(s.spec for s in draft.shards)
        addresses = {s.name: s.address for s in (*t.shards, *draft.shards)}
        what = f"staged change against version {draft.base_version}: " + "; ".join(
            str(c) for c in diff(t.shards, draft.shards))
    elif not t.is_stable:
        source, target = t.source_ring, t.target_ring
        addresses = {s.name: s.address for s in t.shards}
        what = f"move in progress, version {t.version} ({t.phase.value})"
    else:
        return NothingToPlan(t.version)
    names = [s.name for s in source.shards]
    samples = await asyncio.gather(*(_sample(n, addresses[n], sample, settings.migration_batch) for n in names))
    return PlanReport(what=what, sample=sample, plan=plan_moves(source, target, samples),
                      weights_before={s.name: s.weight for s in source.shards},
                      weights_after={s.name: s.weight for s in target.shards})


async def _sample(name: str, address: str, limit: int, batch: int) -> ShardSample:
    client = aioredis.Redis.from_url(address, socket_timeout=PLAN_REDIS_TIMEOUT,
                                     socket_connect_timeout=PLAN_REDIS_TIMEOUT)
    try:
        total, keys = await sample_keys(client, limit=limit, batch=batch, timeout=PLAN_STEP_TIMEOUT)
    except STATS_ERRORS as exc:
        raise ShardUnreachable(f"cannot read shard {name} at {redact_url(address)}:"
                               f" {type(exc).__name__}: {exc}") from exc
    finally:
        await client.aclose()
    return ShardSample(name, total, keys)
