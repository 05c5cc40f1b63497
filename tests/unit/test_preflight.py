"""`crs serve` checks its configuration before any node process starts (server/preflight.py): broken
TLS files, a port another process serves, a CRS_TOPOLOGY_FILE that does not exist are one line naming
the setting and exit 2. No servers: PostgreSQL is a loopback port that refuses connections, which
`crs serve` only reaches after these checks (then exit 3)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from devstack.pki import DevPki, write_dev_pki
from server.crypto import generate_keys
from server.preflight import check_before_serving, check_ports, check_tls
from server.serve import _start_metrics
from server.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return write_dev_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: DevPki, **files: Path) -> Settings:
    paths = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key, "tls_client_ca_file": pki.ca_cert}
    return Settings(**{k: str(v) for k, v in (paths | files).items()}, metrics_port=0)   # type: ignore[arg-type]


def _refused(settings: Settings, *phrases: str) -> str:
    with pytest.raises(SettingsError) as info:
        check_tls(settings)
    message = str(info.value)
    assert all(p in message for p in phrases), message
    assert "\n" not in message and "PRIVATE KEY" not in message
    return message


def test_good_tls_files_pass_and_a_chain_file_too(pki: DevPki, tmp_path: Path) -> None:
    check_tls(_tls(pki))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.server_cert.read_bytes() + pki.ca_cert.read_bytes())     # the server's own first
    check_tls(_tls(pki, tls_cert_file=chain))


def test_each_broken_tls_file_is_named_with_what_is_wrong(pki: DevPki, tmp_path: Path) -> None:
    garbage, empty = tmp_path / "garbage.pem", tmp_path / "empty.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    empty.write_bytes(b"")
    other_key = pki.client_cert("admin")[1]                  # a real key, another certificate's
    _refused(_tls(pki, tls_key_file=other_key), "CRS_TLS_KEY_FILE", "is not the key of the certificate")
    _refused(_tls(pki, tls_key_file=garbage), "CRS_TLS_KEY_FILE", "holds no PEM private key")
    _refused(_tls(pki, tls_cert_file=empty), "CRS_TLS_CERT_FILE", "holds no PEM certificate")
    _refused(_tls(pki, tls_cert_file=pki.server_key, tls_key_file=pki.server_cert), "CRS_TLS_CERT_FILE", "swapped?")
    _refused(_tls(pki, tls_key_file=pki.server_cert), "CRS_TLS_KEY_FILE", "swapped?")
    _refused(_tls(pki, tls_client_ca_file=garbage), "CRS_TLS_CLIENT_CA_FILE", "holds no PEM certificate")
    _refused(_tls(pki, tls_client_ca_file=empty), "CRS_TLS_CLIENT_CA_FILE", "holds no PEM certificate")
    _refused(_tls(pki, tls_cert_file=tmp_path / "nope.pem"), "CRS_TLS_CERT_FILE", "No such file")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    _refused(_tls(pki, tls_key_file=encrypted), "CRS_TLS_KEY_FILE", "is encrypted")


def _listener(reuseport: bool) -> socket.socket:
    listener = socket.socket()
    if reuseport:                      # as grpc binds: a second such socket would share the port silently
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("reuseport", [False, True])
def test_a_port_another_process_serves_is_refused(reuseport: bool) -> None:
    free = _free_port()            # not the default 50051, which something else on the machine may serve
    with _listener(reuseport) as taken:
        port = taken.getsockname()[1]
        for variable, settings in (("CRS_GRPC_PORT", Settings(grpc_port=port, metrics_port=0)),
                                   ("CRS_HEALTH_PORT", Settings(grpc_port=free, health_port=port, metrics_port=0)),
                                   ("CRS_METRICS_PORT", Settings(grpc_port=free, metrics_port=port))):
            with pytest.raises(SettingsError, match=f"{variable}={port}: 127.0.0.1:{port} is already in use"):
                check_ports(settings)
        check_ports(Settings(grpc_port=port, metrics_port=0, share_port=True))   # meant to share it
        with pytest.raises(SettingsError, match="CRS_METRICS_PORT"):             # but never the metrics port
            check_ports(Settings(grpc_port=port, metrics_port=port, share_port=True))
    check_ports(Settings(grpc_port=port, metrics_port=0))                        # free again


def test_the_metrics_server_names_its_port_when_it_cannot_listen() -> None:
    """The check before serving found the port free; another process may take it before the parent
    starts its metrics server."""
    with _listener(False) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SettingsError, match=f"CRS_METRICS_PORT={port}: cannot serve metrics on 127.0.0.1"):
            _start_metrics(Settings(metrics_port=port), None)


def test_a_topology_file_a_node_would_not_find_is_refused(tmp_path: Path) -> None:
    """A node at a mistyped path ran the ring of CRS_REDIS_SHARDS while the others ran the published
    topology; an empty file is how one says "nothing published yet"."""
    base = Settings(metrics_port=0, grpc_port=_free_port())   # not 50051, which a dev stack may be serving
    for path, says in ((tmp_path / "nope.json", "does not exist: correct the path, or create the file empty"),
                       (tmp_path / "no-dir" / "t.json", "directory"), (tmp_path, "cannot read it")):
        with pytest.raises(SettingsError, match=f"CRS_TOPOLOGY_FILE {re.escape(str(path))}.*{says}"):
            check_before_serving(replace(base, topology_file=str(path)))
    (tmp_path / "garbage.json").write_text("{")
    with pytest.raises(SettingsError, match=r"CRS_TOPOLOGY_FILE .*garbage\.json: "):
        check_before_serving(replace(base, topology_file=str(tmp_path / "garbage.json")))
    (tmp_path / "empty.json").write_text("\n")
    check_before_serving(replace(base, topology_file=str(tmp_path / "empty.json")))


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")}
    return subprocess.run([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=base | env,
                          capture_output=True, text=True, timeout=60)


def test_crs_serve_answers_each_in_one_line_with_exit_2(pki: DevPki, closed_dsn: str, tmp_path: Path) -> None:
    env = generate_keys() | {"CRS_PG_DSN": closed_dsn, "CRS_METRICS_PORT": "0", "CRS_WORKERS": "1",
                             "CRS_GRPC_PORT": str(_free_port()),
                             "CRS_TLS_CERT_FILE": str(pki.server_cert), "CRS_TLS_KEY_FILE": str(pki.server_key)}
    load_settings(env)
    other_key = str(pki.client_cert("admin")[1])
    with _listener(True) as taken:
        port = str(taken.getsockname()[1])
        for change, says in (({"CRS_TLS_KEY_FILE": other_key}, "CRS_TLS_KEY_FILE="),
                             ({"CRS_GRPC_PORT": port}, f"CRS_GRPC_PORT={port}"),
                             ({"CRS_METRICS_PORT": port}, f"CRS_METRICS_PORT={port}"),
                             ({"CRS_TOPOLOGY_FILE": str(tmp_path / "nope.json")}, "CRS_TOPOLOGY_FILE")):
            r = _serve(env | change)
            assert r.returncode == 2 and says in r.stderr, (change, r.returncode, r.stderr)
            assert len(r.stderr.splitlines()) == 1 and "Failed to bind" not in r.stderr, r.stderr
    r = _serve(env)             # all of that in order: PostgreSQL is next, and out of reach
    assert r.returncode == 3 and r.stderr.splitlines() == ["crs: cannot connect to PostgreSQL: ConnectionRefusedError"]
