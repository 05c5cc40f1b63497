"""Statements that must read a bounded number of rows however big the tables grow (eighteenth audit,
docs/audit-2026-12-04.md). Each test runs the real code on a connection that EXPLAIN ANALYZEs every
SELECT it sends (just before sending it, in the same transaction) and checks how many rows the plan
read from its tables: a statement that reads past what it returns, row by row, turns into seconds or
minutes at bank scale (millions of cards, tens of millions of feed and audit rows), where the same
plans were measured.

The tables here hold thousands of rows, where a sequential scan is as cheap as any index; the
connections are told to avoid one (enable_seqscan = off), as the planner does at bank scale, so what
is checked is the plan's shape: whether the statement stops where its answer ends."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from devstack.environment import DevEnvironment
from server.cli import audit
from server.crypto import encode_key, new_key
from server.decisions import DecisionTable, parse_network_codes
from server.proto import crs_pb2 as pb
from server.relay import MISSED_ROWS_MAX, unsettled_keys
from server.rotation import rotate_fingerprint
from server.store.feed import compact
from tests.integration.support import on_database, own_env, running

pytestmark = pytest.mark.integration
CUSTOMERS = 200          # demo data: 400 cards, 200 accounts


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    yield from running(own_env(shards=1, customers=CUSTOMERS))


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's scans took from tables and indexes, kept or filtered out, over all loops."""
    loops = plan.get("Actual Loops", 1)
    n = 0
    if "Relation Name" in plan:
        n = round((plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
                   + plan.get("Rows Removed by Index Recheck", 0)) * loops)
    return n + sum(_rows_read(p) for p in plan.get("Plans", ()))


class Explaining:
    """A connection that records (SQL, rows its plan read) for every SELECT it runs; the rest passes."""

    def __init__(self, conn: Any, seen: list[tuple[str, int]]) -> None:
        self._conn = conn
        self.seen = seen

    async def _explain(self, query: str, args: tuple[Any, ...]) -> None:
        if query.lstrip().upper().startswith("SELECT") and "pg_try_advisory" not in query:
            doc = await self._conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *args)
            self.seen.append((query, _rows_read(json.loads(doc)[0]["Plan"])))

    async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
        await self._explain(query, args)
        return await self._conn.fetch(query, *args, **kw)

    async def fetchval(self, query: str, *args: Any, **kw: Any) -> Any:
        await self._explain(query, args)
        return await self._conn.fetchval(query, *args, **kw)

    async def fetchrow(self, query: str, *args: Any, **kw: Any) -> Any:
        await self._explain(query, args)
        return await self._conn.fetchrow(query, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class ExplainingPool:
    """A pool whose connections are Explaining ones, each told to avoid sequential scans."""

    def __init__(self, pool: asyncpg.Pool, seen: list[tuple[str, int]]) -> None:
        self._pool = pool
        self.seen = seen

    @contextlib.asynccontextmanager
    async def acquire(self, **kw: Any) -> AsyncIterator[Explaining]:
        async with self._pool.acquire(**kw) as conn:
            yield Explaining(conn, self.seen)

    async def fetchrow(self, query: str, *args: Any, **kw: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args, **kw)

    async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetch(query, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


@contextlib.asynccontextmanager
async def explaining_pool(dsn: str, **planner: str) -> AsyncIterator[ExplainingPool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2,
                                     server_settings={"enable_seqscan": "off"} | planner)
    try:
        yield ExplainingPool(pool, [])
    finally:
        await pool.close()


def _admin(env: DevEnvironment, query: str, *args: Any) -> None:
    on_database(env.admin_dsn, lambda conn: conn.execute(query, *args))


_FEED_ROWS = ("INSERT INTO outbox (created_at, event_type, entity_type, entity_id, invalidated_at, settled_at,"
              " feed_type, feed_op, feed_id, feed_version) SELECT now() - $2::interval, 'card.updated', 'card',"
              " 'tok_plan' || i, now(), {settled}, 3, 2, 'tok_plan' || i, 2 FROM generate_series(1, $1) i")


def test_compaction_reads_a_batch_a_step_not_the_whole_retention_window(env: DevEnvironment) -> None:
    """Compaction's step searched the next `batch` events old enough, the age filtered inside the scan:
    with every event past the horizon younger than the retention (the last step of every run), it read
    them all to find none (5 million events in the window: 1.6 s, each run)."""
    _admin(env, _FEED_ROWS.format(settled="now()"), 250, dt.timedelta(days=8))     # compacted
    _admin(env, _FEED_ROWS.format(settled="now()"), 3000, dt.timedelta(hours=1))   # within the retention

    async def run() -> tuple[int, list[tuple[str, int]]]:
        async with explaining_pool(env.admin_dsn) as pool:
            removed = await compact(pool, older_than=dt.timedelta(days=7), batch=100)  # type: ignore[arg-type]
            return removed, pool.seen

    removed, seen = asyncio.run(run())
    assert removed >= 250
    assert seen, "compaction ran no SELECT"
    worst = max(seen, key=lambda s: s[1])
    assert worst[1] <= 2 * 100 + 10, f"a compaction step read {worst[1]} rows for a batch of 100: {worst[0]}"


def test_unsettled_keys_reads_the_unsettled_rows_not_the_settled_history(env: DevEnvironment) -> None:
    """A cache copy back from an outage asks for the keys of every unsettled outbox row (at most
    MISSED_ROWS_MAX, else FLUSHDB). In id order the plan walked the primary key through the settled
    history first (5 million settled rows: 0.94 s, past CRS_PG_TIMEOUT at ~10 million: a FLUSHDB)."""
    _admin(env, _FEED_ROWS.format(settled="now()"), 4000, dt.timedelta(minutes=5))
    _admin(env, _FEED_ROWS.format(settled="NULL"), MISSED_ROWS_MAX + 500, dt.timedelta(minutes=1))
    _admin(env, "ANALYZE outbox")

    async def run() -> tuple[list[str] | None, list[tuple[str, int]]]:
        # No sort: at scale, with many unsettled rows on record, the planner takes the id order's index.
        async with explaining_pool(env.admin_dsn, enable_sort="off") as pool:
            keys = await unsettled_keys(pool, cached_for=60.0, timeout=30.0)  # type: ignore[arg-type]
            return keys, pool.seen

    try:
        keys, seen = asyncio.run(run())
    finally:
        _admin(env, "UPDATE outbox SET settled_at = now() WHERE settled_at IS NULL")
    assert keys is None                                          # more than the limit: not known
    query, read = next(s for s in seen if "cache_keys" in s[0])
    assert read <= MISSED_ROWS_MAX + 10, f"read {read} rows for {MISSED_ROWS_MAX + 1}: {query}"


def test_key_rotation_batches_start_after_the_last_one(env: DevEnvironment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch of `crs keys rotate-fingerprint` searched from the first key, reading again every
    row the batches before it had done: n^2 / 2 / batch rows in all (5 million cards, 1,000 a batch:
    2.5 million rows and about a second a batch by the middle, for 5,000 batches)."""
    seen: list[tuple[str, int]] = []
    connect = asyncpg.connect

    async def explaining_connect(*args: Any, **kw: Any) -> Explaining:
        conn = await connect(*args, **kw, server_settings={"enable_seqscan": "off"})
        return Explaining(conn, seen)

    monkeypatch.setattr(asyncpg, "connect", explaining_connect)
    k1 = env.keys["CRS_FINGERPRINT_KEYS"]
    settings = env.settings(fingerprint_keys=f"{k1},2:{encode_key(new_key())}", fingerprint_key_version=1)
    done, left = asyncio.run(rotate_fingerprint(env.admin_dsn, settings.keyring(), to_version=2, batch=20))
    assert done["cards"] >= 2 * CUSTOMERS and left == {"cards": 0, "accounts": 0, "source_records": 0}
    batches = [(q, n) for q, n in seen if "SKIP LOCKED" in q]
    assert len(batches) > 10
    worst = max(batches, key=lambda s: s[1])
    assert worst[1] <= 2 * 20 + 5, f"a rotation batch of 20 read {worst[1]} rows: {worst[0]}"


def test_audit_reads_only_the_window_it_was_asked_for(env: DevEnvironment, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`crs audit --entity X --hours H` ordered by id: when fewer than --limit rows match (the usual
    answer for one card), the plan walked the primary key backwards past the window to the first row
    ever written (5 million rows over 60 days, --hours 240: 3.5 s, reading all 5 million)."""
    _admin(env, "INSERT INTO audit_log (at, client_id, via, rpc, entity_type, entity_ids, result)"
                " SELECT now() - interval '30 days' + i * interval '1 second', 'old-client', 'mtls', 'SetCardStatus',"
                " 'card', ARRAY['tok_other' || i], 'OK' FROM generate_series(1, 3000) i")
    _admin(env, "INSERT INTO audit_log (at, client_id, via, rpc, entity_type, entity_ids, result)"
                " SELECT now() - i * interval '1 second', 'ops', 'mtls', 'SetCardStatus', 'card',"
                " ARRAY['tok_recent' || i], 'OK' FROM generate_series(1, 50) i")
    _admin(env, "ANALYZE audit_log")
    seen: list[tuple[str, int]] = []
    connect = asyncpg.connect

    async def explaining_connect(*args: Any, **kw: Any) -> Explaining:
        # No sort either: the planner's choice at scale for an --entity it guesses is common.
        conn = await connect(*args, **kw, server_settings={"enable_seqscan": "off", "enable_sort": "off"})
        return Explaining(conn, seen)

    monkeypatch.setattr(asyncpg, "connect", explaining_connect)
    monkeypatch.setenv("CRS_PG_DSN", env.admin_dsn)
    args = argparse.Namespace(client=None, rpc=None, entity="tok_recent7", hours=1.0, limit=100, config=None)
    assert audit.cmd_audit(args) == 0
    assert "(1 rows)" in capsys.readouterr().out
    window = on_database(env.admin_dsn, lambda conn: conn.fetchval(
        "SELECT count(*) FROM audit_log WHERE at >= now() - interval '1 hour'"))
    query, read = next(s for s in seen if "audit_log" in s[0])
    assert read <= window + 10, f"read {read} rows of audit_log for a window of {window}: {query}"


def test_a_merge_reads_the_merged_customer_s_open_reviews_not_every_open_one(env: DevEnvironment) -> None:
    """A merge takes the open review tasks naming the merged customer on either side, while it holds
    its customers' locks; with neither side indexed it read every open task (50,000: 44 ms a merge).
    Migration 0019 indexes both sides, built concurrently."""
    from server.store.merge import IdentityStore

    async def run() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(env.admin_dsn, server_settings={"enable_seqscan": "off"})
        try:
            ids = [r["customer_id"] for r in await conn.fetch("SELECT customer_id FROM customers ORDER BY 1")]
            others = [(a, b) for n, a in enumerate(ids[10:]) for b in ids[11 + n:]][:2000]
            tasks = [*others, (ids[0], ids[1])]
            await conn.executemany(
                "INSERT INTO identity_reviews (review_id, customer_id, candidate_id, probability, evidence, status)"
                " VALUES ('rev_plan' || $1::text, $2, $3, 0.9, '{}', 1)",
                [(str(i), a, b) for i, (a, b) in enumerate(tasks)])
            await conn.execute("ANALYZE identity_reviews")
            seen: list[tuple[str, int]] = []
            merge = conn.transaction()
            await merge.start()
            try:
                await IdentityStore._repoint_reviews(Explaining(conn, seen), ids[2], ids[0])
            finally:
                await merge.rollback()    # the merge's own work is not this test's
            return seen
        finally:
            await conn.execute("DELETE FROM identity_reviews WHERE review_id LIKE 'rev_plan%'")
            await conn.close()

    seen = asyncio.run(run())
    assert seen, "the merge ran no SELECT"
    worst = max(seen, key=lambda s: s[1])
    assert worst[1] <= 10, f"a merge read {worst[1]} rows of 2,001 open tasks for the one naming it: {worst[0]}"


def test_the_relay_s_backlog_gauge_counts_up_to_its_cap(env: DevEnvironment) -> None:
    """Every relay pass of every node process counted every unsettled row for its gauge: 44 ms at
    500,000 (a long shard outage keeps rows unsettled), 1.4 PostgreSQL cores for 16 processes."""
    from server.relay import backlog

    _admin(env, _FEED_ROWS.format(settled="NULL"), 3000, dt.timedelta(minutes=1))
    _admin(env, "ANALYZE outbox")

    async def run() -> tuple[tuple[int, float], list[tuple[str, int]]]:
        async with explaining_pool(env.admin_dsn) as pool:
            return await backlog(pool, counted=100), pool.seen  # type: ignore[arg-type]

    try:
        (pending, age), seen = asyncio.run(run())
    finally:
        _admin(env, "UPDATE outbox SET settled_at = now() WHERE settled_at IS NULL")
    assert pending == 100 and 50 <= age < 3600
    assert seen[0][1] <= 110, f"read {seen[0][1]} rows to count 100: {seen[0][0]}"


def test_a_later_page_of_decided_review_tasks_starts_where_the_last_ended(env: DevEnvironment) -> None:
    """`crs identity reviews --status accepted`: decided tasks had no index (a sort of the table a page),
    and a later page's "$2 IS NULL OR (created_at, review_id) > ..." kept the scan from starting at the
    last page's end: it read every task of the pages before. Migration 0019 and a seek."""
    from types import SimpleNamespace

    from server.proto import crs_pb2 as pb
    from server.store.merge import IdentityStore

    async def run() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(env.admin_dsn)
        try:
            ids = [r["customer_id"] for r in await conn.fetch("SELECT customer_id FROM customers ORDER BY 1")]
            pairs = [(a, b) for n, a in enumerate(ids) for b in ids[n + 1:]][:1500]
            await conn.executemany(
                "INSERT INTO identity_reviews (review_id, customer_id, candidate_id, probability, evidence, status,"
                " created_at) VALUES ('rev_page' || $1::int, $2, $3, 0.9, '{}', 2, now() - $1::int * interval '1 s')",
                [(i, a, b) for i, (a, b) in enumerate(pairs)])
            await conn.execute("ANALYZE identity_reviews")
        finally:
            await conn.close()
        async with explaining_pool(env.admin_dsn, enable_sort="off") as pool:
            store = SimpleNamespace(pool=pool, timeout=5.0)
            request = pb.ListReviewTasksRequest(status=pb.REVIEW_STATUS_ACCEPTED, page_size=100)
            token = ""
            for _ in range(5):                          # to the sixth page
                request.page_token = token
                token = (await IdentityStore.list_reviews(store, request)).next_page_token  # type: ignore[arg-type]
                assert token
            pool.seen.clear()
            request.page_token = token
            assert len((await IdentityStore.list_reviews(store, request)).tasks) == 100  # type: ignore[arg-type]
            return pool.seen

    try:
        seen = asyncio.run(run())
    finally:
        _admin(env, "DELETE FROM identity_reviews WHERE review_id LIKE 'rev_page%'")
    worst = max(seen, key=lambda s: s[1])
    assert worst[1] <= 110, f"the sixth page of 100 read {worst[1]} rows: {worst[0]}"


def test_a_card_answer_reads_its_account_s_first_owner_not_every_related_customer(env: DevEnvironment) -> None:
    """A card answer carries its account's primary customer alone, but its query aggregated every
    related customer, then dropped all but one (an account with 5,000 related customers: 28 ms and a
    657 KB aggregate a card miss; 0.05 ms now). Migration 0019's account_customers_in_order."""
    from server.store import reads

    async def run() -> tuple[int, str]:
        conn = await asyncpg.connect(env.admin_dsn, server_settings={"enable_seqscan": "off"})
        try:
            account, token = await conn.fetchrow("SELECT account_id, token FROM cards WHERE account_id IS NOT NULL"
                                                 " ORDER BY token LIMIT 1")
            await conn.execute("INSERT INTO account_customers (account_id, customer_id, role) SELECT $1, customer_id,"
                               " 3 FROM customers WHERE customer_id NOT IN (SELECT customer_id FROM account_customers"
                               " WHERE account_id = $1) ON CONFLICT DO NOTHING", account)
            await conn.execute("ANALYZE account_customers")
            seen: list[tuple[str, int]] = []
            found = await reads.card_by_token(Explaining(conn, seen), token, timeout=5.0,  # type: ignore[arg-type]
                                              hints=reads.Hints(DecisionTable(parse_network_codes("")), lambda _: ""),
                                              cached_for=0.0)
            assert isinstance(found, bytes)
            await conn.execute("DELETE FROM account_customers WHERE account_id = $1 AND role = 3", account)
            return seen[0][1], pb.Resolution.FromString(found).customer.customer_id
        finally:
            await conn.close()

    read, customer = asyncio.run(run())
    assert customer.startswith("cus_")                     # the owner, as before
    assert read <= 10, f"a card answer read {read} rows on an account with 200 related customers"
