"""L1: a bounded in-process LRU with a short TTL, invalidated through Redis pub/sub.

The TTL bounds staleness even when an invalidation message is lost; eviction is LRU so hot cards stay.
Each entry lives a random 80-100% of the TTL (never longer, so the bound holds): keys loaded together
then expire apart instead of all refilling from Redis in the same instant.
Thread-safe: in the hybrid serving model gRPC threads read it while the event loop fills and
invalidates it. Writes take a lock; a read takes none (a lock per read, contended under the GIL, cost
17% of a BatchResolve's samples): each OrderedDict call is atomic under the GIL, and the one race a
read can lose (the key discarded between its read and its LRU bump) leaves the answer it read, as if
the read had come just before the discard.

Refresh-ahead (`refresh` > 0): a hit on an entry in the last `refresh` seconds of its life tells the
caller, once, that the entry is due (`read`); the caller reloads it in the background while the entry
keeps answering. A hot key then never expires under its callers, so none of them waits on a refill,
and the staleness bound is unchanged: no entry answers past its expiry. A key read only now and then
is not refreshed (cold keys are not kept warm). A refresh that fails is not retried: the entry
expires and the next caller's miss reports what is wrong.

Negative entries (keys that match nothing) are kept apart, in at most a tenth of the entries, with
their own LRU: a stream of unknown keys (card testing: random card numbers through a switch, a
scanner) evicts other unknown keys and at most that tenth of the answers, instead of every hot card
in `max_entries / rate` seconds. A read looks there only when the answers do not hold the key.

The answers' bytes are bounded too (`max_bytes`, CRS_NEAR_CACHE_BYTES): answers run from 300 bytes (a
card) to megabytes (the profile of a customer with thousands of cards), and 100,000 entries of 200 KB
profiles would be 20 GB in one process. Past the bound the least recently used answers go; one larger
than the bound is served, not kept.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from server.cache_keys import NEGATIVE

_NOT_HERE: tuple[None, bool] = (None, False)
_JITTER = 0.2   # an entry lives a random 80-100% of the TTL
NEGATIVE_SHARE = 10   # negative entries: at most max_entries // NEGATIVE_SHARE (at least 1)
DEFAULT_MAX_BYTES = 256 * 1024 * 1024   # CRS_NEAR_CACHE_BYTES: per node process


class NearCache:
    __slots__ = ("_bytes", "_clock", "_data", "_due", "_lock", "_max", "_max_bytes", "_max_negative", "_negative",
                 "_refresh", "_ttl", "evictions")

    def __init__(self, *, max_entries: int, ttl: float, refresh: float = 0.0, max_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 0 or ttl <= 0:
            raise ValueError(f"NearCache needs max_entries >= 0 and ttl > 0 (got {max_entries}, {ttl})")
        if not 0 <= refresh < ttl * (1.0 - _JITTER):   # else an entry would be due as soon as it is filled
            raise ValueError(f"NearCache needs 0 <= refresh < {1.0 - _JITTER:g} x ttl (got {refresh}, ttl {ttl})")
        # key -> (expires, value, refresh due from)
        self._data: OrderedDict[str, tuple[float, bytes, float]] = OrderedDict()
        self._negative: OrderedDict[str, tuple[float, bytes, float]] = OrderedDict()   # the same, NEGATIVE values
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0   # of the answers' values held (negative entries are one byte each: not counted)
        self._max_negative = max(1, max_entries // NEGATIVE_SHARE)
        self._ttl = ttl
        self._refresh = refresh
        self._due: set[str] = set()   # keys whose refresh was handed out and has not landed yet
        self._clock = clock
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self._max > 0

    def __len__(self) -> int:
        return len(self._data) + len(self._negative)

    def get(self, key: str) -> bytes | None:
        return self.read(key)[0]

    def read(self, key: str) -> tuple[bytes | None, bool]:
        """(the value or None, whether the caller should refresh it now). True is answered once per
        entry: until a put() replaces it, other readers get False."""
        data = self._data
        entry = data.get(key)
        if entry is None:
            data = self._negative
            entry = data.get(key)
            if entry is None:
                return _NOT_HERE
        now = self._clock()
        if entry[0] < now:
            with self._lock:
                if data.get(key) is entry:   # not replaced by a fill meanwhile
                    self._drop(data, key)
            return _NOT_HERE
        try:
            data.move_to_end(key)
        except KeyError:   # discarded since the read above
            pass
        if entry[2] < now and key not in self._due:
            with self._lock:
                if key in self._due or data.get(key) is not entry:
                    return entry[1], False
                self._due.add(key)
            return entry[1], True
        return entry[1], False

    def put(self, key: str, value: bytes) -> None:
        if not self._max:
            return
        size = len(value)
        if size > self._max_bytes:   # would push out everything else, and still not fit
            self.discard((key,))
            return
        expires = self._clock() + self._ttl * (1.0 - _JITTER * random.random())
        refresh_from = expires - self._refresh if self._refresh else math.inf
        negative = value == NEGATIVE
        data, other = (self._negative, self._data) if negative else (self._data, self._negative)
        with self._lock:
            held = other.pop(key, None)   # an answer that became NOT_FOUND, or the other way round
            if negative:
                self._bytes -= len(held[1]) if held is not None else 0
            else:
                held = data.get(key)
                self._bytes += size - (len(held[1]) if held is not None else 0)
            data[key] = (expires, value, refresh_from)
            data.move_to_end(key)
            self._due.discard(key)
            if negative and len(data) > self._max_negative:
                self._evict(data)
            if len(self._data) + len(self._negative) > self._max:
                self._evict(self._data if self._data else self._negative)
            while self._bytes > self._max_bytes:
                self._evict(self._data)

    def _evict(self, data: OrderedDict[str, tuple[float, bytes, float]]) -> None:
        old, entry = data.popitem(last=False)
        if data is self._data:
            self._bytes -= len(entry[1])
        self._due.discard(old)
        self.evictions += 1

    def _drop(self, data: OrderedDict[str, tuple[float, bytes, float]], key: str) -> None:
        """`key` out of `data` if there (the caller holds the lock)."""
        entry = data.pop(key, None)
        if entry is not None and data is self._data:
            self._bytes -= len(entry[1])
        self._due.discard(key)

    def discard(self, keys: Iterable[str]) -> None:
        with self._lock:   # (a write can name 100,000 keys: the loop's names bound once)
            pop, pop_negative, due, freed = self._data.pop, self._negative.pop, self._due.discard, 0
            for key in keys:
                entry = pop(key, None)
                if entry is not None:
                    freed += len(entry[1])
                pop_negative(key, None)
                due(key)
            self._bytes -= freed

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._negative.clear()
            self._due.clear()
            self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """The answers' bytes held now."""
        return self._bytes
