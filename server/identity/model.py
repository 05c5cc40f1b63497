"""The match model: exact rules where they are decisive, Fellegi–Sunter weights for the rest (pure).

A candidate's *match weight* is log2 of the prior odds plus, for each attribute, log2(m/u) of the
level it compared at (m: how often true matches show that level, u: how often non-matches do). Its
probability is 2^w / (1 + 2^w). The m and u values are trained by splink (EM on generated records,
`crs-load identity-train`) and live in a versioned JSON file next to this module.

Rules, applied before the weights (docs/identity.md, "Decisions"):
- same national id (same type) and same date of birth: MATCH, whatever else differs;
- both have a national id of the same type and they differ by more than one typo: never MATCH (a
  false merge of two people is the costly error, and twins share everything else);
- the given names disagree outright (not a nickname, initial, typo or swap, nor two forms of one
  name: compare.given_names_disagree): never MATCH, for the same reason (twins and siblings in one
  household), at most POSSIBLE_MATCH;
- the dates of birth disagree outright (not a day/month swap, one typo or the same year): never
  MATCH (a father and son of one name at one address, two people of a common name);
- the family names disagree (outright or only loosely alike) and no national id, address, phone or email agrees (a
  married name is tied to the person by one of those; a given name and a birthday are shared by
  many people at a million customers): never MATCH;
- nothing but the names agrees (no date of birth, national id, address, phone or email at an
  agreeing level): never MATCH (two people of a common name);
- no date of birth or national id on one side or the other, and the phone or email disagrees (a
  local part alone is not agreement) while neither agrees exactly: never MATCH (name and address
  alone are a son's undated record at his father's address as often as a duplicate);

- a pair a person rejected as two people (identity_distinct) is never proposed again (the store
  filters those before scoring).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from server.identity.attributes import Identity
from server.identity.compare import (
    COMPARISONS,
    MISSING,
    compare,
    date_of_birth_level,
    given_names_disagree,
    national_id_level,
)

EXACT_RULE = "national_id+date_of_birth"
# An outright disagreement ("else") on any of these forbids MATCH (unless the exact rule decided; for
# given names only when compare.given_names_disagree says they are not forms of one name).
FORBID_MATCH_ON_ELSE = ("national_id", "given_name", "date_of_birth")
WEIGHTS_FILE = "weights.json"


class ModelError(ValueError):
    """The weights file is missing a level or holds an impossible probability (start-up error)."""


@dataclass(frozen=True)
class Evidence:
    attribute: str
    level: str
    weight: float


@dataclass(frozen=True)
class Score:
    match_weight: float
    probability: float
    evidence: tuple[Evidence, ...]
    rule: str            # EXACT_RULE when the exact rule decided, else ""
    may_match: bool      # False when a rule forbids MATCH (different national ids)


@dataclass(frozen=True)
class Thresholds:
    match: float = 0.99      # at or above: MATCH
    review: float = 0.80     # at or above (and below match): POSSIBLE_MATCH

    def __post_init__(self) -> None:
        if not 0.0 < self.review <= self.match < 1.0:
            raise ModelError("identity thresholds need 0 < review <= match < 1")


@dataclass(frozen=True)
class Decision:
    decision: str                        # "MATCH", "POSSIBLE_MATCH", "NEW"
    candidates: tuple[tuple[str, Score], ...]   # (customer id, best score), best first


class MatchModel:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.version = str(spec.get("version", ""))
        prior = float(spec.get("prior_match_probability", 0))
        if not 0.0 < prior < 1.0 or not self.version:
            raise ModelError("weights file needs a version and 0 < prior_match_probability < 1")
        self.prior_weight = math.log2(prior / (1.0 - prior))
        self.weights: dict[str, dict[str, float]] = {}
        comparisons = spec.get("comparisons", {})
        for attribute, (_, levels) in COMPARISONS.items():
            given = comparisons.get(attribute, {})
            table = {MISSING: 0.0}
            for level in levels:
                mu = given.get(level)
                if not isinstance(mu, dict) or not 0.0 < float(mu.get("m", 0)) <= 1.0 \
                        or not 0.0 < float(mu.get("u", 0)) <= 1.0:
                    raise ModelError(f"weights file: {attribute}.{level} needs 0 < m <= 1 and 0 < u <= 1")
                table[level] = math.log2(float(mu["m"]) / float(mu["u"]))
            self.weights[attribute] = table

    @classmethod
    def load(cls, path: str | Path | None = None) -> MatchModel:
        """The packaged weights, or the file at `path` (CRS_IDENTITY_WEIGHTS)."""
        if path:
            data = Path(path).read_bytes()
        else:
            data = resources.files("server.identity").joinpath(WEIGHTS_FILE).read_bytes()
        try:
            return cls(orjson.loads(data))
        except orjson.JSONDecodeError as exc:
            raise ModelError(f"weights file is not JSON: {exc}") from None

    def score(self, a: Identity, b: Identity) -> Score:
        levels = compare(a, b)
        evidence = tuple(Evidence(attr, level, self.weights[attr][level]) for attr, level in levels.items())
        weight = self.prior_weight + sum(e.weight for e in evidence)
        rule = ""
        probability = _probability(weight)
        if levels["national_id"] == "exact" and levels["date_of_birth"] == "exact":
            rule, probability = EXACT_RULE, 1.0
        may_match = rule == EXACT_RULE or not (_disagree(a, b, levels) or _contact_contradicts(levels)
                                               or _names_only(levels) or _new_name_elsewhere(levels)
                                               or _maybe_twins(a, b, levels) or _year_apart(a, b, levels))
        return Score(weight, probability, evidence, rule, may_match)

    def best(self, query: Identity, records: Iterable[Identity]) -> Score | None:
        """The best score of `query` against the records of one customer (a cluster)."""
        best: Score | None = None
        for record in records:
            s = self.score(query, record)
            if best is None or (s.probability, s.match_weight) > (best.probability, best.match_weight):
                best = s
        return best

    @staticmethod
    def decide(scored: Iterable[tuple[str, Score]], thresholds: Thresholds, limit: int) -> Decision:
        """MATCH when exactly one customer is at or above the match threshold and no rule forbids
        it; POSSIBLE_MATCH when any is at or above the review threshold; else NEW."""
        ranked = sorted(scored, key=lambda cs: (cs[1].probability, cs[1].match_weight), reverse=True)
        kept = tuple(cs for cs in ranked if cs[1].probability >= thresholds.review)[:limit]
        matches = [cs for cs in kept if cs[1].probability >= thresholds.match and cs[1].may_match]
        if len(matches) == 1 and matches[0] is kept[0]:
            return Decision("MATCH", kept)
        if kept:
            return Decision("POSSIBLE_MATCH", kept)
        return Decision("NEW", ())


def rules_forbid(a: Identity, b: Identity) -> bool:
    """A rule says `a` and `b` are two people: national ids of one type further apart than a typo,
    dates of birth that disagree outright, or given names that do (compare.given_names_disagree).
    (The exact rule is not consulted: a pair it decides never disagrees on date of birth or id.)"""
    return national_id_level(a, b) == "else" or date_of_birth_level(a, b) == "else" or given_names_disagree(a, b)


def _disagree(a: Identity, b: Identity, levels: dict[str, str]) -> bool:
    if levels["national_id"] == "else" or levels["date_of_birth"] == "else":
        return True
    return levels["given_name"] == "else" and given_names_disagree(a, b)


# The levels of the attributes besides the names that corroborate a match (one of them is needed).
CORROBORATING = {"date_of_birth": ("exact", "day_month_swapped", "one_typo"), "national_id": ("exact", "one_typo"),
                 "address": ("exact", "similar", "postcode"), "phone": ("exact",), "email": ("exact", "local_part")}


def _names_only(levels: dict[str, str]) -> bool:
    """Nothing but the names agrees: two people of a common name (born the same year, at two
    addresses) look exactly like this, and a duplicate almost never does."""
    return not any(levels[attribute] in agreeing for attribute, agreeing in CORROBORATING.items())


# What ties a record to a person when the family name changed (marriage) — a date of birth and a
# given name do not: at a million customers many people share both.
TIES = {"national_id": ("exact",), "address": ("exact", "similar"), "phone": ("exact",), "email": ("exact",)}


def _new_name_elsewhere(levels: dict[str, str]) -> bool:
    """The family names disagree (outright, or only loosely alike: Jaro-Winkler 0.80-0.92) and
    nothing that belongs to one person (national id, address, phone, email) agrees: two people who
    share a birthday and a similar name, not a bride."""
    return levels["family_name"] in ("else", "jw_mid") and not any(levels[a] in ok for a, ok in TIES.items())


def _contact_contradicts(levels: dict[str, str]) -> bool:
    """Neither a date of birth nor a national id to compare, and the phone or email disagrees while
    neither agrees exactly: name and address alone (a son's undated record at his father's address,
    with his own phone or email) are not enough to MATCH."""
    if levels["date_of_birth"] != MISSING or levels["national_id"] != MISSING:
        return False
    contact = (levels["phone"], levels["email"])
    return "exact" not in contact and any(level not in (MISSING, "exact") for level in contact)


def _maybe_twins(a: Identity, b: Identity, levels: dict[str, str]) -> bool:
    """One birthday and given names alike but for their ending (Daniel/Danielle, Julian/Juliana,
    Alexander/Alexandra, Frances/Francis): a boy and a girl of one birth as often as a typo, so a
    person decides (POSSIBLE_MATCH), never the model alone."""
    x, y = a.given_name, b.given_name
    if levels["given_name"] != "jw_high" or levels["date_of_birth"] != "exact":
        return False
    short, long_ = sorted((x, y), key=len)
    return long_.startswith(short) or (len(x) == len(y) and x[:-2] == y[:-2])


# Birth years at least this far apart may be a parent and a child; nearer, a one-digit difference is a typo.
GENERATION_YEARS = 15


def _year_apart(a: Identity, b: Identity, levels: dict[str, str]) -> bool:
    """Birth dates one digit apart in the year (1961/1991): a father and a son who share a birthday as
    often as a typo; a person decides."""
    if levels["date_of_birth"] != "one_typo":
        return False
    x, y = a.date_of_birth, b.date_of_birth
    if len(x) != len(y) or x[4:] != y[4:] or not (x[:4].isdigit() and y[:4].isdigit()):
        return False
    return abs(int(x[:4]) - int(y[:4])) >= GENERATION_YEARS


def _probability(weight: float) -> float:
    if weight > 60:
        return 1.0
    if weight < -60:
        return 0.0
    odds: float = 2.0 ** weight
    return odds / (1.0 + odds)
