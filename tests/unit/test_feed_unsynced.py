"""A watcher whose queue overflows is not ended: it catches up from the table and rejoins the broadcast
(server/feed/tailer.py, FeedHandlers._live). The real tailer loop and the real Watch code on one event
loop; the database is a fake holding (sequence, tag) rows, and writes land while the watcher is
behind, so it has to read on past where it first aimed before it can rejoin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import server.feed.service as service
from server.errors import BackendUnavailable
from server.feed import tailer as tailer_module
from server.feed.service import FeedHandlers
from server.feed.tailer import FeedTailer, Subscription
from server.proto import crs_pb2 as pb


class FakeFeed:
    def __init__(self, through: int) -> None:
        self.rows = list(range(1, through + 1))
        self.reads = 0                               # the watcher's reads (the tailer's are not counted)

    def write(self, through: int) -> None:
        self.rows += range(self.rows[-1] + 1, through + 1)

    async def read_events(self, _pool: Any, after: int, limit: int, **_: Any) -> tuple[str, list[dict[str, Any]]]:
        await asyncio.sleep(0)                       # a read lets the other side run, as a real one does
        return "1/1", [{"seq": s, "feed_type": 1} for s in self.rows if s > after][:limit]

    async def counted_read(self, pool: Any, after: int, limit: int, **kw: Any) -> tuple[str, list[dict[str, Any]]]:
        self.reads += 1
        return await self.read_events(pool, after, limit, **kw)

    async def current_epoch(self, _pool: Any, **_: Any) -> str:
        return "1/1"

    async def head(self, _pool: Any, **_: Any) -> int:
        return self.rows[-1]

    async def horizon(self, _pool: Any, **_: Any) -> int:
        return 0


class Event:
    def __init__(self, row: dict[str, Any], epoch: str) -> None:
        self.sequence = row["seq"]

    def SerializeToString(self) -> bytes:   # protobuf's name
        return f"event {self.sequence}".encode()


@pytest.fixture
def feed(monkeypatch: pytest.MonkeyPatch) -> FakeFeed:
    feed = FakeFeed(through=7)
    for module in (tailer_module, service):
        monkeypatch.setattr(module, "event_from_row", Event)
    monkeypatch.setattr(tailer_module, "read_events", feed.read_events)
    monkeypatch.setattr(tailer_module, "current_epoch", feed.current_epoch)
    monkeypatch.setattr(tailer_module, "head", feed.head)
    monkeypatch.setattr(service, "read_events", feed.counted_read)
    monkeypatch.setattr(service, "horizon", feed.horizon)
    return feed


def _read(item: bytes) -> str:
    return item.decode() if item.startswith(b"event ") else f"mark {pb.ChangeEvent.FromString(item).sequence}"


def _catch_up_handlers(tailer: FeedTailer, *, batch: int, catch_up_reads: int, **kw: Any) -> FeedHandlers:
    return FeedHandlers(pool=None, tailer=tailer, timeout=1, batch=batch, progress_interval=5.0,  # type: ignore[arg-type]
                        snapshot_chunk=10, snapshot_max=1, catch_up_reads=catch_up_reads, **kw)


async def _watch(tailer: FeedTailer) -> tuple[Subscription, AsyncIterator[bytes]]:
    sub = await tailer.subscribe(frozenset())
    handlers = FeedHandlers(pool=None, tailer=tailer, timeout=1, batch=4, progress_interval=5.0,  # type: ignore[arg-type]
                            snapshot_chunk=10, snapshot_max=1)
    return sub, handlers._live(sub.start, sub, caught_up_at=sub.start)


async def test_an_overflowing_watcher_catches_up_from_the_table_and_rejoins(feed: FakeFeed) -> None:
    states: list[tuple[int, int]] = []              # what the metrics see: (watchers, of them catching up)
    tailer = FeedTailer(pool=None, poll_interval=0.005, batch=3, queue_size=2, timeout=1.0,  # type: ignore[arg-type]
                        on_change=lambda watchers, catching_up, head: states.append((watchers, catching_up)))
    runner = asyncio.create_task(tailer.run())
    try:
        sub, live = await _watch(tailer)
        assert sub.start == 7 and _read(await live.__anext__()) == "mark 7"
        feed.write(through=40)                       # a burst: 33 events for a queue of 2
        got: list[str] = []
        while "event 40" not in got:
            async with asyncio.timeout(2):
                got.append(_read(await live.__anext__()))
            if got[-1] == "event 12":
                assert sub in tailer._unsynced, "the queue overflowed: the watcher is reading the table"
                feed.write(through=60)               # the head moves on while it does
            await asyncio.sleep(0.002)               # a consumer slower than the tailer
        while "event 60" not in got:
            async with asyncio.timeout(2):
                got.append(_read(await live.__anext__()))
        events = [int(g.split()[1]) for g in got if g.startswith("event")]
        assert events == list(range(8, 61)), "a hole, a repeat or a reordering"
        assert feed.reads >= 2
        # Asked for more, it rejoins at the head (60): a later write comes through the queue.
        following = asyncio.ensure_future(live.__anext__())
        for _ in range(100):
            if sub in tailer._subs:
                break
            await asyncio.sleep(0.01)
        assert sub in tailer._subs and sub not in tailer._unsynced and tailer.watchers == 1
        assert (1, 1) in states and states[-1] == (1, 0), "crs_feed_watchers_catching_up went up, then down"
        reads = feed.reads
        feed.write(through=61)
        async with asyncio.timeout(2):
            assert _read(await following) == "event 61"
        assert feed.reads == reads, "from the broadcast, not the table"
        await live.aclose()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_watcher_reading_the_table_ends_at_once_with_the_node(feed: FakeFeed) -> None:
    """A draining node (or a lost database) ends a watcher that is catching up from the table at its
    next event, not after the whole catch-up."""
    tailer = FeedTailer(pool=None, poll_interval=0.005, batch=3, queue_size=2, timeout=1.0)  # type: ignore[arg-type]
    runner = asyncio.create_task(tailer.run())
    try:
        sub, live = await _watch(tailer)
        assert _read(await live.__anext__()) == "mark 7"
        feed.write(through=500)
        async with asyncio.timeout(2):
            assert _read(await live.__anext__()) == "event 8"
        assert sub in tailer._unsynced
        tailer.close(BackendUnavailable("the node is shutting down; resume from your last sequence"))
        with pytest.raises(BackendUnavailable, match="shutting down"):
            async with asyncio.timeout(2):
                await live.__anext__()
        assert tailer.watchers == 0
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_watchers_behind_the_tail_read_a_few_at_a_time(feed: FakeFeed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten watchers overflowed by one burst each read it from the table: without a bound they took ten
    pool connections at once, the ones lookups' cache misses load with. At most `catch_up_reads` read
    at once; the others wait their turn, and every one still gets every event once, in order."""
    reading, most = 0, 0

    async def slow_read(pool: Any, after: int, limit: int, **kw: Any) -> tuple[str, list[dict[str, Any]]]:
        nonlocal reading, most
        reading += 1
        most = max(most, reading)
        try:
            await asyncio.sleep(0.003)
            return await feed.read_events(pool, after, limit, **kw)
        finally:
            reading -= 1

    monkeypatch.setattr(service, "read_events", slow_read)
    tailer = FeedTailer(pool=None, poll_interval=0.005, batch=3, queue_size=2, timeout=1.0)  # type: ignore[arg-type]
    runner = asyncio.create_task(tailer.run())
    try:
        handlers = _catch_up_handlers(tailer, batch=4, catch_up_reads=2)
        subs = [await tailer.subscribe(frozenset()) for _ in range(10)]

        async def follow(live: AsyncIterator[bytes]) -> list[int]:
            got: list[int] = []
            while not got or got[-1] < 60:
                async with asyncio.timeout(5):
                    item = _read(await live.__anext__())
                if item.startswith("event"):
                    got.append(int(item.split()[1]))
            await live.aclose()  # type: ignore[attr-defined]   # a consumer that has what it wanted goes
            return got

        # Each client reads CATCH_UPS_PER_CLIENT at a time: ten clients here, so the pool's bound shows.
        lives = [handlers._live(sub.start, sub, caught_up_at=sub.start, client=f"c{n}")
                 for n, sub in enumerate(subs)]
        for live in lives:
            assert _read(await live.__anext__()) == "mark 7"
        feed.write(through=60)
        results = await asyncio.gather(*(follow(live) for live in lives))
        assert all(got == list(range(8, 61)) for got in results)
        assert 1 < most <= 2, f"{most} catch-up reads at once"
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)



async def _fan_out_to_stalled(feed: FakeFeed, *, stalled_watchers: int,
                              events: int) -> tuple[FeedTailer, list[Subscription], int]:
    """`stalled_watchers` that never read and one that reads every event; `events` written at once.
    Returns the tailer, the stalled subscriptions and how many turns other work had meanwhile."""
    tailer = FeedTailer(pool=None, poll_interval=0.005, batch=200, queue_size=10_000, timeout=1.0)  # type: ignore[arg-type]
    runner = asyncio.create_task(tailer.run())
    turns = 0

    async def other_work() -> None:   # a lookup's share of the loop
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    try:
        stalled = [await tailer.subscribe(frozenset()) for _ in range(stalled_watchers)]
        sub, live = await _watch(tailer)
        assert _read(await live.__anext__()) == "mark 7"
        ticker = asyncio.create_task(other_work())
        feed.write(through=7 + events)
        got: list[str] = []
        while f"event {7 + events}" not in got:
            async with asyncio.timeout(5):
                got.append(_read(await live.__anext__()))
        ticker.cancel()
        assert [int(g.split()[1]) for g in got if g.startswith("event")] == list(range(8, 8 + events)), \
            "the reader missed or repeated an event"
        assert sub in tailer._subs, "the reader kept its place in the broadcast"
        await live.aclose()
        return tailer, stalled, turns
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_fan_out_to_many_watchers_gives_the_loop_back(feed: FakeFeed, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outside audit: 1,000 Watches and 5,000 events, and a lookup waited 3.7 s behind the fan-out
    (every offer to every watcher in one turn of the loop). Now other work runs every YIELD_OFFERS."""
    monkeypatch.setattr(tailer_module, "YIELD_OFFERS", 500)
    _, _, turns = await _fan_out_to_stalled(feed, stalled_watchers=100, events=400)   # 40,400 offers
    assert turns >= 60, f"the loop ran other work only {turns} times during the fan-out"


async def test_watchers_that_stop_reading_hold_no_more_than_the_nodes_bound(
        feed: FakeFeed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same audit: those 1,000 unread Watches took the node from 115 to 463 MB, each queueing every
    event up to CRS_FEED_QUEUE_SIZE (10,000). Past the node's bound on queued events the watchers
    furthest behind read on from the table instead (when they read at all): their queues are dropped."""
    monkeypatch.setattr(tailer_module, "QUEUED_MAX", 20_000)
    monkeypatch.setattr(tailer_module, "YIELD_OFFERS", 500)   # the reader takes its events every few rows
    tailer, stalled, _ = await _fan_out_to_stalled(feed, stalled_watchers=100, events=400)   # 40,000 queued
    assert sum(s.queue.qsize() for s in stalled) <= 20_000, "queued events past the node's bound"
    assert sum(s in tailer._unsynced for s in stalled) >= 50, "the watchers that stopped reading read on from the table"


async def test_one_clients_watches_read_the_table_two_at_a_time_and_a_drain_ends_those_waiting(
        feed: FakeFeed) -> None:
    """An outside audit: 384 Watches from sequence 0, one client, kept the loop decoding events and held a
    lookup's miss 3.9 s. A client's Watches now read from the table CATCH_UPS_PER_CLIENT at a time; its
    others wait their turn, another client's do not wait for them, and a draining node ends the waiting
    ones at once (UNAVAILABLE, resume elsewhere), not after the grace period."""
    feed.write(through=400)
    tailer = FeedTailer(pool=None, poll_interval=0.005, batch=10, queue_size=10_000, timeout=1.0)  # type: ignore[arg-type]
    runner = asyncio.create_task(tailer.run())
    try:
        handlers = _catch_up_handlers(tailer, batch=10, catch_up_reads=8)
        assert service.CATCH_UPS_PER_CLIENT == 2

        async def from_zero(client: str) -> tuple[Subscription, AsyncIterator[bytes]]:
            sub = await tailer.subscribe(frozenset())
            return sub, handlers._catch_up(0, sub, until=sub.start, client=client)

        greedy = [await from_zero("greedy") for _ in range(5)]
        firsts = [asyncio.ensure_future(stream.__anext__()) for _, stream in greedy]
        # The first two read their first event (however long that takes: a loop not run for a while
        # woke to a fixed 0.2 s sleep's end first), then the others have had time to, were they let.
        await asyncio.wait(firsts[:2], timeout=5)
        await asyncio.sleep(0.2)
        assert [f.done() for f in firsts] == [True, True, False, False, False], "two of the client's at a time"
        other_sub, other = await from_zero("other")
        async with asyncio.timeout(1):
            assert await other.__anext__() == b"event 1", "another client does not wait for them"
        await greedy[0][1].aclose()   # one is done: the next of the client's takes its turn
        async with asyncio.timeout(1):
            assert await firsts[2] == b"event 1"
        assert not firsts[3].done()
        tailer.close(BackendUnavailable("the node is shutting down; resume from your last sequence"))
        for waiting in firsts[3:]:
            with pytest.raises(BackendUnavailable, match="shutting down"):
                async with asyncio.timeout(service.TURN_POLL_SECONDS + 1):
                    await waiting
        for _, stream in (*greedy[1:], (other_sub, other)):
            await stream.aclose()  # type: ignore[attr-defined]
        assert handlers._catch_up_turns._clients == {}, "no client's turns are kept once none waits"
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_the_nodes_watches_catch_up_a_few_at_a_time_and_in_slices(feed: FakeFeed) -> None:
    """128 clients' Watches catching up at once held a lookup's miss 0.5 s at p99 (2-core VM, hybrid):
    each took the node's bound only for its page reads and delivered what it read outside it, so every
    one kept a stream busy. Now CRS_FEED_CATCH_UP_READS Watches read and deliver at once, whichever
    their clients: one here. A turn held a slice goes to the back of the line (a Watch far behind does
    not keep the others waiting for its whole catch-up), and every Watch gets every event once, in order."""
    feed.write(through=300)
    tailer = FeedTailer(pool=None, poll_interval=0.005, batch=10, queue_size=10_000, timeout=1.0)  # type: ignore[arg-type]
    runner = asyncio.create_task(tailer.run())
    try:
        waiting: list[int] = []   # what crs_feed_watchers_waiting_turn shows
        handlers = _catch_up_handlers(tailer, batch=10, catch_up_reads=1, on_catch_up_waiting=waiting.append)
        handlers._node_turns.slice = 0.05
        delivered: list[tuple[str, int]] = []

        async def consume(client: str) -> None:
            sub = await tailer.subscribe(frozenset())
            try:
                async for data in handlers._catch_up(0, sub, until=sub.start, client=client):
                    assert [t._sub for t in handlers._node_turns.holders] == [sub], "one Watch delivers at a time"
                    delivered.append((client, int(_read(data).split()[1])))
                    await asyncio.sleep(0.001)   # a consumer reading as the events come
            finally:
                tailer.unsubscribe(sub)

        async with asyncio.timeout(20):
            await asyncio.gather(*(consume(client) for client in "abc"))
        for client in "abc":
            assert [seq for c, seq in delivered if c == client] == list(range(1, 301))
        positions = {client: [n for n, (c, _) in enumerate(delivered) if c == client] for client in "abc"}
        assert max(p[0] for p in positions.values()) < min(p[-1] for p in positions.values()), \
            "a Watch waited for another's whole catch-up"
        assert handlers._node_turns.holders == set()
        assert waiting[-1] == 0 and max(waiting) >= 1, "the others wait while one delivers"
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_stalled_watch_has_its_turn_taken_back_and_a_drain_ends_one_waiting(feed: FakeFeed) -> None:
    """A Watch whose consumer stopped reading waits at an event unsent, holding its turn: the next Watch
    in line takes it back once it was held a slice; the stalled one, reading again, waits for a turn.
    A draining node ends a Watch waiting for one at once (UNAVAILABLE), not after the grace period."""
    feed.write(through=100)
    tailer = FeedTailer(pool=None, poll_interval=0.005, batch=10, queue_size=10_000, timeout=1.0)  # type: ignore[arg-type]
    runner = asyncio.create_task(tailer.run())
    try:
        taken_back: list[None] = []   # crs_feed_catch_up_turns_taken_back_total
        handlers = _catch_up_handlers(tailer, batch=10, catch_up_reads=1,
                                      on_catch_up_taken_back=lambda: taken_back.append(None))
        handlers._node_turns.slice = 0.05
        streams: list[AsyncIterator[bytes]] = []
        for client in ("stalled", "next"):
            sub = await tailer.subscribe(frozenset())
            streams.append(handlers._catch_up(0, sub, until=sub.start, client=client))
        stalled, following = streams
        assert await stalled.__anext__() == b"event 1"       # and then reads nothing
        async with asyncio.timeout(service.TURN_POLL_SECONDS + 1):
            assert await following.__anext__() == b"event 1", "the stalled Watch's turn was taken back"
        assert len(taken_back) == 1, "the take-back is counted"
        handlers._node_turns.slice = 60.0                     # `following` keeps it from here on
        resumed = asyncio.ensure_future(stalled.__anext__())
        await asyncio.sleep(service.TURN_POLL_SECONDS + 0.2)
        assert not resumed.done(), "read again, the stalled Watch waits for a turn"
        tailer.close(BackendUnavailable("the node is shutting down; resume from your last sequence"))
        with pytest.raises(BackendUnavailable, match="shutting down"):
            async with asyncio.timeout(service.TURN_POLL_SECONDS + 1):
                await resumed
        await following.aclose()  # type: ignore[attr-defined]
        assert handlers._node_turns.holders == set() and not handlers._node_turns.semaphore.locked()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_watch_that_starts_after_the_drain_ended_the_others_is_refused(feed: FakeFeed) -> None:
    """A node's stop ends every Watch (they resume elsewhere), then stops taking calls: a Watch the
    server had taken just before, whose subscription came after the drain's, was left open and held
    the node's stop for its whole grace period, to be cut without a word at its end."""
    tailer = FeedTailer(pool=None, poll_interval=0.005, batch=3, queue_size=2, timeout=1.0)  # type: ignore[arg-type]
    runner = asyncio.create_task(tailer.run())
    try:
        _, live = await _watch(tailer)
        assert _read(await live.__anext__()) == "mark 7"
        tailer.close(BackendUnavailable("the node is shutting down; resume from your last sequence"))
        with pytest.raises(BackendUnavailable, match="shutting down"):
            late = await tailer.subscribe(frozenset())
            tailer.unsubscribe(late)
        assert tailer.watchers == 0
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
