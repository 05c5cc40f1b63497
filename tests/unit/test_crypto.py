"""Fingerprints, envelope encryption and key parsing (pure, no servers)."""

from __future__ import annotations

import base64

import pytest
from cryptography.exceptions import InvalidTag

from devstack.demo import demo_pan
from server.crypto import (
    PAN_PURPOSE,
    DataKey,
    KeyConfigError,
    Keyring,
    decode_key,
    encode_key,
    new_key,
    parse_versioned_keys,
)


def _keyring(**kw: object) -> Keyring:
    args: dict[str, object] = {"fingerprint_keys": {1: new_key(), 2: new_key()}, "fingerprint_version": 2,
                               "kek": new_key()}
    args.update(kw)
    return Keyring(**args)  # type: ignore[arg-type]


def test_fingerprint_is_keyed_versioned_and_stable() -> None:
    ring = _keyring()
    pan = demo_pan(5)
    assert ring.fingerprint(pan) == ring.fingerprint(pan, 2)
    assert ring.fingerprint(pan, 1) != ring.fingerprint(pan, 2)
    assert len(ring.fingerprint(pan)) == 32
    assert ring.fingerprint(pan) != _keyring().fingerprint(pan)   # another key, another fingerprint
    assert pan.encode() not in ring.fingerprint(pan)


def test_envelope_round_trip_and_tamper_detection() -> None:
    ring = _keyring()
    dek_bytes = new_key()
    wrapped = ring.wrap(dek_bytes, 7)
    assert ring.unwrap(wrapped, 7) == dek_bytes
    with pytest.raises(InvalidTag):
        ring.unwrap(wrapped, 8)                      # bound to its id
    with pytest.raises(InvalidTag):
        _keyring().unwrap(wrapped, 7)                # another KEK
    dek = DataKey(7, dek_bytes)
    pan = demo_pan(9)
    blob = dek.encrypt(pan, purpose=PAN_PURPOSE)
    assert pan.encode() not in blob
    assert dek.decrypt(blob, purpose=PAN_PURPOSE) == pan
    assert dek.encrypt(pan, purpose=PAN_PURPOSE) != blob   # random nonce
    with pytest.raises(InvalidTag):
        dek.decrypt(blob, purpose=b"crs:account-number")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(InvalidTag):
        dek.decrypt(tampered, purpose=PAN_PURPOSE)


def test_key_parsing_errors_are_clear_and_secret_free() -> None:
    key = new_key()
    assert decode_key(encode_key(key), what="k") == key
    assert parse_versioned_keys(f"1:{encode_key(key)}, 3:{encode_key(key)}", what="K") == {1: key, 3: key}
    with pytest.raises(KeyConfigError, match="32 bytes"):
        decode_key(encode_key(key[:16]), what="CRS_KEK")
    with pytest.raises(KeyConfigError, match="VERSION:BASE64KEY"):
        parse_versioned_keys(encode_key(key), what="CRS_FINGERPRINT_KEYS")
    with pytest.raises(KeyConfigError, match="given twice"):
        parse_versioned_keys(f"1:{encode_key(key)},1:{encode_key(key)}", what="K")
    with pytest.raises(KeyConfigError, match="version 3"):
        _keyring(fingerprint_version=3)
    assert encode_key(key) not in repr(_keyring(kek=key))


def test_a_stray_character_in_a_key_is_a_parse_error_naming_the_variable_and_version() -> None:
    """base64's lenient decoding skipped characters outside its alphabet: `1:<key>!!` gave the same key
    (or, with a character inside it, another one, reported later as "wrong key for this environment?")."""
    key = new_key()
    good = encode_key(key)
    standard = base64.b64encode(key).decode()
    assert decode_key(standard, what="k") == key == decode_key(good, what="k") == decode_key(f" {good}\n", what="k")
    for typo in (f"{good}!!", f"{good[:10]}!{good[10:]}", f"{good[:20]} {good[20:]}", f"{good[:8]}={good[8:]}"):
        with pytest.raises(KeyConfigError, match="CRS_FINGERPRINT_KEYS version 2 is not valid base64") as info:
            parse_versioned_keys(f"1:{good},2:{typo}", what="CRS_FINGERPRINT_KEYS")
        assert good not in str(info.value) and good[:8] not in str(info.value)
        with pytest.raises(KeyConfigError, match="CRS_KEK is not valid base64"):
            decode_key(typo, what="CRS_KEK")
    with pytest.raises(KeyConfigError, match="VERSION:BASE64KEY"):     # a non-ASCII digit is no version
        parse_versioned_keys(f"\u0661:{good}", what="CRS_FINGERPRINT_KEYS")
