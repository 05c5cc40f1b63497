"""The feed reader after its database came back with less history (restored from a backup, or a failover
that lost commits): it reads on from the database's head, not from the head it had read. It read
`seq > old head`, so the sequences handed out again below it were never delivered (an outside check:
events 4-7 lost, a Progress mark 7 above the database's head 3). Such a database is in a new epoch,
which the reader also notices when no read failed (a pool reconnects by itself): every watcher ends,
to resume with its epoch. FeedTailer, the real loop; the database is a fake holding (sequence, tag)
rows."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import server.feed.service as service
from server.caller import Caller
from server.errors import BackendUnavailable
from server.feed import tailer as tailer_module
from server.feed.service import FeedHandlers
from server.feed.tailer import FeedTailer
from server.proto import crs_pb2 as pb


class FakeFeed:
    def __init__(self) -> None:
        self.rows = [(seq, f"old-{seq}") for seq in range(1, 8)]
        self.down = False
        self.epoch = "1/1"

    async def read_events(self, _pool: Any, after: int, limit: int, **_: Any) -> tuple[str, list[dict[str, Any]]]:
        if self.down:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("restoring")
        return self.epoch, [{"seq": s, "feed_type": 1, "tag": t} for s, t in self.rows if s > after][:limit]

    async def current_epoch(self, _pool: Any, **_: Any) -> str:
        if self.down:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("restoring")
        return self.epoch

    async def head(self, _pool: Any, **_: Any) -> int:
        if self.down:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("restoring")
        return max((s for s, _ in self.rows), default=0)


class Event:
    def __init__(self, row: dict[str, Any], epoch: str) -> None:
        self.tag = f"{row['tag']}@{epoch}"

    def SerializeToString(self) -> bytes:   # protobuf's name
        return self.tag.encode()


async def test_a_head_that_went_back_is_read_on_from(monkeypatch: pytest.MonkeyPatch) -> None:
    feed = FakeFeed()
    monkeypatch.setattr(tailer_module, "read_events", feed.read_events)
    monkeypatch.setattr(tailer_module, "current_epoch", feed.current_epoch)
    monkeypatch.setattr(tailer_module, "head", feed.head)
    monkeypatch.setattr(tailer_module, "event_from_row", Event)
    monkeypatch.setattr(tailer_module, "RETRY_SECONDS", 0.01)
    tailer = FeedTailer(pool=None, poll_interval=0.01, batch=100, queue_size=100, timeout=1.0)  # type: ignore[arg-type]
    runner = asyncio.create_task(tailer.run())
    try:
        before = await tailer.subscribe(frozenset())
        assert before.start == 7
        feed.down = True                                     # restored from a backup taken at sequence 3
        async with asyncio.timeout(1):
            assert isinstance(await before.queue.get(), BackendUnavailable)
        feed.rows = [(seq, f"old-{seq}") for seq in range(1, 4)] + [(4, "new-4"), (5, "new-5")]
        feed.epoch = "1/2"                                   # the restore started a new timeline
        feed.down = False
        for _ in range(100):
            if tailer.head == 5:
                break
            await asyncio.sleep(0.01)
        after = await tailer.subscribe(frozenset())
        assert after.start <= 5 and tailer.boundary == 5, (after.start, tailer.head)
        assert after.epoch == tailer.epoch == "1/2", "marks after the restore name its epoch"
        feed.rows.append((6, "new-6"))
        async with asyncio.timeout(1):
            got = await after.queue.get()
        assert got == (6, b"new-6@1/2")
        assert tailer.head == 6
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_new_epoch_ends_the_watchers_even_when_no_read_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The restored database took writes past the old head before the reader looked again, and no read
    failed: without the epoch the reader would have read on from 7, its watchers receiving the new 8
    after the lost 4-7, and the reissued 4-7 never."""
    feed = FakeFeed()
    monkeypatch.setattr(tailer_module, "read_events", feed.read_events)
    monkeypatch.setattr(tailer_module, "current_epoch", feed.current_epoch)
    monkeypatch.setattr(tailer_module, "head", feed.head)
    monkeypatch.setattr(tailer_module, "event_from_row", Event)
    tailer = FeedTailer(pool=None, poll_interval=0.01, batch=100, queue_size=100, timeout=1.0)  # type: ignore[arg-type]
    runner = asyncio.create_task(tailer.run())
    try:
        before = await tailer.subscribe(frozenset())
        assert (before.start, before.epoch) == (7, "1/1")
        feed.rows = [(seq, f"old-{seq}") for seq in range(1, 4)] + [(seq, f"new-{seq}") for seq in range(4, 9)]
        feed.epoch = "1/2"
        async with asyncio.timeout(1):
            ended = await before.queue.get()
        assert isinstance(ended, BackendUnavailable) and "resume from the last sequence you applied, with its" \
            " epoch" in str(ended), ended
        assert (tailer.head, tailer.boundary, tailer.epoch) == (8, 8, "1/2")
        after = await tailer.subscribe(frozenset())
        feed.rows.append((9, "new-9"))
        async with asyncio.timeout(1):
            assert await after.queue.get() == (9, b"new-9@1/2")
        assert after.epoch == "1/2"
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_watch_opened_while_the_reader_retries_starts_from_the_database_s_head(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A database restored in the same epoch (a volume snapshot: same cluster, same timeline), and a
    consumer that resumes from its checkpoint 3 while the reader waits out its retry: it subscribed at
    the reader's old head, 7, and its Watch sent a Progress mark 7 above the database's head at once,
    then skipped the reissued 4-7 as already delivered (an audit, 2026-12-05). A Watch reads the
    database's head after subscribing: below the subscription's start, the database came back with less
    than the reader read, and the Watch is refused (UNAVAILABLE: retry) until the reader is back at it."""
    feed = FakeFeed()
    monkeypatch.setattr(tailer_module, "read_events", feed.read_events)
    monkeypatch.setattr(tailer_module, "current_epoch", feed.current_epoch)
    monkeypatch.setattr(tailer_module, "head", feed.head)
    monkeypatch.setattr(tailer_module, "RETRY_SECONDS", 0.3)
    for module in (tailer_module, service):
        monkeypatch.setattr(module, "event_from_row", Event)
    monkeypatch.setattr(service, "read_events", feed.read_events)

    async def window(pool: Any, **_: Any) -> tuple[int, int]:
        return 0, await feed.head(pool)

    async def horizon(_pool: Any, **_: Any) -> int:
        return 0

    monkeypatch.setattr(service, "window", window)
    monkeypatch.setattr(service, "horizon", horizon)
    tailer = FeedTailer(pool=None, poll_interval=0.01, batch=100, queue_size=100, timeout=1.0)  # type: ignore[arg-type]
    handlers = FeedHandlers(pool=None, tailer=tailer, timeout=1, batch=100, progress_interval=5.0,  # type: ignore[arg-type]
                            snapshot_chunk=10, snapshot_max=1)
    runner = asyncio.create_task(tailer.run())
    try:
        before = await tailer.subscribe(frozenset())
        assert before.start == 7
        feed.down = True
        async with asyncio.timeout(1):
            assert isinstance(await before.queue.get(), BackendUnavailable)
        feed.rows = [(seq, f"old-{seq}") for seq in range(1, 4)]   # back at 3, in the same epoch
        feed.down = False
        assert tailer._failed and tailer.head == 7, "the reader waits out its retry"
        watch = handlers.Watch(pb.WatchRequest(from_sequence=3), Caller("c", frozenset(), "mtls"))
        try:
            async with asyncio.timeout(2):
                first = await watch.__anext__()
        except BackendUnavailable:
            first = b"refused"
        assert first in (b"refused", b"new-4@1/1"), \
            f"a Progress mark {pb.ChangeEvent.FromString(first).sequence} above the database's head, 3"
        if first == b"refused":   # retried: the reader knows the database's head by then
            for _ in range(100):
                if not tailer._failed:
                    break
                await asyncio.sleep(0.01)
            watch = handlers.Watch(pb.WatchRequest(from_sequence=3), Caller("c", frozenset(), "mtls"))
            feed.rows.append((4, "new-4"))
            async with asyncio.timeout(2):
                assert await watch.__anext__() == b"new-4@1/1"
        await watch.aclose()  # type: ignore[attr-defined]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
