"""ChangeFeedService handlers: Watch (resume from a sequence, then live, with progress marks) and
Snapshot (every entity as of one sequence). Validation first, then the store or the tailer.

A Watch sends a Progress mark as soon as it has delivered everything committed when it began (the
catch-up mark: `crs feed tail --no-follow` stops there however busy the feed is), and then whenever
nothing was sent for `progress_interval`. A `from_sequence` beyond the newest committed sequence is
refused (OUT_OF_RANGE): a checkpoint from the future means the consumer's copy holds changes this
database never had (a database restored from an older backup, another environment's checkpoint),
and waiting for the sequence to come round would skip every change up to it. A `from_sequence` with the
epoch of a history this database no longer has (restored from a backup, a failover that lost commits)
is refused too (OUT_OF_RANGE, server/feed/epochs.py), however far the new history has gone since.

A watcher whose queue overflowed (server/feed/tailer.py) is not ended: `_live` finds CATCH_UP in its
queue, reads on from the table with the same `_catch_up` a Watch from an old checkpoint starts with,
and rejoins the tailer's broadcast at its head. It is not bounded further: it holds one page, and reads
one page per `batch` events its consumer takes, the reads it would make anyway after being cut off and
reconnecting. How far behind it may fall is the retention: compacted past, it ends OUT_OF_RANGE.

Reading from the table costs the node's loop a decode per event, a page of memory and a busy stream
per watcher: one client's Watches read from it CATCH_UPS_PER_CLIENT at a time, its others waiting their
turn (an outside audit's 384 Watches from sequence 0, one client, held a lookup's miss 3.9 s), and the
node's CRS_FEED_CATCH_UP_READS at a time, whichever clients they are of (NodeTurns: 128 clients' Watches
catching up at once held misses 0.5 s at p99 when a turn covered only a page's read, 0.1 s now)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg

from server.caller import Caller
from server.errors import BackendTimeout, BackendUnavailable, CrsError, FeedOverload, InvalidKey, OutOfRange
from server.feed.epochs import epoch_shape_ok, stale_checkpoint
from server.feed.events import ENTITY_TYPES, progress_event
from server.feed.tailer import EPOCH_CHANGED, CatchUp, FeedTailer, Subscription
from server.proto import crs_pb2 as pb
from server.store.db import DB_ERRORS, acquire, translate_db_errors
from server.store.feed import (
    SNAPSHOT_TYPES,
    current_epoch,
    event_from_row,
    horizon,
    known_epochs,
    read_events,
    snapshot,
    window,
)

CATCH_UPS_PER_CLIENT = 2   # a client's Watches reading from the table at once; its others wait their turn
TURN_POLL_SECONDS = 0.5    # how soon a Watch waiting for its turn sees the node draining
CATCH_UP_SLICE = 1.0       # seconds a Watch holds one of the node's catch-up turns before the next in line


async def _take(turns: asyncio.Semaphore, sub: Subscription, waiting: Callable[[], None] = lambda: None) -> None:
    """One of `turns`, first come first served; while it waits, `sub` ending (a draining node) ends the
    wait with why, and `waiting()` runs every TURN_POLL_SECONDS."""
    acquire = asyncio.ensure_future(turns.acquire())
    try:
        while not acquire.done():
            await asyncio.wait({acquire}, timeout=TURN_POLL_SECONDS)
            if not acquire.done():
                if sub.ended is not None:
                    raise sub.ended
                waiting()
    except BaseException:   # ended, or the call went: no turn taken, or the one just given back
        if acquire.done() and not acquire.cancelled():
            turns.release()
        acquire.cancel()
        raise


class ClientTurns:
    """At most `per_client` holders of a turn per client at once; the others wait, first come first served."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._clients: dict[str, tuple[asyncio.Semaphore, int]] = {}   # client: (its turns, holders and waiters)

    @contextlib.asynccontextmanager
    async def turn(self, client: str, sub: Subscription) -> AsyncIterator[None]:
        """A turn of `client`'s; while it waits, `sub` ending (a draining node) ends the wait with why."""
        turns, users = self._clients.get(client, (asyncio.Semaphore(self.per_client), 0))
        self._clients[client] = (turns, users + 1)
        try:
            await _take(turns, sub)
            try:
                yield
            finally:
                turns.release()
        finally:
            turns, users = self._clients[client]
            if users == 1:
                del self._clients[client]
            else:
                self._clients[client] = (turns, users - 1)


class Turn:
    """One of a node's catch-up turns, held by one Watch: see NodeTurns."""

    __slots__ = ("_since", "_sub", "_turns", "held", "reading")

    def __init__(self, turns: NodeTurns, sub: Subscription) -> None:
        self._turns = turns
        self._sub = sub
        self._since = 0.0
        self.held = False
        self.reading = False   # a page read under way: its turn is not taken back (it holds a connection)

    async def take(self) -> None:
        waits = self._turns.semaphore.locked()   # else taken at once: not counted as waiting
        if waits:
            self._turns.count_waiting(1)
        try:
            await _take(self._turns.semaphore, self._sub, self._turns.take_back_overdue)
        finally:
            if waits:
                self._turns.count_waiting(-1)
        self.held = True
        self._since = time.monotonic()
        self._turns.holders.add(self)

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self._turns.holders.discard(self)
            self._turns.semaphore.release()

    def overdue(self, now: float) -> bool:
        return now - self._since >= self._turns.slice and not self.reading

    async def share(self) -> None:
        """Between two events: held a slice, the turn goes to the back of the line (and comes back at once
        when no other Watch waits); taken back while the consumer did not read, it is waited for again."""
        if self.held and self.overdue(time.monotonic()):
            self.give_back()
        if not self.held:
            await self.take()


class NodeTurns:
    """At most `turns` Watches of a node process read from the table and deliver what they read at once
    (CRS_FEED_CATCH_UP_READS), first come first served. A turn goes to the back of the line once held
    `slice` seconds, so that a Watch far behind, or one whose consumer reads slowly, does not keep the
    others waiting for its whole catch-up; one whose consumer stopped reading (it waits at an event
    unsent) has its turn taken back by the next Watch in line, a poll later."""

    def __init__(self, turns: int, slice: float = CATCH_UP_SLICE,
                 on_waiting: Callable[[int], None] = lambda waiting: None,
                 on_taken_back: Callable[[], None] = lambda: None) -> None:
        self.semaphore = asyncio.Semaphore(turns)
        self.slice = slice
        self.holders: set[Turn] = set()
        self.waiting = 0
        self._on_waiting = on_waiting   # Watches waiting for a turn, for the metrics
        self._on_taken_back = on_taken_back   # a turn taken back from its holder, for the metrics

    def count_waiting(self, change: int) -> None:
        self.waiting += change
        self._on_waiting(self.waiting)

    def take_back_overdue(self) -> None:
        """A Watch waits: the turns held past their slice go to the line (their holders wait for one again
        at their next event)."""
        now = time.monotonic()
        for turn in [t for t in self.holders if t.overdue(now)]:
            turn.give_back()
            self._on_taken_back()

    @contextlib.asynccontextmanager
    async def turn(self, sub: Subscription) -> AsyncIterator[Turn]:
        turn = Turn(self, sub)
        await turn.take()
        try:
            yield turn
        finally:
            turn.give_back()


class SnapshotSlots:
    """At most `limit` Snapshots at once per node process (CRS_FEED_SNAPSHOT_MAX: each holds a pooled
    connection and a transaction while its reader reads), and a share: the last free one goes only to
    a client that runs none here, so one client (an extract job starting one per entity type, or one
    that stalls) never holds them all. Anonymous callers are not told apart (dev stacks,
    CRS_ALLOW_ANONYMOUS): the limit bounds them, the share does not. One event loop: no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self._held: dict[str, int] = {}   # identified client: its Snapshots running

    @contextlib.contextmanager
    def slot(self, caller: Caller) -> Iterator[None]:
        if self.running >= self.limit:
            raise FeedOverload(f"this node already runs {self.limit} snapshots (CRS_FEED_SNAPSHOT_MAX); "
                               "retry later or on another node")
        client = "" if caller.via == "anonymous" else caller.client_id
        held = self._held.get(client, 0) if client else 0
        if held and self.running == self.limit - 1:
            raise FeedOverload(f"client {client!r} already runs {held} of this node's {self.limit} snapshots"
                               " (CRS_FEED_SNAPSHOT_MAX); the last one is kept for a client that runs none:"
                               " retry when one of yours ends, or on another node")
        self.running += 1
        if client:
            self._held[client] = held + 1
        try:
            yield
        finally:
            self.running -= 1
            if client:
                if self._held[client] == 1:
                    del self._held[client]
                else:
                    self._held[client] -= 1


def _types(requested: Any, allowed: frozenset[int]) -> frozenset[int]:
    types = frozenset(int(t) for t in requested)
    unknown = types - allowed
    if unknown:
        raise InvalidKey(f"unknown entity type(s) {sorted(unknown)}; known: {sorted(allowed)}")
    return types


class FeedHandlers:
    def __init__(self, *, pool: asyncpg.Pool, tailer: FeedTailer, timeout: float, batch: int,
                 progress_interval: float, snapshot_chunk: int, snapshot_max: int,
                 snapshot_stall: float = 120.0, catch_up_reads: int = 4,
                 on_catch_up_waiting: Callable[[int], None] = lambda waiting: None,
                 on_catch_up_taken_back: Callable[[], None] = lambda: None) -> None:
        self.pool = pool
        self.tailer = tailer
        self.timeout = timeout
        self.batch = batch
        self.progress_interval = progress_interval
        self.snapshot_chunk = snapshot_chunk
        self.snapshot_stall = snapshot_stall   # seconds a reader may leave a chunk unread (the transaction waits)
        self._snapshots = SnapshotSlots(snapshot_max)
        # Watches behind the live tail (an old checkpoint, an overflowed queue) reading from the table and
        # delivering what they read, at once: the others wait their turn rather than take the pool
        # connections lookups' misses need, or keep a stream thread and the loop busy each.
        self._node_turns = NodeTurns(catch_up_reads, on_waiting=on_catch_up_waiting,
                                     on_taken_back=on_catch_up_taken_back)
        self._catch_up_turns = ClientTurns(CATCH_UPS_PER_CLIENT)

    async def Watch(self, request: pb.WatchRequest, caller: Caller) -> AsyncIterator[bytes]:
        if request.from_sequence < 0:
            raise InvalidKey(f"from_sequence must be >= 0 (got {request.from_sequence})")
        types = _types(request.entity_types, ENTITY_TYPES)
        sub = await self.tailer.subscribe(types)   # first: nothing committed from here on can be missed
        try:
            with translate_db_errors():
                oldest, newest = await window(self.pool, timeout=self.timeout)
                await self._check_epoch(request)
            if newest < sub.start:   # read after subscribing: the database came back with less than the reader read
                raise BackendUnavailable("the database's feed went back (a restore?) and this node has not read it"
                                         " again yet: retry in a moment")
            if request.from_sequence and request.from_sequence < oldest:
                raise OutOfRange(f"sequence {request.from_sequence} was compacted; the oldest retained is"
                                 f" {oldest + 1}: take a Snapshot and Watch from its sequence")
            if request.from_sequence > newest:
                raise OutOfRange(f"sequence {request.from_sequence} is beyond the newest committed one ({newest}):"
                                 " this checkpoint is not from this database (restored from an older backup, or"
                                 " another environment's); take a Snapshot and Watch from its sequence")
            cursor = max(request.from_sequence, oldest)
            async for data in self._catch_up(cursor, sub, until=sub.start, client=caller.client_id):
                yield data
            async for data in self._live(cursor, sub, caught_up_at=newest, client=caller.client_id):
                yield data
        finally:
            self.tailer.unsubscribe(sub)

    async def _check_epoch(self, request: pb.WatchRequest) -> None:
        """OUT_OF_RANGE for a checkpoint from a history this database no longer has (an empty epoch: a
        consumer from before epochs, not checked)."""
        if not request.epoch:
            return
        current = await current_epoch(self.pool, timeout=self.timeout)
        if request.epoch == current:
            return
        if not epoch_shape_ok(request.epoch):   # never quoted back: it may be anything
            raise InvalidKey("epoch is malformed (expected one a Snapshot or an event answered: HEX/TIMELINE)")
        why = stale_checkpoint(epoch=request.epoch, from_sequence=request.from_sequence, current=current,
                               first_sequences=await known_epochs(self.pool, timeout=self.timeout))
        if why is not None:
            raise OutOfRange(why)

    async def _catch_up(self, cursor: int, sub: Subscription, *, until: int, client: str) -> AsyncIterator[bytes]:
        """Events after `cursor` up to `until`, from the table: up to where the live subscription starts,
        and again up to the tailer's head whenever the watcher fell behind its queue. Once it returns,
        everything up to `until` was delivered or filtered out. In one of `client`'s turns."""
        if cursor >= until:
            return
        async with self._catch_up_turns.turn(client, sub), contextlib.aclosing(
                self._pages(cursor, sub, until=until)) as pages:   # closed with this one: its turn given back
            async for data in pages:
                yield data

    async def _pages(self, cursor: int, sub: Subscription, *, until: int) -> AsyncGenerator[bytes, None]:
        async with self._node_turns.turn(sub) as turn:
            while cursor < until:
                await turn.share()
                turn.reading = True
                try:
                    with translate_db_errors():
                        epoch, rows = await read_events(self.pool, cursor, self.batch, timeout=self.timeout)
                        oldest = await horizon(self.pool, timeout=self.timeout)
                finally:
                    turn.reading = False
                if oldest > cursor:   # compaction ran since this Watch began: the rows read may have holes
                    raise OutOfRange(f"sequence {cursor} was compacted while this Watch caught up; the oldest"
                                     f" retained is {oldest + 1}: take a Snapshot and Watch from its sequence")
                if epoch != sub.epoch:   # rows of another history than this stream's: as the tailer would end it
                    raise BackendUnavailable(EPOCH_CHANGED)
                if not rows:
                    break
                for row in rows:
                    if sub.ended is not None:   # a draining node, a lost database: not after the whole catch-up
                        raise sub.ended
                    if row["seq"] > until:
                        return
                    cursor = row["seq"]
                    if sub.wants(row["feed_type"]):
                        await turn.share()
                        yield event_from_row(row, epoch).SerializeToString()
        # Nothing (more) to read up to `until`: the consumer is at it, even if nothing matched.

    async def _live(self, cursor: int, sub: Subscription, *, caught_up_at: int,
                    client: str = "") -> AsyncIterator[bytes]:
        """Live events, and Progress marks: one as soon as everything up to `caught_up_at` (the newest
        sequence when the Watch began) is delivered, then one after each idle `progress_interval`.
        A mark is only sent with the queue empty: every event up to `sub.boundary` was queued before
        the boundary moved, so an empty queue means all of them were delivered (or filtered out)."""
        delivered = max(cursor, sub.start)
        mark_due = True
        while True:
            if mark_due and sub.queue.empty() and sub.boundary >= max(delivered, caught_up_at):
                mark_due = False
                yield progress_event(sub.boundary, sub.epoch).SerializeToString()
            try:
                async with asyncio.timeout(self.progress_interval):
                    item = await sub.queue.get()
            except TimeoutError:
                # Idle: everything up to the tailer's last boundary has been delivered or filtered out,
                # unless the tailer queued events in the very turn the wait ran out (then they go first:
                # a mark ahead of them would be checkpointed past them). Never a mark below what was
                # delivered (it would split a transaction on resume).
                if sub.queue.empty() and sub.boundary >= delivered:
                    yield progress_event(sub.boundary, sub.epoch).SerializeToString()
                continue
            if isinstance(item, CrsError):
                raise item
            if isinstance(item, CatchUp):   # the queue overflowed (the tailer dropped it): the table, then live again
                while True:
                    until = max(self.tailer.head, delivered)
                    async for data in self._catch_up(delivered, sub, until=until, client=client):
                        yield data
                    delivered = until
                    # In the turn that checks the head: no event can be read between the check and the move.
                    if self.tailer.rejoin(sub, delivered):
                        break
                continue
            sequence, data = item
            if sequence <= delivered:
                continue
            delivered = sequence
            yield data

    async def Snapshot(self, request: pb.SnapshotRequest, caller: Caller) -> AsyncIterator[bytes]:
        types = _types(request.entity_types, frozenset(SNAPSHOT_TYPES)) or frozenset(SNAPSHOT_TYPES)
        ordered = [t for t in SNAPSHOT_TYPES if t in types]
        with self._snapshots.slot(caller):
            stalled = False
            with translate_db_errors():
                async with acquire(self.pool, self.timeout) as conn:
                    try:
                        async for chunk in snapshot(conn, ordered, chunk_size=self.snapshot_chunk,
                                                    stall=self.snapshot_stall):
                            handed = time.monotonic()
                            yield chunk.SerializeToString()
                            stalled = time.monotonic() - handed > self.snapshot_stall
                    except asyncpg.exceptions.QueryCanceledError as exc:
                        raise BackendTimeout(f"a snapshot read ran over {self.snapshot_stall:g} s"
                                             " (CRS_FEED_SNAPSHOT_STALL; a table locked by a migration?):"
                                             " start the Snapshot again") from exc
                    except DB_ERRORS:
                        if not stalled:
                            raise
                        # PostgreSQL ended the transaction the stalled reader held open (VACUUM waited on it).
                        raise FeedOverload(f"the reader left a chunk unread for over {self.snapshot_stall:g} s"
                                           " (CRS_FEED_SNAPSHOT_STALL): the snapshot's transaction was ended;"
                                           " start the Snapshot again") from None
