"""Feed epochs on the real stack (docs/feed.md, "a restored database"; migration 0014). A database
restored from a backup hands out the sequences after its restored head again, for other changes: a
consumer's checkpoint from the lost history must be refused (OUT_OF_RANGE), not resumed among them.

- The epoch goes out on every event, Progress mark and snapshot chunk, and a Watch with the current one
  resumes.
- A restore, simulated: the outbox cut back to a fork point, feed_seq set back to it, the epoch function
  replaced by one naming another history, the node's connections ended (a restore restarts the server).
  A checkpoint of the old epoch below the fork resumes; at or past it, or of an unknown epoch, is
  refused; one without an epoch resumes as before (the old behaviour, for consumers from before epochs).
- A real one: the synchronous standby promoted, its timeline (and so the epoch) new at once, recorded
  with the head it started from.
Servers of their own: they rewrite the outbox, kill the primary and promote the standby.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import pytest

from devstack.environment import DevEnvironment, NodeProcess
from server import rpc
from server.proto import crs_pb2 as pb
from tests.integration.support import expect_code, new_customer, on_database, own_env, sql, wait_metric

WAIT_S = 10.0
NODE = dict(workers=1, pg_timeout=2.0, feed_progress_interval=0.3, feed_poll_interval=0.2)
FAKE_EPOCH = "restored-in-test/2"
T = TypeVar("T")


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    env = own_env(shards=1, customers=0, tls=True, pg_replica=True)
    env.start()
    try:
        yield env
    finally:
        env.stop()


@pytest.fixture(scope="module")
def node(env: DevEnvironment) -> NodeProcess:
    return env.start_node(**NODE)


def feed(node: NodeProcess) -> rpc.Stub:
    return rpc.stub(node.channel("feed"), "ChangeFeedService")


def watch(node: NodeProcess, request: pb.WatchRequest, *, changes: int) -> list[pb.ChangeEvent]:
    """A Watch's events until it has delivered `changes` changes and then a Progress mark."""
    got: list[pb.ChangeEvent] = []
    call = feed(node).Watch(request, timeout=WAIT_S)
    try:
        for event in call:
            got.append(event)
            if event.WhichOneof("payload") == "progress" and len(_changes(got)) >= changes:
                return got
    finally:
        call.cancel()
    raise AssertionError(f"the Watch ended after {len(got)} events")


def _changes(events: list[pb.ChangeEvent]) -> list[pb.ChangeEvent]:
    return [e for e in events if e.WhichOneof("payload") != "progress"]


def snapshot_epochs(node: NodeProcess) -> set[str]:
    return {chunk.epoch for chunk in feed(node).Snapshot(pb.SnapshotRequest(), timeout=WAIT_S)}


def created_at(env: DevEnvironment, customer_id: str) -> int:
    """The feed sequence of a customer's creation."""
    return int(sql(env.admin_dsn, "SELECT seq FROM outbox WHERE feed_id = $1 AND event_type = 'customer.created'",
                   customer_id)[0]["seq"])


def newest(env: DevEnvironment) -> int:
    return int(sql(env.admin_dsn, "SELECT coalesce(max(seq), 0) AS seq FROM outbox")[0]["seq"])


def retrying(call: Callable[[], T], within: float = WAIT_S) -> T:
    """A call while the node reconnects to PostgreSQL (its pool may hold connections to the server that
    went away): UNAVAILABLE is retried."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_events_marks_and_snapshot_chunks_carry_the_databases_epoch(env: DevEnvironment, node: NodeProcess) -> None:
    admin = rpc.stub(node.channel("admin"), "AdminService")
    start = newest(env)
    made = [new_customer(admin, f"Epoch {i}").customer_id for i in range(2)]
    system_identifier, current = sql(env.admin_dsn, "SELECT to_hex(system_identifier), feed_current_epoch()"
                                     " FROM pg_control_system()")[0]
    assert current == f"{system_identifier}/1", current          # the cluster and its first timeline
    events = watch(node, pb.WatchRequest(from_sequence=start), changes=2)
    assert [e.entity_id for e in _changes(events)] == made
    assert {e.epoch for e in events} == {current}, [(e.sequence, e.epoch) for e in events]
    assert events[-1].WhichOneof("payload") == "progress"
    assert snapshot_epochs(node) == {current}
    assert [tuple(r) for r in sql(env.admin_dsn, "SELECT epoch, first_sequence FROM feed_epochs")] == [(current, 1)]


def test_a_watch_with_the_current_epoch_resumes(env: DevEnvironment, node: NodeProcess) -> None:
    admin = rpc.stub(node.channel("admin"), "AdminService")
    checkpoint = newest(env)
    epoch = snapshot_epochs(node).pop()
    made = new_customer(admin, "Resumed In Its Epoch").customer_id
    events = watch(node, pb.WatchRequest(from_sequence=checkpoint, epoch=epoch), changes=1)
    assert [(e.entity_id, e.epoch) for e in _changes(events)] == [(made, epoch)]


@dataclass
class Restored:
    """A database cut back to `fork` and taking writes again in epoch FAKE_EPOCH."""

    lost_epoch: str            # the epoch the lost history was written in
    fork: int                  # the restored head: sequences after it were handed out again
    lost: int                  # a consumer's checkpoint from the lost history, past the fork
    reissued: list[str]        # customers written after the restore, in sequence order
    undo: Callable[[], None]   # the real epoch function back, the simulated epoch's row gone


@pytest.fixture(scope="module")
def restored(env: DevEnvironment, node: NodeProcess) -> Iterator[Restored]:
    admin = rpc.stub(node.channel("admin"), "AdminService")
    lost_epoch = snapshot_epochs(node).pop()
    before = [new_customer(admin, f"Before The Restore {i}").customer_id for i in range(4)]
    fork, lost = created_at(env, before[0]), created_at(env, before[-1])
    definition = sql(env.admin_dsn, "SELECT pg_get_functiondef('feed_current_epoch'::regproc) AS d")[0]["d"]
    on_database(env.admin_dsn, lambda conn: conn.execute(
        f"DELETE FROM outbox WHERE seq > {fork};"
        f" SELECT setval('feed_seq', {fork});"
        f" CREATE OR REPLACE FUNCTION feed_current_epoch() RETURNS text LANGUAGE sql AS $$ SELECT '{FAKE_EPOCH}' $$;"
        f" SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{env.service_role}'"))
    wait_metric(node, "crs_feed_head_sequence", fork)          # the node's reader saw its head go back
    reissued = [retrying(lambda i=i: new_customer(admin, f"After The Restore {i}")).customer_id for i in range(5)]
    assert created_at(env, reissued[0]) == fork + 1 and created_at(env, reissued[-1]) > lost
    undone = []

    def undo() -> None:
        if not undone:
            undone.append(True)
            on_database(env.admin_dsn, lambda conn: conn.execute(
                f"{definition}; DELETE FROM feed_epochs WHERE epoch = '{FAKE_EPOCH}'"))

    try:
        yield Restored(lost_epoch, fork, lost, reissued, undo)
    finally:
        undo()


def test_a_restore_records_its_epoch_from_the_restored_head(env: DevEnvironment, restored: Restored) -> None:
    epochs = {r["epoch"]: r["first_sequence"] for r in sql(env.admin_dsn, "SELECT * FROM feed_epochs")}
    assert epochs == {restored.lost_epoch: 1, FAKE_EPOCH: restored.fork + 1}


def test_an_older_epoch_below_the_fork_resumes_in_the_new_one(node: NodeProcess, restored: Restored) -> None:
    events = watch(node, pb.WatchRequest(from_sequence=restored.fork, epoch=restored.lost_epoch),
                   changes=len(restored.reissued))
    assert [e.entity_id for e in _changes(events)] == restored.reissued
    assert _changes(events)[0].sequence == restored.fork + 1
    assert {e.epoch for e in events} == {FAKE_EPOCH}


@pytest.mark.parametrize("past_the_fork", [1, 3])
def test_an_older_epoch_at_or_past_the_fork_is_refused(node: NodeProcess, restored: Restored,
                                                       past_the_fork: int) -> None:
    """The consumer applied changes the database no longer has, and their sequences were handed out
    again (the new history is well past them): OUT_OF_RANGE, not a silent resume."""
    checkpoint = restored.fork + past_the_fork
    assert checkpoint <= restored.lost
    err = expect_code(lambda: watch(node, pb.WatchRequest(from_sequence=checkpoint, epoch=restored.lost_epoch),
                                    changes=1), grpc.StatusCode.OUT_OF_RANGE)
    details = err.details() or ""
    assert f"sequence {checkpoint} of the checkpoint's epoch is from a history this database no longer" \
           " has" in details, details
    assert f"sequences from {restored.fork + 1} on were handed out again" in details, details
    assert details.endswith("take a Snapshot and Watch from its sequence and epoch"), details


def test_an_unknown_epoch_is_refused(node: NodeProcess, restored: Restored) -> None:
    err = expect_code(lambda: watch(node, pb.WatchRequest(from_sequence=restored.fork, epoch="123/9"), changes=1),
                      grpc.StatusCode.OUT_OF_RANGE)
    details = err.details() or ""
    assert f"the checkpoint's epoch is not one of this database's histories (current: '{FAKE_EPOCH}')" in details
    assert "123/9" not in details


def test_a_malformed_epoch_is_refused_never_quoted(node: NodeProcess, restored: Restored) -> None:
    err = expect_code(lambda: watch(node, pb.WatchRequest(from_sequence=restored.fork, epoch="not an epoch"),
                                    changes=1), grpc.StatusCode.INVALID_ARGUMENT)
    assert "epoch is malformed" in (err.details() or "") and "not an epoch" not in (err.details() or "")


def test_no_epoch_is_the_old_behaviour(node: NodeProcess, restored: Restored) -> None:
    """A consumer from before epochs is not checked: its checkpoint from the lost history resumes among
    the reissued sequences, as before (docs/feed.md keeps the setval runbook step for it). What it
    receives names the epoch, so it can start sending it."""
    events = watch(node, pb.WatchRequest(from_sequence=restored.lost), changes=1)
    first = _changes(events)[0]
    assert first.sequence > restored.lost and first.entity_id in restored.reissued
    assert {e.epoch for e in events} == {FAKE_EPOCH}


def test_snapshot_chunks_name_the_new_epoch(node: NodeProcess, restored: Restored) -> None:
    assert snapshot_epochs(node) == {FAKE_EPOCH}


def test_a_promoted_standby_is_a_new_epoch_from_the_head_it_took_over(env: DevEnvironment, node: NodeProcess,
                                                                     restored: Restored) -> None:
    """Last: it kills the primary. The promoted standby writes on a new timeline at once (its control
    file names the old one until its first checkpoint), so the epoch is new from its first write, and
    a consumer caught up on the old primary resumes on it (nothing was lost: the standby is synchronous)."""
    assert env.stack is not None and env.stack.pg_replica is not None
    restored.undo()                                      # the real epoch again: the cluster's, timeline 1
    admin = rpc.stub(node.channel("admin"), "AdminService")
    new_customer(admin, "Before The Failover")
    old_epoch = snapshot_epochs(node).pop()
    assert old_epoch == restored.lost_epoch and old_epoch.endswith("/1")
    head = newest(env)
    env.stack.postgres.kill()
    env.stack.pg_replica.promote()
    after = retrying(lambda: new_customer(admin, "After The Failover"), within=30).customer_id
    new_epoch = old_epoch.removesuffix("/1") + "/2"
    database = env.database or "crs"
    epochs = env.stack.pg_replica.execute("SELECT string_agg(epoch || '@' || first_sequence, ',' ORDER BY epoch)"
                                          " FROM feed_epochs", database=database)
    assert epochs == [f"{old_epoch}@1,{new_epoch}@{head + 1}"], epochs
    assert retrying(lambda: snapshot_epochs(node)) == {new_epoch}
    events = retrying(lambda: watch(node, pb.WatchRequest(from_sequence=head, epoch=old_epoch), changes=1))
    assert [(e.entity_id, e.epoch) for e in _changes(events)] == [(after, new_epoch)]
    expect_code(lambda: watch(node, pb.WatchRequest(from_sequence=head + 1, epoch=old_epoch), changes=1),
                grpc.StatusCode.OUT_OF_RANGE)
