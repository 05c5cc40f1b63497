"""The BIN table: issuer identification number ranges, validated rows and an in-memory index (pure).

A range is `low`..`high`, two PAN prefixes of the same length (6 to 11 digits, so 8-digit BINs
work). Ranges may overlap (a network's whole block, and one issuer's sub-range inside it): a PAN
belongs to the *most specific* range holding it, the one that covers the fewest PANs. The index
resolves that once, when the table is built: every range becomes an interval on the 11-digit
prefix line, the line is cut into elementary segments, each segment keeps its narrowest range, and
a lookup is one bisect over the segment starts (about 1 µs; docs/bins.md has the measurements).
Two equally narrow ranges can both hold a PAN only when they overlap partially (an import refuses
that unless told otherwise); the PAN then belongs to the one that starts lower. The answer never
depends on the order of the rows given (PostgreSQL returns them in heap order, which can differ
between readers of a large table: synchronized sequential scans).
"""

from __future__ import annotations

import bisect
import re
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from server.pan import contains_card_number
from server.proto import crs_pb2 as pb

PREFIX_DIGITS = 11          # the index's resolution: the longest prefix a range may have
MIN_PREFIX = 6
COLUMNS = ("low", "high", "pan_length", "network", "issuer_name", "issuer_country", "product", "on_us")
PRODUCTS = frozenset({"credit", "debit", "prepaid", "commercial"})
_NETWORK = re.compile(r"[a-z][a-z0-9-]{1,31}")      # visa, mastercard, amex, ..., or a domestic scheme
_COUNTRY = re.compile(r"[A-Z]{2}")
MAX_ISSUER = 120
ROW_CACHE = 4096            # BinRow objects kept per table (hot BINs); cleared when full
_TRUE, _FALSE = frozenset({"true", "yes", "1", "y"}), frozenset({"false", "no", "0", "n", ""})
# The reason of a cell refused for holding a card number: never stored, answered or echoed (PCI DSS 3).
CARD_NUMBER = "holds a card number (13-19 digits passing the Luhn check; not shown)"


class BinRowError(ValueError):
    def __init__(self, column: str, reason: str) -> None:
        super().__init__(f"{column}: {reason}")
        self.column = column
        self.reason = reason


@dataclass(frozen=True)
class BinRow:
    low: str
    high: str
    pan_length: int
    network: str
    issuer_name: str
    issuer_country: str
    product: str
    on_us: bool

    @property
    def start(self) -> int:
        return int(self.low.ljust(PREFIX_DIGITS, "0"))

    @property
    def end(self) -> int:   # inclusive
        return int(self.high.ljust(PREFIX_DIGITS, "9"))

    def message(self, version: int) -> pb.BinRange:
        return pb.BinRange(low=self.low, high=self.high, pan_length=self.pan_length, network=self.network,
                           issuer_name=self.issuer_name, issuer_country=self.issuer_country, product=self.product,
                           on_us=self.on_us, table_version=version)


def parse_row(cells: dict[str, str]) -> BinRow:
    """One CSV row (column name -> text) as a BinRow, or BinRowError naming the column."""
    low, high = cells.get("low", "").strip(), cells.get("high", "").strip()
    for name, value in (("low", low), ("high", high)):
        if not (value.isascii() and value.isdigit() and MIN_PREFIX <= len(value) <= PREFIX_DIGITS):
            raise BinRowError(name, f"must be {MIN_PREFIX}-{PREFIX_DIGITS} ASCII digits")
    if len(low) != len(high):
        raise BinRowError("high", "must have as many digits as low")
    if low > high:
        raise BinRowError("high", "is below low")
    length_text = cells.get("pan_length", "").strip()
    if not (length_text.isascii() and length_text.isdigit() and 12 <= int(length_text) <= 19):
        raise BinRowError("pan_length", "must be 12-19")
    if int(length_text) <= len(low):
        raise BinRowError("pan_length", "must be longer than the prefix")
    network = cells.get("network", "").strip().lower()
    if not _NETWORK.fullmatch(network):
        raise BinRowError("network", "must be a scheme name such as visa or mastercard (a-z, 0-9, '-')")
    issuer = cells.get("issuer_name", "").strip()
    if not issuer or len(issuer) > MAX_ISSUER or not issuer.isprintable():
        raise BinRowError("issuer_name", f"must be 1-{MAX_ISSUER} printable characters")
    for name, text in (("network", network), ("issuer_name", issuer)):   # ResolveBin answers them in clear
        if contains_card_number(text):
            raise BinRowError(name, CARD_NUMBER)
    country = cells.get("issuer_country", "").strip().upper()
    if not _COUNTRY.fullmatch(country):
        raise BinRowError("issuer_country", "must be an ISO 3166-1 alpha-2 code such as US")
    product = cells.get("product", "").strip().lower()
    if product not in PRODUCTS:
        raise BinRowError("product", f"must be one of {', '.join(sorted(PRODUCTS))}")
    on_us_text = cells.get("on_us", "").strip().lower()
    if on_us_text not in _TRUE | _FALSE:
        raise BinRowError("on_us", "must be true or false")
    return BinRow(low, high, int(length_text), network, issuer, country, product, on_us_text in _TRUE)


@dataclass(frozen=True)
class Overlap:
    outer: int      # row indexes
    inner: int
    nested: bool    # inner lies wholly inside outer and is narrower (a sub-range: fine)
    same: bool = False   # both cover exactly the same PANs: neither is more specific (a duplicate)


def overlaps(rows: Sequence[BinRow]) -> list[Overlap]:
    """Every pair of rows whose ranges intersect (sweep over starts; O(n log n + overlaps))."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i].start, -rows[i].end))
    found: list[Overlap] = []
    open_: list[int] = []      # rows whose range may still contain later starts
    for i in order:
        start = rows[i].start
        open_ = [j for j in open_ if rows[j].end >= start]
        for j in open_:
            same = rows[i].start == rows[j].start and rows[i].end == rows[j].end
            found.append(Overlap(j, i, rows[i].end <= rows[j].end and not same, same))
        open_.append(i)
    return found


class BinTable:
    """The index, columnar so that 500k ranges stay small: per range two ints and small codes, the
    strings interned once. `lookup(digits)` -> BinRow or None; `version`: the table it was built from."""

    def __init__(self, rows: Sequence[BinRow], version: int) -> None:
        self.version = version
        n = len(rows)
        starts = [r.start for r in rows]
        ends = [r.end for r in rows]
        strings: dict[str, int] = {}
        self._strings: list[str] = []

        def code(text: str) -> int:
            c = strings.get(text)
            if c is None:
                c = strings[text] = len(self._strings)
                self._strings.append(text)
            return c

        # low and high as numbers plus their prefix length (strings would be ~60 bytes each).
        self._low = array("q", (int(r.low) for r in rows))
        self._high = array("q", (int(r.high) for r in rows))
        self._digits = array("b", (len(r.low) for r in rows))
        # Per range: pan length, network, issuer, country, product codes and on_us, in flat arrays.
        self._pan_length = array("b", (r.pan_length for r in rows))
        self._codes = array("i", (c for r in rows for c in (code(r.network), code(r.issuer_name),
                                                             code(r.issuer_country), code(r.product))))
        self._on_us = array("b", (r.on_us for r in rows))
        points = sorted(set(starts) | {e + 1 for e in ends})
        # Narrowest first, so a segment's owner is the most specific range covering it. `free` skips
        # segments already owned (path-halving), so building is near-linear even for deep nesting.
        owner_of = [-1] * len(points)
        free = list(range(len(points) + 1))
        where = {p: k for k, p in enumerate(points)}

        def next_free(p: int) -> int:
            while free[p] != p:
                free[p] = free[free[p]]
                p = free[p]
            return p

        for i in sorted(range(n), key=lambda i: (ends[i] - starts[i], starts[i], i)):
            p = next_free(where[starts[i]])
            hi = where[ends[i] + 1]
            while p < hi:
                owner_of[p] = i
                free[p] = p + 1
                p = next_free(p + 1)
        seg_starts: list[int] = []
        seg_owners: list[int] = []
        for p, point in enumerate(points):
            owner = owner_of[p]
            if seg_owners and seg_owners[-1] == owner:
                continue
            seg_starts.append(point)
            seg_owners.append(owner)
        # An array, not a list: contiguous 8-byte keys bisect faster (measured 1.2 vs 2.1 µs at 1M segments).
        self._starts = array("q", seg_starts)
        self._owners = array("i", seg_owners)
        self._rows: dict[int, BinRow] = {}

    def __len__(self) -> int:
        return len(self._low)

    def find(self, prefix11: int) -> int:
        k = bisect.bisect_right(self._starts, prefix11) - 1
        return self._owners[k] if k >= 0 else -1

    def row(self, i: int) -> BinRow:
        """Range `i` as a BinRow; the hot ones are kept (real traffic repeats a few thousand BINs)."""
        cached = self._rows.get(i)
        if cached is not None:
            return cached
        if len(self._rows) >= ROW_CACHE:
            self._rows.clear()
        c = self._codes[4 * i: 4 * i + 4]
        s = self._strings
        width = self._digits[i]
        row = self._rows[i] = BinRow(str(self._low[i]).zfill(width), str(self._high[i]).zfill(width),
                                     self._pan_length[i], s[c[0]], s[c[1]], s[c[2]], s[c[3]], bool(self._on_us[i]))
        return row

    def lookup(self, digits: str) -> BinRow | None:
        """The most specific range for a PAN or a prefix (ASCII digits, at least 6)."""
        i = self.find(int(digits[:PREFIX_DIGITS].ljust(PREFIX_DIGITS, "0")))
        return self.row(i) if i >= 0 else None

    def _span_owners(self, prefix: str) -> set[int]:
        """The most specific range (-1: none) of each stretch of the numbers that start with `prefix`."""
        first = bisect.bisect_right(self._starts, int(prefix[:PREFIX_DIGITS].ljust(PREFIX_DIGITS, "0"))) - 1
        last = bisect.bisect_right(self._starts, int(prefix[:PREFIX_DIGITS].ljust(PREFIX_DIGITS, "9"))) - 1
        return {-1, *self._owners[0:last + 1]} if first < 0 else set(self._owners[first:last + 1])

    def network_covering(self, prefix: str) -> str:
        """The network of every card number that starts with `prefix` (a card's stored 6 or 8 digits):
        "" where a number with that prefix is in no range, or where the ranges that split the prefix
        name different networks (`lookup` would answer for the prefix's first number only)."""
        networks = {self._strings[self._codes[4 * owner]] if owner >= 0 else "" for owner in self._span_owners(prefix)}
        return networks.pop() if len(networks) == 1 else ""

    def covering(self, prefix: str) -> BinRow | None:
        """The most specific range holding every card number that starts with `prefix`; None when no
        one range does: the prefix is split between ranges, or partly (`touches`) or wholly in none.
        (`lookup` answers for one number: the prefix's first.)"""
        owners = self._span_owners(prefix)
        return self.row(owners.pop()) if len(owners) == 1 and -1 not in owners else None

    def touches(self, prefix: str) -> bool:
        """Some card number that starts with `prefix` is in a range."""
        return any(owner >= 0 for owner in self._span_owners(prefix))

    def message_bytes(self, digits: str) -> bytes | None:
        """The serialized BinRange for these digits (NOT_FOUND answers carry it)."""
        row = self.lookup(digits)
        return row.message(self.version).SerializeToString() if row is not None else None


EMPTY = BinTable((), 0)


def build(rows: Iterable[BinRow], version: int) -> BinTable:
    return BinTable(list(rows), version)
