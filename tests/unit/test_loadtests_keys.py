"""The load tests' key picker (loadtests/shared/keys.py): Zipf popularity, scatter, expected statuses, mixes."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from devstack.demo import demo_account_number, demo_customer_id, demo_pan, demo_routing, demo_token
from loadtests.shared.keys import (
    INVALID_ARGUMENT,
    KINDS,
    NOT_FOUND,
    OK,
    DataSet,
    KeyMaker,
    ZipfPicker,
    format_mix,
    integer_weights,
    parse_mix,
    scatter,
)
from server.errors import CrsError
from server.pan import parse_account_number, parse_customer_id, parse_pan, parse_routing_number, parse_token


# -- Zipf ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("skew", [0.0, 0.5, 0.99, 1.2])
def test_rank_probabilities_sum_to_one_and_follow_the_power_law(skew: float) -> None:
    z = ZipfPicker(500, skew, rng=random.Random(1))
    assert math.isclose(sum(z.rank_probability(k) for k in range(500)), 1.0, rel_tol=1e-9)
    for k in (1, 9, 99):
        assert math.isclose(z.rank_probability(k) / z.rank_probability(0), (1 / (k + 1)) ** skew, rel_tol=1e-9)
    assert z.rank_probability(-1) == z.rank_probability(500) == 0.0


def test_empirical_frequencies_match_the_model() -> None:
    z = ZipfPicker(1000, 1.0, rng=random.Random(42), scattered=False)
    draws = 100_000
    counts = Counter(z.pick() for _ in range(draws))
    for rank in (0, 1, 4, 50):
        expected = z.rank_probability(rank) * draws
        assert abs(counts[rank] - expected) < 5 * math.sqrt(expected), (rank, counts[rank], expected)
    top10 = sum(counts[r] for r in range(10)) / draws
    assert abs(top10 - z.top_share(10)) < 0.01
    assert 0.38 < z.top_share(10) < 0.41   # H(10)/H(1000) for s = 1: the hot set a planner should expect


def test_skew_zero_is_uniform() -> None:
    z = ZipfPicker(10, 0.0, rng=random.Random(3), scattered=False)
    counts = Counter(z.pick() for _ in range(50_000))
    assert set(counts) == set(range(10))
    assert max(counts.values()) / min(counts.values()) < 1.15
    assert z.top_share(5) == 0.5


@pytest.mark.parametrize("n", [1, 2, 3, 10, 97, 100, 1000, 4096])
def test_scatter_is_a_permutation(n: int) -> None:
    assert sorted(scatter(r, n) for r in range(n)) == list(range(n))
    z = ZipfPicker(n, 1.0)
    assert sorted(z.index_of_rank(r) for r in range(n)) == list(range(n))


def test_hot_keys_are_spread_over_the_data_set() -> None:
    hot = [scatter(r, 40_000) for r in range(10)]
    assert hot[0] == 0 and len(set(hot)) == 10
    assert max(hot) > 10_000   # not demo indexes 0..9


def test_picks_stay_in_range_and_are_reproducible() -> None:
    z1, z2 = ZipfPicker(77, 0.99, rng=random.Random(5)), ZipfPicker(77, 0.99, rng=random.Random(5))
    s1, s2 = [z1.pick() for _ in range(2000)], [z2.pick() for _ in range(2000)]
    assert s1 == s2
    assert all(0 <= i < 77 for i in s1)


@pytest.mark.parametrize(("n", "skew"), [(0, 1.0), (10, -0.1), (10, math.nan)])
def test_bad_picker_arguments(n: int, skew: float) -> None:
    with pytest.raises(ValueError):
        ZipfPicker(n, skew)


# -- keys and what they expect --------------------------------------------------------------------------
def _parses(kind: str, key: object) -> bool:
    try:
        if kind == "pan":
            parse_pan(key.pan)  # type: ignore[attr-defined]
        elif kind == "token":
            parse_token(key.token)  # type: ignore[attr-defined]
        elif kind == "account":
            parse_routing_number(key.routing)  # type: ignore[attr-defined]
            parse_account_number(key.account_number)  # type: ignore[attr-defined]
        else:
            parse_customer_id(key.customer_id)  # type: ignore[attr-defined]
    except CrsError:
        return False
    return True


@pytest.mark.parametrize("kind", KINDS)
def test_expected_status_matches_the_servers_validation_and_the_data_set(kind: str) -> None:
    data = DataSet(customers=300)
    maker = KeyMaker(data, skew=0.99, unknown=0.2, malformed=0.2, rng=random.Random(7))
    known_values = {
        "pan": {demo_pan(i) for i in range(data.cards)},
        "token": {demo_token(1, i) for i in range(data.cards)},
        "account": {(demo_routing(i), demo_account_number(i)) for i in range(data.accounts)},
        "customer": {demo_customer_id(i) for i in range(data.customers)},
    }[kind]
    seen = Counter()
    for _ in range(3000):
        key = maker.key(kind)
        seen[key.expect] += 1
        value = {"pan": key.pan, "token": key.token, "account": (key.routing, key.account_number),
                 "customer": key.customer_id}[kind]
        assert _parses(kind, key) == (key.expect != INVALID_ARGUMENT), key
        if key.expect == OK:
            assert value in known_values
        elif key.expect == NOT_FOUND:
            assert value not in known_values
    assert abs(seen[INVALID_ARGUMENT] / 3000 - 0.2) < 0.04
    assert abs(seen[NOT_FOUND] / 3000 - 0.2) < 0.04


def test_no_errors_by_default_share_zero() -> None:
    maker = KeyMaker(DataSet(50), unknown=0, malformed=0, rng=random.Random(1))
    assert {maker.any_key().expect for _ in range(500)} == {OK}


def test_token_share_and_categories() -> None:
    maker = KeyMaker(DataSet(100), unknown=0, malformed=0, rng=random.Random(2))
    kinds = Counter(maker.card(0.3).kind for _ in range(5000))
    assert abs(kinds["token"] / 5000 - 0.3) < 0.03
    assert maker.key("pan").category == "known"


def test_bad_shares_and_kinds() -> None:
    with pytest.raises(ValueError):
        KeyMaker(DataSet(10), unknown=0.7, malformed=0.5)
    with pytest.raises(ValueError):
        KeyMaker(DataSet(10)).key("iban")
    with pytest.raises(ValueError):
        DataSet(0)


def test_data_set_shape() -> None:
    d = DataSet(10_000)
    assert (d.cards, d.accounts, d.keys) == (20_000, 15_000, 65_000)


# -- mixes -------------------------------------------------------------------------------------------------
def test_parse_mix_normalises() -> None:
    assert parse_mix("retail=70,ach=20,batch=10") == pytest.approx({"retail": 0.7, "ach": 0.2, "batch": 0.1})
    assert parse_mix("stream") == {"stream": 1.0}
    assert parse_mix("retail=1, retail=1, ach=2") == pytest.approx({"retail": 0.5, "ach": 0.5})
    assert parse_mix("retail=1,ach=0") == {"retail": 1.0}


@pytest.mark.parametrize("text", ["", "retail=0", "iban=3", "retail=x", "retail=-1", "retail=inf"])
def test_parse_mix_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_mix(text)


def test_integer_weights_keep_small_shares() -> None:
    assert integer_weights({"retail": 0.996, "stream": 0.004}) == {"retail": 100, "stream": 1}
    assert format_mix({"retail": 0.7, "ach": 0.3}) == "retail=70,ach=30"
