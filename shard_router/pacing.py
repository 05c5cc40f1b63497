"""A token bucket that paces bulk work (the resharding warmer and cleanup) to a rate. Pure: the caller
passes the clock and sleeps for the delay it is given."""

from __future__ import annotations

__all__ = ["Pacer"]


class Pacer:
    """At most `rate` units per second on average, in bursts of at most `burst` units (default: a
    tenth of a second's worth, at least 1)."""

    __slots__ = ("_available", "_last", "burst", "rate")

    def __init__(self, rate: float, *, burst: float | None = None, now: float = 0.0) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 units per second (got {rate!r})")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate / 10)
        if not self.burst > 0:
            raise ValueError(f"burst must be > 0 (got {burst!r})")
        self._available = self.burst
        self._last = now

    def delay(self, units: float, now: float) -> float:
        """Take `units` now; return how long to wait before doing them (0 when the bucket covers them).

        Units beyond the bucket are borrowed, so a batch larger than the burst is paced, not refused."""
        self._available = min(self.burst, self._available + (now - self._last) * self.rate)
        self._last = now
        self._available -= units
        return 0.0 if self._available >= 0 else -self._available / self.rate
