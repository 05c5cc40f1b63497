"""A bug while loading one key of a StreamResolve answers that key INTERNAL and the stream goes on, in
both serving models' stream code (server/lookup_stream.py for grpc.aio, server/lookup_threads.py for the
hybrid model). It ended the whole stream INTERNAL. A real Resolver; the handlers around it are fakes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from prometheus_client import CollectorRegistry

from server.cache.near import NearCache
from server.errors import CrsError
from server.lookup_stream import stream_resolve as aio_stream
from server.lookup_threads import stream_resolve as threads_stream
from server.metrics import Metrics
from server.proto import crs_pb2 as pb
from server.resolver import CachePolicy, Lookup, Resolver
from server.store.read_route import ReadRoute


async def _broken(_conn: object) -> bytes:
    raise KeyError("a column the query no longer returns")


async def _fine(_conn: object) -> bytes:
    return b"fine"


class FakeHandlers:
    """What the stream code asks of LookupHandlers: each key a miss with its own load."""

    stream_window = 8

    def __init__(self) -> None:
        self.resolver = Resolver(near=NearCache(max_entries=100, ttl=60), tier=None, policy=CachePolicy(),
                                 metrics=Metrics(CollectorRegistry()),
                                 route=ReadRoute.primary_only(object(), timeout=2.0, fill_window=60.0))

    def stream_key(self, key: pb.LookupKey, caller: Any) -> tuple[str, Lookup, int]:
        load = _broken if key.correlation_id == "bad" else _fine
        return key.correlation_id, Lookup(f"k:{key.correlation_id}", load, "card"), 1

    @staticmethod
    def result_of(cid: str, outcome: bytes | CrsError, field: int, key: pb.LookupKey) -> bytes:
        return f"{cid}={outcome.code.name if isinstance(outcome, CrsError) else outcome.decode()}".encode()


KEYS = [pb.LookupKey(correlation_id=c) for c in ("a", "bad", "b")]
WANTED = {b"a=fine", b"bad=INTERNAL", b"b=fine"}


async def test_grpc_aio_stream_answers_the_broken_key_internal_and_goes_on() -> None:
    async def keys() -> AsyncIterator[pb.LookupKey]:
        for key in KEYS:
            yield key

    assert {answer async for answer in aio_stream(FakeHandlers(), keys(), None)} == WANTED   # type: ignore[arg-type]


def test_hybrid_stream_answers_the_broken_key_internal_and_goes_on() -> None:
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        def submit(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop)

        answers: Iterator[bytes] = threads_stream(FakeHandlers(), iter(KEYS), None,  # type: ignore[arg-type]
                                                  submit=submit, on_end=lambda callback: None)
        assert set(answers) == WANTED
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
