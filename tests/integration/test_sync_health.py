"""The hybrid model's health service (server/sync_health.py) on a real synchronous grpc.server:
the Health protocol's answers, Watch streams that hold no thread, and no deadlock when Watch calls
start and end while statuses change (grpcio-health-checking's servicer stops the whole server there)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.sync_health import NOT_SERVING, SERVICE_UNKNOWN, SERVING, SyncHealthServicer

Request = health_pb2.HealthCheckRequest


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[tuple[SyncHealthServicer, grpc.Channel]]:
    servicer = SyncHealthServicer(stall=getattr(request, "param", 0.0))
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, channel
    finally:
        channel.close()
        assert server.stop(0).wait(10), "the server stopped"
        servicer.close()


def _next(stream: Any) -> int:
    return int(next(stream).status)


def test_check_and_watch_follow_set_and_shutdown(served: tuple[SyncHealthServicer, grpc.Channel]) -> None:
    servicer, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(Request(), timeout=5).status == SERVING
    with pytest.raises(grpc.RpcError) as missing:
        stub.Check(Request(service="crs.v1.Nothing"), timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    unknown = stub.Watch(Request(service="crs.v1.Later"), timeout=10)
    assert _next(unknown) == SERVICE_UNKNOWN
    servicer.set("crs.v1.Later", SERVING)       # a service that appears is announced to its watchers
    assert _next(unknown) == SERVING
    watch = stub.Watch(Request(), timeout=10)
    assert _next(watch) == SERVING
    servicer.set("", NOT_SERVING)
    assert _next(watch) == NOT_SERVING
    servicer.set("", SERVING)
    assert _next(watch) == SERVING
    servicer.enter_graceful_shutdown()
    assert _next(watch) == NOT_SERVING and _next(unknown) == NOT_SERVING
    servicer.set("", SERVING)                   # ignored from now on
    assert stub.Check(Request(), timeout=5).status == NOT_SERVING
    unknown.cancel()
    watch.cancel()


def test_open_watches_hold_no_thread(served: tuple[SyncHealthServicer, grpc.Channel]) -> None:
    """40 open Watch streams on a server of 4 threads: Check is still answered, and each stream
    still hears a change."""
    servicer, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    watches = [stub.Watch(Request(), timeout=20) for _ in range(40)]
    assert all(_next(w) == SERVING for w in watches)
    assert stub.Check(Request(), timeout=5).status == SERVING
    servicer.set("", NOT_SERVING)
    assert all(_next(w) == NOT_SERVING for w in watches)
    for w in watches:
        w.cancel()
    deadline = time.monotonic() + 5   # each ended call is forgotten (its close callback ran)
    while servicer._watches and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not servicer._watches


def test_watches_starting_and_ending_while_statuses_change_never_stop_the_server(
        served: tuple[SyncHealthServicer, grpc.Channel]) -> None:
    """Clients that check health open a Watch per connection and end it with the connection. Eight
    clients do that in a loop for 3 s while a service flips every millisecond; afterwards the server
    still answers at once. (grpcio-health-checking's HealthServicer deadlocks here within a second:
    a Watch sends under its lock while the completion-queue thread waits for that lock.)"""
    servicer, channel = served
    stop = threading.Event()
    cycles = [0]
    errors: list[str] = []

    def client() -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            watch = stub.Watch(Request(service="crs.v1.Flipping"), timeout=5)
            try:
                next(watch)
            except grpc.RpcError as exc:
                errors.append(exc.code().name)
                return
            watch.cancel()
            cycles[0] += 1

    def flipper() -> None:
        flip = False
        while not stop.is_set():
            servicer.set("crs.v1.Flipping", SERVING if flip else NOT_SERVING)
            flip = not flip
            time.sleep(0.001)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    threads.append(threading.Thread(target=flipper, daemon=True))
    for t in threads:
        t.start()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a client is stuck: the server stopped answering"
    assert errors == []
    assert cycles[0] > 100
    assert health_pb2_grpc.HealthStub(channel).Check(Request(), timeout=2).status == SERVING


# The stall the servicer below allows: the thread standing for the loop beats every 0.1 s, and a busy
# machine may not run it for a while (with 0.6 s, one not run for 0.75 s made the loop look stuck).
STALL = 2.0


@pytest.mark.parametrize("served", [STALL], indirect=True)
def test_a_stuck_event_loop_answers_not_serving_until_it_beats_again(
        served: tuple[SyncHealthServicer, grpc.Channel]) -> None:
    """Health answers from threads, so a node process whose event loop is stuck (which answers no miss,
    admin call or stream) said SERVING: with no beat for `stall` seconds every service it knows answers
    NOT_SERVING, to Check and to open Watch streams, and SERVING again once the loop beats."""
    servicer, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    servicer.set("crs.v1.LookupService", SERVING)
    assert stub.Check(Request(), timeout=5).status == SERVING, "no beat yet: the loop is starting"
    running, done = threading.Event(), threading.Event()

    def loop() -> None:   # the node's loop beats each second; here every 0.1 s while `running`
        while not done.wait(0.1):
            if running.is_set():
                servicer.beat()

    beats = threading.Thread(target=loop, daemon=True)
    beats.start()
    try:
        running.set()
        watch = stub.Watch(Request(service="crs.v1.LookupService"), timeout=20)
        assert _next(watch) == SERVING
        time.sleep(STALL + 0.5)   # beating: more than the stall passes, all is well
        assert stub.Check(Request(), timeout=5).status == SERVING
        running.clear()   # the loop is stuck
        stuck = time.monotonic()
        assert _next(watch) == NOT_SERVING
        assert STALL - 0.1 <= time.monotonic() - stuck <= STALL + 2.5
        assert stub.Check(Request(), timeout=5).status == NOT_SERVING
        assert stub.Check(Request(service="crs.v1.LookupService"), timeout=5).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as missing:   # a service it does not know stays unknown
            stub.Check(Request(service="crs.v1.Nothing"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        running.set()
        assert _next(watch) == SERVING
        assert stub.Check(Request(), timeout=5).status == SERVING
        watch.cancel()
    finally:
        done.set()
        beats.join(5)
