"""One feed reader per node process, fanned out in memory to every watcher on it.

The tailer reads `seq > head` from the outbox whenever a NOTIFY (sent by every write's transaction,
delivered at commit) wakes it, and every `poll_interval` anyway: behind PgBouncer in transaction
mode LISTEN does not work and polling alone keeps the feed moving. A hundred watchers cost one
reader, not a hundred.

Each watcher has a bounded queue. A watcher that falls further behind than its queue holds (a bulk
import, a consumer slower than the burst) is not cut off: the tailer drops what its queue held, puts
CATCH_UP in its place and stops offering it events (it is "unsynced", as etcd's watchable store calls
it). The watcher then reads on from PostgreSQL after the last sequence it sent, `batch` events at a
time, with the same catch-up a Watch from an old checkpoint makes, and `rejoin`s the broadcast once it
has reached the tailer's head: in one loop turn, so no event is read in between (no gap), and the
events it read from the table are never offered again (no duplicate). Memory stays one queue, or one
page, per watcher, and QUEUED_MAX events over all of them (past it, those furthest behind are unsynced
as if their queues had overflowed); ending every overflowing watcher at once sent them all back
reconnecting together.
When PostgreSQL fails, every watcher's stream ends (BackendUnavailable -> UNAVAILABLE);
their resume loses nothing because they resume from what they applied, not from what was sent.

`Subscription.boundary` is the highest sequence at which the tailer had read everything committed
(a read that came back short): the events of one transaction become visible together, so a boundary
never falls inside a transaction, and Progress marks are only ever drawn from it.

Each read names the database's epoch (server/feed/epochs.py) along with its rows, and events and marks
carry it. Another epoch than the one read so far (a restore, a promoted standby) ends every watcher:
they resume with their sequence and epoch, and a checkpoint from a lost history is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from server.errors import BackendUnavailable, CrsError
from server.logs import LIMIT_KEY
from server.store.db import DB_ERRORS
from server.store.envelope import FEED_CHANNEL
from server.store.feed import current_epoch, event_from_row, head, read_events

log = logging.getLogger("crs.feed")

RETRY_SECONDS = 1.0         # after a failed read or a lost LISTEN connection
QUEUED_MAX = 1_000_000      # events queued over all of a process's watchers (~70 MB: they share each event's bytes)
YIELD_OFFERS = 20_000       # offers to watchers between two turns given back to the event loop (a few ms)
EPOCH_CHANGED = ("the database's history changed (a restore, a failover): resume from the last sequence you"
                 " applied, with its epoch")


class CatchUp:
    """Queued in place of a watcher's events when its queue overflowed: read on from PostgreSQL."""


CATCH_UP = CatchUp()
Item = tuple[int, bytes] | CrsError | CatchUp   # (sequence, encoded ChangeEvent), why the stream ends, or CATCH_UP


@dataclass(eq=False)
class Subscription:
    types: frozenset[int]               # empty = every type
    start: int                          # live events are those with sequence > start
    queue: asyncio.Queue[Item]
    boundary: int = 0                   # everything <= boundary was read (and queued if it matched)
    epoch: str = ""                     # the epoch of the read that moved the boundary
    ended: CrsError | None = None       # why the stream ends, for a watcher reading from the table meanwhile

    def wants(self, entity_type: int) -> bool:
        return not self.types or entity_type in self.types


class FeedTailer:
    def __init__(self, *, pool: asyncpg.Pool, connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
                 poll_interval: float, batch: int, queue_size: int, timeout: float,
                 on_change: Callable[[int, int, int], None] = lambda watchers, catching_up, head: None) -> None:
        self.pool = pool
        self._connect = connect             # a dedicated LISTEN connection (None: poll only)
        self.poll_interval = poll_interval
        self.batch = batch
        self.queue_size = queue_size
        self.timeout = timeout
        self.head = 0                       # highest sequence read so far
        self.boundary = 0
        self.epoch = ""                     # the database's epoch as last read (server/feed/epochs.py)
        self._subs: set[Subscription] = set()        # offered every event read (etcd's synced watchers)
        self._unsynced: set[Subscription] = set()    # overflowed: catching up from the table, offered nothing
        self._on_change = on_change         # (watchers, of them catching up, head) for the metrics
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._failed = False                # a read failed: check the head before reading on
        self._closed = ""                   # why close() ended every watcher: a later one is refused as well

    async def subscribe(self, types: frozenset[int]) -> Subscription:
        """A subscription to every event after the tailer's current head (`sub.start`)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._ready.wait()
        except TimeoutError:
            raise BackendUnavailable("the change feed has not reached PostgreSQL yet; retry") from None
        if self._closed:   # the node drains: a Watch the server took just before would hold its stop
            raise BackendUnavailable(self._closed)
        sub = Subscription(types=types, start=self.head, queue=asyncio.Queue(self.queue_size),
                           boundary=self.boundary, epoch=self.epoch)
        self._subs.add(sub)
        self._changed()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        self._unsynced.discard(sub)
        self._changed()

    @property
    def watchers(self) -> int:
        return len(self._subs) + len(self._unsynced)

    def _changed(self) -> None:
        self._on_change(self.watchers, len(self._unsynced), self.head)

    def rejoin(self, sub: Subscription, at: int) -> bool:
        """An unsynced watcher that has delivered (or filtered out) everything up to `at` takes the live
        broadcast again if `at` is the tailer's head: every event after it is yet to be read, and will be
        offered (an event up to `at` offered again is skipped by the watcher). While it says False (the
        head moved on), read on from the table. True for a watcher that was ended meanwhile: its queue
        holds why."""
        if sub.ended is not None:
            return True
        if at < self.head:
            return False
        self._unsynced.discard(sub)
        self._subs.add(sub)
        sub.boundary, sub.epoch = self.boundary, self.epoch
        self._changed()
        return True

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen()) if self._connect is not None else None
        try:
            while True:
                try:
                    if not self._ready.is_set():
                        self.epoch = await current_epoch(self.pool, timeout=self.timeout)
                        self.head = self.boundary = await head(self.pool, timeout=self.timeout)
                        self._ready.set()
                    elif self._failed:
                        await self._check_head()
                    self._failed = False
                    await self._read_all()
                except DB_ERRORS as exc:
                    log.warning("feed read failed; watchers end with UNAVAILABLE",   # each retry: limited
                                extra={"error": type(exc).__name__, LIMIT_KEY: (type(exc).__name__,)})
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
        epoch = await current_epoch(self.pool, timeout=self.timeout)
        newest = await head(self.pool, timeout=self.timeout)
        if epoch != self.epoch:
            self._new_epoch(epoch, newest)
        elif newest < self.head:
            log.error("the change feed's head went back (a restored database, or a failover that lost commits):"
                      " reading on from the database's head", extra={"was": self.head, "now": newest})
            self.head = self.boundary = newest
            self._changed()

    def _new_epoch(self, epoch: str, newest: int) -> None:
        """The database is in another history than the one read so far (a restore, a promoted standby),
        with or without a failed read (a pool reconnects by itself): its sequences from some point on
        are other changes. Every watcher ends (UNAVAILABLE) and resumes with its sequence and epoch,
        which Watch checks; with no watcher left, reading on from the database's head skips nothing
        (a Watch catches up from the table up to where its subscription starts)."""
        level = logging.ERROR if newest < self.head else logging.WARNING   # commits lost, or a clean failover
        log.log(level, "the change feed's epoch changed (a restored database, a promoted standby): watchers end"
                " and resume with their epoch",
                extra={"was": self.epoch, "now": epoch, "head_was": self.head, "head_now": newest})
        self._end_all(BackendUnavailable(EPOCH_CHANGED))
        self.head = self.boundary = newest
        self.epoch = epoch
        self._changed()

    async def _read_all(self) -> None:
        while True:
            epoch, rows = await read_events(self.pool, self.head, self.batch, timeout=self.timeout)
            if epoch != self.epoch:
                self._new_epoch(epoch, await head(self.pool, timeout=self.timeout))
                continue
            if rows:
                await self._fan_out(rows, epoch)
            if len(rows) < self.batch:          # caught up: a transaction boundary
                self.boundary = self.head
                for sub in self._subs:
                    sub.boundary, sub.epoch = self.boundary, self.epoch
                return

    async def _fan_out(self, rows: list[asyncpg.Record], epoch: str) -> None:
        """Offer each row to every watcher that wants it. The head moves row by row, and the loop is
        given back every YIELD_OFFERS offers: a thousand watchers times a page of rows is millions of
        offers, and a miss waiting behind them waited seconds. A watcher that subscribes or rejoins
        meanwhile starts after the head, i.e. after the last row offered: no gap, no duplicate.
        Queued events are counted over every watcher: past QUEUED_MAX those furthest behind are unsynced
        (their queues dropped; they read on from PostgreSQL when they read at all), so memory stays
        bounded however many watchers stop reading."""
        offers = 0
        for n, row in enumerate(rows, 1):
            encoded: bytes | None = None
            for sub in list(self._subs):
                if sub.wants(row["feed_type"]):
                    encoded = encoded or event_from_row(row, epoch).SerializeToString()
                    self._offer(sub, (row["seq"], encoded))
            self.head = row["seq"]
            offers += len(self._subs) + 1
            if offers >= YIELD_OFFERS or n == len(rows):   # the bound is checked as often: past it by a turn's worth
                offers = 0
                if (queued := sum(sub.queue.qsize() for sub in self._subs)) > QUEUED_MAX:
                    self._shed(queued)
                self._changed()
                await asyncio.sleep(0)

    def _shed(self, queued: int) -> None:
        """`queued` past QUEUED_MAX: unsync the watchers furthest behind until half the bound is left."""
        behind = sorted(self._subs, key=lambda sub: sub.queue.qsize(), reverse=True)
        shed = 0
        for sub in behind:
            if queued <= QUEUED_MAX // 2:
                break
            queued -= sub.queue.qsize()
            self._unsync(sub, quiet=True)
            shed += 1
        log.warning("watchers' queues held more than the node's bound: those furthest behind catch up from"
                    " PostgreSQL", extra={"watchers": shed, "bound": QUEUED_MAX, "head": self.head})

    def _offer(self, sub: Subscription, item: Item) -> None:
        try:
            sub.queue.put_nowait(item)
        except asyncio.QueueFull:
            self._unsync(sub)

    def _unsync(self, sub: Subscription, *, quiet: bool = False) -> None:
        """The watcher fell more than its queue behind. What it has not taken is dropped, all of it (only
        the oldest would leave a hole behind a later event): it reads them again from the table, from the
        last event it delivered, and is offered nothing until it rejoins."""
        self._subs.discard(sub)
        self._unsynced.add(sub)
        self._drop_queued(sub, CATCH_UP)
        self._changed()
        if not quiet:
            log.info("a watcher fell behind its queue; it catches up from PostgreSQL",   # one per Watch: limited
                     extra={"queue_size": self.queue_size, "head": self.head, LIMIT_KEY: ()})

    def _end(self, sub: Subscription, why: CrsError) -> None:
        """End a watcher's stream with `why`. What it has not taken from its queue is dropped, all of
        it: the watcher then stops at the last event it delivered, and a resume from there reads the
        dropped ones again. A watcher catching up from the table stops there (`sub.ended`)."""
        sub.ended = why
        self.unsubscribe(sub)
        self._drop_queued(sub, why)

    @staticmethod
    def _drop_queued(sub: Subscription, then: Item) -> None:
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(then)

    def close(self, why: CrsError) -> None:
        """End every watcher's stream now, and any that subscribes later (a draining node: they resume
        on another one)."""
        self._closed = str(why)
        self._end_all(why)

    def _end_all(self, why: CrsError) -> None:
        for sub in list(self._subs | self._unsynced):
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
                log.info("feed LISTEN unavailable; polling",
                         extra={"error": type(exc).__name__, LIMIT_KEY: (type(exc).__name__,)})
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=1))
            await asyncio.sleep(RETRY_SECONDS)
