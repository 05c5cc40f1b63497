"""Which keys the load tests ask for: Zipf-skewed picks over the demo data set, plus a share of
unknown and malformed keys, each with the status the service must answer. Pure: no I/O, no grpc,
no locust, so it is unit-tested on its own (tests/unit/test_loadtests_keys.py).

Popularity: rank k (0 = hottest) is drawn with probability proportional to 1 / (k + 1) ** skew
(skew 0 = uniform; ~1 = real card traffic, where a few cards are used far more than the rest).
Ranks are then scattered over the data set by a fixed permutation, so the hottest keys are not
demo index 0, 1, 2, ... (which would put them next to each other in every index and on the
same Redis shards by accident of numbering).

Every pick is a `Key` that says what it expects back:
  OK                a demo key that exists (demo_pan(i), demo_token(seed, i), ...)
  NOT_FOUND         well-formed but absent: demo indexes past the end of the data set, tokens of
                    another seed, customer ids past the last one
  INVALID_ARGUMENT  malformed: failed Luhn / ABA check digit, wrong length, bad characters
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from devstack.demo import demo_account_number, demo_customer_id, demo_pan, demo_routing, demo_token, plan

OK, NOT_FOUND, INVALID_ARGUMENT = "OK", "NOT_FOUND", "INVALID_ARGUMENT"
KINDS = ("pan", "token", "account", "customer")
SCENARIOS = ("retail", "ach", "customer", "batch", "stream")
DEFAULT_MIX = "retail=70,ach=15,customer=10,batch=3,stream=2"


@dataclass(frozen=True)
class DataSet:
    """The demo data set the target was loaded with (`crs-dev up --customers N`, `crs-dev load-demo`)."""

    customers: int
    seed: int = 1

    def __post_init__(self) -> None:
        if self.customers < 1:
            raise ValueError("the data set needs at least one customer")

    @property
    def cards(self) -> int:
        return plan(self.customers).cards

    @property
    def accounts(self) -> int:
        return plan(self.customers).accounts

    @property
    def keys(self) -> int:
        """Distinct keys that resolve: every card by PAN and by token, accounts, customers."""
        return 2 * self.cards + self.accounts + self.customers

    def size(self, kind: str) -> int:
        return {"pan": self.cards, "token": self.cards, "account": self.accounts,
                "customer": self.customers}[kind]


# -- popularity -------------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _cumulative(n: int, skew: float) -> tuple[float, ...]:
    """Cumulative Zipf weights of ranks 0..n-1 (shared by every picker of the same shape)."""
    return tuple(itertools.accumulate(1.0 / (k + 1) ** skew for k in range(n)))


def _scatter_step(n: int) -> int:
    """A step coprime to n near n / golden ratio: rank -> (rank * step) % n is a permutation."""
    if n <= 2:
        return 1
    step = max(1, int(n / 1.618033988749895))
    while math.gcd(step, n) != 1:
        step += 1
    return step


def scatter(rank: int, n: int) -> int:
    """The data-set index of popularity rank `rank` (a fixed permutation of 0..n-1)."""
    return (rank * _scatter_step(n)) % n


class ZipfPicker:
    """Draws indexes 0..n-1; rank k has probability (1/(k+1)^skew) / H(n, skew)."""

    def __init__(self, n: int, skew: float, *, rng: random.Random | None = None, scattered: bool = True) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        if skew < 0 or math.isnan(skew):
            raise ValueError("skew must be >= 0 (0 = uniform)")
        self.n, self.skew, self.scattered = n, float(skew), scattered
        self.rng = rng or random.Random()
        self._cum = _cumulative(n, self.skew) if self.skew > 0 else ()
        self._step = _scatter_step(n)

    def rank(self) -> int:
        if not self._cum:
            return self.rng.randrange(self.n)
        return min(self.n - 1, bisect.bisect_right(self._cum, self.rng.random() * self._cum[-1]))

    def index_of_rank(self, rank: int) -> int:
        return (rank * self._step) % self.n if self.scattered else rank

    def pick(self) -> int:
        return self.index_of_rank(self.rank())

    def rank_probability(self, rank: int) -> float:
        """The exact probability of rank `rank` (for tests and the docs' hot-set table)."""
        if not 0 <= rank < self.n:
            return 0.0
        if not self._cum:
            return 1.0 / self.n
        return float((1.0 / (rank + 1) ** self.skew) / self._cum[-1])

    def top_share(self, k: int) -> float:
        """Share of all picks that go to the k hottest keys."""
        k = max(0, min(k, self.n))
        if k == 0:
            return 0.0
        return k / self.n if not self._cum else self._cum[k - 1] / self._cum[-1]


# -- keys with their expected status --------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    kind: str                  # pan, token, account, customer
    expect: str                # OK, NOT_FOUND, INVALID_ARGUMENT
    pan: str = ""
    token: str = ""
    routing: str = ""
    account_number: str = ""
    customer_id: str = ""

    @property
    def category(self) -> str:
        """known / unknown / malformed, for names in the report."""
        return {OK: "known", NOT_FOUND: "unknown", INVALID_ARGUMENT: "malformed"}[self.expect]


def _break_check_digit(digits: str) -> str:
    """The same number with its last digit changed: the Luhn / ABA check then fails."""
    return digits[:-1] + str((int(digits[-1]) + 1) % 10)


class KeyMaker:
    """Picks keys of each kind: known (Zipf over the data set), unknown, or malformed."""

    def __init__(self, data: DataSet, *, skew: float = 0.99, unknown: float = 0.02, malformed: float = 0.01,
                 rng: random.Random | None = None) -> None:
        if not (0 <= unknown <= 1 and 0 <= malformed <= 1 and unknown + malformed <= 1):
            raise ValueError("unknown and malformed are shares in 0..1 whose sum is at most 1")
        self.data = data
        self.unknown, self.malformed = unknown, malformed
        self.rng = rng or random.Random()
        self._pickers = {kind: ZipfPicker(data.size(kind), skew, rng=self.rng) for kind in ("pan", "account",
                                                                                               "customer")}
        self._pickers["token"] = self._pickers["pan"]
        self._bad = itertools.count()

    def _category(self) -> str:
        roll = self.rng.random()
        if roll < self.malformed:
            return INVALID_ARGUMENT
        if roll < self.malformed + self.unknown:
            return NOT_FOUND
        return OK

    def _index(self, kind: str, expect: str) -> int:
        if expect == NOT_FOUND:   # well-formed, past the end of the data set
            return self.data.size(kind) + self.rng.randrange(1_000_000)
        return self._pickers[kind].pick()

    def key(self, kind: str) -> Key:
        if kind not in KINDS:
            raise ValueError(f"unknown key kind {kind!r}; expected one of {', '.join(KINDS)}")
        expect = self._category()
        i = self._index(kind, expect)
        variant = next(self._bad) % 3
        if kind == "pan":
            pan = demo_pan(i)
            if expect == INVALID_ARGUMENT:
                pan = (_break_check_digit(pan), pan[:8], pan[:6] + "ABCD" + pan[10:])[variant]
            return Key("pan", expect, pan=pan)
        if kind == "token":
            seed = self.data.seed + 7919 if expect == NOT_FOUND else self.data.seed
            token = demo_token(seed, i)
            if expect == INVALID_ARGUMENT:
                token = (token.upper(), "tok_short", token.replace("tok_", "card_"))[variant]
            return Key("token", expect, token=token)
        if kind == "account":
            routing, number = demo_routing(i), demo_account_number(i)
            if expect == INVALID_ARGUMENT:
                routing, number = ((_break_check_digit(routing), number), (routing[:7], number),
                                   (routing, number[:2]))[variant]
            return Key("account", expect, routing=routing, account_number=number)
        cid = demo_customer_id(i)   # customer
        if expect == INVALID_ARGUMENT:
            cid = (cid.upper(), "cus_x", cid.replace("cus_", "cust-"))[variant]
        return Key("customer", expect, customer_id=cid)

    def card(self, token_share: float) -> Key:
        """A retail authorisation key: by token with probability token_share, else by PAN."""
        return self.key("token" if self.rng.random() < token_share else "pan")

    def any_key(self, kinds: Sequence[str] = KINDS) -> Key:
        return self.key(self.rng.choice(kinds))


# -- scenario mix -----------------------------------------------------------------------------------
def parse_mix(text: str, allowed: Sequence[str] = SCENARIOS) -> dict[str, float]:
    """'retail=70,ach=20,batch=10' -> {'retail': 0.7, 'ach': 0.2, 'batch': 0.1} (normalised to 1).

    A name alone counts as weight 1 ('retail' = only retail). Unknown names, negative or non-numeric
    weights, and an all-zero mix raise ValueError with a message naming the problem.
    """
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in allowed:
            raise ValueError(f"unknown scenario {name!r} in mix {text!r}; choose from {', '.join(allowed)}")
        try:
            w = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"weight of {name!r} is not a number: {value!r}") from None
        if w < 0 or math.isnan(w) or math.isinf(w):
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, not {value!r}")
        weights[name] = weights.get(name, 0.0) + w
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mix {text!r} has no positive weight")
    return {k: v / total for k, v in weights.items() if v > 0}


def integer_weights(mix: Mapping[str, float], resolution: int = 100) -> dict[str, int]:
    """Shares -> small integer weights (locust repeats a task once per unit of weight); every
    scenario with a positive share keeps at least 1."""
    return {k: max(1, round(v * resolution)) for k, v in mix.items() if v > 0}


def format_mix(mix: Mapping[str, float]) -> str:
    return ",".join(f"{k}={100 * v:g}" for k, v in mix.items())
