"""What a write becomes in the change feed (server/feed/events.py): pure, no servers."""

from __future__ import annotations

import datetime as dt

import pytest

from server.feed.events import change_event, feed_fields, progress_event, relationship_id
from server.proto import crs_pb2 as pb


@pytest.mark.parametrize(("event_type", "state", "expected"), [
    ("customer.created", pb.Customer(customer_id="cus_1", version=1), (pb.ENTITY_TYPE_CUSTOMER, pb.OPERATION_CREATE,
                                                                        "cus_1", 1)),
    ("customer.status_changed", pb.Customer(customer_id="cus_1", version=4),
     (pb.ENTITY_TYPE_CUSTOMER, pb.OPERATION_UPDATE, "cus_1", 4)),
    ("account.created", pb.Account(account_id="acc_1", version=1), (pb.ENTITY_TYPE_ACCOUNT, pb.OPERATION_CREATE,
                                                                     "acc_1", 1)),
    ("card.issued", pb.Card(token="tok_1", version=1), (pb.ENTITY_TYPE_CARD, pb.OPERATION_CREATE, "tok_1", 1)),
    ("card.linked", pb.Card(token="tok_1", version=3), (pb.ENTITY_TYPE_CARD, pb.OPERATION_UPDATE, "tok_1", 3)),
    ("relationship.linked", pb.RelationshipResponse(account_id="acc_1", customer_id="cus_2"),
     (pb.ENTITY_TYPE_RELATIONSHIP, pb.OPERATION_CREATE, "acc_1:cus_2", 0)),
    ("relationship.role_changed", pb.RelationshipResponse(account_id="acc_1", customer_id="cus_2"),
     (pb.ENTITY_TYPE_RELATIONSHIP, pb.OPERATION_UPDATE, "acc_1:cus_2", 0)),
    ("relationship.unlinked", pb.RelationshipResponse(account_id="acc_1", customer_id="cus_2"),
     (pb.ENTITY_TYPE_RELATIONSHIP, pb.OPERATION_DELETE, "acc_1:cus_2", 0)),
])
def test_feed_fields(event_type: str, state: object, expected: tuple[int, int, str, int]) -> None:
    f = feed_fields(event_type, state)  # type: ignore[arg-type]
    assert (f.entity_type, f.op, f.entity_id, f.version) == expected


def test_an_answer_with_no_feed_entity_is_refused() -> None:
    with pytest.raises(TypeError):
        feed_fields("x.y", pb.Resolution())


def test_change_event_carries_the_stored_state_in_its_payload() -> None:
    relationship = pb.RelationshipResponse(account_id="acc_1", customer_id="cus_2", role=pb.RELATIONSHIP_ROLE_JOINT)
    at = dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.UTC)
    event = change_event(sequence=7, committed_at=at, entity_type=pb.ENTITY_TYPE_RELATIONSHIP,
                         op=pb.OPERATION_CREATE, entity_id=relationship_id("acc_1", "cus_2"), version=0,
                         state=relationship.SerializeToString(), epoch="7/1")
    assert event.WhichOneof("payload") == "relationship" and event.epoch == "7/1"
    assert event.relationship == pb.Relationship(account_id="acc_1", customer_id="cus_2",
                                                 role=pb.RELATIONSHIP_ROLE_JOINT)
    assert event.committed_at.ToDatetime(dt.UTC) == at and event.sequence == 7


def test_progress_event_is_only_a_mark() -> None:
    event = progress_event(42, "7/2")
    assert event.WhichOneof("payload") == "progress" and event.progress.high_water_sequence == 42
    assert event.epoch == "7/2"
    assert not event.entity_id and event.entity_type == pb.ENTITY_TYPE_UNSPECIFIED
