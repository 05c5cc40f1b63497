"""Cache key names: one place, so the read path and the invalidations can never disagree.

Keys carry fingerprints and public ids only, never a clear PAN or account number. A fingerprint key
includes its key version so that, during a fingerprint-key rotation, both versions can be cached.

A card's answer depends on the BIN table too (its network's decision codes: docs/decision-hints.md),
so card keys (by PAN and by token) name the BIN table version the answer was built with (`b<N>:`;
none for version 0, no table). A node that loads a new table reads new keys, so no answer built
with the old table is served once it switched. Writers name cards by their base key (no version);
an invalidation deletes it under every BIN version whose answers may still be cached
(`invalidation_keys`: the node's recent versions on a write, the database's on the relay's pass).

Every key also names the cache format generation of the release that built it (`GENERATION`). A
release that changes what a cached answer holds (as decision hints did), or a key's form, takes the
next generation: its nodes read and fill keys of theirs alone, so during its rollout neither release
serves the other's answers. An invalidation deletes each key under the generations either side of the
writer's own as well, so the two releases of a rollout (or of a rollback) delete each other's keys,
whichever node took the write or ran the relay's pass. Generation 1 keys carry no tag (they are the
keys from before generations: no cold cache at the upgrade that brought them); generation N > 1 keys
start with `g<N>:`. That form is fixed: a release deletes the next one's keys without its code.
Generations go up by one a release (a rollout that skips one leaves each side's answers to the TTL:
docs/deploy.md, section 4).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

GENERATION: Final = 1

CARD_PREFIX = "crd:"
TOKEN_PREFIX = "tok:"
ACCOUNT_PREFIX = "acc:"
CUSTOMER_PREFIX = "cus:"
_TAGGED = re.compile(r"g[0-9]+:")


def generation_tag(generation: int) -> str:
    """What keys of `generation` start with: nothing for 1, `g<N>:` after."""
    return "" if generation == 1 else f"g{generation}:"


TAG: Final = generation_tag(GENERATION)
_CARD = TAG + CARD_PREFIX
_TOKEN = TAG + TOKEN_PREFIX
_ACCOUNT = TAG + ACCOUNT_PREFIX
_CUSTOMER = TAG + CUSTOMER_PREFIX

# Stored in place of a value for a well-formed key that matched nothing (negative cache). A lone
# 0xFF byte is a truncated varint, so it can never be a valid serialized message.
NEGATIVE = b"\xff"


def card_key(fingerprint_version: int, fingerprint: bytes, bins: int = 0) -> str:
    return card_key_prefix(fingerprint_version, bins) + fingerprint.hex()


def card_key_prefix(fingerprint_version: int, bins: int = 0) -> str:
    """What every card key of this fingerprint version and BIN table version starts with (then the
    fingerprint in hex)."""
    return f"{_CARD}{fingerprint_version}:" + (f"b{bins}:" if bins else "")


def token_key(token: str, bins: int = 0) -> str:
    return _TOKEN + (f"b{bins}:" if bins else "") + token


def account_key(fingerprint_version: int, fingerprint: bytes) -> str:
    return f"{_ACCOUNT}{fingerprint_version}:{fingerprint.hex()}"


def customer_key(customer_id: str) -> str:
    return _CUSTOMER + customer_id


def invalidation_keys(keys: Iterable[str], versions: Iterable[int], generation: int = GENERATION) -> list[str]:
    """What deleting `keys` (a writer's: base card keys, of any generation) deletes: each key under the
    generations either side of `generation` and its own, and each card key (by PAN or by token) under
    every one of the BIN table `versions` too (0 included always: the base key itself)."""
    bins = sorted({f"b{v}:" for v in versions if v})
    tags = [generation_tag(g) for g in (generation - 1, generation, generation + 1) if g >= 1]
    out: list[str] = []
    for key in keys:
        if tagged := _TAGGED.match(key):
            key = key[tagged.end():]
        forms = [key]
        if key.startswith(CARD_PREFIX):
            version, _, fingerprint = key[len(CARD_PREFIX):].partition(":")
            forms += [f"{CARD_PREFIX}{version}:{b}{fingerprint}" for b in bins]
        elif key.startswith(TOKEN_PREFIX):
            forms += [TOKEN_PREFIX + b + key[len(TOKEN_PREFIX):] for b in bins]
        out += [tag + form for tag in tags for form in forms]
    return out
