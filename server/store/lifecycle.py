"""Which status a card may move to from the one it has.

A closed card is final. So are a lost and a stolen one: the PAN is hot-carded (ISO 8583 41 / 43, "pick
up") and the cardholder gets a new card with a new PAN; answering it ACTIVE again would hand whoever
holds the old plastic a working card. A lost card may yet be found to be stolen, and either may be
closed. A card the cardholder merely cannot find, or the issuer wants held, is BLOCKED: that one goes
back and forth."""

from __future__ import annotations

from server.proto import crs_pb2 as pb

FINAL: dict[int, tuple[tuple[int, ...], str]] = {
    pb.CARD_STATUS_CLOSED: ((pb.CARD_STATUS_CLOSED,), "card is closed; a closed card cannot change status"),
    pb.CARD_STATUS_LOST: ((pb.CARD_STATUS_LOST, pb.CARD_STATUS_STOLEN, pb.CARD_STATUS_CLOSED),
                          "card was reported lost; it may only be reported stolen or closed: issue a new card"),
    pb.CARD_STATUS_STOLEN: ((pb.CARD_STATUS_STOLEN, pb.CARD_STATUS_CLOSED),
                            "card was reported stolen; it may only be closed: issue a new card"),
}


def card_status_refused(current: int, new: int) -> str | None:
    """Why a card in status `current` may not be set to `new`, or None when it may."""
    allowed, why = FINAL.get(current, ((new,), ""))
    return None if new in allowed else why
