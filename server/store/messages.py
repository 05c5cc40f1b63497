"""Rows -> the API's entity messages, masked as every answer (shared by the writers and the feed)."""

from __future__ import annotations

from typing import Any

from server.pan import mask_account_number
from server.proto import crs_pb2 as pb

Row = Any   # an asyncpg.Record or a mapping with the columns named below


def customer_msg(row: Row) -> pb.Customer:
    return pb.Customer(customer_id=row["customer_id"], display_name=row["display_name"],
                       segment=row["segment"], status=row["status"], kyc_status=row["kyc_status"],
                       version=row["version"], merged_into=row["merged_into"] or "")


def account_msg(row: Row) -> pb.Account:
    return pb.Account(account_id=row["account_id"], routing_number=row["routing_number"],
                      last4=row["account_last4"],
                      masked_account_number=mask_account_number(row["account_last4"], row["account_length"]),
                      type=row["account_type"], currency=row["currency"], status=row["status"],
                      version=row["version"])


def card_msg(row: Row) -> pb.Card:
    return pb.Card(token=row["token"], bin=row["bin"], last4=row["last4"],
                   masked_pan=row["bin"] + "*" * (row["pan_length"] - 10) + row["last4"],
                   status=row["status"], expiry=row["expiry"], account_id=row["account_id"] or "",
                   version=row["version"])


def relationship_msg(row: Row) -> pb.Relationship:
    return pb.Relationship(account_id=row["account_id"], customer_id=row["customer_id"], role=row["role"])


def review_status_word(status: int) -> str:
    """REVIEW_STATUS_ACCEPTED -> "accepted": a message's or a listing's word, not the enum's name."""
    return pb.ReviewStatus.Name(status).removeprefix("REVIEW_STATUS_").lower()
