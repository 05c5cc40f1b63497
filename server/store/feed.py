"""The change feed in PostgreSQL: reading events after a sequence, the retention horizon, compaction,
and consistent snapshots.

Sequences are drawn under one lock held until commit (server/store/envelope.py), so the outbox rows
any reader sees are a prefix of the sequence (with holes only where a transaction rolled back after
drawing). That is what makes `seq > last ORDER BY seq` correct here, and what gives a snapshot its
point: the highest sequence its transaction can see.

Each read also names the feed epoch (migration 0014, server/feed/epochs.py): the history of the database
its sequences belong to. `feed_epoch()` records the current epoch first when it is new.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg
from google.protobuf.message import Message

from server.feed.events import change_event
from server.proto import crs_pb2 as pb
from server.store.db import Conn, one_node_in_batches
from server.store.messages import account_msg, card_msg, customer_msg, relationship_msg

_EVENT_COLUMNS = "seq, created_at, feed_type, feed_op, feed_id, feed_version, state"


def event_from_row(row: asyncpg.Record, epoch: str) -> pb.ChangeEvent:
    return change_event(sequence=row["seq"], committed_at=row["created_at"], entity_type=row["feed_type"],
                        op=row["feed_op"], entity_id=row["feed_id"], version=row["feed_version"],
                        state=row["state"], epoch=epoch)


async def read_events(conn: Conn | asyncpg.Pool, after: int, limit: int, *,
                      timeout: float | None = None) -> tuple[str, list[asyncpg.Record]]:
    """(the current epoch, up to `limit` feed rows with seq > after in sequence order), in one statement:
    the rows are labelled with the epoch of the database they were read from."""
    rows = await conn.fetch(
        f"WITH e AS MATERIALIZED (SELECT feed_epoch() AS epoch) SELECT e.epoch, o.* FROM e LEFT JOIN LATERAL"
        f" (SELECT {_EVENT_COLUMNS} FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2) o ON true ORDER BY o.seq",
        after, limit, timeout=timeout)
    return str(rows[0]["epoch"]), [row for row in rows if row["seq"] is not None]


async def current_epoch(conn: Conn | asyncpg.Pool, *, timeout: float | None = None) -> str:
    """The database's epoch, recorded in feed_epochs first if it is new (never in a read-only transaction)."""
    epoch: str = await conn.fetchval("SELECT feed_epoch()", timeout=timeout)
    return epoch


async def known_epochs(conn: Conn | asyncpg.Pool, *, timeout: float | None = None) -> dict[str, int]:
    """feed_epochs: every epoch of this history, with the first sequence handed out in it."""
    rows = await conn.fetch("SELECT epoch, first_sequence FROM feed_epochs", timeout=timeout)
    return {row["epoch"]: int(row["first_sequence"]) for row in rows}


async def horizon(conn: Conn | asyncpg.Pool, *, timeout: float | None = None) -> int:
    """The highest sequence compaction removed: a Watch must start at or above it."""
    value: int = await conn.fetchval("SELECT compacted_through FROM feed_horizon", timeout=timeout)
    return value


async def head(conn: Conn | asyncpg.Pool, *, timeout: float | None = None) -> int:
    """The highest committed sequence this connection's snapshot can see."""
    return (await window(conn, timeout=timeout))[1]


async def window(conn: Conn | asyncpg.Pool, *, timeout: float | None = None) -> tuple[int, int]:
    """(horizon, head) in one query: a Watch may start from any sequence between them."""
    row = await conn.fetchrow(
        "SELECT h.compacted_through AS oldest,"
        " greatest((SELECT coalesce(max(seq), 0) FROM outbox), h.compacted_through) AS newest"
        " FROM feed_horizon h", timeout=timeout)
    if row is None:
        raise RuntimeError("feed_horizon has no row: the database's migrations did not run")
    return int(row["oldest"]), int(row["newest"])


COMPACTION_LOCK = 0x43525343   # "CRSC": one compaction at a time across nodes (transaction-level: PgBouncer-safe)
# How far one compaction step goes: the newest event old enough among the next `batch` past the horizon.
# The age is judged after the LIMIT, so a step reads `batch` rows at most: filtered inside it, the scan
# read on through every event younger than the retention looking for old ones (there are none: the
# sequence follows time), which the last step of every run did: 5 million events in the window, 1.6 s.
COMPACT_THROUGH_SQL = (
    "SELECT max(seq) FROM (SELECT seq, created_at FROM outbox WHERE seq > (SELECT compacted_through FROM feed_horizon)"
    " ORDER BY seq LIMIT $2) AS next WHERE created_at < now() - $1::interval")


async def compact(pool: asyncpg.Pool, *, older_than: dt.timedelta, batch: int = 10_000) -> int:
    """Delete settled feed rows older than the retention window, `batch` sequences at a time, and move
    the horizon past them. Rows the relay has not settled yet stay (it still needs them) but are
    below the horizon all the same. Returns how many rows went; 0 when another node is at it."""
    async def step(conn: Conn) -> tuple[int, bool]:
        through = await conn.fetchval(COMPACT_THROUGH_SQL, older_than, batch)
        if through is None:
            return 0, False
        status = await conn.execute("DELETE FROM outbox WHERE seq <= $1 AND settled_at IS NOT NULL", through)
        await conn.execute("UPDATE feed_horizon SET compacted_through = $1, compacted_at = now()", through)
        return int(status.split()[-1]), True

    return await one_node_in_batches(pool, COMPACTION_LOCK, step)


SNAPSHOT_QUERIES: dict[int, tuple[str, str]] = {   # entity type -> (query, SnapshotChunk field)
    pb.ENTITY_TYPE_CUSTOMER: (
        "SELECT customer_id, display_name, segment, status, kyc_status, version, merged_into FROM customers"
        " ORDER BY customer_id",
        "customers"),
    pb.ENTITY_TYPE_ACCOUNT: (
        "SELECT account_id, routing_number, account_last4, account_length, account_type, currency, status, version"
        " FROM accounts ORDER BY account_id", "accounts"),
    pb.ENTITY_TYPE_CARD: (
        "SELECT token, bin, last4, pan_length, status, expiry, account_id, version FROM cards ORDER BY token",
        "cards"),
    pb.ENTITY_TYPE_RELATIONSHIP: (
        "SELECT account_id, customer_id, role FROM account_customers ORDER BY account_id, customer_id",
        "relationships"),
}
_BUILDERS: dict[int, Callable[[Any], Message]] = {
    pb.ENTITY_TYPE_CUSTOMER: customer_msg, pb.ENTITY_TYPE_ACCOUNT: account_msg,
    pb.ENTITY_TYPE_CARD: card_msg, pb.ENTITY_TYPE_RELATIONSHIP: relationship_msg}
SNAPSHOT_TYPES = tuple(SNAPSHOT_QUERIES)


async def snapshot(conn: Conn, types: Sequence[int], *, chunk_size: int,
                   stall: float = 0.0) -> AsyncIterator[pb.SnapshotChunk]:
    """Every entity of `types` as of one point, in chunks of at most `chunk_size` entities, each
    chunk stamped with the point's sequence; the last chunk has `last` set. Runs in one REPEATABLE
    READ transaction on `conn`, reading with server-side cursors: memory stays one chunk. `stall`
    (seconds, 0: none): PostgreSQL ends the transaction when a chunk waits that long to be taken,
    so a reader that stops reading does not hold back VACUUM for good, and cancels a read that runs
    that long (a table locked by a migration: QueryCanceledError). Every chunk names the epoch
    the point belongs to (recorded before the read-only transaction begins)."""
    await current_epoch(conn)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if stall > 0:   # idle between chunks (an unread one), or one read (a lock it waits on) that long
            ms = max(1, int(stall * 1000))
            await conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = {ms};"
                               f" SET LOCAL statement_timeout = {ms}")
        sequence = await head(conn)
        epoch = await conn.fetchval("SELECT feed_current_epoch()")
        chunk = pb.SnapshotChunk(sequence=sequence, epoch=epoch)
        items = 0
        for entity_type in types:
            query, repeated = SNAPSHOT_QUERIES[entity_type]
            build = _BUILDERS[entity_type]
            async for row in conn.cursor(query, prefetch=chunk_size):
                getattr(chunk, repeated).append(build(row))
                items += 1
                if items >= chunk_size:
                    yield chunk
                    chunk, items = pb.SnapshotChunk(sequence=sequence, epoch=epoch), 0
        chunk.last = True
        yield chunk
