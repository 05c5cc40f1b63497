"""Decision hints: what a switch answers next, as its network's own code (pure; docs/decision-hints.md).

One table, in one place, versioned (TABLE_VERSION; the doc lists every code with its meaning and
source). A card lookup gets an ISO 8583 field-39 response code, an account lookup (the ACH path) a
NACHA return reason code. When several things are wrong at once the first rule in the precedence
list that applies decides, so the answer is the one the acquirer or ODFI must act on first (a
stolen card on a closed account is "43 pick up", not "46 closed account").

Networks differ in places: `46` (closed account) is Visa's; some networks answer `05` for it. Those
differences are configuration (CRS_DECISION_NETWORK_CODES), not code: a network it does not name
(Visa, a domestic scheme, a BIN in no range) gets the table's code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import Message
from google.rpc import error_details_pb2

from server.proto import crs_pb2 as pb

TABLE_VERSION = "2026-12.1"
DOMAIN = "crs.v1"
# Default per-network substitutions: the networks whose rules do not use 46 answer 05 instead.
DEFAULT_NETWORK_CODES = "mastercard:46=05,amex:46=05,discover:46=05,jcb:46=05,unionpay:46=05"


@dataclass(frozen=True)
class Hint:
    iso8583: str      # "" for account lookups
    nacha: str        # "" for card lookups and for an entry that can post
    reason: str       # stable, UPPER_SNAKE_CASE

    def message(self) -> pb.DecisionHint:
        return pb.DecisionHint(iso8583_response_code=self.iso8583, nacha_return_code=self.nacha, reason=self.reason,
                               table_version=TABLE_VERSION)

    def error_info(self) -> Message:
        """The hint as google.rpc.ErrorInfo, for error statuses (the rich error model)."""
        metadata = {"table_version": TABLE_VERSION}
        if self.iso8583:
            metadata["iso8583_response_code"] = self.iso8583
        if self.nacha:
            metadata["nacha_return_code"] = self.nacha
        info: Message = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata)
        return info


# -- cards: ISO 8583 field 39, in precedence order -------------------------------------------------
CARD_STOLEN = Hint("43", "", "CARD_STOLEN")                  # stolen card, pick up
CARD_LOST = Hint("41", "", "CARD_LOST")                      # lost card, pick up
CARD_EXPIRED = Hint("54", "", "CARD_EXPIRED")                # expired card
CARD_BLOCKED = Hint("62", "", "CARD_BLOCKED")                # restricted card
CARD_CLOSED = Hint("05", "", "CARD_CLOSED")                  # do not honour
CARD_ACCOUNT_CLOSED = Hint("46", "", "ACCOUNT_CLOSED")       # closed account; 05 where the network codes say
CARD_ACCOUNT_FROZEN = Hint("05", "", "ACCOUNT_FROZEN")
CARD_ACCOUNT_DORMANT = Hint("05", "", "ACCOUNT_DORMANT")
CARD_NOT_LINKED = Hint("05", "", "CARD_NOT_LINKED")          # a card with no account behind it
CARD_CUSTOMER_SUSPENDED = Hint("57", "", "CUSTOMER_SUSPENDED")  # not permitted to the cardholder
CARD_CUSTOMER_DECEASED = Hint("05", "", "CUSTOMER_DECEASED")
CARD_CUSTOMER_CLOSED = Hint("05", "", "CUSTOMER_CLOSED")
CARD_NO_OWNER = Hint("05", "", "ACCOUNT_HAS_NO_OWNER")
CARD_APPROVED = Hint("00", "", "APPROVED")
CARD_NOT_FOUND = Hint("14", "", "CARD_NOT_FOUND")            # no such card number
CARD_NUMBER_INVALID = Hint("14", "", "CARD_NUMBER_INVALID")  # fails Luhn, wrong length, not digits
CARD_ISSUER_UNAVAILABLE = Hint("91", "", "ISSUER_UNAVAILABLE")   # try again / stand-in

# -- accounts: NACHA return reason codes, in precedence order --------------------------------------
ACCOUNT_CLOSED = Hint("", "R02", "ACCOUNT_CLOSED")
ACCOUNT_HOLDER_DECEASED = Hint("", "R15", "ACCOUNT_HOLDER_DECEASED")     # beneficiary or account holder
PAYEE_DECEASED = Hint("", "R14", "REPRESENTATIVE_PAYEE_DECEASED")        # an authorised signer
ACCOUNT_FROZEN = Hint("", "R16", "ACCOUNT_FROZEN")
ACCOUNT_DORMANT = Hint("", "R16", "ACCOUNT_DORMANT")
ACCOUNT_HOLDER_SUSPENDED = Hint("", "R16", "CUSTOMER_SUSPENDED")
ACCOUNT_NON_TRANSACTION = Hint("", "R20", "NON_TRANSACTION_ACCOUNT")     # credit accounts take no ACH entries
ACCOUNT_NO_OWNER = Hint("", "R03", "ACCOUNT_HAS_NO_OWNER")
ACCOUNT_HOLDER_CLOSED = Hint("", "R03", "CUSTOMER_CLOSED")
ACCOUNT_OK = Hint("", "", "APPROVED")
ACCOUNT_NOT_FOUND = Hint("", "R03", "ACCOUNT_NOT_FOUND")                 # no account / unable to locate
ACCOUNT_NUMBER_INVALID = Hint("", "R04", "ACCOUNT_NUMBER_INVALID")       # invalid account number structure
ROUTING_NUMBER_INVALID = Hint("", "R13", "ROUTING_NUMBER_INVALID")       # invalid ACH routing number
ACCOUNT_SERVICE_UNAVAILABLE = Hint("", "", "SERVICE_UNAVAILABLE")        # no return: retry the lookup

NON_TRANSACTION_TYPES = frozenset({pb.ACCOUNT_TYPE_CREDIT})


def parse_network_codes(text: str) -> dict[str, dict[str, str]]:
    """'mastercard:46=05,amex:46=05' -> {'mastercard': {'46': '05'}, ...}; ValueError when malformed."""
    out: dict[str, dict[str, str]] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        network, sep, rule = part.partition(":")
        code, eq, replacement = rule.partition("=")
        if not (sep and eq and network and len(code) == 2 and len(replacement) == 2
                and code.isalnum() and replacement.isalnum()):
            raise ValueError(f"{part!r}: each entry must be NETWORK:CODE=CODE, e.g. mastercard:46=05")
        out.setdefault(network.lower(), {})[code] = replacement
    return out


class DecisionTable:
    def __init__(self, network_codes: Mapping[str, Mapping[str, str]]) -> None:
        self.network_codes = {k: dict(v) for k, v in network_codes.items()}

    def for_network(self, hint: Hint, network: str) -> Hint:
        replacement = self.network_codes.get(network, {}).get(hint.iso8583)
        return Hint(replacement, hint.nacha, hint.reason) if replacement else hint

    def card(self, *, card_status: int, expired: bool, account_status: int | None, owner_status: int | None,
             network: str) -> Hint:
        """A card we hold. account_status None: no account; owner_status None: the account has no owner."""
        return self.for_network(_card(card_status, expired, account_status, owner_status), network)

    @staticmethod
    def account(*, account_status: int, account_type: int, owner_status: int | None,
                other_statuses: list[int]) -> Hint:
        """An account we hold (the ACH path). other_statuses: the non-owner customers on the account."""
        if account_status == pb.ACCOUNT_STATUS_CLOSED:
            return ACCOUNT_CLOSED
        if owner_status == pb.CUSTOMER_STATUS_DECEASED:
            return ACCOUNT_HOLDER_DECEASED
        if pb.CUSTOMER_STATUS_DECEASED in other_statuses:
            return PAYEE_DECEASED
        if account_status == pb.ACCOUNT_STATUS_FROZEN:
            return ACCOUNT_FROZEN
        if account_status == pb.ACCOUNT_STATUS_DORMANT:
            return ACCOUNT_DORMANT
        if owner_status == pb.CUSTOMER_STATUS_SUSPENDED:
            return ACCOUNT_HOLDER_SUSPENDED
        if account_type in NON_TRANSACTION_TYPES:
            return ACCOUNT_NON_TRANSACTION
        if owner_status is None:
            return ACCOUNT_NO_OWNER
        if owner_status == pb.CUSTOMER_STATUS_CLOSED:
            return ACCOUNT_HOLDER_CLOSED
        return ACCOUNT_OK


def _card(card_status: int, expired: bool, account_status: int | None, owner_status: int | None) -> Hint:
    if card_status == pb.CARD_STATUS_STOLEN:
        return CARD_STOLEN
    if card_status == pb.CARD_STATUS_LOST:
        return CARD_LOST
    if expired:
        return CARD_EXPIRED
    if card_status == pb.CARD_STATUS_BLOCKED:
        return CARD_BLOCKED
    if card_status == pb.CARD_STATUS_CLOSED:
        return CARD_CLOSED
    if account_status is None:
        return CARD_NOT_LINKED
    if account_status == pb.ACCOUNT_STATUS_CLOSED:
        return CARD_ACCOUNT_CLOSED
    if account_status == pb.ACCOUNT_STATUS_FROZEN:
        return CARD_ACCOUNT_FROZEN
    if account_status == pb.ACCOUNT_STATUS_DORMANT:
        return CARD_ACCOUNT_DORMANT
    if owner_status is None:
        return CARD_NO_OWNER
    if owner_status == pb.CUSTOMER_STATUS_SUSPENDED:
        return CARD_CUSTOMER_SUSPENDED
    if owner_status == pb.CUSTOMER_STATUS_DECEASED:
        return CARD_CUSTOMER_DECEASED
    if owner_status == pb.CUSTOMER_STATUS_CLOSED:
        return CARD_CUSTOMER_CLOSED
    return CARD_APPROVED


def card_error(code_name: str) -> Hint | None:
    """The hint of a card key that did not resolve, by its gRPC status name."""
    return {"NOT_FOUND": CARD_NOT_FOUND, "INVALID_ARGUMENT": CARD_NUMBER_INVALID,
            "UNAVAILABLE": CARD_ISSUER_UNAVAILABLE, "DEADLINE_EXCEEDED": CARD_ISSUER_UNAVAILABLE}.get(code_name)


def account_error(code_name: str, *, routing_ok: bool) -> Hint | None:
    """The hint of an account key that did not resolve (routing_ok: the routing number's check digit
    holds, so an INVALID_ARGUMENT is about the account number's structure)."""
    if code_name == "INVALID_ARGUMENT":
        return ACCOUNT_NUMBER_INVALID if routing_ok else ROUTING_NUMBER_INVALID
    return {"NOT_FOUND": ACCOUNT_NOT_FOUND, "UNAVAILABLE": ACCOUNT_SERVICE_UNAVAILABLE,
            "DEADLINE_EXCEEDED": ACCOUNT_SERVICE_UNAVAILABLE}.get(code_name)
