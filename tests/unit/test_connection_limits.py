"""What one client connection may make a node hold (server/rpc.py SERVER_OPTIONS), on a bare grpc.aio
server with the node's options: a stream whose handler stops reading holds at most ~one HTTP/2 window
of the client's messages (with BDP probing, the window grew with the traffic before: 5 MB a stream,
measured), and a connection has at most MAX_STREAMS_PER_CONNECTION calls open at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from server import rpc

KEY = b"k" * 1000
FAST = 20_000    # messages the handler takes at full speed before it stops reading


async def _serving(handlers: dict[str, grpc.RpcMethodHandler], body: Callable[[grpc.aio.Channel], Awaitable[None]]
                   ) -> None:
    server = grpc.aio.server(options=rpc.SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(channel)
    finally:
        await server.stop(0)


def test_a_stream_that_stops_reading_holds_about_one_window_of_what_its_client_sends() -> None:
    stop = asyncio.Event()

    async def handler(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        taken = 0
        async for _ in requests:
            taken += 1
            if taken == FAST:
                await stop.wait()
        return b""

    async def body(channel: grpc.aio.Channel) -> None:
        call = channel.stream_unary("/t.S/M")()
        written = 0
        try:
            while True:     # the client writes until flow control stops it (a write waits > 1 s)
                async with asyncio.timeout(1):
                    await call.write(KEY)
                written += 1
        except TimeoutError:
            pass
        finally:
            call.cancel()
            stop.set()
        held = (written - FAST) * len(KEY)
        assert held < 512 * 1024, f"{held / 2**20:.1f} MiB of one stream's requests buffered in the server"

    asyncio.run(_serving({"M": grpc.stream_unary_rpc_method_handler(handler)}, body))


def test_a_connection_has_at_most_its_limit_of_calls_open() -> None:
    """Calls past the limit are not served at once: grpc 1.85 refuses most of them (RST_STREAM
    REFUSED_STREAM: UNAVAILABLE, which the recommended client configuration retries), the client
    queues a few; none is served beside the `limit` open ones."""
    limit = rpc.MAX_STREAMS_PER_CONNECTION
    release = asyncio.Event()
    open_calls = 0

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal open_calls
        open_calls += 1
        await release.wait()
        return b""

    async def body(channel: grpc.aio.Channel) -> None:
        nonlocal open_calls
        method = channel.unary_unary("/t.S/M")
        release.set()
        await method(b"", timeout=5)   # connected: the client has the server's SETTINGS
        release.clear()
        open_calls = 0
        calls = [asyncio.ensure_future(method(b"", timeout=20)) for _ in range(limit + 10)]
        for _ in range(200):
            await asyncio.sleep(0.02)
            if open_calls >= limit:
                break
        await asyncio.sleep(0.3)      # the 10 past the limit would be in by now
        assert open_calls == limit
        release.set()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert all(o.code() == grpc.StatusCode.UNAVAILABLE for o in refused), refused[:1]
        assert open_calls + len(refused) == limit + 10

    asyncio.run(_serving({"M": grpc.unary_unary_rpc_method_handler(handler)}, body))


def test_the_largest_request_there_is_is_taken_and_one_past_the_bound_is_refused_before_any_handler() -> None:
    """gRPC reads a request whole before any handler (the gate included): the node took 16 MiB per call
    from anyone who could connect. The largest real request, a BatchResolve of 1,000 keys, each with a
    token and a 128-character correlation id, still fits under MAX_REQUEST_BYTES."""
    from server.proto import crs_pb2 as pb

    largest = pb.BatchResolveRequest(keys=[pb.LookupKey(card_token="tok_" + "a" * 36, correlation_id="c" * 128)
                                           for _ in range(1000)]).SerializeToString()
    assert len(largest) < rpc.MAX_REQUEST_BYTES / 4
    seen: list[int] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(len(request))
        return b""

    async def body(channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary("/t.S/M")
        await call(largest)
        try:
            await call(b"x" * (rpc.MAX_REQUEST_BYTES + 1))
            raise AssertionError("a request past MAX_REQUEST_BYTES was taken")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc

    asyncio.run(_serving({"M": grpc.unary_unary_rpc_method_handler(handler)}, body))
    assert seen == [len(largest)], "the handler saw the largest request only"
