"""The ceiling: a bare grpc.aio unary server on uvloop that answers every call with canned bytes
(with --sync: the synchronous grpc.server on a thread pool, the ceiling of the hybrid serving model;
--pool node puts it on the node's own pool, server/grpc_pool.py).

It registers the same method path as the node (/crs.v1.LookupService/ResolveCard) and answers with
the serialized Resolution the node returns for a demo card, so the load generator runs the very same
client code against it and the response has exactly the size of a real answer. It does nothing else:
no parsing, no validation, no HMAC, no cache, no metrics. Whatever the node costs above this is the
price of the service itself.

It also serves /crs.v1.LookupService/StreamResolve, the streams' ceiling: each key read is answered
with a LookupResult holding that Resolution and the key's correlation id, built once per distinct
request (the benchmark cycles through a few hundred keys) and then looked up by the request's bytes.
On the sync server one thread reads and answers each stream, grpc's plainest bidi handler.

    python -m loadtests.bench.echo_server --port 50099 --payload FILE [--sync [--threads 64] [--pool node]]

Prints ``READY <port>`` on stdout once it is serving; SIGTERM/SIGINT stop it, and so does its parent
process going away.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import uvloop

from server import rpc
from server.grpc_pool import GrpcThreadPool
from server.proto import crs_pb2 as pb
from server.settings import Settings

ECHO_METHOD = rpc.methods(rpc.LOOKUP_SERVICE)["ResolveCard"]
STREAM_METHOD = rpc.methods(rpc.LOOKUP_SERVICE)["StreamResolve"]


class StreamAnswers(dict[bytes, bytes]):
    """A LookupKey's bytes -> the LookupResult answering it (the canned Resolution, its correlation id)."""

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.resolution = pb.Resolution.FromString(payload)

    def __missing__(self, raw: bytes) -> bytes:
        cid = pb.LookupKey.FromString(raw).correlation_id
        answer = self[raw] = pb.LookupResult(correlation_id=cid, resolution=self.resolution).SerializeToString()
        return answer


def _handlers(unary: Callable[..., Any], stream: Callable[..., Any]) -> grpc.GenericRpcHandler:
    # Identity (de)serializers, as the node uses: bytes in, bytes out.
    return grpc.method_handlers_generic_handler(ECHO_METHOD.service, {
        ECHO_METHOD.name: grpc.unary_unary_rpc_method_handler(unary),
        STREAM_METHOD.name: grpc.stream_stream_rpc_method_handler(stream)})


async def serve(port: int, payload: bytes) -> None:
    answers = StreamAnswers(payload)

    async def resolve(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return payload

    async def stream(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for raw in raws:
            yield answers[raw]

    handler = _handlers(resolve, stream)
    # The node's server options (server/app.py), so both sides of the comparison are configured alike.
    server = grpc.aio.server(options=rpc.SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if not bound:
        raise SystemExit(f"echo server: cannot bind 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    parent = os.getppid()

    def check_parent() -> None:
        # The benchmark stops us; if it died without doing so, stop by ourselves.
        if os.getppid() != parent:
            stop.set()
        else:
            loop.call_later(0.5, check_parent)

    check_parent()
    print(f"READY {bound}", flush=True)
    await stop.wait()
    await server.stop(0)


def serve_sync(port: int, payload: bytes, threads: int, pool: str = "futures") -> None:
    """The same echo on the synchronous grpc.server, with the node's hybrid options (server/app.py).
    `pool`: "futures" (concurrent.futures.ThreadPoolExecutor, grpc's documented default: the
    benchmark's ceiling) or "node" (the node's own GrpcThreadPool, server/grpc_pool.py)."""
    answers = StreamAnswers(payload)

    def stream(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for raw in raws:
            yield answers[raw]

    handler = _handlers(lambda raw, ctx: payload, stream)
    executor = (GrpcThreadPool(threads, thread_name_prefix="echo") if pool == "node"
                else ThreadPoolExecutor(max_workers=threads))
    server = grpc.server(executor, options=rpc.SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if not bound:
        raise SystemExit(f"echo server: cannot bind 127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    parent = os.getppid()
    print(f"READY {bound}", flush=True)
    while not stop.wait(0.5):
        if os.getppid() != parent:   # the benchmark died without stopping us
            break
    server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.echo_server",
                                     description="Bare grpc.aio server answering canned bytes to ResolveCard "
                                                 "and StreamResolve (the benchmark's ceilings).")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--payload", type=Path, required=True,
                        help="file whose bytes are the answer to every call (a serialized Resolution)")
    parser.add_argument("--sync", action="store_true", help="serve on the synchronous grpc.server instead")
    parser.add_argument("--threads", type=int, default=Settings().serving_threads,
                        help="--sync: thread pool size (default: the node's CRS_SERVING_THREADS default,"
                             f" {Settings().serving_threads})")
    parser.add_argument("--pool", choices=("futures", "node"), default="futures",
                        help="--sync: the server's thread pool: futures (concurrent.futures, the default and"
                             " the ceiling) or node (the node's GrpcThreadPool)")
    args = parser.parse_args(argv)
    if args.sync:
        serve_sync(args.port, args.payload.read_bytes(), args.threads, args.pool)
    else:
        uvloop.run(serve(args.port, args.payload.read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
