"""The write envelope: one PostgreSQL transaction per admin write, with its outbox row, its
idempotency record and its audit row.

Every write (server/store/admin.py) hands a body that changes rows and returns a `Change`; the
envelope commits it together with the outbox row (the relay's retry list and the change feed, whose
sequence it draws last, under FEED_LOCK, so that sequence order is commit order) and answers a
retried `request_id` with the stored response instead of writing twice; the same request_id with
other arguments is refused (ALREADY_EXISTS), told apart by an HMAC of the request under the fingerprint
key (`request_digest`). A refused or failed write is audited too (`audit_failure`), after its
transaction rolled back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from google.protobuf.message import Message

from server.caller import Caller
from server.crypto import Keyring
from server.errors import AlreadyExists, CommitLost, InvalidKey, WriteOutcomeUnknown
from server.feed.events import feed_fields
from server.pan import contains_card_number, is_safe_id, redact_digits
from server.store.db import COMMIT_LOST, Conn, acquire, one_node_in_batches, translate_db_errors

_ID_FIELDS = ("customer_id", "account_id", "owner")
_REQUEST_ID_FIELDS = ("customer_id", "account_id", "card_token", "owner_customer_id", "survivor_id", "merged_id")
MAX_REQUEST_ID = 128
FEED_LOCK = 0x43525346      # "CRSF": the transaction-level lock feed sequences are drawn under
FEED_CHANNEL = "crs_feed"   # NOTIFY on commit wakes every node's feed tailer
REQUEST_LOCK = 0x43525352   # "CRSR": with a request_id's hash, the lock a write and its retries queue on
PRUNE_LOCK = 0x43525350     # "CRSP": one node at a time prunes the idempotency table


@dataclass(frozen=True)
class WriteResult:
    response: bytes
    stale_keys: list[str]
    outbox_id: int | None   # None when a retried request_id returned the stored answer


@dataclass(frozen=True)
class Change:
    """What a write body hands back: the answer, the keys it made stale, the event for the outbox."""

    response: Message
    stale_keys: list[str]
    event_type: str
    entity_type: str
    entity_id: str
    payload: dict[str, Any]
    # Other entities the same transaction changed, as (event type, state after): each is one more
    # feed event, right after the main one (e.g. the OWNER relationship CreateAccount makes).
    also: tuple[tuple[str, Message], ...] = ()
    # The entity the feed publishes when it is not the answer (UpdateCustomerIdentity answers the
    # golden record, which is PII; the feed carries the Customer).
    feed_state: Message | None = None
    # The answer holds personal data (UpdateCustomerIdentity's golden record): the idempotency table
    # keeps it sealed under the data key, as the source records are.
    sealed: bool = False
    # Nothing was written (a LinkCustomer repeating the role held): no feed event and no stale key, an
    # answer and an audit row only (WriteResult.outbox_id None, as a replay's).
    unchanged: bool = False


Body = Callable[[Conn], Awaitable[Change]]
Request = Message     # an admin write's request: its request_id field and what it asks


def request_lock_key(request_id: str) -> int:
    """A request_id's advisory lock key (32 bits: another id sharing it only waits a little longer)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=4).digest(), "big", signed=True)


def request_digest(keyring: Keyring, req: Request, version: int) -> bytes:
    """What `req` asks, without its request_id (and fields this node does not know): the same for a
    retry of it, whatever the client's encoding. Keyed, because a request may carry a PAN or a
    national id, whose unkeyed hash may not be stored."""
    asked = type(req)()
    asked.CopyFrom(req)
    asked.ClearField("request_id")
    asked.DiscardUnknownFields()
    return keyring.fingerprint(asked.SerializeToString(deterministic=True).hex(), version)


def printable(text: str) -> str:
    """`text` with each character that is not printable (a NUL, a line break, an escape) as U+FFFD."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "\ufffd" for c in text)


def commit_lost(request_id: str) -> CommitLost | WriteOutcomeUnknown:
    """What a write answers when the connection went during its COMMIT: PostgreSQL may have applied it.
    With a request_id, UNAVAILABLE: the recommended channel retries it, and the retry answers the first
    write's result if it was applied (writes it if not). Without one a retry could write twice, so
    DEADLINE_EXCEEDED ("may have completed"), which nothing retries on its own (docs/decisions.md,
    "A write's lost COMMIT")."""
    if request_id:
        return CommitLost("the database was lost while the write committed, so it may have been applied:"
                                  " retry with the same request_id, which answers its result if it was")
    return WriteOutcomeUnknown("the database was lost while the write committed: it may have been applied. It"
                               " carried no request_id, so it was not retried: read it back before writing"
                               " again, and send a request_id with every write (a retry then answers the first"
                               " write's result)")


class WriteEnvelope:
    def __init__(self, *, pool: asyncpg.Pool, keyring: Keyring, timeout: float) -> None:
        self.pool = pool
        self.keyring = keyring
        self.timeout = timeout

    async def _write(self, rpc: str, req: Request, body: Body, caller: Caller) -> WriteResult:
        request_id = getattr(req, "request_id", "")
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidKey(f"request_id is longer than {MAX_REQUEST_ID} characters")
        if getattr(req, "expected_version", 0) < 0:   # 0: no check; below it no version at all, never ABORTED
            raise InvalidKey("expected_version must be 0 (no check) or the version the write was prepared from")
        if not request_id.isprintable():   # a NUL PostgreSQL cannot store; line breaks and escapes in the audit log
            raise InvalidKey("request_id contains control characters")
        if contains_card_number(request_id):   # it is kept in clear (idempotency, audit log)
            raise InvalidKey("request_id looks like a card number (13-19 digits passing the Luhn check)")
        with translate_db_errors():
            async with acquire(self.pool, self.timeout) as conn:
                if request_id:
                    stored = await self._replay(conn, rpc, req, caller)
                    if stored is not None:
                        return stored
                committing = False   # set once the body is done: an error from then on is the COMMIT's
                try:
                    async with conn.transaction():
                        result = await self._in_transaction(conn, rpc, req, body, caller, request_id)
                        committing = True
                except COMMIT_LOST as exc:
                    if committing:
                        raise commit_lost(request_id) from exc
                    raise
                return result

    async def _in_transaction(self, conn: Conn, rpc: str, req: Request, body: Body, caller: Caller,
                              request_id: str) -> WriteResult:
        if request_id:
            # Claimed first: a retry that arrives while the original is still running waits
            # here for its commit and then replays its answer (or, if it rolled back, writes).
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", REQUEST_LOCK,
                               request_lock_key(request_id))
            stored = await self._replay(conn, rpc, req, caller)
            if stored is not None:
                return stored
        change = await body(conn)
        response = change.response.SerializeToString()
        outbox_id = None if change.unchanged else int(await conn.fetchval("SELECT nextval('outbox_id_seq')"))
        if request_id:
            version = self.keyring.fingerprint_version
            kept, dek_id = self.seal_answer(response) if change.sealed else (response, None)
            await conn.execute(
                "INSERT INTO idempotency (request_id, rpc, response, request_digest, digest_version,"
                " answer_dek_id, client_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                request_id, rpc, kept, request_digest(self.keyring, req, version), version, dek_id,
                caller.client_id)
        related = [v for k, v in change.payload.items() if k in _ID_FIELDS and isinstance(v, str)]
        await self._audit(conn, caller, rpc, request_id, change.entity_type,
                          [change.entity_id, *related], "OK" if outbox_id else "OK_UNCHANGED", outbox_id)
        if outbox_id is None:
            return WriteResult(response, [], None)
        state = change.feed_state.SerializeToString() if change.feed_state else response
        await self._append_to_feed(conn, outbox_id, change, state)
        return WriteResult(response, change.stale_keys, outbox_id)

    def seal_answer(self, response: bytes) -> tuple[bytes, int]:
        """An answer that holds personal data, sealed for the idempotency table: (blob, data key id)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no sealed answers")

    async def open_answer(self, conn: Conn, blob: bytes, dek_id: int) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} keeps no sealed answers")

    @staticmethod
    async def _append_to_feed(conn: Conn, outbox_id: int, change: Change, state: bytes) -> None:
        """The outbox rows, last in the transaction: their feed sequences are drawn under FEED_LOCK,
        held until commit, so sequences are handed out in commit order, the events of one write are
        consecutive, and a reader always sees a prefix of them. Everything that may wait (row locks,
        idempotency, audit) happens before the lock."""
        feed = feed_fields(change.event_type, change.feed_state or change.response)
        await conn.execute("SELECT pg_advisory_xact_lock($1)", FEED_LOCK)
        await conn.execute(
            "INSERT INTO outbox (id, seq, event_type, entity_type, entity_id, payload, cache_keys,"
            " feed_type, feed_op, feed_id, feed_version, state)"
            " VALUES ($1, nextval('feed_seq'), $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11)",
            outbox_id, change.event_type, change.entity_type, change.entity_id,
            orjson.dumps(change.payload).decode(), sorted(set(change.stale_keys)),
            feed.entity_type, feed.op, feed.entity_id, feed.version, state)
        # Feed-only rows: the main row carries the write's cache keys, so these are settled at once. One
        # executemany (pipelined, in order): a merge of thousands of accounts has twice as many, and a
        # round trip each held FEED_LOCK, every other write's commit, for seconds.
        rows = []
        for event_type, message in change.also:
            extra = feed_fields(event_type, message)
            rows.append((event_type, event_type.partition(".")[0], extra.entity_id, extra.entity_type, extra.op,
                         extra.entity_id, extra.version, message.SerializeToString()))
        if rows:
            await conn.executemany(
                "INSERT INTO outbox (seq, event_type, entity_type, entity_id, feed_type, feed_op, feed_id,"
                " feed_version, state, invalidated_at, settled_at)"
                " VALUES (nextval('feed_seq'), $1, $2, $3, $4, $5, $6, $7, $8, clock_timestamp(), clock_timestamp())",
                rows)
        await conn.execute("SELECT pg_notify($1, '')", FEED_CHANNEL)

    async def _replay(self, conn: Conn, rpc: str, req: Request, caller: Caller) -> WriteResult | None:
        request_id = getattr(req, "request_id", "")
        stored = await self._stored_answer(conn, rpc, req, caller)
        if stored is None:
            return None
        await self._audit(conn, caller, rpc, request_id, None, [], "OK_REPLAYED", None)
        return WriteResult(stored, [], None)

    @staticmethod
    async def _audit(conn: Conn, caller: Caller, rpc: str, request_id: str, entity_type: str | None,
                     entity_ids: list[str], result: str, outbox_id: int | None) -> None:
        await conn.execute(
            "INSERT INTO audit_log (client_id, via, rpc, request_id, entity_type, entity_ids, result, outbox_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            caller.client_id, caller.via, rpc, redact_digits(request_id) or None, entity_type, entity_ids, result,
            outbox_id)

    async def audit_failure(self, caller: Caller, rpc: str, request: Any, result: str) -> None:
        """Record a refused or failed write (its transaction, if any, rolled back)."""
        ids = [getattr(request, f) for f in _REQUEST_ID_FIELDS if getattr(request, f, "")]
        # Only well-formed ids holding no card number: a refused field may be anything, a pasted card
        # number included ("cus_<PAN>" is well-formed); digit runs masked all the same.
        ids = [redact_digits(i) for i in ids if isinstance(i, str) and is_safe_id(i)]
        # Masked before it is cut: a card number across the cut would leave its first digits unmasked. Its
        # first 8 x MAX_REQUEST_ID characters only (redact_digits is not linear on megabytes of digit groups).
        request_id = printable(redact_digits(getattr(request, "request_id", "")[:8 * MAX_REQUEST_ID]))
        with translate_db_errors():
            async with acquire(self.pool, self.timeout) as conn:
                await self._audit(conn, caller, rpc, request_id[:MAX_REQUEST_ID], None, ids, result, None)

    async def _stored_answer(self, conn: Conn, rpc: str, req: Request, caller: Caller) -> bytes | None:
        """The answer `caller` got for this request_id (migration 0017: a request_id is its client's; a
        row from before names none and is anyone's), or None."""
        row = await conn.fetchrow("SELECT rpc, response, request_digest, digest_version, answer_dek_id FROM idempotency"
                                  " WHERE request_id = $1 AND client_id IN ($2, '') ORDER BY client_id DESC LIMIT 1",
                                  getattr(req, "request_id", ""), caller.client_id)
        if row is None:
            return None
        if row["rpc"] != rpc:
            raise AlreadyExists(f"request_id was already used for {row['rpc']}")
        # Checked while the key it was made under is configured (a row from before 0009 has none).
        version = row["digest_version"]
        if version in self.keyring.fingerprint_keys and not hmac.compare_digest(
                row["request_digest"], request_digest(self.keyring, req, version)):
            raise AlreadyExists(f"request_id was already used for {rpc} with other arguments: a retry must repeat"
                                " the request as it was; a new request needs a new request_id")
        response: bytes = row["response"]
        if row["answer_dek_id"] is not None:
            return await self.open_answer(conn, response, row["answer_dek_id"])
        return response

    async def mark_invalidated(self, outbox_id: int) -> None:
        with translate_db_errors():
            await self.pool.execute("UPDATE outbox SET invalidated_at = clock_timestamp() WHERE id = $1",
                                    outbox_id, timeout=self.timeout)


async def prune_idempotency(pool: asyncpg.Pool, *, older_than: dt.timedelta, batch: int = 5_000) -> int:
    """Delete idempotency rows older than `older_than`, oldest first, `batch` rows a transaction (each
    short: writes never wait long on it). A retry after that answers as a new request. Returns how
    many rows went; 0 when another node is at it."""
    async def step(conn: Conn) -> tuple[int, bool]:
        status = await conn.execute(
            "DELETE FROM idempotency WHERE ctid = ANY(ARRAY(SELECT ctid FROM idempotency"
            " WHERE created_at < now() - $1::interval ORDER BY created_at LIMIT $2))", older_than, batch)
        count = int(status.split()[-1])
        return count, count == batch

    return await one_node_in_batches(pool, PRUNE_LOCK, step)
