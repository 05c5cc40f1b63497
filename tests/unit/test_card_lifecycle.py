"""Which card status may follow which (server/store/lifecycle.py): every pair of the enum."""

from __future__ import annotations

from server.proto import crs_pb2 as pb
from server.store.lifecycle import card_status_refused

ACTIVE, BLOCKED, LOST, STOLEN, CLOSED = (pb.CARD_STATUS_ACTIVE, pb.CARD_STATUS_BLOCKED, pb.CARD_STATUS_LOST,
                                         pb.CARD_STATUS_STOLEN, pb.CARD_STATUS_CLOSED)
ALLOWED = {
    ACTIVE: {ACTIVE, BLOCKED, LOST, STOLEN, CLOSED},
    BLOCKED: {ACTIVE, BLOCKED, LOST, STOLEN, CLOSED},
    LOST: {LOST, STOLEN, CLOSED},
    STOLEN: {STOLEN, CLOSED},
    CLOSED: {CLOSED},
}


def test_every_transition() -> None:
    for current, allowed in ALLOWED.items():
        for new in ALLOWED:
            why = card_status_refused(current, new)
            assert (why is None) == (new in allowed), (pb.CardStatus.Name(current), pb.CardStatus.Name(new), why)
            assert why is None or "issue a new card" in why or "closed card" in why
