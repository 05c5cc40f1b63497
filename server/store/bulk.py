"""Bulk import of customers (`crs import customers`, docs/identity.md "Bulk import"): one PostgreSQL
transaction per batch of a source file, with identification as online and the change feed as online.

Per batch, in three steps (`search` reads, `plan` decides, `write` is the transaction), pipelined by
`import_batches` so that PostgreSQL searches batch N+1 while it writes batch N:
1. rows whose source reference is already on file are answered with their customer (`existing`):
   the source reference is the idempotency key, so a re-run or a resumed run creates nothing twice;
2. the new rows are clustered among themselves (server/identity/cluster.py: duplicates inside one
   file become one customer) and matched against the stored customers with the batched candidate
   search (`candidates_many`: one query for every blocking key of the batch, one for the candidate
   records), scored by the same MatchModel and decided by the same rules as IdentifyCustomer;
3. a cluster whose rows MATCH exactly one existing customer joins it (its version goes up, an outbox
   row carries its cache key to the relay); any other cluster becomes a new customer, with review
   tasks for its possible matches (stored ones, and other clusters of the file);
4. customers, source records and blocking keys are written with COPY, then the audit row, the
   run's progress, and last the outbox rows, under FEED_LOCK as the write envelope draws them
   (server/store/envelope.py), so feed sequences stay in commit order.

Two concurrent creates of one person are serialised online by advisory locks on blocking keys; a
batch takes none (thousands per transaction would exhaust the lock table), so an online create of
the same person during an import may make a twin, which the review queue or a later merge catches.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import orjson

from server.feed.events import feed_fields
from server.identity.attributes import Identity
from server.identity.cluster import cluster
from server.identity.golden import display_name
from server.identity.model import MatchModel, Score, Thresholds
from server.proto import crs_pb2 as pb
from server.store import edges
from server.store.admin import MAX_NAME, new_id
from server.store.db import Conn, translate_db_errors
from server.store.envelope import FEED_CHANNEL, FEED_LOCK
from server.store.identity import IdentityCodec, SealedRecord, Unwritten, candidates_many
from server.store.identity_writes import MAX_CANDIDATES, live_customer, queue_reviews_many
from server.store.messages import customer_msg

IMPORT_CLIENT = "crs-import"     # the audit log's client id of bulk imports
NEW, MATCHED, POSSIBLE, EXISTING = "new", "matched", "possible_match", "existing"
ATTRIBUTES_DIFFER = "attributes: differ from the record on file, not applied (UpdateCustomerIdentity changes it)"
_OUTBOX_COLUMNS = ("event_type", "entity_type", "entity_id", "payload", "cache_keys", "feed_type", "feed_op",
                   "feed_id", "feed_version", "state", "invalidated_at", "settled_at")
_RECORD_COLUMNS = ("record_id", "source_system", "source_key", "customer_id", "home_customer_id",
                   "fingerprint_version", "national_id_fp", "national_id_last4", "attributes_ciphertext", "dek_id",
                   "next_fingerprint_version", "next_national_id_fp")


@dataclass(frozen=True)
class ImportRow:
    row: int                        # the row of the file (the header is row 1)
    key: str                        # the source key (the system is the run's)
    identity: Identity
    warnings: tuple[str, ...] = ()  # "column: reason" of each attribute dropped (never a value)
    keys: tuple[str, ...] | None = None   # its blocking_keys, when the reader made them (a second process)


@dataclass(frozen=True)
class Outcome:
    row: int
    key: str
    customer_id: str
    decision: str                   # NEW, MATCHED, POSSIBLE, EXISTING
    score: float | None
    warnings: tuple[str, ...]


@dataclass
class _Group:
    """One cluster of the batch: the rows that are one person, and what becomes of them."""

    members: list[int]
    customer_id: str = ""
    joins: bool = False                                      # joins an existing customer
    scores: dict[int, float] = field(default_factory=dict)   # per member: the score reported
    reviews: dict[str, Score] = field(default_factory=dict)  # candidate customer -> best score
    possible: bool = False                                   # resembles another cluster of the file


Item = tuple[Sequence[ImportRow], int, Sequence[SealedRecord]]    # a batch, the rows done after it, the seals


@dataclass(frozen=True)
class Found:
    """A batch after its search (`BulkCustomers.search`)."""

    known: list[Outcome]                        # rows whose source reference is on file already
    fresh: list[ImportRow]                      # the others, in file order
    seals: list[SealedRecord]                   # of `fresh`
    scored: list[list[tuple[str, Score]]]       # of `fresh`: the stored customers they resemble
    record_ids: list[int]                       # of `fresh`: their source records' ids
    rows_done: int                              # the file's rows done once this batch commits


@dataclass(frozen=True)
class Plan:
    """A batch decided, not yet written (`BulkCustomers.plan`)."""

    found: Found
    groups: list[_Group]
    by_row: dict[int, _Group]                   # per fresh row: its group
    pairs: list[tuple[_Group, _Group, Score]]   # clusters of the file that resemble each other
    unwritten: Unwritten                        # its records, for the next batch's search


def run_id(system: str, kind: str, content_sha256: str) -> str:
    """The id of an import run: the same file for the same system resumes the same run."""
    return hashlib.sha256(f"{kind}\0{system}\0{content_sha256}".encode()).hexdigest()[:32]


async def begin_run(pool: asyncpg.Pool, run: str, system: str, kind: str) -> tuple[int, datetime | None]:
    """Start or resume `run`: the rows committed so far and when it finished (None: not yet)."""
    with translate_db_errors():
        async with pool.acquire() as conn:
            await conn.execute("INSERT INTO import_runs (run_id, source_system, kind) VALUES ($1, $2, $3)"
                               " ON CONFLICT DO NOTHING", run, system, kind)
            row = await conn.fetchrow("SELECT rows_done, finished_at FROM import_runs WHERE run_id = $1", run)
    assert row is not None
    return int(row["rows_done"]), row["finished_at"]


async def finish_run(pool: asyncpg.Pool, run: str, rows: int) -> None:
    with translate_db_errors():
        await pool.execute("UPDATE import_runs SET rows_done = greatest(rows_done, $2),"
                           " finished_at = coalesce(finished_at, now()) WHERE run_id = $1", run, rows)


class BulkCustomers:
    def __init__(self, *, pool: asyncpg.Pool, codec: IdentityCodec, model: MatchModel, thresholds: Thresholds,
                 system: str) -> None:
        self.pool, self.codec, self.model, self.thresholds, self.system = pool, codec, model, thresholds, system

    @staticmethod
    async def progress(conn: Conn, run: str, rows_done: int, rpc: str, entity: str, ids: list[str]) -> None:
        """The run's progress and the batch's audit row, in the batch's transaction."""
        await conn.execute("UPDATE import_runs SET rows_done = greatest(rows_done, $2) WHERE run_id = $1",
                           run, rows_done)
        await conn.execute(
            "INSERT INTO audit_log (client_id, via, rpc, request_id, entity_type, entity_ids, result)"
            " VALUES ($1, 'cli', $2, $3, $4, $5, 'OK')", IMPORT_CLIENT, rpc, run, entity, ids)

    # -- customers -----------------------------------------------------------------------------
    async def existing(self, conn: Conn, rows: Sequence[ImportRow]) -> dict[str, Outcome]:
        """Source key -> the row's outcome when the key is on file: the customer it belongs to now (a
        merged one answers its survivor). A row whose attributes differ from the record on file says
        so: the source reference is the idempotency key, so they are not applied (UpdateCustomerIdentity
        changes a record) and must not go unnoticed."""
        found = await conn.fetch(
            "SELECT s.source_key, coalesce(c.merged_into, s.customer_id) AS customer_id, s.attributes_ciphertext,"
            " s.dek_id FROM source_records s JOIN customers c ON c.customer_id = s.customer_id"
            " WHERE s.source_system = $1 AND s.source_key = ANY($2::text[])", self.system, [r.key for r in rows])
        on_file = {f["source_key"]: f for f in found}
        out: dict[str, Outcome] = {}
        for r in rows:
            f = on_file.get(r.key)
            if f is None:
                continue
            stored = await self.codec.open(conn, f["attributes_ciphertext"], f["dek_id"])
            warnings = r.warnings if stored == r.identity else (*r.warnings, ATTRIBUTES_DIFFER)
            out[r.key] = Outcome(r.row, r.key, f["customer_id"], EXISTING, None, warnings)
        return out

    def seal(self, row: ImportRow) -> SealedRecord:
        """A row's sealed record (pure CPU: the import seals the next batch while one is written)."""
        return self.codec.seal(row.identity, row.keys)

    async def search(self, rows: Sequence[ImportRow], rows_done: int, sealed: Sequence[SealedRecord] | None = None,
                     unwritten: Unwritten | None = None) -> Found:
        """Step 1, reads only: which rows are on file already, and the candidates of the others.
        `sealed`: the rows' `seal` when the caller made it already; `unwritten`: the previous batch's
        records while its transaction is still open (`import_batches`)."""
        with translate_db_errors():
            async with self.pool.acquire() as conn:
                known = await self.existing(conn, rows) if rows else {}
                fresh = [i for i, r in enumerate(rows) if r.key not in known]
                seals = [sealed[i] if sealed is not None else self.seal(rows[i]) for i in fresh]
                scored = await candidates_many(conn, self.codec, self.model, [rows[i].identity for i in fresh],
                                               [s.blocks for s in seals], unwritten) if fresh else []
                # Ids drawn now (a sequence is outside transactions): the next batch's search tells
                # this batch's records in PostgreSQL's answer from its Unwritten ones by them.
                record_ids = [r[0] for r in await conn.fetch(
                    "SELECT nextval('source_records_record_id_seq') FROM generate_series(1, $1)",
                    len(fresh))] if fresh else []
        return Found([known[r.key] for r in rows if r.key in known],
                     [rows[i] for i in fresh], seals, scored, record_ids, rows_done)

    def plan(self, found: Found) -> Plan:
        """Step 2, CPU only: clusters, decisions and the new customers' ids."""
        rows = found.fresh
        keys = [r.keys for r in rows if r.keys is not None]
        groups, pairs = self._decide([r.identity for r in rows], found.scored,
                                     keys if len(keys) == len(rows) else None)
        for g in groups:
            if not g.joins:
                g.customer_id = new_id("cus_")
        by_row = {m: g for g in groups for m in g.members}
        unwritten = Unwritten()
        for i, (row, seal, record_id) in enumerate(zip(rows, found.seals, found.record_ids, strict=True)):
            unwritten.add(record_id, by_row[i].customer_id, row.identity, seal.blocks)
        return Plan(found, groups, by_row, pairs, unwritten)

    async def write(self, plan: Plan, run: str) -> list[Outcome]:
        """Step 3: the batch in one transaction; an outcome per row, in row order."""
        found = plan.found
        with translate_db_errors():
            async with self.pool.acquire() as conn, conn.transaction():
                outcomes, new_customers = list(found.known), dict[str, pb.Customer]()
                if found.fresh:
                    written, new_customers = await self._write(conn, plan)
                    outcomes += written
                created = sorted(new_customers)
                joined = sorted({o.customer_id for o in outcomes if o.decision == MATCHED})
                await self.progress(conn, run, found.rows_done, "ImportCustomers", "customer", created + joined)
                if found.fresh:
                    await self._feed(conn, new_customers, created, joined)
        return sorted(outcomes, key=lambda o: o.row)

    async def write_batch(self, rows: Sequence[ImportRow], run: str, rows_done: int,
                          sealed: Sequence[SealedRecord] | None = None) -> list[Outcome]:
        """The three steps for one batch, nothing else in flight."""
        return await self.write(self.plan(await self.search(rows, rows_done, sealed)), run)

    async def import_batches(self, next_batch: Callable[[], Awaitable[Item | None]], run: str,
                             done: Callable[[list[Outcome], int], None]) -> None:
        """Every batch `next_batch` gives (rows, rows done after it, their seals), pipelined: batch N+1
        is fetched and searched on the pool's second connection while batch N's transaction writes on
        the first. The search adds batch N's records to what PostgreSQL answers (it cannot see them
        before the commit), and it starts only after batch N-1 committed: each batch is decided on
        exactly what it would be decided on one batch at a time. `done(outcomes, rows_done)` after
        each commit, in file order. The writes run in the caller's task: an error or an interrupt
        stops the import there (the run resumes after the last commit), and the search is cancelled."""
        found = await self._next(next_batch, None)
        while found is not None:
            if not found.known and not found.fresh:     # every row of the batch was rejected
                done([], found.rows_done)
                found = await self._next(next_batch, None)
                continue
            plan = self.plan(found)
            ahead = asyncio.ensure_future(self._next(next_batch, plan.unwritten))
            try:
                done(await self.write(plan, run), found.rows_done)
                found = await ahead
            finally:
                if not ahead.done():
                    ahead.cancel()
                    await asyncio.gather(ahead, return_exceptions=True)

    async def _next(self, next_batch: Callable[[], Awaitable[Item | None]], unwritten: Unwritten | None
                    ) -> Found | None:
        item = await next_batch()
        return None if item is None else await self.search(item[0], item[1], item[2], unwritten)

    async def _write(self, conn: Conn, plan: Plan) -> tuple[list[Outcome], dict[str, pb.Customer]]:
        """The rows' outcomes, and the customers created (their state as written: what the feed sends)."""
        rows, by_row = plan.found.fresh, plan.by_row
        # The customers rows join were chosen before this transaction: a merge may have moved one since.
        # Locked in id order, as merges lock theirs.
        for g in sorted((g for g in plan.groups if g.joins), key=lambda g: g.customer_id):
            g.customer_id = await live_customer(conn, g.customer_id)
        new_groups = [g for g in plan.groups if not g.joins]
        customers = [(g.customer_id, self._name(rows[g.members[0]].identity), "retail", pb.CUSTOMER_STATUS_ACTIVE,
                      pb.KYC_STATUS_PENDING) for g in new_groups]
        await conn.copy_records_to_table(
            "customers", columns=("customer_id", "display_name", "segment", "status", "kyc_status"), records=customers)
        created = {c[0]: pb.Customer(customer_id=c[0], display_name=c[1], segment=c[2], status=c[3], kyc_status=c[4],
                                     version=1) for c in customers}    # version: the column's default
        records, blocks = [], []
        for i, (row, record_id, seal) in enumerate(zip(rows, plan.found.record_ids, plan.found.seals, strict=True)):
            cid = by_row[i].customer_id
            records.append((record_id, self.system, row.key, cid, cid, seal.fingerprint_version,
                            seal.national_id_fp, seal.national_id_last4, seal.ciphertext, seal.dek_id,
                            seal.next_fingerprint_version, seal.next_national_id_fp))
            blocks += [(v, b, record_id) for v, b in seal.block_rows]
        await conn.copy_records_to_table("source_records", columns=_RECORD_COLUMNS, records=records)
        await conn.copy_records_to_table("identity_blocks", columns=("version", "block", "record_id"), records=blocks)
        reviews = [(g.customer_id, cid, s) for g in new_groups for cid, s in sorted(g.reviews.items())]
        # ... and two customers of this file that resemble each other without a MATCH
        reviews += [(a.customer_id, b.customer_id, s) for a, b, s in plan.pairs if a.customer_id != b.customer_id]
        await queue_reviews_many(conn, reviews, self.thresholds.review)
        out: list[Outcome] = []
        for i, row in enumerate(rows):
            g = by_row[i]
            decision = MATCHED if g.joins else POSSIBLE if g.reviews or g.possible else NEW
            out.append(Outcome(row.row, row.key, g.customer_id, decision, g.scores.get(i), row.warnings))
        return out, created

    def _decide(self, identities: list[Identity], scored: list[list[tuple[str, Score]]],
                keys: Sequence[Sequence[str]] | None = None) -> tuple[list[_Group], list[tuple[_Group, _Group, Score]]]:
        """Cluster the batch, then decide per cluster: join the one existing customer its rows MATCH,
        else a new customer with reviews of every possible match (stored or in the file)."""
        clusters = cluster(identities, self.model, self.thresholds, keys=keys)
        members: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(clusters.labels):
            members[label].append(i)
        groups = {label: _Group(m) for label, m in members.items()}
        for i, j, s in clusters.joined:       # a row that joined its cluster reports that score
            later = max(i, j)
            groups[clusters.labels[later]].scores.setdefault(later, s.probability)
        for g in groups.values():
            matched: dict[str, Score] = {}
            for i in g.members:
                decision = self.model.decide(scored[i], self.thresholds, MAX_CANDIDATES)
                if decision.decision == "MATCH":
                    cid, s = decision.candidates[0]
                    if cid not in matched or s.probability > matched[cid].probability:
                        matched[cid] = s
                for cid, s in decision.candidates:
                    if cid not in g.reviews or s.probability > g.reviews[cid].probability:
                        g.reviews[cid] = s
            # The cluster joins the one customer its rows MATCH only if none of its other rows is told
            # apart from that customer by the rules: an undated row MATCHing a father and clustered
            # with his son's row filed the son under the father (online, the undated row alone would
            # have been a POSSIBLE_MATCH). Then: a new customer, with reviews (cid among them).
            cid = next(iter(matched)) if len(matched) == 1 else ""
            if cid and all(s.may_match for i in g.members for c, s in scored[i] if c == cid):
                g.joins, g.customer_id, g.reviews = True, cid, {}
                for i in g.members:
                    own = {c: s for c, s in scored[i]}.get(cid)
                    if own is not None and own.probability >= self.thresholds.review:
                        g.scores[i] = own.probability
            elif g.reviews:
                best = max(s.probability for s in g.reviews.values())
                for i in g.members:
                    g.scores.setdefault(i, best)
        # Two clusters of the file that resemble each other without a MATCH: a person reviews them.
        pairs = [(groups[clusters.labels[i]], groups[clusters.labels[j]], s) for i, j, s in clusters.possible]
        for a, b, s in pairs:
            for g in (a, b):
                if a is not b and not g.joins:
                    g.possible = True
                    for i in g.members:
                        g.scores[i] = max(g.scores.get(i, 0.0), s.probability)
        return list(groups.values()), [p for p in pairs if p[0] is not p[1]]

    @staticmethod
    def _name(identity: Identity) -> str:
        return display_name(identity)[:MAX_NAME] or "(no name)"

    async def _feed(self, conn: Conn, states: dict[str, pb.Customer], created: list[str], joined: list[str]) -> None:
        """Feed events of the batch: `states` holds the created customers; the joined ones' version goes up."""
        states = dict(states)
        if joined:
            for r in await conn.fetch("UPDATE customers SET version = version + 1, updated_at = now()"
                                      " WHERE customer_id = ANY($1::text[]) RETURNING *", joined):
                states[r["customer_id"]] = customer_msg(r)
        # Their version moved: their aliases' profiles and their accounts' answers carry it too (the
        # accounts locked in one pass, in id order, before the keys are read).
        stale = await edges.stale_keys_by_customer(conn, joined)
        now = datetime.now(UTC)
        records = []
        for event, ids in (("customer.created", created), ("customer.record_added", joined)):
            for cid in ids:
                state = states[cid]
                feed = feed_fields(event, state)
                payload = {"source_system": self.system, "decision": "import", "version": state.version}
                # A new customer id was never cached: its row is settled at once. A joined customer's
                # cached answer is stale: the relay deletes its key (throttled by the relay's batches).
                keys = stale[cid] if event == "customer.record_added" else []
                settled = None if keys else now
                records.append((event, "customer", cid, orjson.dumps(payload).decode(), keys, feed.entity_type,
                                feed.op, feed.entity_id, feed.version, state.SerializeToString(), settled, settled))
        # Last in the transaction, as the envelope: the feed sequences (the outbox's seq default) are
        # drawn under FEED_LOCK, held until commit, so they are handed out in commit order.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", FEED_LOCK)
        await conn.copy_records_to_table("outbox", columns=_OUTBOX_COLUMNS, records=records)
        await conn.execute("SELECT pg_notify($1, '')", FEED_CHANNEL)
