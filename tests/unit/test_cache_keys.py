"""Cache key names (server/cache_keys.py): card keys under BIN table versions, and their expansion."""

from __future__ import annotations

from server import cache_keys as ck


def test_card_keys_name_the_bin_table_version_and_version_0_is_the_base_key() -> None:
    fp = bytes.fromhex("ab" * 32)
    assert ck.card_key(2, fp) == "crd:2:" + "ab" * 32 == ck.card_key(2, fp, 0)
    assert ck.card_key(2, fp, 7) == "crd:2:b7:" + "ab" * 32 == ck.card_key_prefix(2, 7) + fp.hex()
    assert ck.token_key("tok_x") == "tok:tok_x" and ck.token_key("tok_x", 7) == "tok:b7:tok_x"


def test_an_invalidation_reaches_a_card_under_every_version_and_leaves_other_keys_alone() -> None:
    fp = bytes.fromhex("01" * 32)
    keys = [ck.card_key(1, fp), ck.token_key("tok_y"), ck.account_key(1, fp), ck.customer_key("cus_z")]
    got = ck.with_bin_versions(keys, [0, 7, 3, 7])
    assert got == [ck.card_key(1, fp), ck.card_key(1, fp, 3), ck.card_key(1, fp, 7),
                   ck.token_key("tok_y"), ck.token_key("tok_y", 3), ck.token_key("tok_y", 7),
                   ck.account_key(1, fp), ck.customer_key("cus_z")]
    assert ck.with_bin_versions(keys, []) == keys
