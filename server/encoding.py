"""Hand-assembled protobuf framing for batch and stream answers.

Cached values are serialized `Resolution` / `CustomerProfile` messages. A `LookupResult` embeds one
as field 4 or 5, and a `BatchResolveResponse` is field 1 repeated: both are length-prefixed
concatenations, so an answer is built from cached bytes without parsing or re-serializing them.
tests/unit/test_encoding.py checks every shape against the protobuf library.
"""

from __future__ import annotations

from server.rpc import ANSWER_MAX_BYTES

RESOLUTION_FIELD = 4
CUSTOMER_FIELD = 5
BIN_RANGE_FIELD = 6     # LookupResult.bin_range: the issuer range of a PAN that is not ours
DECISION_FIELD = 7      # LookupResult.decision: the decision hint of a key that did not resolve

RESOURCE_EXHAUSTED = 8  # google.rpc.Code
OVER_BATCH_LIMIT = (f"this batch's answers are larger than the {ANSWER_MAX_BYTES // 2**20} MiB an answer may be;"
                    " ask for this key again in another batch")


_ONE_BYTE = tuple(bytes((n,)) for n in range(0x80))    # every varint below 128, ready-made
_TAG = {field: bytes(((field << 3) | 2,)) for field in range(1, 16)}   # length-delimited field tags


def varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _TAG[field] + varint(len(payload)) + payload


def lookup_result(correlation_id: str, code: int, message: str, payload: bytes | None,
                  payload_field: int = RESOLUTION_FIELD, bin_range: bytes | None = None,
                  decision: bytes | None = None) -> bytes:
    """A serialized crs.v1.LookupResult. proto3 omits default scalars, and so do we."""
    if not code and payload is not None and not message and bin_range is None and decision is None:
        # A resolved key, the one shape a batch of hits is made of: assembled in one join.
        if not correlation_id:
            return b"".join((_TAG[payload_field], varint(len(payload)), payload))
        cid = correlation_id.encode("utf-8")
        return b"".join((b"\x0a", varint(len(cid)), cid, _TAG[payload_field], varint(len(payload)), payload))
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


def batch_response(results: list[bytes], limit: int = ANSWER_MAX_BYTES) -> bytes:
    """A serialized crs.v1.BatchResolveResponse from serialized LookupResults, at most `limit` bytes
    (what a client accepts by default: server/rpc.py). Answers that are more together (customer
    profiles of a few MB each) went out whole, and the caller's library refused the batch with no word
    of why, every key of it unanswered; now each answer that does not fit, in request order, is
    answered RESOURCE_EXHAUSTED with its correlation id, to be asked for again in another batch."""
    framed = [b"\x0a" + varint(len(r)) + r for r in results]
    if sum(map(len, framed)) <= limit:
        return b"".join(framed)
    refusals = [b"\x0a" + varint(len(r)) + r for r in
                (lookup_result(_correlation_id(r), RESOURCE_EXHAUSTED, OVER_BATCH_LIMIT, None) for r in results)]
    size = sum(map(len, refusals))
    out = []
    for answer, refusal in zip(framed, refusals, strict=True):
        if size - len(refusal) + len(answer) <= limit:
            size += len(answer) - len(refusal)
            out.append(answer)
        else:
            out.append(refusal)
    return b"".join(out)


def _correlation_id(result: bytes) -> str:
    """The correlation id of a LookupResult built by lookup_result (field 1 comes first, when set)."""
    if not result or result[0] != 0x0A:
        return ""
    length, shift, i = 0, 0, 1
    while True:
        byte = result[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            break
        shift += 7
    return result[i:i + length].decode("utf-8")
