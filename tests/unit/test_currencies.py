"""An account's currency (server/currencies.py): a current ISO 4217 code, exactly as the standard
writes it; empty is USD."""

from __future__ import annotations

import pytest

from server.currencies import DEFAULT_CURRENCY, ISO_4217, is_currency, parse_currency
from server.errors import InvalidKey


@pytest.mark.parametrize("code", ["USD", "EUR", "CHF", "JPY", "ZWG", "XTS"])
def test_current_codes_are_currencies(code: str) -> None:
    assert is_currency(code) and parse_currency(code) == code


@pytest.mark.parametrize("code", ["ZZZ", "HRK", "usd", "US", "EURO", "U$D", "ＵＳＤ", " USD", "USD\n"])
def test_made_up_withdrawn_or_misspelt_codes_are_refused(code: str) -> None:
    assert not is_currency(code)
    with pytest.raises(InvalidKey, match="currency must be an ISO 4217 code such as USD"):
        parse_currency(code)


def test_no_currency_is_the_default() -> None:
    assert parse_currency("") == DEFAULT_CURRENCY == "USD"


def test_the_list_is_iso_4217_as_pycountry_has_it_now() -> None:
    """When the ISO 4217 maintenance agency adds or withdraws a code, pycountry follows; so must the
    node's list (server/currencies.py says how)."""
    import pycountry

    reference = {currency.alpha_3 for currency in pycountry.currencies}
    assert not reference - ISO_4217, f"codes to add: {sorted(reference - ISO_4217)}"
    assert not ISO_4217 - reference, f"codes withdrawn: {sorted(ISO_4217 - reference)}"
