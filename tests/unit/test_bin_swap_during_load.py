"""A card answer loaded while the node swaps BIN tables is built with the table its cache key names
(docs/audit-2026-12-04.md, third audit, BIN 1). The key took the table version when the request
arrived and the decision took the network from whatever table the node held when PostgreSQL answered:
version 2's decision was cached under a version-1 key, and after a rollback (`crs bins activate 1`)
nodes served it for the cache TTL. Pure: the PostgreSQL row comes from a fake connection that swaps
the table "while the query runs", as the event loop can."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from server.bins import BinRow, BinTable, build
from server.cache_keys import card_key_prefix, token_key
from server.crypto import Keyring, new_key
from server.decisions import DEFAULT_NETWORK_CODES, DecisionTable, parse_network_codes
from server.lookup import LookupHandlers
from server.pan import luhn_check_digit
from server.proto import crs_pb2 as pb
from server.store.read_route import Read

DECISIONS = DecisionTable(parse_network_codes(DEFAULT_NETWORK_CODES))
V1 = build([BinRow("999300", "999399", 16, "mastercard", "Issuer", "US", "credit", False)], 1)
V2 = build([BinRow("999300", "999399", 16, "visa", "Issuer", "US", "credit", False)], 2)   # rolled back later


class Bins:
    table: BinTable = V1
    known = True

    def cacheable(self, load: Read) -> Read:
        return load


class _Near:
    enabled = False


class _Resolver:
    near = _Near()


def _row(pan: str) -> dict[str, Any]:
    """A card on a closed account: its decision depends on the network (a closed account: 05 or 46)."""
    return {"token": "tok_" + "a" * 24, "bin": pan[:6], "iin": pan[:8], "last4": pan[-4:], "pan_length": 16,
            "card_status": pb.CARD_STATUS_ACTIVE, "expiry": "2031-01", "card_version": 1,
            "account_id": "acc_abcdefgh", "routing_number": "011000015", "account_last4": "1234",
            "account_length": 10, "account_type": pb.ACCOUNT_TYPE_CHECKING, "currency": "USD",
            "account_status": pb.ACCOUNT_STATUS_CLOSED, "account_version": 1,
            "related": orjson.dumps([{"id": "cus_abcdefgh", "name": "x", "segment": "retail",
                                      "status": pb.CUSTOMER_STATUS_ACTIVE, "kyc": 1, "version": 1,
                                      "role": pb.RELATIONSHIP_ROLE_OWNER}]).decode()}


class SwapsWhileReading:
    def __init__(self, bins: Bins, row: dict[str, Any]) -> None:
        self.bins, self.row = bins, row

    async def fetchrow(self, *args: object, **kwargs: object) -> dict[str, Any]:
        self.bins.table = V2          # the node's BinSource swapped tables while the query ran
        await asyncio.sleep(0)
        return self.row


def test_an_answer_loaded_across_a_table_swap_is_built_with_its_key_table() -> None:
    bins = Bins()
    handlers = LookupHandlers(resolver=_Resolver(), keyring=Keyring(fingerprint_keys={1: new_key()},  # type: ignore[arg-type]
                                                                    fingerprint_version=1, kek=new_key()),
                              pg_timeout=2, batch_max=10, bins=bins, decisions=DECISIONS,
                              card_answer_life=330)
    pan = "999300123456789"
    pan += luhn_check_digit(pan)
    row = _row(pan)
    for lookup in (handlers.card_by_pan(pan), handlers.card_by_token(row["token"])):
        bins.table = V1                               # the request arrives on version 1
        value = asyncio.run(lookup.load(SwapsWhileReading(bins, row)))
        on_v1 = DECISIONS.card(card_status=pb.CARD_STATUS_ACTIVE, expired=False,
                               account_status=pb.ACCOUNT_STATUS_CLOSED, owner_status=pb.CUSTOMER_STATUS_ACTIVE,
                               network="mastercard")
        assert pb.Resolution.FromString(value).decision.iso8583_response_code == on_v1.iso8583
        assert lookup.cache_key.startswith((card_key_prefix(1, 1), token_key("", 1)))   # the key names version 1
