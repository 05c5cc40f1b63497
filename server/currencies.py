"""ISO 4217 currency codes. An account's currency must be a code of the standard's current list, as
pycountry carries it (the Debian iso-codes data, which follows the ISO 4217 maintenance agency's
amendments): three upper-case letters alone let "ZZZ" or a withdrawn code such as "HRK" through.
"""

from __future__ import annotations

import functools

import pycountry

from server.errors import InvalidKey

DEFAULT_CURRENCY = "USD"


@functools.cache
def _codes() -> frozenset[str]:
    return frozenset(currency.alpha_3 for currency in pycountry.currencies)


def is_currency(value: str) -> bool:
    """Whether `value` is a current ISO 4217 alphabetic code, exactly as written (upper case)."""
    return value in _codes()


def parse_currency(value: str) -> str:
    """A request's currency: empty is DEFAULT_CURRENCY; anything else must be a current ISO 4217 code."""
    currency = value or DEFAULT_CURRENCY
    if not is_currency(currency):
        raise InvalidKey("currency must be an ISO 4217 code such as USD")
    return currency
