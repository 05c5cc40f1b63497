"""Keyed fingerprints and envelope encryption for card and account numbers (DESIGN.md §5).

- A *fingerprint* is HMAC-SHA256(fingerprint_key[v], value). Lookups go by fingerprint, so a PAN
  is hashed at the edge of the request and goes no further. Keys are versioned so they can rotate.
- The clear value is stored only encrypted: AES-256-GCM under a *data key* (DEK) that is itself
  stored wrapped (AES-256-GCM) under the *key-encryption key* (KEK). Rotating the KEK re-wraps
  data keys without touching card rows.

No I/O here: where keys come from is settings' business (env, files, mounted secrets).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12


class KeyConfigError(ValueError):
    """A key is missing or malformed (raised at start-up, never at the first lookup)."""


def decode_key(text: str, *, what: str) -> bytes:
    """A 32-byte key from base64 (standard or urlsafe, padding optional), decoded strictly: a stray
    character is a typo to report, not one to skip (base64's default skips it, and the key decoded from
    the rest was then "not the key this database was fingerprinted with"). Messages never hold the key."""
    raw = text.strip()
    try:
        key = base64.b64decode(raw.replace("-", "+").replace("_", "/") + "=" * (-len(raw) % 4), validate=True)
    except (ValueError, TypeError) as exc:
        raise KeyConfigError(f"{what} is not valid base64 (a character outside A-Z a-z 0-9 + / - _, or '='"
                             " padding that is not at the end)") from exc
    if len(key) != KEY_BYTES:
        raise KeyConfigError(f"{what} must decode to {KEY_BYTES} bytes (got {len(key)})")
    return key


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def generate_keys() -> dict[str, str]:
    """Fresh random CRS_FINGERPRINT_KEYS and CRS_KEK values (`crs keys generate`, throwaway dev stacks)."""
    return {"CRS_FINGERPRINT_KEYS": f"1:{encode_key(new_key())}", "CRS_KEK": encode_key(new_key())}


def parse_versioned_keys(text: str, *, what: str) -> dict[int, bytes]:
    """'1:BASE64,2:BASE64' -> {1: key, 2: key}."""
    keys: dict[int, bytes] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        version, sep, material = part.partition(":")
        if not sep or not (version.isascii() and version.isdigit()) or int(version) <= 0:
            raise KeyConfigError(f"{what}: each entry must be VERSION:BASE64KEY with VERSION a positive integer")
        if int(version) in keys:
            raise KeyConfigError(f"{what}: version {version} given twice")
        keys[int(version)] = decode_key(material, what=f"{what} version {version}")
    if not keys:
        raise KeyConfigError(f"{what} is empty")
    return keys


class _Mac(Protocol):
    """hmac.HMAC, or the C object under it."""

    def copy(self) -> _Mac: ...
    def update(self, msg: bytes) -> None: ...
    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class Keyring:
    """Fingerprint keys and the KEK. `repr` never shows key material."""

    fingerprint_keys: dict[int, bytes] = field(repr=False)
    fingerprint_version: int
    kek: bytes = field(repr=False)
    kek_version: int = 1
    previous_keks: dict[int, bytes] = field(default_factory=dict, repr=False)   # during KEK rotation
    _macs: dict[int, _Mac] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fingerprint_version not in self.fingerprint_keys:
            raise KeyConfigError(
                f"fingerprint key version {self.fingerprint_version} is not among the configured "
                f"versions {sorted(self.fingerprint_keys)}"
            )
        if len(self.kek) != KEY_BYTES:
            raise KeyConfigError(f"the key-encryption key must be {KEY_BYTES} bytes")
        # A keyed HMAC object copied per call skips re-deriving the padded key each time (~2x faster).
        # The C object under hmac.HMAC where there is one (OpenSSL builds): its copy/update/digest
        # skip the pure-Python wrapper, 1.0 µs a fingerprint instead of 1.5.
        macs = {v: getattr(mac, "_hmac", None) or mac
                for v, mac in ((v, hmac.new(k, digestmod=hashlib.sha256)) for v, k in self.fingerprint_keys.items())}
        object.__setattr__(self, "_macs", macs)

    @property
    def rotation_target(self) -> int | None:
        """A configured version newer than the current one: a fingerprint rotation is under way."""
        newest = max(self.fingerprint_keys)
        return newest if newest > self.fingerprint_version else None

    def fingerprint(self, value: str, version: int | None = None) -> bytes:
        mac = self._macs[self.fingerprint_version if version is None else version].copy()
        mac.update(value.encode("ascii"))
        return mac.digest()

    def wrap(self, dek: bytes, dek_id: int) -> bytes:
        """Wrap under the current KEK."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + AESGCM(self.kek).encrypt(nonce, dek, b"crs:dek:%d" % dek_id)

    def unwrap(self, wrapped: bytes, dek_id: int, kek_version: int | None = None) -> bytes:
        """Unwrap with the KEK of `kek_version` (current when None); KeyConfigError if we lack it."""
        if kek_version is None or kek_version == self.kek_version:
            kek = self.kek
        elif kek_version in self.previous_keks:
            kek = self.previous_keks[kek_version]
        else:
            raise KeyConfigError(f"data key {dek_id} is wrapped under KEK version {kek_version}, which is not"
                                 f" configured (current is {self.kek_version}; set CRS_KEK_PREVIOUS to rotate)")
        return AESGCM(kek).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], b"crs:dek:%d" % dek_id)


class DataKey:
    """An unwrapped data key: encrypts clear PANs and account numbers for storage."""

    __slots__ = ("_aead", "dek_id")

    def __init__(self, dek_id: int, key: bytes) -> None:
        self.dek_id = dek_id
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return f"DataKey(dek_id={self.dek_id})"

    def encrypt(self, clear: str, *, purpose: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, clear.encode("ascii"), purpose)

    def decrypt(self, blob: bytes, *, purpose: bytes) -> str:
        return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], purpose).decode("ascii")

    def seal(self, data: bytes, *, purpose: bytes) -> bytes:
        """Encrypt arbitrary bytes (identity attributes: UTF-8 JSON)."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, purpose)

    def open(self, blob: bytes, *, purpose: bytes) -> bytes:
        return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], purpose)


PAN_PURPOSE = b"crs:pan"
ACCOUNT_PURPOSE = b"crs:account-number"
IDENTITY_PURPOSE = b"crs:identity"
ANSWER_PURPOSE = b"crs:stored-answer"   # a write's answer kept for replays (idempotency)


def account_fingerprint_input(routing: str, account_number: str) -> str:
    return f"{routing}:{account_number}"
