"""Cache key names: one place, so the read path and the invalidations can never disagree.

Keys carry fingerprints and public ids only, never a clear PAN or account number. A fingerprint key
includes its key version so that, during a fingerprint-key rotation, both versions can be cached.

A card's answer depends on the BIN table too (its network's decision codes: docs/decision-hints.md),
so card keys (by PAN and by token) name the BIN table version the answer was built with (`b<N>:`;
none for version 0, no table). A node that loads a new table reads new keys, so no answer built
with the old table is served once it switched. Writers name cards by their base key (no version);
an invalidation deletes it under every BIN version whose answers may still be cached
(`with_bin_versions`: the node's recent versions on a write, the database's on the relay's pass).
"""

from __future__ import annotations

from collections.abc import Iterable

CARD_PREFIX = "crd:"
TOKEN_PREFIX = "tok:"
ACCOUNT_PREFIX = "acc:"
CUSTOMER_PREFIX = "cus:"

# Stored in place of a value for a well-formed key that matched nothing (negative cache). A lone
# 0xFF byte is a truncated varint, so it can never be a valid serialized message.
NEGATIVE = b"\xff"


def card_key(fingerprint_version: int, fingerprint: bytes, bins: int = 0) -> str:
    return card_key_prefix(fingerprint_version, bins) + fingerprint.hex()


def card_key_prefix(fingerprint_version: int, bins: int = 0) -> str:
    """What every card key of this fingerprint version and BIN table version starts with (then the
    fingerprint in hex)."""
    return f"{CARD_PREFIX}{fingerprint_version}:" + (f"b{bins}:" if bins else "")


def token_key(token: str, bins: int = 0) -> str:
    return TOKEN_PREFIX + (f"b{bins}:" if bins else "") + token


def with_bin_versions(keys: Iterable[str], versions: Iterable[int]) -> list[str]:
    """`keys` with each base card key (by PAN or by token) under every one of the BIN table
    `versions` (0 included always: the base key itself); other keys as they are."""
    tags = sorted({f"b{v}:" for v in versions if v})
    out: list[str] = []
    for key in keys:
        out.append(key)
        if key.startswith(CARD_PREFIX):
            version, _, fingerprint = key[len(CARD_PREFIX):].partition(":")
            out += [f"{CARD_PREFIX}{version}:{tag}{fingerprint}" for tag in tags]
        elif key.startswith(TOKEN_PREFIX):
            out += [TOKEN_PREFIX + tag + key[len(TOKEN_PREFIX):] for tag in tags]
    return out


def account_key(fingerprint_version: int, fingerprint: bytes) -> str:
    return f"{ACCOUNT_PREFIX}{fingerprint_version}:{fingerprint.hex()}"


def customer_key(customer_id: str) -> str:
    return CUSTOMER_PREFIX + customer_id
