"""`crs audit`: query the append-only trail of admin writes."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from server.cli.base import RAW, settings_from_args, with_database
from server.cli.render import table

if TYPE_CHECKING:
    import asyncpg

    from server.store.db import Conn


def cmd_audit(args: argparse.Namespace) -> int:
    async def query(conn: Conn) -> list[asyncpg.Record]:
        return await conn.fetch(
            "SELECT at, client_id, via, rpc, result, entity_type, entity_ids, request_id FROM audit_log"
            " WHERE ($1::text IS NULL OR client_id = $1) AND ($2::text IS NULL OR rpc = $2)"
            " AND ($3::text IS NULL OR $3 = ANY(entity_ids))"
            " AND at >= now() - make_interval(hours => $4) ORDER BY id DESC LIMIT $5",
            args.client, args.rpc, args.entity, args.hours, args.limit)

    rows = with_database(settings_from_args(args), query)
    table([("at (UTC)", "client", "via", "rpc", "result", "entities"),
           *((r["at"].strftime("%Y-%m-%d %H:%M:%S.%f"), r["client_id"], r["via"], r["rpc"], r["result"],
              " ".join(r["entity_ids"])) for r in rows)])
    print(f"({len(rows)} rows)")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("audit", help="query the audit trail of admin writes", description=(
        "Print admin writes from the append-only audit_log, newest first: when, which client (and how\n"
        "it authenticated), which RPC, the result (OK, OK_REPLAYED for an idempotent retry, or the gRPC\n"
        "status), and the entity ids. Needs CRS_PG_DSN (read access is enough)."), formatter_class=RAW)
    s.add_argument("--client", help="only this client id")
    s.add_argument("--rpc", help="only this RPC, e.g. SetCardStatus")
    s.add_argument("--entity", help="only writes touching this id (cus_..., acc_..., tok_...)")
    s.add_argument("--hours", type=float, default=24.0, help="how far back (default 24)")
    s.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    s.set_defaults(func=cmd_audit)
