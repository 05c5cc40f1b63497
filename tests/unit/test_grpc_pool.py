"""The hybrid model's gRPC thread pool (server/grpc_pool.py): what grpc.server relies on of its
executor (each call run once, each done-callback run once whenever it is added, threads bounded),
and what the node's stop relies on (shutdown drops queued calls but still runs their callbacks)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from server.grpc_pool import CODEL_INTERVAL, GrpcThreadPool, QueueDelay, Seat, _await_message, shed_wait, step_aside


def _wait(event: threading.Event) -> None:
    assert event.wait(10), "timed out"


def test_runs_each_call_with_its_arguments_and_its_callback_once() -> None:
    pool = GrpcThreadPool(4, "t")
    seen: list[tuple[int, str]] = []
    called: list[object] = []
    finished = threading.Event()
    done = pool.submit(lambda a, *, b: seen.append((a, b)), 1, b="x")

    def callback(d: object) -> None:
        called.append(d)
        finished.set()

    done.add_done_callback(callback)
    _wait(finished)
    time.sleep(0.05)   # a second run of the callback, if there were one, has had its time
    assert seen == [(1, "x")]
    assert called == [done]
    late: list[object] = []
    done.add_done_callback(late.append)   # added after the call finished: runs at once, here
    assert late == [done]
    pool.shutdown()


def test_a_callback_added_while_the_call_runs_runs_once_when_it_ends() -> None:
    pool = GrpcThreadPool(2, "t")
    release = threading.Event()
    ran = threading.Event()
    counted: list[object] = []
    done = pool.submit(release.wait, 10)
    done.add_done_callback(lambda d: (counted.append(d), ran.set()))
    assert not ran.is_set()
    release.set()
    _wait(ran)
    pool.shutdown()
    assert len(counted) == 1


def test_every_callback_runs_exactly_once_under_contention() -> None:
    """Submitters on several threads racing the workers, as grpc's poll thread adds its callback
    right after submit: each of 20,000 calls counted once, none lost, none twice."""
    pool = GrpcThreadPool(8, "t")
    counts = [0] * 20_000
    lock = threading.Lock()
    all_done = threading.Event()
    total = [0]

    def count(i: int) -> None:
        with lock:
            counts[i] += 1
            total[0] += 1
            if total[0] == len(counts):
                all_done.set()

    def submitter(start: int) -> None:
        for i in range(start, len(counts), 4):
            pool.submit(lambda: None).add_done_callback(lambda _d, i=i: count(i))

    threads = [threading.Thread(target=submitter, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _wait(all_done)
    pool.shutdown()
    assert set(counts) == {1}


def test_threads_start_as_needed_and_never_past_the_bound() -> None:
    pool = GrpcThreadPool(3, "crs-test")
    for _ in range(50):   # one at a time: the one idle thread takes each
        finished = threading.Event()
        pool.submit(finished.set)
        _wait(finished)
        time.sleep(0.001)
    one = {t.name for t in threading.enumerate() if t.name.startswith("crs-test_")}
    assert len(one) == 1
    gate = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        gate.wait(10)

    for _ in range(6):   # more than the bound at once: three run, three wait their turn
        pool.submit(hold)
    for _ in range(3):
        assert started.acquire(timeout=10)
    assert not started.acquire(timeout=0.2)
    assert len({t.name for t in threading.enumerate() if t.name.startswith("crs-test_")}) == 3
    gate.set()
    for _ in range(3):
        assert started.acquire(timeout=10)
    pool.shutdown(wait=True)
    assert not [t for t in threading.enumerate() if t.name.startswith("crs-test_")]


def test_shutdown_drops_waiting_calls_runs_their_callbacks_and_refuses_new_ones() -> None:
    pool = GrpcThreadPool(1, "t")
    gate = threading.Event()
    running = threading.Event()
    ran: list[int] = []
    callbacks: list[int] = []
    first = pool.submit(lambda: (running.set(), gate.wait(10)))
    first.add_done_callback(lambda _d: callbacks.append(0))
    _wait(running)
    for i in range(1, 4):
        pool.submit(ran.append, i).add_done_callback(lambda _d, i=i: callbacks.append(i))
    pool.shutdown(wait=False, cancel_futures=True)
    assert sorted(callbacks) == [1, 2, 3]   # dropped, and counted as ended (grpc's active-call count)
    with pytest.raises(RuntimeError):
        pool.submit(ran.append, 9)
    gate.set()
    pool.shutdown(wait=True)
    assert ran == []                        # none of the dropped calls ran
    assert sorted(callbacks) == [0, 1, 2, 3]


def test_a_call_that_raises_is_logged_and_the_thread_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    pool = GrpcThreadPool(1, "t")
    ended = threading.Event()

    def boom() -> None:
        raise ValueError("grpc's own bug")

    with caplog.at_level(logging.ERROR, logger="server.grpc_pool"):
        pool.submit(boom).add_done_callback(lambda _d: ended.set())
        _wait(ended)
        after = threading.Event()
        pool.submit(after.set)
        _wait(after)
    pool.shutdown()
    assert any("raised out of grpc's own handling" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_saturated_pool_keeps_no_idle_tokens_for_the_calls_that_waited() -> None:
    """Each call that waited for a busy thread must not leave an idle token behind: under a day of
    saturation they would be millions (memory), and each one a lie about an idle thread."""
    pool = GrpcThreadPool(2, "t")
    gate = threading.Event()
    ended = threading.Semaphore(0)
    for _ in range(200):
        pool.submit(gate.wait, 10).add_done_callback(lambda _d: ended.release())
    gate.set()
    for _ in range(200):
        assert ended.acquire(timeout=10)
    assert pool._idle.qsize() <= 2   # private, but the tokens are the point of this test
    pool.shutdown()


def test_queue_delay_refuses_only_behind_a_queue_that_stays() -> None:
    """CoDel's test: a burst, where some calls got a thread at once, is never refused; once a whole
    interval's shortest wait was over the target, a call that waited over twice the target is, unless
    nothing waits behind it; an interval with a short wait ends it."""
    d = QueueDelay(0.005)
    t = 100.0
    assert not d.shed(0.0, t, behind=50)                   # the first interval opens
    assert not d.shed(0.500, t + 0.05, behind=50)          # a burst: the interval also had a wait of 0
    assert not d.shed(0.500, t + CODEL_INTERVAL, behind=50)   # judged on that interval: no standing queue
    for i in range(1, 5):                                  # every wait of this interval is long
        assert not d.shed(0.020, t + CODEL_INTERVAL + i * 0.01, behind=50)
    t2 = t + 2 * CODEL_INTERVAL
    assert d.shed(0.020, t2, behind=50)                    # standing: over twice the target, refused
    assert not d.shed(0.009, t2 + 0.01, behind=50)         # within twice the target: served
    assert not d.shed(0.500, t2 + 0.02, behind=0)          # nothing behind it: refusing frees nobody
    assert d.shed(0.500, t2 + 0.03, behind=1)
    # The 0.009 wait was this interval's shortest (over the target): still standing in the next one ...
    t3 = t2 + CODEL_INTERVAL
    assert d.shed(0.011, t3, behind=5)
    assert not d.shed(0.001, t3 + 0.01, behind=5)          # ... where the queue drained
    assert not d.shed(0.500, t3 + CODEL_INTERVAL, behind=5)   # so the interval after refuses nothing



def test_a_burst_after_an_idle_gap_is_not_judged_on_the_busy_interval_before_it() -> None:
    """The interval turns only when a call is taken: after an idle pool, the last busy interval (a
    standing queue, perhaps minutes ago) must not mark the next burst's calls for refusal."""
    d = QueueDelay(0.005)
    t = 100.0
    for i in range(10):                                    # a standing queue: every wait long
        d.shed(0.050, t + i * 0.02, behind=50)
    assert d.shed(0.050, t + CODEL_INTERVAL + 0.01, behind=50)   # judged standing, refused
    idle_until = t + 30.0                                  # 30 s without a call, then a burst
    refused = [d.shed(0.001 * i, idle_until + 0.001 * i, behind=20 - i) for i in range(20)]
    assert not any(refused)
    # A queue that stands again is refused again, from the interval after it.
    for i in range(10):
        d.shed(0.050, idle_until + CODEL_INTERVAL + i * 0.005, behind=50)
    assert d.shed(0.050, idle_until + 2 * CODEL_INTERVAL, behind=50)

def test_the_pool_marks_the_calls_that_waited_behind_a_standing_queue() -> None:
    """One thread, 40 calls queued at once, each holding the thread 20 ms unless marked. The queue
    stands for over two intervals, so calls are marked, each with its wait; the first interval's
    calls are not (a burst until an interval proves otherwise), nor is the last (nobody behind it).
    Off the pool, and on a thread after a marked call, shed_wait() is 0."""
    pool = GrpcThreadPool(1, "t", shed_target=0.002)
    seen: list[float] = []
    after: list[float] = []
    ended = threading.Semaphore(0)

    def call() -> None:
        waited = shed_wait()
        seen.append(waited)
        if not waited:
            time.sleep(0.02)

    for _ in range(40):
        pool.submit(call).add_done_callback(lambda _d: ended.release())
    for _ in range(40):
        assert ended.acquire(timeout=10)
    pool.submit(lambda: after.append(shed_wait())).add_done_callback(lambda _d: ended.release())
    assert ended.acquire(timeout=10)
    pool.shutdown()
    assert shed_wait() == 0.0 and after == [0.0]
    marked = [w for w in seen if w]
    assert not any(seen[:4]), seen
    assert len(marked) >= 10 and min(marked) > 0.004, seen
    assert seen[-1] == 0.0, seen


def test_a_pool_without_a_target_marks_nothing() -> None:
    pool = GrpcThreadPool(1, "t")
    seen: list[float] = []
    ended = threading.Semaphore(0)
    for _ in range(20):
        pool.submit(lambda: (seen.append(shed_wait()), time.sleep(0.02))).add_done_callback(
            lambda _d: ended.release())
    for _ in range(20):
        assert ended.acquire(timeout=10)
    pool.shutdown()
    assert seen == [0.0] * 20


def test_at_most_active_threads_take_calls_and_one_that_steps_aside_gives_up_its_place() -> None:
    """8 threads, 2 active, 4 calls that block. Two run; the others stay queued. When one steps aside
    (as a call about to wait on the event loop does) the third starts; when it finishes, its thread
    takes no further call until a turn is free again. Shutdown stops every thread, also one that
    waits for a turn."""
    pool = GrpcThreadPool(8, "t", active=2)
    started = threading.Semaphore(0)
    gates = [threading.Event() for _ in range(4)]
    aside = threading.Event()
    running: list[int] = []

    def call(i: int) -> None:
        shed_wait()     # as a handler does first: the call reached its handler
        running.append(i)
        started.release()
        if i == 0:
            _wait(aside)
            step_aside()
            step_aside()    # twice is once: a thread has at most one turn to give
        _wait(gates[i])

    for i in range(4):
        pool.submit(call, i)
    assert started.acquire(timeout=10) and started.acquire(timeout=10)
    assert not started.acquire(timeout=0.3), running
    assert sorted(running) == [0, 1]
    aside.set()
    assert started.acquire(timeout=10)
    assert running[2] == 2
    gates[0].set()                                  # 0 ends without a turn: 1 and 2 hold both
    assert not started.acquire(timeout=0.3), running
    gates[1].set()
    assert started.acquire(timeout=10)
    assert running == [*running[:2], 2, 3]
    gates[2].set()
    gates[3].set()
    stopper = threading.Thread(target=pool.shutdown)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive(), "shutdown hung on a thread waiting for a turn"
    assert not any(t.is_alive() for t in pool._started)


def test_step_aside_off_the_pool_does_nothing() -> None:
    step_aside()
    pool = GrpcThreadPool(2, "t")          # no turns: active 0
    done = threading.Event()
    pool.submit(lambda: (step_aside(), done.set()))
    _wait(done)
    pool.shutdown()
    with pytest.raises(ValueError, match="active"):
        GrpcThreadPool(2, "t", active=-1)


def test_calls_that_never_reach_their_handler_lose_their_turns_to_queued_calls() -> None:
    """grpc's sync server waits for a unary call's request message on the pool thread, before the
    handler. Two such calls hold both turns (they never call shed_wait, as a call whose message never
    comes never reaches its handler): within an interval or two the watch takes their turns, and the
    queued call runs. A call whose handler started keeps its turn however long it runs."""
    pool = GrpcThreadPool(8, "t", active=2)
    release = threading.Event()
    ran = threading.Event()
    entered = threading.Semaphore(0)

    def stuck() -> None:
        _wait(release)

    def working() -> None:
        shed_wait()
        entered.release()
        _wait(release)

    pool.submit(stuck)
    pool.submit(stuck)
    pool.submit(ran.set)
    started = time.monotonic()
    assert ran.wait(5), "a queued call waited behind calls that never reached their handler"
    assert time.monotonic() - started < 1.0
    assert pool.revoked >= 1   # one turn is enough for the queued call (the second may not be old enough yet)
    release.set()
    pool.shutdown()

    pool = GrpcThreadPool(8, "t", active=2)
    release.clear()
    ran.clear()
    pool.submit(working)
    pool.submit(working)
    assert entered.acquire(timeout=5) and entered.acquire(timeout=5)
    pool.submit(ran.set)
    assert not ran.wait(3 * CODEL_INTERVAL), "a call in its handler lost its turn"
    assert pool.revoked == 0
    release.set()
    assert ran.wait(5)
    pool.shutdown()


def test_unary_calls_whose_message_never_comes_do_not_stop_a_grpc_server_on_the_pool() -> None:
    """The same through grpc.server: as many calls as turns open a unary method and never send their
    message (headers only); a call sent after them is answered, not left queued until its deadline."""
    pool = GrpcThreadPool(16, "t", shed_target=0.005, active=4)
    server = grpc.server(pool)

    def echo(raw: bytes, context: grpc.ServicerContext) -> bytes:
        shed_wait()
        return raw

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.S", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    never = threading.Event()

    def headers_only() -> Iterator[bytes]:
        never.wait(30)
        yield b"late"

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        held = [channel.stream_unary("/t.S/Echo").future(headers_only(), timeout=30) for _ in range(4)]
        # Every turn held by them, and each an interval old or more: the watch then takes all four. (A
        # fixed 0.5 s assumed the calls had arrived by then, which a busy machine need not grant.)
        turns = pool.turns
        assert turns is not None
        _until(lambda: not turns.free(), "the calls never took every turn")
        time.sleep(2 * CODEL_INTERVAL)
        assert channel.unary_unary("/t.S/Echo")(b"hello", timeout=5) == b"hello"
        assert pool.revoked == 4
        never.set()
        for call in held:
            assert call.result(timeout=10) == b"late"
    finally:
        never.set()
        channel.close()
        server.stop(0).wait()
        pool.shutdown()


def test_the_wait_for_a_request_message_is_timed_and_whoever_claims_the_call_first_decides() -> None:
    """grpc's arguments for a unary request (`unary_request` at index 4, the call event at 1): while
    the thunk waits, the seat holds the call's handle; the thunk's return ends the wait. If the watch
    took the handle first (it closes the call), the thunk answers None, so grpc runs no handler even
    when the message came that instant. A streaming request starts its handler at once; an unknown
    shape is left alone (None)."""
    class Event:
        call = object()

    def unary_request() -> bytes:
        return b"message"

    args = (print, Event(), "state", "behavior", unary_request, None, None)
    seat = Seat(holding=True)
    seat.since = 5.0
    timed = _await_message(args, seat)
    assert timed is not None and timed[:4] == args[:4] and timed[5:] == args[5:]
    assert seat.claim == [Event.call] and seat.since == 5.0
    assert timed[4]() == b"message"
    assert seat.claim == [] and seat.since == 0.0

    seat.since = 6.0
    timed = _await_message(args, seat)
    assert timed is not None
    assert seat.claim.pop() is Event.call      # the watch, first
    assert timed[4]() is None                  # the handler never runs

    seat.since = 7.0
    streaming = (print, Event(), "state", "behavior", lambda: iter(()), None, None)
    assert _await_message(streaming, seat) == streaming
    assert seat.since == 0.0 and seat.claim == []
    assert _await_message((print, "no call", 1), seat) is None
    older = (Event(), "state", "behavior", unary_request, None, None)   # grpc without context.run
    timed = _await_message(older, seat)
    assert timed is not None and timed[:3] == older[:3] and timed[4:] == older[4:]
    assert seat.claim == [Event.call] and timed[3]() == b"message" and seat.claim == []
    assert _await_message((print, 1, 2, 3, 4), seat) is None


def _until(condition: Callable[[], bool], failed: str, within: float = 10.0) -> None:
    """Wait until `condition()`: the state a busy machine may take a while to reach."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, failed
        time.sleep(0.01)


def _headers_only(never: threading.Event) -> Iterator[bytes]:
    """A call's requests that do not come (headers only) until `never` is set."""
    never.wait(30)
    yield b"late"


@contextlib.contextmanager
def _message_server(pool: GrpcThreadPool) -> Iterator[tuple[grpc.Channel, threading.Event]]:
    """grpc.server on `pool`: Echo (unary, no shed_wait: no handler needs to tell the pool anything),
    Slow (unary, 0.8 s in its handler) and Count (client-streaming: how many messages came); a channel
    to it, and the event that lets _headers_only's calls send at last. All stopped after."""
    server = grpc.server(pool)

    def slow(raw: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(0.8)
        return raw

    def count(raws: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return str(sum(1 for _ in raws)).encode()

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda raw, context: raw),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Count": grpc.stream_unary_rpc_method_handler(count)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    never = threading.Event()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, never
    finally:
        never.set()
        channel.close()
        server.stop(0).wait()
        pool.shutdown()


def test_a_call_whose_message_does_not_come_in_message_wait_is_closed_and_others_are_not() -> None:
    """A unary call whose message has not come `message_wait` after a thread took it is closed
    UNAVAILABLE, not before, with a message saying why; its thread is free again. A call 0.8 s in its
    handler, and a client stream 0.8 s between its messages, are past the wait too and are not closed."""
    pool = GrpcThreadPool(8, "t", message_wait=0.3)

    def two_slowly() -> Iterator[bytes]:
        yield b"a"
        time.sleep(0.8)
        yield b"b"

    with _message_server(pool) as (channel, never):
        started = time.monotonic()
        held = channel.stream_unary("/t.S/Echo").future(_headers_only(never), timeout=30)
        slow = channel.unary_unary("/t.S/Slow").future(b"slow", timeout=10)
        counted = channel.stream_unary("/t.S/Count").future(two_slowly(), timeout=10)
        with pytest.raises(grpc.RpcError) as closed:
            held.result(timeout=10)
        took = time.monotonic() - started
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "sent no request message" in (closed.value.details() or "")
        assert 0.3 <= took < 3.0, took
        assert slow.result(timeout=10) == b"slow"
        assert counted.result(timeout=10) == b"2"
        assert pool.closed == 1
        assert channel.unary_unary("/t.S/Echo")(b"hello", timeout=5) == b"hello"
        assert not pool._unknown   # grpc's shape was known: if this fails, grpcio changed _server.py


def test_calls_without_their_message_that_hold_every_thread_are_closed_within_an_interval_or_two() -> None:
    """As many calls as threads, without their messages: a call queued behind them would wait the whole
    `message_wait` (30 s here). Calls wait for a thread, every thread is started and none waits for a
    turn, so the watch closes held calls an interval after they began (those past it when it looks),
    and the queued call runs; a call left holding its thread is answered when its message comes."""
    pool = GrpcThreadPool(2, "t", message_wait=30)
    with _message_server(pool) as (channel, never):
        held = [channel.stream_unary("/t.S/Echo").future(_headers_only(never), timeout=30) for _ in range(2)]
        # Both threads started and both calls taken (a fixed 0.05 s for it let the call below take a
        # thread first on a busy machine, and nothing was closed).
        _until(lambda: pool._full and pool.backlog() == 0, "the held calls never took both threads")
        started = time.monotonic()
        assert channel.unary_unary("/t.S/Echo")(b"hello", timeout=5) == b"hello"
        assert time.monotonic() - started < 2.0
        assert pool.closed >= 1
        never.set()
        codes = []
        for call in held:
            try:
                assert call.result(timeout=10) == b"late"
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert sorted(c.value[0] for c in codes) in ([0, 14], [14, 14])
        assert codes.count(grpc.StatusCode.UNAVAILABLE) == pool.closed


def test_grpc_runs_a_handler_on_its_own_pool_when_that_pool_is_a_grpc_thread_pool() -> None:
    """grpc.server runs a handler on the pool named by its `experimental_thread_pool` only if that is a
    ThreadPoolExecutor, and else, silently, on the server's own: the node's streams would then hold the
    unary calls' threads (test_open_streams_never_starve_unary_calls_of_threads)."""
    main, own = GrpcThreadPool(2, "main"), GrpcThreadPool(2, "own", message_wait=1.0)
    server = grpc.server(main)

    def where(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield threading.current_thread().name.encode()

    where.experimental_thread_pool = own   # type: ignore[attr-defined]
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.S", {"Where": grpc.unary_stream_rpc_method_handler(where)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert [n.decode() for n in channel.unary_stream("/t.S/Where")(b"", timeout=5)] == ["own_0"]
    finally:
        server.stop(0).wait()
        main.shutdown()
        own.shutdown()
