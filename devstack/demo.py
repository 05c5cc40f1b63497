"""Deterministic synthetic demo data, loaded with COPY.

Nothing here is real: PANs are Luhn-valid numbers in the reserved test BIN range 999000-999009
(issuer identification numbers starting with 9 are not assigned to card brands), routing numbers
start with 999 (no such Federal Reserve district), names are made up. The same (seed, index) always
gives the same key, so `crs-dev lookup --demo N`, the tests and the load tests can name keys that
exist without storing any clear PAN.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import asyncpg

from server.crypto import ACCOUNT_PURPOSE, PAN_PURPOSE, DataKey, Keyring, account_fingerprint_input
from server.pan import aba_check_digit, luhn_check_digit
from server.progress import ProgressBar
from server.proto import crs_pb2 as pb

TEST_BIN_PREFIX = "99900"
ROUTING_PREFIXES = ("99900001", "99900002", "99900003", "99900004", "99900005")
_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Leslie",
          "Margaret", "John", "Sophie", "Tim", "Hedy", "Claude")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman",
         "Lamport", "Hamilton", "Backus", "Wilson", "Berners", "Lamarr", "Shannon")
_SEGMENTS = ("retail", "retail", "retail", "premier", "business")


def demo_pan(index: int) -> str:
    """The PAN of demo card `index`: 16 digits, BIN 99900x, Luhn-valid."""
    body = f"{TEST_BIN_PREFIX}{index % 10}{index // 10:09d}"
    return body + luhn_check_digit(body)


def demo_routing(index: int) -> str:
    first8 = ROUTING_PREFIXES[index % len(ROUTING_PREFIXES)]
    return first8 + aba_check_digit(first8)


def demo_account_number(index: int) -> str:
    return f"7{index:011d}"


_TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def demo_customer_id(index: int) -> str:
    return f"cus_demo{index:010d}"


def demo_account_id(index: int) -> str:
    return f"acc_demo{index:010d}"


def demo_token(seed: int, index: int) -> str:
    """Deterministic, in the alphabet of real tokens (a-z0-9, server/store/admin.py new_id): hex
    digests held 13+ digit runs often enough that `crs pci scan` flagged ~1 demo token in 800."""
    digest = hashlib.sha256(f"{seed}:card:{index}".encode()).digest()
    return "tok_" + "".join(_TOKEN_ALPHABET[b % 36] for b in digest[:24])


@dataclass(frozen=True)
class DemoSize:
    customers: int
    accounts: int
    cards: int


def plan(customers: int) -> DemoSize:
    """~1.5 accounts and ~2 cards per customer."""
    return DemoSize(customers=customers, accounts=customers * 3 // 2, cards=customers * 2)


def _customers(n: int, rng: random.Random) -> Iterator[tuple[object, ...]]:
    for i in range(n):
        roll = rng.random()
        status = pb.CUSTOMER_STATUS_SUSPENDED if roll < 0.02 else pb.CUSTOMER_STATUS_ACTIVE
        kyc = pb.KYC_STATUS_PENDING if roll > 0.97 else pb.KYC_STATUS_VERIFIED
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        yield (demo_customer_id(i), name, rng.choice(_SEGMENTS), status, kyc)


def _account_owner(i: int, customers: int) -> int:
    # The first `customers` accounts go one per customer; the rest to every second customer.
    return i if i < customers else (2 * (i - customers)) % customers


def _accounts(size: DemoSize, keyring: Keyring, dek: DataKey, rng: random.Random) -> Iterator[tuple[object, ...]]:
    version = keyring.fingerprint_version
    for i in range(size.accounts):
        routing, number = demo_routing(i), demo_account_number(i)
        roll = rng.random()
        status = (pb.ACCOUNT_STATUS_CLOSED if roll < 0.02 else pb.ACCOUNT_STATUS_FROZEN if roll < 0.05
                  else pb.ACCOUNT_STATUS_OPEN)
        yield (demo_account_id(i), routing, version, keyring.fingerprint(account_fingerprint_input(routing, number)),
               number[-4:], len(number), dek.encrypt(number, purpose=ACCOUNT_PURPOSE), dek.dek_id,
               rng.choice((pb.ACCOUNT_TYPE_CHECKING, pb.ACCOUNT_TYPE_CHECKING, pb.ACCOUNT_TYPE_SAVINGS,
                           pb.ACCOUNT_TYPE_CREDIT)), "USD", status)


def _relationships(size: DemoSize, rng: random.Random) -> Iterator[tuple[object, ...]]:
    for i in range(size.accounts):
        owner = _account_owner(i, size.customers)
        yield (demo_account_id(i), demo_customer_id(owner), pb.RELATIONSHIP_ROLE_OWNER)
        roll = rng.random()
        if roll < 0.25 and size.customers > 1:
            other = (owner + 1 + rng.randrange(size.customers - 1)) % size.customers
            role = pb.RELATIONSHIP_ROLE_JOINT if roll < 0.2 else pb.RELATIONSHIP_ROLE_AUTHORIZED_SIGNER
            yield (demo_account_id(i), demo_customer_id(other), role)


def _cards(size: DemoSize, seed: int, keyring: Keyring, dek: DataKey,
           rng: random.Random) -> Iterator[tuple[object, ...]]:
    version = keyring.fingerprint_version
    year = dt.datetime.now(dt.UTC).year
    for i in range(size.cards):
        pan = demo_pan(i)
        roll = rng.random()
        status = (pb.CARD_STATUS_LOST if roll < 0.01 else pb.CARD_STATUS_BLOCKED if roll < 0.03
                  else pb.CARD_STATUS_ACTIVE)
        # 3% expired two years ago, the rest good for 1-5 more years: relative to this year, so the demo
        # data's answers do not change with the calendar (fixed years expired every card by 2032).
        expiry = f"{year - 2 if roll > 0.97 else year + 1 + rng.randrange(5)}-{1 + rng.randrange(12):02d}"
        yield (demo_token(seed, i), version, keyring.fingerprint(pan), pan[:6], pan[-4:], len(pan),
               dek.encrypt(pan, purpose=PAN_PURPOSE), dek.dek_id, expiry, demo_account_id(i % size.accounts), status)


_COLUMNS = {
    "customers": ("customer_id", "display_name", "segment", "status", "kyc_status"),
    "accounts": ("account_id", "routing_number", "fingerprint_version", "account_fingerprint", "account_last4",
                 "account_length", "account_ciphertext", "dek_id", "account_type", "currency", "status"),
    "account_customers": ("account_id", "customer_id", "role"),
    "cards": ("token", "fingerprint_version", "pan_fingerprint", "bin", "last4", "pan_length", "pan_ciphertext",
              "dek_id", "expiry", "account_id", "status"),
}
CHUNK = 20_000


class DemoDataPresent(RuntimeError):
    """The database already holds customers: demo data loads only into an empty one."""


async def load_demo(dsn: str, keyring: Keyring, dek: DataKey, *, customers: int, seed: int = 1,
                    out: TextIO | None = None) -> DemoSize:
    """Load the demo set into an empty database (refuses if customers exist). Returns the sizes."""
    size = plan(customers)
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT count(*) FROM customers") > 0:
            raise DemoDataPresent("the database already holds customers; demo data loads only into an empty one")
        rng = random.Random(seed)
        # Relationships are ~1.25 per account (owners plus some joint holders and signers).
        total = size.customers + size.accounts * 9 // 4 + size.cards
        progress = ProgressBar(out or sys.stderr, "loading demo data", total)
        sources = {
            "customers": _customers(size.customers, rng),
            "accounts": _accounts(size, keyring, dek, rng),
            "account_customers": _relationships(size, rng),
            "cards": _cards(size, seed, keyring, dek, rng),
        }
        async with conn.transaction():
            for table, rows in sources.items():
                chunk: list[tuple[object, ...]] = []
                for row in rows:
                    chunk.append(row)
                    if len(chunk) == CHUNK:
                        await conn.copy_records_to_table(table, records=chunk, columns=_COLUMNS[table])
                        progress.advance(len(chunk), table)
                        chunk = []
                if chunk:
                    await conn.copy_records_to_table(table, records=chunk, columns=_COLUMNS[table])
                    progress.advance(len(chunk), table)
        progress.finish()
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return size
