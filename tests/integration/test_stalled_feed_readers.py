"""Extract jobs that stop reading: a Snapshot or Watch whose client reads a little, then nothing, holds
the node's send for as long as it stays; when its call ends (cancelled, past its deadline, the
client gone) the node must let go of what the stream held, and Snapshots are bounded per node
(CRS_FEED_SNAPSHOT_MAX) so that stalled ones cannot take the connections lookups need. Both serving
models. (Found by an outside check: on hybrid an ended Snapshot kept its PostgreSQL connection and
transaction, an ended Watch its feed subscription, for good; the limit was documented, not enforced.)
A stream whose send waits CRS_STREAM_STALL (a Snapshot: CRS_FEED_SNAPSHOT_STALL) is ended by the node
itself (the last two tests; before, two stalled Snapshots refused every other client's for good).

The client's HTTP/2 window is kept small (no BDP probe), so a stalled reader stalls the node's writes
without a data set of many megabytes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from devstack.demo import demo_pan
from devstack.environment import DevEnvironment, NodeProcess, open_channel
from devstack.pki import write_dev_pki
from server import rpc
from server.proto import crs_pb2 as pb
from tests.integration.support import errors_logged, metric, own_env, running, sql, until

MODELS = ("aio", "hybrid")
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
FEED_EVENTS = 20_000   # ~5 MB of Watch catch-up


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    for env in running(own_env(shards=1, customers=3000)):      # a Snapshot of ~1 MB
        state = pb.Customer(customer_id="cus_stalled", display_name="x" * 200).SerializeToString()
        sql(env.admin_dsn, "INSERT INTO outbox (event_type, entity_type, entity_id, feed_type, feed_op, feed_id,"
            " feed_version, state, invalidated_at, settled_at) SELECT 'customer.updated', 'customer',"
            " 'cus_stalled', 1, 2, 'cus_stalled', g, $1, now(), now() FROM generate_series(1, $2) g",
            state, FEED_EVENTS)
        yield env


@pytest.fixture(scope="module")
def nodes(env: DevEnvironment) -> Iterator[dict[str, NodeProcess]]:
    started = {model: env.start_node(workers=1, serving_model=model, feed_snapshot_max=2) for model in MODELS}
    yield started
    for node in started.values():
        node.stop()


def _busy_connections(node: NodeProcess) -> float:
    return metric(node, "crs_pg_pool_connections") - metric(node, "crs_pg_pool_idle_connections")


def _stalled(channel: grpc.Channel, kind: str, timeout: float) -> grpc.Future:
    """A Snapshot or Watch that read its first message and then reads nothing."""
    feed = rpc.stub(channel, "ChangeFeedService")
    call = (feed.Snapshot(pb.SnapshotRequest(), timeout=timeout) if kind == "snapshot"
            else feed.Watch(pb.WatchRequest(from_sequence=1), timeout=timeout))
    next(iter(call))
    return call


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("ending", ["cancelled", "deadline"])
def test_an_ended_stalled_stream_lets_go_of_its_connection_and_subscription(
        nodes: dict[str, NodeProcess], model: str, ending: str) -> None:
    node = nodes[model]
    until("at rest", lambda: _busy_connections(node) == 0 and metric(node, "crs_feed_watchers") == 0, 10)
    log_from = node.log_path.stat().st_size
    timeout = 3.0 if ending == "deadline" else 30.0
    with grpc.insecure_channel(node.address, options=SMALL_WINDOW) as channel:
        calls = [_stalled(channel, kind, timeout) for kind in ("snapshot", "watch", "watch")]
        until("the stalled streams held open",
              lambda: _busy_connections(node) >= 1 and metric(node, "crs_feed_watchers") == 2, 5)
        if ending == "cancelled":
            for call in calls:
                call.cancel()
        until("the Snapshot's PostgreSQL connection given back", lambda: _busy_connections(node) == 0, timeout + 5)
        until("the Watches unsubscribed", lambda: metric(node, "crs_feed_watchers") == 0, 5)
    assert sql(node.settings.pg_dsn, "SELECT count(*) AS n FROM pg_stat_activity WHERE state = 'idle in transaction'"
               " AND usename = current_user AND pid <> pg_backend_pid()")[0]["n"] == 0
    # A client that went away is no error of the node's: nothing at ERROR (grpc.aio logged its failed
    # send as an ERROR with a traceback; server/logs.py says it in one INFO line).
    assert errors_logged(node, since=log_from) == []


def _admitted(channel: grpc.Channel, keep: Callable[[grpc.Future], object]) -> bool:
    """Whether the node admits a (stalled) Snapshot now: handed to `keep` if so; False when it is
    refused RESOURCE_EXHAUSTED."""
    try:
        keep(_stalled(channel, "snapshot", 30))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False
    return True


@pytest.mark.parametrize("model", MODELS)
def test_snapshots_past_the_limit_are_refused(nodes: dict[str, NodeProcess], model: str) -> None:
    """CRS_FEED_SNAPSHOT_MAX=2: two stalled Snapshots run, a third is refused RESOURCE_EXHAUSTED at once
    (the connections are for lookups), and once one ends another is admitted."""
    node = nodes[model]
    until("at rest", lambda: _busy_connections(node) == 0, 10)
    with grpc.insecure_channel(node.address, options=SMALL_WINDOW) as channel:
        held = [_stalled(channel, "snapshot", 30) for _ in range(2)]
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            _stalled(channel, "snapshot", 30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - started < 5
        assert "CRS_FEED_SNAPSHOT_MAX" in (info.value.details() or "")
        held.pop().cancel()
        until("the cancelled Snapshot's connection given back", lambda: _busy_connections(node) <= 1, 5)

        # The slot frees a loop turn or two after the connection shows idle (asyncpg releases it in a
        # shielded task; the handler's `finally` runs after), and the gauges flush every second.
        until("a Snapshot admitted again", lambda: _admitted(channel, held.append), 5)
        for call in held:
            call.cancel()


STALL = 1.5   # CRS_STREAM_STALL and CRS_FEED_SNAPSHOT_STALL of the nodes below


@pytest.fixture(scope="module")
def quick_nodes(env: DevEnvironment) -> Iterator[dict[str, NodeProcess]]:
    """Nodes that end a stream whose message waits STALL s unsent; 3 streams per client (hybrid)."""
    started = {model: env.start_node(workers=1, serving_model=model, feed_snapshot_max=2, stream_stall=STALL,
                                     feed_snapshot_stall=STALL, streams_per_client=3) for model in MODELS}
    yield started
    for node in started.values():
        node.stop()


def _told_it_stopped_reading(call: grpc.Future) -> None:
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    # A Snapshot has two ends of the same stall, both with the same limit here: the node's (the stream's
    # message unsent) and PostgreSQL's (the transaction idle), which the Snapshot reports when it resumes.
    # Whichever comes first, the client is told to start again (a CI run saw the second).
    details = info.value.details() or ""
    assert "stopped reading" in details or "left a chunk unread" in details, info.value


def _whole_snapshot(channel: grpc.Channel) -> int | None:
    """Customers in a Snapshot read to its end; None when the node refuses it (CRS_FEED_SNAPSHOT_MAX)."""
    try:
        chunks = list(rpc.stub(channel, "ChangeFeedService").Snapshot(
            pb.SnapshotRequest(entity_types=[pb.ENTITY_TYPE_CUSTOMER]), timeout=20))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "CRS_FEED_SNAPSHOT_MAX" not in (exc.details() or ""):
            raise
        return None
    return sum(len(chunk.customers) for chunk in chunks)


@pytest.mark.parametrize("model", MODELS)
def test_stalled_snapshots_are_ended_and_another_client_snapshots_again(
        quick_nodes: dict[str, NodeProcess], model: str) -> None:
    """Two stalled Snapshots held both of CRS_FEED_SNAPSHOT_MAX's slots for as long as their client stayed
    connected: every other client's Snapshot was refused RESOURCE_EXHAUSTED, for good. Now each is ended
    once a chunk waits CRS_FEED_SNAPSHOT_STALL unsent, and the slots are free again."""
    node = quick_nodes[model]
    until("at rest", lambda: _busy_connections(node) == 0, 10)
    log_from = node.log_path.stat().st_size

    def exhausted() -> float:
        return metric(node, "crs_rpc_latency_seconds_count", method="Snapshot", code="RESOURCE_EXHAUSTED")

    exhausted_before = exhausted()
    refused = 0

    def admitted(other: grpc.Channel) -> bool:
        nonlocal refused
        customers = _whole_snapshot(other)
        if customers is None:
            refused += 1
            return False
        assert customers >= 3000
        return True

    with grpc.insecure_channel(node.address, options=SMALL_WINDOW) as stalled, \
            grpc.insecure_channel(node.address) as other:
        held = [_stalled(stalled, "snapshot", 60) for _ in range(2)]
        started = time.monotonic()
        assert not admitted(other), "the stalled Snapshots do not hold the node's slots"
        until("another client's Snapshot admitted", lambda: admitted(other), STALL * 2 + 8)
        assert time.monotonic() - started < STALL * 2 + 8
        # One ended Snapshot frees the slot the other client took; the second may be ended a check later.
        # Read before the node ends it, it is no longer stalled and runs to its end (a flake, 1 run in ~20):
        # so wait until both let go of their PostgreSQL connections.
        until("both stalled Snapshots ended by the node", lambda: _busy_connections(node) == 0, STALL * 2 + 8)
        for call in held:
            _told_it_stopped_reading(call)
    # Each refusal and each ended Snapshot counted once.
    until("the ended Snapshots counted", lambda: exhausted() >= exhausted_before + refused + 2, 5)
    time.sleep(1.2)     # a metrics flush later: nothing counted twice
    assert exhausted() == exhausted_before + refused + 2
    assert errors_logged(node, since=log_from) == []


@pytest.mark.parametrize("model", MODELS)
def test_stalled_streams_are_ended_and_free_their_slots(quick_nodes: dict[str, NodeProcess], model: str) -> None:
    """Watches and a StreamResolve whose client reads nothing more: ended (RESOURCE_EXHAUSTED, it stopped
    reading) once a message waits CRS_STREAM_STALL unsent; their feed subscriptions and (hybrid) the
    client's stream slots are given back, so the same client opens a stream again."""
    node = quick_nodes[model]
    until("at rest", lambda: metric(node, "crs_feed_watchers") == 0, 10)
    log_from = node.log_path.stat().st_size

    def keys() -> Iterator[pb.LookupKey]:
        for i in range(20_000):       # ~6 MB of answers, never read
            yield pb.LookupKey(pan=demo_pan(1), correlation_id=str(i))

    with grpc.insecure_channel(node.address, options=SMALL_WINDOW) as channel:
        resolving = rpc.stub(channel, "LookupService").StreamResolve(keys(), timeout=60)
        next(iter(resolving))
        held = [_stalled(channel, "watch", 60) for _ in range(2)] + [resolving]
        until("the Watches subscribed", lambda: metric(node, "crs_feed_watchers") == 2, 5)
        if model == "hybrid":   # the client's 3 stream slots are all held
            with pytest.raises(grpc.RpcError) as info:
                _stalled(channel, "watch", 5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "holds 3 open streams" in str(
                info.value.details())
        until("the stalled Watches unsubscribed", lambda: metric(node, "crs_feed_watchers") == 0, STALL * 2 + 8)
        for call in held:
            _told_it_stopped_reading(call)
        again = _stalled(channel, "watch", 30)     # a slot of the client's is free again
        again.cancel()
    assert errors_logged(node, since=log_from) == []


@pytest.mark.parametrize("model", MODELS)
def test_one_client_leaves_a_snapshot_slot_to_the_others(env: DevEnvironment, model: str) -> None:
    """CRS_FEED_SNAPSHOT_MAX=2 and two extract jobs, each with its own certificate: the first job's
    second Snapshot is refused while its first stalls (the last slot is kept for a client that runs
    none), the other job's runs to its end, and the first job's is admitted again once its own ended.
    Before, one client holding both slots refused every other client's Snapshot for as long as it
    read (tenth audit, DoS 2)."""
    base = env.work_dir / f"snapshot-share-{model}"
    pki = write_dev_pki(base / "pki", ("admin", "extract-a", "extract-b"))   # start_node checks as admin
    clients_file = base / "clients.json"
    clients_file.write_text(json.dumps({"clients": {
        name: {"scopes": ["feed:read"], "cert_names": [name]} for name in ("extract-a", "extract-b")}}))
    node = env.start_node(workers=1, serving_model=model, feed_snapshot_max=2, tls_cert_file=str(pki.server_cert),
                          tls_key_file=str(pki.server_key), tls_client_ca_file=str(pki.ca_cert),
                          clients_file=str(clients_file), pki=pki)
    try:
        with open_channel(node.address, pki, "extract-a", SMALL_WINDOW) as a, \
                open_channel(node.address, pki, "extract-b") as b:
            held = _stalled(a, "snapshot", 60)
            with pytest.raises(grpc.RpcError) as refused:
                _stalled(a, "snapshot", 30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
            assert "'extract-a' already runs 1 of this node's 2 snapshots" in (refused.value.details() or "")
            assert (_whole_snapshot(b) or 0) >= 3000, "the other client's Snapshot runs while extract-a's stalls"
            held.cancel()

            # The slot frees a loop turn or two after the cancel reaches the node.
            until("extract-a's Snapshot admitted again", lambda: _admitted(a, lambda call: call.cancel()), 5)
    finally:
        node.stop()
        env.nodes.remove(node)


@pytest.mark.parametrize("model", MODELS)
def test_a_stalled_watch_does_not_keep_the_nodes_one_catch_up_turn(env: DevEnvironment, model: str) -> None:
    """CRS_FEED_CATCH_UP_READS=1: a Watch catching up holds the node's one turn across what it delivers;
    its consumer stops reading, and the next Watch in line takes the turn back once it was held a slice
    (server/feed/service.py, NodeTurns), catches up to its Progress mark and reads on. Without that,
    every other Watch from an old checkpoint would wait for the stalled one's CRS_STREAM_STALL."""
    node = env.start_node(workers=1, serving_model=model, feed_catch_up_reads=1)
    try:
        with grpc.insecure_channel(node.address, options=SMALL_WINDOW) as stalled_channel, \
                grpc.insecure_channel(node.address) as other:
            stalled = _stalled(stalled_channel, "watch", 60)
            started = time.monotonic()

            def catch_up() -> int:
                events = 0
                for event in rpc.stub(other, "ChangeFeedService").Watch(pb.WatchRequest(from_sequence=1),
                                                                         timeout=30):
                    if event.HasField("progress"):
                        return events
                    events += 1
                raise AssertionError("the Watch ended before its Progress mark")

            assert catch_up() >= FEED_EVENTS - 1 and time.monotonic() - started < 20   # all after seq 1
            # Held for a slice (1 s), the turn was taken back, not given up: the other Watch waited for it.
            # (A counter, not the waiting gauge, which shows the wait for about a second only.)
            until("the stalled Watch's turn counted as taken back",
                  lambda: metric(node, "crs_feed_catch_up_turns_taken_back_total") >= 1, 5)
            until("none waiting", lambda: metric(node, "crs_feed_watchers_waiting_turn") == 0, 5)
            stalled.cancel()
    finally:
        node.stop()
        env.nodes.remove(node)
