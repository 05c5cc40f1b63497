"""PostgreSQL reads for the lookup path (L3): one round trip per key, results as serialized protobuf.

Each loader returns the bytes the caches store and the API returns, or None when nothing matches.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from server.decisions import DecisionTable
from server.errors import FailedPrecondition
from server.pan import mask_account_number, mask_pan_parts
from server.proto import crs_pb2 as pb
from server.rpc import ANSWER_MAX_BYTES
from server.store.read_route import Uncacheable

ACTIVE_CARD = pb.CARD_STATUS_ACTIVE
OPEN_ACCOUNT = pb.ACCOUNT_STATUS_OPEN
ACTIVE_CUSTOMER = pb.CUSTOMER_STATUS_ACTIVE

_CUSTOMER_JSON = (
    "json_build_object('id', cu.customer_id, 'name', cu.display_name, 'segment', cu.segment,"
    " 'status', cu.status, 'kyc', cu.kyc_status, 'version', cu.version, 'role', ac.role)"
)

# The account's customers, owners first then in the order they were linked.
_RELATED_SQL = (
    "(SELECT coalesce(json_agg(" + _CUSTOMER_JSON + " ORDER BY ac.role, ac.created_at, ac.customer_id), '[]')"
    " FROM account_customers ac JOIN customers cu ON cu.customer_id = ac.customer_id"
    " WHERE ac.account_id = a.account_id)"
)

# A card answer's: its account's primary customer alone (owners first, so the first owner; else no
# owner and the card is not in good standing either way). The whole list, built and dropped for each
# card (_resolution keeps one), cost a card miss on an account with 5,000 related customers a 277 KB
# aggregate (nineteenth audit).
_PRIMARY_SQL = (
    "(SELECT coalesce(json_agg(p.j), '[]') FROM (SELECT " + _CUSTOMER_JSON + " AS j"
    " FROM account_customers ac JOIN customers cu ON cu.customer_id = ac.customer_id"
    " WHERE ac.account_id = a.account_id ORDER BY ac.role, ac.created_at, ac.customer_id LIMIT 1) p)"
)

_ACCOUNT_COLS = (
    "a.account_id, a.routing_number, a.account_last4, a.account_length, a.account_type, a.currency,"
    " a.status AS account_status, a.version AS account_version"
)

CARD_BY_FINGERPRINT_SQL = (
    "SELECT c.token, c.bin, coalesce(c.iin8, c.bin) AS iin, c.last4, c.pan_length, c.status AS card_status,"
    " c.expiry, c.version AS card_version,"
    f" {_ACCOUNT_COLS}, {_PRIMARY_SQL} AS related"
    " FROM cards c LEFT JOIN accounts a ON a.account_id = c.account_id"
    " WHERE (c.fingerprint_version = $1 AND c.pan_fingerprint = $2)"
    "    OR (c.next_fingerprint_version = $1 AND c.next_pan_fingerprint = $2)"
)

CARD_BY_TOKEN_SQL = (
    "SELECT c.token, c.bin, coalesce(c.iin8, c.bin) AS iin, c.last4, c.pan_length, c.status AS card_status,"
    " c.expiry, c.version AS card_version,"
    f" {_ACCOUNT_COLS}, {_PRIMARY_SQL} AS related"
    " FROM cards c LEFT JOIN accounts a ON a.account_id = c.account_id"
    " WHERE c.token = $1"
)

ACCOUNT_BY_FINGERPRINT_SQL = (
    f"SELECT {_ACCOUNT_COLS}, {_RELATED_SQL} AS related FROM accounts a"
    " WHERE (a.fingerprint_version = $1 AND a.account_fingerprint = $2)"
    "    OR (a.next_fingerprint_version = $1 AND a.next_account_fingerprint = $2)"
)

# The accounts and the cards a profile lists, each at most PROFILE_ROWS_MAX (+1, to know there are more).
CUSTOMER_PROFILE_SQL = (
    "SELECT cu.customer_id, cu.display_name, cu.segment, cu.status, cu.kyc_status, cu.version,"
    " asked.customer_id AS asked,"
    " (SELECT coalesce(json_agg(s.j ORDER BY s.created_at, s.id), '[]') FROM (SELECT json_build_object("
    "    'id', a.account_id, 'routing', a.routing_number, 'last4', a.account_last4, 'len', a.account_length,"
    "    'type', a.account_type, 'currency', a.currency, 'status', a.status, 'version', a.version,"
    "    'role', ac.role) AS j, ac.created_at, a.account_id AS id"
    "  FROM account_customers ac JOIN accounts a ON a.account_id = ac.account_id"
    "  WHERE ac.customer_id = cu.customer_id ORDER BY ac.created_at, a.account_id LIMIT $2) s) AS accounts,"
    " (SELECT coalesce(json_agg(s.j ORDER BY s.created_at, s.token), '[]') FROM (SELECT json_build_object("
    "    'token', c.token, 'bin', c.bin, 'last4', c.last4, 'len', c.pan_length, 'status', c.status,"
    "    'expiry', c.expiry, 'account', c.account_id, 'version', c.version) AS j, c.created_at, c.token"
    "  FROM account_customers ac JOIN cards c ON c.account_id = ac.account_id"
    "  WHERE ac.customer_id = cu.customer_id ORDER BY c.created_at, c.token LIMIT $2) s) AS cards"
    # A merged customer's id (an alias) answers its survivor's profile, with merged_from = the id asked.
    " FROM customers asked JOIN customers cu ON cu.customer_id = coalesce(asked.merged_into, asked.customer_id)"
    " WHERE asked.customer_id = $1"
)
# A profile is one message, at most what a client accepts (rpc.ANSWER_MAX_BYTES), less room for the
# LookupResult a BatchResolve or StreamResolve wraps it in (a 128-character correlation id and tags).
# A bigger one (a corporate customer: 40,000 cards are ~6 MB) is refused FAILED_PRECONDITION, never
# cached. A card entry is at least ~84 bytes, so a list of more than 50,000 cannot fit: PostgreSQL
# reads no more than that (a customer with 120,000 cards took 1.3 s of the 2 s CRS_PG_TIMEOUT).
PROFILE_MAX_BYTES = ANSWER_MAX_BYTES - 1024
PROFILE_ROWS_MAX = 50_000


@dataclass(frozen=True)
class Hints:
    """What building a Resolution needs for its decision hint (server/decisions.py): the table, and a
    card's network from its BIN (the BIN table; "" when no range holds it)."""

    table: DecisionTable
    network_of: Callable[[str], str]


def _expired(expiry: str, today: dt.date) -> bool:
    year, month = int(expiry[:4]), int(expiry[5:7])
    return (year, month) < (today.year, today.month)


def _card_answer(row: asyncpg.Record, *, hints: Hints, cached_for: float) -> bytes | Uncacheable:
    """A card's Resolution, judged expired or not in UTC (a card is good through its expiry month's last
    day, UTC), on every node alike. An answer that would still be cached when the card expires (its
    month ends within `cached_for` seconds: the longest an answer stays in Redis and the near-cache)
    is served but not cached: a cached one said "in good standing" for up to the TTL after the expiry,
    and nothing deletes it (no write happens). Only cards of the month's end, in its last minutes."""
    now = dt.datetime.now(dt.UTC)
    value = _resolution(row, with_card=True, today=now.date(), hints=hints)
    return Uncacheable(value) if expires_within(row["expiry"], now, cached_for) else value


def expires_within(expiry: str, now: dt.datetime, seconds: float) -> bool:
    """A card of `expiry` (YYYY-MM) is good at `now` and expired `seconds` later, in UTC."""
    now = now.astimezone(dt.UTC)
    return not _expired(expiry, now.date()) and _expired(expiry, (now + dt.timedelta(seconds=seconds)).date())


def _customer(obj: dict[str, Any]) -> pb.Customer:
    return pb.Customer(customer_id=obj["id"], display_name=obj["name"], segment=obj["segment"],
                       status=obj["status"], kyc_status=obj["kyc"], version=obj["version"])


def _account_from_row(row: asyncpg.Record) -> pb.Account:
    return pb.Account(
        account_id=row["account_id"], routing_number=row["routing_number"],
        masked_account_number=mask_account_number(row["account_last4"], row["account_length"]),
        last4=row["account_last4"], type=row["account_type"], currency=row["currency"],
        status=row["account_status"], version=row["account_version"],
    )


def _resolution(row: asyncpg.Record, *, with_card: bool, today: dt.date, hints: Hints) -> bytes:
    res = pb.Resolution()
    good = True
    expired = False
    if with_card:
        card = res.card
        card.token = row["token"]
        card.bin = row["bin"]
        card.last4 = row["last4"]
        card.masked_pan = mask_pan_parts(row["bin"], row["last4"], row["pan_length"])
        card.status = row["card_status"]
        card.expiry = row["expiry"]
        card.version = row["card_version"]
        expired = _expired(row["expiry"], today)
        good = row["card_status"] == ACTIVE_CARD and not expired
        if row["account_id"] is not None:
            card.account_id = row["account_id"]
    owner_status: int | None = None
    others: list[int] = []
    if row["account_id"] is not None:
        res.account.CopyFrom(_account_from_row(row))
        good = good and row["account_status"] == OPEN_ACCOUNT
        related = orjson.loads(row["related"])
        for obj in related:
            res.related_customers.add(customer=_customer(obj), role=obj["role"])
        owners = [obj for obj in related if obj["role"] == pb.RELATIONSHIP_ROLE_OWNER]
        if owners:
            res.customer.CopyFrom(_customer(owners[0]))
            owner_status = owners[0]["status"]
            good = good and owner_status == ACTIVE_CUSTOMER
        others = [obj["status"] for obj in related if not owners or obj is not owners[0]]
        if with_card:
            # A card answer carries the primary customer only; the full list is the ACH answer's job.
            del res.related_customers[:]
    if owner_status is None:
        good = False
    res.in_good_standing = good
    account_status = row["account_status"] if row["account_id"] is not None else None
    if with_card:
        hint = hints.table.card(card_status=row["card_status"], expired=expired, account_status=account_status,
                                owner_status=owner_status, network=hints.network_of(row["iin"]))
    else:
        hint = hints.table.account(account_status=row["account_status"], account_type=row["account_type"],
                                   owner_status=owner_status, other_statuses=others)
    res.decision.CopyFrom(hint.message())
    return res.SerializeToString()


async def card_by_fingerprint(conn: asyncpg.Connection | asyncpg.Pool, version: int, fingerprint: bytes,
                              *, timeout: float, hints: Hints, cached_for: float) -> bytes | Uncacheable | None:
    row = await conn.fetchrow(CARD_BY_FINGERPRINT_SQL, version, fingerprint, timeout=timeout)
    return None if row is None else _card_answer(row, hints=hints, cached_for=cached_for)


async def card_by_token(conn: asyncpg.Connection | asyncpg.Pool, token: str, *, timeout: float,
                        hints: Hints, cached_for: float) -> bytes | Uncacheable | None:
    row = await conn.fetchrow(CARD_BY_TOKEN_SQL, token, timeout=timeout)
    return None if row is None else _card_answer(row, hints=hints, cached_for=cached_for)


async def account_by_fingerprint(conn: asyncpg.Connection | asyncpg.Pool, version: int, fingerprint: bytes,
                                 *, timeout: float, hints: Hints) -> bytes | None:
    row = await conn.fetchrow(ACCOUNT_BY_FINGERPRINT_SQL, version, fingerprint, timeout=timeout)
    return None if row is None else _resolution(row, with_card=False, today=dt.datetime.now(dt.UTC).date(),
                                                hints=hints)


async def customer_profile(conn: asyncpg.Connection | asyncpg.Pool, customer_id: str,
                           *, timeout: float) -> bytes | None:
    row = await conn.fetchrow(CUSTOMER_PROFILE_SQL, customer_id, PROFILE_ROWS_MAX + 1, timeout=timeout)
    if row is None:
        return None
    profile = pb.CustomerProfile(customer=pb.Customer(
        customer_id=row["customer_id"], display_name=row["display_name"], segment=row["segment"],
        status=row["status"], kyc_status=row["kyc_status"], version=row["version"]))
    if row["asked"] != row["customer_id"]:
        profile.merged_from = row["asked"]
    for a in orjson.loads(row["accounts"]):
        profile.accounts.add(role=a["role"], account=pb.Account(
            account_id=a["id"], routing_number=a["routing"], last4=a["last4"],
            masked_account_number=mask_account_number(a["last4"], a["len"]), type=a["type"],
            currency=a["currency"], status=a["status"], version=a["version"]))
    for c in orjson.loads(row["cards"]):
        profile.cards.add(token=c["token"], bin=c["bin"], last4=c["last4"],
                          masked_pan=mask_pan_parts(c["bin"], c["last4"], c["len"]), status=c["status"],
                          expiry=c["expiry"], account_id=c["account"] or "", version=c["version"])
    accounts, cards = len(profile.accounts), len(profile.cards)
    if max(accounts, cards) > PROFILE_ROWS_MAX or profile.ByteSize() > PROFILE_MAX_BYTES:
        def count(n: int) -> str:
            return f"more than {PROFILE_ROWS_MAX:,}" if n > PROFILE_ROWS_MAX else f"{n:,}"
        raise FailedPrecondition(
            f"customer {row['customer_id']} holds {count(accounts)} accounts and {count(cards)} cards: its profile"
            f" is larger than the {ANSWER_MAX_BYTES // 2**20} MiB an answer may be; look its accounts and cards"
            " up one by one, or read them from the change feed (Snapshot, crs export)")
    return profile.SerializeToString()
