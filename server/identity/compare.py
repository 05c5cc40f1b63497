"""How two identities compare, attribute by attribute (pure). docs/identity.md lists every level.

Each comparison answers a *level* name, strongest agreement first, or MISSING when either side does
not know the attribute (a missing value is no evidence either way: weight 0). The Fellegi–Sunter
model (model.py) gives each level its weight; loadtests/identity/train.py trains those weights with
splink from comparisons that are defined to give the same levels (tests/unit/test_identity_train.py
checks the two agree on generated pairs).

String similarity is rapidfuzz's Jaro–Winkler and Damerau–Levenshtein; nicknames come from the
`nicknames` package's table of English given-name variants (bill ~ william, peggy ~ margaret).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from nicknames import NickNamer
from rapidfuzz import fuzz
from rapidfuzz.distance import DamerauLevenshtein, JaroWinkler

from server.identity.attributes import Identity

MISSING = "missing"
JW_HIGH = 0.92
JW_MID = 0.80
ADDRESS_SIMILAR = 85.0

_namer = NickNamer()


@lru_cache(maxsize=65536)
def _name_variants(name: str) -> frozenset[str]:
    """The name, its nicknames and its canonical forms (lower case)."""
    first = name.split(" ")[0]
    return frozenset({first} | set(_namer.nicknames_of(first)) | set(_namer.canonicals_of(first)))


def nickname_of(a: str, b: str) -> bool:
    fa, fb = a.split(" ")[0], b.split(" ")[0]
    return fb in _name_variants(fa) or fa in _name_variants(fb)


def jaro_winkler(a: str, b: str) -> float:
    return float(JaroWinkler.similarity(a, b))


def names_swapped(a: Identity, b: Identity) -> bool:
    """Given and family name written the wrong way round on one side (and not the same name)."""
    return (bool(a.given_name and a.family_name and b.given_name and b.family_name)
            and a.given_name != a.family_name and b.given_name != b.family_name
            and jaro_winkler(a.given_name, b.family_name) >= JW_HIGH
            and jaro_winkler(a.family_name, b.given_name) >= JW_HIGH
            and jaro_winkler(a.given_name, b.given_name) < JW_MID)


def given_name_level(a: Identity, b: Identity) -> str:
    x, y = a.given_name, b.given_name
    if not x or not y:
        return MISSING
    if x == y:
        return "exact"
    if names_swapped(a, b):
        return "swapped"
    if nickname_of(x, y):
        return "nickname"
    sim = jaro_winkler(x, y)
    if sim >= JW_HIGH:
        return "jw_high"
    if (len(x) == 1 or len(y) == 1) and x[0] == y[0]:
        return "initial"
    if sim >= JW_MID:
        return "jw_mid"
    return "else"


def given_names_disagree(a: Identity, b: Identity) -> bool:
    """The given names are two people's (the rule that forbids MATCH), not one person's written two
    ways: their level is "else" and they are not forms of one name that the levels cannot see when a
    third change comes with it. Not a disagreement:

    - one side's given name is the other side's family name (a swapped record whose family name
      also changed by marriage or a typo, which `names_swapped` does not call a swap);
    - two forms of one name (bradley ~ bradford: both nicknames of brad; meg ~ maggie);
    - a nickname or canonical form of one is a close typo of the other (rick ~ richsrd).

    Twins and siblings in one household have given names that are none of these."""
    if given_name_level(a, b) != "else":
        return False
    x, y = a.given_name.split(" ")[0], b.given_name.split(" ")[0]
    if (b.family_name and jaro_winkler(x, b.family_name.split(" ")[0]) >= JW_HIGH) \
            or (a.family_name and jaro_winkler(y, a.family_name.split(" ")[0]) >= JW_HIGH):
        return False
    vx, vy = _name_variants(x), _name_variants(y)
    if vx & vy:
        return False
    return not (any(jaro_winkler(v, y) >= JW_HIGH for v in vx) or any(jaro_winkler(v, x) >= JW_HIGH for v in vy))


def family_name_level(a: Identity, b: Identity) -> str:
    x, y = a.family_name, b.family_name
    if not x or not y:
        return MISSING
    if x == y:
        return "exact"
    if names_swapped(a, b):
        return "swapped"
    sim = jaro_winkler(x, y)
    if sim >= JW_HIGH:
        return "jw_high"
    if sim >= JW_MID:
        return "jw_mid"
    return "else"


def day_month_swapped(x: str, y: str) -> bool:
    """1980-03-07 vs 1980-07-03."""
    return x[:4] == y[:4] and x[5:7] == y[8:10] and x[8:10] == y[5:7]


def date_of_birth_level(a: Identity, b: Identity) -> str:
    x, y = a.date_of_birth, b.date_of_birth
    if not x or not y:
        return MISSING
    if x == y:
        return "exact"
    if day_month_swapped(x, y):
        return "day_month_swapped"
    if DamerauLevenshtein.distance(x.replace("-", ""), y.replace("-", "")) <= 1:
        return "one_typo"
    if x[:4] == y[:4]:
        return "same_year"
    return "else"


def national_id_level(a: Identity, b: Identity) -> str:
    if not a.national_id or not b.national_id or a.national_id_type != b.national_id_type:
        return MISSING
    if a.national_id == b.national_id:
        return "exact"
    if DamerauLevenshtein.distance(a.national_id, b.national_id) <= 1:
        return "one_typo"
    return "else"


def address_level(a: Identity, b: Identity) -> str:
    if not (a.address_line1 and a.postcode) or not (b.address_line1 and b.postcode):
        return MISSING
    if a.postcode == b.postcode:
        if a.address_line1 == b.address_line1:
            return "exact"
        if fuzz.token_set_ratio(a.address_line1, b.address_line1) >= ADDRESS_SIMILAR:
            return "similar"
        return "postcode"
    return "else"


def phone_level(a: Identity, b: Identity) -> str:
    if not a.phone or not b.phone:
        return MISSING
    return "exact" if a.phone == b.phone else "else"


def email_level(a: Identity, b: Identity) -> str:
    if not a.email or not b.email:
        return MISSING
    if a.email == b.email:
        return "exact"
    if a.email.partition("@")[0] == b.email.partition("@")[0]:
        return "local_part"
    return "else"


# Attribute -> (comparison, its levels strongest first, MISSING excluded). The weights file must give
# every one of these levels an m and a u probability.
COMPARISONS: dict[str, tuple[Callable[[Identity, Identity], str], tuple[str, ...]]] = {
    "given_name": (given_name_level, ("exact", "swapped", "nickname", "jw_high", "initial", "jw_mid", "else")),
    "family_name": (family_name_level, ("exact", "swapped", "jw_high", "jw_mid", "else")),
    "date_of_birth": (date_of_birth_level, ("exact", "day_month_swapped", "one_typo", "same_year", "else")),
    "national_id": (national_id_level, ("exact", "one_typo", "else")),
    "address": (address_level, ("exact", "similar", "postcode", "else")),
    "phone": (phone_level, ("exact", "else")),
    "email": (email_level, ("exact", "local_part", "else")),
}


def compare(a: Identity, b: Identity) -> dict[str, str]:
    """The comparison vector: attribute -> level."""
    return {name: fn(a, b) for name, (fn, _) in COMPARISONS.items()}
