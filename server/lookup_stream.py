"""StreamResolve for grpc.aio: the same answers as the hybrid serving model's (server/lookup_threads.py),
from LookupHandlers.stream_key and its resolver, on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from server.caller import Caller
from server.encoding import RESOLUTION_FIELD
from server.errors import CrsError
from server.proto import crs_pb2 as pb
from server.resolver import Lookup, Resolver

STREAM_UNSENT = 512   # keys read ahead of the answers written: then flow control holds the client back


class StreamHandlers(Protocol):
    """What a stream asks of LookupHandlers (server/lookup.py, which imports this module)."""

    resolver: Resolver
    stream_window: int

    def stream_key(self, key: pb.LookupKey, caller: Caller) -> tuple[str, Lookup | bytes, int]: ...

    def result_of(self, correlation_id: str, outcome: bytes | CrsError, field: int, key: pb.LookupKey) -> bytes: ...


async def stream_resolve(handlers: StreamHandlers, requests: AsyncIterator[pb.LookupKey],
                         caller: Caller) -> AsyncIterator[bytes]:
    """Results in completion order (each carries its correlation id): a near-cache hit is answered
    at once, misses run concurrently (at most `stream_window` per stream), so one slow key never
    holds up the keys behind it and a client that waits for each answer before sending the next
    key still works. At most STREAM_UNSENT keys are read ahead of the answers written."""
    results: asyncio.Queue[bytes | None] = asyncio.Queue()
    window = asyncio.Semaphore(handlers.stream_window)
    unsent = asyncio.Semaphore(STREAM_UNSENT)   # released as each answer is written
    pending: set[asyncio.Task[None]] = set()

    async def resolve_one(cid: str, lookup: Lookup, field: int, key: pb.LookupKey) -> None:
        try:
            outcome: bytes | CrsError = await handlers.resolver.resolve(lookup)
        except CrsError as exc:
            outcome, field = exc, RESOLUTION_FIELD
        finally:
            window.release()
        results.put_nowait(handlers.result_of(cid, outcome, field, key))

    async def read_keys() -> None:
        async for key in requests:
            await unsent.acquire()
            cid, lookup, field = handlers.stream_key(key, caller)
            if isinstance(lookup, bytes):   # answered now (a near-cache hit or a bad key): no task
                results.put_nowait(lookup)
                continue
            await window.acquire()
            task = asyncio.create_task(resolve_one(cid, lookup, field, key))
            pending.add(task)
            task.add_done_callback(pending.discard)
        while pending:
            await asyncio.gather(*list(pending))
        results.put_nowait(None)

    def reader_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            results.put_nowait(None)   # wake the writer; `await reader` below re-raises

    reader = asyncio.create_task(read_keys())
    reader.add_done_callback(reader_done)
    try:
        while (item := await results.get()) is not None:
            yield item
            unsent.release()
        await reader   # re-raises what ended the reader early (e.g. a corrupt message)
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()
