"""An account's currency (server/currencies.py): a current ISO 4217 code, exactly as the standard
writes it; empty is USD."""

from __future__ import annotations

import pytest

from server.currencies import DEFAULT_CURRENCY, is_currency, parse_currency
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
