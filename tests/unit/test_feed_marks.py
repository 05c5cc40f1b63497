"""A Watch's idle Progress mark never goes out ahead of an event at or below it (FeedHandlers._live, the
real code). When the tailer queues an event and moves the boundary in the very loop turn the idle wait
runs out, the mark must wait for that event: a consumer checkpoints marks, and one sent ahead of an
event it then crashed before applying would resume past it (an outside check saw 579 such inversions
in 45 s at a 10 ms interval). No servers: the tailer's step is played on the loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import server.feed.service as service
from server.feed.service import FeedHandlers
from server.feed.tailer import Subscription
from server.proto import crs_pb2 as pb


async def test_an_idle_mark_waits_for_an_event_queued_as_the_wait_ran_out(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    sub = Subscription(types=frozenset(), start=5, queue=asyncio.Queue(100), boundary=5)
    handlers = FeedHandlers(pool=None, tailer=None, timeout=1, batch=10, progress_interval=0.05,  # type: ignore[arg-type]
                            snapshot_chunk=10, snapshot_max=1)
    waits = [0]

    def timeout(delay: float) -> Any:
        waits[0] += 1
        when = loop.time() + delay
        if waits[0] == 1:   # the tailer's read completes in the turn the first idle wait ends
            def tailer_read_completes() -> None:
                sub.queue.put_nowait((6, b"event-6"))
                sub.boundary = 6
            loop.call_at(when, tailer_read_completes)
        return asyncio.timeout_at(when)

    monkeypatch.setattr(service.asyncio, "timeout", timeout)   # only aligns the two in one turn
    live = handlers._live(5, sub, caught_up_at=5)
    seen = []
    for _ in range(3):
        item = await live.__anext__()
        if item == b"event-6":
            seen.append("event 6")
        else:
            event = pb.ChangeEvent.FromString(item)
            seen.append(f"mark {event.progress.high_water_sequence}")
    await live.aclose()
    assert seen == ["mark 5", "event 6", "mark 6"]
