"""Rate limits charge per key looked up (docs/security.md): a call costs one token, a BatchResolve one per
key, a StreamResolve one to open and one per key, the keys over the limit answered RESOURCE_EXHAUSTED
one by one while the stream goes on. (One token per call let a batch of 1,000 keys, or a stream of any
length, through a limit of one call a second.) Both serving models, mutual TLS, real servers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest

from devstack.demo import demo_pan
from devstack.environment import DevEnvironment, NodeProcess, open_channel
from devstack.pki import DevPki, write_dev_pki
from server import rpc
from server.proto import crs_pb2 as pb

pytestmark = pytest.mark.integration
# Each a bucket of burst 3. A token comes back every 10 s to the first two, so that their "over the
# limit" holds however slow the machine is between two calls (at 1/s a 1.1 s stall there let one
# through); every 2 s to the debtor, whose debt the test waits a token's time into.
CLIENTS = {"batcher": 0.1, "streamer": 0.1, "debtor": 0.5}


@pytest.fixture(scope="module", params=["hybrid", "aio"])
def limited(request: pytest.FixtureRequest, dev_env: DevEnvironment) -> Iterator[tuple[NodeProcess, DevPki]]:
    base = dev_env.work_dir / f"rate-limit-test-{request.param}"
    pki = write_dev_pki(base / "pki", ("admin", *CLIENTS))   # start_node checks readiness as admin
    clients_file = base / "clients.json"
    clients_file.write_text(json.dumps({"clients": {
        name: {"scopes": ["lookup:card"], "cert_names": [name], "rate_per_s": rate, "burst": 3}
        for name, rate in CLIENTS.items()}}))
    node = dev_env.start_node(workers=1, serving_model=request.param, tls_cert_file=str(pki.server_cert),
                              tls_key_file=str(pki.server_key), tls_client_ca_file=str(pki.ca_cert),
                              clients_file=str(clients_file), pki=pki)
    try:
        yield node, pki
    finally:
        node.stop()
        dev_env.nodes.remove(node)


def test_a_batch_pays_for_each_key(limited: tuple[NodeProcess, DevPki]) -> None:
    node, pki = limited
    with open_channel(node.address, pki, "batcher") as ch:
        lookup = rpc.stub(ch, "LookupService")
        keys = [pb.LookupKey(pan=demo_pan(i), correlation_id=str(i)) for i in range(1, 4)]
        batch = lookup.BatchResolve(pb.BatchResolveRequest(keys=keys), timeout=5)
        assert [r.code for r in batch.results] == [0, 0, 0]
        # The three keys took the whole burst: the next call is over the limit.
        with pytest.raises(grpc.RpcError) as over:
            lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(1)), timeout=5)
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'batcher' is over its rate limit of 0.1/s" in (over.value.details() or "")
    with open_channel(node.address, pki, "debtor") as ch:
        lookup = rpc.stub(ch, "LookupService")
        # A batch larger than the burst is not refused for good: a full bucket (the debtor's first
        # call) lets it through, in debt.
        big = [pb.LookupKey(pan=demo_pan(i), correlation_id=str(i)) for i in range(1, 7)]
        assert len(lookup.BatchResolve(pb.BatchResolveRequest(keys=big), timeout=5).results) == 6
        time.sleep(2.1)   # one token back (0.5/s), but the bucket still owes three (a token at 8 s)
        with pytest.raises(grpc.RpcError) as over:
            lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(1)), timeout=5)
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'debtor' is over its rate limit of 0.5/s" in (over.value.details() or "")


def test_a_stream_pays_for_each_key_and_goes_on(limited: tuple[NodeProcess, DevPki]) -> None:
    node, pki = limited
    with open_channel(node.address, pki, "streamer") as ch:
        lookup = rpc.stub(ch, "LookupService")
        keys = [pb.LookupKey(pan=demo_pan(i), correlation_id=f"k{i}") for i in range(1, 6)]
        results = {r.correlation_id: r for r in lookup.StreamResolve(iter(keys), timeout=10)}
    assert set(results) == {f"k{i}" for i in range(1, 6)}
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    # Opening the stream took one token of three: two keys answered, three over the limit, one by one.
    assert sorted(r.code for r in results.values()) == [0, 0, exhausted, exhausted, exhausted]
    for r in results.values():
        if r.code:
            assert "over its rate limit" in r.message and demo_pan(1)[:8] not in r.message
