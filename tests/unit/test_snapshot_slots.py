"""CRS_FEED_SNAPSHOT_MAX and its share (server/feed/service.py, SnapshotSlots): one client never holds
every Snapshot slot of a node; the last free one goes to a client that runs none. Two stalled
Snapshots of one extract job used to refuse every other client's (tenth audit, DoS 2)."""

from __future__ import annotations

import contextlib

import pytest

from server.caller import ANONYMOUS, Caller
from server.errors import FeedOverload
from server.feed.service import SnapshotSlots

A = Caller("extract-a", frozenset({"feed:read"}), "mtls")
B = Caller("extract-b", frozenset({"feed:read"}), "jwt")


def test_one_client_leaves_the_last_slot_to_the_others() -> None:
    slots = SnapshotSlots(3)
    with contextlib.ExitStack() as held:
        held.enter_context(slots.slot(A))
        held.enter_context(slots.slot(A))
        with pytest.raises(FeedOverload, match="'extract-a' already runs 2 of this node's 3 snapshots"):
            held.enter_context(slots.slot(A))
        held.enter_context(slots.slot(B))   # the last one
        with pytest.raises(FeedOverload, match="already runs 3 snapshots"):
            held.enter_context(slots.slot(Caller("extract-c", frozenset(), "mtls")))
    assert slots.running == 0 and not slots._held


def test_a_slot_given_back_is_free_again_for_its_client() -> None:
    slots = SnapshotSlots(2)
    with slots.slot(A):
        with pytest.raises(FeedOverload, match="kept for a client that runs none"):
            with slots.slot(A):
                pass
    with slots.slot(A), slots.slot(B):
        assert slots.running == 2
    with pytest.raises(RuntimeError), slots.slot(A):   # a Snapshot that fails gives its slot back
        raise RuntimeError("the read failed")
    assert slots.running == 0 and not slots._held


def test_a_single_slot_goes_to_whoever_asks_first() -> None:
    slots = SnapshotSlots(1)
    with slots.slot(A), pytest.raises(FeedOverload, match="CRS_FEED_SNAPSHOT_MAX"), slots.slot(B):
        pass


def test_anonymous_callers_are_bound_by_the_limit_only() -> None:
    """They are not told apart (dev stacks): a share of theirs would be one for every one of them."""
    slots = SnapshotSlots(2)
    with slots.slot(ANONYMOUS), slots.slot(ANONYMOUS):
        assert slots.running == 2
