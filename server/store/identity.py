"""Customer identity in PostgreSQL: source records (sealed), blocking keys, candidate search, the
golden record and the crosswalk (docs/identity.md). Writes that use these live in
server/store/identity_writes.py (create, update) and server/store/merge.py (merge, unmerge, reviews).

A source record's attributes are stored as one AES-256-GCM ciphertext of its normalised JSON under a
data key; its national id also as a keyed fingerprint (exact-match index) and last four; its
blocking keys as keyed 64-bit hashes. Candidate search: the query's blocking hashes -> the records
sharing one (a block bigger than MAX_BLOCK is skipped, unless its records are one customer's) ->
every record of those records' customers -> decrypt and score each customer by its best record.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from server.crypto import IDENTITY_PURPOSE, DataKey, Keyring
from server.errors import FailedPrecondition, NotFound
from server.identity.attributes import Identity, SourceRef
from server.identity.blocking import MAX_BLOCK, block_hashes
from server.identity.golden import Contribution, attributes_msg, golden
from server.identity.model import Decision, MatchModel, Score, Thresholds
from server.proto import crs_pb2 as pb
from server.rpc import ANSWER_MAX_BYTES
from server.store.db import Conn, acquire, translate_db_errors

MAX_CANDIDATE_CUSTOMERS = 50   # scored per query at most (the blocks' best are kept, see `candidates`)


@dataclass(frozen=True)
class SealedRecord:
    """An identity ready to store: nothing in it is clear PII."""

    fingerprint_version: int
    national_id_fp: bytes | None
    national_id_last4: str | None
    ciphertext: bytes
    dek_id: int
    blocks: list[int]                       # under the current fingerprint version (what search uses)
    block_rows: list[tuple[int, int]]       # (version, hash) under every configured version: what is stored
    next_fingerprint_version: int | None    # a rotation target, when one is configured
    next_national_id_fp: bytes | None


class IdentityCodec:
    """Seals identities for storage and opens stored ones (data keys unwrapped on first use)."""

    def __init__(self, *, keyring: Keyring, data_key: DataKey) -> None:
        self.keyring = keyring
        self.data_key = data_key
        self._deks: dict[int, DataKey] = {data_key.dek_id: data_key}

    @property
    def version(self) -> int:
        return self.keyring.fingerprint_version

    def blocks(self, identity: Identity, version: int | None = None, keys: Sequence[str] | None = None) -> list[int]:
        return block_hashes(self.keyring.fingerprint_keys[version or self.version], identity, keys)

    def national_id_fp(self, identity: Identity, version: int | None = None) -> bytes | None:
        key = identity.national_id_key
        return self.keyring.fingerprint(key, version) if key else None

    def seal(self, identity: Identity, keys: Sequence[str] | None = None) -> SealedRecord:
        """Blocks under every configured version: during a key rotation a node on either version
        finds what the other wrote (the rotation fills in the records written before).
        `keys`: the identity's blocking_keys when the caller has them."""
        current = self.blocks(identity, keys=keys)
        rows = [(self.version, h) for h in current]
        for v in sorted(self.keyring.fingerprint_keys):
            if v != self.version:
                rows += [(v, h) for h in self.blocks(identity, v, keys)]
        target = self.keyring.rotation_target
        return SealedRecord(
            fingerprint_version=self.version, national_id_fp=self.national_id_fp(identity),
            national_id_last4=identity.national_id_last4 or None,
            ciphertext=self.data_key.seal(orjson.dumps(identity.to_dict()), purpose=IDENTITY_PURPOSE),
            dek_id=self.data_key.dek_id, blocks=current, block_rows=rows, next_fingerprint_version=target,
            next_national_id_fp=self.national_id_fp(identity, target) if target else None)

    async def data_key_for(self, conn: Conn, dek_id: int) -> DataKey:
        """Data key `dek_id`, unwrapped with the KEK on first use."""
        dek = self._deks.get(dek_id)
        if dek is None:
            row = await conn.fetchrow("SELECT wrapped_key, kek_version FROM data_keys WHERE dek_id = $1", dek_id)
            if row is None:
                raise RuntimeError(f"data key {dek_id} of an identity record is missing")
            dek = self._deks[dek_id] = DataKey(dek_id, self.keyring.unwrap(row["wrapped_key"], dek_id,
                                                                           row["kek_version"]))
        return dek

    async def open(self, conn: Conn, ciphertext: bytes, dek_id: int) -> Identity:
        dek = await self.data_key_for(conn, dek_id)
        return Identity.from_dict(orjson.loads(dek.open(bytes(ciphertext), purpose=IDENTITY_PURPOSE)))


async def insert_record(conn: Conn, codec: IdentityCodec, *, customer_id: str, source: SourceRef,
                        identity: Identity) -> int:
    """A new source record of `customer_id` with its blocking keys; returns its record id."""
    sealed = codec.seal(identity)
    record_id = int(await conn.fetchval(
        "INSERT INTO source_records (source_system, source_key, customer_id, home_customer_id,"
        " fingerprint_version, national_id_fp, national_id_last4, attributes_ciphertext, dek_id,"
        " next_fingerprint_version, next_national_id_fp)"
        " VALUES ($1, $2, $3, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING record_id",
        source.system, source.key, customer_id, sealed.fingerprint_version, sealed.national_id_fp,
        sealed.national_id_last4, sealed.ciphertext, sealed.dek_id, sealed.next_fingerprint_version,
        sealed.next_national_id_fp))
    await store_blocks(conn, record_id, sealed.block_rows)
    return record_id


async def store_blocks(conn: Conn, record_id: int, rows: list[tuple[int, int]]) -> None:
    await conn.executemany("INSERT INTO identity_blocks (version, block, record_id) VALUES ($1, $2, $3)"
                           " ON CONFLICT DO NOTHING", [(v, b, record_id) for v, b in rows])


async def replace_record(conn: Conn, codec: IdentityCodec, record_id: int, identity: Identity) -> None:
    """New attributes for an existing record (its blocking keys follow)."""
    sealed = codec.seal(identity)
    await conn.execute(
        "UPDATE source_records SET fingerprint_version = $2, national_id_fp = $3, national_id_last4 = $4,"
        " attributes_ciphertext = $5, dek_id = $6, next_fingerprint_version = $7, next_national_id_fp = $8,"
        " version = version + 1, updated_at = now() WHERE record_id = $1",
        record_id, sealed.fingerprint_version, sealed.national_id_fp, sealed.national_id_last4,
        sealed.ciphertext, sealed.dek_id, sealed.next_fingerprint_version, sealed.next_national_id_fp)
    await conn.execute("DELETE FROM identity_blocks WHERE record_id = $1", record_id)
    await store_blocks(conn, record_id, sealed.block_rows)


async def contributions(conn: Conn, codec: IdentityCodec, customer_ids: list[str]) -> dict[str, list[Contribution]]:
    """Every source record of these customers, opened."""
    rows = await conn.fetch(
        "SELECT record_id, customer_id, attributes_ciphertext, dek_id, updated_at FROM source_records"
        " WHERE customer_id = ANY($1::text[])", customer_ids)
    out: dict[str, list[Contribution]] = defaultdict(list)
    for r in rows:
        identity = await codec.open(conn, r["attributes_ciphertext"], r["dek_id"])
        out[r["customer_id"]].append(Contribution(identity, r["updated_at"], r["record_id"]))
    return out


_BLOCK_MEMBERS = ("SELECT b.k AS block, r.record_id, r.customer_id FROM unnest($1::bigint[]) AS b(k),"
                  " LATERAL (SELECT s.record_id, s.customer_id"
                  "          FROM identity_blocks ib JOIN source_records s USING (record_id)"
                  "          WHERE ib.version = $3 AND ib.block = b.k LIMIT $2) r")


def _chosen(hashes: list[int], per_block: dict[int, dict[int, str]], exclude: str = "",
            limit: int | None = MAX_CANDIDATE_CUSTOMERS) -> list[str]:
    """The customers sharing a (not too common) block with a query, those sharing the most keys first:
    they are the likely matches when blocks are crowded. A block crowded by one customer's records
    alone (a person a source system holds thousands of records of) names that customer: skipped, the
    person's next record found no one and became a customer of its own, every time, with no review
    (docs/audit-2026-12-04.md, "Twentieth audit")."""
    hits: dict[str, int] = defaultdict(int)
    for h in hashes:
        members = per_block.get(h)
        if members is None:
            continue
        customers = set(members.values())
        if len(members) <= MAX_BLOCK or len(customers) == 1:
            for cid in customers:
                hits[cid] += 1
    hits.pop(exclude, None)
    return sorted(hits, key=lambda c: (-hits[c], c))[:limit]


async def _block_members(conn: Conn, hashes: list[int], version: int) -> dict[int, dict[int, str]]:
    """Per block: record id -> customer id of its records. At most MAX_BLOCK + 1 records: a block that
    fills them is too common and is skipped, unless they are all one customer's (`_chosen`)."""
    per_block: dict[int, dict[int, str]] = defaultdict(dict)
    for block, record_id, customer_id in await conn.fetch(_BLOCK_MEMBERS, hashes, MAX_BLOCK + 1, version):
        per_block[block][record_id] = customer_id
    return per_block


def _score(model: MatchModel, identity: Identity, chosen: list[str],
           records: dict[str, list[Identity]]) -> list[tuple[str, Score]]:
    scored: list[tuple[str, Score]] = []
    for cid in chosen:
        best = model.best(identity, records.get(cid, ()))
        if best is not None:
            scored.append((cid, best))
    return scored


async def candidates(conn: Conn, codec: IdentityCodec, model: MatchModel, identity: Identity, *,
                     exclude: str = "") -> list[tuple[str, Score]]:
    """Existing customers that share a blocking key with `identity`, each with its best score.
    `exclude`: a customer id not to propose (the one being updated), nor any pair a person rejected."""
    hashes = codec.blocks(identity)
    if not hashes:
        return []
    chosen = _chosen(hashes, await _block_members(conn, hashes, codec.version), exclude, None)
    if exclude and chosen:
        distinct = {r["customer_b"] if r["customer_a"] == exclude else r["customer_a"] for r in await conn.fetch(
            "SELECT customer_a, customer_b FROM identity_distinct WHERE (customer_a = $1 AND customer_b = ANY($2))"
            " OR (customer_b = $1 AND customer_a = ANY($2))", exclude, chosen)}
        chosen = [c for c in chosen if c not in distinct]
    chosen = chosen[:MAX_CANDIDATE_CUSTOMERS]
    return _score(model, identity, chosen, _identities(await contributions(conn, codec, chosen)))


def _identities(records: dict[str, list[Contribution]]) -> dict[str, list[Identity]]:
    """Each customer's distinct identities: a customer's best score is its best record's, and a person
    with thousands of records holds few distinct ones (each was scored, a second's work a batch)."""
    return {cid: list(dict.fromkeys(c.identity for c in cs)) for cid, cs in records.items()}


class Unwritten:
    """Records whose commit the search may or may not see: a bulk import's previous batch, written
    while the next batch's candidates are searched. The search adds those PostgreSQL did not answer
    (by record id: the transaction may commit between its statements), so it finds what it would
    find after that batch's commit (`candidates_many`)."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[int, str]] = defaultdict(dict)                 # hash -> record -> customer
        self.records: dict[str, dict[int, Identity]] = defaultdict(dict)           # customer -> record -> identity

    def add(self, record_id: int, customer_id: str, identity: Identity, blocks: Sequence[int]) -> None:
        """A record of `customer_id` (a new customer or an existing one it joins); `blocks`: its
        hashes under the current fingerprint version."""
        self.records[customer_id][record_id] = identity
        for h in blocks:
            self.blocks[h][record_id] = customer_id


async def candidates_many(conn: Conn, codec: IdentityCodec, model: MatchModel, identities: list[Identity],
                          hashes: list[list[int]] | None = None, unwritten: Unwritten | None = None
                          ) -> list[list[tuple[str, Score]]]:
    """`candidates` for a batch (a bulk import): the blocks of every identity in one query, every
    candidate customer's records in one more, then each identity scored as `candidates` scores it.
    `hashes`: the identities' blocking hashes when the caller has them (sealed records carry them).
    `unwritten`: records to count as stored (see Unwritten). A block's members from PostgreSQL are
    complete unless there are more than MAX_BLOCK of them, in which case the block is skipped with or
    without the unwritten ones: adding them changes no decision but the one a commit would change."""
    hashes = hashes if hashes is not None else [codec.blocks(i) for i in identities]
    every = sorted({h for hs in hashes for h in hs})
    per_block = await _block_members(conn, every, codec.version) if every else {}
    if unwritten is not None:
        for h in every:
            if h in unwritten.blocks:
                per_block[h] = unwritten.blocks[h] | per_block.get(h, {})
    chosen = [_chosen(hs, per_block) for hs in hashes]
    wanted = sorted({cid for cs in chosen for cid in cs})
    stored = await contributions(conn, codec, wanted) if wanted else {}
    records = _identities(stored)
    if unwritten is not None:
        for cid in wanted:
            if cid in unwritten.records:
                seen = {c.record_id for c in stored.get(cid, ())}
                records[cid] = list(dict.fromkeys([*records.get(cid, []),
                                                   *(i for r, i in unwritten.records[cid].items() if r not in seen)]))
    # A batch's rows with the same attributes and candidates are scored once.
    done: dict[tuple[Identity, tuple[str, ...]], list[tuple[str, Score]]] = {}
    for identity, cs in zip(identities, chosen, strict=True):
        if (identity, tuple(cs)) not in done:
            done[identity, tuple(cs)] = _score(model, identity, cs, records)
    return [done[identity, tuple(cs)] for identity, cs in zip(identities, chosen, strict=True)]


async def golden_identity(conn: Conn, codec: IdentityCodec, customer_id: str) -> pb.CustomerIdentity:
    """A customer's golden record (survivorship over its source records), its crosswalk and aliases."""
    records = (await contributions(conn, codec, [customer_id])).get(customer_id, [])
    refs = await conn.fetch("SELECT source_system, source_key FROM source_records WHERE customer_id = $1"
                            " ORDER BY source_system, source_key", customer_id)
    aliases = await conn.fetch("SELECT customer_id FROM customers WHERE merged_into = $1 ORDER BY customer_id",
                               customer_id)
    return pb.CustomerIdentity(
        customer_id=customer_id, attributes=attributes_msg(golden(records)),
        source_refs=[pb.SourceRef(system=r["source_system"], key=r["source_key"]) for r in refs],
        merged_ids=[a["customer_id"] for a in aliases])


def evidence_msgs(score: Score) -> list[pb.AttributeEvidence]:
    return [pb.AttributeEvidence(attribute=e.attribute, level=e.level, weight=round(e.weight, 3))
            for e in score.evidence]


def evidence_json(score: Score) -> list[dict[str, Any]]:
    return [{"attribute": e.attribute, "level": e.level, "weight": round(e.weight, 3)} for e in score.evidence]


def decision_msg(decision: Decision, model: MatchModel) -> pb.IdentifyCustomerResponse:
    names = {"MATCH": pb.MATCH_DECISION_MATCH, "POSSIBLE_MATCH": pb.MATCH_DECISION_POSSIBLE_MATCH,
             "NEW": pb.MATCH_DECISION_NEW}
    return pb.IdentifyCustomerResponse(
        decision=names[decision.decision], model_version=model.version,
        candidates=[pb.MatchCandidate(customer_id=cid, probability=s.probability,
                                      match_weight=round(s.match_weight, 3), evidence=evidence_msgs(s), rule=s.rule)
                    for cid, s in decision.candidates])


class IdentityReads:
    """Identification and the read side of identity: golden record, crosswalk, source refs."""

    def __init__(self, *, pool: asyncpg.Pool, codec: IdentityCodec, model: MatchModel, thresholds: Thresholds,
                 timeout: float) -> None:
        self.pool = pool
        self.codec = codec
        self.model = model
        self.thresholds = thresholds
        self.timeout = timeout

    async def identify(self, identity: Identity, limit: int) -> Decision:
        with translate_db_errors():
            async with acquire(self.pool, self.timeout) as conn:
                scored = await candidates(conn, self.codec, self.model, identity)
        return self.model.decide(scored, self.thresholds, limit)

    async def resolve_source_ref(self, ref: SourceRef) -> pb.ResolveSourceRefResponse:
        with translate_db_errors():
            row = await self.pool.fetchrow(
                "SELECT s.home_customer_id, coalesce(c.merged_into, s.customer_id) AS customer_id"
                " FROM source_records s JOIN customers c ON c.customer_id = s.customer_id"
                " WHERE s.source_system = $1 AND s.source_key = $2", ref.system, ref.key, timeout=self.timeout)
        if row is None:
            raise NotFound("no customer has this source reference")
        home = row["home_customer_id"]
        return pb.ResolveSourceRefResponse(customer_id=row["customer_id"],
                                           merged_from=home if home != row["customer_id"] else "")

    async def customer_identity(self, customer_id: str) -> pb.CustomerIdentity:
        """The golden record of `customer_id`, or of its survivor when it was merged."""
        with translate_db_errors():
            async with acquire(self.pool, self.timeout) as conn:
                row = await conn.fetchrow("SELECT customer_id, merged_into FROM customers WHERE customer_id = $1",
                                          customer_id)
                if row is None:
                    raise NotFound("customer not found")
                survivor = row["merged_into"] or customer_id
                answer = await golden_identity(conn, self.codec, survivor)
        if survivor != customer_id:
            answer.merged_from = customer_id
        if answer.ByteSize() > ANSWER_MAX_BYTES - 1024:   # room for what a batch wraps an answer in
            # A client's library would refuse it unexplained (RESOURCE_EXHAUSTED): about 60,000 source
            # records, which a source system's records of one person can make (twentieth audit).
            raise FailedPrecondition(
                f"customer {survivor}'s golden record, with {len(answer.source_refs):,} source records and"
                f" {len(answer.merged_ids):,} merged customers, is larger than the {ANSWER_MAX_BYTES // 2**20} MiB"
                " an answer may be")
        return answer
