"""shard_router.Ring against golden vectors recorded from a real nutcracker, plus its edge cases.

The vectors (tests/unit/vectors/ketama_md5.json.gz) come from scripts/ketama_vectors.py: real
redis-servers behind nutcracker 0.5.0 (distribution: ketama, hash: md5); every key was SET through
nutcracker and then looked up on each redis-server. No nutcracker is needed here.
"""

from __future__ import annotations

import gzip
import json
import math
from bisect import bisect_left, bisect_right
from functools import cache
from hashlib import md5
from pathlib import Path
from typing import Any

import pytest

from shard_router import Ring, ShardSpec
from shard_router.ketama import (
    HASH_SPACE,
    continuum,
    dispatch,
    hashes_per_server,
    key_hash,
    point_values,
    server_order,
)
from shard_router.ring import MAX_TOTAL_WEIGHT, MAX_WEIGHT

VECTORS = Path(__file__).parent / "vectors" / "ketama_md5.json.gz"


@cache
def vectors() -> dict[str, Any]:
    with gzip.open(VECTORS, "rt", encoding="utf-8") as fh:
        doc: dict[str, Any] = json.load(fh)
    assert doc["format"] == "crs-ketama-vectors/1"
    return doc


@cache
def all_keys() -> tuple[str | bytes, ...]:
    doc = vectors()
    return (*doc["text_keys"], *(bytes.fromhex(h) for h in doc["binary_keys_hex"]))


def topology(name: str) -> dict[str, Any]:
    for t in vectors()["topologies"]:
        if t["name"] == name:
            return dict(t)
    raise KeyError(name)


def ring_of(topo: dict[str, Any]) -> Ring:
    return Ring(ShardSpec(name, weight) for name, weight in topo["servers"])


def expected(topo: dict[str, Any]) -> list[str]:
    alphabet = vectors()["alphabet"]
    names = [name for name, _ in topo["servers"]]
    return [names[alphabet.index(c)] for c in topo["assign"]]


def raw(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def owner_for_hash(ring: Ring, h: int) -> str:
    """Reference lookup straight from twemproxy's algorithm (ketama.continuum + ketama.dispatch)."""
    servers = [(s.name, s.weight) for s in ring.shards]
    cont = continuum(servers)
    return servers[cont[dispatch([v for v, _ in cont], h)][1]][0]


# --------------------------------------------------------------------------------------------------
# golden vectors


def test_vector_file_is_complete() -> None:
    doc = vectors()
    names = {t["name"] for t in doc["topologies"]}
    assert {"one", "three", "four", "ten", "weighted", "dns", "edge"} <= names
    assert len(all_keys()) >= 10_000
    assert len(set(map(raw, all_keys()))) == len(all_keys())
    for t in doc["topologies"]:
        assert len(t["assign"]) == len(all_keys())
    assert VECTORS.stat().st_size < 2_000_000
    assert max(len(n) for t in doc["topologies"] for n, _ in t["servers"]) == 63
    assert "" in doc["text_keys"]


@pytest.mark.parametrize("name", [t["name"] for t in vectors()["topologies"]])
def test_node_for_matches_nutcracker(name: str) -> None:
    topo = topology(name)
    ring = ring_of(topo)
    want = expected(topo)
    keys = all_keys()
    got = [ring.node_for(k) for k in keys]
    bad = [(keys[i], want[i], got[i]) for i in range(len(keys)) if got[i] != want[i]]
    assert not bad, f"{len(bad)} keys differ from nutcracker, first: {bad[:5]}"
    # str keys are their UTF-8 bytes
    text = vectors()["text_keys"]
    assert [ring.node_for(k.encode()) for k in text] == want[: len(text)]


@pytest.mark.parametrize("name", [t["name"] for t in vectors()["topologies"]])
def test_group_by_node_matches_nutcracker(name: str) -> None:
    topo = topology(name)
    ring = ring_of(topo)
    want: dict[str, list[int]] = {}
    for i, node in enumerate(expected(topo)):
        want.setdefault(node, []).append(i)
    got = ring.group_by_node(all_keys())
    assert got == want
    assert list(got) == [s.name for s in ring.shards if s.name in want]  # dict in shard order


@pytest.mark.parametrize("name", [t["name"] for t in vectors()["topologies"]])
def test_config_order_does_not_matter(name: str) -> None:
    topo = topology(name)
    shuffled = dict(topo, servers=list(reversed(topo["servers"])))
    ring = ring_of(shuffled)
    assert [ring.node_for(k) for k in all_keys()] == expected(topo)


def test_crafted_cases_hit_their_boundaries() -> None:
    """The crafted keys still sit exactly on the boundaries they claim (so the vectors test them)."""
    doc = vectors()
    cases = doc["crafted"]
    assert len(cases) >= 15
    keys = all_keys()
    for case in cases:
        topo = topology(case["topology"])
        servers = [(n, w) for n, w in topo["servers"]]
        values = [v for v, _ in continuum(servers)]
        h = key_hash(case["key"].encode())
        want = expected(topo)[keys.index(case["key"])]
        assert Ring(ShardSpec(n, w) for n, w in servers).node_for(case["key"]) == want
        text = case["case"]
        if "== largest point" in text:
            assert h == values[-1]
            # bisect_right (uhashring) would wrap to the first point's owner instead
            assert want == owner_for_hash(ring_of(topo), values[-1])
            assert want != owner_for_hash(ring_of(topo), 0)
        elif "== smallest point" in text:
            assert h == values[0]
        elif "== an inner point" in text:
            i = values.index(h)
            assert 0 < i < len(values) - 1
            cont = continuum(servers)
            assert want == servers[cont[i][1]][0] != servers[cont[i + 1][1]][0]
        elif "> largest point" in text:
            assert h > values[-1]
            assert want == owner_for_hash(ring_of(topo), 0)
        elif "< smallest point" in text:
            assert 0 < h < values[0]
        elif "shared by" in text:
            i = bisect_left(values, h)
            assert values[i] == values[i + 1], "lands on a point two servers share"
            first = server_order([n for n, _ in servers])[0]
            assert want == servers[first][0]
        else:  # pragma: no cover
            raise AssertionError(f"unknown crafted case {text!r}")


# --------------------------------------------------------------------------------------------------
# twemproxy's arithmetic


def test_point_strings_and_digest_slices() -> None:
    digest = md5(b"shard-0-0").digest()
    assert point_values("shard-0", 1) == [int.from_bytes(digest[i : i + 4], "little") for i in (0, 4, 8, 12)]
    assert len(point_values("shard-0", 40)) == 160


def test_key_hash_is_md5_prefix_little_endian() -> None:
    assert key_hash(b"abc") == int.from_bytes(md5(b"abc").digest()[:4], "little")
    assert key_hash(b"") == 0  # server_pool_hash: keylen == 0 -> hash 0, no MD5


@pytest.mark.parametrize(
    ("weights", "hashes"),
    [
        ([1], [40]),
        ([1] * 3, [40] * 3),
        ([1] * 24, [40] * 24),
        ([1] * 25, [39] * 25),  # float32: (float)(1/25) * 40 * 25 == 39.999996
        ([1] * 47, [39] * 47),
        ([1, 2, 3, 5], [14, 29, 43, 72]),
        ([1, 1, 1, 10, 12], [7, 7, 7, 80, 95]),  # exact arithmetic: 8, 8, 8, 80, 96
        ([100000, 1, 150000], [47, 0, 71]),
    ],
)
def test_hashes_per_server_uses_float32(weights: list[int], hashes: list[int]) -> None:
    total = sum(weights)
    assert [hashes_per_server(w, total, len(weights)) for w in weights] == hashes


def test_twentyfive_equal_shards_get_156_points() -> None:
    servers = [(f"shard-{i}", 1) for i in range(25)]
    assert len(continuum(servers)) == 25 * 156


def test_equal_weight_point_counts_match_float32_model() -> None:
    def f32_floor(n: int) -> int:
        import struct

        def f(x: float) -> float:
            return float(struct.unpack("<f", struct.pack("<f", x))[0])

        pct = f(1.0 / f(float(n)))
        return math.floor(f(f(f(pct * 160.0) / 4.0) * float(n)))

    for n in range(1, 200):
        assert hashes_per_server(1, n, n) == f32_floor(n)
    short = [n for n in range(1, 100) if hashes_per_server(1, n, n) != 40]
    assert short == [25, 47, 50, 55, 61, 71, 94]


# --------------------------------------------------------------------------------------------------
# boundaries and ties, explicitly


@pytest.fixture(scope="module")
def ring3() -> Ring:
    return Ring([ShardSpec("shard-0"), ShardSpec("shard-1"), ShardSpec("shard-2")])


def test_hash_equal_to_every_point_goes_to_that_point(ring3: Ring) -> None:
    servers = [(s.name, s.weight) for s in ring3.shards]
    cont = continuum(servers)
    for value, index in cont:
        assert owner_for_hash(ring3, value) == servers[index][0]
        assert ring3._owners[bisect_left(ring3._points, value)] == servers[index][0]


def test_hash_just_above_a_point_goes_to_the_next_point(ring3: Ring) -> None:
    servers = [(s.name, s.weight) for s in ring3.shards]
    cont = continuum(servers)
    for i in range(len(cont) - 1):
        assert owner_for_hash(ring3, cont[i][0] + 1) == servers[cont[i + 1][1]][0]


def test_wrap_around(ring3: Ring) -> None:
    servers = [(s.name, s.weight) for s in ring3.shards]
    cont = continuum(servers)
    first_owner = servers[cont[0][1]][0]
    last_value, last_index = cont[-1]
    assert owner_for_hash(ring3, last_value) == servers[last_index][0]  # == last point: no wrap
    assert owner_for_hash(ring3, last_value + 1) == first_owner  # > last point: wraps
    assert owner_for_hash(ring3, HASH_SPACE - 1) == first_owner
    assert owner_for_hash(ring3, 0) == first_owner
    assert ring3._owners[bisect_left(ring3._points, last_value + 1)] == first_owner
    assert ring3._owners[bisect_left(ring3._points, HASH_SPACE - 1)] == first_owner
    assert ring3._owners[bisect_left(ring3._points, last_value)] == servers[last_index][0]


def test_dispatch_is_a_lower_bound_with_wrap() -> None:
    values = [10, 20, 20, 20, 30]
    assert [dispatch(values, h) for h in (0, 10, 11, 19, 20, 21, 30, 31, HASH_SPACE - 1)] == [
        0, 0, 1, 1, 1, 4, 4, 0, 0,
    ]  # fmt: skip
    for h in range(0, 40):
        i = bisect_left(values, h)
        assert dispatch(values, h) == (0 if i == len(values) else i)


def tie_pair(label: str) -> tuple[str, str, int]:
    a, b = (n for n, _ in topology(f"{label}-ab")["servers"])
    shared = set(point_values(a, 40)) & set(point_values(b, 40))
    assert len(shared) == 1
    return a, b, shared.pop()


@pytest.mark.parametrize("label", ["tie-same", "tie-len"])
def test_equal_points_go_to_the_name_twemproxy_sorts_first(label: str) -> None:
    a, b, value = tie_pair(label)
    winner = min(a, b, key=lambda n: (len(n), n))
    for servers in ([ShardSpec(a), ShardSpec(b)], [ShardSpec(b), ShardSpec(a)]):
        ring = Ring(servers)
        i = bisect_left(ring._points, value)
        assert ring._points[i] == value
        assert ring._owners[i] == winner
        assert owner_for_hash(ring, value) == winner
        assert owner_for_hash(ring, value - 1) == winner
        # the loser's copy of the point owns nothing: the point appears once in the lookup table
        assert len(ring._points) == 320 - 1
        assert bisect_right(ring._points, value) == i + 1


def test_tie_len_pair_is_a_real_length_first_case() -> None:
    a, b, _ = tie_pair("tie-len")
    by_bytes = min(a, b)
    by_length = min(a, b, key=lambda n: (len(n), n))
    assert by_bytes != by_length  # proves twemproxy compares length first, not plain strcmp


def test_empty_key_goes_to_the_first_point_not_md5_of_empty(ring3: Ring) -> None:
    first_owner = owner_for_hash(ring3, 0)
    assert ring3.node_for("") == ring3.node_for(b"") == first_owner
    assert ring3.group_by_node(["", b""]) == {first_owner: [0, 1]}
    md5_empty = int.from_bytes(md5(b"").digest()[:4], "little")
    differs = [
        t["name"]
        for t in vectors()["topologies"]
        if owner_for_hash(ring_of(t), md5_empty) != expected(t)[vectors()["text_keys"].index("")]
    ]
    assert differs, "some recorded topology must tell hash 0 from MD5('') apart"


def test_str_keys_are_utf8(ring3: Ring) -> None:
    for key in ["ключ:1", "カード:2", "😀", "plain"]:
        assert ring3.node_for(key) == ring3.node_for(key.encode("utf-8"))
    with pytest.raises(UnicodeEncodeError):
        ring3.node_for("\ud800")


# --------------------------------------------------------------------------------------------------
# API


def test_shards_property_keeps_the_given_order() -> None:
    specs = (ShardSpec("b", 2), ShardSpec("a"), ShardSpec("c"))
    ring = Ring(iter(specs))
    assert ring.shards == specs
    assert repr(ring) == "Ring([b:2, a:1, c:1])"


def test_single_shard_takes_everything() -> None:
    ring = Ring([ShardSpec("only")])
    assert ring.share() == {"only": 1.0}
    assert {ring.node_for(f"k{i}") for i in range(100)} == {"only"}
    assert ring.group_by_node(["x", "y", b""]) == {"only": [0, 1, 2]}


def test_group_by_node_orders_and_omits(ring3: Ring) -> None:
    keys = [f"k{i}" for i in range(200)]
    groups = ring3.group_by_node(keys)
    assert sorted(i for idx in groups.values() for i in idx) == list(range(200))
    for node, idx in groups.items():
        assert idx == sorted(idx)
        assert all(ring3.node_for(keys[i]) == node for i in idx)
    assert ring3.group_by_node([]) == {}
    one = ring3.group_by_node(["k1"])
    assert one == {ring3.node_for("k1"): [0]}


def test_share_counts_the_keyspace(ring3: Ring) -> None:
    share = ring3.share()
    assert list(share) == ["shard-0", "shard-1", "shard-2"]
    assert math.isclose(sum(share.values()), 1.0, abs_tol=1e-12)
    # arc-by-arc recount from the reference continuum
    cont = continuum([(s.name, s.weight) for s in ring3.shards])
    owned = dict.fromkeys(share, 0)
    previous = -1
    for value, index in cont:
        owned[ring3.shards[index].name] += value - previous if value != previous else 0
        previous = value
    owned[ring3.shards[cont[0][1]].name] += HASH_SPACE - 1 - cont[-1][0]
    assert share == {n: c / HASH_SPACE for n, c in owned.items()}
    # and it predicts where keys go
    keys = [f"card:{i}" for i in range(30_000)]
    groups = ring3.group_by_node(keys)
    for name, frac in share.items():
        assert abs(len(groups[name]) / len(keys) - frac) < 0.015
    ring3.share()["shard-0"] = 9.0  # a copy
    assert ring3.share() == share


def test_shard_with_no_points() -> None:
    topo = topology("weighted-zero")
    ring = ring_of(topo)
    assert ring.share()["light"] == 0.0
    assert "light" not in ring.group_by_node(all_keys())


def test_weighted_share_follows_weights() -> None:
    ring = Ring([ShardSpec("a", 1), ShardSpec("b", 3)])
    share = ring.share()
    assert 0.15 < share["a"] < 0.35 < 0.65 < share["b"] < 0.85


@pytest.mark.parametrize(
    "name",
    ["", "x" * 64, "Shard-0", "shard_0", "shard 0", "shard-ü", "shard-0\n", "a/b", "a:b"],
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid shard name") as err:
        ShardSpec(name)
    assert repr(name) in str(err.value)


def test_good_names() -> None:
    for name in ["a", "0", "x.y-z", "shard-0", "s" * 63, "-", "..", "redis-000.cache.example.com"]:
        assert ShardSpec(name).name == name


@pytest.mark.parametrize("weight", [0, -1, MAX_WEIGHT + 1])
def test_bad_weights_are_refused(weight: int) -> None:
    with pytest.raises(ValueError, match=f"invalid weight {weight}") as err:
        ShardSpec("shard-0", weight)
    assert "'shard-0'" in str(err.value)


@pytest.mark.parametrize("weight", [True, 1.0, "1", None])
def test_weight_must_be_an_int(weight: Any) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        ShardSpec("shard-0", weight)


def test_name_must_be_a_str() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        ShardSpec(b"shard-0")  # type: ignore[arg-type]


def test_ring_validation() -> None:
    with pytest.raises(ValueError, match="at least one shard"):
        Ring([])
    with pytest.raises(ValueError, match="duplicate shard name 'shard-1'"):
        Ring([ShardSpec("shard-0"), ShardSpec("shard-1"), ShardSpec("shard-1", 2)])
    with pytest.raises(TypeError, match="ShardSpec"):
        Ring(["shard-0"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=f"total weight {MAX_TOTAL_WEIGHT + 1}"):
        Ring([ShardSpec("a", MAX_WEIGHT), ShardSpec("b", MAX_WEIGHT), ShardSpec("c", 2)])
    Ring([ShardSpec("a", MAX_WEIGHT), ShardSpec("b", MAX_WEIGHT), ShardSpec("c", 1)])


def test_shardspec_is_frozen_and_hashable() -> None:
    spec = ShardSpec("shard-0", 2)
    with pytest.raises(AttributeError):
        spec.weight = 3  # type: ignore[misc]
    assert {spec, ShardSpec("shard-0", 2)} == {spec}


def test_shard_router_imports_no_io_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, shard_router, shard_router.ring, shard_router.ketama\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'redis', 'asyncio', 'socket', 'subprocess', 'selectors', 'ssl', 'grpc', 'asyncpg'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_many_card_keys_spread_over_every_shard_as_the_ring_shares_it() -> None:
    """20,000 card-shaped keys on ten shards: each goes to a shard of the ring, node_for and
    group_by_node agree, and each shard's count follows its share. (Speed is measured by
    scripts/bench_ring.py, not asserted here: a wall-clock threshold depends on the machine's load.)"""
    ring = Ring(ShardSpec(f"shard-{i}") for i in range(10))
    keys = [f"card:{i:016d}" for i in range(20_000)]
    by_node_for: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_node_for.setdefault(ring.node_for(key), []).append(i)
    groups = ring.group_by_node(keys)
    assert groups == by_node_for
    assert list(groups) == [spec.name for spec in ring.shards]   # every shard owns some
    share = ring.share()
    for name, idx in groups.items():
        assert abs(len(idx) / len(keys) - share[name]) < 0.02, (name, len(idx), share[name])
