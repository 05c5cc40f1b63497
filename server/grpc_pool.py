"""The hybrid model's gRPC threads: a thread pool that does what grpc.server needs of one and no more.

grpc's sync server hands every call to its pool (`executor.submit`) and adds one done-callback to
what submit returns, to count the call as finished; it never waits on it or reads its result.
concurrent.futures.ThreadPoolExecutor does more for each call in Python: a Future with its
Condition (an RLock) taken three times, a pure-Python Semaphore taken on submit and released after
the work, a shutdown lock. Measured, a submit, its run and its callback on one core (16 in flight,
64 threads): 7.6-10.8 us of CPU with ThreadPoolExecutor, 2.9-4.2 us here
(`python -m loadtests.bench.thread_pool`; docs/decisions.md, "The gRPC threads' pool").

Same behaviour otherwise: threads start as the load needs them, up to `max_workers` (a thread is started when no idle
one is waiting; an idle thread leaves a token in a queue for submit to take), run each call in submission order, and
`shutdown` drops calls not yet started (their callbacks still run, as a cancelled Future's do). A call that raises is
logged: grpc catches its handlers' exceptions itself, so one reaching here is grpc's own bug.

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
otherwise hold every turn, and every thread: the watch also closes them, UNAVAILABLE, when late
(`message_wait`; docs/decisions.md "Calls that never send their message").
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

import grpc

from server.logs import LIMIT_KEY

log = logging.getLogger(__name__)

_Item = tuple["CallDone", Callable[..., Any], tuple[Any, ...], dict[str, Any], float]
CODEL_INTERVAL = 0.100   # seconds: the window whose shortest wait tells a standing queue from a burst
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


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
    """A pool thread's place: whether it holds a turn, since when (perf_counter) its call has run
    without reaching its handler (0.0: no such call), and `claim`: the call's grpc handle while the
    thread waits for its request message. `holding` changes under the Turns lock, the others on the
    thread itself; the pool's watch reads them (`Turns.revoke`, `GrpcThreadPool._close`)."""

    __slots__ = ("claim", "holding", "since")

    def __init__(self, holding: bool) -> None:
        self.holding = holding
        self.since = 0.0
        self.claim: list[Any] = []


def _await_message(args: tuple[Any, ...], seat: Seat) -> tuple[Any, ...] | None:
    """A call's arguments as grpc.server handed them, its wait for its request message timed on
    `seat`; None when not grpc's known shape (then only `shed_wait` ends `seat.since`). grpc 1.85
    submits `context.run, _unary_response_in_pool, rpc_event, state, behavior, argument_thunk, ...`
    (older ones, without `context.run`), and a unary request's thunk (`unary_request`) waits for
    the message, untimed. Until it returns `seat.claim` holds the call's handle; of this thread and
    the watch, whoever pops it first decides: the watch closes the call (its wait ends, and its
    handler never runs, even if the message came that instant). A streaming request has no wait."""
    at = 1 if len(args) > 4 and getattr(args[1], "call", None) is not None else 0
    if len(args) < at + 4 or getattr(args[at], "call", None) is None:
        return None
    thunk = args[at + 3]
    if getattr(thunk, "__name__", None) != "unary_request":
        seat.since = 0.0
        return args
    claim = seat.claim = [args[at].call]

    def request() -> Any:
        got = thunk()
        seat.since = 0.0
        try:
            claim.pop()
        except IndexError:
            return None    # the watch closed the call: grpc ends it without running the handler
        return got

    return (*args[:at + 3], request, *args[at + 4:])


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

    def waiting(self) -> int:
        """Threads waiting for a turn."""
        return len(self._waiting)

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
                log.exception("a gRPC call's done-callback failed", extra={LIMIT_KEY: ()})


class GrpcThreadPool(concurrent.futures.ThreadPoolExecutor):
    """Threads for grpc.server's calls (see the module's docstring). A ThreadPoolExecutor by type only
    (its __init__ is not run; none of its own methods is used): grpc takes a handler's own pool
    (`experimental_thread_pool`, the streams') only if it is one, and else runs it on the server's."""

    def __init__(self, max_workers: int, thread_name_prefix: str, shed_target: float = 0.0,
                 active: int = 0, message_wait: float = 0.0) -> None:
        """`shed_target`: seconds, QueueDelay's target (0: every call is served however long it waited).
        `active`: how many threads take calls at once (0, or `max_workers` or more: all of them).
        `message_wait`: seconds a call may wait on its thread for its request message before the
        watch closes it (and CODEL_INTERVAL while calls wait for a thread and every thread holds a
        call); 0: as long as its deadline lets it."""
        if max_workers < 1 or active < 0 or message_wait < 0:
            raise ValueError(f"max_workers must be at least 1, active (0: all) and message_wait (0: none) 0 or more"
                             f" (got {max_workers}, {active}, {message_wait})")
        self.message_wait = message_wait
        self.max_workers = max_workers
        self.delay = QueueDelay(shed_target) if shed_target > 0 else None
        self.turns = Turns(active) if 0 < active < max_workers else None
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._idle: queue.SimpleQueue[None] = queue.SimpleQueue()   # one token per thread waiting for work
        self._started: list[threading.Thread] = []
        self._seats: list[Seat] = []
        self._lock = threading.Lock()   # starting threads, shutting down
        self._shutdown = False
        self._stopped = threading.Event()   # wakes the watch at shutdown
        self.revoked = 0   # turns the watch took from calls that did not reach their handler
        self.closed = 0    # calls the watch closed: their request message did not come in time
        self._unknown = False   # warned once: grpc handed a call in a shape _await_message does not know
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
            if self._shutdown or len(self._started) >= self.max_workers:
                return     # a busy thread takes the call when it is free
            if not self._started and (self.turns is not None or self.message_wait):
                threading.Thread(target=self._watch, name=f"{self._prefix}_watch", daemon=True).start()
            seat = Seat(holding=self.turns is None)   # without turns every thread may take calls
            thread = threading.Thread(target=self._serve, args=(seat,), name=f"{self._prefix}_{len(self._started)}",
                                      daemon=True)
            thread.start()
            self._started.append(thread)
            self._seats.append(seat)
            self._full = len(self._started) >= self.max_workers

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
            now = seat.since = clock()   # until its message comes, or its handler starts (shed_wait): see _watch
            if delay is not None and delay.shed(now - queued, now, backlog()):
                mark.waited = now - queued
            if (timed := _await_message(args, seat)) is not None:
                args = timed
            elif self.message_wait and not self._unknown:
                self._unknown = True
                log.warning("grpc handed the pool a call in a shape it does not know (grpcio %s): calls whose"
                            " request message does not come are not closed before their deadline", grpc.__version__)
            try:
                fn(*args, **kwargs)
            except BaseException:
                log.exception("a gRPC call raised out of grpc's own handling", extra={LIMIT_KEY: ()})
            seat.since = mark.waited = 0.0
            done.finish()
            del item, done, fn, args, kwargs, timed   # nothing of the call outlives it while this thread waits
            if not self._full and seat.holding:
                idle(None)
        if turns is not None:
            turns.give(seat)     # shutting down: the threads still waiting for a turn take theirs and stop

    def _watch(self) -> None:
        """Every CODEL_INTERVAL, while calls queue: take the turns of calls that have run an interval
        without reaching their handler (grpc waits for a unary call's message on the pool's thread, so
        calls whose messages never come held every turn: outside audit, 2026-12-05). Such a call only
        loses its turn; the turn goes to a thread waiting for one, or to one started for it.
        And close calls whose message is `message_wait` late, or an interval late while calls wait for
        a thread and none will come (all started, none waiting for a turn): each holds its thread."""
        turns = self.turns
        while not self._stopped.wait(CODEL_INTERVAL):
            queued = self._work.qsize()
            if not queued and not self.message_wait:
                continue
            with self._lock:
                seats = list(self._seats)
            now = time.perf_counter()
            if queued and turns is not None and (taken := turns.revoke(seats, now - CODEL_INTERVAL)):
                self.revoked += taken
                log.warning("%d gRPC call(s) held a thread's turn for over %.0f ms without their request"
                            " message while calls queued: their turns went to other threads", taken,
                            CODEL_INTERVAL * 1000, extra={LIMIT_KEY: ()})   # crs_grpc_turns_revoked_total counts all
                for _ in range(turns.free()):
                    self._start_thread()   # no thread was waiting for a turn: one started takes it
            if self.message_wait:
                short = queued > 0 and self._full and (turns is None or not turns.waiting())
                self._close(seats, now - (CODEL_INTERVAL if short else self.message_wait), short)

    def _close(self, seats: list[Seat], started_before: float, short: bool) -> None:
        """Close, UNAVAILABLE, the calls that began waiting for their request message before
        `started_before` and wait still (`_await_message`: whoever pops the claim decides)."""
        closed = 0
        for seat in seats:
            claim, since = seat.claim, seat.since   # in this order: a newer call's start is never older
            if not (claim and 0.0 < since < started_before):
                continue
            try:
                call = claim.pop()
            except IndexError:
                continue          # its message came meanwhile
            waited = time.perf_counter() - since
            call.cancel(_UNAVAILABLE, f"the call sent no request message for {waited * 1000:.0f} ms after a server"
                        " thread took it; the node closed it (CRS_MESSAGE_WAIT_MS); retry")
            closed += 1
        if closed:
            self.closed += closed
            log.warning("%d gRPC call(s) sent no request message within %.0f ms of a thread taking them%s:"
                        " closed UNAVAILABLE", closed,
                        (CODEL_INTERVAL if short else self.message_wait) * 1000,
                        " while calls waited for a thread" if short else "", extra={LIMIT_KEY: (short,)})

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._started)
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
