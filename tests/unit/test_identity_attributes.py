"""Normalisation of identity attributes (server/identity/attributes.py, nationalid.py): pure, no servers.
National ids are made up at run time with python-stdnum's own check-digit functions."""

from __future__ import annotations

import datetime as dt
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stdnum import luhn
from stdnum.br import cpf
from stdnum.es import dni

from devstack.demo import TEST_BIN_PREFIX
from server.identity.attributes import (
    CARD_NUMBER,
    AttributeProblem,
    normalise_address_line,
    normalise_date_of_birth,
    normalise_email,
    normalise_name,
    normalise_phone,
    normalise_postcode,
    parse_identity,
    parse_source_ref,
)
from server.identity.nationalid import NationalIdError, normalise_national_id
from server.pan import luhn_check_digit, luhn_ok

rng = random.Random(20240601)


def made_up_ssn() -> str:
    return f"{rng.randrange(1, 600):03d}{rng.randrange(1, 100):02d}{rng.randrange(1, 10000):04d}"


def made_up_sin() -> str:
    body = str(rng.choice((1, 2, 3, 4, 5, 6, 7, 9))) + "".join(str(rng.randrange(10)) for _ in range(7))
    return body + luhn.calc_check_digit(body)


def made_up_dni() -> str:
    body = f"{rng.randrange(10_000_000, 100_000_000)}"
    return body + dni.calc_check_digit(body)


def made_up_cpf() -> str:
    while True:
        body = "".join(str(rng.randrange(10)) for _ in range(9))
        if len(set(body)) > 1:
            return body + cpf._calc_check_digits(body)


def wrong_last_digit(value: str) -> str:
    return value[:-1] + str((int(value[-1]) + 1) % 10)


# --- names -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "normal"), [
    ("  Zoë  Ó'Brien ", "zoe o'brien"),
    ("JOSÉ", "jose"),
    ("Straße", "strasse"),
    ("Anne-Marie", "anne-marie"),
    ("Ｊｏｈｎ", "john"),                 # NFKC: full-width letters
    ("Иван", "иван"),                    # any script, case-folded
    ("李 小龙", "李 小龙"),
    ("O'Neil3", "o'neil"),               # digits dropped
])
def test_names_normalise(raw: str, normal: str) -> None:
    assert normalise_name("given_name", raw) == normal


@pytest.mark.parametrize("raw", ["1234", "a\x00b", "x" * 101])
def test_bad_names_are_refused(raw: str) -> None:
    with pytest.raises(AttributeProblem) as caught:
        normalise_name("given_name", raw)
    assert caught.value.field == "given_name"


@given(st.text(alphabet=st.characters(categories=("L", "Zs", "Mn", "Pd")), min_size=1, max_size=40))
def test_name_normalisation_is_idempotent(raw: str) -> None:
    try:
        once = normalise_name("given_name", raw)
    except AttributeProblem:
        return
    assert normalise_name("given_name", once) == once


# --- phone, email, postcode, address ---------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["(212) 736-5000", "212.736.5000", "+1 212 736 5000", "1-212-736-5000",
                                 "2127365000"])
def test_phone_formats_give_one_e164(raw: str) -> None:
    assert normalise_phone(raw, "US") == "+12127365000"


def test_phone_uses_the_address_country() -> None:
    assert normalise_phone("020 7946 0000", "GB") == "+442079460000"
    with pytest.raises(AttributeProblem):
        normalise_phone("12", "US")


def test_email_postcode_address() -> None:
    assert normalise_email(" Jane.Doe@Example.COM ") == "jane.doe@example.com"
    with pytest.raises(AttributeProblem):
        normalise_email("not-an-email")
    assert normalise_postcode("sw1a 1aa") == "SW1A1AA"
    assert normalise_address_line("address_line1", "12 Main Street, Apartment 4") == "12 main st apt 4"
    assert normalise_address_line("address_line1", "12 MAIN ST.") == "12 main st"


# --- national ids ----------------------------------------------------------------------------------------
def test_national_ids_are_canonical_per_type() -> None:
    ssn = made_up_ssn()
    assert normalise_national_id("US_SSN", f"{ssn[:3]}-{ssn[3:5]}-{ssn[5:]}") == ssn
    sin = made_up_sin()
    assert normalise_national_id("CA_SIN", f"{sin[:3]} {sin[3:6]} {sin[6:]}") == sin
    d = made_up_dni()
    assert normalise_national_id("ES_DNI", d.lower()) == d
    c = made_up_cpf()
    assert normalise_national_id("BR_CPF", f"{c[:3]}.{c[3:6]}.{c[6:9]}-{c[9:]}") == c
    assert normalise_national_id("", "ab-12 34") == "AB1234"


@pytest.mark.parametrize("kind, make", [("CA_SIN", made_up_sin), ("BR_CPF", made_up_cpf)])
def test_check_digit_failures_are_refused(kind: str, make: object) -> None:
    value = make()  # type: ignore[operator]
    with pytest.raises(NationalIdError) as caught:
        normalise_national_id(kind, wrong_last_digit(value))
    assert value[:-1] not in str(caught.value)        # the message never holds the id


@pytest.mark.parametrize("area", ["000", "666", "900", "987"])
def test_ssn_reserved_areas_are_refused(area: str) -> None:
    with pytest.raises(NationalIdError):
        normalise_national_id("US_SSN", area + made_up_ssn()[3:])


def test_ssn_zero_group_or_serial_is_refused() -> None:
    ssn = made_up_ssn()
    for bad in (ssn[:3] + "00" + ssn[5:], ssn[:5] + "0000"):
        with pytest.raises(NationalIdError):
            normalise_national_id("US_SSN", bad)


def test_parse_identity_lenient_drops_a_bad_attribute_and_strict_refuses() -> None:
    raw = {"given_name": "Ann", "family_name": "Lee", "date_of_birth": "1980-02-30", "national_id": "666123456",
           "national_id_type": "US_SSN", "phone": "212 736 5000"}
    identity, problems = parse_identity(raw, strict=False)
    assert identity.given_name == "ann" and identity.date_of_birth == "" and identity.national_id == ""
    assert identity.phone == "+12127365000"
    assert {p.field for p in problems} == {"date_of_birth", "national_id"}
    assert all("666123456" not in str(p) for p in problems)
    with pytest.raises(AttributeProblem):
        parse_identity(raw, strict=True)


# --- card numbers are refused in free text and source references -------------------------------------
def made_up_pan(length: int = 16) -> str:
    """Luhn-valid, in the reserved test BIN range, made at run time."""
    body = TEST_BIN_PREFIX + "".join(str(rng.randrange(10)) for _ in range(length - len(TEST_BIN_PREFIX) - 1))
    return body + luhn_check_digit(body)


def spaced(pan: str) -> str:
    return " ".join(pan[i:i + 4] for i in range(0, len(pan), 4))


FREE_TEXT = {"given_name": "Ann {}", "family_name": "{}", "address_line1": "12 Main St {}",
             "address_line2": "card {} x", "locality": "{}", "region": "{}", "postcode": "{}",
             "email": "{}@example.com"}
PERSON = {"given_name": "Ann", "family_name": "Lee", "address_line1": "12 Main Street", "locality": "Springfield",
          "region": "IL", "postcode": "62704", "country": "US", "phone": "212 736 5000", "email": "ann@example.com"}


@pytest.mark.parametrize("field", sorted(FREE_TEXT))
@pytest.mark.parametrize("write", [str, spaced, lambda p: "-".join(spaced(p).split())], ids=["run", "spaced", "dashed"])
def test_a_card_number_in_free_text_is_refused_never_echoed(field: str, write: object) -> None:
    pan = made_up_pan(16 if field != "postcode" else 13)     # a postcode is at most 16 characters
    value = FREE_TEXT[field].format(write(pan))  # type: ignore[operator]
    if field == "postcode" and len(value) > 16:
        value = pan
    raw = dict(PERSON, **{field: value})
    with pytest.raises(AttributeProblem) as caught:
        parse_identity(raw, strict=True)                          # an RPC: INVALID_ARGUMENT
    assert caught.value.field == field and caught.value.reason == CARD_NUMBER
    identity, problems = parse_identity(raw, strict=False)        # an import: dropped, a warning
    assert [(p.field, p.reason) for p in problems] == [(field, CARD_NUMBER)]
    assert getattr(identity, field) == ""
    kept = parse_identity(PERSON, strict=True)[0]
    assert identity == kept.without(field)                        # everything else is kept
    for text in (str(caught.value), *map(str, problems), repr(identity)):
        assert pan not in text and pan[-8:] not in "".join(c for c in text if c.isdigit())


@pytest.mark.parametrize(("field", "write"), [
    ("address_line1", lambda p: ";".join(spaced(p).split())),      # normalising turns ; , . into spaces
    ("address_line2", lambda p: ".".join(p[i:i + 2] for i in range(0, len(p), 2))),
    ("postcode", lambda p: p[:6] + "--" + p[6:]),                   # a postcode loses its dashes
])
def test_a_card_number_that_normalising_joins_is_refused(field: str, write: object) -> None:
    """The raw text's check keeps digit groups split by ; , . or a double dash apart (docs/security.md),
    but the value as stored (and answered by GetCustomerIdentity) had them joined: checked again."""
    pan = made_up_pan(16 if field != "postcode" else 13)
    raw = dict(PERSON, **{field: write(pan)})  # type: ignore[operator]
    with pytest.raises(AttributeProblem) as caught:
        parse_identity(raw, strict=True)
    assert caught.value.field == field and caught.value.reason == CARD_NUMBER
    identity, problems = parse_identity(raw, strict=False)
    assert [(p.field, p.reason) for p in problems] == [(field, CARD_NUMBER)] and getattr(identity, field) == ""


def test_numbers_that_are_not_card_numbers_stay() -> None:
    pan = made_up_pan()
    bad = pan[:-1] + str((int(pan[-1]) + 1) % 10)
    assert not luhn_ok(bad)
    identity, problems = parse_identity(dict(PERSON, address_line2=f"ref {bad}", region="12345678901"), strict=False)
    assert not problems and identity.address_line2 == f"ref {bad}" and identity.region == "12345678901"


def test_the_phone_is_exempt() -> None:
    """Checked against its numbering plan instead: a 13-digit mobile number passing Luhn is a phone."""
    digits = "861380013800"
    digits += luhn_check_digit(digits)
    assert len(digits) == 13 and luhn_ok(digits)
    identity, problems = parse_identity(dict(PERSON, phone="+" + digits), strict=True)
    assert identity.phone == "+" + digits and not problems


@pytest.mark.parametrize("key", ["{}", "{} ", "card-{}", "K {}", "{}-2027"])
@pytest.mark.parametrize("write", [str, spaced], ids=["run", "spaced"])
def test_a_source_ref_holding_a_card_number_is_refused(key: str, write: object) -> None:
    pan = made_up_pan()
    value = key.format(write(pan)).strip()  # type: ignore[operator]
    with pytest.raises(AttributeProblem) as caught:
        parse_source_ref("cards-platform", value)
    assert caught.value.field == "source_ref.key" and caught.value.reason == CARD_NUMBER
    assert pan not in str(caught.value) and pan[:6] not in str(caught.value)
    with pytest.raises(AttributeProblem) as caught:
        parse_source_ref(pan, "K-1")
    assert caught.value.field == "source_ref.system" and pan not in str(caught.value)


def test_source_refs_that_are_not_card_numbers_stay() -> None:
    pan = made_up_pan()
    for key in ("R-12345", "0b7d1c2e9f0a", "123456789012", pan[:-1] + str((int(pan[-1]) + 1) % 10),
                pan + "1234"):                        # 20 digits: a longer number, not a card number
        assert parse_source_ref("core", key).key == key


def test_a_birth_date_that_is_today_somewhere_is_accepted_whatever_the_nodes_zone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check was date.today(): the node's local date. On a node at UTC-12 the date in UTC+14 is a day
    or two ahead, and a baby born there today was refused ("must be between 1900 and today")."""
    monkeypatch.setenv("TZ", "Etc/GMT+12")      # POSIX sign: UTC-12
    time.tzset()
    try:
        born = dt.datetime.now(dt.timezone(dt.timedelta(hours=14))).date()
        assert normalise_date_of_birth(born.isoformat()) == born.isoformat()
        with pytest.raises(AttributeProblem, match="between"):
            normalise_date_of_birth((born + dt.timedelta(days=1)).isoformat())
    finally:
        monkeypatch.undo()
        time.tzset()
