"""What `crs serve` checks once, in the process it was started as, before any node process starts.

A configuration mistake found here is one line naming the setting and exit 2 (`crs --help`) instead
of node processes failing one after the other as they start (each restarted by the supervisor), deep
in grpc or asyncpg: a TLS key that does not match its certificate was "Failed to bind to address ...;
set GRPC_VERBOSITY=debug" (exit 3); a port another node already serves was shared with it without a
word (grpc sets SO_REUSEPORT); a CRS_TOPOLOGY_FILE that does not exist ran the ring of
CRS_REDIS_SHARDS; a clients file that does not parse was exit 3. `check_database` then asks
PostgreSQL what only it can tell: the keys are the ones this database was written with (a wrong one
was exit 3 too, an outage's code). A node process checks the same again as it starts;
CONFIGURATION_ERRORS are what it then answers with exit 2 rather than 3 (a dependency unavailable).
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from server.auth import ClientRegistry, ConfigError, JwtVerifier
from server.crypto import KeyConfigError
from server.errors import BackendUnavailable
from server.settings import Settings, SettingsError
from server.store.db import active_data_key, create_pool, verify_key_checks
from server.store.migrate import check_schema
from server.topology.store import FileTopologyStore
from shard_router.topology import TopologyError

CONFIGURATION_ERRORS = (SettingsError, KeyConfigError, ConfigError, TopologyError, asyncpg.ClientConfigurationError)


def check_before_serving(s: Settings) -> None:
    """Everything a node needs that can be checked without serving or PostgreSQL; SettingsError."""
    check_tls(s)
    check_ports(s)
    try:
        if s.topology_file:
            FileTopologyStore(Path(s.topology_file)).check(must_exist=True)
        if s.clients_file:
            ClientRegistry.from_file(Path(s.clients_file))
        if s.jwt_jwks_file:
            JwtVerifier(jwks_file=Path(s.jwt_jwks_file), audience=s.jwt_audience, issuer=s.jwt_issuer,
                        leeway=s.jwt_leeway)
    except (TopologyError, ConfigError) as exc:     # their messages name the setting
        raise SettingsError(str(exc)) from exc


# --------------------------------------------------------------------------------------------------
# TLS: each file on its own (which one is wrong), then the pair and the CA as OpenSSL loads them
# --------------------------------------------------------------------------------------------------


def check_tls(s: Settings) -> None:
    """The certificate chain, its key and the client CA parse and fit together; the message names the
    CRS_TLS_* variable and its path, never what a key file holds."""
    if not s.tls_cert_file:
        return
    cert, key = s.tls_cert_file, s.tls_key_file
    cert_pem, key_pem = _read("CRS_TLS_CERT_FILE", cert), _read("CRS_TLS_KEY_FILE", key)
    swapped = " (CRS_TLS_CERT_FILE and CRS_TLS_KEY_FILE swapped?)"
    chain = _certificates(cert_pem)
    if not chain:
        hint = swapped if _private_key(cert_pem) != "none" else ""
        raise SettingsError(f"CRS_TLS_CERT_FILE={cert} holds no PEM certificate{hint}")
    private = _private_key(key_pem)
    if private == "encrypted":
        raise SettingsError(f"CRS_TLS_KEY_FILE={key} is encrypted: the node needs the key unencrypted")
    if isinstance(private, str):
        hint = swapped if _certificates(key_pem) else ""
        raise SettingsError(f"CRS_TLS_KEY_FILE={key} holds no PEM private key{hint}")
    if _public(chain[0].public_key()) != _public(private.public_key()):
        raise SettingsError(f"CRS_TLS_KEY_FILE={key} is not the key of the certificate in CRS_TLS_CERT_FILE={cert}"
                            " (its first certificate: the server's own, then the chain)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)    # as OpenSSL loads them, for anything else it refuses
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")   # never OpenSSL's own prompt
    except ssl.SSLError as exc:
        raise SettingsError(f"CRS_TLS_CERT_FILE={cert} with CRS_TLS_KEY_FILE={key}: OpenSSL refuses the pair"
                            f" ({exc.reason or exc.library})") from exc
    ca = s.tls_client_ca_file
    if ca:
        if not _certificates(_read("CRS_TLS_CLIENT_CA_FILE", ca)):
            raise SettingsError(f"CRS_TLS_CLIENT_CA_FILE={ca} holds no PEM certificate (the CA that signs the"
                                " clients' certificates)")
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise SettingsError(f"CRS_TLS_CLIENT_CA_FILE={ca}: OpenSSL refuses it ({exc.reason or exc.library})"
                                ) from exc


def _read(variable: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{variable}={path}: cannot read it: {exc.strerror}") from exc


def _certificates(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def _private_key(pem: bytes) -> PrivateKeyTypes | str:
    """The key, or 'encrypted', or 'none' (nothing cryptography can read as a private key)."""
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:          # "Password was not given but private key is encrypted"
        return "encrypted"
    except (ValueError, UnsupportedAlgorithm):
        return "none"


def _public(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


# --------------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------------


def check_ports(s: Settings) -> None:
    """Every port this node will listen on is free. The gRPC, token and health ports are bound with
    SO_REUSEPORT (a node's processes share them), so a second node on a port another already serves
    would start and take part of its connections; the probe binds without it, as nothing else would
    (SO_REUSEADDR only, so a previous run's TIME_WAIT connections are no owner). CRS_SHARE_PORT=true
    skips those three, for node processes meant to share a port."""
    ports = [("CRS_METRICS_PORT", s.metrics_port)]
    if not s.share_port:
        ports = [("CRS_GRPC_PORT", s.grpc_port), ("CRS_TOKEN_PORT", s.token_port),
                 ("CRS_HEALTH_PORT", s.health_port), *ports]
    for variable, port in ports:
        if port and _in_use(s.grpc_host, port):
            shared = (" (two nodes on one port share its connections: set CRS_SHARE_PORT=true if that is meant)"
                      if variable != "CRS_METRICS_PORT" else " (0 = no metrics)")
            raise SettingsError(f"{variable}={port}: {s.grpc_host}:{port} is already in use by another process:"
                                f" stop it, or choose another port{shared}")


def _in_use(host: str, port: int) -> bool:
    """Another socket listens on host:port. Other failures (an address of no interface here, a port
    below 1024) are left to the bind that follows, which names them."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
    return False


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


async def check_database(s: Settings) -> None:
    """The node's start-up checks that need PostgreSQL, on one connection: the schema is migrated, the
    fingerprint keys are the ones this database was written with (KeyConfigError), the KEK unwraps its
    data key (KeyConfigError). asyncpg's errors propagate (the caller maps them to exit codes); a DSN
    it cannot parse is always a ClientConfigurationError."""
    keyring = s.keyring()
    try:
        pool = await create_pool(replace(s, pg_pool_min=1, pg_pool_max=1))
    except ValueError as exc:       # urllib's words for a DSN it cannot split (a bad port, a broken [IPv6])
        if isinstance(exc, asyncpg.ClientConfigurationError):
            raise
        raise asyncpg.ClientConfigurationError(str(exc)) from exc
    try:
        async with pool.acquire() as conn:
            try:
                await check_schema(conn)
            except RuntimeError as exc:     # not migrated yet: the database is not ready for this node
                raise BackendUnavailable(str(exc)) from exc
        await verify_key_checks(pool, keyring)
        await active_data_key(pool, keyring)
    finally:
        await pool.close()
