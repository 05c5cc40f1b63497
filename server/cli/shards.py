"""`crs shards ...`: the Redis shard topology, for SREs — see, plan, change, move, undo.

Thin: parse, build settings, call server/topology/migrator.py and friends, print.
docs/runbooks/resharding.md is the long form of the manuals below.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO

from server.cli.base import settings_from_args
from server.cli.render import percent, size, table
from server.settings import Settings

if TYPE_CHECKING:
    import asyncpg

    from server.topology.store import TopologyStore
    from shard_router.topology import Topology, TopologyShard

_RAW = argparse.RawDescriptionHelpFormatter

EPILOG = """Every command reads the same CRS_* settings as the nodes (README.md): CRS_PG_DSN (the
topology, the staged change, the move's progress and the nodes' heartbeats live in PostgreSQL),
CRS_REDIS_SHARDS (the ring nodes run until a topology is first published), CRS_TOPOLOGY_FILE,
CRS_TOPOLOGY_LEASE, CRS_MIGRATION_RATE, CRS_MIGRATION_BATCH, CRS_REINVALIDATE_DELAY.
Exit codes: 0 done, 1 refused or stopped (the message says why and what to do next), 2 bad usage or
configuration, 3 PostgreSQL or a Redis shard unreachable, 130 interrupted (a move resumes with apply).
Runbook: docs/runbooks/resharding.md."""

OVERVIEW = """See and change the Redis shards nodes cache on, without a restart and without a failed lookup.

The topology (shard names, addresses, weights, states) is versioned in PostgreSQL; every node polls
it (CRS_TOPOLOGY_POLL_INTERVAL) and reports the version it runs in a heartbeat. Changing which shards
own which keys is a move in three published steps — preparing, migrating (a warmer copies the keys
that change owner), finishing (the old owners' copies are deleted) — each started only when every
live node runs the previous one. Lookups keep working throughout: reads try the new owner, then the
old one, then PostgreSQL; writes delete on both owners.

Typical session:
  crs shards status                                   what runs now, per shard and per node
  crs shards add shard-4 --address redis://redis-4:6379/0
  crs shards plan                                     keys and bytes each shard gains and loses
  crs shards apply                                    move them (progress bar; Ctrl-C resumes later)
  crs shards abort                                    at any point: back to the ring you started from"""


class _Fail(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add `shards` and its subcommands to the `crs` parser's subcommands."""
    p = sub.add_parser("shards", help="Redis shard topology: status, plan, add/remove/reweight, apply, abort",
                       description=OVERVIEW, epilog=EPILOG, formatter_class=_RAW)
    ss = p.add_subparsers(dest="shards_command", required=True, metavar="SHARDS_COMMAND")

    s = ss.add_parser("status", help="the topology, each shard and each node, now", epilog=EPILOG,
                      formatter_class=_RAW, description=(
        "Print the topology in force (version, phase, where it is stored) and, per shard: state,\n"
        "address, weight, share of the keyspace, key count and memory (DBSIZE, INFO used_memory), hit\n"
        "ratio (INFO keyspace_hits / (hits + misses) since the shard started), failed operations and\n"
        "how many nodes see it down (from the nodes' heartbeats). Then every live node (heartbeat\n"
        "younger than CRS_TOPOLOGY_LEASE) with the topology version it runs, the progress of a move\n"
        "in progress, and the staged change if any. Read-only. The same numbers are exported by every\n"
        "node as crs_topology_* and crs_cache_shard_* metrics."))
    s.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    s.set_defaults(func=cmd_status)

    s = ss.add_parser("plan", help="how many keys and bytes the staged change moves, before anything moves",
                      epilog=EPILOG, formatter_class=_RAW, description=(
        "For the staged change (or the move in progress), show per shard: weight and share of the\n"
        "keyspace before and after, and how many keys and bytes it holds, loses, gains and will hold;\n"
        "the fraction of the keys and of the hash space that changes owner; and which shard sends how\n"
        "many keys to which. Keys are counted on the real shards: SCAN plus MEMORY USAGE on up to\n"
        "--sample keys per shard, extrapolated to DBSIZE (--sample 0 examines every key). The hash\n"
        "space fraction is exact. Read-only: nothing moves until `crs shards apply`."))
    s.add_argument("--sample", type=int, default=20_000, metavar="N",
                   help="keys examined per shard (default 20000; 0 = all, exact)")
    s.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    s.set_defaults(func=cmd_plan)

    s = ss.add_parser("add", help="stage a new shard (nothing moves until apply)", epilog=EPILOG,
                      formatter_class=_RAW, description=(
        "Stage adding shard NAME at --address with --weight to the draft change (create the draft from\n"
        "the topology in force if there is none). Several add/remove/reweight commands build one\n"
        "change, applied together. NAME is the shard's stable identity in the ring (1-63 characters of\n"
        "[a-z0-9.-], e.g. the StatefulSet pod name); the address only says where to reach it. The new\n"
        "shard must be reachable; whatever it holds is flushed when the move starts. Prints the change\n"
        "and the share of the hash space that will move; `crs shards plan` counts real keys."))
    s.add_argument("name", help="shard name, e.g. shard-4")
    s.add_argument("--address", required=True, help="redis://HOST:PORT/DB of the new shard")
    s.add_argument("--weight", type=int, default=1, help="relative weight (default 1)")
    s.add_argument("--no-check", action="store_true", help="do not PING the new shard now")
    s.set_defaults(func=cmd_add)

    s = ss.add_parser("remove", help="stage removing a shard (its keys move to the others on apply)",
                      epilog=EPILOG, formatter_class=_RAW, description=(
        "Stage removing shard NAME: on apply its keys are copied to their new owners, then deleted\n"
        "from it, and it leaves the topology. Stop its Redis only after `crs shards status` shows a\n"
        "stable version without it on every node."))
    s.add_argument("name")
    s.set_defaults(func=cmd_remove)

    s = ss.add_parser("reweight", help="stage a new weight for a shard", epilog=EPILOG, formatter_class=_RAW,
                      description=(
        "Stage changing shard NAME's weight. Note that with ketama (twemproxy's float32 arithmetic)\n"
        "a weight change also moves some keys between the other shards: `crs shards plan` shows them."))
    s.add_argument("name")
    s.add_argument("--weight", type=int, required=True, help="new relative weight (>= 1)")
    s.set_defaults(func=cmd_reweight)

    s = ss.add_parser("mark", help="take a shard out (down) or put it back (active); no key moves",
                      epilog=EPILOG, formatter_class=_RAW, description=(
        "Publish a new version with shard NAME marked down or active, e.g. before maintenance on its\n"
        "Redis. Nodes stop using a down shard (its keys are served from PostgreSQL, never remapped to\n"
        "another shard) and flush it before using it again once it is marked active, since it may\n"
        "have missed deletes meanwhile. Only in a stable topology."))
    s.add_argument("name")
    s.add_argument("state", choices=("down", "active"))
    s.set_defaults(func=cmd_mark)

    s = ss.add_parser("apply", help="start the staged change and move the keys (resumable)", epilog=EPILOG,
                      formatter_class=_RAW, description=(
        "Publish the staged change as the first step of a move and drive it to a stable topology:\n"
        "  preparing  every node deletes on both owners; the joining shards are flushed\n"
        "  migrating  reads try the new owner, then the old; the warmer copies every key that changes\n"
        "             owner (SCAN the old owner, GET + PTTL, SET NX with the remaining TTL), paced to\n"
        "             --rate keys per second, with a progress bar\n"
        "  finishing  reads use the new owner only; the moved keys are deleted from their old owners\n"
        "  stable     the new ring alone\n"
        "Before each step it waits until every live node runs the previous version (--wait-timeout).\n"
        "Progress is saved after every batch: after Ctrl-C, a crash or a timeout, run apply again to\n"
        "resume where it stopped. Without a staged change it resumes the move in progress."))
    s.add_argument("--rate", type=int, help="keys examined per second (default CRS_MIGRATION_RATE = 20000)")
    s.add_argument("--batch", type=int, help="keys per SCAN step (default CRS_MIGRATION_BATCH = 500)")
    s.add_argument("--wait-timeout", type=float,
                   help="seconds to wait for nodes at each step (default max(60, 3 x CRS_TOPOLOGY_LEASE))")
    s.set_defaults(func=cmd_apply)

    s = ss.add_parser("abort", help="discard the staged change, or take the move in progress back", epilog=EPILOG,
                      formatter_class=_RAW, description=(
        "Safe at any point. Discards the staged change. During a move: in preparing, the old ring is\n"
        "stable again at once; in migrating or finishing, the way back is itself a finishing step\n"
        "(reads go to the old owners only, deletes to both; then the copies made on the new owners\n"
        "are deleted) ending in the old ring, stable. A running `apply` notices, stops after its\n"
        "current batch, and this command takes over. Interrupted, it resumes with `crs shards apply`."))
    s.add_argument("--rate", type=int, help="keys examined per second (default CRS_MIGRATION_RATE)")
    s.add_argument("--batch", type=int, help="keys per SCAN step (default CRS_MIGRATION_BATCH)")
    s.add_argument("--wait-timeout", type=float, help="seconds to wait for nodes at each step")
    s.set_defaults(func=cmd_abort)

    s = ss.add_parser("history", help="the last topology versions, who published them and why", epilog=EPILOG,
                      formatter_class=_RAW, description=(
        "List the most recent topology versions, newest first: version, phase, target ring, when and\n"
        "by which database role each was published, and why (seeded from CRS_REDIS_SHARDS, a step of\n"
        "apply or abort, mark). The table is append-only: the highest version is the one in force.\n"
        "To go back to an older ring after a finished move, stage it again with add/remove/reweight."))
    s.add_argument("--limit", type=int, default=20, help="versions to show (default 20)")
    s.set_defaults(func=cmd_history)


# --------------------------------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace, body: Callable[[Settings, asyncpg.Pool, TopologyStore], Awaitable[int]]) -> int:
    """Settings, a small pool, the store; errors to messages and exit codes."""
    import asyncpg
    from redis.exceptions import RedisError

    from server.errors import BackendUnavailable
    from server.store.db import create_pool
    from server.topology.migrator import MigrationError
    from server.topology.store import TopologyConflict, open_store
    from shard_router.topology import TopologyError

    settings = settings_from_args(args)

    async def main() -> int:
        pool = await create_pool(replace(settings, pg_pool_min=1, pg_pool_max=4))
        try:
            return await body(settings, pool, open_store(pool, settings.topology_file))
        finally:
            await asyncio.shield(pool.close())

    try:
        return asyncio.run(main())
    except _Fail as exc:
        print(f"crs shards: {exc}", file=sys.stderr)
        return exc.code
    except (MigrationError, TopologyError, TopologyConflict) as exc:
        print(f"crs shards: {exc}", file=sys.stderr)
        return 1
    except (BackendUnavailable, RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"crs shards: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3


async def _current_or_bootstrap(store: TopologyStore, settings: Settings) -> Topology:
    from shard_router.topology import Topology

    t = await store.current()
    if t is not None:
        return t
    if not settings.redis_shards:
        raise _Fail(f"no topology in {store.where} and CRS_REDIS_SHARDS is empty")
    return Topology.bootstrap((a.name, a.url, a.weight) for a in settings.redis_shards)


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    return _run(args, lambda s, pool, store: _status(args, s, pool, store, sys.stdout))


async def _status(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool, store: TopologyStore,
                  out: TextIO) -> int:
    import json

    import redis.asyncio as aioredis

    from server.topology.shard_stats import STATS_ERRORS, ShardStats, read_stats
    from server.topology.store import PgTopologyStore, live_nodes, load_draft, load_progress
    from shard_router.topology import diff

    t = await _current_or_bootstrap(store, settings)
    record = None
    if isinstance(store, PgTopologyStore) and t.version:
        history = await store.history(1)
        record = history[0] if history else None
    nodes = await live_nodes(pool, settings.topology_lease)
    draft = await load_draft(pool)
    progress = {step: await load_progress(pool, t.version, step) for step in ("copy", "cleanup")}

    async def stats_of(shard: TopologyShard) -> ShardStats | str:
        client = aioredis.Redis.from_url(shard.address, socket_timeout=2, socket_connect_timeout=2)
        try:
            return await read_stats(client, timeout=3)
        except STATS_ERRORS as exc:
            return f"unreachable ({type(exc).__name__})"
        finally:
            await client.aclose()

    stats = dict(zip([s.name for s in t.shards], await asyncio.gather(*(stats_of(s) for s in t.shards)),
                     strict=True))
    share = t.target_ring.share()
    source_share = t.source_ring.share() if not t.is_stable else share
    errors = {s.name: sum(int((n.shard_errors or {}).get(s.name, 0)) for n in nodes) for s in t.shards}
    down_on = {s.name: sum(1 for n in nodes if s.name in n.shards_down) for s in t.shards}
    versions = sorted({n.topology_version for n in nodes})

    shard_rows: list[dict[str, Any]] = []
    for s in t.shards:
        st = stats[s.name]
        shard_rows.append({
            "name": s.name, "state": s.state.value, "address": s.address, "weight": s.weight,
            "share": share.get(s.name, 0.0), "source_share": source_share.get(s.name, 0.0),
            "keys": st.keys if isinstance(st, ShardStats) else None,
            "memory_bytes": st.memory_bytes if isinstance(st, ShardStats) else None,
            "hit_ratio": st.hit_ratio if isinstance(st, ShardStats) else None,
            "hits": st.hits if isinstance(st, ShardStats) else None,
            "misses": st.misses if isinstance(st, ShardStats) else None,
            "reachable": isinstance(st, ShardStats), "error": None if isinstance(st, ShardStats) else st,
            "node_errors": errors[s.name], "down_on_nodes": down_on[s.name]})
    doc: dict[str, Any] = {
        "version": t.version, "phase": t.phase.value, "aborting": t.aborting, "stored_in": store.where,
        "published": t.version > 0,
        "published_at": record.created_at.isoformat() if record else None,
        "published_by": record.created_by if record else None, "reason": record.reason if record else None,
        "shards": shard_rows,
        "nodes": [{"node_id": n.node_id, "address": n.address, "topology_version": n.topology_version,
                   "phase": n.phase, "ring": n.ring, "shards_down": list(n.shards_down),
                   "seen_s_ago": round(n.age_s, 2)} for n in nodes],
        "node_versions": versions,
        "progress": {step: {name: vars(p) for name, p in rows.items()} for step, rows in progress.items() if rows},
        "draft": None if draft is None else {
            "base_version": draft.base_version,
            "changes": [str(c) for c in diff(t.shards, draft.shards)]},
    }
    if args.json:
        out.write(json.dumps(doc, indent=2, default=str) + "\n")
        return 0

    where = f"{store.where}" + (f", published {record.created_at:%Y-%m-%d %H:%M:%S %Z} by {record.created_by}"
                                f" ({record.reason})" if record else "")
    if not t.version:
        where = f"not published yet: nodes run CRS_REDIS_SHARDS; {store.where} is empty"
    phase = t.phase.value + (" (abort)" if t.aborting else "")
    out.write(f"Topology version {t.version} — {phase} — {where}\n")
    if not t.is_stable:
        from shard_router.topology import ring_text

        out.write(f"  moving keys from {ring_text(t.source_specs)} to {ring_text(t.target_specs)}\n")
    out.write("\n")
    rows: list[list[object]] = [["SHARD", "STATE", "ADDRESS", "WEIGHT", "SHARE", "KEYS", "MEMORY", "HIT RATIO",
                                 "ERRORS", "DOWN ON"]]
    for r in shard_rows:
        share_text = percent(r["share"]) if t.is_stable else f"{percent(r['source_share'])} -> {percent(r['share'])}"
        rows.append([r["name"], r["state"], r["address"], r["weight"], share_text,
                     f"{r['keys']:,}" if r["reachable"] else r["error"],
                     size(r["memory_bytes"]) if r["reachable"] else "-", percent(r["hit_ratio"]),
                     r["node_errors"], f"{r['down_on_nodes']} node(s)" if r["down_on_nodes"] else "-"])
    table(rows, out)
    out.write(f"\nNodes: {len(nodes)} live (heartbeat within CRS_TOPOLOGY_LEASE = {settings.topology_lease:g}s)\n")
    if nodes:
        table([["NODE", "ADDRESS", "VERSION", "PHASE", "SHARDS DOWN", "SEEN"]]
               + [[n.node_id, n.address, n.topology_version, n.phase, ",".join(n.shards_down) or "-",
                   f"{n.age_s:.1f}s ago"] for n in nodes], out)
        if versions == [t.version]:
            out.write(f"All live nodes run version {t.version}.\n")
        else:
            out.write(f"Nodes run versions {', '.join(map(str, versions))}; the topology in force is {t.version}.\n")
    for step, rows_ in progress.items():
        if rows_:
            done = sum(p.scanned for p in rows_.values())
            moved = sum(p.moved for p in rows_.values())
            finished = all(p.done for p in rows_.values())
            out.write(f"\n{step} step of version {t.version}: {done:,} keys examined, {moved:,}"
                      f" {'copied' if step == 'copy' else 'deleted'}{' (done)' if finished else ''}\n")
    if draft is not None:
        out.write(f"\nStaged change (against version {draft.base_version}), not applied:\n")
        for c in diff(t.shards, draft.shards):
            out.write(f"  {c}\n")
        out.write("  next: crs shards plan, then crs shards apply (or crs shards abort to discard it)\n")
    return 0


# --------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    return _run(args, lambda s, pool, store: _plan(args, s, pool, store, sys.stdout))


async def _plan(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool, store: TopologyStore,
                out: TextIO) -> int:
    import json

    import redis.asyncio as aioredis

    from server.topology.shard_stats import STATS_ERRORS, sample_keys
    from server.topology.store import load_draft
    from shard_router import Ring
    from shard_router.planner import ShardSample, plan_moves
    from shard_router.topology import diff

    if args.sample < 0:
        raise _Fail("--sample must be >= 0", code=2)
    t = await _current_or_bootstrap(store, settings)
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
        out.write(f"topology version {t.version} is stable and no change is staged: nothing to plan"
                  " (stage one with crs shards add/remove/reweight)\n")
        return 0

    async def sample(name: str) -> ShardSample:
        client = aioredis.Redis.from_url(addresses[name], socket_timeout=5, socket_connect_timeout=5)
        try:
            total, keys = await sample_keys(client, limit=args.sample, batch=settings.migration_batch, timeout=10)
        except STATS_ERRORS as exc:
            raise _Fail(f"cannot read shard {name} at {addresses[name]}: {type(exc).__name__}: {exc}", 3) from exc
        finally:
            await client.aclose()
        return ShardSample(name, total, keys)

    names = [s.name for s in source.shards]
    samples = await asyncio.gather(*(sample(n) for n in names))
    plan = plan_moves(source, target, samples)
    if args.json:
        out.write(json.dumps({
            "what": what, "exact": plan.exact, "hash_fraction": plan.hash_fraction,
            "key_fraction": plan.key_fraction, "keys_total": plan.keys_total, "keys_moving": plan.keys_moving,
            "bytes_total": plan.bytes_total, "bytes_moving": plan.bytes_moving,
            "shards": {name: {**vars(m), "keys_after": m.keys_after, "bytes_after": m.bytes_after}
                       for name, m in plan.shards.items()},
            "pairs": [{"from": a, "to": b, "keys": n} for (a, b), n in sorted(plan.pairs.items())],
        }, indent=2) + "\n")
        return 0
    weights_before = {s.name: s.weight for s in source.shards}
    weights_after = {s.name: s.weight for s in target.shards}
    out.write(f"Plan for the {what}\n\n")
    rows: list[list[object]] = [["SHARD", "WEIGHT", "SHARE", "KEYS NOW", "LOSES", "GAINS", "KEYS AFTER",
                                 "BYTES NOW", "LOSES", "GAINS", "BYTES AFTER"]]
    for name, m in plan.shards.items():
        wb, wa = weights_before.get(name), weights_after.get(name)
        weight = f"{wb if wb is not None else '-'} -> {wa if wa is not None else '-'}" if wb != wa else str(wb)
        rows.append([name, weight, f"{percent(m.share_before)} -> {percent(m.share_after)}",
                     f"{m.keys_before:,.0f}", f"-{m.keys_out:,.0f}", f"+{m.keys_in:,.0f}", f"{m.keys_after:,.0f}",
                     size(m.bytes_before), f"-{size(m.bytes_out)}", f"+{size(m.bytes_in)}",
                     size(m.bytes_after)])
    table(rows, out)
    how = "every key examined" if plan.exact else f"extrapolated from up to {args.sample:,} keys per shard"
    out.write(f"\nMoves {plan.keys_moving:,.0f} of {plan.keys_total:,.0f} keys ({percent(plan.key_fraction)}),"
              f" {size(plan.bytes_moving)} of {size(plan.bytes_total)} ({how});"
              f" {percent(plan.hash_fraction)} of the hash space changes owner.\n")
    if plan.pairs:
        out.write("From -> to:\n")
        for (a, b), n in sorted(plan.pairs.items(), key=lambda kv: -kv[1]):
            out.write(f"  {a} -> {b}: {n:,.0f} keys\n")
    moved_between_old = sum(n for (a, b), n in plan.pairs.items() if b in weights_before)
    if moved_between_old and any(name not in weights_before for name in weights_after):
        out.write(f"Note: {moved_between_old:,.0f} keys move between shards that stay (ketama float32 point"
                  " counts, see docs/ring.md).\n")
    return 0


# --------------------------------------------------------------------------------------------------
# add / remove / reweight / mark
# --------------------------------------------------------------------------------------------------


def _stage(args: argparse.Namespace, change: Callable[[Sequence[TopologyShard]], Sequence[TopologyShard]],
           precheck: Callable[[Settings], Awaitable[None]] | None = None) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.migrator import stage_change
        from shard_router import Ring
        from shard_router.planner import moved_fraction
        from shard_router.topology import diff

        if precheck is not None:
            await precheck(settings)
        current, draft = await stage_change(store, pool, settings, change, out=sys.stdout)
        print(f"Staged change against topology version {current.version} (not applied):")
        for c in diff(current.shards, draft.shards):
            print(f"  {c}")
        fraction = moved_fraction(current.target_ring, Ring(s.spec for s in draft.shards))
        print(f"{percent(fraction)} of the hash space would change owner."
              " Next: crs shards plan (count keys and bytes), crs shards apply; crs shards abort discards it.")
        return 0

    return _run(args, body)


def cmd_add(args: argparse.Namespace) -> int:
    from shard_router.topology import stage_add

    async def check(settings: Settings) -> None:
        if args.no_check:
            return
        import redis.asyncio as aioredis

        from server.topology.shard_stats import STATS_ERRORS

        client = aioredis.Redis.from_url(args.address, socket_timeout=3, socket_connect_timeout=3)
        try:
            await client.ping()
            held = int(await client.dbsize())
        except STATS_ERRORS as exc:
            raise _Fail(f"shard {args.name} at {args.address} does not answer ({type(exc).__name__}: {exc});"
                        " start it first, or pass --no-check", 3) from exc
        finally:
            await client.aclose()
        if held:
            print(f"note: {args.address} holds {held:,} key(s); it is flushed when the move starts")

    return _stage(args, lambda draft: stage_add(draft, args.name, args.address, args.weight), check)


def cmd_remove(args: argparse.Namespace) -> int:
    from shard_router.topology import stage_remove

    return _stage(args, lambda draft: stage_remove(draft, args.name))


def cmd_reweight(args: argparse.Namespace) -> int:
    from shard_router.topology import stage_reweight

    return _stage(args, lambda draft: stage_reweight(draft, args.name, args.weight))


def cmd_mark(args: argparse.Namespace) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.migrator import ensure_published
        from server.topology.store import publish
        from shard_router.topology import ShardState, set_state

        current = await ensure_published(store, pool, settings, out=sys.stdout)
        new = set_state(current, args.name, ShardState(args.state))
        await publish(store, pool, new, reason=f"mark {args.name} {args.state}")
        print(f"published topology version {new.version}: {args.name} is {args.state}"
              + (" (nodes flush it before using it again)" if args.state == "active" else
                 " (its keys are served from PostgreSQL)"))
        return 0

    return _run(args, body)


# --------------------------------------------------------------------------------------------------
# apply / abort / history
# --------------------------------------------------------------------------------------------------


def _drive(args: argparse.Namespace, aborting: bool) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.migrator import MigrationPolicy, Migrator, ensure_published

        for flag in ("rate", "batch"):
            if getattr(args, flag) is not None and getattr(args, flag) <= 0:
                raise _Fail(f"--{flag} must be > 0", code=2)
        await ensure_published(store, pool, settings, out=sys.stdout)
        policy = MigrationPolicy.from_settings(settings, rate=args.rate, batch=args.batch,
                                               wait_timeout=args.wait_timeout)
        migrator = Migrator(pool=pool, store=store, policy=policy, out=sys.stdout)
        try:
            await (migrator.abort() if aborting else migrator.apply())
        finally:
            for st in migrator.stats:
                verb = "copied" if st.step == "copy" else "deleted"
                why = " (already on the new owner, expired, or not this shard's)" if st.skipped else ""
                print(f"  {st.step}: {st.scanned:,} keys examined, {st.moved:,} {verb}, {st.skipped:,} skipped{why}"
                      f" in {st.seconds:.1f}s")
        return 0

    try:
        return _run(args, body)
    except KeyboardInterrupt:
        print("\ninterrupted: progress is saved; `crs shards apply` resumes, `crs shards abort` goes back",
              file=sys.stderr)
        raise


def cmd_apply(args: argparse.Namespace) -> int:
    return _drive(args, aborting=False)


def cmd_abort(args: argparse.Namespace) -> int:
    return _drive(args, aborting=True)


def cmd_history(args: argparse.Namespace) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.store import PgTopologyStore
        from shard_router.topology import ring_text

        if not isinstance(store, PgTopologyStore):
            raise _Fail(f"history is kept in PostgreSQL only; the topology comes from {store.where}")
        rows: list[list[object]] = [["VERSION", "PHASE", "TARGET RING", "PUBLISHED", "BY", "REASON"]]
        for r in await store.history(args.limit):
            phase = r.topology.phase.value + (" (abort)" if r.topology.aborting else "")
            rows.append([r.topology.version, phase, ring_text(r.topology.target_specs),
                         f"{r.created_at:%Y-%m-%d %H:%M:%S}", r.created_by, r.reason])
        if len(rows) == 1:
            print("no topology published yet (nodes run CRS_REDIS_SHARDS)")
        else:
            table(rows, sys.stdout)
        return 0

    return _run(args, body)
