"""The BIN index (server/bins.py, BinTable) against the rule it implements, checked the slow way: a
prefix belongs to the narrowest range holding it, and of equally narrow ones to the one starting lower,
whatever the order of the rows."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.bins import PREFIX_DIGITS, BinRow, BinTable


def _row(low: str, high: str, n: int) -> BinRow:
    return BinRow(low, high, 16, "testnet", f"Issuer {n}", "US", "credit", False)


@st.composite
def tables(draw: st.DrawFn) -> list[BinRow]:
    """Up to 12 ranges over a few hundred PANs' prefixes (9990xxxxxxx), of 6 to 8 digits, so they
    nest, overlap partially, and repeat one another's width; never two covering the same PANs."""
    rows = []
    for n in range(draw(st.integers(0, 12))):
        width = draw(st.integers(6, 8))
        a = draw(st.integers(0, 10 ** (width - 4) - 1))
        b = draw(st.integers(a, min(a + 30, 10 ** (width - 4) - 1)))
        row = _row("9990" + str(a).zfill(width - 4), "9990" + str(b).zfill(width - 4), n)
        if all((row.start, row.end) != (r.start, r.end) for r in rows):   # an import refuses the same range twice
            rows.append(row)
    return rows


def _slowly(rows: list[BinRow], digits: str) -> BinRow | None:
    point = int(digits[:PREFIX_DIGITS].ljust(PREFIX_DIGITS, "0"))
    holding = [(r.end - r.start, r.start, i) for i, r in enumerate(rows) if r.start <= point <= r.end]
    return rows[min(holding)[2]] if holding else None


@settings(max_examples=300, deadline=None)
@given(tables(), st.lists(st.integers(0, 10 ** 7 - 1), min_size=1, max_size=20))
def test_each_prefix_gets_the_narrowest_range_holding_it_and_of_equals_the_lower(
        rows: list[BinRow], points: list[int]) -> None:
    table, backwards = BinTable(rows, 1), BinTable(rows[::-1], 1)
    # Every boundary and its neighbours, and some points anywhere in the block.
    edges = {v for r in rows for e in (r.start, r.end) for v in (e - 1, e, e + 1)}
    digits = [str(v).zfill(PREFIX_DIGITS) for v in edges] + ["9990" + str(p).zfill(7) for p in points]
    for d in digits:
        if d.startswith("9990"):
            assert table.lookup(d) == backwards.lookup(d) == _slowly(rows, d), d


def test_a_subset_holding_the_prefix_answers_as_the_whole_table() -> None:
    """What `crs bins lookup` relies on (store.bins.covering_rows): only the ranges holding a prefix
    give the same answer as all of them."""
    rows = [_row("999000", "999099", 0), _row("999050", "999149", 1), _row("9990550", "9990559", 2),
            _row("99906000", "99906999", 3), _row("999060", "999069", 4)]
    whole = BinTable(rows, 1)
    for digits in ("99906012345", "99905550000", "99901000000", "99914000000"):
        point = int(digits)
        subset = [r for r in rows if r.start <= point <= r.end]
        assert BinTable(subset, 1).lookup(digits) == whole.lookup(digits)


@settings(max_examples=300, deadline=None)
@given(tables(), st.lists(st.sampled_from(["visa", "mastercard"]), min_size=12, max_size=12),
       st.lists(st.integers(0, 9999), min_size=1, max_size=10), st.integers(6, 8))
def test_a_cards_network_is_the_one_every_number_of_its_prefix_gets(
        rows: list[BinRow], networks: list[str], prefixes: list[int], width: int) -> None:
    """A card known by its first 6 (or 8) digits: its network is the one every number with those digits
    gets from `lookup`, or "" where they get different ones (a table with 8-digit ranges inside the
    6-digit block) or some get none."""
    import dataclasses

    rows = [dataclasses.replace(r, network=networks[i]) for i, r in enumerate(rows)]
    table = BinTable(rows, 1)
    for p in prefixes:
        prefix = "9990" + str(p).zfill(4)[:width - 4]
        low, high = int(prefix.ljust(PREFIX_DIGITS, "0")), int(prefix.ljust(PREFIX_DIGITS, "9"))
        # Every number of the block where the answer may change: its start and each range edge inside.
        points = {low} | {v for r in rows for v in (r.start, r.end + 1) if low <= v <= high}
        got = {(row.network if (row := _slowly(rows, str(v))) else "") for v in points}
        assert table.network_covering(prefix) == (got.pop() if len(got) == 1 else ""), prefix


def test_an_eight_digit_range_inside_a_six_digit_block() -> None:
    rows = [BinRow("999012", "999012", 16, "visa", "Issuer", "US", "credit", False),
            BinRow("99901257", "99901257", 16, "othernet", "Issuer", "US", "credit", False)]
    table = BinTable(rows, 1)
    assert table.network_covering("99901257") == "othernet"   # a card's stored 8 digits
    assert table.network_covering("99901200") == "visa"
    assert table.network_covering("999012") == ""             # 6 digits only: split, so unknown
    assert table.lookup("999012") is not None and table.lookup("999012").network == "visa"   # what hints used
    assert table.network_covering("999013") == ""             # no range


@settings(max_examples=300, deadline=None)
@given(tables(), st.lists(st.integers(0, 9999), min_size=1, max_size=10), st.integers(6, 8))
def test_a_prefix_gets_the_narrowest_range_holding_all_its_numbers_or_none(
        rows: list[BinRow], prefixes: list[int], width: int) -> None:
    """ResolveBin(prefix) (docs/bins.md): the range every number with the prefix gets, when they all get
    one and the same; None where they are split or some get none (`touches` tells the two apart). It
    answered the range of the prefix's first number: a whole BIN went to its first sub-range."""
    table = BinTable(rows, 1)
    for p in prefixes:
        prefix = "9990" + str(p).zfill(4)[:width - 4]
        low, high = int(prefix.ljust(PREFIX_DIGITS, "0")), int(prefix.ljust(PREFIX_DIGITS, "9"))
        points = {low} | {v for r in rows for v in (r.start, r.end + 1) if low <= v <= high}
        got = {_slowly(rows, str(v)) for v in points}
        assert table.covering(prefix) == (got.pop() if len(got) == 1 else None), prefix
        assert table.touches(prefix) == any(_slowly(rows, str(v)) is not None for v in points), prefix
        subset = [r for r in rows if r.start <= high and r.end >= low]   # what `crs bins lookup` loads
        assert BinTable(subset, 1).covering(prefix) == table.covering(prefix)


def test_a_sub_range_at_the_start_of_a_bin_does_not_answer_for_the_bin() -> None:
    block = BinRow("453201", "453201", 16, "visa", "Issuer", "GB", "credit", False)
    cobrand = BinRow("45320100", "45320100", 16, "mastercard", "Tiny Co-brand", "GB", "credit", False)
    table = BinTable([block, cobrand], 1)
    assert table.lookup("453201") == cobrand                     # the first number's range
    assert table.covering("453201") is None and table.touches("453201")
    assert table.covering("45320100") == cobrand and table.covering("45320101") == block
    late = BinTable([BinRow("45320150", "45320199", 16, "visa", "Issuer", "GB", "credit", False)], 1)
    assert late.lookup("453201") is None and late.covering("453201") is None and late.touches("453201")
    assert not late.touches("453202")
