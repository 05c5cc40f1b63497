"""Validation and masking of PANs, tokens, ABA routing and account numbers (pure, no servers)."""

from __future__ import annotations

import hashlib
import random
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devstack.demo import TEST_BIN_PREFIX, demo_pan, demo_routing
from server.errors import InvalidKey
from server.pan import (
    _card_window,
    aba_ok,
    contains_card_number,
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
    routing_number_ok,
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


@pytest.mark.parametrize("length, said", [(11, "got 11 characters"), (9999, "got 9999 characters"),
                                          (10_000, "got more than 9999 characters"),
                                          (16 << 20, "got more than 9999 characters")])
def test_oversized_pan_length_is_counted_up_to_a_cap(length: int, said: str) -> None:
    with pytest.raises(InvalidKey) as info:
        parse_pan("4" * length)
    assert info.value.message == f"pan must be 12-19 digits ({said})"


def test_mask_pan_shows_first6_last4_only() -> None:
    pan = demo_pan(42)
    assert mask_pan(pan) == pan[:6] + "******" + pan[-4:]
    assert redact_digits(f"card {pan} declined") == f"card {pan[:6]}******{pan[-4:]} declined"
    assert redact_digits("order 12345 ok") == "order 12345 ok"
    # Written in groups it is no 12-19 digit run, but still a card number: every digit goes.
    spaced = " ".join(pan[i:i + 4] for i in range(0, 16, 4))
    assert redact_digits(f"retry-{spaced} at 10:30") == "retry-**** **** **** **** at **:**"
    assert redact_digits(f"retry-{pan[:4]}-{pan[4:8]}-{pan[8:12]}-{pan[12:]}").count("*") == 16


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


# --- card numbers in free text (contains_card_number) ---------------------------------------------------
def made_up_pan(length: int = 16, serial: int = 7) -> str:
    """A Luhn-valid number of `length` digits in the reserved test BIN range, made at run time."""
    body = f"{TEST_BIN_PREFIX}{serial:0{length - len(TEST_BIN_PREFIX) - 1}d}"
    return body + luhn_check_digit(body)


def wrong_check_digit(digits: str) -> str:
    return digits[:-1] + str((int(digits[-1]) + 1) % 10)


def grouped(digits: str, sep: str, size: int = 4) -> str:
    return sep.join(digits[i:i + size] for i in range(0, len(digits), size))


@pytest.mark.parametrize("length", range(13, 20))
def test_card_numbers_of_every_length_are_found(length: int) -> None:
    pan = made_up_pan(length)
    assert contains_card_number(pan)
    assert contains_card_number(f"card {pan} x")
    assert contains_card_number(f"ref{pan}end")            # letters around it are not digits
    assert not contains_card_number(wrong_check_digit(pan))


@pytest.mark.parametrize("write", [
    lambda p: grouped(p, " "),                               # 9990 0000 0000 0007
    lambda p: grouped(p, "-"),                               # 9990-0000-0000-0007
    lambda p: grouped(p, " - "),                             # a dash with spaces around it
    lambda p: grouped(p, "  "),                              # several spaces
    lambda p: grouped(p, "\u00a0"),                         # no-break spaces
    lambda p: grouped(p, "."), lambda p: grouped(p, "/"), lambda p: grouped(p, "_"),   # a card's 4-4-4-4
    lambda p: grouped(p, "\u2013"), lambda p: grouped(p, " \u2014 "),   # en and em dashes
    lambda p: f"{p[:4]} {p[4:10]} {p[10:]}",                 # Amex-style 4-6-5 grouping
    lambda p: f"card {grouped(p, ' ')} exp 12 27",
    lambda p: f"{grouped(p, ' ')} 12 27",                    # a card number and its expiry: one run
    lambda p: "0000" + p,                                    # zero-padded to 20 digits
    lambda p: "0" * 8 + p,
    lambda p: p.translate(str.maketrans("0123456789", "０１２３４５６７８９")),   # fullwidth digits
    lambda p: p.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")),          # Arabic-Indic digits
])
def test_card_numbers_written_in_groups_or_padded_are_found(write: object) -> None:
    pan = made_up_pan(16)
    assert contains_card_number(write(pan))  # type: ignore[operator]
    assert not contains_card_number(write(wrong_check_digit(pan)))  # type: ignore[operator]


def test_an_amex_grouping_with_dots_is_found() -> None:
    pan = made_up_pan(15)
    assert contains_card_number(f"{pan[:4]}.{pan[4:10]}.{pan[10:]}")          # 4-6-5
    assert not contains_card_number(f"{pan[:4]}.{pan[4:10]}.{wrong_check_digit(pan)[10:]}")


def test_what_is_not_a_card_number() -> None:
    pan = made_up_pan(16)
    twelve = made_up_pan(12)
    assert not contains_card_number(twelve) and not contains_card_number(grouped(twelve, " "))   # 12 digits
    assert not contains_card_number(wrong_check_digit(pan))                                     # fails Luhn
    assert not contains_card_number("0" * 16) and not contains_card_number("0000 0000 0000 0000")
    # Other punctuation ends a run: two marks in a row, brackets, a comma, a colon.
    for sep in ("--", "..", ")(", ",", ":"):
        assert not contains_card_number(grouped(pan, sep)), sep
    # Dots, slashes, underscores only in a card's grouping: keys and dates split by them are not
    # joined, although their digits pass Luhn (chosen so: the last digit makes them pass).
    for shape in ("{}.{}", "{}/{}", "{}_{}"):
        body = "20240115" + "00012"
        key = body + next(str(d) for d in range(10) if luhn_ok(body + str(d)))
        assert not contains_card_number(shape.format(key[:8], key[8:])), shape
    dated = "2024011500123"
    dated += next(str(d) for d in range(10) if luhn_ok(dated + str(d)))
    assert not contains_card_number(f"{dated[:4]}/{dated[4:6]}/{dated[6:8]}/{dated[8:]}")
    assert not contains_card_number(f"{pan[:4]}.{pan[4:8]}/{pan[8:12]}.{pan[12:]}")   # marks mixed
    # Numbers split by words are separate runs.
    assert not contains_card_number(f"{pan[:8]} and {pan[8:]}")
    assert not contains_card_number("")


@pytest.mark.parametrize(("phone", "one_run"), [
    ("+86 138 0013 8000", True), ("+49 30 1234 567 890", True),
    ("0044 20 7946 0958", True),                  # leading zeros do not count: 12 digits
    ("0086 138 0013 8000", True),
    ("+44 7700 900 123", True),                   # 12 digits: never a card number
    ("+1 (415) 555-0134 ext 2", False),           # parentheses and words split it
])
def test_phone_like_shapes(phone: str, one_run: bool) -> None:
    """A phone number is not a card number unless its digits pass Luhn; one long number in ten does,
    so the phone attribute (checked against its country's numbering plan instead) is exempt."""
    def ending(last: int) -> str:
        return phone[:-1] + str(last)

    digits = "".join(c for c in phone if c.isdigit())[:-1]
    passing = next(d for d in range(10) if luhn_ok(digits + str(d)))
    for d in range(10):
        if d != passing:
            assert not contains_card_number(ending(d))
    assert contains_card_number(ending(passing)) == (one_run and len(digits.lstrip("0")) + 1 >= 13)


def test_runs_of_more_than_19_digits() -> None:
    """A single group of 20+ digits is a longer number, not judged by its inner 13-19 digit windows
    (one in ten passes Luhn: nearly every 20-digit key would be refused); a zero-padded card number
    and a run of groups are judged by their windows of whole groups."""
    pan = made_up_pan(16)
    assert not contains_card_number(pan + "1234")                 # 20 digits holding a Luhn-valid window
    assert not contains_card_number("1" + pan + "00")
    assert contains_card_number("0000" + pan)                     # zero-padded: still the card number
    assert contains_card_number(grouped(pan, " ") + " 1234")      # its groups and one more
    assert contains_card_number("1234 " + grouped(pan, " "))
    assert contains_card_number(pan + " 1234") and contains_card_number(pan + "-1234")


@given(length=st.integers(13, 19), serial=st.integers(0, 10**6), size=st.integers(1, 8),
       sep=st.sampled_from([" ", "-", " - ", "\u00a0", "\u2013"]),
       before=st.text(alphabet="abc XYZ,.#", max_size=12), after=st.text(alphabet="abc XYZ,.#", max_size=12))
def test_any_grouping_of_a_card_number_in_text_is_found(length: int, serial: int, size: int, sep: str,
                                                         before: str, after: str) -> None:
    pan = made_up_pan(length, serial)
    assert contains_card_number(before + grouped(pan, sep, size) + after)


def test_a_long_adversarial_text_is_quick() -> None:
    """Attribute cells reach 1,000 characters; the detector stays linear enough for them."""
    import time

    started = time.perf_counter()
    for text in ("1 " * 500, "1-" * 500, "1." * 500, "9" * 1000, " " * 999 + "1", "12 " * 333):
        assert not contains_card_number(text)      # no window of ones, or of "12"s, passes Luhn
    assert time.perf_counter() - started < 1.0


def test_ids_are_not_card_numbers() -> None:
    """A UUID or a hex id (a hash, an ObjectId, a run id) is never how a card number is written, but
    its digits make 13-19 digit runs that pass Luhn by chance: 243 of 100,000 uuid4 strings and 180 of
    100,000 32-character hex ids were taken for card numbers (a uuid4 source reference or request id
    refused one time in 400)."""
    pan = made_up_pan()
    uuid_like = f"{pan[:8]}-{pan[8:12]}-{pan[12:16]}-a716-446655440000"      # its first groups: a card number
    hex_id = f"c0ffee{pan[:12]}beef{pan[12:]}"          # a hex word whose digits pass Luhn, none 13 in a row
    for text in (uuid_like, uuid_like.upper(), f"ref {uuid_like}", hex_id, f"run {hex_id}:"):
        assert not contains_card_number(text), text
    assert contains_card_number(f"{pan} {uuid_like}") and contains_card_number(f"{pan}-{uuid_like}")
    assert contains_card_number(f"card{pan}") and contains_card_number(f"ref{pan}end")   # not hex words
    # A hex word between two halves does not join them (blanking must never make a card number).
    assert not contains_card_number(f"{pan[:8]} {hex_id} {pan[8:]}")
    rng = random.Random(7)
    assert not [u for u in (str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(20_000))
                if contains_card_number(u)]
    # Without its dashes too (uuid4().hex, a common request_id): 0.2% of them were refused once a hex
    # word holding 13+ digits in a row was read.
    assert not [u for u in (uuid.UUID(int=rng.getrandbits(128), version=4).hex for _ in range(20_000))
                if contains_card_number(u)]
    # Hex words of a hash's or an id's length are not read, whatever their digits (a SHA-256 hex
    # request_id, an MD5 source key); with a letter and any other length they are read when they hold
    # 13+ digits in a row (a card number with letters beside it).
    assert not [h for h in (f"{rng.getrandbits(128):032x}" for _ in range(20_000)) if contains_card_number(h)]
    assert not [h for h in (hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000))
                if contains_card_number(h)]
    assert not contains_card_number(f"{pan}abcdefab")    # padded to an ObjectId's 24: not found (disguise)
    assert contains_card_number(f"{pan}abcdefa")


@pytest.mark.parametrize("write", [
    lambda p: p + "a", lambda p: "A" + p, lambda p: p + "F", lambda p: "tok_" + p + "abcd",
    lambda p: f"c0ffee{p}beef", lambda p: f"ref {p}F", lambda p: "0" * 3 + p + "deadbeef",
], ids=["letter-after", "letter-before", "upper-after", "tok-suffix", "hex-around", "in-text", "padded"])
def test_a_card_number_beside_hex_letters_is_found(write: object) -> None:
    """A hex word holding 13+ digits in a row is read (F3): one letter beside a card number made the
    whole word look like a hex id and hid it from every guard (display_name, request_id, pci scan)."""
    pan = made_up_pan(16)
    assert contains_card_number(write(pan))  # type: ignore[operator]
    assert not contains_card_number(write(wrong_check_digit(pan)))  # type: ignore[operator]
    assert pan not in redact_digits(write(pan))  # type: ignore[operator]


@pytest.mark.parametrize("value", ["011000015", "011000016", "01100001", "0110000150", "", "01100001x", "０11000015",
                                   "021000021", " 21000021"])
def test_routing_number_ok_agrees_with_parse_routing_number(value: str) -> None:
    try:
        parse_routing_number(value)
        parsed = True
    except InvalidKey:
        parsed = False
    assert routing_number_ok(value) is parsed


def _every_window(groups: list[str]) -> bool:
    """The rule itself, every window of whole groups tried (what _card_window answered before it was
    made linear): the reference it must agree with."""
    for start in range(len(groups)):
        digits = ""
        for group in groups[start:]:
            digits = (digits + group).lstrip("0")
            if len(digits) > 19:
                break
            if len(digits) >= 13 and luhn_ok(digits):
                return True
    return False


@given(st.lists(st.text("00000123456789", min_size=1, max_size=7), min_size=1, max_size=12))
def test_the_windows_of_digit_groups_are_judged_as_every_window_would_be(groups: list[str]) -> None:
    assert _card_window(groups) == _every_window(groups)


def test_a_long_run_of_zero_groups_is_read_in_one_pass_and_a_card_number_after_it_found() -> None:
    """A run of "0 0 0 ..." made every window span the rest of the run (20 kB: 3 s; 100 kB: minutes),
    in the guard every log line passes through (redact_digits)."""
    zeros = " ".join(["0"] * 100_000)
    assert not contains_card_number(zeros)
    assert contains_card_number(f"{zeros} {made_up_pan(16)}")
    assert redact_digits(zeros) == zeros
