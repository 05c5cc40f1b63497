"""`crs serve` (the node processes) and `crs migrate` (the schema)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from server.cli.base import RAW, CommandFailed, postgres_errors, require_dsn, seconds, settings_from_args


def cmd_serve(args: argparse.Namespace) -> int:
    from server.preflight import check_before_serving, check_database
    from server.serve import serve
    from server.settings import check_serving, unknown_variables

    settings = settings_from_args(args, workers=args.workers, grpc_port=args.port, grpc_host=args.host,
                                  serving_model=args.serving_model)
    unknown = unknown_variables(os.environ)
    if unknown:   # a mistyped setting would otherwise take its default without a word
        print(f"crs serve: warning: no such setting, ignored: {', '.join(unknown)}", file=sys.stderr)
    check_serving(settings)
    # Once, here, before any node process starts (with several, each would fail the same way and be
    # restarted): configuration is exit 2 in one line, PostgreSQL out of reach exit 3.
    check_before_serving(settings)
    if settings.pg_read_dsn:
        require_dsn(settings.pg_read_dsn, "CRS_PG_READ_DSN")   # CRS_PG_DSN: postgres_errors checks it
    with postgres_errors(settings.pg_dsn):
        asyncio.run(check_database(settings))
    return serve(settings)


def cmd_migrate(args: argparse.Namespace) -> int:
    from server.store.migrate import MigrationFailed, SchemaMismatch, migrate

    settings = settings_from_args(args)
    with postgres_errors(settings.pg_dsn):
        try:
            applied = asyncio.run(migrate(settings.pg_dsn, lock_timeout=args.lock_timeout, lock_wait=args.lock_wait))
        except (SchemaMismatch, MigrationFailed) as exc:     # not an outage: retrying cannot help
            raise CommandFailed(str(exc), 1) from exc
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(f"{m.version:04d}_{m.name}" for m in applied)
                                                    if applied else " (schema up to date)"))
    return 0


SERVE_EXIT_CODES = """Before any node process starts, the configuration is checked: the TLS files (each parses, the
key is the certificate's), the ports (free: a port another process serves is refused, see
CRS_SHARE_PORT), CRS_TOPOLOGY_FILE (exists; an empty file means nothing published yet), the clients and
JWKS files, then in PostgreSQL the schema and that the keys are the ones the database was written with.
Exit codes: 0 stopped after SIGTERM/SIGINT/SIGHUP (drained), 1 node processes kept failing with
none serving, or a worker had to be killed at shutdown (with one worker: its background task failed,
logged critical; it drained first), 2 configuration
(the message names the setting: a file that does not parse, a key that is not the database's, a port in
use, CRS_PG_DSN unusable), 3 PostgreSQL unavailable, or its schema not migrated (`crs migrate`)."""


def register(sub: Any) -> None:
    from server.store.migrate import LOCK_TIMEOUT, LOCK_WAIT

    s = sub.add_parser("serve", help="run node processes (gRPC + metrics)", description=(
        "Run N node processes sharing one gRPC port (SO_REUSEPORT), each with an asyncio loop (uvloop),\n"
        "its own PostgreSQL pool, Redis connections and near-cache; the parent serves merged Prometheus\n"
        "metrics on CRS_METRICS_PORT. SIGTERM (SIGINT, SIGHUP) drains: health NOT_SERVING, stop\n"
        "accepting, finish in-flight calls within CRS_GRACE_SECONDS, exit 0. The parent restarts a\n"
        "worker that exits (backing off 1 s doubling to 30 s; it gives up only while no worker serves)\n"
        "and kills and restarts one whose event loop stops for CRS_LOOP_STALL_SECONDS; workers drain\n"
        "if the parent dies. Needs CRS_PG_DSN, CRS_REDIS_SHARDS, CRS_FINGERPRINT_KEYS and CRS_KEK.\n\n"
        "Serving model (CRS_SERVING_MODEL): 'hybrid' (the default) serves on the synchronous\n"
        "grpc.server, answers near-cache hits, and Redis hits (up to CRS_REDIS_THREAD_CONNECTIONS\n"
        "per shard), inline on its CRS_SERVING_THREADS threads (CRS_SERVING_ACTIVE of them taking\n"
        "calls at once; a call waiting on the loop lets another in) and runs everything else (Redis\n"
        "misses, PostgreSQL, fills, admin, feed) on the process's asyncio loop; streams\n"
        "(StreamResolve, Watch, Snapshot) hold one of CRS_STREAM_THREADS apart while open; 'aio' serves\n"
        "every call on grpc.aio (the previous model, kept for one release as a fallback). Callers see\n"
        "the same answers, codes, deadlines, auth and limits either way."),
        epilog=SERVE_EXIT_CODES, formatter_class=RAW)
    s.add_argument("--serving-model", choices=("aio", "hybrid"),
                   help="how calls are served (default CRS_SERVING_MODEL = hybrid)")
    s.add_argument("--workers", type=int, help="node processes (default CRS_WORKERS, 0 = CPU count)")
    s.add_argument("--port", type=int, help="gRPC port (default CRS_GRPC_PORT = 50051)")
    s.add_argument("--host", help="bind address (default CRS_GRPC_HOST = 127.0.0.1)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("migrate", help="apply pending schema migrations (idempotent)", description=(
        "Apply every pending migration in order, each in one transaction (a concurrent one, below,\n"
        "statement by statement), recorded in schema_versions. Run it as the schema's owner.\n"
        "Safe to run from several places at once (advisory lock). Needs CRS_PG_DSN.\n"
        "A migration waits at most --lock-timeout for each lock (queries of that table queue behind\n"
        "it meanwhile), then rolls back and tries again, until --lock-wait: then exit 3, naming the\n"
        "oldest open transactions (what it likely waited for); nothing of that migration is applied.\n"
        "A number the database applied under another name than this release's (two branches that each\n"
        "shipped a 0019) is exit 1, nothing applied: a node would refuse that schema too.\n"
        "A migration that builds indexes CONCURRENTLY blocks no query or write: each build waits for the\n"
        "transactions open before it for about --lock-wait (then exit 3, naming them); one that fails on\n"
        "the data (a UNIQUE index over duplicates) is exit 1. Either way its index is left INVALID and\n"
        "the next run drops and builds it again."),
        formatter_class=RAW)
    s.add_argument("--lock-timeout", type=seconds, default=LOCK_TIMEOUT, metavar="SECONDS",
                   help=f"the longest one try waits for a lock (default {LOCK_TIMEOUT:g})")
    s.add_argument("--lock-wait", type=seconds, default=LOCK_WAIT, metavar="SECONDS",
                   help=f"how long to keep trying before giving up (default {LOCK_WAIT:g})")
    s.set_defaults(func=cmd_migrate)
