"""What a write becomes in the feed, and how a stored feed row becomes a ChangeEvent. Pure: no I/O.

A write's answer is the entity after the change (Customer, Account, Card, or RelationshipResponse),
already masked and tokenised like every answer, so the feed stores those bytes as the event's state.
RelationshipResponse and Relationship share their wire format, so its bytes serve as a Relationship.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from google.protobuf.message import Message

from server.proto import crs_pb2 as pb

# Event names (outbox.event_type) that create or delete what they name; every other one updates.
_CREATES = frozenset({"customer.created", "account.created", "card.issued", "relationship.linked"})
_DELETES = frozenset({"relationship.unlinked"})

# The ChangeEvent payload field for each entity type.
PAYLOAD_FIELD: dict[int, str] = {
    pb.ENTITY_TYPE_CUSTOMER: "customer",
    pb.ENTITY_TYPE_ACCOUNT: "account",
    pb.ENTITY_TYPE_CARD: "card",
    pb.ENTITY_TYPE_RELATIONSHIP: "relationship",
    pb.ENTITY_TYPE_MERGE: "merge",
}
ENTITY_TYPES = frozenset(PAYLOAD_FIELD)


@dataclass(frozen=True)
class FeedFields:
    entity_type: int   # crs.v1.EntityType
    op: int            # crs.v1.Operation
    entity_id: str
    version: int


def feed_fields(event_type: str, state: Message) -> FeedFields:
    """The feed's view of a write, from its event name and the entity it answered with."""
    op = (pb.OPERATION_CREATE if event_type in _CREATES
          else pb.OPERATION_DELETE if event_type in _DELETES else pb.OPERATION_UPDATE)
    if isinstance(state, pb.Customer):
        return FeedFields(pb.ENTITY_TYPE_CUSTOMER, op, state.customer_id, state.version)
    if isinstance(state, pb.Account):
        return FeedFields(pb.ENTITY_TYPE_ACCOUNT, op, state.account_id, state.version)
    if isinstance(state, pb.Card):
        return FeedFields(pb.ENTITY_TYPE_CARD, op, state.token, state.version)
    if isinstance(state, (pb.RelationshipResponse, pb.Relationship)):
        return FeedFields(pb.ENTITY_TYPE_RELATIONSHIP, op, relationship_id(state.account_id, state.customer_id), 0)
    if isinstance(state, pb.Merge):
        return FeedFields(pb.ENTITY_TYPE_MERGE, op, state.loser_customer_id, 0)
    raise TypeError(f"no feed entity for {type(state).__name__}")


def relationship_id(account_id: str, customer_id: str) -> str:
    return f"{account_id}:{customer_id}"


def change_event(*, sequence: int, committed_at: datetime, entity_type: int, op: int, entity_id: str,
                 version: int, state: bytes | None, epoch: str = "") -> pb.ChangeEvent:
    event = pb.ChangeEvent(sequence=sequence, entity_type=entity_type, entity_id=entity_id,  # type: ignore[arg-type]
                           op=op, version=version, epoch=epoch)  # type: ignore[arg-type]
    event.committed_at.FromDatetime(committed_at)
    field = PAYLOAD_FIELD.get(entity_type)
    if field is not None and state is not None:
        getattr(event, field).MergeFromString(state)
    return event


def progress_event(high_water: int, epoch: str = "") -> pb.ChangeEvent:
    return pb.ChangeEvent(sequence=high_water, progress=pb.Progress(high_water_sequence=high_water), epoch=epoch)
