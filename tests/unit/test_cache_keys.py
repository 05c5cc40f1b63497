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
    got = ck.invalidation_keys(keys, [0, 7, 3, 7])
    cards = [ck.card_key(1, fp), ck.card_key(1, fp, 3), ck.card_key(1, fp, 7)]
    tokens = [ck.token_key("tok_y"), ck.token_key("tok_y", 3), ck.token_key("tok_y", 7)]
    assert got == [*cards, *("g2:" + k for k in cards), *tokens, *("g2:" + k for k in tokens),
                   ck.account_key(1, fp), "g2:" + ck.account_key(1, fp),
                   ck.customer_key("cus_z"), "g2:" + ck.customer_key("cus_z")]
    assert ck.invalidation_keys(keys, []) == [f for k in keys for f in (k, "g2:" + k)]


def test_keys_of_generation_1_carry_no_tag_and_later_ones_start_with_theirs() -> None:
    """Generation 1 keys are the keys from before generations (no cold cache at the upgrade)."""
    fp = bytes.fromhex("ab" * 32)
    assert ck.GENERATION == 1 and ck.TAG == ""
    assert ck.card_key(2, fp) == "crd:2:" + "ab" * 32 and ck.customer_key("cus_z") == "cus:cus_z"
    assert ck.generation_tag(1) == "" and ck.generation_tag(2) == "g2:" and ck.generation_tag(13) == "g13:"


def test_an_invalidation_deletes_under_the_generations_either_side_of_the_writer_s() -> None:
    """The two releases of a rollout delete each other's keys: generation 1's writer deletes generation
    2's keys, generation 2's deletes generation 1's and 3's; a generation 2 writer's keys (tagged) come
    out the same as their base forms."""
    fp = bytes.fromhex("02" * 32)
    base = [ck.card_key(1, fp), ck.token_key("tok_y"), ck.account_key(1, fp), ck.customer_key("cus_z")]
    one = ck.invalidation_keys(base, [5], generation=1)
    assert set(one) == {
        "crd:1:" + "02" * 32, "crd:1:b5:" + "02" * 32, "g2:crd:1:" + "02" * 32, "g2:crd:1:b5:" + "02" * 32,
        "tok:tok_y", "tok:b5:tok_y", "g2:tok:tok_y", "g2:tok:b5:tok_y",
        "acc:1:" + "02" * 32, "g2:acc:1:" + "02" * 32, "cus:cus_z", "g2:cus:cus_z"}
    assert len(one) == len(set(one))
    two = ck.invalidation_keys(base, [5], generation=2)
    assert set(two) == set(one) | {"g3:" + k for k in one if not k.startswith("g")}
    tagged = ["g2:" + k for k in base]
    assert ck.invalidation_keys(tagged, [5], generation=2) == two
    assert ck.invalidation_keys(tagged, [5], generation=1) == one
    assert ck.invalidation_keys(["g12:cus:cus_z"], [], generation=12) == ["g11:cus:cus_z", "g12:cus:cus_z",
                                                                          "g13:cus:cus_z"]
