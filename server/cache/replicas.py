"""A shard's copies: its primary and its replicas (docs/decisions.md "Replicated shards").

The ring places a key on a shard by the shard's name (shard_router/); which copies hold that shard
is not part of placement, so adding, removing or moving a replica moves no key. Within a shard the
routing is mcrouter's:

- reads go to one copy — the node's preferred copy when it has one (`CRS_CACHE_PREFERRED_COPY`, e.g.
  the copy in its own zone), else spread round robin — and fail over to the next copy when that one errors,
  times out or is marked down (FailoverRoute). An error *reply* (WRONGTYPE, ...) is a miss, as
  without replicas; a miss is a miss (no failover on a miss: every copy is filled alike).
- fills (SET), copies and invalidations (DEL + publish) go to every copy (AllSyncRoute). A delete is
  acknowledged only when every copy acknowledged it, so the outbox relay retries the write until
  all copies have seen it — exactly the guarantee a single shard had.
- a write-only copy (one being added or removed: shard_router/moves.py) gets every write but no read.
- every copy has its own breaker (server/cache/breaker.py): a copy that failed is skipped while its
  siblings serve its keys, and is flushed before it serves again (its recovery probe), so a copy
  that missed deletes while it was away never answers stale. The shard as a whole is down — its
  keys go to PostgreSQL — only when no copy serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar, cast

from server.cache.shard import Shard, ShardReplyError, ShardUnavailable, copy_px, copyable

T = TypeVar("T")


class ReplicatedShard:
    """The copies of one shard, the primary first. One per shard name per topology version."""

    __slots__ = ("_next", "copies", "name", "only", "preferred", "readers", "write_only")

    def __init__(self, name: str, copies: Sequence[Shard], *, preferred: str = "",
                 write_only: Collection[str] = ()) -> None:
        """`preferred`: the copy label (`primary`, `replica-1`, ...) reads try first; "" spreads them.
        `write_only`: URLs of copies that get every write but no read (never the primary)."""
        if not copies:
            raise ValueError(f"shard {name!r} needs at least one copy")
        self.name = name
        self.copies = tuple(copies)
        self.write_only = frozenset(write_only)
        if self.copies[0].url in self.write_only:
            raise ValueError(f"shard {name!r}: its primary cannot be write-only")
        self.readers = tuple(c for c in self.copies if c.url not in self.write_only)
        # The one copy of a shard without replicas: the tier's GET takes its lean path then.
        self.only = self.copies[0] if len(self.copies) == 1 else None
        self._next = 0
        first = next((c for c in self.readers if c.copy == preferred), None)
        # The preferred copy, then the others in their order (a shard without that copy spreads).
        self.preferred = (first, *(c for c in self.readers if c is not first)) if first is not None else None

    def __repr__(self) -> str:   # the URLs may hold passwords
        return f"<ReplicatedShard {self.name} {' '.join(repr(c) for c in self.copies)}>"

    @property
    def primary(self) -> Shard:
        return self.copies[0]

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(c.url for c in self.copies)

    @property
    def is_up(self) -> bool:
        """Some copy reads may use serves: the shard's keys are answered from Redis, not PostgreSQL."""
        return any(c.breaker.serving for c in self.readers)

    def serving_copy(self) -> Shard | None:
        return next((c for c in self.readers if c.breaker.serving), None)

    # -- reads: one copy, failing over -------------------------------------------------------------
    def _order(self) -> tuple[Shard, ...]:
        if self.preferred is not None:
            return self.preferred
        start = self._next
        self._next = (start + 1) % len(self.readers)
        return self.readers[start:] + self.readers[:start]

    def first_copy(self) -> Shard:
        """The copy the next read tries first (where `_order` starts), without moving the round robin
        on: a read on a gRPC thread that steps aside leaves that copy first for the loop's read."""
        if self.preferred is not None:
            return self.preferred[0]
        return self.readers[self._next]

    def took_first(self) -> None:
        """A read on a gRPC thread used `first_copy()`: the next read starts at the next copy, as after
        `_order`. (Two threads may both take the same copy; the spread stays even over many reads.)"""
        if self.preferred is None:
            self._next = (self._next + 1) % len(self.readers)

    async def read(self, op: Callable[[Shard], Awaitable[T]]) -> T:
        """`op` on one copy, the next one (round robin) first; a copy that is down, fails or times out
        is skipped for the next. ShardReplyError from the copy that answered (the caller's miss);
        ShardUnavailable when no copy could be used."""
        if self.only is not None:       # no replica: exactly what the shard did before replicas
            with self.only.guard:
                return await op(self.only)
        for copy in self._order():
            try:
                with copy.guard:        # refuses a copy marked down (starting its probe when due)
                    return await op(copy)
            except ShardUnavailable:
                continue
        raise ShardUnavailable(self.name)

    async def get(self, key: str, *, copy_budget: float, may_copy: bool) -> bytes | None:
        """GET on one copy, failing over like `read`; a miss on a warming copy asks a warmed sibling
        and (with `may_copy`) copies the value it finds onto the warming copy."""
        for copy in self._order():
            try:
                with copy.guard:
                    value = await copy.read(key)
            except ShardUnavailable:
                continue
            if value is not None or not copy.warming:
                return value
            return await self._from_sibling(copy, key, copy_budget=copy_budget, may_copy=may_copy)
        raise ShardUnavailable(self.name)

    async def _from_sibling(self, warming: Shard, key: str, *, copy_budget: float, may_copy: bool) -> bytes | None:
        sibling = next((c for c in self.readers if c is not warming and c.breaker.serving and not c.warming), None)
        if sibling is None:
            return None
        started = time.monotonic()
        try:
            with sibling.guard:
                async with sibling.client.pipeline(transaction=False) as pipe:
                    pipe.get(key)
                    pipe.pttl(key)
                    value, ttl = await pipe.execute()
        except (ShardUnavailable, ShardReplyError):
            return None
        if value is None or not copyable(ttl):   # 0: expiring now
            return None
        if may_copy and time.monotonic() - started <= copy_budget:
            with contextlib.suppress(ShardUnavailable, ShardReplyError):
                with warming.guard:
                    await warming.client.set(key, value, px=copy_px(ttl), nx=True)
                if time.monotonic() - started > copy_budget:
                    # Too slow: a write may have deleted the key in between (as RedisTier._copy).
                    with warming.delete_guard:
                        await warming.client.delete(key)
        return cast("bytes", value)

    # -- writes: every copy ------------------------------------------------------------------------
    async def write_all(self, op: Callable[[Shard], Awaitable[object]], *, delete: bool = False) -> bool:
        """`op` on every copy at once; True only if every copy did it. With `delete` it runs under
        each copy's delete_guard (an error reply to a delete counts as the copy failing)."""
        async def one(copy: Shard) -> bool:
            try:
                with copy.delete_guard if delete else copy.guard:
                    await op(copy)
            except (ShardUnavailable, ShardReplyError):
                return False
            return True

        if self.only is not None:
            return await one(self.only)
        return all(await asyncio.gather(*(one(c) for c in self.copies)))

    # -- the topology ------------------------------------------------------------------------------
    def take_out(self) -> None:
        """Marked down in the topology: every copy is skipped (the keys go to PostgreSQL)."""
        for copy in self.copies:
            copy.take_out()

    def put_back(self) -> None:
        """Marked active again: every copy is probed and flushed before it serves."""
        for copy in self.copies:
            copy.put_back()

    def release_held(self) -> None:
        """The topology says active: copies an operator had taken out are probed (and flushed)."""
        for copy in self.copies:
            if copy.breaker.held:
                copy.put_back()

    async def close(self) -> None:
        for copy in self.copies:
            await copy.close()
