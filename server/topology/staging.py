"""Before a move: the topology to start from, the first published version, and the staged change.

`crs shards add / remove / reweight` build one draft change here (nothing moves until apply);
`mark`, `apply` and `abort` first make sure a version is published; `status` and `plan` read the
topology in force, or the ring nodes run until one is published.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TextIO

import asyncpg
import redis.asyncio as aioredis

from server.settings import Settings
from server.topology.errors import NODES_NAMED, MigrationError
from server.topology.store import Draft, TopologyStore, live_nodes, load_draft, publish, save_draft
from shard_router.addresses import seed_text
from shard_router.topology import Topology, TopologyError, TopologyShard, ring_text

# Seconds to connect to and hear from a shard being added: it is checked interactively, so a wrong
# address should fail fast; a healthy Redis answers PING and DBSIZE in milliseconds.
PROBE_TIMEOUT = 3.0


def bootstrap(store: TopologyStore, settings: Settings) -> Topology:
    """Version 0: the ring of CRS_REDIS_SHARDS, which nodes run while no topology was ever published."""
    if not settings.redis_shards:
        raise MigrationError(f"no topology in {store.where} and CRS_REDIS_SHARDS is empty")
    return Topology.bootstrap((a.name, a.url, a.weight, a.replicas) for a in settings.redis_shards)


async def current_or_bootstrap(store: TopologyStore, settings: Settings) -> Topology:
    """The topology in force, or version 0 when none was published (read-only: publishes nothing)."""
    t = await store.current()
    return t if t is not None else bootstrap(store, settings)


async def ensure_published(store: TopologyStore, pool: asyncpg.Pool, settings: Settings,
                           out: TextIO | None = None, check: Callable[[Topology], object] | None = None) -> Topology:
    """The topology in force; when none was ever published, version 1 from CRS_REDIS_SHARDS — but only
    if every live node runs that same ring (they all run the bootstrap until then), and only once
    `check` (the command's own change, tried on it) passed: a command that fails publishes nothing."""
    current = await store.current()
    if current is not None:
        return current
    if not settings.redis_shards:
        raise MigrationError(f"no topology in {store.where} and CRS_REDIS_SHARDS is empty: set CRS_REDIS_SHARDS"
                             " to the shards the nodes run")
    boot = bootstrap(store, settings)
    ring = ring_text(boot.target_specs)
    nodes = await live_nodes(pool, settings.topology_lease)
    odd = [n for n in nodes if n.ring != ring]
    if odd:
        raise MigrationError(
            f"CRS_REDIS_SHARDS here is {ring}, but live node(s) run another ring: "
            + "; ".join(f"{n.node_id} runs {n.ring or 'no shard'}" for n in odd[:NODES_NAMED])
            + ". Run this command with the nodes' CRS_REDIS_SHARDS.")
    # Same names and weights is not enough: the servers become every node's on version 1 (a port-forward
    # address here would take every node's shards away). Nodes older than migration 0015 do not say.
    seed = seed_text((s.name, s.weight, s.copies) for s in boot.shards)
    elsewhere = [n for n in nodes if n.bootstrap_shards is not None and n.bootstrap_shards != seed]
    if elsewhere:
        raise MigrationError(
            f"CRS_REDIS_SHARDS here names other servers than live node(s) use: here {seed}; "
            + "; ".join(f"{n.node_id}: {n.bootstrap_shards}" for n in elsewhere[:NODES_NAMED])
            + ". Run this command with the nodes' CRS_REDIS_SHARDS (the addresses they reach the shards at).")
    first = Topology(version=1, shards=boot.shards)
    if check is not None:
        try:
            check(first)
        except (TopologyError, TypeError) as exc:
            raise MigrationError(str(exc)) from exc
    await publish(store, pool, first, reason="seeded from CRS_REDIS_SHARDS")
    if out is not None:
        out.write(f"topology version 1 published from CRS_REDIS_SHARDS ({ring})\n")
    return first


async def stage_change(store: TopologyStore, pool: asyncpg.Pool, settings: Settings,
                       change: Callable[[Sequence[TopologyShard]], Sequence[TopologyShard]],
                       out: TextIO | None = None) -> tuple[Topology, Draft]:
    """Apply `change` to the draft (starting from the stable topology in force) and save it."""
    current = await ensure_published(store, pool, settings, out, check=lambda seed: change(seed.shards))
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


async def probe_shard(address: str) -> int:
    """PING a shard about to be added; how many keys it holds (they are flushed when the move starts).
    Redis and network errors (shard_stats.STATS_ERRORS) propagate: the caller says what to do."""
    client = aioredis.Redis.from_url(address, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT)
    try:
        await client.ping()
        return int(await client.dbsize())
    finally:
        await client.aclose()
