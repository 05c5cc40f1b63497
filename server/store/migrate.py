"""Ordered, idempotent schema migrations recorded in `schema_versions`.

Files are `migrations/NNNN_name.sql`, applied in number order, each in its own transaction, under
an advisory lock so several nodes starting at once apply each migration exactly once.

A file that starts with `-- crs: concurrent` builds (or drops) indexes without blocking the table's
writes: its statements, each `CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS ...` or `DROP INDEX
CONCURRENTLY IF EXISTS ...`, run one at a time outside any transaction (PostgreSQL refuses them
inside one). A build that failed or was cut short leaves its index INVALID: unused by queries but
updated by every write, and `IF NOT EXISTS` would skip it. So before each build an invalid index of
that name is dropped; a run cut short anywhere is run again whole, and the migration is recorded
only once all of it is done (docs/decisions.md, "Indexes built concurrently").

A migration waits at most `lock_timeout` for each lock it takes (PostgreSQL's lock_timeout), then
rolls back and tries again a little later, until `lock_wait` has passed. Without that, a migration
queued for ACCESS EXCLUSIVE on a hot table (an ALTER TABLE cards) behind one long transaction (an
extract, a key rotation batch, an operator's psql) made every later query of that table wait behind
it: every lookup miss and write on it stalled, for as long as that transaction lasted
(docs/decisions.md, "Migrations wait for their locks a little at a time").
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib import resources

import asyncpg

from server.errors import BackendUnavailable
from server.store.db import CONNECT_TIMEOUT, Conn

_LOCK_ID = 0x435253  # "CRS"
_NAME_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
CONCURRENT_MARK = "-- crs: concurrent"
# What a concurrent migration may hold: statements a rerun repeats harmlessly. (group 1: a built index)
_CONCURRENT_RE = re.compile(r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+([a-z_][a-z0-9_]*)"
                            r"\s+ON\s+\S.*|DROP\s+INDEX\s+CONCURRENTLY\s+IF\s+EXISTS\s+[a-z_][a-z0-9_]*",
                            re.IGNORECASE | re.DOTALL)

# How long one try of a migration waits for a lock: every query of the table it waits on queues behind
# it meanwhile, so it stays well under a lookup's CRS_PG_TIMEOUT (2 s).
LOCK_TIMEOUT = 0.2
# How long a migration goes on trying before `crs migrate` gives up (exit 3): the Job's 10 minutes.
LOCK_WAIT = 600.0
# The pause between tries: doubling from RETRY_FIRST to RETRY_MAX seconds, with jitter, so queries
# run between two tries and two migrate runs on two databases do not beat in step.
RETRY_FIRST = 0.05
RETRY_MAX = 2.0
# Open transactions named when a migration gives up (the likely holders of what it waited for).
BLOCKERS_NAMED = 3


class MigrationBlocked(BackendUnavailable):
    """A migration could not take its locks within `lock_wait`: nothing of it was applied."""


class MigrationFailed(RuntimeError):
    """A concurrent index build failed on the table's data (a UNIQUE index over duplicates): retrying
    cannot help until the data is mended."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def concurrent(self) -> bool:
        return self.sql.startswith(CONCURRENT_MARK)

    def statements(self) -> list[tuple[str, str | None]]:
        """A concurrent migration's statements, each with the index it builds (None for a drop).
        ValueError for anything else: a statement a rerun could not repeat, or ';' inside one."""
        text = re.sub(r"--[^\n]*", "", self.sql)   # comments, whole lines or after a statement
        out: list[tuple[str, str | None]] = []
        for statement in filter(None, (part.strip() for part in text.split(";"))):
            if not (m := _CONCURRENT_RE.fullmatch(statement)):
                raise ValueError(f"migration {self.version:04d}_{self.name} is marked concurrent, so each statement"
                                 " must be CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS or DROP INDEX"
                                 f" CONCURRENTLY IF EXISTS: not {statement[:60]!r}")
            out.append((statement, m.group(1)))
        if not out:
            raise ValueError(f"migration {self.version:04d}_{self.name} is marked concurrent and holds no statement")
        return out


def available_migrations() -> list[Migration]:
    found: list[Migration] = []
    for entry in resources.files("server.store").joinpath("migrations").iterdir():
        m = _NAME_RE.fullmatch(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers in {versions}")
    for mig in found:
        if mig.concurrent:
            mig.statements()     # refused here, before any is applied
    return found


class SchemaMismatch(RuntimeError):
    """The database holds a migration under a number this release gives another one (two branches
    that each shipped their own 0019): neither `crs migrate` nor a node start goes on over it."""


async def applied_migrations(conn: Conn) -> dict[int, str]:
    """The migrations recorded in schema_versions: number -> name (empty before the first)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_versions') IS NOT NULL")
    if not exists:
        return {}
    return {r["version"]: r["name"] for r in await conn.fetch("SELECT version, name FROM schema_versions")}


def _not_ours(applied: dict[int, str], available: list[Migration]) -> str:
    """What the database applied under this release's numbers but another name ("" when nothing)."""
    return "; ".join(f"{m.version:04d} was applied as {applied[m.version]!r}, this release's {m.version:04d} is"
                     f" {m.name!r}" for m in available if applied.get(m.version, m.name) != m.name)


async def migrate(dsn: str, *, lock_timeout: float = LOCK_TIMEOUT, lock_wait: float = LOCK_WAIT,
                  sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                  migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply every pending migration (this release's, or `migrations`); return the ones applied now
    (empty when up to date). MigrationBlocked when one could not take its locks within `lock_wait`."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    applied_now: list[Migration] = []
    try:
        # Asked for again and again, not waited for: a session waiting in pg_advisory_lock is a running
        # statement, and the other run's CREATE INDEX CONCURRENTLY would wait for it to end, which
        # waits for that run: a deadlock.
        pauses = _pauses()
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_ID):
            await sleep(_jittered(next(pauses)))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_versions ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await applied_migrations(conn)
            available = available_migrations() if migrations is None else migrations
            if foreign := _not_ours(done, available):
                # Skipping the number would answer "up to date" over a schema without this release's change.
                raise SchemaMismatch(f"the database's migrations are not this release's: {foreign}. Nothing was"
                                     " applied: the two releases' schemas must be reconciled by hand")
            for mig in available:
                if mig.version in done:
                    continue
                if mig.concurrent:
                    await _apply_concurrently(conn, mig, lock_wait=lock_wait)
                else:
                    await _apply(conn, mig, lock_timeout=lock_timeout, lock_wait=lock_wait, sleep=sleep)
                applied_now.append(mig)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()
    return applied_now


async def _apply(conn: Conn, mig: Migration, *, lock_timeout: float, lock_wait: float,
                 sleep: Callable[[float], Awaitable[None]]) -> None:
    """`mig` in one transaction whose lock waits are bounded by `lock_timeout`, tried again until
    `lock_wait` has passed."""
    give_up = time.monotonic() + lock_wait
    pauses = _pauses()
    tries = 0
    while True:
        tries += 1
        try:
            async with conn.transaction():
                # LOCAL: the setting ends with the transaction; in milliseconds, at least 1 (0 = no limit).
                await conn.execute(f"SET LOCAL lock_timeout = {max(1, round(lock_timeout * 1000))}")
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_versions (version, name) VALUES ($1, $2)", mig.version, mig.name
                )
            return
        except asyncpg.exceptions.LockNotAvailableError:
            pause = next(pauses)
            if time.monotonic() + pause >= give_up:
                raise MigrationBlocked(
                    f"migration {mig.version:04d}_{mig.name} could not take its locks in {tries} tries over"
                    f" {lock_wait:g} s (each waited at most {lock_timeout:g} s, so that queries of the table"
                    f" did not queue behind it); nothing of it was applied. The oldest open transactions:"
                    f" {await _open_transactions(conn)}. Run `crs migrate` again once they ended") from None
        await sleep(_jittered(pause))


def _pauses() -> Iterator[float]:
    """The pauses between tries (RETRY_FIRST, doubling to RETRY_MAX), before jitter."""
    pause = RETRY_FIRST
    while True:
        yield pause
        pause = min(pause * 2, RETRY_MAX)


def _jittered(pause: float) -> float:
    return pause * random.uniform(0.5, 1.5)


async def _apply_concurrently(conn: Conn, mig: Migration, *, lock_wait: float) -> None:
    """`mig`'s statements one at a time, outside any transaction (each is its own). They block no
    query or write of the table, so each may wait out the transactions open before it for what is left
    of `lock_wait` (for each lock it waits on: a build waits several times, so about `lock_wait` in
    all); a build's own time is not bounded."""
    give_up = time.monotonic() + lock_wait
    for statement, index in mig.statements():
        if index is not None and await conn.fetchval(
                "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", index):
            await _bounded(conn, mig, f"DROP INDEX CONCURRENTLY IF EXISTS {index}", give_up, lock_wait, index)
        await _bounded(conn, mig, statement, give_up, lock_wait, index)
    await conn.execute("INSERT INTO schema_versions (version, name) VALUES ($1, $2)", mig.version, mig.name)


async def _bounded(conn: Conn, mig: Migration, statement: str, give_up: float, lock_wait: float,
                   index: str | None) -> None:
    left = give_up - time.monotonic()
    try:
        if left <= 0:
            raise asyncpg.exceptions.LockNotAvailableError("no time left")
        # No statement_timeout: a database's or role's default (managed services set one) cancelled every
        # build past it, and the rerun dropped the INVALID index and was cancelled the same way, for good.
        await conn.execute(f"SET lock_timeout = {max(1, round(left * 1000))}; SET statement_timeout = 0")
        try:
            await conn.execute(statement)
        finally:
            await conn.execute("RESET lock_timeout; RESET statement_timeout")
    except asyncpg.exceptions.LockNotAvailableError:
        left_behind = (f" Its index {index} is left INVALID (no query uses it); the next run drops and builds it"
                       " again." if index else "")
        raise MigrationBlocked(
            f"migration {mig.version:04d}_{mig.name} waited {lock_wait:g} s for the transactions open before it"
            f" to end (a concurrent index build waits for them; it blocks no query meanwhile), and is not"
            f" recorded.{left_behind} The oldest open transactions: {await _open_transactions(conn)}. Run"
            " `crs migrate` again once they ended") from None
    except asyncpg.exceptions.IntegrityConstraintViolationError as exc:
        # Its message, not its DETAIL: that names the duplicated values, which may be anyone's data.
        raise MigrationFailed(
            f"migration {mig.version:04d}_{mig.name} failed building index {index}: {exc.args[0]}. The index is left"
            " INVALID (no query uses it) and the migration is not recorded: mend the data, then run `crs migrate`"
            " again (it drops the index and builds it again)") from None


async def _open_transactions(conn: Conn) -> str:
    """The oldest transactions open on the database (never their query text: it may be anyone's)."""
    rows = await conn.fetch(
        "SELECT pid, usename, application_name, state, extract(epoch FROM clock_timestamp() - xact_start) AS age"
        " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND xact_start IS NOT NULL ORDER BY xact_start LIMIT $1", BLOCKERS_NAMED)
    if not rows:
        return "none now"
    return "; ".join(f"pid {r['pid']} ({r['usename']}, {r['application_name'] or 'no application_name'},"
                     f" {r['state']}, open {float(r['age']):.0f} s)" for r in rows)


async def check_schema(conn: Conn) -> None:
    """Raise with a clear message if the database is not fully migrated (checked at node start)."""
    available = available_migrations()
    applied = await applied_migrations(conn)
    if foreign := _not_ours(applied, available):
        raise SchemaMismatch(f"database schema is not this release's: {foreign}")
    missing = {m.version for m in available} - applied.keys()
    if missing:
        raise RuntimeError(
            f"database schema is not up to date (missing migrations {sorted(missing)}): run `crs migrate`")
