"""The hybrid model's gRPC threads: a thread pool that does what grpc.server needs of one and no more.

grpc's sync server hands every call to its pool (`executor.submit`) and adds one done-callback to
what submit returns, to count the call as finished; it never waits on it or reads its result.
concurrent.futures.ThreadPoolExecutor does more for each call in Python: a Future with its
Condition (an RLock) taken three times, a pure-Python Semaphore taken on submit and released after
the work, a shutdown lock. Measured, a submit, its run and its callback on one core (16 in flight,
64 threads): 7.6-10.8 us of CPU with ThreadPoolExecutor, 2.9-4.2 us here
(`python -m loadtests.bench.thread_pool`; docs/decisions.md, "The gRPC threads' pool").

Same behaviour otherwise: threads start as the load needs them, up to `max_workers` (a thread is
started when no idle one is waiting; an idle thread leaves a token in a queue for submit to take),
run each call in submission order, and `shutdown` drops calls not yet started (their callbacks
still run, as a cancelled Future's do). A call that raises is logged: grpc catches its handlers'
exceptions itself, so one reaching here is grpc's own bug.

One thing more: the pool times how long each call waited for a thread, and under a standing queue
marks the thread's call as one to refuse (`QueueDelay`, `shed_wait`): the handler then answers
UNAVAILABLE before doing any work (server/hybrid.py). grpc's sync server hands a call to the pool
whatever the pool's backlog, so without this an overloaded node worked through calls whose callers had
given up, and every caller waited (docs/decisions.md "Shedding where the queue is").

And at most `active` threads take calls at once (`Turns`): only a thread holding one of `active`
turns takes a call from the queue, and a call about to wait on the event loop (a cache miss,
PostgreSQL, an admin call) gives its turn to another thread first (`step_aside`). So a node past
capacity keeps its backlog in this queue, where the rule above sees it, as a pool of `active`
threads would; and up to `max_workers` calls may still wait on the loop at once, as a pool of
`max_workers` would let them (docs/decisions.md "Threads that wait and threads that work").
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_Item = tuple["CallDone", Callable[..., Any], tuple[Any, ...], dict[str, Any], float]
CODEL_INTERVAL = 0.100   # seconds: the window whose shortest wait tells a standing queue from a burst


class QueueDelay:
    """CoDel's test for a standing queue (Nichols and Jacobson, "Controlling Queue Delay", ACM Queue
    2012), as Facebook's Thrift servers apply it to their request queues ("Fail at Scale", ACM Queue
    2015): if even the shortest wait for a thread in the last CODEL_INTERVAL was over `target`, the
    queue is not a burst draining but a backlog that stays, and until an interval shows otherwise a
    call that waited more than twice `target` is refused. A burst (some calls waiting, some not) is
    never refused, nor a call with nothing queued behind it: refusing it would free nobody.

    Called by every pool thread without a lock: the GIL makes each step atomic, and a race loses one
    sample of a minimum, which the next call's corrects."""

    __slots__ = ("_min", "_until", "overloaded", "slough", "target")

    def __init__(self, target: float) -> None:
        self.target = target
        self.slough = 2 * target
        self.overloaded = False
        self._min = 0.0      # the shortest wait in the interval so far; no interval yet: no queue
        self._until = 0.0

    def shed(self, waited: float, now: float, behind: int) -> bool:
        """Whether to refuse a call that waited `waited` seconds, with `behind` calls queued after it."""
        if now >= self._until:
            # A whole interval without a call taken: the pool was idle, so whatever the last busy
            # interval was, the queue is gone; a burst after an idle gap starts unjudged.
            self.overloaded = self._min > self.target and now < self._until + CODEL_INTERVAL
            self._min = waited
            self._until = now + CODEL_INTERVAL
        elif waited < self._min:
            self._min = waited
        return self.overloaded and waited > self.slough and behind > 0


_shed = threading.local()


class Turns:
    """`n` turns among the pool's threads. A thread keeps its turn from call to call; a thread that
    gives its turn away hands it to the thread that has waited longest for one, or leaves it free for
    the next to ask. Without a turn a thread waits on a lock of its own (no GIL, no spinning)."""

    __slots__ = ("_free", "_lock", "_mine", "_waiting")

    def __init__(self, n: int) -> None:
        self._free = n
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Lock] = collections.deque()
        self._mine = threading.local()

    def take(self) -> None:
        with self._lock:
            if self._free > 0:
                self._free -= 1
                return
            mine: threading.Lock | None = getattr(self._mine, "lock", None)
            if mine is None:
                mine = self._mine.lock = threading.Lock()
            mine.acquire()
            self._waiting.append(mine)
        mine.acquire()       # give() releases it: the turn is this thread's
        mine.release()

    def give(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._free += 1


def step_aside() -> None:
    """On a pool thread whose call is about to wait for something other than this thread (the event
    loop): give the thread's turn to another, which takes the next call. The call finishes without a
    turn (what is left is sending its answer); the thread takes one again before its next call.
    Off the pool, or on a pool without turns, it does nothing."""
    turns: Turns | None = getattr(_shed, "turns", None)
    if turns is not None and _shed.holding:
        _shed.holding = False
        turns.give()


def shed_wait() -> float:
    """On a pool thread: how long the running call waited for it, when the pool decided to refuse the
    call (0.0 when the call is to be served, or off the pool)."""
    return getattr(_shed, "waited", 0.0)


class CallDone:
    """What submit returns: add_done_callback, nothing else (all grpc.server uses).

    Without a lock: a callback is appended, then `done` is read; the worker sets `done`, then runs
    what is there. Whichever of the two comes second pops the callback, and list.pop hands each one
    to exactly one thread."""

    __slots__ = ("_callbacks", "done")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[CallDone], object]] = []
        self.done = False

    def add_done_callback(self, fn: Callable[[CallDone], object]) -> None:
        self._callbacks.append(fn)
        if self.done:
            self._run_callbacks()

    def finish(self) -> None:
        self.done = True
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        callbacks = self._callbacks
        while True:
            try:
                fn = callbacks.pop()
            except IndexError:
                return
            try:
                fn(self)
            except Exception:
                log.exception("a gRPC call's done-callback failed")


class GrpcThreadPool(concurrent.futures.Executor):
    """Threads for grpc.server's calls (see the module's docstring)."""

    def __init__(self, max_workers: int, thread_name_prefix: str, shed_target: float = 0.0,
                 active: int = 0) -> None:
        """`shed_target`: seconds, QueueDelay's target (0: every call is served however long it waited).
        `active`: how many threads take calls at once (0, or `max_workers` or more: all of them)."""
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if active < 0:
            raise ValueError("active must be 0 (all) or more")
        self.max_workers = max_workers
        self.delay = QueueDelay(shed_target) if shed_target > 0 else None
        self.turns = Turns(active) if 0 < active < max_workers else None
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._idle: queue.SimpleQueue[None] = queue.SimpleQueue()   # one token per thread waiting for work
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()   # starting threads, shutting down
        self._shutdown = False
        # Once every thread is started the idle tokens have no use, and none are kept: under
        # saturation each call that waited for a thread would otherwise leave one more behind.
        self._full = False

    def backlog(self) -> int:
        """Calls submitted and not yet taken by a thread."""
        return self._work.qsize()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> CallDone:  # type: ignore[override]
        if self._shutdown:
            raise RuntimeError("cannot schedule new calls after shutdown")
        done = CallDone()
        self._work.put((done, fn, args, kwargs, time.perf_counter()))
        if not self._full:
            try:
                self._idle.get_nowait()      # an idle thread will take it
            except queue.Empty:
                self._start_thread()
        return done

    def _start_thread(self) -> None:
        with self._lock:
            if self._shutdown or len(self._threads) >= self.max_workers:
                return     # a busy thread takes the call when it is free
            thread = threading.Thread(target=self._serve, name=f"{self._prefix}_{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)
            self._full = len(self._threads) >= self.max_workers

    def _serve(self) -> None:
        take, idle, backlog = self._work.get, self._idle.put, self._work.qsize
        clock, delay = time.perf_counter, self.delay
        mark = _shed
        mark.waited = 0.0
        turns = mark.turns = self.turns
        mark.holding = turns is None     # without turns every thread may take calls
        while True:
            if turns is not None and not mark.holding:
                turns.take()     # only a thread with a turn takes a call: the others' calls stay queued
                mark.holding = True
            if (item := take()) is None:
                break
            done, fn, args, kwargs, queued = item
            if delay is not None:
                now = clock()
                if delay.shed(now - queued, now, backlog()):
                    mark.waited = now - queued
            try:
                fn(*args, **kwargs)
            except BaseException:
                log.exception("a gRPC call raised out of grpc's own handling")
            mark.waited = 0.0
            done.finish()
            del item, done, fn, args, kwargs   # nothing of the call outlives it while this thread waits
            if not self._full and mark.holding:
                idle(None)
        if turns is not None:
            turns.give()         # shutting down: the threads still waiting for a turn take theirs and stop

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].finish()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()
