"""One feed reader per node process, fanned out in memory to every watcher on it.

The tailer reads `seq > head` from the outbox whenever a NOTIFY (sent by every write's transaction,
delivered at commit) wakes it, and every `poll_interval` anyway: behind PgBouncer in transaction
mode LISTEN does not work and polling alone keeps the feed moving. A hundred watchers cost one
reader, not a hundred.

Each watcher has a bounded queue. A watcher that falls further behind than its queue holds is cut
off (FeedOverload -> RESOURCE_EXHAUSTED) instead of growing memory; it resumes from its last
sequence. When PostgreSQL fails, every watcher's stream ends (BackendUnavailable -> UNAVAILABLE);
their resume loses nothing because they resume from what they applied, not from what was sent.

`Subscription.boundary` is the highest sequence at which the tailer had read everything committed
(a read that came back short): the events of one transaction become visible together, so a boundary
never falls inside a transaction, and Progress marks are only ever drawn from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from server.errors import BackendUnavailable, CrsError, FeedOverload
from server.store.db import DB_ERRORS
from server.store.envelope import FEED_CHANNEL
from server.store.feed import event_from_row, events_after, head

log = logging.getLogger("crs.feed")

RETRY_SECONDS = 1.0         # after a failed read or a lost LISTEN connection
Item = tuple[int, bytes] | CrsError   # (sequence, encoded ChangeEvent), or why the stream ends


@dataclass(eq=False)
class Subscription:
    types: frozenset[int]               # empty = every type
    start: int                          # live events are those with sequence > start
    queue: asyncio.Queue[Item]
    boundary: int = 0                   # everything <= boundary was read (and queued if it matched)

    def wants(self, entity_type: int) -> bool:
        return not self.types or entity_type in self.types


class FeedTailer:
    def __init__(self, *, pool: asyncpg.Pool, connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
                 poll_interval: float, batch: int, queue_size: int, timeout: float,
                 on_change: Callable[[int, int], None] = lambda watchers, head: None) -> None:
        self.pool = pool
        self._connect = connect             # a dedicated LISTEN connection (None: poll only)
        self.poll_interval = poll_interval
        self.batch = batch
        self.queue_size = queue_size
        self.timeout = timeout
        self.head = 0                       # highest sequence read so far
        self.boundary = 0
        self._subs: set[Subscription] = set()
        self._on_change = on_change         # (watchers, head) for the metrics
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._failed = False                # a read failed: check the head before reading on

    async def subscribe(self, types: frozenset[int]) -> Subscription:
        """A subscription to every event after the tailer's current head (`sub.start`)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._ready.wait()
        except TimeoutError:
            raise BackendUnavailable("the change feed has not reached PostgreSQL yet; retry") from None
        sub = Subscription(types=types, start=self.head, queue=asyncio.Queue(self.queue_size),
                           boundary=self.boundary)
        self._subs.add(sub)
        self._on_change(len(self._subs), self.head)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        self._on_change(len(self._subs), self.head)

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen()) if self._connect is not None else None
        try:
            while True:
                try:
                    if not self._ready.is_set():
                        self.head = self.boundary = await head(self.pool, timeout=self.timeout)
                        self._ready.set()
                    elif self._failed:
                        await self._check_head()
                    self._failed = False
                    await self._read_all()
                except DB_ERRORS as exc:
                    log.warning("feed read failed; watchers end with UNAVAILABLE", extra={"error": type(exc).__name__})
                    self._end_all(BackendUnavailable("the change feed lost PostgreSQL; resume from your last sequence"))
                    self._failed = True
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives as the
                # event is set (gh-86296), and the node's stop then waits for this loop for ever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _check_head(self) -> None:
        """Back from a failed read: a database restored from a backup, or a failover that lost commits,
        has a head below what was read. Sequences are handed out again from there, so reading on from
        the old head would skip them and draw Progress marks above the database's head: start from its
        head instead (watchers ended with the failure; a checkpoint past it answers OUT_OF_RANGE)."""
        newest = await head(self.pool, timeout=self.timeout)
        if newest < self.head:
            log.error("the change feed's head went back (a restored database, or a failover that lost commits):"
                      " reading on from the database's head", extra={"was": self.head, "now": newest})
            self.head = self.boundary = newest
            self._on_change(len(self._subs), self.head)

    async def _read_all(self) -> None:
        while True:
            rows = await events_after(self.pool, self.head, self.batch, timeout=self.timeout)
            if rows:
                for row in rows:
                    encoded: bytes | None = None
                    for sub in list(self._subs):
                        if sub.wants(row["feed_type"]):
                            encoded = encoded or event_from_row(row).SerializeToString()
                            self._offer(sub, (row["seq"], encoded))
                self.head = rows[-1]["seq"]
                self._on_change(len(self._subs), self.head)
            if len(rows) < self.batch:          # caught up: a transaction boundary
                self.boundary = self.head
                for sub in self._subs:
                    sub.boundary = self.boundary
                return

    def _offer(self, sub: Subscription, item: Item) -> None:
        try:
            sub.queue.put_nowait(item)
        except asyncio.QueueFull:
            self._end(sub, FeedOverload(f"the watcher fell more than {self.queue_size} events behind;"
                                        " resume from the last sequence you applied"))

    def _end(self, sub: Subscription, why: CrsError) -> None:
        """End a watcher's stream with `why`. What it has not taken from its queue is dropped, all of
        it: the watcher then stops at the last event it delivered, and a resume from there reads the
        dropped ones again (dropping only the oldest would leave a hole behind a later event)."""
        self.unsubscribe(sub)
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(why)

    def close(self, why: CrsError) -> None:
        """End every watcher's stream now (a draining node: they resume on another one)."""
        self._end_all(why)

    def _end_all(self, why: CrsError) -> None:
        for sub in list(self._subs):
            self._end(sub, why)

    async def _listen(self) -> None:
        assert self._connect is not None
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(FEED_CHANNEL, lambda *_args: self._wake.set())
                self._wake.set()          # anything committed while we were not listening
                await lost.wait()
            except DB_ERRORS as exc:
                log.info("feed LISTEN unavailable; polling", extra={"error": type(exc).__name__})
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=1))
            await asyncio.sleep(RETRY_SECONDS)
