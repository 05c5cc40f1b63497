"""`crs-load identity-train`: train the identity model's m and u probabilities with splink (Fellegi–
Sunter, EM on DuckDB) from generated people, and write server/identity/weights.json.

The model scores exactly the comparison levels of server/identity/compare.py (COMPARISONS). Each is
written here once more as a splink comparison of custom SQL levels over the normalised records
(`SQL_LEVELS`: same attributes, same level names, same thresholds, strongest level first), so splink
counts the levels our code will see. Two levels need help from outside SQL:

- nickname: every record carries the set of variants of its first given name (the `nicknames` table
  compare.py uses, `given_variants`), and the level tests list membership both ways;
- address "similar": rapidfuzz's token-set ratio, registered in DuckDB as the function
  `token_set_ratio` (the very function compare.py calls).

tests/unit/test_identity_train.py checks on generated pairs that the SQL and compare.py agree.

Training, unsupervised (the truth of the generated people is never read here):
1. u: splink's random sampling of record pairs (nearly all are two different people);
2. m: EM over pairs blocked by a few rules (`EM_BLOCKS`); each rule leaves the comparisons it blocks
   on untrained in that round, so the rules together train every comparison;
3. the prior: our model applies it to *candidate pairs* (pairs that share a blocking key of
   server/identity/blocking.py), not to two random records. splink estimates the share of matching
   pairs among all pairs from deterministic rules (`DETERMINISTIC`, assumed to find 80% of them);
   times all pairs that is the number of matching pairs, and divided by the number of candidate
   pairs (blocking assumed to keep every match) it is the share of matches among candidate pairs,
   written as `prior_match_probability`. (EM on the prior alone over the candidate pairs was tried
   and is degenerate: with u from random pairs, candidate pairs that share a name or an address all
   look like matches and the prior runs to 1.)

A level EM never saw among the blocked pairs gets m = u (weight 0: no evidence either way); a u
splink leaves at zero is floored at FLOOR (never an infinite weight).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests.identity.people import generate
from server.identity.attributes import Identity, parse_identity
from server.identity.cluster import candidate_pairs
from server.identity.compare import ADDRESS_SIMILAR, COMPARISONS, JW_HIGH, JW_MID, _name_variants
from server.identity.model import MatchModel

FLOOR = 1e-6
DEFAULT_OUT = "server/identity/weights.json"
# EM rounds: each trains the m of every comparison it does not block on.
EM_BLOCKS = (
    "l.date_of_birth = r.date_of_birth",
    "l.family_name = r.family_name AND l.given_first = r.given_first",
)
# Rules that admit (nearly) no two different people, for splink's estimate of how many pairs match,
# and the share of all matching pairs they are assumed to find.
DETERMINISTIC = (
    "l.national_id = r.national_id AND l.date_of_birth = r.date_of_birth",
    "l.given_name = r.given_name AND l.family_name = r.family_name AND l.date_of_birth = r.date_of_birth",
    "l.email = r.email AND l.family_name = r.family_name",
)
DETERMINISTIC_RECALL = 0.8
PRIOR_CAP = 0.95


def _jw(a: str, b: str) -> str:
    return f"jaro_winkler_similarity({a}, {b})"


_SWAPPED = (f"given_name_l IS NOT NULL AND given_name_r IS NOT NULL AND family_name_l IS NOT NULL "
            f"AND family_name_r IS NOT NULL AND given_name_l <> family_name_l AND given_name_r <> family_name_r "
            f"AND {_jw('given_name_l', 'family_name_r')} >= {JW_HIGH} "
            f"AND {_jw('family_name_l', 'given_name_r')} >= {JW_HIGH} "
            f"AND {_jw('given_name_l', 'given_name_r')} < {JW_MID}")
_DATES = "damerau_levenshtein(replace(date_of_birth_l, '-', ''), replace(date_of_birth_r, '-', ''))"

# attribute -> (the MISSING condition, [(level, condition)] strongest first; "else" is ELSE)
SQL_LEVELS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "given_name": ("given_name_l IS NULL OR given_name_r IS NULL", [
        ("exact", "given_name_l = given_name_r"),
        ("swapped", _SWAPPED),
        ("nickname", "list_contains(given_variants_l, given_first_r) OR list_contains(given_variants_r, "
                     "given_first_l)"),
        ("jw_high", f"{_jw('given_name_l', 'given_name_r')} >= {JW_HIGH}"),
        ("initial", "(length(given_name_l) = 1 OR length(given_name_r) = 1) "
                    "AND substr(given_name_l, 1, 1) = substr(given_name_r, 1, 1)"),
        ("jw_mid", f"{_jw('given_name_l', 'given_name_r')} >= {JW_MID}"),
        ("else", "ELSE")]),
    "family_name": ("family_name_l IS NULL OR family_name_r IS NULL", [
        ("exact", "family_name_l = family_name_r"),
        ("swapped", _SWAPPED),
        ("jw_high", f"{_jw('family_name_l', 'family_name_r')} >= {JW_HIGH}"),
        ("jw_mid", f"{_jw('family_name_l', 'family_name_r')} >= {JW_MID}"),
        ("else", "ELSE")]),
    "date_of_birth": ("date_of_birth_l IS NULL OR date_of_birth_r IS NULL", [
        ("exact", "date_of_birth_l = date_of_birth_r"),
        ("day_month_swapped", "substr(date_of_birth_l, 1, 4) = substr(date_of_birth_r, 1, 4) "
                              "AND substr(date_of_birth_l, 6, 2) = substr(date_of_birth_r, 9, 2) "
                              "AND substr(date_of_birth_l, 9, 2) = substr(date_of_birth_r, 6, 2)"),
        ("one_typo", f"{_DATES} <= 1"),
        ("same_year", "substr(date_of_birth_l, 1, 4) = substr(date_of_birth_r, 1, 4)"),
        ("else", "ELSE")]),
    "national_id": ("national_id_l IS NULL OR national_id_r IS NULL "
                    "OR coalesce(national_id_type_l, '') <> coalesce(national_id_type_r, '')", [
        ("exact", "national_id_l = national_id_r"),
        ("one_typo", "damerau_levenshtein(national_id_l, national_id_r) <= 1"),
        ("else", "ELSE")]),
    "address": ("address_line1_l IS NULL OR postcode_l IS NULL OR address_line1_r IS NULL OR postcode_r IS NULL", [
        ("exact", "postcode_l = postcode_r AND address_line1_l = address_line1_r"),
        ("similar", f"postcode_l = postcode_r AND token_set_ratio(address_line1_l, address_line1_r) "
                    f">= {ADDRESS_SIMILAR}"),
        ("postcode", "postcode_l = postcode_r"),
        ("else", "ELSE")]),
    "phone": ("phone_l IS NULL OR phone_r IS NULL", [
        ("exact", "phone_l = phone_r"),
        ("else", "ELSE")]),
    "email": ("email_l IS NULL OR email_r IS NULL", [
        ("exact", "email_l = email_r"),
        ("local_part", "split_part(email_l, '@', 1) = split_part(email_r, '@', 1)"),
        ("else", "ELSE")]),
}
COLUMNS = ("given_name", "family_name", "date_of_birth", "national_id", "national_id_type", "address_line1",
           "postcode", "phone", "email")


def splink_records(identities: list[Identity]) -> dict[str, list[Any]]:
    """The normalised records as splink's input table ("" -> NULL), with the nickname columns."""
    table: dict[str, list[Any]] = {"unique_id": list(range(len(identities)))}
    for column in COLUMNS:
        table[column] = [getattr(i, column) or None for i in identities]
    table["given_first"] = [i.given_name.split(" ")[0] or None for i in identities]
    table["given_variants"] = [sorted(_name_variants(i.given_name)) if i.given_name else None for i in identities]
    return table


def splink_settings() -> dict[str, Any]:
    comparisons = []
    for attribute, (missing, levels) in SQL_LEVELS.items():
        comparison_levels: list[dict[str, Any]] = [
            {"sql_condition": missing, "label_for_charts": "missing", "is_null_level": True}]
        comparison_levels += [{"sql_condition": sql, "label_for_charts": level} for level, sql in levels]
        comparisons.append({"output_column_name": attribute, "comparison_levels": comparison_levels})
    return {"link_type": "dedupe_only", "unique_id_column_name": "unique_id", "comparisons": comparisons,
            "blocking_rules_to_generate_predictions": [], "retain_intermediate_calculation_columns": False}


def duckdb_connection() -> Any:
    """An in-memory DuckDB with token_set_ratio registered (compare.py's own function)."""
    import duckdb
    from rapidfuzz import fuzz

    con = duckdb.connect()
    con.create_function("token_set_ratio", lambda a, b: float(fuzz.token_set_ratio(a, b)),
                        ["VARCHAR", "VARCHAR"], "DOUBLE")
    return con


def duckdb_api() -> Any:
    """splink's DuckDB backend on that connection."""
    from splink import DuckDBAPI

    return DuckDBAPI(connection=duckdb_connection())


def check_levels_match_compare() -> None:
    for attribute, (_, levels) in COMPARISONS.items():
        sql_levels = tuple(level for level, _ in SQL_LEVELS[attribute][1])
        if sql_levels != levels:
            raise SystemExit(f"train.py SQL_LEVELS[{attribute}] {sql_levels} != compare.py {levels}")
    if set(SQL_LEVELS) != set(COMPARISONS):
        raise SystemExit("train.py SQL_LEVELS and compare.py COMPARISONS name different attributes")


def train_m_u(identities: list[Identity], *, u_pairs: float,
              seed: int) -> tuple[dict[str, dict[str, dict[str, float]]], float]:
    """attribute -> level -> {m, u}, from splink (u by random sampling, m by EM over EM_BLOCKS), and
    splink's probability that two random records match (from DETERMINISTIC)."""
    from splink import Linker

    check_levels_match_compare()
    db_api = duckdb_api()
    records = db_api.register(splink_records(identities), table_name="identities")
    linker = Linker(records, splink_settings())
    linker.training.estimate_u_using_random_sampling(max_pairs=u_pairs, seed=seed)
    for rule in EM_BLOCKS:
        linker.training.estimate_parameters_using_expectation_maximisation(rule)
    linker.training.estimate_probability_two_random_records_match(list(DETERMINISTIC), recall=DETERMINISTIC_RECALL)
    model = linker.misc.save_model_to_json()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for comparison in model["comparisons"]:
        levels: dict[str, dict[str, float]] = {}
        for level in comparison["comparison_levels"]:
            if level.get("is_null_level"):
                continue
            u = max(float(level.get("u_probability") or 0.0), FLOOR)
            m = float(level.get("m_probability") or 0.0)
            levels[level["label_for_charts"]] = {"m": m if m > 0 else u, "u": u}    # never seen: weight 0
        out[comparison["output_column_name"]] = levels
    return out, float(model["probability_two_random_records_match"])


def candidate_prior(identities: list[Identity], random_pair_prior: float) -> tuple[float, int]:
    """The share of matches among our candidate pairs: splink's estimate of the matching pairs among all
    pairs (random_pair_prior x all pairs), divided by the candidate pairs (blocking assumed to keep
    them all); and how many candidate pairs there were."""
    n = len(identities)
    candidates = len(candidate_pairs(identities))
    expected_matches = random_pair_prior * n * (n - 1) / 2
    return min(max(expected_matches / candidates, 1e-6), PRIOR_CAP), candidates


def train(records: int, seed: int, *, u_pairs: float) -> dict[str, Any]:
    people = generate(records, seed)
    identities = [parse_identity({k: v for k, v in row.items() if k != "source_ref"}, strict=False)[0]
                  for row in people.rows]
    started = time.perf_counter()
    comparisons, random_pair_prior = train_m_u(identities, u_pairs=u_pairs, seed=seed)
    prior, pairs = candidate_prior(identities, random_pair_prior)
    print(f"identity-train: {records} records, m/u in {time.perf_counter() - started:.0f} s; two random "
          f"records match {random_pair_prior:.3g}; prior {prior:.4f} over {pairs} candidate pairs", file=sys.stderr)
    return {"prior_match_probability": round(prior, 6),
            "comparisons": {a: {lv: {"m": _round(mu["m"]), "u": _round(mu["u"])} for lv, mu in levels.items()}
                            for a, levels in comparisons.items()}}


def _round(p: float) -> float:
    return float(f"{p:.6g}")


def weights_json(trained: dict[str, Any], command: str) -> str:
    spec = {"version": datetime.now(UTC).strftime("%Y-%m-%d") + "-splink", "trained_by": command, **trained}
    MatchModel(spec)       # refuse to write a file the product would refuse to load
    lines = ["{", f'  "version": {json.dumps(spec["version"])},', f'  "trained_by": {json.dumps(command)},',
             f'  "prior_match_probability": {spec["prior_match_probability"]},', '  "comparisons": {']
    attributes = list(spec["comparisons"].items())
    for n, (attribute, levels) in enumerate(attributes):
        inner = ",\n    ".join(f"{json.dumps(level)}: {json.dumps(mu)}" for level, mu in levels.items())
        lines.append(f'   {json.dumps(attribute)}: {{\n    {inner}}}' + ("," if n < len(attributes) - 1 else ""))
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def cmd_train(args: argparse.Namespace) -> int:
    trained = train(args.records, args.seed, u_pairs=args.u_pairs)
    command = shlex.join(["crs-load", "identity-train", "--records", str(args.records), "--seed", str(args.seed),
                          "--u-pairs", f"{args.u_pairs:g}", "--out", args.out])
    text = weights_json(trained, command)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out} (prior {trained['prior_match_probability']})")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "identity-train", help="train the identity model's weights with splink (EM) on generated people",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=50_000, help="generated records to train on (default 50000)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the generated people (default 1)")
    p.add_argument("--u-pairs", type=float, default=2e7, help="random pairs for u (default 2e7)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"weights file to write (default {DEFAULT_OUT})")
    p.set_defaults(func=cmd_train)
    return p
