"""Who is calling, what they may do, and how fast: caller identity, per-RPC scopes, rate limits.

Identity comes from the client certificate of a mutual-TLS connection (its common name or a DNS SAN,
mapped to a client id in the clients file; names mapping to two clients are refused) or from a
signed JWT bearer token (`sub` = client id, verified against a JWKS with audience and expiry
checks). Scopes are granted per client id in the clients file; a token can only narrow them.
Everything here runs before a handler touches PostgreSQL or Redis, on the event loop (grpc.aio) or
on gRPC threads (the hybrid serving model): the caches and token buckets take a lock.

The clients file (CRS_CLIENTS_FILE, JSON)::

    {"clients": {"switch-east": {"scopes": ["lookup:card", "lookup:account"],
                                 "cert_names": ["switch-east", "switch-east.payments.internal"],
                                 "rate_per_s": 20000, "burst": 40000, "max_streams": 64}},
     "revoked_serials": ["3f9a..."]}

`rate_per_s`/`burst`: a token bucket per node process, one token per key looked up (docs/security.md);
`max_streams`: open streams the client may hold per node process (either serving model; default
CRS_STREAMS_PER_CLIENT).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from server.caller import ALL_SCOPES, ANONYMOUS, Caller
from server.errors import RateLimited, Unauthenticated

K = TypeVar("K")
V = TypeVar("V")


class ConfigError(ValueError):
    """The clients file or the JWT keys are unusable (reported at start-up)."""




@dataclass(frozen=True)
class ClientPolicy:
    client_id: str
    scopes: frozenset[str]
    cert_names: tuple[str, ...] = ()
    rate_per_s: float = 0.0   # 0 = unlimited
    burst: float = 0.0
    max_streams: int = 0      # open streams per node process; 0 = CRS_STREAMS_PER_CLIENT


@dataclass(frozen=True)
class ClientRegistry:
    clients: Mapping[str, ClientPolicy]
    revoked_serials: frozenset[int] = frozenset()

    @classmethod
    def from_file(cls, path: Path) -> ClientRegistry:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except OSError as exc:
            raise ConfigError(f"CRS_CLIENTS_FILE: cannot read {path}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"CRS_CLIENTS_FILE: {path} is not valid JSON: {exc}") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientRegistry:
        clients: dict[str, ClientPolicy] = {}
        names: dict[str, str] = {}
        for client_id, spec in dict(data.get("clients", {})).items():
            scopes = frozenset(spec.get("scopes", ()))
            unknown = scopes - ALL_SCOPES
            if unknown:
                raise ConfigError(f"CRS_CLIENTS_FILE: client {client_id!r} has unknown scopes {sorted(unknown)};"
                                  f" known: {sorted(ALL_SCOPES)}")
            rate, burst = float(spec.get("rate_per_s", 0)), float(spec.get("burst", 0))
            if rate < 0 or burst < 0:
                raise ConfigError(f"CRS_CLIENTS_FILE: client {client_id!r}: rate_per_s and burst must be >= 0")
            max_streams = spec.get("max_streams", 0)
            if not isinstance(max_streams, int) or isinstance(max_streams, bool) or max_streams < 0:
                raise ConfigError(f"CRS_CLIENTS_FILE: client {client_id!r}: max_streams must be a whole number >= 0")
            policy = ClientPolicy(client_id, scopes, tuple(spec.get("cert_names", ())), rate, burst or rate,
                                  max_streams)
            for name in policy.cert_names:
                if name in names:
                    raise ConfigError(f"CRS_CLIENTS_FILE: certificate name {name!r} maps to both"
                                      f" {names[name]!r} and {client_id!r}")
                names[name] = client_id
            clients[client_id] = policy
        revoked = frozenset(int(s, 16) for s in data.get("revoked_serials", ()))
        return cls(clients, revoked)

    def by_cert_name(self, names: Sequence[str]) -> list[ClientPolicy]:
        """Every client one of `names` is registered to: a certificate must name exactly one."""
        return [policy for policy in self.clients.values() if any(n in policy.cert_names for n in names)]


# Seconds a token's time claims (exp, nbf, iat) may be off by the node's clock. Without it a token from
# an issuer whose clock ran a second ahead of the node's was refused ("iat in the future") as it was
# handed out, and a client whose clock ran behind went on sending a token the node had found expired
# (refused, and kept refused) until its own clock said so. The default of CRS_JWT_LEEWAY.
CLOCK_SKEW = 30.0


def _keep(cache: OrderedDict[K, V], key: K, value: V, size: int) -> None:
    """Put `key` in a cache of at most `size` entries, the oldest put first out (the caller holds its lock)."""
    if len(cache) >= size:
        cache.popitem(last=False)
    cache[key] = value


class JwtVerifier:
    """Verifies signed bearer tokens (ES256/RS256/EdDSA) against a JWKS file; caches good tokens until
    they expire, and refused ones (by a digest of the token) for good: a client retrying an expired or
    forged token in a loop cost a signature check each time (~105 µs for ES256 on the 2-core VM; a
    cached answer either way ~0.3 µs). A token refused only for a time claim in the future (nbf, iat)
    is not kept: it becomes good."""

    ALGORITHMS = ("ES256", "RS256", "EdDSA")

    def __init__(self, *, jwks_file: Path, audience: str, issuer: str = "", cache_size: int = 10_000,
                 leeway: float = CLOCK_SKEW) -> None:
        import jwt

        try:
            self._keys = jwt.PyJWKSet.from_json(jwks_file.read_text())
        except OSError as exc:
            raise ConfigError(f"CRS_JWT_JWKS_FILE: cannot read {jwks_file}: {exc.strerror}") from exc
        except jwt.PyJWTError as exc:
            raise ConfigError(f"CRS_JWT_JWKS_FILE: {jwks_file} is not a usable JWKS: {exc}") from exc
        self._jwt = jwt
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway   # seconds the token issuer's clock and this node's may differ by
        self._cache: OrderedDict[str, tuple[float, str, frozenset[str] | None]] = OrderedDict()
        self._cache_size = cache_size
        self._refused: OrderedDict[bytes, str] = OrderedDict()   # sha256 of a token: why it was refused
        self._lock = threading.Lock()

    def verify(self, token: str) -> tuple[str, frozenset[str] | None]:
        """(client id, scopes in the token: None when it has no scope claim) or Unauthenticated."""
        now = time.time()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        refused = self._refused.get(digest)
        if refused is not None:
            raise Unauthenticated(refused)
        jwt = self._jwt
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._keys[kid] if kid else self._keys.keys[0]
            # Only the key's own algorithm: an RS256 token naming an EC key made PyJWT raise TypeError,
            # answered INTERNAL with a traceback logged per call (anyone could flood the logs).
            algorithms = [key.algorithm_name] if key.algorithm_name in self.ALGORITHMS else []
            claims = jwt.decode(token, key.key, algorithms=algorithms, audience=self.audience,
                                issuer=self.issuer or None, leeway=self.leeway,
                                options={"require": ["exp", "sub", "aud"]})
        except jwt.ImmatureSignatureError as exc:   # good later: not kept
            raise Unauthenticated("bearer token is not valid for this service") from exc
        except jwt.ExpiredSignatureError as exc:
            raise self._refuse(digest, "bearer token has expired") from exc
        except (jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:   # whatever a forged token makes PyJWT raise
            raise self._refuse(digest, "bearer token is not valid for this service") from exc
        scopes = token_scopes(claims)
        with self._lock:
            _keep(self._cache, token, (float(claims["exp"]) + self.leeway, str(claims["sub"]), scopes),
                  self._cache_size)
        return str(claims["sub"]), scopes

    def _refuse(self, digest: bytes, why: str) -> Unauthenticated:
        with self._lock:
            _keep(self._refused, digest, why, self._cache_size)
        return Unauthenticated(why)


def token_scopes(claims: Mapping[str, object]) -> frozenset[str] | None:
    """The scopes a token grants: `scope` (RFC 8693/9068: space-separated) and `scp` (a list, or a string
    as `scope`), together. None when it has neither claim: the token then narrows nothing (the client's
    scopes). A claim that is present but empty, or of another type, grants none."""
    if "scope" not in claims and "scp" not in claims:
        return None
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(s for v in value if isinstance(v, str) for s in v.split())
    return frozenset(found)


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def take(self, now: float, n: float = 1.0) -> bool:
        """`n` tokens, when there are that many (or a full bucket, for an `n` above the burst: the
        bucket then owes the rest, so a batch larger than the burst is slowed, never refused for good)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= min(n, self.burst):
            self.tokens -= n
            return True
        return False


class Authenticator:
    """Turns a call's transport and metadata into a Caller, or raises Unauthenticated."""

    def __init__(self, *, registry: ClientRegistry | None, jwt: JwtVerifier | None, allow_anonymous: bool,
                 mtls: bool = True, cert_cache_size: int = 4096) -> None:
        self.registry = registry or ClientRegistry({})
        self.jwt = jwt
        self.mtls = mtls   # False: no port asks for client certificates, so don't look for one
        self.allow_anonymous = allow_anonymous
        self._by_cert: OrderedDict[bytes, Caller | Unauthenticated] = OrderedDict()
        self._cert_cache_size = cert_cache_size
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def authenticate(self, context: grpc.ServicerContext | grpc.aio.ServicerContext) -> Caller:
        if self.jwt is not None:
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    return self._from_token(str(value))
        if self.mtls:
            pem = context.auth_context().get("x509_pem_cert")
            if pem:
                return self._from_cert(pem[0])
        if self.allow_anonymous:
            return ANONYMOUS
        raise Unauthenticated("no credentials: present a registered client certificate or a bearer token")

    def _from_token(self, header: str) -> Caller:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        assert self.jwt is not None
        client_id, scopes = self.jwt.verify(token.strip())
        policy = self.registry.clients.get(client_id)
        if policy is None:
            raise Unauthenticated("bearer token names a client this service does not know")
        return Caller(client_id, policy.scopes if scopes is None else policy.scopes & scopes, "jwt")

    def _from_cert(self, pem: bytes) -> Caller:
        cached = self._by_cert.get(pem)
        if cached is None:
            cached = self._identify_cert(pem)
            with self._lock:
                _keep(self._by_cert, pem, cached, self._cert_cache_size)
        if isinstance(cached, Unauthenticated):
            raise Unauthenticated(cached.message)
        return cached

    def _identify_cert(self, pem: bytes) -> Caller | Unauthenticated:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(pem)
        if cert.serial_number in self.registry.revoked_serials:
            return Unauthenticated("client certificate has been revoked")
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        try:
            names += cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName)
        except x509.ExtensionNotFound:
            pass
        matches = self.registry.by_cert_name(names)
        if not matches:
            return Unauthenticated("client certificate is not registered with this service")
        if len(matches) > 1:
            # Which one wins must not depend on the clients file's order: a certificate with CN=switch
            # and a SAN naming admin would otherwise get whichever came first (admin's scopes, say).
            return Unauthenticated("client certificate names more than one registered client ("
                                   + ", ".join(sorted(p.client_id for p in matches)) + "): issue one per client")
        return Caller(matches[0].client_id, matches[0].scopes, "mtls")

    def stream_share(self, caller: Caller, default: int) -> int:
        """The open streams `caller` may hold per node process: its clients-file `max_streams`, else
        `default` (CRS_STREAMS_PER_CLIENT)."""
        policy = self.registry.clients.get(caller.client_id)
        return policy.max_streams if policy is not None and policy.max_streams else default

    def admit(self, caller: Caller, cost: int = 1) -> None:
        """Charge `cost` to the caller's token bucket (per node process); RateLimited when empty. The
        Gate charges every call one, but a BatchResolve, which pays one per key; a StreamResolve pays
        for each key as well."""
        if cost <= 0:
            return
        policy = self.registry.clients.get(caller.client_id)
        if policy is None or not policy.rate_per_s:
            return
        with self._lock:
            bucket = self._buckets.get(caller.client_id)
            if bucket is None:
                bucket = self._buckets[caller.client_id] = TokenBucket(policy.rate_per_s, policy.burst)
            admitted = bucket.take(time.monotonic(), cost)
        if not admitted:
            raise RateLimited(f"client {caller.client_id!r} is over its rate limit of {policy.rate_per_s:g}/s")
