"""Cache key names: one place, so the read path and the invalidations can never disagree.

Keys carry fingerprints and public ids only, never a clear PAN or account number. A fingerprint key
includes its key version so that, during a fingerprint-key rotation, both versions can be cached.
"""

from __future__ import annotations

CARD_PREFIX = "crd:"
TOKEN_PREFIX = "tok:"
ACCOUNT_PREFIX = "acc:"
CUSTOMER_PREFIX = "cus:"

# Stored in place of a value for a well-formed key that matched nothing (negative cache). A lone
# 0xFF byte is a truncated varint, so it can never be a valid serialized message.
NEGATIVE = b"\xff"


def card_key(fingerprint_version: int, fingerprint: bytes) -> str:
    return card_key_prefix(fingerprint_version) + fingerprint.hex()


def card_key_prefix(fingerprint_version: int) -> str:
    """What every card key of this fingerprint version starts with (then the fingerprint in hex)."""
    return f"{CARD_PREFIX}{fingerprint_version}:"


def token_key(token: str) -> str:
    return TOKEN_PREFIX + token


def account_key(fingerprint_version: int, fingerprint: bytes) -> str:
    return f"{ACCOUNT_PREFIX}{fingerprint_version}:{fingerprint.hex()}"


def customer_key(customer_id: str) -> str:
    return CUSTOMER_PREFIX + customer_id
