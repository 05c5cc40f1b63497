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
`max_workers` would let them (docs/decisions.md "Threads that wait and threads that work"). A watch
takes the turn of a call that has run an interval without reaching its handler while calls queue:
grpc waits for a unary call's message on the pool's thread, so calls whose messages never come would
otherwise hold every turn (docs/decisions.md "Calls that never send their message").
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


class Seat:
    """A pool thread's place: whether it holds a turn, and since when (perf_counter) its call has run
    without reaching its handler (0.0: no such call). Both change under the Turns lock or on the
    thread itself; the pool's watch reads them (`Turns.revoke`)."""

    __slots__ = ("holding", "since")

    def __init__(self, holding: bool) -> None:
        self.holding = holding
        self.since = 0.0


class Turns:
    """`n` turns among the pool's threads. A thread keeps its turn from call to call; a thread that
    gives its turn away hands it to the thread that has waited longest for one, or leaves it free for
    the next to ask. Without a turn a thread waits on a lock of its own (no GIL, no spinning). A turn
    changes hands only under this lock, and a seat's `holding` with it."""

    __slots__ = ("_free", "_lock", "_mine", "_waiting")

    def __init__(self, n: int) -> None:
        self._free = n
        self._lock = threading.Lock()
        self._waiting: collections.deque[tuple[threading.Lock, Seat]] = collections.deque()
        self._mine = threading.local()

    def take(self, seat: Seat) -> None:
        with self._lock:
            if self._free > 0:
                self._free -= 1
                seat.holding = True
                return
            mine: threading.Lock | None = getattr(self._mine, "lock", None)
            if mine is None:
                mine = self._mine.lock = threading.Lock()
            mine.acquire()
            self._waiting.append((mine, seat))
        mine.acquire()       # _hand_over() releases it: the turn is this thread's
        mine.release()

    def give(self, seat: Seat) -> None:
        """`seat`'s turn to the next thread, if it still holds one (the watch may have taken it)."""
        with self._lock:
            if seat.holding:
                seat.holding = False
                self._hand_over()

    def revoke(self, seats: list[Seat], started_before: float) -> int:
        """Take the turns of seats whose call started before `started_before` and has not reached its
        handler (grpc's sync server waits for a unary call's message on the pool thread, before the
        handler: a call whose message never comes would hold its turn for good). Their calls go on
        without a turn, as a call that stepped aside does. Answers how many were taken."""
        taken = 0
        with self._lock:
            for seat in seats:
                if seat.holding and 0.0 < seat.since < started_before:
                    seat.holding = False
                    self._hand_over()
                    taken += 1
        return taken

    def free(self) -> int:
        """Turns no thread holds or waits for."""
        return self._free

    def _hand_over(self) -> None:   # under _lock
        if self._waiting:
            lock, seat = self._waiting.popleft()
            seat.holding = True
            lock.release()
        else:
            self._free += 1


def step_aside() -> None:
    """On a pool thread whose call is about to wait for something other than this thread (the event
    loop): give the thread's turn to another, which takes the next call. The call finishes without a
    turn (what is left is sending its answer); the thread takes one again before its next call.
    Off the pool, or on a pool without turns, it does nothing."""
    turns: Turns | None = getattr(_shed, "turns", None)
    if turns is not None and _shed.seat.holding:
        turns.give(_shed.seat)


def shed_wait() -> float:
    """On a pool thread: how long the running call waited for it, when the pool decided to refuse the
    call (0.0 when the call is to be served, or off the pool). A handler calls it first: it also tells
    the pool that the call reached its handler (its message came), so the watch leaves its turn be."""
    seat: Seat | None = getattr(_shed, "seat", None)
    if seat is not None:
        seat.since = 0.0
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
        self._seats: list[Seat] = []
        self._lock = threading.Lock()   # starting threads, shutting down
        self._shutdown = False
        self._stopped = threading.Event()   # wakes the watch at shutdown
        self.revoked = 0   # turns the watch took from calls that did not reach their handler
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
            if not self._threads and self.turns is not None:
                threading.Thread(target=self._watch, name=f"{self._prefix}_watch", daemon=True).start()
            seat = Seat(holding=self.turns is None)   # without turns every thread may take calls
            thread = threading.Thread(target=self._serve, args=(seat,), name=f"{self._prefix}_{len(self._threads)}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
            self._seats.append(seat)
            self._full = len(self._threads) >= self.max_workers

    def _serve(self, seat: Seat) -> None:
        take, idle, backlog = self._work.get, self._idle.put, self._work.qsize
        clock, delay = time.perf_counter, self.delay
        mark = _shed
        mark.waited = 0.0
        mark.seat = seat
        turns = mark.turns = self.turns
        while True:
            if turns is not None and not seat.holding:
                turns.take(seat)     # only a thread with a turn takes a call: the others' calls stay queued
            if (item := take()) is None:
                break
            done, fn, args, kwargs, queued = item
            now = seat.since = clock()   # until its handler starts (shed_wait): see _watch
            if delay is not None and delay.shed(now - queued, now, backlog()):
                mark.waited = now - queued
            try:
                fn(*args, **kwargs)
            except BaseException:
                log.exception("a gRPC call raised out of grpc's own handling")
            seat.since = mark.waited = 0.0
            done.finish()
            del item, done, fn, args, kwargs   # nothing of the call outlives it while this thread waits
            if not self._full and seat.holding:
                idle(None)
        if turns is not None:
            turns.give(seat)     # shutting down: the threads still waiting for a turn take theirs and stop

    def _watch(self) -> None:
        """Every CODEL_INTERVAL while calls queue: take the turns of calls that have run for an interval
        without reaching their handler. grpc's sync server waits for a unary call's request message on
        the pool's thread, before the handler, so a client that opens calls and never sends their
        messages would otherwise hold every turn and stop the node (outside audit, 2026-12-05); a call
        whose message is late only loses its turn, as a call that waits on the loop gives it. A turn
        taken goes to a thread waiting for one, or to a thread started for it."""
        assert self.turns is not None
        while not self._stopped.wait(CODEL_INTERVAL):
            if not self._work.qsize():
                continue
            with self._lock:
                seats = list(self._seats)
            taken = self.turns.revoke(seats, time.perf_counter() - CODEL_INTERVAL)
            if taken:
                self.revoked += taken
                log.warning("%d gRPC call(s) held a thread's turn for over %.0f ms without their request"
                            " message while calls queued: their turns went to other threads", taken,
                            CODEL_INTERVAL * 1000)
                for _ in range(self.turns.free()):
                    self._start_thread()   # no thread was waiting for a turn: one started takes it

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        self._stopped.set()
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
