"""L1: a bounded in-process LRU with a short TTL, invalidated through Redis pub/sub.

The TTL bounds staleness even when an invalidation message is lost; eviction is LRU so hot cards stay.
Each entry lives a random 80-100% of the TTL (never longer, so the bound holds): keys loaded together
then expire apart instead of all refilling from Redis in the same instant.
Not thread-safe: one instance per event loop (one per node process).
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable


class NearCache:
    __slots__ = ("_clock", "_data", "_max", "_ttl", "evictions")

    def __init__(self, *, max_entries: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 0 or ttl <= 0:
            raise ValueError(f"NearCache needs max_entries >= 0 and ttl > 0 (got {max_entries}, {ttl})")
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl
        self._clock = clock
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self._max > 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] < self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry[1]

    def put(self, key: str, value: bytes) -> None:
        if not self._max:
            return
        data = self._data
        data[key] = (self._clock() + self._ttl * (1.0 - 0.2 * random.random()), value)
        data.move_to_end(key)
        if len(data) > self._max:
            data.popitem(last=False)
            self.evictions += 1

    def discard(self, keys: Iterable[str]) -> None:
        pop = self._data.pop
        for key in keys:
            pop(key, None)

    def clear(self) -> None:
        self._data.clear()
