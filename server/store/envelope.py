"""The write envelope: one PostgreSQL transaction per admin write, with its outbox row, its
idempotency record and its audit row.

Every write (server/store/admin.py) hands a body that changes rows and returns a `Change`; the
envelope commits it together with the outbox row (the relay's retry list and the change feed, whose
sequence it draws last, under FEED_LOCK, so that sequence order is commit order) and answers a
retried `request_id` with the stored response instead of writing twice. A refused or
failed write is audited too (`audit_failure`), after its transaction rolled back.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from google.protobuf.message import Message

from server.caller import Caller
from server.errors import AlreadyExists, InvalidKey
from server.feed.events import feed_fields
from server.pan import redact_digits
from server.store.db import Conn, translate_db_errors

_ID_FIELDS = ("customer_id", "account_id", "owner")
_REQUEST_ID_FIELDS = ("customer_id", "account_id", "card_token", "owner_customer_id", "survivor_id", "merged_id")
_SAFE_ID = re.compile(r"(cus|acc|tok)_[0-9a-z]{8,40}")
MAX_REQUEST_ID = 128
FEED_LOCK = 0x43525346      # "CRSF": the transaction-level lock feed sequences are drawn under
FEED_CHANNEL = "crs_feed"   # NOTIFY on commit wakes every node's feed tailer


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


Body = Callable[[Conn], Awaitable[Change]]


class WriteEnvelope:
    def __init__(self, *, pool: asyncpg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def _write(self, rpc: str, request_id: str, body: Body, caller: Caller) -> WriteResult:
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidKey(f"request_id is longer than {MAX_REQUEST_ID} characters")
        with translate_db_errors():
            async with self.pool.acquire(timeout=self.timeout) as conn:
                if request_id:
                    stored = await self._replay(conn, rpc, request_id, caller)
                    if stored is not None:
                        return stored
                try:
                    async with conn.transaction():
                        change = await body(conn)
                        response = change.response.SerializeToString()
                        outbox_id = int(await conn.fetchval("SELECT nextval('outbox_id_seq')"))
                        if request_id:
                            await conn.execute(
                                "INSERT INTO idempotency (request_id, rpc, response) VALUES ($1, $2, $3)",
                                request_id, rpc, response)
                        related = [v for k, v in change.payload.items() if k in _ID_FIELDS and isinstance(v, str)]
                        await self._audit(conn, caller, rpc, request_id, change.entity_type,
                                          [change.entity_id, *related], "OK", outbox_id)
                        state = change.feed_state.SerializeToString() if change.feed_state else response
                        await self._append_to_feed(conn, outbox_id, change, state)
                except asyncpg.UniqueViolationError as exc:
                    if request_id and exc.constraint_name == "idempotency_pkey":
                        # A concurrent retry of the same request won the race: answer as it did.
                        stored = await self._replay(conn, rpc, request_id, caller)
                        if stored is not None:
                            return stored
                    raise
                return WriteResult(response, change.stale_keys, int(outbox_id))

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
        for event_type, message in change.also:
            # Feed-only rows: the main row carries the write's cache keys, so these are settled at once.
            extra = feed_fields(event_type, message)
            await conn.execute(
                "INSERT INTO outbox (seq, event_type, entity_type, entity_id, feed_type, feed_op, feed_id,"
                " feed_version, state, invalidated_at, settled_at)"
                " VALUES (nextval('feed_seq'), $1, $2, $3, $4, $5, $6, $7, $8, clock_timestamp(), clock_timestamp())",
                event_type, event_type.partition(".")[0], extra.entity_id, extra.entity_type, extra.op,
                extra.entity_id, extra.version, message.SerializeToString())
        await conn.execute("SELECT pg_notify($1, '')", FEED_CHANNEL)

    async def _replay(self, conn: Conn, rpc: str, request_id: str, caller: Caller) -> WriteResult | None:
        stored = await self._stored_answer(conn, rpc, request_id)
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
        # Only well-formed ids: a malformed field may be anything, a pasted card number included.
        ids = [i for i in ids if isinstance(i, str) and _SAFE_ID.fullmatch(i)]
        with translate_db_errors():
            async with self.pool.acquire(timeout=self.timeout) as conn:
                await self._audit(conn, caller, rpc, getattr(request, "request_id", "")[:MAX_REQUEST_ID], None,
                                  ids, result, None)

    @staticmethod
    async def _stored_answer(conn: Conn, rpc: str, request_id: str) -> bytes | None:
        row = await conn.fetchrow("SELECT rpc, response FROM idempotency WHERE request_id = $1", request_id)
        if row is None:
            return None
        if row["rpc"] != rpc:
            raise AlreadyExists(f"request_id was already used for {row['rpc']}")
        response: bytes = row["response"]
        return response

    async def mark_invalidated(self, outbox_id: int) -> None:
        with translate_db_errors():
            await self.pool.execute("UPDATE outbox SET invalidated_at = clock_timestamp() WHERE id = $1",
                                    outbox_id, timeout=self.timeout)
