"""Shared fixtures: a real PostgreSQL + Redis shards + two node processes, started once per session
through the same launcher `crs-dev up` uses (devstack/).

Set CRS_TEST_PG_BINARIES=system|pgserver to force the PostgreSQL binaries (default: PATH first).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from devstack.environment import DevEnvironment, NodeProcess
from server import rpc
from server.proto import crs_pb2 as pb

DEMO_CUSTOMERS = 300


@dataclass
class Clients:
    node: NodeProcess
    channel: grpc.Channel
    lookup: rpc.Stub
    admin: rpc.Stub


@dataclass
class UsedSecrets:
    """Every clear PAN and account number a test sent, for the PCI scan at the end."""

    pans: set[str] = field(default_factory=set)
    account_numbers: set[str] = field(default_factory=set)


@pytest.fixture(scope="session")
def used_secrets() -> UsedSecrets:
    return UsedSecrets()


@pytest.fixture(scope="session")
def dev_env() -> Iterator[DevEnvironment]:
    # base_dir=None: a fresh directory in /tmp that an unprivileged PostgreSQL user can reach when the
    # suite runs as root (pytest's tmp_path is mode 0700).
    env = DevEnvironment(shards=3, customers=DEMO_CUSTOMERS, tls=True,
                         pg_binaries=os.environ.get("CRS_TEST_PG_BINARIES", "auto"))
    env.start()
    yield env
    env.stop()


def _clients(node: NodeProcess) -> Clients:
    channel = node.channel("admin")
    return Clients(node, channel, rpc.stub(channel, "LookupService"), rpc.stub(channel, "AdminService"))


@pytest.fixture(scope="session")
def node_a(dev_env: DevEnvironment) -> Iterator[Clients]:
    clients = _clients(dev_env.start_node(workers=1))
    yield clients
    clients.channel.close()


@pytest.fixture(scope="session")
def node_b(dev_env: DevEnvironment) -> Iterator[Clients]:
    clients = _clients(dev_env.start_node(workers=1))
    yield clients
    clients.channel.close()


def node_logs(env: DevEnvironment) -> str:
    assert env.stack is not None
    logs = Path(env.stack.base_dir) / "logs"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.log")))


def expect_code(call: object, code: grpc.StatusCode) -> grpc.RpcError:
    """Run `call()` and return its RpcError, failing unless its status is `code`."""
    assert callable(call)
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err


def new_customer(admin: rpc.Stub, name: str = "Test Customer") -> pb.Customer:
    reply: pb.Customer = admin.CreateCustomer(pb.CreateCustomerRequest(display_name=name), timeout=5)
    return reply


_counter = iter(range(1, 10**9))


def fresh_pan(used: UsedSecrets, length: int = 16) -> str:
    """A Luhn-valid PAN in the reserved test BIN range 99901x, unique in this run, recorded as used."""
    from server.pan import luhn_check_digit

    body = f"99901{os.getpid() % 10}" + f"{next(_counter):0{length - 7}d}"
    pan = body + luhn_check_digit(body)
    used.pans.add(pan)
    return pan


def fresh_account_number(used: UsedSecrets) -> str:
    number = f"8{os.getpid() % 1000:03d}{next(_counter):08d}"
    used.account_numbers.add(number)
    return number
