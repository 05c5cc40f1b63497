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

from server.errors import BackendUnavailable
from server.feed import tailer as tailer_module
from server.feed.tailer import FeedTailer


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
