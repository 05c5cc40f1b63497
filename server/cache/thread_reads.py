"""Redis reads on gRPC threads (the hybrid serving model; docs/decisions.md "Redis hits on the gRPC
thread"): a near-cache miss sends one blocking GET to the key's shard from the thread that holds the
call and answers a Redis hit there, instead of handing the call to the event loop and back. What the
thread cannot settle it leaves to the loop, which finishes the lookup as before (`L2`).

It reads only where the loop's `RedisTier.get` would do exactly one GET: the copy `get` would read
first, serving, not warming, with no keys moving. Everywhere else it steps aside without touching
the round robin, so the loop's `get` starts from the same copy and does what it does there (starts
the recovery probe of a down copy, refills a warming copy from a sibling, reads an old owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable

from server.cache.blocking import BUSY
from server.cache.shard import REPLY_ERRORS, SHARD_ERRORS, Shard
from server.cache.tier import RedisTier


class L2(enum.Enum):
    """What a read on a gRPC thread leaves to the loop that finishes the lookup (Resolver.resolve)."""

    ASK = "ask"     # not read: read Redis on the loop (RedisTier.get)
    MISS = "miss"   # read, no value (or an error reply to the GET): load from PostgreSQL and fill
    DOWN = "down"   # the shard failed: load from PostgreSQL, no fill, as when `get` raises ShardUnavailable


def _ignore(shard: str) -> None:
    pass


class ThreadReads:
    """`get` for gRPC threads over `tier`'s thread connections; failures are recorded on `loop`, where
    the breakers live. `on_busy(shard)`: a read left to the loop because every thread connection to
    that shard was in use (the sign CRS_REDIS_THREAD_CONNECTIONS is too low for the load)."""

    def __init__(self, tier: RedisTier, loop: asyncio.AbstractEventLoop,
                 on_busy: Callable[[str], None] = _ignore) -> None:
        self.tier = tier
        self.loop = loop
        self.on_busy = on_busy

    def get(self, key: str) -> bytes | L2:
        """The value, or what is left to the loop. A failure is recorded exactly as `RedisTier.get`
        records one (breaker, metrics, log); the lookup then loads from PostgreSQL (L2.DOWN), or, for a
        shard with replicas, the loop's `get` fails over to a sibling (L2.ASK)."""
        view = self.tier.view
        if view.routing.fallback is not None:     # keys are moving: `get` reads the old owner too
            return L2.ASK
        group = view.shards[view.routing.read.node_for(key)]
        copy = group.only or group.first_copy()
        blocking = copy.blocking
        if blocking is None or not copy.breaker.serving or copy.warming:
            return L2.ASK
        try:
            value = blocking.get(key)
        except REPLY_ERRORS as exc:    # the shard answered the GET with an error: a miss, as in `get`
            self._record(copy, exc)
            return L2.MISS
        except SHARD_ERRORS as exc:
            self._record(copy, exc)
            if group.only is not None:
                return L2.DOWN
            group.took_first()
            return L2.ASK
        if value is BUSY:
            self.on_busy(copy.name)
            return L2.ASK
        if group.only is None:
            group.took_first()
        copy.breaker.record_success()   # one store (Breaker): safe from a thread
        return L2.MISS if value is None else value

    def _record(self, copy: Shard, exc: BaseException) -> None:
        with contextlib.suppress(RuntimeError):   # the loop closed: the node is stopping
            self.loop.call_soon_threadsafe(copy.guard.classify, exc)
