"""The hybrid serving model (CRS_SERVING_MODEL=hybrid): the synchronous grpc.server answers
near-cache hits on its own threads; everything that needs I/O runs on the process's one asyncio loop.

Why (docs/decisions.md "Serving model: hybrid"): gRPC's own per-call cost dominates a near-cache hit,
and the sync server's is ~1.6x lower than grpc.aio's. So a lookup RPC runs its `*_now` half
(server/lookup.py: validate, fingerprint, near-cache, then one blocking Redis GET on this thread:
server/cache/thread_reads.py) inline on the gRPC thread; only when Redis cannot answer is its `Later` half
handed to the loop (`LoopBridge.call`), where PostgreSQL, single-flight and fills stay asyncio. The
thread waits for that one answer and nothing else.
Every other RPC (admin, identity, feed) is handed to the loop whole; server-streaming answers
(Watch, Snapshot) come back through a bounded hand-off, so a slow reader still slows its producer.
StreamResolve answers hits on a reader thread and sends misses to the loop (server/lookup_threads.py).

The gate (auth, scopes, rate limits), the error mapping and the metrics are the ones grpc.aio uses
(server/app.py), so a caller cannot tell the models apart. A call's deadline bounds the wait; a
cancelled or expired call cancels its coroutine on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import Any, NoReturn, TypeVar, cast

import grpc

from server import rpc
from server.errors import BackendUnavailable
from server.gate import Gate, failed_call, request_parser
from server.grpc_pool import shed_wait, step_aside
from server.lookup import Later, LookupHandlers, Partial
from server.lookup_threads import stream_resolve
from server.metrics import Metrics
from server.stream_stall import StallWatch, StreamSlots

T = TypeVar("T")
WAITING_SHARE = 0.75        # of the gRPC threads, how many may wait on the loop at once (LoopBridge.max_waiting)
STREAM_HANDOFF = 8          # server-streaming items the loop may run ahead of the gRPC thread sending them
REFUSAL_THREADS = 16        # threads of the streams' pool beyond its open streams: they tell one more it is refused
NO_DEADLINE = 86_400.0 * 365   # a call without a deadline reports a time_remaining of centuries


class CallEnded(Exception):
    """The caller cancelled, or the deadline passed, while the loop was working for the call."""


class DeadlinePassed(CallEnded):
    """The call's deadline passed while its thread waited for the loop."""


class LoopFull(BackendUnavailable):
    """`LoopBridge.max_waiting` calls already wait on the loop: this one is refused at once."""


class _Waiter:
    """One gRPC thread waiting for one coroutine on the loop: a lock the loop releases when the answer
    is in. Cheaper than run_coroutine_threadsafe's pair of chained futures and their Condition (a
    hop there and back measured 41 µs of CPU on one core; this one 25)."""

    __slots__ = ("done", "error", "settled", "task", "value")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.settled = False            # under LoopBridge._lock: the answer (or error) is in
        self.value: Any = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[Any] | None = None   # set on the loop


class LoopBridge:
    """Runs coroutines for gRPC threads on the node's event loop.

    `close()` (the node's stop, once the server has stopped) cancels every coroutine still pending
    and refuses new ones: a gRPC thread never waits on a loop that will not run its work again, so
    the process can exit (concurrent.futures joins its threads at exit).

    At most `max_waiting` threads wait at once; a call beyond that is refused at once, UNAVAILABLE
    (clients retry on another node). Each waiting call holds a gRPC thread until its answer or its
    deadline, so with a backend that hangs, waiting misses would otherwise take every thread and
    the near-cache hits queued behind them would time out too."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_waiting: int | None = None) -> None:
        self.loop = loop
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._waiting: set[_Waiter] = set()
        self._closed = False

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        if not asyncio.iscoroutine(coro):
            coro = _as_coroutine(coro)
        with self._lock:
            if self._closed:
                coro.close()
                raise BackendUnavailable("the node is shutting down")
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._pending)
            waiting = [w for w in self._waiting if not w.settled]
            for waiter in waiting:
                waiter.settled = True
                waiter.error = CallEnded()
            self._waiting.clear()
        for future in pending:
            future.cancel()
        for waiter in waiting:
            waiter.done.release()
            self._cancel_task(waiter)

    def waiting(self) -> int:
        """Calls whose thread waits for the loop now."""
        return len(self._waiting)

    def call(self, later: Callable[[], Awaitable[T]], context: grpc.ServicerContext) -> T:
        """Await `later()` on the loop; the calling thread waits at most until the call's deadline."""
        waiter = _Waiter()
        with self._lock:
            if self._closed:
                raise BackendUnavailable("the node is shutting down")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise LoopFull(f"this node already has {self.max_waiting} calls waiting for its cache and"
                                         " database; retry on another node")
            self._waiting.add(waiter)
        self.loop.call_soon_threadsafe(self._start, waiter, later)
        if not context.add_callback(partial(self._call_ended, waiter)):   # cancelled, deadline: stop its work
            self._call_ended(waiter)     # it ended already (grpc will not run the callback): end it now
        remaining = context.time_remaining()
        step_aside()     # while this thread waits, another takes calls (server/grpc_pool.py)
        if not waiter.done.acquire(timeout=max(remaining, 0.0) if remaining < NO_DEADLINE else -1):
            self._call_ended(waiter)
            raise DeadlinePassed()
        if waiter.error is not None:
            if isinstance(waiter.error, asyncio.CancelledError):
                raise CallEnded() from waiter.error
            raise waiter.error
        return cast("T", waiter.value)

    def _start(self, waiter: _Waiter, later: Callable[[], Awaitable[Any]]) -> None:   # on the loop
        if waiter.settled:       # ended (or the bridge closed) before the loop got to it
            return
        try:
            awaitable = later()
            coro = awaitable if asyncio.iscoroutine(awaitable) else _as_coroutine(awaitable)
            waiter.task = self.loop.create_task(coro)
        except BaseException as exc:   # later() itself failed: the thread gets it as the coroutine's error
            self._settle(waiter, None, exc)
            return
        waiter.task.add_done_callback(partial(self._finished, waiter))

    def _finished(self, waiter: _Waiter, task: asyncio.Task[Any]) -> None:   # on the loop
        if task.cancelled():
            self._settle(waiter, None, CallEnded())
        elif (exc := task.exception()) is not None:
            self._settle(waiter, None, exc)
        else:
            self._settle(waiter, task.result(), None)

    def _settle(self, waiter: _Waiter, value: Any, error: BaseException | None) -> None:
        with self._lock:
            self._waiting.discard(waiter)
            if waiter.settled:
                return
            waiter.settled = True
            waiter.value, waiter.error = value, error
        waiter.done.release()

    def _call_ended(self, waiter: _Waiter) -> None:
        """The call ended (any thread): cancel its coroutine unless its answer is already in. Runs on
        every call's termination, so the common case (answered) costs one attribute read."""
        if waiter.settled:
            return
        with self._lock:
            if waiter.settled:
                return
            waiter.settled = True
            waiter.error = CallEnded()
            self._waiting.discard(waiter)
        waiter.done.release()
        self._cancel_task(waiter)

    def _cancel_task(self, waiter: _Waiter) -> None:
        def cancel() -> None:
            if waiter.task is not None:
                waiter.task.cancel()
        with contextlib.suppress(RuntimeError):   # the loop is closed: nothing runs there any more
            self.loop.call_soon_threadsafe(cancel)

    def stream(self, items: AsyncIterator[T], context: grpc.ServicerContext) -> Iterator[T]:
        """Iterate an async generator running on the loop, at most STREAM_HANDOFF items ahead."""
        handoff: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        credits = asyncio.Semaphore(STREAM_HANDOFF)

        async def pump() -> None:
            try:
                async for item in items:
                    await credits.acquire()
                    handoff.put((True, item))
            except BaseException as exc:
                handoff.put((False, exc))
                raise
            finally:
                # The call's end cancels this task at credits.acquire(), outside the generator, which
                # would stay suspended at its yield holding what it holds (a Snapshot's transaction and
                # PostgreSQL connection, a Watch's feed subscription) for good: close it here, as grpc.aio
                # does by cancelling inside it.
                aclose = getattr(items, "aclose", None)
                if aclose is not None:
                    await aclose()
            handoff.put((False, None))

        def ended(future: concurrent.futures.Future[None]) -> None:
            if future.cancelled():   # perhaps before pump() ever ran: wake the reader all the same
                handoff.put((False, concurrent.futures.CancelledError()))
            else:
                future.exception()   # retrieved: pump() already handed it over

        future = self.submit(pump())
        future.add_done_callback(ended)
        if not context.add_callback(future.cancel):   # the call ended already
            future.cancel()
        try:
            while True:
                more, item = handoff.get()
                if not more:
                    if item is None:
                        return
                    if isinstance(item, asyncio.CancelledError | concurrent.futures.CancelledError):
                        raise CallEnded() from item
                    raise item
                yield item
                self.loop.call_soon_threadsafe(credits.release)
        finally:
            future.cancel()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _later(bridge: LoopBridge, later: Later, context: grpc.ServicerContext) -> bytes:
    """A call's I/O half on the loop. A batch the loop cannot take now answers its near-cache hits and
    refuses only its misses, each UNAVAILABLE, instead of throwing the hits' work away with the call."""
    try:
        return bridge.call(later, context)
    except LoopFull as exc:
        if isinstance(later, Partial):
            return later.refused(exc)
        raise


def _fail(context: grpc.ServicerContext, exc: Exception, name: str, metrics: Metrics, started: float) -> NoReturn:
    """server/aio_handlers.py's _fail for the sync server: the same status, message, details and metric."""
    if isinstance(exc, grpc.RpcError):   # grpc's request iterator: the call ended (cancel, deadline, client gone)
        exc = CallEnded()
    if isinstance(exc, CallEnded):   # the caller has, or is about to have, its status (as grpc.aio: no metric)
        # Past the deadline the status is DEADLINE_EXCEEDED, as gRPC's own: this thread's wait ends at
        # the deadline as the server sees it, which may come a moment before the client's, and the
        # client then got this status, not its own (CANCELLED "the call ended" for a deadline).
        if isinstance(exc, DeadlinePassed) or context.time_remaining() <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        context.abort(grpc.StatusCode.CANCELLED, "the call ended")
    code, message, trailer = failed_call(exc, name, metrics, started)
    if trailer:
        context.set_trailing_metadata(trailer)
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


class HybridHandlers:
    """Builds the sync server's method handlers around the node's (async) handler objects."""

    def __init__(self, *, bridge: LoopBridge, metrics: Metrics, gate: Gate,
                 stream_pool: concurrent.futures.Executor, slots: StreamSlots, stalls: StallWatch) -> None:
        self.bridge = bridge
        self.stalls = stalls   # ends a stream whose client stopped reading (server/stream_stall.py)
        self.metrics = metrics
        self.gate = gate
        # Streams hold their thread while open: they run on their own pool (grpc's per-handler
        # experimental_thread_pool), so however many are open, unary calls keep the server's threads.
        # The pool has REFUSAL_THREADS more threads than `slots.max_streams`, so a stream past the limit
        # gets a thread at once and is refused there; grpc would otherwise queue it, silently, until
        # an open stream ends (a Watch without a deadline: for ever).
        self.stream_pool = stream_pool
        self.stream_slot = slots.slot   # one of the process's open streams, within the caller's share

    def generic_handler(self, service: Any, target: object) -> grpc.GenericRpcHandler:
        inline = target.inline_paths() if isinstance(target, LookupHandlers) else {}
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for name, method in rpc.methods(service).items():
            if method.client_streaming:
                if not isinstance(target, LookupHandlers) or name != "StreamResolve":
                    raise NotImplementedError(f"hybrid serving has no client-streaming bridge for {method.path}")
                handlers[name] = self._stream_resolve(method, target)
            elif method.server_streaming:
                handlers[name] = self._server_streaming(method, getattr(target, name))
            else:
                handlers[name] = self._unary(method, getattr(target, name), inline.get(name))
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    def _unary(self, method: rpc.Method, fn: Callable[[Any, Any], Awaitable[bytes]],
               now: Callable[[Any, Any], bytes | Later] | None) -> grpc.RpcMethodHandler:
        name, parse, scopes = method.name, request_parser(method), self.gate.scopes_for(method)
        cost = self.gate.entry_cost(method)
        gate, metrics, bridge = self.gate, self.metrics, self.bridge

        def handler(raw: bytes, context: grpc.ServicerContext) -> bytes:
            started = time.perf_counter()
            try:
                if waited := shed_wait():
                    metrics.calls_shed.labels(name).inc()
                    raise BackendUnavailable(f"this node is over its capacity: the call waited {waited * 1000:.0f} ms"
                                             " for a thread behind a standing queue (CRS_SHED_QUEUE_MS); retry on"
                                             " another node")
                caller = gate.admit(context, scopes, name, cost)
                request = parse(raw)
                if now is not None:
                    answer = now(request, caller)
                    response = answer if isinstance(answer, bytes) else _later(bridge, answer, context)
                else:
                    response = bridge.call(lambda: fn(request, caller), context)
            except Exception as exc:
                _fail(context, exc, name, metrics, started)
            metrics.observe_rpc(name, "OK", time.perf_counter() - started)
            return response

        return grpc.unary_unary_rpc_method_handler(handler)

    def _server_streaming(self, method: rpc.Method, fn: Callable[[Any, Any], AsyncIterator[bytes]]
                          ) -> grpc.RpcMethodHandler:
        name, parse, scopes = method.name, request_parser(method), self.gate.scopes_for(method)
        cost = self.gate.entry_cost(method)
        gate, metrics, bridge, slot, stalls = self.gate, self.metrics, self.bridge, self.stream_slot, self.stalls

        def handler(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            started = time.perf_counter()
            try:
                caller = gate.admit(context, scopes, name, cost)
                with slot(caller):
                    yield from stalls.sync_stream(name, bridge.stream(fn(parse(raw), caller), context), context)
            except Exception as exc:
                _fail(context, exc, name, metrics, started)
            metrics.observe_rpc(name, "OK", time.perf_counter() - started)

        handler.experimental_thread_pool = self.stream_pool   # type: ignore[attr-defined]
        return grpc.unary_stream_rpc_method_handler(handler)

    def _stream_resolve(self, method: rpc.Method, lookup: LookupHandlers) -> grpc.RpcMethodHandler:
        name, parse, scopes = method.name, request_parser(method), self.gate.scopes_for(method)
        cost = self.gate.entry_cost(method)
        gate, metrics, bridge, slot, stalls = self.gate, self.metrics, self.bridge, self.stream_slot, self.stalls

        def handler(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            started = time.perf_counter()
            try:
                caller = gate.admit(context, scopes, name, cost)
                with slot(caller):
                    yield from stalls.sync_stream(name, stream_resolve(lookup, (parse(raw) for raw in raws), caller,
                                                  submit=bridge.submit, on_end=context.add_callback), context)
                if not context.is_active():   # its answers ended because the call did (cancel, deadline)
                    raise CallEnded()
            except Exception as exc:
                _fail(context, exc, name, metrics, started)
            metrics.observe_rpc(name, "OK", time.perf_counter() - started)

        handler.experimental_thread_pool = self.stream_pool   # type: ignore[attr-defined]
        return grpc.stream_stream_rpc_method_handler(handler)
