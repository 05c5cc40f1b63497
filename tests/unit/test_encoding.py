"""Hand-assembled LookupResult / BatchResolveResponse framing equals what protobuf produces."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.encoding import CUSTOMER_FIELD, batch_response, lookup_result, varint
from server.proto import crs_pb2 as pb


def _resolution(i: int) -> bytes:
    return pb.Resolution(card=pb.Card(token=f"tok_{i:024d}", last4="1234", status=pb.CARD_STATUS_ACTIVE),
                         in_good_standing=bool(i % 2)).SerializeToString()


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_matches_protobuf(n: int) -> None:
    msg = pb.Card(version=n)
    assert msg.SerializeToString() == (b"\x40" + varint(n) if n else b"")


@given(st.text(max_size=200), st.sampled_from([0, 3, 5, 14]), st.text(max_size=300), st.integers(0, 3))
def test_lookup_result_matches_protobuf(cid: str, code: int, message: str, which: int) -> None:
    payload = None if which == 0 else _resolution(which) if which < 3 else b""
    ours = lookup_result(cid, code, message, payload)
    expected = pb.LookupResult(correlation_id=cid, code=code, message=message)
    if payload is not None:
        expected.resolution.MergeFromString(payload)
        expected.resolution.SetInParent()
    assert pb.LookupResult.FromString(ours) == expected
    assert ours == expected.SerializeToString()


def test_customer_payload_and_batch() -> None:
    profile = pb.CustomerProfile(customer=pb.Customer(customer_id="cus_demo0000000001")).SerializeToString()
    items = [lookup_result("a", 0, "", _resolution(1)), lookup_result("b", 5, "card not found", None),
             lookup_result("", 0, "", profile, CUSTOMER_FIELD)]
    decoded = pb.BatchResolveResponse.FromString(batch_response(items))
    assert [r.correlation_id for r in decoded.results] == ["a", "b", ""]
    assert decoded.results[0].WhichOneof("result") == "resolution"
    assert decoded.results[1].code == 5 and decoded.results[1].message == "card not found"
    assert decoded.results[2].customer.customer.customer_id == "cus_demo0000000001"
    assert batch_response([]) == b""


def test_a_batch_larger_than_a_client_accepts_answers_the_keys_that_do_not_fit_one_by_one() -> None:
    """Three 1.5 MB profiles and a card: 4.5 MB whole, over the 4 MiB a gRPC client reads by default,
    which refused the whole batch with no word of why. The third profile is refused on its own
    (RESOURCE_EXHAUSTED, its correlation id kept), the card after it still answered."""
    cards = [pb.Card(token=f"tok_{i:024d}", masked_pan="999000******0000", account_id=f"acc_{i:020d}")
             for i in range(20_000)]
    profile = pb.CustomerProfile(customer=pb.Customer(customer_id="cus_demo0000000001"), cards=cards)
    big = profile.SerializeToString()
    assert 1_400_000 < len(big) < 1_600_000
    items = [lookup_result(f"p{i}", 0, "", big, CUSTOMER_FIELD) for i in range(3)]
    items.append(lookup_result("card" * 32, 0, "", _resolution(7)))
    answer = batch_response(items)
    assert len(answer) <= 4 * 1024 * 1024
    decoded = pb.BatchResolveResponse.FromString(answer)
    assert [r.correlation_id for r in decoded.results] == ["p0", "p1", "p2", "card" * 32]
    assert [r.code for r in decoded.results] == [0, 0, 8, 0]
    assert decoded.results[0].customer == profile and decoded.results[3].resolution.card.token
    assert "4 MiB" in decoded.results[2].message and not decoded.results[2].HasField("customer")
    assert batch_response(items[:2]) == b"".join(b"\x0a" + varint(len(r)) + r for r in items[:2])   # fits: as before
