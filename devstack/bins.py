"""A synthetic BIN table for development and tests: no real issuer data.

The card networks' top-level prefix blocks are public knowledge (Visa 4, Mastercard 51-55 and
2221-2720, ...); inside them every issuer range here is made up ("Synthetic Bank 0042"). On top, the
reserved test range 999xxx that demo and test PANs use: our own demo cards (999000-999009, on-us) and
made-up not-on-us issuers in 9991xx-9999xx, one of them with a nested 8-digit range, so tests can
route a card we do not hold without ever using a real-looking PAN.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from server.bins import COLUMNS

NETWORK_BLOCKS = (   # network, low, high, PAN length
    ("visa", "400000", "499999", 16), ("mastercard", "510000", "559999", 16),
    ("mastercard", "222100", "272099", 16), ("amex", "340000", "349999", 15), ("amex", "370000", "379999", 15),
    ("discover", "601100", "601199", 16), ("discover", "650000", "659999", 16), ("jcb", "352800", "358999", 16),
    ("unionpay", "620000", "629999", 16),
)
COUNTRIES = ("US", "GB", "DE", "FR", "CA", "MX", "BR", "JP", "IN", "AU", "ES", "IT", "NL", "SG")
PRODUCTS = ("credit", "debit", "prepaid", "commercial")

# The reserved test range (devstack/demo.py): ranges tests rely on.
TEST_RANGES = (
    ("999000", "999009", 16, "testnet", "CRS Demo Bank", "US", "debit", True),
    ("999010", "999019", 16, "testnet", "CRS Demo Bank (test cards)", "US", "credit", True),
    ("999100", "999199", 16, "testnet", "Test Issuer A", "US", "credit", False),
    ("999200", "999299", 16, "testnet-domestic", "Test Issuer B", "GB", "debit", False),
    ("99920000", "99920099", 16, "testnet-domestic", "Test Issuer B Prepaid", "GB", "prepaid", False),
)


def sample_rows(ranges: int, seed: int = 1) -> list[dict[str, str]]:
    """The network blocks, `ranges` made-up issuer ranges inside them, and the test ranges."""
    rng = random.Random(seed)
    rows = [_row(low, high, length, net, f"{net.title()} network", "US", "credit", False)
            for net, low, high, length in NETWORK_BLOCKS]
    rows += [_row(*r) for r in TEST_RANGES]
    taken: set[str] = set()
    while len(taken) < ranges:
        net, low, high, length = rng.choice(NETWORK_BLOCKS)
        digits = rng.choice((6, 8, 8, 8))
        prefix = str(rng.randint(int(low.ljust(digits, "0")), int(high.ljust(digits, "9"))))
        if prefix in taken:     # prefix ranges nest or are disjoint: never a partial overlap
            continue
        taken.add(prefix)
        rows.append(_row(prefix, prefix, length, net, f"Synthetic Bank {rng.randint(1, 9999):04d}",
                         rng.choice(COUNTRIES), rng.choice(PRODUCTS), False))
    return rows


def _row(low: str, high: str, length: int, network: str, issuer: str, country: str, product: str,
         on_us: bool) -> dict[str, str]:
    return {"low": low, "high": high, "pan_length": str(length), "network": network, "issuer_name": issuer,
            "issuer_country": country, "product": product, "on_us": "true" if on_us else "false"}


def write_sample(path: Path, ranges: int, seed: int = 1) -> int:
    rows = sample_rows(ranges, seed)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return len(rows)
