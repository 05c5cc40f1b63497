"""LoopBridge.call (server/hybrid.py): a gRPC thread's wait for one coroutine on the node's loop.

A real event loop runs in a thread, as in a hybrid node; the gRPC side is a stand-in context with
the two things the bridge uses (time_remaining, add_callback). The whole path through a real gRPC
server is covered by tests/integration/test_serving_models.py."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from server.errors import BackendUnavailable, NotFound
from server.hybrid import NO_DEADLINE, CallEnded, LoopBridge


class Context:
    """The call's side: a deadline, and the callbacks grpc runs when the call ends, however it ends."""

    def __init__(self, remaining: float = NO_DEADLINE * 2) -> None:
        self.remaining = remaining
        self.callbacks: list[Callable[[], None]] = []

    def time_remaining(self) -> float:
        return self.remaining

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        for callback in self.callbacks:
            callback()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> Any:
    async def run() -> Any:
        return fn()
    return asyncio.run_coroutine_threadsafe(run(), loop).result(5)


def hanging(cancelled: threading.Event, entered: threading.Event | None = None) -> Callable[[], Awaitable[bytes]]:
    """A coroutine function whose coroutine sets `entered` (if given), waits for a minute and sets
    `cancelled` when cancelled."""
    async def hangs() -> bytes:
        if entered is not None:
            entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""
    return hangs


def test_answer_and_error_come_back(loop: asyncio.AbstractEventLoop) -> None:
    bridge = LoopBridge(loop)

    async def answer() -> bytes:
        await asyncio.sleep(0)
        return b"resolution"

    async def missing() -> bytes:
        raise NotFound("card not found")

    assert bridge.call(answer, Context()) == b"resolution"   # type: ignore[arg-type]
    with pytest.raises(NotFound, match="card not found"):
        bridge.call(missing, Context())   # type: ignore[arg-type]


def test_deadline_cancels_the_coroutine(loop: asyncio.AbstractEventLoop) -> None:
    bridge = LoopBridge(loop)
    cancelled, entered = threading.Event(), threading.Event()
    hangs = hanging(cancelled, entered)

    class Started(Context):
        """The call's 0.2 s left once its coroutine runs: a deadline that passed before the loop started it
        (a loop thread not scheduled for 0.2 s) leaves it never started, and nothing to cancel."""

        def time_remaining(self) -> float:
            assert entered.wait(5), "the loop never started the call's coroutine"
            self.started = time.monotonic()
            return self.remaining

    context = Started(remaining=0.2)
    with pytest.raises(CallEnded):
        bridge.call(hangs, context)   # type: ignore[arg-type]
    assert time.monotonic() - context.started < 2
    assert cancelled.wait(2), "the coroutine of a call past its deadline kept running"


def test_cancelled_call_releases_the_thread_and_cancels(loop: asyncio.AbstractEventLoop) -> None:
    bridge = LoopBridge(loop)
    cancelled = threading.Event()
    entered = threading.Event()
    hangs = hanging(cancelled, entered)
    context = Context()

    def cancel() -> None:
        """The client cancels (grpc runs the call's callbacks) once the thread waits on the running
        coroutine: not 0.2 s after the start, which a busy machine can reach before the call registered
        its callback (the stand-in then never runs it) or before its coroutine started (never cancelled)."""
        assert entered.wait(5)
        deadline = time.monotonic() + 5
        while not context.callbacks and time.monotonic() < deadline:
            time.sleep(0.01)
        context.end()

    threading.Thread(target=cancel, daemon=True).start()
    with pytest.raises(CallEnded):
        bridge.call(hangs, context)   # type: ignore[arg-type]
    assert cancelled.wait(2)



class EndedContext(Context):
    """A call that ended before its handler registered anything: grpc's add_callback then answers False
    and will never run the callback."""

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


def test_a_call_that_ended_before_it_reached_the_loop_does_not_wait_for_its_work(
        loop: asyncio.AbstractEventLoop) -> None:
    """A client that cancels while the handler is still on its thread (the gate, a Redis GET): the call
    ends at the bridge, its coroutine cancelled (or never started), instead of holding a thread and a
    waiting slot for the whole load."""
    bridge = LoopBridge(loop)
    cancelled = threading.Event()
    started = time.monotonic()
    with pytest.raises(CallEnded):
        bridge.call(hanging(cancelled), EndedContext())   # type: ignore[arg-type]
    assert time.monotonic() - started < 2
    assert on_loop(loop, lambda: len(bridge._waiting)) == 0


def test_a_stream_that_ended_before_it_reached_the_loop_stops_its_generator(
        loop: asyncio.AbstractEventLoop) -> None:
    closed = threading.Event()

    async def items() -> AsyncIterator[int]:
        try:
            while True:
                await asyncio.sleep(0.01)
                yield 1
        finally:
            closed.set()

    bridge = LoopBridge(loop)
    answers = bridge.stream(items(), EndedContext())   # type: ignore[arg-type]
    started = time.monotonic()
    with contextlib.suppress(CallEnded):
        for n, _ in enumerate(answers):
            assert n < 1000, "the stream of an ended call ran on"
    assert time.monotonic() - started < 5
    assert closed.wait(2)

def test_answered_call_schedules_no_cancel(loop: asyncio.AbstractEventLoop) -> None:
    """grpc runs a call's callbacks when it ends normally too: an answered call must cost nothing more."""
    bridge = LoopBridge(loop)
    context = Context()
    tasks: list[asyncio.Task[Any]] = []

    async def answer() -> bytes:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        return b"ok"

    assert bridge.call(answer, context) == b"ok"   # type: ignore[arg-type]
    context.end()
    on_loop(loop, lambda: None)   # anything the end scheduled on the loop has run by now
    assert tasks and not tasks[0].cancelled()
    assert on_loop(loop, lambda: len(bridge._waiting)) == 0


def test_close_releases_waiting_threads_and_refuses_new_calls(loop: asyncio.AbstractEventLoop) -> None:
    bridge = LoopBridge(loop)
    entered = threading.Event()
    outcome: list[BaseException] = []

    async def hangs() -> bytes:
        entered.set()
        await asyncio.sleep(60)
        return b""

    def wait() -> None:
        try:
            bridge.call(hangs, Context())   # type: ignore[arg-type]
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert entered.wait(2)
    bridge.close()
    waiter.join(2)
    assert not waiter.is_alive(), "a thread still waits on a closed bridge"
    assert isinstance(outcome[0], CallEnded)
    with pytest.raises(BackendUnavailable):
        bridge.call(hangs, Context())   # type: ignore[arg-type]


def test_calls_beyond_max_waiting_are_refused_at_once(loop: asyncio.AbstractEventLoop) -> None:
    """Two threads wait (a backend that hangs); a third call is refused UNAVAILABLE without waiting,
    and once the two are answered calls are taken again."""
    bridge = LoopBridge(loop, max_waiting=2)
    release = asyncio.Event()
    entered = threading.Semaphore(0)

    async def slow() -> bytes:
        entered.release()
        await release.wait()
        return b"late"

    results: list[bytes] = []
    waiting = [threading.Thread(target=lambda: results.append(bridge.call(slow, Context()))) for _ in range(2)]  # type: ignore[arg-type]
    for t in waiting:
        t.start()
    assert entered.acquire(timeout=5) and entered.acquire(timeout=5)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="already has 2 calls waiting"):
        bridge.call(slow, Context())   # type: ignore[arg-type]
    assert time.monotonic() - started < 0.5
    loop.call_soon_threadsafe(release.set)
    for t in waiting:
        t.join(5)
    assert results == [b"late", b"late"]

    async def quick() -> bytes:
        return b"ok"

    assert bridge.call(quick, Context()) == b"ok"   # type: ignore[arg-type]
