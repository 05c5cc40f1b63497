"""The feed reader after its database came back with less history (restored from a backup, or a failover
that lost commits): it reads on from the database's head, not from the head it had read. It read
`seq > old head`, so the sequences handed out again below it were never delivered (an outside check:
events 4-7 lost, a Progress mark 7 above the database's head 3). FeedTailer, the real loop; the
database is a fake holding (sequence, tag) rows."""

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

    async def events_after(self, _pool: Any, after: int, limit: int, **_: Any) -> list[dict[str, Any]]:
        if self.down:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("restoring")
        return [{"seq": s, "feed_type": 1, "tag": t} for s, t in self.rows if s > after][:limit]

    async def head(self, _pool: Any, **_: Any) -> int:
        if self.down:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("restoring")
        return max((s for s, _ in self.rows), default=0)


class Event:
    def __init__(self, row: dict[str, Any]) -> None:
        self.tag = row["tag"]

    def SerializeToString(self) -> bytes:   # protobuf's name
        return self.tag.encode()


async def test_a_head_that_went_back_is_read_on_from(monkeypatch: pytest.MonkeyPatch) -> None:
    feed = FakeFeed()
    monkeypatch.setattr(tailer_module, "events_after", feed.events_after)
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
        feed.down = False
        for _ in range(100):
            if tailer.head == 5:
                break
            await asyncio.sleep(0.01)
        after = await tailer.subscribe(frozenset())
        assert after.start <= 5 and tailer.boundary == 5, (after.start, tailer.head)
        feed.rows.append((6, "new-6"))
        async with asyncio.timeout(1):
            got = await after.queue.get()
        assert got == (6, b"new-6")
        assert tailer.head == 6
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
