"""Blocking keys: which stored records a new identity is compared with (pure).

Scoring every customer is impossible at 10M, so candidate search reads only the records that share
at least one blocking key with the query. Each key combines attributes so that a typical duplicate
(a typo, a nickname, a swapped name, a new address, a transposed date) still shares some key with
its original while a key's block stays small (docs/identity.md lists them and what each catches).

Keys are stored and searched as keyed hashes (`block_hash`: the first 8 bytes of an HMAC under the
fingerprint key, as a signed 64-bit integer): the blocking table holds no clear name, date or
number. A query's block that holds more than `MAX_BLOCK` records is skipped: it is too common
(a family name and a birth year shared by thousands) to tell anyone apart; unless the records
are one customer's (server/store/identity.py `_chosen`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import jellyfish

from server.identity.attributes import Identity

MAX_BLOCK = 500
_LABEL = b"crs:identity-block:"
_SHA256_BLOCK = 64


def _phonetic(name: str) -> str:
    """Soundex of the first word (Latin script), else the name's first four letters."""
    first = name.split(" ")[0]
    if first.isascii():
        code = jellyfish.soundex(first.replace("'", "").replace("-", ""))
        if code:
            return str(code)
    return first[:4]


def blocking_keys(identity: Identity) -> list[str]:
    """The clear blocking keys of an identity (hash them with `block_hash` before storing or searching)."""
    i = identity
    keys: list[str] = []
    given = _phonetic(i.given_name) if i.given_name else ""
    family = _phonetic(i.family_name) if i.family_name else ""
    year = i.date_of_birth[:4]
    if i.national_id:
        keys.append(f"nid|{i.national_id_key}")
    if i.date_of_birth and family:
        keys.append(f"dob+fam|{i.date_of_birth}|{family}")
    if i.date_of_birth and given:
        keys.append(f"dob+giv|{i.date_of_birth}|{given}")
    if given and family:
        pair = "|".join(sorted((given, family)))    # order-free: a swapped name shares it
        if year:
            keys.append(f"names+yr|{pair}|{year}")
        if i.postcode:
            keys.append(f"names+pc|{pair}|{i.postcode}")
    if i.phone:
        keys.append(f"phone|{i.phone}")
    if i.email:
        keys.append(f"email|{i.email}")
    if i.family_name and i.postcode and i.address_line1:
        keys.append(f"fam+addr|{family}|{i.postcode}|{i.address_line1.split(' ')[0]}")
    return keys


@lru_cache(maxsize=8)
def _keyed(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256 (RFC 2104) under `key` as its two SHA-256 states, the inner one already fed the
    label: a hash copies both instead of an `hmac` object (0.8 us a hash instead of 1.4; an import
    hashes ~7 keys a row)."""
    if len(key) > _SHA256_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_SHA256_BLOCK, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + _LABEL)
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


def block_hash(key: bytes, clear: str) -> int:
    """A blocking key as stored: HMAC-SHA256 under `key` (a fingerprint key), first 8 bytes, signed."""
    keyed_inner, keyed_outer = _keyed(key)
    inner, outer = keyed_inner.copy(), keyed_outer.copy()
    inner.update(clear.encode("utf-8"))
    outer.update(inner.digest())
    return int.from_bytes(outer.digest()[:8], "big", signed=True)


def block_hashes(key: bytes, identity: Identity, keys: Sequence[str] | None = None) -> list[int]:
    """The identity's blocking keys hashed (`keys`: its blocking_keys when the caller has them)."""
    return sorted({block_hash(key, k) for k in (blocking_keys(identity) if keys is None else keys)})
