"""Latency histograms and per-window counts that locust worker processes write and the sweep merges.
Pure (tests/unit/test_loadtests_report.py).

Why not locust's own percentiles: locust stores response times rounded to whole milliseconds
below 100 ms, and a near-cache lookup takes a fraction of one. This histogram has log-spaced
buckets 1 % wide from 1 µs up, so every percentile is within 1 % of the exact value (it reports
the bucket's upper edge), and histograms from several processes merge by adding counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GROWTH = 1.01            # bucket i holds (GROWTH**(i-1), GROWTH**i] microseconds
_LOG_GROWTH = math.log(GROWTH)


def bucket_of(ms: float) -> int:
    us = ms * 1000.0
    if us <= 1.0:
        return 0
    return math.ceil(math.log(us) / _LOG_GROWTH - 1e-9)


def bucket_upper_ms(bucket: int) -> float:
    return GROWTH ** bucket / 1000.0


@dataclass
class Histogram:
    counts: dict[int, int] = field(default_factory=dict)
    n: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0

    def add(self, ms: float, count: int = 1) -> None:
        b = bucket_of(ms)
        self.counts[b] = self.counts.get(b, 0) + count
        self.n += count
        self.total_ms += ms * count
        self.max_ms = max(self.max_ms, ms)

    def merge(self, other: Histogram) -> Histogram:
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c
        self.n += other.n
        self.total_ms += other.total_ms
        self.max_ms = max(self.max_ms, other.max_ms)
        return self

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile (q in 0..100) in ms, as the upper edge of its bucket; nan if empty."""
        if not 0 <= q <= 100:
            raise ValueError(f"percentile q must be in 0..100, not {q}")
        if self.n == 0:
            return math.nan
        rank = max(1, math.ceil(q / 100 * self.n))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(bucket_upper_ms(b), self.max_ms)   # never above the largest value seen
        return self.max_ms

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.n if self.n else math.nan

    def summary(self) -> dict[str, float]:
        return {"p50": self.percentile(50), "p95": self.percentile(95), "p99": self.percentile(99),
                "max": self.max_ms if self.n else math.nan, "mean": self.mean_ms, "n": float(self.n)}

    def to_json(self) -> dict[str, Any]:
        return {"counts": {str(b): c for b, c in sorted(self.counts.items())}, "n": self.n,
                "total_ms": self.total_ms, "max_ms": self.max_ms}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Histogram:
        return cls({int(b): int(c) for b, c in d.get("counts", {}).items()}, int(d.get("n", 0)),
                   float(d.get("total_ms", 0.0)), float(d.get("max_ms", 0.0)))


@dataclass
class RowCounts:
    """One request name's counts inside the window."""

    calls: int = 0          # RPCs (a batch is one call; a streamed key is one call)
    lookups: int = 0        # keys answered as expected (a batch of 200 correct answers = 200)
    failures: int = 0       # calls whose outcome was not the expected one
    expected_errors: int = 0  # calls answered the expected NOT_FOUND / INVALID_ARGUMENT (successes)
    latency: Histogram = field(default_factory=Histogram)

    def merge(self, other: RowCounts) -> RowCounts:
        self.calls += other.calls
        self.lookups += other.lookups
        self.failures += other.failures
        self.expected_errors += other.expected_errors
        self.latency.merge(other.latency)
        return self


@dataclass
class WindowStats:
    """What one or more load processes saw inside [start, end] (unix seconds)."""

    start: float = 0.0
    end: float = 0.0
    rows: dict[str, RowCounts] = field(default_factory=dict)
    failure_kinds: dict[str, int] = field(default_factory=dict)   # "UNAVAILABLE" -> count

    def record(self, name: str, response_time_ms: float, *, lookups: int, failed: bool, expected_error: bool,
               failure_kind: str = "") -> None:
        row = self.rows.get(name)
        if row is None:
            row = self.rows[name] = RowCounts()
        row.calls += 1
        row.latency.add(response_time_ms)
        if failed:
            row.failures += 1
            self.failure_kinds[failure_kind or "error"] = self.failure_kinds.get(failure_kind or "error", 0) + 1
        else:
            row.lookups += lookups
            row.expected_errors += 1 if expected_error else 0

    def merge(self, other: WindowStats) -> WindowStats:
        self.start = min(self.start, other.start) if self.start else other.start
        self.end = max(self.end, other.end)
        for name, row in other.rows.items():
            self.rows.setdefault(name, RowCounts()).merge(row)
        for k, v in other.failure_kinds.items():
            self.failure_kinds[k] = self.failure_kinds.get(k, 0) + v
        return self

    # -- totals ----------------------------------------------------------------------------------
    @property
    def calls(self) -> int:
        return sum(r.calls for r in self.rows.values())

    @property
    def lookups(self) -> int:
        return sum(r.lookups for r in self.rows.values())

    @property
    def failures(self) -> int:
        return sum(r.failures for r in self.rows.values())

    @property
    def expected_errors(self) -> int:
        return sum(r.expected_errors for r in self.rows.values())

    def latency(self) -> Histogram:
        total = Histogram()
        for r in self.rows.values():
            total.merge(r.latency)
        return total

    @property
    def error_rate(self) -> float:
        """Failed calls / all calls (expected NOT_FOUND / INVALID_ARGUMENT answers are not errors)."""
        return self.failures / self.calls if self.calls else math.nan

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "failure_kinds": dict(self.failure_kinds),
                "rows": {name: {"calls": r.calls, "lookups": r.lookups, "failures": r.failures,
                                "expected_errors": r.expected_errors, "latency": r.latency.to_json()}
                         for name, r in self.rows.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WindowStats:
        rows = {name: RowCounts(int(r["calls"]), int(r["lookups"]), int(r["failures"]), int(r["expected_errors"]),
                                Histogram.from_json(r["latency"])) for name, r in d.get("rows", {}).items()}
        return cls(float(d.get("start", 0.0)), float(d.get("end", 0.0)), rows,
                   {k: int(v) for k, v in d.get("failure_kinds", {}).items()})


def merge_all(parts: Iterable[WindowStats]) -> WindowStats:
    out = WindowStats()
    for p in parts:
        out.merge(p)
    return out


@dataclass
class Timeline:
    """WindowStats per whole unix second, so a window can be chosen after the run (the sweep picks
    the seconds after spawning + warm-up) and throughput can be checked second by second."""

    slots: dict[int, WindowStats] = field(default_factory=dict)

    def record(self, now: float, name: str, response_time_ms: float, *, lookups: int, failed: bool,
               expected_error: bool, failure_kind: str = "") -> None:
        second = int(now)
        slot = self.slots.get(second)
        if slot is None:
            slot = self.slots[second] = WindowStats(float(second), float(second + 1))
        slot.record(name, response_time_ms, lookups=lookups, failed=failed, expected_error=expected_error,
                    failure_kind=failure_kind)

    def merge(self, other: Timeline) -> Timeline:
        for second, stats in other.slots.items():
            if second in self.slots:
                self.slots[second].merge(stats)
            else:
                self.slots[second] = WindowStats().merge(stats)
        return self

    def window(self, start: int, end: int) -> WindowStats:
        """Everything recorded in the whole seconds start <= s < end."""
        out = WindowStats(float(start), float(end))
        for second in range(start, end):
            if second in self.slots:
                out.merge(self.slots[second])
        out.start, out.end = float(start), float(end)
        return out

    def everything(self) -> WindowStats:
        if not self.slots:
            return WindowStats()
        return self.window(min(self.slots), max(self.slots) + 1)

    def per_second(self, start: int, end: int) -> list[int]:
        """Lookups answered in each second of [start, end)."""
        return [self.slots[s].lookups if s in self.slots else 0 for s in range(start, end)]

    def to_json(self) -> dict[str, Any]:
        return {"slots": {str(s): w.to_json() for s, w in sorted(self.slots.items())}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Timeline:
        return cls({int(s): WindowStats.from_json(w) for s, w in d.get("slots", {}).items()})


def coefficient_of_variation(values: Iterable[float]) -> float:
    """Standard deviation / mean (population); nan for fewer than two values or a zero mean."""
    xs = list(values)
    if len(xs) < 2:
        return math.nan
    mean = sum(xs) / len(xs)
    if mean == 0:
        return math.nan
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) / mean
