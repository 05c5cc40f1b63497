"""Hand-assembled protobuf framing for batch and stream answers.

Cached values are serialized `Resolution` / `CustomerProfile` messages. A `LookupResult` embeds one
as field 4 or 5, and a `BatchResolveResponse` is field 1 repeated: both are length-prefixed
concatenations, so an answer is built from cached bytes without parsing or re-serializing them.
tests/unit/test_encoding.py checks every shape against the protobuf library.
"""

from __future__ import annotations

RESOLUTION_FIELD = 4
CUSTOMER_FIELD = 5
BIN_RANGE_FIELD = 6     # LookupResult.bin_range: the issuer range of a PAN that is not ours
DECISION_FIELD = 7      # LookupResult.decision: the decision hint of a key that did not resolve


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return bytes(((field << 3) | 2,)) + varint(len(payload)) + payload


def lookup_result(correlation_id: str, code: int, message: str, payload: bytes | None,
                  payload_field: int = RESOLUTION_FIELD, bin_range: bytes | None = None,
                  decision: bytes | None = None) -> bytes:
    """A serialized crs.v1.LookupResult. proto3 omits default scalars, and so do we."""
    parts = []
    if correlation_id:
        parts.append(_len_field(1, correlation_id.encode("utf-8")))
    if code:
        parts.append(b"\x10" + varint(code if code >= 0 else code + (1 << 64)))
    if message:
        parts.append(_len_field(3, message.encode("utf-8")))
    if payload is not None:
        parts.append(_len_field(payload_field, payload))
    if bin_range is not None:
        parts.append(_len_field(BIN_RANGE_FIELD, bin_range))
    if decision is not None:
        parts.append(_len_field(DECISION_FIELD, decision))
    return b"".join(parts)


def batch_response(results: list[bytes]) -> bytes:
    """A serialized crs.v1.BatchResolveResponse from serialized LookupResults."""
    return b"".join([b"\x0a" + varint(len(r)) + r for r in results])
