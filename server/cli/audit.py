"""`crs audit`: query the append-only trail of admin writes."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from server.cli.base import RAW, CommandFailed, settings_from_args, with_database
from server.cli.render import table

if TYPE_CHECKING:
    import asyncpg

    from server.store.db import Conn


MAX_HOURS = 24 * 365 * 100    # --hours beyond this overflows the interval; no trail is that old


def cmd_audit(args: argparse.Namespace) -> int:
    if not 0 < args.hours <= MAX_HOURS or args.limit <= 0:
        raise CommandFailed(f"--hours must be > 0 and at most {MAX_HOURS:,} (100 years), --limit > 0", 2)
    # An interval, not make_interval(hours => ...): that takes a whole number, and asyncpg turned
    # --hours 0.2 into 0 hours (no row at all).
    since = timedelta(hours=args.hours)

    async def query(conn: Conn) -> list[asyncpg.Record]:
        # Newest first by time, the order of the indexes on `at`: a scan of one stops at the window's
        # start. In id order, when fewer than --limit rows matched (one card's writes), the plan walked
        # the primary key back past the window to the first row ever written (5 million rows over 60
        # days, --entity with --hours 240: 3.5 s, against 0.36 s for the window's 830,000).
        return await conn.fetch(
            "SELECT at, client_id, via, rpc, result, entity_type, entity_ids, request_id FROM audit_log"
            " WHERE ($1::text IS NULL OR client_id = $1) AND ($2::text IS NULL OR rpc = $2)"
            " AND ($3::text IS NULL OR $3 = ANY(entity_ids))"
            " AND at >= now() - $4::interval ORDER BY at DESC, id DESC LIMIT $5",
            args.client, args.rpc, args.entity, since, args.limit)

    rows = with_database(settings_from_args(args), query)
    table([("at (UTC)", "client", "via", "rpc", "result", "entities"),
           *((r["at"].strftime("%Y-%m-%d %H:%M:%S.%f"), r["client_id"], r["via"], r["rpc"], r["result"],
              " ".join(r["entity_ids"])) for r in rows)])
    print(f"({len(rows)} rows)")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("audit", help="query the audit trail of admin writes", description=(
        "Print admin writes from the append-only audit_log, newest first: when, which client (and how\n"
        "it authenticated), which RPC, the result (OK, OK_REPLAYED for an idempotent retry, OK_UNCHANGED\n"
        "for a write that changed nothing, COMMIT_LOST when the database went during the COMMIT: then the\n"
        "write's own OK row is there if it was applied; else the gRPC status), and the entity ids. Needs\n"
        "CRS_PG_DSN (read access is enough)."), formatter_class=RAW)
    s.add_argument("--client", help="only this client id")
    s.add_argument("--rpc", help="only this RPC, e.g. SetCardStatus")
    s.add_argument("--entity", help="only writes touching this id (cus_..., acc_..., tok_...)")
    s.add_argument("--hours", type=float, default=24.0,
                   help="how far back, in hours; fractions too: 0.25 = the last 15 minutes (default 24)")
    s.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    s.set_defaults(func=cmd_audit)
