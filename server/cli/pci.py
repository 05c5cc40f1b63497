"""`crs pci scan`: look for card numbers kept in clear in PostgreSQL (docs/security.md).

Every column that can hold text (text, varchar, char, json, jsonb, arrays read as their text; and bytea
read as Latin-1, since a serialized answer in the outbox or the idempotency table carries its strings
as they are) of every table in the schema, row by row, through `server.pan.contains_card_number`:
the test that refuses a card number in a name, a segment or a source reference at the door. What it
finds here was written before those checks or around the service. A finding prints the table, the column and the row's
key, with its digit runs masked, never the value. Encrypted columns are random bytes: ten or more
ASCII digits in a row essentially never occur in them, so they pass quietly.

Fix a finding through the write path (UpdateCustomer, a new source reference, ...), not in SQL, so
the caches and the change feed follow; then scan again.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.cli.base import RAW, number, settings_from_args, with_database

if TYPE_CHECKING:
    from server.store.db import Conn

TEXT_TYPES = ("text", "character varying", "character", "json", "jsonb", "bytea", "ARRAY")
FOUND = 1           # exit status when a card number was found (0: none)
BATCH = 2000        # rows a cursor fetches at a time

_COLUMNS = (
    "SELECT c.table_name AS t, c.column_name AS c, c.data_type AS d FROM information_schema.columns c"
    " JOIN information_schema.tables USING (table_schema, table_name)"
    " WHERE c.table_schema = current_schema() AND table_type = 'BASE TABLE' AND c.data_type = ANY($1::text[])"
    " ORDER BY c.table_name, c.ordinal_position")
_KEY = (
    "SELECT a.attname AS name FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
    " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = $1::regclass AND i.indisprimary"
    " ORDER BY array_position(i.indkey, a.attnum)")


@dataclass(frozen=True)
class Finding:
    table: str
    column: str
    key: str        # the row's primary key (or ctid), digit runs masked

    def line(self) -> str:
        return f"{self.table}.{self.column}  {self.key}"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def scan(conn: Conn, *, progress: Any = None) -> tuple[list[Finding], int]:
    """(every finding, rows read) over the current schema, in one read-only snapshot."""
    from server.pan import contains_card_number, redact_digits

    columns: dict[str, list[str]] = {}
    arrays: set[tuple[str, str]] = set()
    for r in await conn.fetch(_COLUMNS, list(TEXT_TYPES)):
        columns.setdefault(r["t"], []).append(r["c"])
        if r["d"] == "ARRAY":       # audit_log.entity_ids: read as its text, '{cus_...,acc_...}'
            arrays.add((r["t"], r["c"]))
    findings: list[Finding] = []
    rows = 0
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for table, cols in columns.items():
            key = [r["name"] for r in await conn.fetch(_KEY, _ident(table))] or ["ctid"]
            select = ", ".join([*(f"{_ident(k)}::text" for k in key),
                                *(_ident(c) + ("::text" if (table, c) in arrays else "") for c in cols)])
            async for row in conn.cursor(f"SELECT {select} FROM {_ident(table)}", prefetch=BATCH):
                rows += 1
                for i, column in enumerate(cols, start=len(key)):
                    value = row[i]
                    if value is None:
                        continue
                    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                    if contains_card_number(text):
                        shown = ", ".join(f"{k}={redact_digits(str(row[j]))}" for j, k in enumerate(key))
                        findings.append(Finding(table, column, shown))
                if progress is not None and rows % BATCH == 0:
                    progress.update(rows, table)
    return findings, rows


def cmd_pci_scan(args: argparse.Namespace) -> int:
    from server.progress import ProgressBar

    bar = ProgressBar(sys.stderr, "scanning for card numbers", None)
    findings, rows = with_database(settings_from_args(args), lambda conn: scan(conn, progress=bar))
    bar.update(rows, final=True)
    for f in findings[:args.limit]:
        print(f.line())
    if len(findings) > args.limit:
        print(f"... and {len(findings) - args.limit} more (--limit)")
    tables = len({f.table for f in findings})
    print(f"{len(findings)} value(s) that look like a card number in {tables} table(s); {rows:,} rows read",
          file=sys.stderr)
    return FOUND if findings else 0


def register(sub: Any) -> None:
    s = sub.add_parser("pci", help="PCI checks on the stored data (scan for card numbers kept in clear)",
                       description=__doc__, formatter_class=RAW)
    ps = s.add_subparsers(dest="pci_command", required=True, metavar="PCI_COMMAND")
    p = ps.add_parser("scan", help="look for card numbers in clear in every table", description=(
        "Read every text, JSON, array and bytea column of every table (one read-only snapshot) and print\n"
        "TABLE.COLUMN and the row's key (digit runs masked) for each value holding what looks like a card\n"
        "number: 13-19 digits, grouped or not, passing the Luhn check. Never prints a value.\n"
        "Exit codes: 0 none found, 1 found, 2 bad usage or configuration, 3 PostgreSQL unavailable.\n"
        "Needs CRS_PG_DSN with read access to every table (the crs_sre login)."), formatter_class=RAW)
    p.add_argument("--limit", type=number(0, whole=True), default=100,
                   help="print at most this many findings (default 100; 0: only count them)")
    p.set_defaults(func=cmd_pci_scan)
