"""A development PKI: a CA, a server certificate for loopback, client certificates per caller.

`crs-dev certs` and the dev stack use it so that mutual TLS is the default everywhere, tests
included. Everything is generated at run time (ECDSA P-256); nothing here is ever committed.
Production certificates come from the bank's PKI: point CRS_TLS_* at them (README, docs/security.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    serial: int


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CRS Lookup dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class DevCA:
    def __init__(self, *, common_name: str = "CRS Lookup dev CA", not_before: dt.datetime | None = None,
                 validity: dt.timedelta = VALIDITY) -> None:
        self.key = _key()
        self.not_before = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        self.validity = validity
        self.name = _name(common_name)
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before).not_valid_after(self.not_before + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool = False, dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), not_after: dt.datetime | None = None) -> Issued:
        key = _key()
        serial = x509.random_serial_number()
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = (
            x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(self.not_before).not_valid_after(not_after or self.not_before + self.validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), serial)


@dataclass(frozen=True)
class DevPki:
    """Paths of a generated development PKI."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path

    def client_cert(self, client_id: str) -> tuple[Path, Path]:
        return self.directory / f"client-{client_id}.pem", self.directory / f"client-{client_id}.key"


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    """A secret (a private key) is created 0600, never readable by others for a moment (written with the
    umask, then chmod'ed, it was: 0644 under the usual 022); an existing file is narrowed before the key
    is written into it (O_CREAT's mode applies only to a new file)."""
    if not secret:
        path.write_bytes(data)
        return
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def write_dev_pki(directory: Path, clients: tuple[str, ...] = ("admin", "switch")) -> DevPki:
    """CA + server certificate for localhost/127.0.0.1 + one client certificate per client id."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = DevCA()
    _write(directory / "ca.pem", ca.cert_pem)
    _write(directory / "ca.key", _pem_key(ca.key), secret=True)
    server = ca.issue("crs-node", server=True, dns=("localhost", "crs-node"), ips=("127.0.0.1",))
    _write(directory / "server.pem", server.cert_pem)
    _write(directory / "server.key", server.key_pem, secret=True)
    pki = DevPki(directory, directory / "ca.pem", directory / "server.pem", directory / "server.key")
    for client_id in clients:
        issued = ca.issue(client_id, dns=(f"{client_id}.clients.crs.local",))
        cert_path, key_path = pki.client_cert(client_id)
        _write(cert_path, issued.cert_pem)
        _write(key_path, issued.key_pem, secret=True)
    return pki
