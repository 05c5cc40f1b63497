"""Validation and masking of PANs, tokens, ABA routing and account numbers (pure, no servers)."""

from __future__ import annotations

import pytest

from devstack.demo import demo_pan, demo_routing
from server.errors import InvalidKey
from server.pan import (
    aba_ok,
    luhn_check_digit,
    luhn_ok,
    mask_pan,
    parse_account_number,
    parse_customer_id,
    parse_expiry,
    parse_pan,
    parse_routing_number,
    parse_token,
    redact_digits,
)


def test_luhn_known_values() -> None:
    # Textbook examples of the algorithm, not card numbers.
    assert luhn_ok("79927398713")
    assert not luhn_ok("79927398710")
    assert luhn_check_digit("7992739871") == "3"


@pytest.mark.parametrize("i", [0, 1, 9, 10, 12345, 199_999])
def test_demo_pans_are_valid_test_bin(i: int) -> None:
    pan = demo_pan(i)
    assert parse_pan(pan) == pan
    assert pan.startswith("99900") and len(pan) == 16


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("", "empty"),
        ("12345678901", "12-19"),            # 11 digits
        ("1" * 20, "12-19"),
        ("99900000000000 1", "ASCII digits"),
        ("٩٩٩٠٠٠٠٠٠٠٠٠٠٠٠٢", "ASCII digits"),   # Arabic-Indic digits pass str.isdigit()
        ("９９９０００００００００００００２", "ASCII digits"),  # fullwidth
        ("9990000000000\x00003", "ASCII digits"),
        ("9990000000000001", "Luhn"),
    ],
)
def test_bad_pans(bad: str, fragment: str) -> None:
    with pytest.raises(InvalidKey) as info:
        parse_pan(bad)
    assert fragment in info.value.message
    digits = "".join(ch for ch in bad if ch.isascii() and ch.isdigit())
    if len(digits) >= 12:
        assert digits not in info.value.message


def test_mask_pan_shows_first6_last4_only() -> None:
    pan = demo_pan(42)
    assert mask_pan(pan) == pan[:6] + "******" + pan[-4:]
    assert redact_digits(f"card {pan} declined") == f"card {pan[:6]}******{pan[-4:]} declined"
    assert redact_digits("order 12345 ok") == "order 12345 ok"


def test_routing_numbers() -> None:
    r = demo_routing(3)
    assert aba_ok(r) and parse_routing_number(r) == r
    bad = r[:-1] + str((int(r[-1]) + 1) % 10)
    with pytest.raises(InvalidKey, match="ABA"):
        parse_routing_number(bad)
    for wrong in ("", "12345678", "1234567890", "12345678a"):
        with pytest.raises(InvalidKey):
            parse_routing_number(wrong)


def test_account_numbers_tokens_ids_expiry() -> None:
    assert parse_account_number("1234") == "1234"
    for wrong in ("123", "1" * 18, "12a4", ""):
        with pytest.raises(InvalidKey):
            parse_account_number(wrong)
    assert parse_token("tok_" + "a1" * 12)
    for wrong in ("", "tok_short", "TOK_" + "a" * 24, "tok_" + "A" * 24):
        with pytest.raises(InvalidKey):
            parse_token(wrong)
    assert parse_customer_id("cus_demo0000000001")
    with pytest.raises(InvalidKey):
        parse_customer_id("cus_")
    assert parse_expiry("2029-12")
    for wrong in ("2029-13", "29-12", "2029-1", ""):
        with pytest.raises(InvalidKey):
            parse_expiry(wrong)
