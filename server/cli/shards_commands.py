"""The bodies of `crs shards ...`: build settings and a small pool, hand off to server/topology/, render.

The parser and the manuals are server/cli/shards.py; the text renderers server/cli/shards_render.py.
Heavy imports (asyncpg, redis) happen inside the commands, so `crs --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from server.cli import shards_render as render
from server.cli.base import CommandFailed, postgres_misconfigured, require_dsn, settings_from_args, stdout_closed
from server.settings import Settings
from shard_router.addresses import redact_url

if TYPE_CHECKING:
    import asyncpg

    from server.topology.store import TopologyStore
    from shard_router.topology import TopologyShard

# What a login needs to change the topology (migration 0004); `status` and `plan` work with the nodes' own.
OPERATOR_LOGIN = "the rights of crs_operator, which changing the topology needs (docs/runbooks/resharding.md)"
# A `crs shards` run holds the driver's advisory-lock connection plus a few concurrent queries (progress
# saves, heartbeats, the version watch); it must not take a node's share of PostgreSQL's connections.
CLI_POOL_MIN = 1
CLI_POOL_MAX = 4


def _run(args: argparse.Namespace, body: Callable[[Settings, asyncpg.Pool, TopologyStore], Awaitable[int]]) -> int:
    """Settings, a small pool, the store; errors to messages and exit codes."""
    import asyncpg
    from redis.exceptions import RedisError

    from server.errors import BackendUnavailable
    from server.store.db import create_pool
    from server.topology.errors import MigrationError, ShardUnreachable
    from server.topology.store import FileTopologyStore, TopologyConflict, TopologyFileError, open_store
    from shard_router.topology import TopologyError

    settings = settings_from_args(args)

    async def main() -> int:
        pool = await create_pool(replace(settings, pg_pool_min=CLI_POOL_MIN, pg_pool_max=CLI_POOL_MAX))
        try:
            return await body(settings, pool, open_store(pool, settings.topology_file))
        finally:
            await asyncio.shield(pool.close())

    try:
        require_dsn(settings.pg_dsn)
        if settings.topology_file:
            FileTopologyStore(Path(settings.topology_file)).check()
        return asyncio.run(main())
    except CommandFailed as exc:
        print(f"crs shards: {exc}", file=sys.stderr)
        return exc.code
    except TopologyFileError as exc:
        print(f"crs shards: {exc}", file=sys.stderr)
        return 2
    except (MigrationError, TopologyError, TopologyConflict) as exc:
        print(f"crs shards: {exc}", file=sys.stderr)
        return 1
    except ShardUnreachable as exc:
        print(f"crs shards: {exc}", file=sys.stderr)
        return 3
    except (BackendUnavailable, RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if stdout_closed(exc):
            raise           # run_command ends quietly
        if (misconfigured := postgres_misconfigured(exc, settings.pg_dsn, needs=OPERATOR_LOGIN)) is not None:
            print(f"crs shards: {misconfigured}", file=sys.stderr)
            return misconfigured.code
        print(f"crs shards: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3


def _json(doc: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(doc, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------------
# status, plan, history: read-only
# --------------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.report import gather_status

        report = await gather_status(settings, pool, store)
        if args.json:
            _json(report.as_dict(), sys.stdout)
        else:
            render.status_text(report, sys.stdout)
        return 0

    return _run(args, body)


def cmd_plan(args: argparse.Namespace) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.report import NothingToPlan, gather_plan

        if args.sample < 0:
            raise CommandFailed("--sample must be >= 0", code=2)
        report = await gather_plan(settings, pool, store, sample=args.sample)
        if args.json:
            _json(report.as_dict(), sys.stdout)
        elif isinstance(report, NothingToPlan):
            render.nothing_to_plan_text(report.version, sys.stdout)
        else:
            render.plan_text(report, sys.stdout)
        return 0

    return _run(args, body)


def cmd_history(args: argparse.Namespace) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.store import PgTopologyStore

        if not isinstance(store, PgTopologyStore):
            raise CommandFailed(f"history is kept in PostgreSQL only; the topology comes from {store.where}")
        render.history_text(await store.history(args.limit), sys.stdout)
        return 0

    return _run(args, body)


# --------------------------------------------------------------------------------------------------
# add / remove / reweight / mark: stage or publish, nothing moves
# --------------------------------------------------------------------------------------------------


def _stage(args: argparse.Namespace, change: Callable[[Sequence[TopologyShard]], Sequence[TopologyShard]],
           precheck: Callable[[], Awaitable[None]] | None = None) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.staging import stage_change
        from shard_router import Ring
        from shard_router.planner import moved_fraction
        from shard_router.topology import diff

        if precheck is not None:
            await precheck()
        current, draft = await stage_change(store, pool, settings, change, out=sys.stdout)
        fraction = moved_fraction(current.target_ring, Ring(s.spec for s in draft.shards))
        render.staged_text(current.version, diff(current.shards, draft.shards), fraction, sys.stdout)
        return 0

    return _run(args, body)


def cmd_add(args: argparse.Namespace) -> int:
    from shard_router.moves import stage_add

    async def check() -> None:
        if args.no_check:
            return
        from server.topology.shard_stats import STATS_ERRORS
        from server.topology.staging import probe_shard

        try:
            held = await probe_shard(args.address)
        except STATS_ERRORS as exc:
            raise CommandFailed(f"shard {args.name} at {redact_url(args.address)} does not answer"
                                f" ({type(exc).__name__}: {exc}); start it first, or pass --no-check", 3) from exc
        if held:
            print(f"note: {redact_url(args.address)} holds {held:,} key(s); it is flushed when the move starts")

    return _stage(args, lambda draft: stage_add(draft, args.name, args.address, args.weight), check)


def cmd_remove(args: argparse.Namespace) -> int:
    from shard_router.moves import stage_remove

    return _stage(args, lambda draft: stage_remove(draft, args.name))


def cmd_reweight(args: argparse.Namespace) -> int:
    from shard_router.moves import stage_reweight

    return _stage(args, lambda draft: stage_reweight(draft, args.name, args.weight))


def cmd_mark(args: argparse.Namespace) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.staging import ensure_published
        from server.topology.store import publish
        from shard_router.moves import set_state
        from shard_router.topology import ShardState

        current = await ensure_published(store, pool, settings, out=sys.stdout,
                                         check=lambda seed: set_state(seed, args.name, ShardState(args.state)))
        new = set_state(current, args.name, ShardState(args.state))
        await publish(store, pool, new, reason=f"mark {args.name} {args.state}")
        print(f"published topology version {new.version}: {args.name} is {args.state}"
              + (" (nodes flush it before using it again)" if args.state == "active" else
                 " (its keys are served from PostgreSQL)"))
        return 0

    return _run(args, body)


def cmd_replica(args: argparse.Namespace) -> int:
    """add-replica / remove-replica: two published versions, the copy write-only in between (no key moves)."""
    adding = args.shards_command == "add-replica"

    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.migrator import Migrator
        from server.topology.policy import MigrationPolicy
        from server.topology.staging import ensure_published

        current = await ensure_published(store, pool, settings, out=sys.stdout,
                                         check=lambda seed: seed.shard(args.name))
        shard = current.shard(args.name)
        halfway = args.address in shard.write_only
        if adding and args.address in shard.copies and not halfway:
            raise CommandFailed(f"{redact_url(args.address)} is already a replica of {args.name}", 2)
        if not adding and args.address not in shard.replicas:
            raise CommandFailed(f"{redact_url(args.address)} is not a replica of {args.name}", 2)
        if adding and not halfway and not args.no_check:
            from server.topology.shard_stats import STATS_ERRORS
            from server.topology.staging import probe_shard

            try:
                held = await probe_shard(args.address)
            except STATS_ERRORS as exc:
                raise CommandFailed(f"{redact_url(args.address)} does not answer ({type(exc).__name__});"
                                    " start it first, or pass --no-check", 3) from exc
            if held:
                print(f"note: {redact_url(args.address)} holds {held:,} key(s); it is flushed before it serves")
        policy = MigrationPolicy.from_settings(settings, wait_timeout=args.wait_timeout)
        migrator = Migrator(pool=pool, store=store, policy=policy, out=sys.stdout)
        new = await migrator.change_replica(args.name, args.address, adding=adding)
        replicas = len(new.shard(args.name).replicas)
        verb = "added to" if adding else "removed from"
        print(f"topology version {new.version}: {redact_url(args.address)} {verb} {args.name}"
              f" ({replicas} replica(s) now; no key moves)")
        return 0

    try:
        return _run(args, body)
    except KeyboardInterrupt:   # maybe between its two versions: the copy written but not read, or still read
        again = f"crs shards {args.shards_command} {args.name} {redact_url(args.address)}"
        print(f"\ninterrupted: the change may be half done; `{again}` finishes it" + (
              f", `crs shards remove-replica {args.name} {redact_url(args.address)}` takes the copy back"
              if adding else ""), file=sys.stderr)
        raise


# --------------------------------------------------------------------------------------------------
# apply / abort: drive a move
# --------------------------------------------------------------------------------------------------


def _drive(args: argparse.Namespace, aborting: bool) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.topology.migrator import Migrator
        from server.topology.policy import MigrationPolicy
        from server.topology.staging import ensure_published

        for flag in ("rate", "batch"):
            if getattr(args, flag) is not None and getattr(args, flag) <= 0:
                raise CommandFailed(f"--{flag} must be > 0", code=2)
        await ensure_published(store, pool, settings, out=sys.stdout)
        policy = MigrationPolicy.from_settings(settings, rate=args.rate, batch=args.batch,
                                               wait_timeout=args.wait_timeout)
        migrator = Migrator(pool=pool, store=store, policy=policy, out=sys.stdout)
        try:
            await (migrator.abort() if aborting else migrator.apply())
        finally:
            render.steps_text(migrator.stats, sys.stdout)
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


# --------------------------------------------------------------------------------------------------
# flush: after a PostgreSQL restore
# --------------------------------------------------------------------------------------------------


def cmd_flush(args: argparse.Namespace) -> int:
    async def body(settings: Settings, pool: asyncpg.Pool, store: TopologyStore) -> int:
        from server.cache.shard import copy_label
        from server.topology.errors import ShardUnreachable
        from server.topology.key_steps import flush_copy
        from server.topology.policy import MigrationPolicy
        from server.topology.staging import current_or_bootstrap

        t = await current_or_bootstrap(store, settings)
        timeout = MigrationPolicy.from_settings(settings).redis_timeout
        failed = 0
        for shard in t.shards:       # every shard of the version in force, joining and leaving ones too
            for i, url in enumerate(shard.copies):
                label = f"{shard.name} {copy_label(i)}"
                try:
                    held = await flush_copy(url, label, timeout)
                except ShardUnreachable as exc:
                    failed += 1
                    print(f"crs shards: {exc}", file=sys.stderr)
                    continue
                print(f"flushed {label} {redact_url(url)} ({held:,} key(s) were on it)")
        copies = sum(len(s.copies) for s in t.shards)
        if failed:
            print(f"crs shards: {failed} of {copies} copies not flushed: run it again once they answer",
                  file=sys.stderr)
            return 3
        print(f"topology version {t.version}: every copy of its {len(t.shards)} shard(s) is empty; the nodes'"
              " near-caches expire within CRS_NEAR_CACHE_TTL")
        return 0

    return _run(args, body)
