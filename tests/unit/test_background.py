"""server/background.py: a node's background task that fails is said and stops the node; one that
returns, or that the node stops, is no fault."""
from __future__ import annotations

import asyncio
import logging

import pytest

from server import background
from server.background import BackgroundTasks


async def _forever() -> None:
    await asyncio.Event().wait()


async def _fails() -> None:
    await asyncio.sleep(0)
    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


async def _returns() -> None:
    await asyncio.sleep(0)


async def test_a_task_that_fails_is_logged_and_breaks_the_node(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks()
    tasks.start("relay", _forever())
    tasks.start("invalidations", _fails())
    async with asyncio.timeout(5):
        await tasks.broken.wait()
    [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert record.task == "invalidations" and record.error == "UnicodeDecodeError"   # type: ignore[attr-defined]
    assert record.exc_info is not None and isinstance(record.exc_info[1], UnicodeDecodeError)
    await tasks.stop()


async def test_a_task_that_returns_is_done_not_failed(caplog: pytest.LogCaptureFixture) -> None:
    """A task may end when it has nothing to do (the read route without a replica)."""
    tasks = BackgroundTasks()
    tasks.start("read-route", _returns())
    await asyncio.sleep(0.05)
    assert not tasks.broken.is_set() and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await tasks.stop()


async def test_tasks_the_node_stops_are_no_fault(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks()
    for name in ("relay", "topology", "bins"):
        tasks.start(name, _forever())
    await asyncio.sleep(0)
    await tasks.stop()
    assert not tasks.broken.is_set() and not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_once_stopping_a_task_that_ends_is_no_fault() -> None:
    tasks = BackgroundTasks()
    tasks.stopping()                       # Node.stop's first step: the drain ends some work itself
    tasks.start("feed-tailer", _fails())
    await asyncio.sleep(0.05)
    assert not tasks.broken.is_set()
    await tasks.stop()


async def test_a_task_deaf_to_its_cancel_is_left_after_the_wait(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(background, "STOP_SECONDS", 0.1)
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    tasks = BackgroundTasks()
    tasks.start("database-probe", deaf())
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await tasks.stop()
    assert asyncio.get_running_loop().time() - started < 2
    assert [r.task for r in caplog.records if r.levelno == logging.WARNING] == ["database-probe"]  # type: ignore[attr-defined]
    assert not tasks.broken.is_set()
    release.set()
