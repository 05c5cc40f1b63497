"""Transport security and callers: mutual TLS, bearer tokens, scopes, rate limits, the audit trail.

One node here runs with its own PKI and clients file (a stranger, a revoked certificate, a
rate-limited client) and a token port; every refused call must be refused before it reaches
PostgreSQL or Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import grpc
import jwt
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devstack.demo import demo_customer_id, demo_pan
from devstack.environment import DevEnvironment, NodeProcess, open_channel
from devstack.pki import DevPki, write_dev_pki
from server import rpc
from server.proto import crs_pb2 as pb
from server.settings import settings_to_env
from tests.integration.support import Clients, status_of

_code = status_of   # the status a call ends with

AUDIENCE = "crs-lookup-test"
LEEWAY = 1.0   # CRS_JWT_LEEWAY of the secure node: a token refused as expired 1 s after its exp

# The scope each RPC needs, as the documentation states it (an RPC listed with two scopes takes
# either): docs/security.md ("7 access by need to know": feed:read for ChangeFeedService, identity:read
# for IdentityService reads, admin:write for writes), docs/identity.md (its RPC table), docs/bins.md
# (ResolveBin: lookup:card), README.md (BatchResolve and StreamResolve take keys of any kind: one
# lookup scope to call them, then each key is checked against its own). Written out here, not read
# from server/caller.py, so that a change to the server's table has to be a change to this one too.
LOOKUP_ANY = frozenset({"lookup:card", "lookup:account", "lookup:customer"})
DOCUMENTED_SCOPES: dict[str, dict[str, frozenset[str]]] = {
    "LookupService": {
        "ResolveCard": frozenset({"lookup:card"}),
        "ResolveAccount": frozenset({"lookup:account"}),
        "GetCustomer": frozenset({"lookup:customer"}),
        "BatchResolve": LOOKUP_ANY,
        "StreamResolve": LOOKUP_ANY,
        "ResolveBin": frozenset({"lookup:card"}),
    },
    "AdminService": {name: frozenset({"admin:write"}) for name in (
        "CreateCustomer", "UpdateCustomer", "SetCustomerStatus", "CreateAccount", "SetAccountStatus",
        "CloseAccount", "LinkCustomer", "UnlinkCustomer", "IssueCard", "LinkCard", "SetCardStatus")},
    "ChangeFeedService": {"Watch": frozenset({"feed:read"}), "Snapshot": frozenset({"feed:read"})},
    "IdentityService": {
        "IdentifyCustomer": frozenset({"identity:read"}),
        "GetCustomerIdentity": frozenset({"identity:read"}),
        "ResolveSourceRef": frozenset({"identity:read", "lookup:customer"}),
        "ListReviewTasks": frozenset({"identity:read"}),
        "UpdateCustomerIdentity": frozenset({"admin:write"}),
        "MergeCustomers": frozenset({"admin:write"}),
        "UnmergeCustomer": frozenset({"admin:write"}),
        "DecideReviewTask": frozenset({"admin:write"}),
    },
}
EVERY_SCOPE = frozenset(s for rpcs in DOCUMENTED_SCOPES.values() for scopes in rpcs.values() for s in scopes)


@dataclass
class SecureNode:
    node: NodeProcess
    pki: DevPki
    other_ca: DevPki
    signing_key: ec.EllipticCurvePrivateKey
    token_port: int
    health_port: int

    def channel(self, client: str) -> grpc.Channel:
        return open_channel(self.node.address, self.pki, client)

    def token_channel(self, token: str | None) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.pki.ca_cert.read_bytes())
        if token is not None:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(f"127.0.0.1:{self.token_port}", creds)

    def token(self, sub: str, *, scope: str = "", ttl: float = 300, aud: str = AUDIENCE,
              key: ec.EllipticCurvePrivateKey | None = None) -> str:
        claims = {"sub": sub, "aud": aud, "exp": int(time.time() + ttl), "iat": int(time.time())}
        if scope:
            claims["scope"] = scope
        return jwt.encode(claims, key or self.signing_key, algorithm="ES256", headers={"kid": "test-1"})


@pytest.fixture(scope="module")
def secure(dev_env: DevEnvironment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNode]:
    from devstack import free_port

    base = dev_env.work_dir / "security-test"
    pki = write_dev_pki(base / "pki", ("admin", "switch", "stranger", "revoked", "limited"))
    other_ca = write_dev_pki(base / "other-ca", ("admin",))
    revoked_serial = x509.load_pem_x509_certificate(pki.client_cert("revoked")[0].read_bytes()).serial_number
    clients = {
        "clients": {
            "admin": {"scopes": ["lookup:card", "lookup:account", "lookup:customer", "admin:write"],
                      "cert_names": ["admin"]},
            "switch": {"scopes": ["lookup:card", "lookup:account"], "cert_names": ["switch"]},
            "revoked": {"scopes": ["lookup:card"], "cert_names": ["revoked"]},
            "limited": {"scopes": ["lookup:card"], "cert_names": ["limited"], "rate_per_s": 1, "burst": 3},
            "token-switch": {"scopes": ["lookup:card", "lookup:account"]},
            "token-all": {"scopes": sorted(EVERY_SCOPE)},     # its tokens narrow it, one scope set per test
        },
        "revoked_serials": [format(revoked_serial, "x")],
    }
    clients_file = base / "clients.json"
    clients_file.write_text(json.dumps(clients))
    signing_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signing_key.public_key()))
    jwks_file = base / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk | {"kid": "test-1", "alg": "ES256", "use": "sig"}]}))
    token_port, health_port = free_port(), free_port()
    node = dev_env.start_node(
        tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key), tls_client_ca_file=str(pki.ca_cert),
        clients_file=str(clients_file), jwt_jwks_file=str(jwks_file), jwt_audience=AUDIENCE, token_port=token_port,
        jwt_leeway=LEEWAY, health_port=health_port, pki=pki)
    yield SecureNode(node, pki, other_ca, signing_key, token_port, health_port)


def _backend_activity(dev_env: DevEnvironment, node: NodeProcess) -> tuple[int, float]:
    """(Redis GET/MGET/SET calls over all shards, lookups answered by any tier on this node)."""
    import urllib.request

    calls = 0
    for url in dev_env.shard_urls().values():
        stats = redis.Redis.from_url(url).info("commandstats")
        calls += sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("get", "mget", "set"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.settings.metrics_port}/metrics", timeout=5).read().decode()
    tiers = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("crs_lookups_total{"))
    return calls, tiers


def _signed_by_our_ca(pki: DevPki, name: str, problem: str) -> tuple[bytes, bytes]:
    """(certificate, key) PEM for `name` from the dev CA, expired or with the serverAuth usage only."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((pki.directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ends = now - dt.timedelta(days=1) if problem == "expired" else now + dt.timedelta(days=30)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if problem == "server-only" else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(ends)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _channel_with(secure: SecureNode, pair: tuple[bytes, bytes]) -> grpc.Channel:
    return grpc.secure_channel(secure.node.address, grpc.ssl_channel_credentials(
        root_certificates=secure.pki.ca_cert.read_bytes(), certificate_chain=pair[0], private_key=pair[1]))


def test_refused_callers_get_the_right_status_and_reach_no_backend(secure: SecureNode,
                                                                   dev_env: DevEnvironment) -> None:
    card = pb.ResolveCardRequest(pan=demo_pan(2))
    before = _backend_activity(dev_env, secure.node)
    with secure.channel("switch") as ch:          # lookup scopes only
        switch_admin = rpc.stub(ch, "AdminService")
        assert _code(lambda: switch_admin.CreateCustomer(pb.CreateCustomerRequest(display_name="x"), timeout=5)) \
            == grpc.StatusCode.PERMISSION_DENIED
        lookup = rpc.stub(ch, "LookupService")
        assert _code(lambda: lookup.GetCustomer(pb.GetCustomerRequest(customer_id=demo_customer_id(1)), timeout=5)) \
            == grpc.StatusCode.PERMISSION_DENIED
    with secure.channel("stranger") as ch:        # signed by our CA, not registered
        assert _code(lambda: rpc.stub(ch, "LookupService").ResolveCard(card, timeout=5)) \
            == grpc.StatusCode.UNAUTHENTICATED
    with secure.channel("revoked") as ch:
        assert _code(lambda: rpc.stub(ch, "LookupService").ResolveCard(card, timeout=5)) \
            == grpc.StatusCode.UNAUTHENTICATED
    with open_channel(secure.node.address, secure.other_ca, "admin") as ch:   # wrong CA: no handshake
        assert _code(lambda: rpc.stub(ch, "LookupService").ResolveCard(card, timeout=5)) \
            == grpc.StatusCode.UNAVAILABLE
    for problem in ("expired", "server-only"):   # our CA, a registered name, but TLS refuses it: no status to send
        with _channel_with(secure, _signed_by_our_ca(secure.pki, "switch", problem)) as ch:
            assert _code(lambda ch=ch: rpc.stub(ch, "LookupService").ResolveCard(card, timeout=5)) \
                == grpc.StatusCode.UNAVAILABLE, problem
    no_cert = grpc.secure_channel(secure.node.address,
                                  grpc.ssl_channel_credentials(root_certificates=secure.pki.ca_cert.read_bytes()))
    with no_cert as ch:                           # mTLS port without a client certificate: no handshake
        assert _code(lambda: rpc.stub(ch, "LookupService").ResolveCard(card, timeout=5)) \
            == grpc.StatusCode.UNAVAILABLE
    # The token port: no token, expired, wrong audience, unknown signer, unknown client, wrong scope.
    other_key = ec.generate_private_key(ec.SECP256R1())
    cases = {
        None: grpc.StatusCode.UNAUTHENTICATED,
        secure.token("token-switch", ttl=-60): grpc.StatusCode.UNAUTHENTICATED,
        secure.token("token-switch", aud="someone-else"): grpc.StatusCode.UNAUTHENTICATED,
        secure.token("token-switch", key=other_key): grpc.StatusCode.UNAUTHENTICATED,
        secure.token("nobody-we-know"): grpc.StatusCode.UNAUTHENTICATED,
        secure.token("token-switch", scope="lookup:account"): grpc.StatusCode.PERMISSION_DENIED,
    }
    for token, expected in cases.items():
        with secure.token_channel(token) as ch:
            assert _code(lambda ch=ch: rpc.stub(ch, "LookupService").ResolveCard(card, timeout=5)) == expected, token
    assert _backend_activity(dev_env, secure.node) == before, "a refused call reached Redis or PostgreSQL"
    with _channel_with(secure, _signed_by_our_ca(secure.pki, "switch", "none")) as ch:   # the control: valid
        assert rpc.stub(ch, "LookupService").ResolveCard(card, timeout=5).card.last4


def _issue(pki: DevPki, name: str, common_name: str, dns: list[str]) -> None:
    """A client certificate from the test's own CA (its key is in the PKI directory)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    ca_key = serialization.load_pem_private_key((pki.directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = pki.client_cert(name)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def test_a_certificate_naming_two_clients_is_refused(secure: SecureNode) -> None:
    """CN=switch with a SAN naming admin: which client it is must not depend on the clients file's
    order (it got admin's scopes when admin came first); it is refused, naming both, and a
    certificate whose names all point at one client still works."""
    _issue(secure.pki, "two-faced", "switch", ["admin"])
    with secure.channel("two-faced") as ch:
        err = None
        try:
            rpc.stub(ch, "AdminService").CreateCustomer(pb.CreateCustomerRequest(display_name="x"), timeout=5)
        except grpc.RpcError as exc:
            err = exc
        assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "names more than one registered client (admin, switch)" in (err.details() or "")
        assert _code(lambda: rpc.stub(ch, "LookupService").ResolveCard(pb.ResolveCardRequest(pan=demo_pan(2)),
                                                                       timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    _issue(secure.pki, "one-face", "switch", ["switch", "unregistered.example"])
    with secure.channel("one-face") as ch:
        assert rpc.stub(ch, "LookupService").ResolveCard(pb.ResolveCardRequest(pan=demo_pan(2)), timeout=5).card.token


def test_the_health_port_answers_health_in_plaintext_and_nothing_else(secure: SecureNode) -> None:
    """Kubernetes' gRPC probes cannot do TLS: CRS_HEALTH_PORT serves grpc.health.v1.Health alone in
    plaintext, the same statuses as the mutual-TLS port; every other service is UNIMPLEMENTED there."""
    with grpc.insecure_channel(f"127.0.0.1:{secure.health_port}") as ch:
        probe = health_pb2_grpc.HealthStub(ch)
        for service in ("", "crs.v1.LookupService"):
            assert probe.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        card = pb.ResolveCardRequest(pan=demo_pan(2))
        assert _code(lambda: rpc.stub(ch, "LookupService").ResolveCard(card, timeout=5)) == \
            grpc.StatusCode.UNIMPLEMENTED
        assert _code(lambda: rpc.stub(ch, "AdminService").CreateCustomer(pb.CreateCustomerRequest(display_name="x"),
                                                                           timeout=5)) == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(secure.node.address) as ch:   # the main port stays mutual TLS
        assert _code(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)) == \
            grpc.StatusCode.UNAVAILABLE


def test_allowed_callers_and_per_key_scopes(secure: SecureNode) -> None:
    with secure.channel("switch") as ch:
        lookup = rpc.stub(ch, "LookupService")
        assert lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(2)), timeout=5).card.last4
        batch = lookup.BatchResolve(pb.BatchResolveRequest(keys=[
            pb.LookupKey(pan=demo_pan(2), correlation_id="card"),
            pb.LookupKey(customer_id=demo_customer_id(1), correlation_id="customer")]), timeout=5)
        assert [(r.correlation_id, r.code) for r in batch.results] == [
            ("card", 0), ("customer", grpc.StatusCode.PERMISSION_DENIED.value[0])]
    with secure.token_channel(secure.token("token-switch")) as ch:
        assert rpc.stub(ch, "LookupService").ResolveCard(pb.ResolveCardRequest(pan=demo_pan(2)), timeout=5).card.last4
    with secure.token_channel(None) as ch:        # health stays open for probes
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _services(ch: grpc.Channel) -> set[str]:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]), timeout=5)
    return {s.name for s in answer.list_services_response.service}


def test_reflection_for_registered_callers_health_for_everyone(secure: SecureNode) -> None:
    with secure.channel("switch") as ch:          # any registered client, whatever its scopes
        assert {"crs.v1.LookupService", "grpc.health.v1.Health"} <= _services(ch)
    with secure.token_channel(secure.token("token-switch")) as ch:
        assert "crs.v1.LookupService" in _services(ch)
    for refused in (secure.channel("stranger"), secure.token_channel(None)):    # our CA but unregistered; no token
        with refused as ch:
            assert _code(lambda ch=ch: _services(ch)) == grpc.StatusCode.UNAUTHENTICATED
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING   # open: probes carry no credentials


def test_rate_limit_answers_resource_exhausted(secure: SecureNode) -> None:
    with secure.channel("limited") as ch:
        lookup = rpc.stub(ch, "LookupService")
        codes = [_code(lambda: lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(4)), timeout=5))
                 for _ in range(6)]
    assert codes[:3] == [grpc.StatusCode.OK] * 3
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[3:]
    with secure.channel("admin") as ch:           # other callers are not starved
        assert rpc.stub(ch, "LookupService").ResolveCard(pb.ResolveCardRequest(pan=demo_pan(4)), timeout=5).card.last4


def test_admin_writes_are_audited_and_the_trail_is_append_only(node_a: Clients, dev_env: DevEnvironment) -> None:
    customer = node_a.admin.CreateCustomer(pb.CreateCustomerRequest(display_name="Audited", request_id="audit-1"),
                                           timeout=5)
    node_a.admin.CreateCustomer(pb.CreateCustomerRequest(display_name="Audited", request_id="audit-1"), timeout=5)
    assert _code(lambda: node_a.admin.SetCustomerStatus(pb.SetCustomerStatusRequest(
        customer_id=customer.customer_id, expected_version=9, status=pb.CUSTOMER_STATUS_SUSPENDED), timeout=5)) \
        == grpc.StatusCode.ABORTED

    async def check() -> list[asyncpg.Record]:
        service = await asyncpg.connect(dev_env.settings().pg_dsn)      # the nodes' own credentials
        try:
            rows = await service.fetch("SELECT client_id, via, rpc, entity_ids, result FROM audit_log"
                                       " WHERE $1 = ANY(entity_ids) ORDER BY id", customer.customer_id)
            for statement in ("UPDATE audit_log SET result = 'OK'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await service.execute(statement)
        finally:
            await service.close()
        owner = await asyncpg.connect(dev_env.admin_dsn)                # even the owner: the trigger refuses
        try:
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await owner.execute("DELETE FROM audit_log")
        finally:
            await owner.close()
        return rows

    rows = asyncio.run(check())
    assert [(r["client_id"], r["via"], r["rpc"], r["result"]) for r in rows] == [
        ("admin", "mtls", "CreateCustomer", "OK"), ("admin", "mtls", "SetCustomerStatus", "ABORTED")]
    # The retry is audited too, as a replay of the same request.
    out = subprocess.run([sys.executable, "-m", "server.cli", "audit", "--client", "admin", "--limit", "50"],
                         env={"CRS_PG_DSN": dev_env.settings().pg_dsn, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "OK_REPLAYED" in out.stdout and customer.customer_id in out.stdout


def test_audit_hours_may_be_a_fraction(dev_env: DevEnvironment) -> None:
    """`crs audit --hours 0.2` (the database runbook's "last 12 minutes") found nothing: the window was
    make_interval(hours => $4), a whole number, and asyncpg sent 0.2 as 0."""
    # Unique, and never a digit run: a 13-16 digit time passed Luhn one run in ten, and the suite's
    # last PCI scan (crs pci scan) then found a "card number" in audit_log.client_id.
    client = f"audit-window-{uuid.uuid4()}"

    async def write() -> None:
        owner = await asyncpg.connect(dev_env.admin_dsn)
        try:
            for minutes, rpc_name in ((5, "FiveMinutesAgo"), (30, "HalfAnHourAgo")):
                await owner.execute("INSERT INTO audit_log (at, client_id, via, rpc, result)"
                                    " VALUES (now() - make_interval(mins => $1), $2, 'mtls', $3, 'OK')",
                                    minutes, client, rpc_name)
        finally:
            await owner.close()

    asyncio.run(write())

    def audit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server.cli", "audit", "--client", client, *args],
                              env={"CRS_PG_DSN": dev_env.settings().pg_dsn, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=30)

    for hours, seen in (("0.2", {"FiveMinutesAgo"}), ("0.05", set()), ("1", {"FiveMinutesAgo", "HalfAnHourAgo"})):
        out = audit("--hours", hours)
        assert out.returncode == 0, out.stderr
        assert {r for r in ("FiveMinutesAgo", "HalfAnHourAgo") if r in out.stdout} == seen, (hours, out.stdout)
        assert f"({len(seen)} rows)" in out.stdout
    for bad in ("0", "-1", "nan", "1e12"):
        out = audit("--hours", bad)
        assert out.returncode == 2 and "--hours" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_only_operators_change_the_shard_topology(dev_env: DevEnvironment) -> None:
    async def check() -> None:
        service = await asyncpg.connect(dev_env.settings().pg_dsn)
        operator = await asyncpg.connect(dev_env.operator_dsn)
        try:
            for table in ("shard_topology", "shard_topology_draft", "shard_migration_progress"):
                await service.fetch(f"SELECT * FROM {table} LIMIT 1")          # nodes read it
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await service.execute(f"DELETE FROM {table}")
            async with operator.transaction():
                await operator.execute("DELETE FROM shard_topology_draft")      # operators may
                await operator.fetch("SELECT client_id FROM audit_log LIMIT 1")
            await service.execute("DELETE FROM node_status WHERE node_id = 'nobody'")   # own heartbeat: yes
        finally:
            await service.close()
            await operator.close()

    asyncio.run(check())
    # The CLI says so in one line: a change needs an operator login (configuration, exit 2, not an outage).
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | settings_to_env(dev_env.settings())
    r = subprocess.run([sys.executable, "-m", "server.cli", "shards", "add", "shard-9", "--address",
                        "redis://127.0.0.1:9/0", "--no-check"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "lacks the rights of crs_operator" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    # Read-only commands work with the nodes' login; a reader that stops early (| head) ends them quietly.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "server.cli", "shards", "status"], stdout=write_end,
                           stderr=subprocess.PIPE, env=env | {"PYTHONUNBUFFERED": "1"}, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, "")


def _every_rpc() -> Iterator[tuple[ServiceDescriptor, rpc.Method]]:
    """Every RPC of every service in the generated descriptors (not the server's own list)."""
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in rpc.methods(service).values():
            yield service, method


def test_the_scope_table_has_every_rpc_with_its_documented_scope() -> None:
    """A new RPC (or service) without a row in DOCUMENTED_SCOPES fails here, and so does any
    difference between what the documentation says an RPC needs and what the node's gate requires."""
    from server.auth import Authenticator
    from server.caller import ALL_SCOPES
    from server.gate import Gate

    generated = {(service.name, method.name) for service, method in _every_rpc()}
    documented = {(service, name) for service, rpcs in DOCUMENTED_SCOPES.items() for name in rpcs}
    assert generated == documented, f"RPCs without a documented scope: {sorted(generated - documented)};" \
                                    f" documented RPCs that do not exist: {sorted(documented - generated)}"
    assert EVERY_SCOPE == ALL_SCOPES
    gate = Gate(Authenticator(registry=None, jwt=None, allow_anonymous=False))
    differ = {f"{service.name}/{method.name}": sorted(gate.scopes_for(method))
              for service, method in _every_rpc()
              if gate.scopes_for(method) != DOCUMENTED_SCOPES[service.name][method.name]}
    assert differ == {}, f"the gate's scopes differ from the documented ones: {differ}"


def _outcome(channel: grpc.Channel, service: ServiceDescriptor, method: rpc.Method,
             token: str) -> tuple[grpc.StatusCode, str]:
    """How `method`, called with an empty request (no request at all on a client stream) and this
    bearer token, ends: OK once a first answer came (a stream is cancelled then), else its status."""
    call = getattr(rpc.Stub(channel, service), method.name)
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        if not method.server_streaming:
            call(method.request(), timeout=5, metadata=metadata)
            return grpc.StatusCode.OK, ""
        answers = call(iter(()) if method.client_streaming else method.request(), timeout=5, metadata=metadata)
        with contextlib.suppress(StopIteration):
            next(answers)
        answers.cancel()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_every_rpc_refuses_a_caller_without_its_scope_and_admits_one_with_it(secure: SecureNode,
                                                                            dev_env: DevEnvironment) -> None:
    """For each RPC of each service: a caller holding every scope but the ones it needs is refused
    PERMISSION_DENIED, naming exactly the needed scopes, before any backend is touched; a caller holding
    any one of them alone gets past the gate (its empty request is then answered as the handler
    sees fit: INVALID_ARGUMENT mostly)."""
    with secure.token_channel(None) as ch:         # the token goes with each call
        before = _backend_activity(dev_env, secure.node)
        refused: dict[str, tuple[str, str]] = {}
        for service, method in _every_rpc():
            needed = DOCUMENTED_SCOPES[service.name][method.name]
            token = secure.token("token-all", scope=" ".join(sorted(EVERY_SCOPE - needed)))
            code, details = _outcome(ch, service, method, token)
            expected = f"client 'token-all' may not call {method.name} (needs {' or '.join(sorted(needed))})"
            if (code, details) != (grpc.StatusCode.PERMISSION_DENIED, expected):
                refused[f"{service.name}/{method.name}"] = (code.name, details)
        assert refused == {}, f"callers without the RPC's scope were not refused as documented: {refused}"
        assert _backend_activity(dev_env, secure.node) == before, "a refused call reached Redis or PostgreSQL"
        admitted_wrongly: dict[str, tuple[str, str]] = {}
        for service, method in _every_rpc():
            for scope in sorted(DOCUMENTED_SCOPES[service.name][method.name]):
                code, details = _outcome(ch, service, method, secure.token("token-all", scope=scope))
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                            grpc.StatusCode.UNIMPLEMENTED):
                    admitted_wrongly[f"{service.name}/{method.name} with {scope}"] = (code.name, details)
        assert admitted_wrongly == {}, f"callers with the documented scope were refused: {admitted_wrongly}"


def test_a_cached_token_is_refused_once_it_expires(secure: SecureNode) -> None:
    """Verified tokens are cached (server/auth.py, JwtVerifier): the cached entry must end at the
    token's exp (and CRS_JWT_LEEWAY), not outlive it. A token with a 1-2 s lifetime is verified (and cached), used again
    from the cache, then refused as expired right after its exp."""
    card = pb.ResolveCardRequest(pan=demo_pan(2))
    for _attempt in range(5):
        token = secure.token("token-switch", ttl=2)
        expires = jwt.decode(token, options={"verify_signature": False})["exp"]
        with secure.token_channel(token) as ch:
            lookup = rpc.stub(ch, "LookupService")
            try:
                for _ in range(2):  # the first verifies and caches it, the second is answered from the cache
                    assert lookup.ResolveCard(card, timeout=5).card.last4 == demo_pan(2)[-4:]
            except grpc.RpcError as exc:
                # Refused once its exp had passed: a machine too slow to use a 1-2 s token twice (a
                # stall between the calls), not what this test is about; again, with a new token.
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and time.time() >= expires, exc
                continue
            while time.time() < expires + LEEWAY + 0.3:
                time.sleep(0.1)
            with pytest.raises(grpc.RpcError) as info:
                lookup.ResolveCard(card, timeout=5)
        break
    else:
        pytest.fail("the machine was too slow to use a token twice before it expired, five times")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    assert info.value.details() == "bearer token has expired"


def test_crs_lookup_checks_the_server_name_it_is_given(secure: SecureNode, capsys: pytest.CaptureFixture[str]) -> None:
    """`crs lookup --server-name`: the name the node's certificate must carry when the target does not
    say it (a port-forward to 127.0.0.1). The dev certificate names localhost: that name passes, one it
    does not carry fails the TLS handshake (UNAVAILABLE, exit 1), never connecting to an impostor."""
    from server.cli.main import main as crs

    base = ["lookup", "customer", "--customer-id", demo_customer_id(1), "--target", secure.node.address,
            "--tls-dir", str(secure.pki.directory), "--client", "admin", "--timeout", "5"]
    assert crs([*base, "--server-name", "localhost"]) == 0
    assert demo_customer_id(1) in capsys.readouterr().out
    assert crs([*base, "--server-name", "crs-node.elsewhere.example"]) == 1
    assert capsys.readouterr().err.startswith("UNAVAILABLE")
