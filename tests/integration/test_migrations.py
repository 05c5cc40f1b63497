"""`crs migrate` during a rolling upgrade, on a PostgreSQL of its own: the nodes of the running release
keep reading and writing the tables a migration alters, so a migration that waits for a lock must not
make their queries wait behind it; two migrate runs at once apply each migration once; a node of the
previous release starts on the newer schema, and a node refuses a schema missing its migrations.

A migration is "pending again" here by undoing it: 0012 adds cards.iin8, so dropping the column and its
schema_versions row puts the database back where it was before 0012, with every later one applied."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from devstack.postgres import PostgresServer
from server.store.migrate import (
    Migration,
    MigrationBlocked,
    MigrationFailed,
    SchemaMismatch,
    available_migrations,
    check_schema,
    migrate,
)
from tests.integration.support import PG_BINARIES, REPO

# A lookup miss's bound (CRS_PG_TIMEOUT's default): a query of cards that waits longer has failed a call.
LOOKUP_BOUND = 2.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    base = Path(tempfile.mkdtemp(prefix="crs-migrations-"))
    base.chmod(0o755)   # PostgreSQL may run as another user (the suite as root): it must reach its data_dir
    server = PostgresServer(data_dir=base / "pg", binaries=PG_BINARIES)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


_databases = iter(range(1, 1000))


@pytest.fixture
def dsn(pg: PostgresServer) -> str:
    """A fresh, empty database for each test."""
    name = f"crs_migrations_{next(_databases)}"
    pg.create_database(name)
    return pg.dsn(name)


async def _undo_0012(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER TABLE cards DROP COLUMN iin8; DELETE FROM schema_versions WHERE version = 12")
    finally:
        await conn.close()


async def _has_iin8(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT FROM information_schema.columns WHERE table_name = 'cards' AND column_name = 'iin8')"))


def test_a_migration_behind_a_long_transaction_does_not_stall_the_tables_queries(dsn: str) -> None:
    """A migration that alters cards (ACCESS EXCLUSIVE) behind a transaction that read cards (an extract's
    snapshot) queued for the lock without a bound, and every later query of cards, which is every lookup
    miss and card write of the nodes still serving, queued behind it for as long as that transaction
    lasted. Now each try waits at most lock_timeout, so a query of cards waits that long at most, and the
    migration is applied once the transaction ends."""
    async def run() -> None:
        await migrate(dsn)
        await _undo_0012(dsn)
        extract = await asyncpg.connect(dsn)
        lookups = await asyncpg.connect(dsn)
        try:
            snapshot = extract.transaction(isolation="repeatable_read")
            await snapshot.start()
            await extract.fetchval("SELECT count(*) FROM cards")
            migration = asyncio.ensure_future(migrate(dsn))
            try:
                # Until the migration has tried (and waited on cards) a few times: its session shows it.
                deadline = time.monotonic() + 10
                while not await lookups.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'cards'::regclass"):
                    assert time.monotonic() < deadline, "the migration never waited for cards"
                    assert not migration.done(), migration.result()
                    await asyncio.sleep(0.01)
                waits = []
                for _ in range(10):
                    started = time.monotonic()
                    try:
                        await lookups.fetchrow("SELECT * FROM cards WHERE token = $1", "tok-none",
                                               timeout=LOOKUP_BOUND * 2)
                    except TimeoutError:
                        pytest.fail(f"a query of cards waited more than {LOOKUP_BOUND * 2:g} s behind the migration")
                    waits.append(time.monotonic() - started)
                    await asyncio.sleep(0.1)
                assert max(waits) < LOOKUP_BOUND, waits
                assert not migration.done(), "applied while the long transaction held cards?"
            finally:
                await snapshot.rollback()
            applied = await migration
            assert [m.version for m in applied] == [12]
            assert await _has_iin8(lookups)
        finally:
            await extract.close()
            await lookups.close()

    asyncio.run(run())


def test_a_migration_that_cannot_take_its_locks_gives_up_naming_the_open_transactions(dsn: str) -> None:
    """Past --lock-wait, `crs migrate` ends with exit 3, names the migration and the oldest open
    transaction (its pid, not its query), and leaves nothing of that migration applied."""
    async def run() -> None:
        await migrate(dsn)
        await _undo_0012(dsn)
        holder = await asyncpg.connect(dsn, server_settings={"application_name": "long-extract"})
        try:
            async with holder.transaction(isolation="repeatable_read"):
                await holder.fetchval("SELECT count(*) FROM cards")
                pid = await holder.fetchval("SELECT pg_backend_pid()")
                env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | {"CRS_PG_DSN": dsn}
                started = time.monotonic()
                r = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "server.cli", "migrate", "--lock-wait", "1"],
                    cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
                took = time.monotonic() - started
            assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
            assert "0012_card_iin8" in r.stderr and f"pid {pid} " in r.stderr and "long-extract" in r.stderr, r.stderr
            assert "count(*)" not in r.stderr
            assert took < 30, took
            assert not await _has_iin8(holder)
            assert 12 not in {r["version"] for r in await holder.fetch("SELECT version FROM schema_versions")}
        finally:
            await holder.close()
        assert [m.version for m in await migrate(dsn)] == [12]    # and a later run applies it

    asyncio.run(run())


def test_two_migrate_runs_at_once_apply_each_migration_once(dsn: str) -> None:
    """Two migrate Jobs (or a Job and `crs dev`) at once: the advisory lock makes the second wait, then
    find everything applied."""
    async def run() -> None:
        first, second = await asyncio.gather(migrate(dsn), migrate(dsn))
        versions = [m.version for m in first] + [m.version for m in second]
        assert sorted(versions) == [m.version for m in available_migrations()]

    asyncio.run(run())


def test_a_node_starts_on_a_newer_schema_and_refuses_an_older_one(dsn: str) -> None:
    """During a rollout the previous release's nodes start (a restart, a scale-up) on the schema the new
    release migrated: versions they do not know are no reason to refuse. A node whose own migrations are
    missing refuses, saying which and what to run."""
    async def run() -> None:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("INSERT INTO schema_versions (version, name) VALUES (9999, 'a_later_release')")
            await check_schema(conn)
            await conn.execute("DELETE FROM schema_versions WHERE version IN (12, 18)")
            with pytest.raises(RuntimeError, match=r"missing migrations \[12, 18\]\): run `crs migrate`"):
                await check_schema(conn)
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_number_applied_under_another_name_is_refused_not_skipped(dsn: str) -> None:
    """Two branches that each shipped their own 0018: the database has the other's. `crs migrate` used
    to skip the number as applied and answer "schema up to date" over a schema without this release's
    change, and nodes started on it. Now both refuse, naming the two, and nothing is applied."""
    ours = next(m for m in available_migrations() if m.version == 18)

    async def run() -> None:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE schema_versions SET name = 'another_branch' WHERE version = 18")
            await conn.execute("DELETE FROM schema_versions WHERE version = 12")   # one pending: not applied
            with pytest.raises(SchemaMismatch, match=f"0018 was applied as 'another_branch', this release's"
                                                     f" 0018 is '{ours.name}'"):
                await migrate(dsn)
            env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | {"CRS_PG_DSN": dsn}
            r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "server.cli", "migrate"],
                                        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 1 and "another_branch" in r.stderr and "Traceback" not in r.stderr, r
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert 12 not in {r["version"] for r in await conn.fetch("SELECT version FROM schema_versions")}
            with pytest.raises(SchemaMismatch, match="0018 was applied as 'another_branch'"):
                await check_schema(conn)
        finally:
            await conn.close()

    asyncio.run(run())


# A concurrent migration (server/store/migrate.py) after this release's, on a table of the test's own.
PAYMENTS = Migration(9001, "test_payments", "CREATE TABLE test_payments (id bigserial PRIMARY KEY, ref int)")
BY_REF = Migration(9002, "test_payments_by_ref",
                   "-- crs: concurrent\n-- a comment line\n"
                   "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS test_payments_ref ON test_payments (ref);\n")


def _with(*extra: Migration) -> list[Migration]:
    return [*available_migrations(), *extra]


async def _index_state(conn: asyncpg.Connection) -> str:
    """'valid', 'INVALID' or 'absent': test_payments_ref."""
    valid = await conn.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('test_payments_ref')")
    return "absent" if valid is None else "valid" if valid else "INVALID"


async def _recorded(conn: asyncpg.Connection, version: int) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM schema_versions WHERE version = $1)", version))


def test_a_concurrent_index_build_waits_for_a_long_transaction_without_blocking_writes(dsn: str) -> None:
    """A plain CREATE INDEX holds off every write of its table for the whole build, and 0017/0018 built
    theirs that way (thirteenth audit, 5). A concurrent migration builds outside any transaction: while
    it waits out an extract's snapshot, the table takes writes as before, and the index is built and the
    migration recorded once the snapshot ends."""
    async def run() -> None:
        await migrate(dsn, migrations=_with(PAYMENTS))
        extract, writer = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            snapshot = extract.transaction(isolation="repeatable_read")
            await snapshot.start()
            await extract.fetchval("SELECT count(*) FROM test_payments")
            migration = asyncio.ensure_future(migrate(dsn, migrations=_with(PAYMENTS, BY_REF), lock_wait=60))
            try:
                deadline = time.monotonic() + 20
                while await _index_state(writer) != "INVALID":      # built, waiting for older snapshots
                    assert time.monotonic() < deadline and not migration.done(), "the build never started"
                    await asyncio.sleep(0.02)
                for ref in range(20):
                    started = time.monotonic()
                    await writer.execute("INSERT INTO test_payments (ref) VALUES ($1)", ref, timeout=LOOKUP_BOUND * 2)
                    assert time.monotonic() - started < LOOKUP_BOUND
                assert not migration.done()
            finally:
                await snapshot.rollback()
            assert [m.version for m in await migration] == [BY_REF.version]
            assert await _index_state(writer) == "valid" and await _recorded(writer, BY_REF.version)
        finally:
            await extract.close()
            await writer.close()

    asyncio.run(run())


def test_a_concurrent_build_cut_short_leaves_no_record_and_is_built_again(dsn: str) -> None:
    """A build that fails on the data (duplicates under a UNIQUE index) is exit 1; one that waits past
    --lock-wait gives up (exit 3, naming the transaction it waited for). Either leaves an INVALID index,
    which IF NOT EXISTS alone would skip for good: the next run drops it and builds it."""
    async def run() -> None:
        await migrate(dsn, migrations=_with(PAYMENTS))
        conn = await asyncpg.connect(dsn)
        holder = await asyncpg.connect(dsn, server_settings={"application_name": "long-extract"})
        try:
            await conn.execute("INSERT INTO test_payments (ref) VALUES (7), (7), (8)")
            with pytest.raises(MigrationFailed, match=r"test_payments_ref.*mend the data") as failed:
                await migrate(dsn, migrations=_with(PAYMENTS, BY_REF))
            assert "=(7)" not in str(failed.value)      # one line, and no one's data (the DETAIL's key values)
            assert await _index_state(conn) == "INVALID" and not await _recorded(conn, BY_REF.version)
            await conn.execute("DELETE FROM test_payments WHERE id = (SELECT max(id) FROM test_payments WHERE ref = 7)")
            async with holder.transaction(isolation="repeatable_read"):
                await holder.fetchval("SELECT count(*) FROM test_payments")
                with pytest.raises(MigrationBlocked, match="long-extract") as blocked:
                    await migrate(dsn, migrations=_with(PAYMENTS, BY_REF), lock_wait=1)
                assert "test_payments_ref is left INVALID" in str(blocked.value)
                assert await _index_state(conn) == "INVALID" and not await _recorded(conn, BY_REF.version)
            assert [m.version for m in await migrate(dsn, migrations=_with(PAYMENTS, BY_REF))] == [BY_REF.version]
            assert await _index_state(conn) == "valid" and await _recorded(conn, BY_REF.version)
        finally:
            await holder.close()
            await conn.close()

    asyncio.run(run())


def test_two_migrate_runs_at_once_with_a_concurrent_build_both_finish(dsn: str) -> None:
    """The second run waiting for the advisory lock inside pg_advisory_lock was a running statement the
    first run's concurrent build waited for: each waited for the other (a deadlock PostgreSQL broke by
    failing one). It asks for the lock again and again instead."""
    async def run() -> None:
        runs = await asyncio.gather(*(migrate(dsn, migrations=_with(PAYMENTS, BY_REF)) for _ in range(2)))
        assert sorted(m.version for applied in runs for m in applied) == [m.version for m in _with(PAYMENTS, BY_REF)]
        conn = await asyncpg.connect(dsn)
        try:
            assert await _index_state(conn) == "valid"
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_concurrent_build_outlasts_the_database_s_statement_timeout(dsn: str) -> None:
    """A statement_timeout the database (or the role) sets, as managed services do, cancelled every
    build that took longer, and the rerun dropped the INVALID index and was cancelled again, for good."""
    async def run() -> None:
        await migrate(dsn, migrations=_with(PAYMENTS))
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("INSERT INTO test_payments (ref) SELECT g FROM generate_series(1, 500000) g")
            await conn.execute(f"ALTER DATABASE {await conn.fetchval('SELECT current_database()')}"
                               " SET statement_timeout = '50ms'")     # the build takes longer
            assert [m.version for m in await migrate(dsn, migrations=_with(PAYMENTS, BY_REF))] == [BY_REF.version]
            assert await _index_state(conn) == "valid"
        finally:
            await conn.close()

    asyncio.run(run())
