"""Survivorship (server/identity/golden.py): each rule of docs/identity.md, "Survivorship". Values are
made up here and are not real-looking people (opaque ids, fictional 555 numbers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from server.identity.attributes import Identity
from server.identity.golden import Contribution, golden

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def rec(age_days: int, record_id: int = 0, **attrs: str) -> Contribution:
    """A record updated `age_days` before the newest (0 = newest)."""
    return Contribution(Identity(**attrs), T0 - timedelta(days=age_days), record_id or 1000 - age_days)


def test_no_records_is_an_empty_identity() -> None:
    assert golden([]) == Identity()


def test_national_id_and_dob_go_by_vote_not_by_recency() -> None:
    out = golden([rec(0, national_id="TYPO1234", national_id_type="", date_of_birth="1970-01-02"),
                  rec(5, national_id="ABCD1234", date_of_birth="1970-02-01"),
                  rec(9, national_id="ABCD1234", date_of_birth="1970-02-01")])
    assert out.national_id == "ABCD1234" and out.date_of_birth == "1970-02-01"


def test_a_tied_vote_goes_to_the_newest_record() -> None:
    out = golden([rec(9, national_id="OLDER111", date_of_birth="1960-03-04"),
                  rec(1, national_id="NEWER222", date_of_birth="1960-04-03"),
                  rec(3, date_of_birth="")])
    assert out.national_id == "NEWER222" and out.date_of_birth == "1960-04-03"
    # Same timestamp: the higher record id is the newer one.
    same = golden([rec(0, record_id=1, date_of_birth="1950-05-06"), rec(0, record_id=2, date_of_birth="1950-06-05")])
    assert same.date_of_birth == "1950-06-05"


def test_national_id_keeps_its_own_type() -> None:
    out = golden([rec(0, national_id="ZZZZ9999", national_id_type=""),
                  rec(1, national_id="ZZZZ9999", national_id_type="GB_NINO"),
                  rec(2, national_id="ZZZZ9999", national_id_type="GB_NINO")])
    assert (out.national_id, out.national_id_type) == ("ZZZZ9999", "GB_NINO")


def test_name_pair_from_the_newest_record_that_has_both() -> None:
    out = golden([rec(0, given_name="newgiven"),                      # newest, but only half a name
                  rec(2, given_name="pat", family_name="lowe"),
                  rec(4, given_name="patricia", family_name="lowe-oldname")])
    assert (out.given_name, out.family_name) == ("pat", "lowe")
    halves = golden([rec(0, given_name="sol"), rec(1, family_name="ortiz"), rec(2, given_name="older")])
    assert (halves.given_name, halves.family_name) == ("sol", "ortiz")


def test_an_initial_gives_way_to_the_name_it_stands_for() -> None:
    """Seen importing a dirty extract: "B." Morrow, the newest record, made the golden name "b morrow"
    over the "brittany morrow" of an older one. An initial names no more than the full name does."""
    out = golden([rec(0, given_name="b", family_name="morrow"),
                  rec(3, given_name="brittany", family_name="morrow"),
                  rec(5, given_name="bea", family_name="morrow")])
    assert (out.given_name, out.family_name) == ("brittany", "morrow")
    # Not the same family name, or not the initial's letter: the newest record's name stands.
    other = golden([rec(0, given_name="b", family_name="morrow"), rec(1, given_name="brittany", family_name="moore")])
    assert (other.given_name, other.family_name) == ("b", "morrow")
    letter = golden([rec(0, given_name="k", family_name="morrow"), rec(1, given_name="brittany", family_name="morrow")])
    assert letter.given_name == "k"


def test_address_lines_are_never_mixed_from_two_records() -> None:
    out = golden([rec(0, locality="newtown", postcode="99999"),          # no first line: not an address
                  rec(1, address_line1="1 elm st", postcode="11111", country="US"),
                  rec(2, address_line1="2 oak ave", address_line2="apt 3", locality="oldtown", region="XX",
                      postcode="22222", country="US")])
    assert (out.address_line1, out.address_line2, out.locality, out.postcode, out.region, out.country) \
        == ("1 elm st", "", "", "11111", "", "US")


def test_phone_and_email_from_the_newest_record_that_has_one() -> None:
    out = golden([rec(0, email="new@example.com"), rec(1, phone="+12025550101"),
                  rec(2, phone="+12025550199", email="old@example.com")])
    assert out.phone == "+12025550101" and out.email == "new@example.com"
    # Order of the input does not matter: recency decides.
    shuffled = golden([rec(2, phone="+12025550199", email="old@example.com"), rec(0, email="new@example.com"),
                       rec(1, phone="+12025550101")])
    assert shuffled == out
