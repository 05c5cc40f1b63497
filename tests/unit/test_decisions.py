"""The decision-hint table: every state, the precedence rules, per-network codes (docs/decision-hints.md)."""

from __future__ import annotations

import pytest

from server import decisions as d
from server.proto import crs_pb2 as pb

TABLE = d.DecisionTable(d.parse_network_codes(d.DEFAULT_NETWORK_CODES))
C, A, U = pb.CardStatus, pb.AccountStatus, pb.CustomerStatus


def card(card_status: int = C.Value("CARD_STATUS_ACTIVE"), expired: bool = False,
         account_status: int | None = A.Value("ACCOUNT_STATUS_OPEN"),
         owner_status: int | None = U.Value("CUSTOMER_STATUS_ACTIVE"), network: str = "visa") -> tuple[str, str]:
    h = TABLE.card(card_status=card_status, expired=expired, account_status=account_status,
                   owner_status=owner_status, network=network)
    return h.iso8583, h.reason


def account(account_status: int = A.Value("ACCOUNT_STATUS_OPEN"), account_type: int = pb.ACCOUNT_TYPE_CHECKING,
            owner_status: int | None = U.Value("CUSTOMER_STATUS_ACTIVE"),
            others: tuple[int, ...] = ()) -> tuple[str, str]:
    h = TABLE.account(account_status=account_status, account_type=account_type, owner_status=owner_status,
                      other_statuses=list(others))
    return h.nacha, h.reason


def test_card_states_one_at_a_time() -> None:
    assert card() == ("00", "APPROVED")
    assert card(pb.CARD_STATUS_STOLEN) == ("43", "CARD_STOLEN")
    assert card(pb.CARD_STATUS_LOST) == ("41", "CARD_LOST")
    assert card(expired=True) == ("54", "CARD_EXPIRED")
    assert card(pb.CARD_STATUS_BLOCKED) == ("62", "CARD_BLOCKED")
    assert card(pb.CARD_STATUS_CLOSED) == ("05", "CARD_CLOSED")
    assert card(account_status=None, owner_status=None) == ("05", "CARD_NOT_LINKED")
    assert card(account_status=pb.ACCOUNT_STATUS_CLOSED) == ("46", "ACCOUNT_CLOSED")
    assert card(account_status=pb.ACCOUNT_STATUS_FROZEN) == ("05", "ACCOUNT_FROZEN")
    assert card(account_status=pb.ACCOUNT_STATUS_DORMANT) == ("05", "ACCOUNT_DORMANT")
    assert card(owner_status=None) == ("05", "ACCOUNT_HAS_NO_OWNER")
    assert card(owner_status=pb.CUSTOMER_STATUS_SUSPENDED) == ("57", "CUSTOMER_SUSPENDED")
    assert card(owner_status=pb.CUSTOMER_STATUS_DECEASED) == ("05", "CUSTOMER_DECEASED")
    assert card(owner_status=pb.CUSTOMER_STATUS_CLOSED) == ("05", "CUSTOMER_CLOSED")


def test_card_precedence() -> None:
    # A stolen card on a closed account of a suspended customer: pick it up.
    assert card(pb.CARD_STATUS_STOLEN, expired=True, account_status=pb.ACCOUNT_STATUS_CLOSED,
                owner_status=pb.CUSTOMER_STATUS_SUSPENDED) == ("43", "CARD_STOLEN")
    assert card(pb.CARD_STATUS_LOST, expired=True) == ("41", "CARD_LOST")
    assert card(pb.CARD_STATUS_BLOCKED, expired=True, account_status=pb.ACCOUNT_STATUS_FROZEN) == ("54", "CARD_EXPIRED")
    assert card(pb.CARD_STATUS_BLOCKED, owner_status=pb.CUSTOMER_STATUS_SUSPENDED) == ("62", "CARD_BLOCKED")
    assert card(pb.CARD_STATUS_CLOSED, account_status=pb.ACCOUNT_STATUS_CLOSED) == ("05", "CARD_CLOSED")
    assert card(account_status=pb.ACCOUNT_STATUS_CLOSED, owner_status=pb.CUSTOMER_STATUS_SUSPENDED) == \
        ("46", "ACCOUNT_CLOSED")
    assert card(account_status=pb.ACCOUNT_STATUS_FROZEN, owner_status=pb.CUSTOMER_STATUS_SUSPENDED) == \
        ("05", "ACCOUNT_FROZEN")


def test_networks_that_do_not_use_46_answer_05() -> None:
    closed = {"account_status": pb.ACCOUNT_STATUS_CLOSED}
    assert card(network="visa", **closed)[0] == "46"
    assert card(network="", **closed)[0] == "46"
    for network in ("testnet", "testnet-domestic", "elo", "rupay"):    # not named in the setting: the table's code
        assert card(network=network, **closed)[0] == "46"
    for network in ("mastercard", "amex", "discover", "jcb", "unionpay"):
        assert card(network=network, **closed) == ("05", "ACCOUNT_CLOSED")
    assert card(network="mastercard", card_status=pb.CARD_STATUS_STOLEN) == ("43", "CARD_STOLEN")


def test_account_states_and_precedence() -> None:
    assert account() == ("", "APPROVED")
    assert account(pb.ACCOUNT_STATUS_CLOSED, owner_status=pb.CUSTOMER_STATUS_DECEASED) == ("R02", "ACCOUNT_CLOSED")
    assert account(pb.ACCOUNT_STATUS_FROZEN, owner_status=pb.CUSTOMER_STATUS_DECEASED) == \
        ("R15", "ACCOUNT_HOLDER_DECEASED")
    assert account(pb.ACCOUNT_STATUS_FROZEN, others=(pb.CUSTOMER_STATUS_DECEASED,)) == \
        ("R14", "REPRESENTATIVE_PAYEE_DECEASED")
    assert account(pb.ACCOUNT_STATUS_FROZEN, account_type=pb.ACCOUNT_TYPE_CREDIT) == ("R16", "ACCOUNT_FROZEN")
    assert account(pb.ACCOUNT_STATUS_DORMANT) == ("R16", "ACCOUNT_DORMANT")
    assert account(owner_status=pb.CUSTOMER_STATUS_SUSPENDED, account_type=pb.ACCOUNT_TYPE_CREDIT) == \
        ("R16", "CUSTOMER_SUSPENDED")
    assert account(account_type=pb.ACCOUNT_TYPE_CREDIT) == ("R20", "NON_TRANSACTION_ACCOUNT")
    assert account(owner_status=None) == ("R03", "ACCOUNT_HAS_NO_OWNER")
    assert account(owner_status=pb.CUSTOMER_STATUS_CLOSED) == ("R03", "CUSTOMER_CLOSED")
    assert account(account_type=pb.ACCOUNT_TYPE_SAVINGS) == ("", "APPROVED")


def test_error_hints() -> None:
    assert d.card_error("NOT_FOUND") == d.CARD_NOT_FOUND and d.CARD_NOT_FOUND.iso8583 == "14"
    assert d.card_error("INVALID_ARGUMENT") is d.CARD_NUMBER_INVALID
    assert d.card_error("UNAVAILABLE") is d.card_error("DEADLINE_EXCEEDED") is d.CARD_ISSUER_UNAVAILABLE
    assert d.card_error("PERMISSION_DENIED") is None
    assert d.account_error("NOT_FOUND", routing_ok=True).nacha == "R03"   # type: ignore[union-attr]
    assert d.account_error("INVALID_ARGUMENT", routing_ok=True).nacha == "R04"   # type: ignore[union-attr]
    assert d.account_error("INVALID_ARGUMENT", routing_ok=False).nacha == "R13"   # type: ignore[union-attr]
    info = d.CARD_STOLEN.error_info()
    assert info.reason == "CARD_STOLEN" and info.domain == "crs.v1"  # type: ignore[attr-defined]
    assert dict(info.metadata) == {"iso8583_response_code": "43", "table_version": d.TABLE_VERSION}  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["visa", "visa:46", "visa:46=5", "visa:4=05", ":46=05"])
def test_network_codes_setting_is_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="NETWORK:CODE=CODE"):
        d.parse_network_codes(bad)
