"""`crs bins import|lookup|versions|activate`: the BIN table (docs/bins.md).

`import` validates every row, writes a rejects file (row number, column, reason), collapses identical
duplicate rows, reports overlapping ranges, and only when the rejected rows are within `--max-rejects`
and no range is given twice with different values stores the file as a new version and activates it
in one transaction: a bad file never replaces a good table. Nodes pick the new version up within
CRS_BIN_POLL_INTERVAL. `lookup` takes a prefix on the command line, a full PAN only on standard input.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from server.cli.base import RAW, CommandFailed, settings_from_args, with_database
from server.cli.lookup import from_stdin

if TYPE_CHECKING:
    from server.store.db import Conn

SHOWN_OVERLAPS = 10
T = TypeVar("T")


def read_table(path: Path, rejects_out: Path | None) -> tuple[list[Any], list[int], list[tuple[int, str, str]], str]:
    """(accepted rows, their row numbers, rejected rows as (row number, column, reason), sha256) of a BIN
    table CSV; CommandFailed for a file that is not one."""
    from server.bins import COLUMNS, BinRowError, parse_row
    from server.cli.import_files import same_file

    if rejects_out is not None and same_file(rejects_out, path):   # it would be truncated after the read
        raise CommandFailed(f"--rejects {rejects_out} is the input file", 2)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CommandFailed(f"{path}: {exc.strerror}", 2) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CommandFailed(f"{path}: not UTF-8 (byte {exc.start})", 2) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise CommandFailed(f"{path}: the header lacks {', '.join(missing)} (columns: {', '.join(COLUMNS)})", 2)
        twice = sorted({h for h in header if h and header.count(h) > 1})
        if twice:   # zip() into a dict kept the last of the two, silently
            raise CommandFailed(f"{path}: column {', '.join(twice)} appears twice in the header", 2)
        rows, numbers, rejects = [], [], []
        start = reader.line_num + 1     # the line a record starts on (a quoted cell may span several)
        for cells in reader:
            number, start = start, reader.line_num + 1
            if not cells or cells == [""]:
                continue
            if len(cells) != len(header):
                rejects.append((number, "", f"has {len(cells)} columns, the header {len(header)}"))
                continue
            try:
                rows.append(parse_row(dict(zip(header, cells, strict=True))))
                numbers.append(number)
            except BinRowError as exc:
                rejects.append((number, exc.column, exc.reason))
    except csv.Error as exc:
        raise CommandFailed(f"{path}: not a readable CSV file at line {reader.line_num}: {exc}", 2) from None
    if rejects_out is not None:
        try:
            with rejects_out.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["row", "column", "reason"])
                w.writerows(rejects)
        except OSError as exc:
            raise CommandFailed(f"cannot write --rejects {rejects_out}: {exc.strerror}", 2) from None
    return rows, numbers, rejects, hashlib.sha256(data).hexdigest()


@dataclass
class Duplicates:
    """Rows covering exactly the same PANs as an earlier row (the same span on the 11-digit prefix line)."""

    kept: list[Any] = field(default_factory=list)          # every span once, its first row
    kept_numbers: list[int] = field(default_factory=list)
    collapsed: list[tuple[int, int]] = field(default_factory=list)    # (row number, the identical earlier row)
    conflicts: list[tuple[int, int, tuple[str, ...]]] = field(default_factory=list)   # (earlier, row, columns)


def duplicates(rows: list[Any], numbers: list[int]) -> Duplicates:
    """Identical rows collapse to one; rows with the same span that differ in any column (issuer, country,
    product, on_us, network, pan_length, or low/high written with another length) conflict: no rule can
    pick one (the narrowest range wins, and they are as narrow), so the import refuses the file."""
    from server.bins import COLUMNS

    found = Duplicates()
    first: dict[tuple[int, int], int] = {}
    for row, number in zip(rows, numbers, strict=True):
        k = first.setdefault((row.start, row.end), len(found.kept))
        if k == len(found.kept):
            found.kept.append(row)
            found.kept_numbers.append(number)
            continue
        differ = tuple(c for c in COLUMNS if getattr(row, c) != getattr(found.kept[k], c))
        if differ:
            found.conflicts.append((found.kept_numbers[k], number, differ))
        else:
            found.collapsed.append((number, found.kept_numbers[k]))
    return found


def cmd_bins_import(args: argparse.Namespace) -> int:
    from server.bins import CARD_NUMBER, overlaps
    from server.store.bins import TableShrinks

    read, numbers, rejects, digest = read_table(Path(args.file), Path(args.rejects) if args.rejects else None)
    rejected = len(rejects)
    print(f"read {len(read) + rejected} rows: {len(read)} accepted, {rejected} rejected"
          + (f" (listed in {args.rejects})" if args.rejects and rejected else ""))
    # Named here whatever --rejects says: card data in a BIN file is an incident to follow up (the file
    # itself is cardholder data now), not one bad row among others.
    holding = [(number, column) for number, column, reason in rejects if reason == CARD_NUMBER]
    for number, column in holding[:SHOWN_OVERLAPS]:
        print(f"  card number: row {number}, {column}: rejected (the value is not shown; the file holds"
              " cardholder data)")
    if len(holding) > SHOWN_OVERLAPS:
        print(f"  card number: {len(holding) - SHOWN_OVERLAPS} more rows (--rejects FILE lists every one)")
    same = duplicates(read, numbers)
    rows = same.kept
    if same.collapsed or same.conflicts:
        shown = ", ".join(f"row {n} = row {k}" for n, k in same.collapsed[:SHOWN_OVERLAPS])
        print(f"duplicates: {len(same.collapsed)} identical rows collapsed" + (f" ({shown})" if shown else "")
              + f", {len(same.conflicts)} conflicting")
        for earlier, number, columns in same.conflicts[:SHOWN_OVERLAPS]:
            a, b = read[numbers.index(earlier)], read[numbers.index(number)]
            print(f"  conflicting duplicate: rows {earlier} and {number} ({a.low}-{a.high} and {b.low}-{b.high})"
                  f" cover the same PANs but differ in {', '.join(columns)}")
    found = overlaps(rows)
    partial = [o for o in found if not o.nested]
    print(f"overlaps: {len(found) - len(partial)} nested (the narrower range wins), {len(partial)} partial")
    for o in partial[:SHOWN_OVERLAPS]:
        a, b = rows[o.outer], rows[o.inner]
        print(f"  partial overlap: {a.low}-{a.high} ({a.issuer_name}) and {b.low}-{b.high} ({b.issuer_name})")
    if rejected > args.max_rejects:
        raise CommandFailed(f"{rejected} rejected rows > --max-rejects {args.max_rejects}: the table was not"
                            " replaced", 2)
    if same.conflicts:
        raise CommandFailed(f"{len(same.conflicts)} conflicting duplicates (the same range twice with different"
                            " values: neither can win): fix the file; the table was not replaced", 2)
    if partial and not args.allow_partial_overlaps:
        raise CommandFailed(f"{len(partial)} partial overlaps (a range that starts inside another and ends"
                            " outside it): fix the file or pass --allow-partial-overlaps; the table was not"
                            " replaced", 2)
    if not rows:
        raise CommandFailed("no accepted rows: the table was not replaced", 2)
    try:
        version = _import(args, rows, rejected, digest)
    except TableShrinks as exc:
        raise CommandFailed(f"the file has {len(rows):,} ranges and {exc}: a table under half the active one"
                            " would leave most cards without a range (a truncated or partial file?); pass"
                            " --allow-shrink if it is meant; the table was not replaced", 2) from None
    print(f"BIN table version {version} is active ({len(rows)} ranges); nodes load it within"
          " CRS_BIN_POLL_INTERVAL")
    return 0


def _with_database(args: argparse.Namespace, work: Callable[[Conn], Awaitable[T]]) -> T:
    return with_database(settings_from_args(args), work)


def _import(args: argparse.Namespace, rows: list[Any], rejected: int, digest: str) -> int:
    from server.store import bins as store

    return _with_database(args, lambda conn: store.import_table(
        conn, rows, source_file=Path(args.file).name, sha256=digest, rejected=rejected,
        allow_shrink=args.allow_shrink))


def cmd_bins_versions(args: argparse.Namespace) -> int:
    from server.store import bins as store

    for t in _with_database(args, store.versions):
        mark = "*" if t.active else " "
        print(f"{mark} v{t.version:<4} {t.ranges:>9,} ranges  {t.rejected:>6,} rejected  "
              f"{t.imported_at:%Y-%m-%d %H:%M}  {t.source_file}  sha256 {t.sha256[:12]}")
    return 0


def cmd_bins_activate(args: argparse.Namespace) -> int:
    from server.errors import NotFound
    from server.store import bins as store

    try:
        _with_database(args, lambda conn: store.activate(conn, args.version))
    except NotFound as exc:
        raise CommandFailed(f"{exc.message} (crs bins versions lists the stored ones)", 2) from None
    print(f"BIN table version {args.version} is active")
    return 0


def lookup_digits(prefix: str | None, read_pan: Callable[[], str]) -> tuple[str, str]:
    """(digits to look up, how to show them) from the command line's prefix or, without one, a PAN read
    from `read_pan` (standard input). CommandFailed exit 2 for anything else; never echoes the value."""
    from server.bins import MIN_PREFIX, PREFIX_DIGITS
    from server.errors import InvalidKey
    from server.pan import PAN_MIN_LEN, mask_pan, parse_pan

    if prefix is None:
        try:
            pan = parse_pan(read_pan())
        except InvalidKey as exc:
            raise CommandFailed(f"the card number on standard input: {exc.message}", 2) from None
        return pan, mask_pan(pan)
    if prefix.isascii() and prefix.isdigit() and len(prefix) >= PAN_MIN_LEN:
        raise CommandFailed("a card number is read from standard input, never from the command line (shell"
                            " history and ps keep it): give a 6-11 digit prefix, or none and the PAN on stdin", 2)
    if not (prefix.isascii() and prefix.isdigit() and MIN_PREFIX <= len(prefix) <= PREFIX_DIGITS):
        raise CommandFailed(f"a prefix must be {MIN_PREFIX}-{PREFIX_DIGITS} ASCII digits (a BIN or longer)", 2)
    return prefix, prefix


def cmd_bins_lookup(args: argparse.Namespace, read_pan: Callable[[], str] = from_stdin) -> int:
    from google.protobuf.json_format import MessageToJson

    from server.bins import BinTable, build
    from server.store import bins as store

    digits, shown = lookup_digits(args.prefix, read_pan)

    async def active_table(conn: Conn) -> BinTable:   # only the ranges holding the digits, not 500k of them
        version = await store.active_version(conn)
        return build(await store.covering_rows(conn, version, digits), version)

    table = _with_database(args, active_table)
    if table.version == 0:
        print("no BIN table is active yet (crs bins import FILE.csv)", file=sys.stderr)
        return 1
    row = table.covering(digits) if args.prefix else table.lookup(digits)
    if row is None:
        split = args.prefix and table.touches(digits)
        print(f"{shown}: " + (f"the card numbers that start with it are in more than one range (or partly in none)"
                              f" of BIN table version {table.version}: look up more digits" if split else
                              f"no range in BIN table version {table.version}"), file=sys.stderr)
        return 1
    print(MessageToJson(row.message(table.version), indent=2))
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("bins", help="the BIN table: import, look up, versions", description=__doc__,
                       formatter_class=RAW)
    bs = s.add_subparsers(dest="bins_command", required=True, metavar="BINS_COMMAND")
    b = bs.add_parser("import", help="validate a BIN table CSV and make it the active version", description=(
        "Columns (header row): low, high, pan_length, network, issuer_name, issuer_country, product, on_us.\n"
        "low/high: PAN prefixes of 6-11 digits, both the same length. pan_length: 12-19. network: a\n"
        "scheme name (letters, digits, '-'). issuer_country: two letters (the shape is checked, not the\n"
        "ISO list). product: credit, debit, prepaid, commercial. on_us: true/false (also yes/no, y/n,\n"
        "1/0; empty = false). Keywords in any case, stored lower case (country upper case); spaces\n"
        "around cells are dropped. Overlapping ranges: the narrower one wins; a partial overlap\n"
        "(starting inside a range, ending outside it) refuses the file unless --allow-partial-overlaps.\n"
        "Identical rows are collapsed to one (the summary counts them); the same range twice with any\n"
        "value different refuses the file (neither could win). A network or issuer_name holding a card\n"
        "number (13-19 digits passing Luhn) is a rejected row, named by its row number, never shown. A\n"
        "file with under half the active table's ranges refuses unless --allow-shrink (a truncated file\n"
        "would leave most cards without a range). docs/bins.md lists what each column accepts.\n"
        "Exit 2 for a refused file, 3 when PostgreSQL cannot be reached."),
        formatter_class=RAW)
    b.add_argument("file", help="the CSV file")
    b.add_argument("--rejects", help="write rejected rows (row, column, reason) to this CSV")
    b.add_argument("--max-rejects", type=int, default=0,
                   help="refuse the file when more rows than this are rejected (default 0)")
    b.add_argument("--allow-partial-overlaps", action="store_true", help="accept partially overlapping ranges")
    b.add_argument("--allow-shrink", action="store_true",
                   help="accept a table with under half the active table's ranges (default: refused)")
    b.set_defaults(func=cmd_bins_import)
    b = bs.add_parser("lookup", help="the range of a 6-11 digit prefix, or of a PAN read from stdin", description=(
        "The most specific range holding a prefix (6-11 digits: a BIN, or longer) in the active table.\n"
        "Without PREFIX, one PAN is read from standard input (never from the command line, where shell\n"
        "history would keep it) and masked in the output. Exit 1 when no range holds it, 2 for a bad\n"
        "prefix or PAN, 3 when PostgreSQL cannot be reached."), formatter_class=RAW)
    b.add_argument("prefix", nargs="?", help="6-11 ASCII digits; omit it to read a PAN from standard input")
    b.set_defaults(func=cmd_bins_lookup)
    b = bs.add_parser("versions", help="stored table versions (* = active)")
    b.set_defaults(func=cmd_bins_versions)
    b = bs.add_parser("activate", help="make a stored version the active one (roll back a bad table)",
                      description="Exit 2 when no such version is stored, 3 when PostgreSQL cannot be reached.")
    b.add_argument("version", type=int)
    b.set_defaults(func=cmd_bins_activate)
