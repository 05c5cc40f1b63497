"""The splink SQL levels that train the weights (loadtests/identity/train.py) give the same level as
server/identity/compare.py on generated pairs: otherwise the trained m/u would belong to other levels.
Runs DuckDB on a small sample (needs the [load] extra: duckdb, splink, faker)."""

from __future__ import annotations

import random
from itertools import combinations

import pytest

pytest.importorskip("duckdb")
pytest.importorskip("splink")
pytest.importorskip("faker")

import pyarrow as pa

from loadtests.identity.people import generate
from loadtests.identity.quality import normalise
from loadtests.identity.train import (
    SQL_LEVELS,
    check_levels_match_compare,
    duckdb_connection,
    splink_records,
)
from server.identity.cluster import candidate_pairs
from server.identity.compare import COMPARISONS, MISSING, compare


def _case(missing: str, levels: list[tuple[str, str]]) -> str:
    whens = [f"WHEN {missing} THEN '{MISSING}'"]
    whens += [f"WHEN {sql} THEN '{level}'" for level, sql in levels if sql != "ELSE"]
    return "CASE " + " ".join(whens) + " ELSE 'else' END"


def test_sql_levels_name_the_levels_of_compare() -> None:
    check_levels_match_compare()
    assert list(SQL_LEVELS) == list(COMPARISONS)


def test_sql_levels_agree_with_compare_on_generated_pairs() -> None:
    identities = normalise(generate(1500, seed=3))
    rng = random.Random(3)
    pairs = candidate_pairs(identities)                             # mostly duplicates and hard negatives
    pairs |= set(rng.sample(list(combinations(range(len(identities)), 2)), 3000))   # mostly strangers
    con = duckdb_connection()
    records = splink_records(identities)
    con.register("records", pa.table(records))
    con.register("pairs", pa.table({"a": [i for i, _ in pairs], "b": [j for _, j in pairs]}))
    columns = [c for c in records if c != "unique_id"]
    select = ", ".join(f"l.{c} AS {c}_l, r.{c} AS {c}_r" for c in columns)
    cases = ", ".join(f"{_case(missing, levels)} AS {attribute}" for attribute, (missing, levels) in SQL_LEVELS.items())
    rows = con.sql(f"""
        WITH joined AS (SELECT p.a, p.b, {select} FROM pairs p
                        JOIN records l ON l.unique_id = p.a JOIN records r ON r.unique_id = p.b)
        SELECT a, b, {cases} FROM joined ORDER BY a, b""").fetchall()
    assert len(rows) == len(pairs)
    disagreements = []
    seen_levels: set[tuple[str, str]] = set()
    for a, b, *levels in rows:
        expected = compare(identities[a], identities[b])
        got = dict(zip(SQL_LEVELS, levels, strict=True))
        seen_levels.update(expected.items())
        if got != expected:
            disagreements.append((a, b, {k: (expected[k], got[k]) for k in got if got[k] != expected[k]}))
    assert not disagreements, disagreements[:5]
    # The sample exercises most levels (not only exact and else).
    assert len(seen_levels) >= 25
