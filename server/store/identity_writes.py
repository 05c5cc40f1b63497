"""Writes that identify: CreateCustomer with identity attributes, UpdateCustomerIdentity, and the
review queue they feed (docs/identity.md). Each runs inside the write envelope like every admin write.

Identification inside a write is serialised per blocking key: the transaction takes a
transaction-level advisory lock on each of the new identity's blocking hashes before it searches, so
two concurrent creates of the same person (they share keys) run one after the other and the second
finds the first instead of creating a twin.
"""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg
import orjson

from server import cache_keys as ck
from server.caller import Caller
from server.crypto import ANSWER_PURPOSE, DataKey, Keyring
from server.errors import AlreadyExists, FailedPrecondition, InvalidKey, NotFound, WriteConflict
from server.identity.attributes import AttributeProblem, Identity, SourceRef, has_name, parse_identity, parse_source_ref
from server.identity.golden import REQUEST_FIELDS, display_name, raw_attributes
from server.identity.model import MatchModel, Score, Thresholds
from server.pan import contains_card_number, parse_customer_id
from server.proto import crs_pb2 as pb
from server.store import edges
from server.store.admin import AdminStore, new_id
from server.store.db import Conn, required
from server.store.envelope import Change, WriteResult
from server.store.identity import (
    IdentityCodec,
    candidates,
    evidence_json,
    golden_identity,
    insert_record,
    replace_record,
)
from server.store.messages import customer_msg

IDENTIFY_LOCK = 0x4944          # "ID": the advisory-lock class of blocking-key locks
POLICY_REVIEW = "review"        # POSSIBLE_MATCH: create the customer and queue a review task
POLICY_REFUSE = "refuse"        # POSSIBLE_MATCH: refuse (FAILED_PRECONDITION naming the candidates)
POLICIES = (POLICY_REVIEW, POLICY_REFUSE)
MAX_CANDIDATES = 5


def parse_request_identity(attributes: pb.IdentityAttributes, field: str) -> Identity:
    """`field`: the request's field that holds the attributes, for the messages (`identity.address.country`)."""
    try:
        identity, _ = parse_identity(raw_attributes(attributes), strict=True)
    except AttributeProblem as problem:
        raise InvalidKey(f"{field}.{REQUEST_FIELDS.get(problem.field, problem.field)} {problem.reason}") from None
    if not has_name(identity):
        raise InvalidKey(f"{field} needs a given_name or a family_name")
    return identity


def parse_request_source(ref: pb.SourceRef) -> SourceRef:
    try:
        return parse_source_ref(ref.system, ref.key)
    except AttributeProblem as problem:
        raise InvalidKey(f"{problem.field} {problem.reason}") from None


async def lock_blocks(conn: Conn, blocks: list[int]) -> None:
    """Serialise identification of look-alikes (sorted: two writers never wait on each other in a cycle)."""
    for b in sorted({h & 0x7FFFFFFF for h in blocks}):
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", IDENTIFY_LOCK, b)


_QUEUE_REVIEW = ("INSERT INTO identity_reviews (review_id, customer_id, candidate_id, probability, evidence, status)"
                 " SELECT $1, $2, $3, $4, $5::jsonb, $6 WHERE NOT EXISTS (SELECT 1 FROM identity_distinct"
                 "  WHERE customer_a = LEAST($2, $3) AND customer_b = GREATEST($2, $3))"
                 " ON CONFLICT DO NOTHING")


def review_id() -> str:
    """A new review id: "rev_" and 20 hex digits, drawn again when they hold what `crs pci scan` would
    take for a card number (13+ digits in a row passing Luhn: about one id in 2,000)."""
    while contains_card_number(rid := "rev_" + secrets.token_hex(10)):
        pass
    return rid


def _review_args(customer_id: str, candidate: str, score: Score) -> tuple[object, ...]:
    return (review_id(), customer_id, candidate, score.probability,
            orjson.dumps(evidence_json(score)).decode(), pb.REVIEW_STATUS_OPEN)


async def queue_reviews(conn: Conn, customer_id: str, scored: list[tuple[str, Score]], review: float) -> int:
    """An open review task per candidate at or above the review threshold (one per pair)."""
    n = 0
    for candidate, score in scored:
        if score.probability < review or candidate == customer_id:
            continue
        status = await conn.execute(_QUEUE_REVIEW, *_review_args(customer_id, candidate, score))
        n += status.endswith(" 1")
    return n


async def queue_reviews_many(conn: Conn, pairs: list[tuple[str, str, Score]], review: float) -> None:
    """`queue_reviews` for many (customer, candidate, score) in one round trip (a bulk import's batch)."""
    args = [_review_args(c, candidate, s) for c, candidate, s in pairs
            if s.probability >= review and candidate != c]
    if args:
        await conn.executemany(_QUEUE_REVIEW, args)


async def live_customer(conn: Conn, customer_id: str) -> str:
    """The customer a new record may join, locked so that no merge moves it away before this write
    commits: `customer_id` itself, or, when a merge committed since it was chosen, the survivor that
    merge named (merges keep alias chains one step long). FOR NO KEY UPDATE, the lock the join's version
    bump takes anyway: two joins that each held FOR SHARE deadlocked upgrading it."""
    for _ in range(3):
        merged_into = await conn.fetchval(
            "SELECT merged_into FROM customers WHERE customer_id = $1 FOR NO KEY UPDATE", customer_id)
        if merged_into is None:
            return customer_id
        customer_id = merged_into
    raise WriteConflict("the matched customer kept being merged: retry")


async def add_record(conn: Conn, codec: IdentityCodec, *, customer_id: str, source: SourceRef,
                     identity: Identity) -> int:
    """`insert_record`, with a source reference a concurrent write took first answered ALREADY_EXISTS."""
    try:
        return await insert_record(conn, codec, customer_id=customer_id, source=source, identity=identity)
    except asyncpg.UniqueViolationError as exc:
        if exc.table_name != "source_records":
            raise
        raise AlreadyExists(f"source reference {source.system}/{source.key} was just filed by another write") \
            from None


class IdentityWrites(AdminStore):
    """AdminStore whose CreateCustomer identifies when it is given identity attributes."""

    def __init__(self, *, pool: asyncpg.Pool, keyring: Keyring, data_key: DataKey, timeout: float,
                 codec: IdentityCodec, model: MatchModel, thresholds: Thresholds, policy: str) -> None:
        super().__init__(pool=pool, keyring=keyring, data_key=data_key, timeout=timeout)
        self.codec = codec
        self.model = model
        self.thresholds = thresholds
        self.policy = policy

    async def create_customer(self, req: pb.CreateCustomerRequest, caller: Caller) -> WriteResult:
        if not req.HasField("identity") and not req.HasField("source_ref"):
            return await super().create_customer(req, caller)
        identity = parse_request_identity(req.identity, "identity")
        if not req.HasField("source_ref"):
            raise InvalidKey("source_ref is required with identity attributes (the record in your system)")
        source = parse_request_source(req.source_ref)
        name, segment, kyc = self.customer_fields(req, display_name(identity))

        async def body(conn: Conn) -> Change:
            sealed_blocks = self.codec.blocks(identity)
            await lock_blocks(conn, sealed_blocks)
            owner = await conn.fetchval("SELECT customer_id FROM source_records WHERE source_system = $1"
                                        " AND source_key = $2", source.system, source.key)
            if owner is not None:
                raise AlreadyExists(f"source reference {source.system}/{source.key} already belongs to {owner}")
            scored = [] if req.force_new else await candidates(conn, self.codec, self.model, identity)
            decision = self.model.decide(scored, self.thresholds, MAX_CANDIDATES)
            if decision.decision == "MATCH":
                cid = await live_customer(conn, decision.candidates[0][0])
                await add_record(conn, self.codec, customer_id=cid, source=source, identity=identity)
                row = required(await conn.fetchrow(
                    "UPDATE customers SET version = version + 1, updated_at = now() WHERE customer_id = $1"
                    " RETURNING *", cid))
                # Its version moved: the answers of its accounts carry it, as its profile does.
                return Change(customer_msg(row), await edges.stale_keys_for_customers(conn, [cid]),
                              "customer.record_added",
                              "customer", cid,
                              {"source_system": source.system, "decision": "match", "version": row["version"]})
            if decision.decision == "POSSIBLE_MATCH" and self.policy == POLICY_REFUSE:
                listed = ", ".join(f"{c} ({s.probability:.3f})" for c, s in decision.candidates)
                raise FailedPrecondition(f"possible match with {listed}: review them with IdentifyCustomer,"
                                         " then merge or create with force_new")
            row = required(await conn.fetchrow(
                "INSERT INTO customers (customer_id, display_name, segment, status, kyc_status)"
                " VALUES ($1, $2, $3, $4, $5) RETURNING *",
                new_id("cus_"), name, segment, pb.CUSTOMER_STATUS_ACTIVE, kyc))
            cid = row["customer_id"]
            await add_record(conn, self.codec, customer_id=cid, source=source, identity=identity)
            queued = await queue_reviews(conn, cid, list(decision.candidates), self.thresholds.review)
            return Change(customer_msg(row), [ck.customer_key(cid)], "customer.created", "customer", cid,
                          {"segment": segment, "kyc_status": kyc, "source_system": source.system,
                           "decision": "possible_match" if queued else "new", "reviews": queued})

        return await self._write("CreateCustomer", req, body, caller)

    def seal_answer(self, response: bytes) -> tuple[bytes, int]:
        return self.codec.data_key.seal(response, purpose=ANSWER_PURPOSE), self.codec.data_key.dek_id

    async def open_answer(self, conn: Conn, blob: bytes, dek_id: int) -> bytes:
        return (await self.codec.data_key_for(conn, dek_id)).open(bytes(blob), purpose=ANSWER_PURPOSE)

    async def update_customer_identity(self, req: pb.UpdateCustomerIdentityRequest, caller: Caller) -> WriteResult:
        customer_id = parse_customer_id(req.customer_id)
        source = parse_request_source(req.source_ref)
        identity = parse_request_identity(req.attributes, "attributes")

        async def body(conn: Conn) -> Change:
            await lock_blocks(conn, self.codec.blocks(identity))
            cur = await conn.fetchrow("SELECT * FROM customers WHERE customer_id = $1 FOR UPDATE", customer_id)
            if cur is None:
                raise NotFound("customer not found")
            if cur["merged_into"]:
                raise FailedPrecondition(f"customer was merged into {cur['merged_into']}: update that one")
            rec = await conn.fetchrow("SELECT record_id, customer_id FROM source_records WHERE source_system = $1"
                                      " AND source_key = $2 FOR UPDATE", source.system, source.key)
            if rec is not None and rec["customer_id"] != customer_id:
                raise FailedPrecondition(f"source reference {source.system}/{source.key} belongs to"
                                         f" {rec['customer_id']}, not to this customer")
            if rec is None:
                await add_record(conn, self.codec, customer_id=customer_id, source=source, identity=identity)
            else:
                await replace_record(conn, self.codec, rec["record_id"], identity)
            # Identifying attributes changed: another customer may now look like the same person. Two
            # existing customers are never merged automatically; a person reviews the pair.
            scored = await candidates(conn, self.codec, self.model, identity, exclude=customer_id)
            queued = await queue_reviews(conn, customer_id, scored, self.thresholds.review)
            row = required(await conn.fetchrow(
                "UPDATE customers SET version = version + 1, updated_at = now() WHERE customer_id = $1 RETURNING *",
                customer_id))
            answer = await golden_identity(conn, self.codec, customer_id)
            # No date of birth in the answer (the national id is already last-four only);
            # GetCustomerIdentity reads the whole record. The rest (address, phone, email) is kept
            # for replays sealed under the data key.
            answer.attributes.date_of_birth = ""
            payload: dict[str, Any] = {"source_system": source.system, "reviews": queued, "version": row["version"]}
            stale = await edges.stale_keys_for_customers(conn, [customer_id])
            return Change(answer, stale, "customer.identity_updated", "customer", customer_id, payload,
                          feed_state=customer_msg(row), sealed=True)

        return await self._write("UpdateCustomerIdentity", req, body, caller)
