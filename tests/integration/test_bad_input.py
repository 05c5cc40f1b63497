"""Hundreds of malformed keys: each answered INVALID_ARGUMENT, none echoed, the node still healthy."""

from __future__ import annotations

import random

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.demo import demo_pan, demo_routing
from server.proto import crs_pb2 as pb
from tests.integration.support import Clients


def malformed_pans(rng: random.Random) -> list[str]:
    valid = demo_pan(11)
    out: list[str] = ["", " ", "\x00", "0", valid[:11], valid + "0" * 4, "x" * 1000, "9" * 1000,
                      valid.replace(valid[3], "\x00", 1), " " + valid, valid + " ", valid + "\n",
                      "\t" + valid, valid[:8] + " " + valid[8:], valid[:8] + "-" + valid[8:]]
    fancy_digits = ["٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "０１２３４５６７８９", "०१२३४५६७८९", "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗", "⁰¹²³⁴⁵⁶⁷⁸⁹"]
    for digits in fancy_digits:
        out.append("".join(digits[int(ch)] for ch in valid))           # every digit replaced
        pos = rng.randrange(len(valid))
        out.append(valid[:pos] + digits[int(valid[pos])] + valid[pos + 1:])  # one digit replaced
    while len(out) < 150:
        kind = rng.randrange(5)
        length = rng.randrange(12, 20)
        body = "".join(rng.choice("0123456789") for _ in range(length))
        if kind == 0:    # Luhn failure
            from server.pan import luhn_ok
            if luhn_ok(body):
                body = body[:-1] + str((int(body[-1]) + 1) % 10)
            out.append(body)
        elif kind == 1:  # wrong length
            out.append("".join(rng.choice("0123456789") for _ in range(rng.choice([1, 5, 11, 20, 25, 64]))))
        elif kind == 2:  # a stray character somewhere
            pos = rng.randrange(length)
            out.append(body[:pos] + rng.choice("abc!@# \t\n\x00\x7f\u00a0\u200b") + body[pos + 1:])
        elif kind == 3:  # random unicode
            out.append("".join(chr(rng.randrange(0x80, 0x3000)) for _ in range(length)))
        else:            # huge
            out.append(body * rng.randrange(50, 70))
    return out


def malformed_account_keys(rng: random.Random) -> list[pb.ResolveAccountRequest]:
    good = demo_routing(0)
    bad_check = good[:-1] + str((int(good[-1]) + 3) % 10)
    routings = ["", "1", good[:8], good + "0", bad_check, "abcdefghi", "٠" * 9, good[:4] + " " + good[5:], "9" * 1000]
    numbers = ["", "123", "1" * 18, "12a45", "１２３４５", "\x00" * 6, "5" * 1000]
    out = [pb.ResolveAccountRequest(routing_number=r, account_number="123456") for r in routings]
    out += [pb.ResolveAccountRequest(routing_number=good, account_number=n) for n in numbers]
    while len(out) < 40:
        out.append(pb.ResolveAccountRequest(routing_number=rng.choice(routings), account_number=rng.choice(numbers)))
    return out


def test_two_hundred_plus_malformed_keys(node_a: Clients) -> None:
    rng = random.Random(20261123)
    pans = malformed_pans(rng)
    tokens = ["", "tok_", "tok_" + "A" * 24, "tok_" + "a" * 5, "tok_" + "a" * 1000, "tok_" + "ä" * 24,
              "\x00tok_" + "a" * 24, "tok_" + "a" * 23 + " "]
    customers = ["", "cus_", "cus_UPPER000000", "x" * 1000, "cus_" + "\x00" * 10, "cus_٠١٢٣٤٥٦٧٨٩"]
    count = 0
    for pan in pans:
        with pytest.raises(grpc.RpcError) as info:
            node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(pan[:40])
        details = info.value.details() or ""
        assert pan not in details or len(pan) < 4
        count += 1
    for token in tokens:
        with pytest.raises(grpc.RpcError) as info:
            node_a.lookup.ResolveCard(pb.ResolveCardRequest(token=token), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        count += 1
    for req in malformed_account_keys(rng):
        with pytest.raises(grpc.RpcError) as info:
            node_a.lookup.ResolveAccount(req, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        count += 1
    for cid in customers:
        with pytest.raises(grpc.RpcError) as info:
            node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=cid), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        count += 1
    # The same keys in one batch: one result each, all INVALID_ARGUMENT, in order; between two
    # near-cache hits, so that BatchResolve's fast path (no Luhn check: server/lookup.py) sees them.
    node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(11)), timeout=5)
    good = pb.LookupKey(pan=demo_pan(11), correlation_id="good")
    batch = [good, *(pb.LookupKey(pan=p, correlation_id=str(i)) for i, p in enumerate(pans)), good]
    results = node_a.lookup.BatchResolve(pb.BatchResolveRequest(keys=batch), timeout=10).results
    assert [r.code for r in results] == [0] + [3] * len(pans) + [0]
    assert [r.correlation_id for r in results] == ["good", *(str(i) for i in range(len(pans))), "good"]
    assert results[0].resolution.card.last4 == demo_pan(11)[-4:]
    count += len(pans)
    assert count >= 200
    # Raw garbage that is not even a protobuf message.
    raw = node_a.channel.unary_unary("/crs.v1.LookupService/ResolveCard")
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff\xff", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    health = health_pb2_grpc.HealthStub(node_a.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(11)), timeout=5).card.last4
    assert node_a.node.proc.poll() is None


def test_an_over_long_correlation_id_is_refused_key_by_key(node_a: Clients) -> None:
    """A correlation id over 128 characters: that key alone is INVALID_ARGUMENT, in BatchResolve and
    StreamResolve alike, whether its card is a near-cache hit (the fast path) or not; its result
    carries the id cut to 128 characters, and the message does not repeat the key."""
    hit, other = demo_pan(11), demo_pan(12)
    node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=hit), timeout=5)      # a near-cache hit now
    keys = [pb.LookupKey(pan=hit, correlation_id="a" * 129), pb.LookupKey(pan=other, correlation_id="b" * 500),
            pb.LookupKey(account=pb.AccountKey(routing_number=demo_routing(0), account_number="123456"),
                         correlation_id="c" * 129),
            pb.LookupKey(pan=hit, correlation_id="d" * 128)]                   # the longest allowed
    batch = node_a.lookup.BatchResolve(pb.BatchResolveRequest(keys=keys), timeout=10).results
    streamed = {r.correlation_id: r for r in node_a.lookup.StreamResolve(iter(keys), timeout=10)}
    for results in (list(batch), [streamed.get(k.correlation_id[:128], pb.LookupResult()) for k in keys]):
        assert [r.correlation_id for r in results] == [k.correlation_id[:128] for k in keys]
        assert [r.code for r in results] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 3 + [0]
        for r in results[:3]:
            assert r.message == "correlation_id is longer than 128 characters", r.message
            assert not r.HasField("resolution")
            assert hit not in str(r) and other not in str(r) and hit[6:] not in str(r)
        assert results[3].resolution.card.last4 == hit[-4:]
