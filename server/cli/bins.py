"""`crs bins import|lookup|versions|activate`: the BIN table (docs/bins.md).

`import` validates every row, writes a rejects file (row number, column, reason), reports
overlapping ranges, and only when the rejected rows are within `--max-rejects` stores the file as a
new version and activates it in one transaction: a bad file never replaces a good table. Nodes pick
the new version up within CRS_BIN_POLL_INTERVAL.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import sys
from pathlib import Path
from typing import Any

from server.cli.base import RAW, CommandFailed, settings_from_args

SHOWN_OVERLAPS = 10


def read_table(path: Path, rejects_out: Path | None) -> tuple[list[Any], int, str]:
    """(accepted rows, rejected count, sha256) of a BIN table CSV; CommandFailed for a file that is not one."""
    from server.bins import COLUMNS, BinRowError, parse_row

    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CommandFailed(f"{path}: not UTF-8 (byte {exc.start})", 2) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise CommandFailed(f"{path}: the header lacks {', '.join(missing)} (columns: {', '.join(COLUMNS)})", 2)
    rows, rejects = [], []
    for number, cells in enumerate(reader, start=2):
        if not cells or cells == [""]:
            continue
        if len(cells) != len(header):
            rejects.append((number, "", f"has {len(cells)} columns, the header {len(header)}"))
            continue
        try:
            rows.append(parse_row(dict(zip(header, cells, strict=True))))
        except BinRowError as exc:
            rejects.append((number, exc.column, exc.reason))
    if rejects_out is not None:
        with rejects_out.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "column", "reason"])
            w.writerows(rejects)
    return rows, len(rejects), hashlib.sha256(data).hexdigest()


def cmd_bins_import(args: argparse.Namespace) -> int:
    from server.bins import overlaps

    rows, rejected, digest = read_table(Path(args.file), Path(args.rejects) if args.rejects else None)
    print(f"read {len(rows) + rejected} rows: {len(rows)} accepted, {rejected} rejected"
          + (f" (listed in {args.rejects})" if args.rejects and rejected else ""))
    found = overlaps(rows)
    partial = [o for o in found if not o.nested]
    print(f"overlaps: {len(found) - len(partial)} nested (the narrower range wins), {len(partial)} partial")
    for o in partial[:SHOWN_OVERLAPS]:
        a, b = rows[o.outer], rows[o.inner]
        print(f"  partial overlap: {a.low}-{a.high} ({a.issuer_name}) and {b.low}-{b.high} ({b.issuer_name})")
    if rejected > args.max_rejects:
        raise CommandFailed(f"{rejected} rejected rows > --max-rejects {args.max_rejects}: the table was not"
                            " replaced", 2)
    if partial and not args.allow_partial_overlaps:
        raise CommandFailed(f"{len(partial)} partial overlaps (a range that starts inside another and ends"
                            " outside it): fix the file or pass --allow-partial-overlaps; the table was not"
                            " replaced", 2)
    if not rows:
        raise CommandFailed("no accepted rows: the table was not replaced", 2)
    version = asyncio.run(_import(args, rows, rejected, digest))
    print(f"BIN table version {version} is active ({len(rows)} ranges); nodes load it within"
          " CRS_BIN_POLL_INTERVAL")
    return 0


async def _import(args: argparse.Namespace, rows: list[Any], rejected: int, digest: str) -> int:
    import asyncpg

    from server.store import bins as store

    conn = await asyncpg.connect(settings_from_args(args).pg_dsn)
    try:
        return await store.import_table(conn, rows, source_file=Path(args.file).name, sha256=digest,
                                        rejected=rejected)
    finally:
        await conn.close()


def cmd_bins_versions(args: argparse.Namespace) -> int:
    import asyncpg

    from server.store import bins as store

    async def run() -> None:
        conn = await asyncpg.connect(settings_from_args(args).pg_dsn)
        try:
            if args.bins_command == "activate":
                await store.activate(conn, args.version)
                print(f"BIN table version {args.version} is active")
                return
            for t in await store.versions(conn):
                mark = "*" if t.active else " "
                print(f"{mark} v{t.version:<4} {t.ranges:>9,} ranges  {t.rejected:>6,} rejected  "
                      f"{t.imported_at:%Y-%m-%d %H:%M}  {t.source_file}  sha256 {t.sha256[:12]}")
        finally:
            await conn.close()

    asyncio.run(run())
    return 0


def cmd_bins_lookup(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToJson

    from server.bins import build
    from server.pan import mask_pan, parse_pan

    async def run() -> int:
        import asyncpg

        from server.store import bins as store

        conn = await asyncpg.connect(settings_from_args(args).pg_dsn)
        try:
            version = await store.active_version(conn)
            table = build(await store.load_rows(conn, version), version)
        finally:
            await conn.close()
        digits = args.number
        shown = digits
        if len(digits) > 11:
            parse_pan(digits)
            shown = mask_pan(digits)
        row = table.lookup(digits)
        if row is None:
            print(f"{shown}: no range in BIN table version {version}", file=sys.stderr)
            return 1
        print(MessageToJson(row.message(version), indent=2))
        return 0

    return asyncio.run(run())


def register(sub: Any) -> None:
    s = sub.add_parser("bins", help="the BIN table: import, look up, versions", description=__doc__,
                       formatter_class=RAW)
    bs = s.add_subparsers(dest="bins_command", required=True, metavar="BINS_COMMAND")
    b = bs.add_parser("import", help="validate a BIN table CSV and make it the active version", description=(
        "Columns (header row): low, high, pan_length, network, issuer_name, issuer_country, product, on_us.\n"
        "low/high: PAN prefixes of 6-11 digits, both the same length. product: credit, debit, prepaid,\n"
        "commercial. on_us: true/false. Overlapping ranges: the narrower one wins; a partial overlap\n"
        "(starting inside a range, ending outside it) refuses the file unless --allow-partial-overlaps."),
        formatter_class=RAW)
    b.add_argument("file", help="the CSV file")
    b.add_argument("--rejects", help="write rejected rows (row, column, reason) to this CSV")
    b.add_argument("--max-rejects", type=int, default=0,
                   help="refuse the file when more rows than this are rejected (default 0)")
    b.add_argument("--allow-partial-overlaps", action="store_true", help="accept partially overlapping ranges")
    b.set_defaults(func=cmd_bins_import)
    b = bs.add_parser("lookup", help="the range of a PAN or a 6-11 digit prefix in the active table")
    b.add_argument("number", help="a PAN (masked in the output) or a prefix")
    b.set_defaults(func=cmd_bins_lookup)
    b = bs.add_parser("versions", help="stored table versions (* = active)")
    b.set_defaults(func=cmd_bins_versions)
    b = bs.add_parser("activate", help="make a stored version the active one (roll back a bad table)")
    b.add_argument("version", type=int)
    b.set_defaults(func=cmd_bins_versions)
