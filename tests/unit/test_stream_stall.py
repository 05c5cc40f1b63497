"""Streams whose client stopped reading are ended (server/stream_stall.py): which ones the check picks,
and, on a bare grpc server of each kind, that the reader is told RESOURCE_EXHAUSTED with why and the
handler's generator is closed (what frees a node stream's slot, thread, transaction, subscription)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from server.stream_stall import StallWatch, _Stream

BIG = b"x" * 100_000     # a few fill the client's HTTP/2 window (no BDP probe: 64 KiB)
LIMIT = 0.5
WINDOW = [("grpc.http2.bdp_probe", 0)]


def test_only_a_send_waiting_past_its_limit_is_ended() -> None:
    watch = StallWatch(limit=10, limits={"Snapshot": 2})
    ended: list[str] = []

    def end(code: grpc.StatusCode, why: str) -> None:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        ended.append(why)

    streams = {name: _Stream(name, watch._limit(name), end) for name in ("Watch", "Snapshot", "idle")}
    for stream in streams.values():
        watch._open.add(stream)
    now = time.monotonic()
    streams["Watch"].sending_since = now - 5          # under its 10 s
    streams["Snapshot"].sending_since = now - 3       # past its own 2 s
    assert watch.check(now) == 1 and len(ended) == 1 and "CRS_FEED_SNAPSHOT_STALL" in ended[0]
    assert watch.check(now + 6) == 1 and "CRS_STREAM_STALL" in ended[1]   # Watch, now 11 s; once each
    assert watch.check(now + 3600) == 0                  # "idle" waits for messages, not on its reader
    with pytest.raises(ValueError, match="> 0"):
        StallWatch(limit=0)


def test_a_drain_ends_every_open_stream_of_a_method_with_its_own_status() -> None:
    watch = StallWatch(limit=10)
    ended: list[tuple[str, grpc.StatusCode, str]] = []
    streams = [_Stream(name, 10, lambda code, why, name=name: ended.append((name, code, why)))
               for name in ("StreamResolve", "StreamResolve", "Snapshot")]
    watch._open.update(streams)
    assert watch.end_all("StreamResolve", grpc.StatusCode.UNAVAILABLE, "shutting down") == 2
    assert ended == [("StreamResolve", grpc.StatusCode.UNAVAILABLE, "shutting down")] * 2
    assert watch.open_streams() == 1 and watch.end_all("StreamResolve", grpc.StatusCode.UNAVAILABLE, "") == 0


def _read_one_then_stall(port: int) -> tuple[grpc.RpcError, float]:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=WINDOW) as channel:
        call = channel.unary_stream("/t.S/M")(b"", timeout=30)
        responses = iter(call)
        next(responses)
        time.sleep(LIMIT * 4 + 1)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            for _ in responses:
                pass
        return info.value, time.monotonic() - started


# How long the reader, back, takes to read what was buffered and then the status. A reader that found no
# status would read on until its call's 30 s deadline (the handler's messages never end); 1 s was too
# tight for a reader thread not run for a while on a busy machine (1.2 s with two 0.6 s stalls).
DRAINED = 5.0


def _told(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "stopped reading" in (error.details() or "") and "CRS_STREAM_STALL" in (error.details() or "")


def test_a_stalled_reader_of_a_sync_server_stream_is_told_and_its_generator_closed() -> None:
    """Also holds grpc to the private call object the sync path cancels through (`context._rpc_event.call`:
    a status and a message; the public cancel() tells only CANCELLED, and this test would fail)."""
    watch = StallWatch(limit=LIMIT)
    closed = threading.Event()

    def handler(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        def messages() -> Iterator[bytes]:
            try:
                while True:
                    yield BIG
            finally:
                closed.set()
        yield from watch.sync_stream("M", messages(), context)

    server = grpc.server(ThreadPoolExecutor(4), options=WINDOW)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.S", {"M": grpc.unary_stream_rpc_method_handler(handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # The check runs every 0.05 s until the test ends, as the node's does (not for a fixed 100 rounds,
    # about 5 s: a set-up that slow on a busy machine left the stall unchecked and the stream unended).
    done = threading.Event()

    def check() -> None:
        while not done.is_set():
            watch.check()
            done.wait(0.05)

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    try:
        error, waited = _read_one_then_stall(port)
        _told(error)
        assert waited < DRAINED, "the status was not there when the reader came back"
        assert closed.wait(2) and watch.open_streams() == 0
    finally:
        done.set()
        checker.join(5)
        server.stop(0).wait()


def test_a_stalled_reader_of_an_aio_server_stream_is_told_and_its_generator_closed() -> None:
    async def scenario() -> None:
        watch = StallWatch(limit=LIMIT)
        closed = asyncio.Event()

        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async def messages() -> AsyncIterator[bytes]:
                try:
                    while True:
                        yield BIG
                finally:
                    closed.set()
            async for item in watch.aio_stream("M", messages(), context):
                yield item

        server = grpc.aio.server(options=WINDOW)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.S", {"M": grpc.unary_stream_rpc_method_handler(handler)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        checker = asyncio.create_task(watch.run())
        try:
            error, waited = await asyncio.get_running_loop().run_in_executor(None, _read_one_then_stall, port)
            _told(error)
            assert waited < DRAINED, "the status was not there when the reader came back"
            async with asyncio.timeout(2):
                await closed.wait()
            assert watch.open_streams() == 0
        finally:
            checker.cancel()
            await server.stop(0)

    asyncio.run(scenario())



def test_an_aio_stream_ended_for_a_stall_keeps_its_own_later_error_from_the_handler() -> None:
    """The reader comes back after the node ended its stream, the pending send completes, and the
    stream's generator fails (a Snapshot: PostgreSQL ended its idle transaction for the same stall)
    before the call's task is cancelled: that error reached the handler, which aborted the call a
    second time, and grpc logged "Abort already called!" as an ERROR (a suite run, aio model)."""
    async def scenario() -> None:
        watch = StallWatch(limit=LIMIT)
        aborts: list[grpc.StatusCode] = []
        sent = asyncio.Event()

        class Context:
            async def abort(self, code: grpc.StatusCode, why: str) -> None:
                aborts.append(code)
                await asyncio.sleep(0.05)   # sending the status takes loop turns
                raise RuntimeError("grpc's AbortError")

        async def messages() -> AsyncIterator[bytes]:
            yield b"one"
            raise RuntimeError("the snapshot's transaction was ended")

        async def call() -> None:
            async for _ in watch.aio_stream("Snapshot", messages(), Context()):   # type: ignore[arg-type]
                await sent.wait()   # the send is pending: the reader stopped

        task = asyncio.create_task(call())
        await asyncio.sleep(0.05)
        assert watch.check(time.monotonic() + 10 * LIMIT) == 1
        sent.set()   # the reader came back before the status went out
        with pytest.raises(asyncio.CancelledError):
            await task
        assert aborts == [grpc.StatusCode.RESOURCE_EXHAUSTED]

    asyncio.run(scenario())
