"""`crs import customers|accounts|cards FILE.csv --source SYSTEM --report OUT.csv`: bulk loads from a
source system's extract (docs/identity.md, "Bulk import").

Customers are identified as online (server/store/bulk.py) in batches, one transaction each, the next
batch searched for candidates on the second connection meanwhile, and the one after read, validated
and sealed (server/cli/import_reader.py: by a second process for large
files, so parsing and PostgreSQL's writes use both cores); accounts
and cards go through the admin write path one row at a time (server/store/admin.py: the same
validation, fingerprints, encryption, feed events and cache invalidation as CreateAccount/IssueCard),
with the source reference as the request id, so a re-run answers the first run's account or card.
Every command talks to PostgreSQL directly (CRS_PG_DSN) through a pool of two connections, so a
running import leaves the nodes' lookups alone; stale cache keys go through the outbox relay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import sys
from collections import Counter
from pathlib import Path
from typing import IO, Any

from server.cli.base import RAW, CommandFailed, require_dsn, settings_from_args
from server.cli.import_files import (
    ACCOUNT_COLUMNS,
    CARD_COLUMNS,
    CUSTOMER_COLUMNS,
    HeaderError,
    Reject,
    Rejects,
    SeenKeys,
    SourceFile,
    file_digest,
    output_problem,
    source_key,
)
from server.cli.import_reader import ReadAhead, bulk_gc, open_reader, sealed
from server.identity.attributes import AttributeProblem, parse_source_ref
from server.progress import ProgressBar
from server.settings import Settings

BATCH = 1000
LINK_PROGRESS_EVERY = 100   # accounts and cards: rows between two updates of the progress bar
POOL_SIZE = 2            # connections: an import must not starve the nodes' lookups
# One customer import at a time per database (a session advisory lock, "CRSI"): two at once cannot see each
# other's people until they commit, so one person loaded from two systems in parallel became two customers.
IMPORT_LOCK = 0x43525349
KINDS = {"customers": CUSTOMER_COLUMNS, "accounts": ACCOUNT_COLUMNS, "cards": CARD_COLUMNS}
REPORT_COLUMNS = {
    "customers": ("row", "source_ref", "customer_id", "decision", "score", "warnings"),
    "accounts": ("row", "source_ref", "account_id", "decision", "customer_id", "account"),
    "cards": ("row", "source_ref", "token", "decision", "account_id", "card"),
}


class Summary:
    def __init__(self) -> None:
        self.read = self.rejected = 0
        self.decisions: Counter[str] = Counter()
        self.joined = 0   # `new` rows that joined a customer an earlier row of the file created (scored)
        self.unread: tuple[int, int] | None = None    # SourceFile.unread
        self.last_row = 0        # the last row done for good: committed, or rejected before it

    @property
    def accepted(self) -> int:
        return sum(self.decisions.values())

    def line(self, kind: str) -> str:
        parts = ", ".join(f"{k} {v}" + (f" ({v - self.joined} customers)" if k == "new" and self.joined else "")
                          for k, v in sorted(self.decisions.items()))
        lost = ""
        if self.unread and self.unread[1] > self.unread[0]:
            first, last = self.unread
            lost = f"; lines {first}-{last} are one rejected row: a quote opened on line {first} is never closed"
        return (f"{kind}: {self.read} rows read, {self.accepted} accepted ({parts or 'none'}),"
                f" {self.rejected} rejected{lost}")


def keep_earlier_report(path: Path) -> Path | None:
    """A resumed or repeated run keeps the report an earlier run of the file wrote (its rows' decisions:
    `new`, `matched`, `possible_match`; this run can only call them `existing`) under the first free
    name REPORT.1, REPORT.2, ...; the path it moved it to, or None when there was none."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    n = 1
    while (kept := path.with_name(f"{path.name}.{n}")).exists():
        n += 1
    try:
        path.rename(kept)
    except OSError as exc:
        raise CommandFailed(f"cannot keep the earlier --report {path} as {kept.name}: {exc.strerror}") from exc
    return kept


def _report_file(path: Path) -> IO[str]:
    try:
        return open(path, "w", newline="", encoding="utf-8")
    except OSError as exc:          # checked before (output_problem): changed since
        raise CommandFailed(f"cannot write --report {path}: {exc.strerror}") from exc


async def _open(settings: Settings) -> tuple[Any, Any, Any]:
    import asyncpg

    from server.errors import BackendUnavailable
    from server.store.db import active_data_key, verify_key_checks

    try:
        # jit off: the candidate search's estimated cost passes jit_above_cost, and compiling it took
        # ~5 ms a batch for a query that runs in ~50 (docs/identity.md, "Bulk import throughput").
        pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=POOL_SIZE,
                                         timeout=settings.pg_timeout * 5,
                                         command_timeout=max(settings.pg_timeout * 50, 60),
                                         server_settings={"jit": "off"})
    except (OSError, asyncpg.PostgresError) as exc:
        raise BackendUnavailable(f"cannot connect to PostgreSQL: {type(exc).__name__}") from exc
    keyring = settings.keyring()
    await verify_key_checks(pool, keyring)   # a wrong or retired key wrote records no node could find
    return pool, keyring, await active_data_key(pool, keyring)


async def import_customers(settings: Settings, path: Path, system: str, report: Path, rejects_path: Path | None,
                           batch: int, out: Any = None, summary: Summary | None = None) -> Summary:
    from server.identity.model import MatchModel, Thresholds
    from server.store.bulk import BulkCustomers, Outcome, begin_run, finish_run, run_id
    from server.store.identity import IdentityCodec

    digest, lines = file_digest(path)
    reader = open_reader(path, batch, rejects_path, lines)    # a second process starts reading now
    summary = summary or Summary()
    try:
        pool, keyring, data_key = await _open(settings)
    except BaseException:
        reader.close()
        raise
    stack = contextlib.AsyncExitStack()
    try:
        bulk = BulkCustomers(pool=pool, codec=IdentityCodec(keyring=keyring, data_key=data_key),
                             model=MatchModel.load(settings.identity_weights or None),
                             thresholds=Thresholds(match=settings.identity_match_threshold,
                                                   review=settings.identity_review_threshold), system=system)
        err = out or sys.stderr
        lock = await _import_lock(settings, err)
        stack.push_async_callback(lock.close)   # lets the next import go
        run = run_id(system, "customers", digest)
        done, finished = await begin_run(pool, run, system, "customers")
        if finished is not None:
            err.write(f"this file was imported for {system} on {finished:%Y-%m-%d %H:%M}: checking every row,"
                      " nothing will be created twice\n")
        elif done:
            err.write(f"resuming run {run}: rows up to {done} were committed before\n")
        if done and (kept := keep_earlier_report(report)) is not None:
            # This run reports the rows committed before as `existing`: their first decisions are there.
            err.write(f"the earlier run's report is kept as {kept.name}\n")
        progress = ProgressBar(err, f"importing customers from {path.name}", max(lines - 1, 0))
        ahead = ReadAhead(sealed(reader.batches(), bulk.seal))
        try:
            with bulk_gc(), _report_file(report) as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(REPORT_COLUMNS["customers"])

                def committed(outcomes: list[Outcome], last: int) -> None:
                    for o in outcomes:
                        summary.decisions[o.decision] += 1
                        summary.joined += o.decision == "new" and o.score is not None
                        writer.writerow((o.row, o.key, o.customer_id, o.decision,
                                         "" if o.score is None else f"{o.score:.4f}", "; ".join(o.warnings)))
                    summary.last_row = last
                    progress.update(max(last - 1, 0), f"rejected {reader.rejected}")

                await bulk.import_batches(ahead.next, run, committed)
        finally:
            await ahead.close()
        summary.read, summary.rejected, summary.unread = reader.rows_read, reader.rejected, reader.unread
        progress.finish(f"rejected {reader.rejected}")
        await finish_run(pool, run, summary.read + 1)
    finally:
        reader.close()
        await pool.close()
        await stack.aclose()
    return summary


async def _import_lock(settings: Settings, err: Any) -> Any:
    """A connection of its own holding IMPORT_LOCK for the whole run; waits for another import first."""
    import asyncpg

    from server.errors import BackendUnavailable

    try:
        conn = await asyncpg.connect(settings.pg_dsn, timeout=settings.pg_timeout * 5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise BackendUnavailable(f"cannot connect to PostgreSQL: {type(exc).__name__}") from exc
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", IMPORT_LOCK):
            err.write("another customer import is running against this database: waiting for it (two at once"
                      " cannot see each other's people, and would load one person twice)\n")
            await conn.execute("SELECT pg_advisory_lock($1)", IMPORT_LOCK)
    except BaseException:
        await conn.close()
        raise
    return conn


def last_row(source: SourceFile) -> int:
    return source.rows_read + 1


async def import_links(kind: str, settings: Settings, path: Path, system: str, report: Path,
                       rejects_path: Path | None, customer_system: str, out: Any = None,
                       summary: Summary | None = None) -> Summary:
    """Accounts (owned by a customer named by its source reference) or cards (of an account named by
    routing and account number), one admin write each, in file order: a row's report or rejects line
    (its parsing's or its write's) is written before the next row is read."""
    from server.cli.import_links import LinkWriter
    from server.store.bulk import run_id

    digest, lines = file_digest(path)
    pool, keyring, data_key = await _open(settings)
    summary, rejects = summary or Summary(), Rejects(rejects_path)
    try:
        writer_ = LinkWriter(pool=pool, keyring=keyring, data_key=data_key, timeout=settings.pg_timeout * 5,
                             system=system, customer_system=customer_system)
        run = run_id(system, kind, digest)
        await writer_.begin(run, kind)
        source = SourceFile(path, KINDS[kind])
        seen = SeenKeys()
        progress = ProgressBar(out or sys.stderr, f"importing {kind} from {path.name}", max(lines - 1, 0))
        parse = writer_.parse_account if kind == "accounts" else writer_.parse_card
        decision = REPORT_COLUMNS[kind].index("decision")

        def check(row: int, cells: dict[str, str]) -> Any:
            key = source_key(row, cells["source_ref"])
            if isinstance(key, Reject):
                return key
            return seen.check(row, key) or parse(row, key, cells)

        with _report_file(report) as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(REPORT_COLUMNS[kind])
            for row, cells in source.read():
                result = cells if isinstance(cells, Reject) else check(row, cells)
                if not isinstance(result, Reject):
                    key = result.key
                    result = await writer_.write(kind, result, run)
                    if not isinstance(result, Reject):   # a row written takes its source_ref (SeenKeys)
                        seen.take(row, key)
                if isinstance(result, Reject):
                    rejects.add(result)
                else:
                    summary.decisions[result[decision]] += 1
                    writer.writerow(result)
                summary.last_row = row
                if source.rows_read % LINK_PROGRESS_EVERY == 0:
                    progress.update(source.rows_read, f"rejected {rejects.count}")
        summary.read, summary.rejected, summary.unread = source.rows_read, rejects.count, source.unread
        progress.finish(f"rejected {rejects.count}")
        await writer_.finish(run, last_row(source))
    finally:
        rejects.close()
        await pool.close()
    return summary


def cmd_import(args: argparse.Namespace) -> int:
    import asyncpg

    from server.errors import BackendError

    kind: str = args.import_kind
    try:
        parse_source_ref(args.source, "x")
        if args.customer_source:
            parse_source_ref(args.customer_source, "x")
    except AttributeProblem as problem:
        print(f"crs import: --source {problem.reason}", file=sys.stderr)
        return 2
    if args.batch < 1 or args.batch > 50_000:
        print("crs import: --batch must be 1-50000", file=sys.stderr)
        return 2
    path, report = Path(args.file), Path(args.report)
    rejects = Path(args.rejects) if args.rejects else None
    refused = f"{path} is not a file" if not path.is_file() else output_problem(path, report, rejects)
    if refused:
        print(f"crs import: {refused}; nothing was read or written", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    require_dsn(settings.pg_dsn)
    summary = Summary()
    try:
        if kind == "customers":
            asyncio.run(import_customers(settings, path, args.source, report, rejects, args.batch, summary=summary))
        else:
            asyncio.run(import_links(kind, settings, path, args.source, report, rejects,
                                     args.customer_source or args.source, summary=summary))
    except KeyboardInterrupt:
        where = f"after row {summary.last_row} (committed)" if summary.last_row else "before any row was committed"
        print(("\n" if sys.stderr.isatty() else "") + f"crs import: interrupted {where}; run the same command"
              " again to resume", file=sys.stderr)
        return 130
    except HeaderError as exc:
        if rejects:
            r = Rejects(rejects)
            for p in exc.problems:
                r.add(p)
            r.close()
        print(f"crs import: {path.name}: bad header, nothing imported: {exc}", file=sys.stderr)
        return 1
    except CommandFailed as exc:
        print(f"crs import: {exc}", file=sys.stderr)
        return exc.code
    except (BackendError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Whatever PostgreSQL said mid-file: what is committed stays, and a re-run resumes after it.
        where = f"after row {summary.last_row} (committed)" if summary.last_row else "before any row was committed"
        what = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__} from PostgreSQL"
        print(f"crs import: {what}; stopped {where}: run the same command again to resume", file=sys.stderr)
        return 3
    print(summary.line(kind))
    print(f"report: {report}" + (f"; rejects: {rejects}" if rejects else ""))
    if summary.read != summary.accepted + summary.rejected:       # never expected: say so loudly
        print("crs import: rows read != accepted + rejected; please report this", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("import", help="bulk-load customers, accounts or cards from a source system's CSV")
    ks = s.add_subparsers(dest="import_kind", required=True, metavar="KIND")
    help_text = {
        "customers": "customers with identity attributes, identified against the repository and each other",
        "accounts": "accounts, each owned by a customer named by its source reference",
        "cards": "cards, each of an account named by routing and account number",
    }
    for kind, columns in KINDS.items():
        k = ks.add_parser(kind, help=help_text[kind], formatter_class=RAW, description=(
            f"Load {kind} from FILE (CSV, UTF-8, a header row) for source system --source. Columns:\n"
            f"  {','.join(columns)}\n"
            "Header names are matched ignoring case and surrounding spaces. An empty cell is unknown.\n"
            "Rows that cannot be used go to --rejects (row, column, reason, the cell's shape: never a\n"
            "value); the load goes on. A row's number is the line its record starts on (header: line 1),\n"
            "as an editor shows it; a quote never closed is one rejected row naming the lines it took.\n"
            "The source reference is the idempotency key: re-running a file creates nothing twice, and\n"
            "an interrupted load (Ctrl-C or SIGINT: `interrupted after row N (committed)`, exit 130)\n"
            "resumes when the same command is run again (customers: the earlier run's --report is kept\n"
            "as REPORT.1, with the decisions of the rows it committed). A source reference holding a card number\n"
            "rejects its row (PCI: no PAN outside the vault).\n"
            "Needs CRS_PG_DSN, CRS_FINGERPRINT_KEYS and CRS_KEK (`crs-dev up` prints them).\n"
            "docs/identity.md, \"Bulk import\", has the details. Exit codes: 0 loaded (rejects included),\n"
            "1 a bad header (nothing loaded), 2 bad usage (among others --report or --rejects naming the\n"
            "input file, each other, or a missing directory: refused before anything is opened),\n"
            "3 PostgreSQL unavailable or failing mid-file (what was committed stays: run it again to\n"
            "resume). Customer imports run one at a time per database; a second one waits for the first."))
        k.add_argument("file", metavar="FILE.csv")
        k.add_argument("--source", required=True, metavar="SYSTEM", help="the source system, e.g. core-banking")
        k.add_argument("--report", required=True, metavar="OUT.csv", help="one line per accepted row")
        k.add_argument("--rejects", metavar="REJECTS.csv", help="one line per rejected row")
        k.add_argument("--batch", type=int, default=BATCH, help=f"rows per transaction (default {BATCH})")
        k.add_argument("--customer-source", metavar="SYSTEM",
                       help="accounts: the system of customer_source_ref (default --source)")
        k.set_defaults(func=cmd_import)
