"""ISO 4217 currency codes. An account's currency must be a code of the standard's current list:
three upper-case letters alone let "ZZZ" or a withdrawn code such as "HRK" through.

The list is kept here, not read from a package at run time, so the node carries no 8 MB of locale
data for 178 codes. pycountry (the Debian iso-codes data, which follows the ISO 4217 maintenance
agency's amendments) is its reference, pinned in pyproject.toml's dev extra so that CI does not turn
red on an upstream release: bump the pin, and tests/unit/test_currencies.py lists the codes to add or
withdraw here.
"""

from __future__ import annotations

from server.errors import InvalidKey

DEFAULT_CURRENCY = "USD"
ISO_4217 = frozenset("""
AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD
CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP
GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR
KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN
MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD
SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX
USD USN UYI UYU UYW UZS VED VES VND VUV WST XAD XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD
XPF XPT XSU XTS XUA XXX YER ZAR ZMW ZWG
""".split())


def is_currency(value: str) -> bool:
    """Whether `value` is a current ISO 4217 alphabetic code, exactly as written (upper case)."""
    return value in ISO_4217


def parse_currency(value: str) -> str:
    """A request's currency: empty is DEFAULT_CURRENCY; anything else must be a current ISO 4217 code."""
    currency = value or DEFAULT_CURRENCY
    if not is_currency(currency):
        raise InvalidKey("currency must be an ISO 4217 code such as USD")
    return currency
