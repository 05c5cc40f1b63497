"""Server streams whose client stopped reading are ended (CRS_STREAM_STALL; a Snapshot's own bound is
CRS_FEED_SNAPSHOT_STALL).

gRPC hands a stream's next message to the connection only when the client's HTTP/2 window has room
for it, so a client that stops reading stops the node's send, and the handler with it: a hybrid
stream's thread waits inside grpc, a grpc.aio stream's coroutine awaits grpc's send, outside the
handler's generator, which never resumes to see how long it waited. Nothing in gRPC ends such a call
but its deadline (a Watch has none) or the connection's age (0, never, by default), so it held its
stream slot and thread, a Snapshot its PostgreSQL connection, transaction and one of the process's
CRS_FEED_SNAPSHOT_MAX slots (two stalled extract jobs refused every other Snapshot, for good), a Watch
its feed subscription.

`StallWatch` notes when each open stream handed grpc a message and clears it when grpc asks for the
next (the send is done); `run()`, on the node's loop, ends every stream whose send has waited longer
than its limit. The call is cancelled with a status, so the reader, if it reads again, learns why:
RESOURCE_EXHAUSTED, as a Snapshot whose transaction PostgreSQL ended was already told: the stream
used up what the node lends a stream. Not UNAVAILABLE: the recommended client configuration retries
it (server/client_config.py), and a reader that stalls would be sent straight back; not
DEADLINE_EXCEEDED: it would blame a deadline the client never set. The call's end then frees what
the stream held, as a client's cancel does (its generator is closed, its `finally` blocks run).

How a call is ended from outside its handler: hybrid, grpc's sync context has only `cancel()`, a bare
CANCELLED (which the client configuration retries, too), so the call's core object is cancelled with
the status (grpc_call_cancel_with_status; tests/unit/test_stream_stall.py holds grpc to that shape);
grpc.aio, `context.abort()` from the checker's task: the status goes out at once, not behind the
unsent messages (measured, grpcio 1.85), but the handler's send stays pending until the client reads
or goes, so the call's task is cancelled after it (`_abort`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from functools import partial
from typing import Any

import grpc

from server.caller import Caller
from server.errors import BackendUnavailable, RateLimited
from server.metrics import Metrics

log = logging.getLogger(__name__)
CHECKS_PER_LIMIT = 4        # the checker looks this often within the shortest limit (at most once a second)
ABORT_WAIT = 1.0            # grpc.aio: seconds the status may take to go out before the call's task is cancelled


class _Stream:
    __slots__ = ("end", "limit", "method", "opened", "sending_since")

    def __init__(self, method: str, limit: float, end: Callable[[grpc.StatusCode, str], None]) -> None:
        self.method = method
        self.limit = limit
        self.end = end                    # cancels the call with the status given (any thread; the loop's)
        self.opened = time.monotonic()
        self.sending_since = 0.0          # when grpc took the message it is sending; 0: not sending


class StallWatch:
    """The node's open server streams and how long each one's send has waited.

    `limit` is every stream's bound, `limits` a method's own (Snapshot: CRS_FEED_SNAPSHOT_STALL). Each
    stream ended counts in `metrics` as an RPC answered RESOURCE_EXHAUSTED (crs_rpc_latency_seconds)."""

    def __init__(self, *, limit: float, limits: Mapping[str, float] | None = None,
                 metrics: Metrics | None = None) -> None:
        if limit <= 0 or any(v <= 0 for v in (limits or {}).values()):
            raise ValueError(f"stall limits must be > 0 seconds (got {limit}, {dict(limits or {})})")
        self.limit = limit
        self.limits = dict(limits or {})
        self.metrics = metrics
        self._open: set[_Stream] = set()
        self._lock = threading.Lock()     # hybrid streams open and close on gRPC threads
        self._aborts: set[asyncio.Task[None]] = set()

    def open_streams(self) -> int:
        return len(self._open)

    def _limit(self, method: str) -> float:
        return self.limits.get(method, self.limit)

    @contextlib.contextmanager
    def _tracked(self, stream: _Stream) -> Iterator[_Stream]:
        with self._lock:
            self._open.add(stream)
        try:
            yield stream
        finally:
            with self._lock:
                self._open.discard(stream)

    def sync_stream(self, method: str, items: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """A hybrid stream's messages, as grpc's sync server sends them (it resumes this generator once the
        message before is sent)."""
        with self._tracked(_Stream(method, self._limit(method), partial(_cancel, context))) as stream:
            for item in items:
                stream.sending_since = time.monotonic()
                yield item
                stream.sending_since = 0.0

    async def aio_stream(self, method: str, items: AsyncIterator[bytes],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """A grpc.aio stream's messages: the same, for the checker on this loop (grpc iterates this
        generator in the call's own task)."""
        call_task = asyncio.current_task()
        ended = False

        def end(code: grpc.StatusCode, why: str) -> None:
            nonlocal ended
            ended = True
            task = asyncio.get_running_loop().create_task(_abort(context, code, why, call_task))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)

        with self._tracked(_Stream(method, self._limit(method), end)) as stream:
            try:
                async for item in items:
                    stream.sending_since = time.monotonic()
                    yield item
                    stream.sending_since = 0.0
            except Exception:
                # Ended here, its status sent or on its way: the stream's own error since (a Snapshot's
                # transaction ended by PostgreSQL for the same stall) must not reach the handler, whose
                # abort would be the call's second: grpc logs that as an ERROR ("Abort already called!",
                # a suite run). The call is being cancelled anyway.
                if ended:
                    raise asyncio.CancelledError() from None
                raise

    def check(self, now: float | None = None) -> int:
        """End every stream whose send has waited past its limit; how many were ended."""
        now = time.monotonic() if now is None else now

        def why(stream: _Stream) -> str:
            return (f"the client stopped reading this stream: a message waited over {stream.limit:g} s to be sent"
                    f" ({'CRS_FEED_SNAPSHOT_STALL' if stream.method in self.limits else 'CRS_STREAM_STALL'});"
                    " the node ended it to free what it held; read the stream as it comes, then call again")

        stalled = self._end(lambda s: bool(s.sending_since) and now - s.sending_since > s.limit,
                            grpc.StatusCode.RESOURCE_EXHAUSTED, why, now)
        if stalled:
            log.warning("%d %s stream(s) ended: their client left a message unread past its limit", len(stalled),
                        "/".join(sorted({s.method for s in stalled})))
        return len(stalled)

    def end_all(self, method: str, code: grpc.StatusCode, why: str) -> int:
        """End every open `method` stream now, with `code` and `why`: a draining node's StreamResolves, which
        would otherwise hold the whole grace period and then be cut without a word. How many."""
        return len(self._end(lambda s: s.method == method, code, lambda s: why, time.monotonic()))

    def _end(self, picked: Callable[[_Stream], bool], code: grpc.StatusCode, why: Callable[[_Stream], str],
             now: float) -> list[_Stream]:
        """End the open streams `picked` chooses, each once (its generator is closed a moment later, on its
        own thread), and count each in the metrics under `code`."""
        with self._lock:
            streams = [s for s in self._open if picked(s)]
            self._open.difference_update(streams)
        for stream in streams:
            try:
                stream.end(code, why(stream))
            except Exception:   # the call ended meanwhile: nothing left to free
                log.debug("ending a %s stream failed", stream.method, exc_info=True)
                continue
            if self.metrics is not None:
                self.metrics.observe_rpc(stream.method, code.name, now - stream.opened)
        return streams

    async def run(self) -> None:
        """Check until cancelled (the node's background task)."""
        interval = min(1.0, min([self.limit, *self.limits.values()]) / CHECKS_PER_LIMIT)
        while True:
            await asyncio.sleep(interval)
            self.check()


def _cancel(context: grpc.ServicerContext, code: grpc.StatusCode, why: str) -> None:
    """Cancel a sync-server call with `code` and `why`, from any thread."""
    call: Any = getattr(getattr(context, "_rpc_event", None), "call", None)
    if call is None:    # another grpc's context: a bare CANCELLED still frees everything
        context.cancel()
        return
    call.cancel(code.value[0], why)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, why: str,
                 call_task: asyncio.Task[Any] | None) -> None:
    """Send the status, then cancel the call's task: grpc.aio leaves the handler's send pending after the
    status (until the client reads or goes), and the stream's generator with it; cancelled, the generator
    is closed (asyncio finalises it), and what it held is freed at once (measured: not before, otherwise)."""
    try:
        async with asyncio.timeout(ABORT_WAIT):
            await context.abort(code, why)
    except Exception:   # grpc's AbortError once sent; UsageError if the call ended first
        pass
    finally:
        if call_task is not None:
            call_task.cancel()


class StreamSlots:
    """A node process's open streams, and each client's share of them, in either serving model: one more
    stream past `max_streams` is refused BackendUnavailable (UNAVAILABLE: retry on another node), one
    past the caller's `share` RateLimited (RESOURCE_EXHAUSTED). One client's streams must not lock every
    other client out of the node, nor any number of them hold its memory (grpc.aio had no bound: an
    outside audit's 1,000 unread Watches took a node from 115 to 463 MB)."""

    def __init__(self, max_streams: int, share: Callable[[Caller], int]) -> None:
        self.max_streams = max_streams
        self.share = share                      # the open streams a caller may hold (its clients-file max_streams)
        self._slots = threading.BoundedSemaphore(max_streams)
        self._held: dict[str, int] = {}
        self._held_lock = threading.Lock()      # hybrid streams open and close on gRPC threads

    @contextlib.contextmanager
    def slot(self, caller: Caller) -> Iterator[None]:
        """One of the process's slots, and one of the caller's share, for as long as the stream is open."""
        if not self._slots.acquire(blocking=False):
            raise BackendUnavailable(f"this node process already serves its {self.max_streams} open streams"
                                     " (CRS_STREAM_THREADS); retry on another node")
        who = caller.client_id
        try:
            share = self.share(caller)
            with self._held_lock:
                held = self._held.get(who, 0)
                if held >= share:
                    raise RateLimited(f"client {who!r} already holds {held} open streams on this node process,"
                                      " its share (max_streams, CRS_STREAMS_PER_CLIENT)")
                self._held[who] = held + 1
            try:
                yield
            finally:
                with self._held_lock:
                    if self._held[who] > 1:
                        self._held[who] -= 1
                    else:
                        del self._held[who]
        finally:
            self._slots.release()

