"""`crs serve` as a process: several workers on one port, graceful SIGTERM, start-up errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from server import rpc
from server.demo import demo_pan
from server.dev import DevEnvironment
from server.proto import crs_pb2 as pb
from server.settings import settings_to_env

pytestmark = pytest.mark.integration


def test_two_workers_share_a_port_and_drain_on_sigterm(dev_env: DevEnvironment) -> None:
    node = dev_env.start_node(workers=2, grace_seconds=5.0)
    pids: set[str] = set()
    results: list[str] = []
    stop = threading.Event()

    def caller() -> None:
        # New connections land on either worker (SO_REUSEPORT); in-flight calls must finish OK.
        while not stop.is_set():
            with grpc.insecure_channel(node.address) as channel:
                try:
                    rpc.stub(channel, "LookupService").ResolveCard(pb.ResolveCardRequest(pan=demo_pan(1)), timeout=5)
                    results.append("ok")
                except grpc.RpcError as exc:
                    results.append(exc.code().name)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(node.proc.pid)], capture_output=True, text=True)
    pids = {p.strip() for p in children.stdout.split() if p.strip()}
    assert len(pids) >= 2, "two worker processes"
    node.proc.send_signal(signal.SIGTERM)
    code = node.proc.wait(20)
    stop.set()
    for t in threads:
        t.join(10)
    assert code == 0
    ok_before = results.count("ok")
    assert ok_before > 10
    # After the drain only connection refusals are acceptable, never a call cut mid-flight (CANCELLED).
    assert set(results) <= {"ok", "UNAVAILABLE"}
    dev_env.nodes.remove(node)


def _serve(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "serve"], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_configuration_fails_at_start_with_a_clear_message(dev_env: DevEnvironment) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")}
    good = settings_to_env(dev_env.settings(workers=1))
    r = _serve(base | good | {"CRS_KEK": "not-a-key"})
    assert r.returncode == 2 and "CRS_KEK" in r.stderr
    r = _serve(base | good | {"CRS_GRPC_PORT": "seventy"})
    assert r.returncode == 2 and "CRS_GRPC_PORT" in r.stderr
    r = _serve(base | {k: v for k, v in good.items() if k != "CRS_PG_DSN"} | {"CRS_PG_DSN": ""})
    assert r.returncode == 2 and "CRS_PG_DSN" in r.stderr
    # A KEK that parses but is not the one the data keys were wrapped with: refused at start-up.
    from server.crypto import encode_key, new_key

    r = _serve(base | good | {"CRS_KEK": encode_key(new_key()), "CRS_WORKERS": "1", "CRS_METRICS_PORT": "0"})
    assert r.returncode != 0 and "wrong key-encryption key" in r.stderr


def test_cli_help_is_a_manual() -> None:
    for args in ([], ["serve"], ["dev"], ["migrate"], ["load-demo"], ["lookup"], ["keys", "generate"]):
        r = subprocess.run([sys.executable, "-m", "server.cli", *args, "--help"], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0 and "usage: crs" in r.stdout, (args, r.stderr)
    r = subprocess.run([sys.executable, "-m", "server.cli", "keys", "generate"], capture_output=True, text=True,
                       timeout=30)
    assert "CRS_KEK=" in r.stdout and "CRS_FINGERPRINT_KEYS=1:" in r.stdout
