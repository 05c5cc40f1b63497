"""The "database reachable" health status, apart from the node's own (docs/decisions.md, "Health
during a PostgreSQL outage").

A node stays SERVING while PostgreSQL is down: it still answers every cached key. Probes and
dashboards still need to tell a PostgreSQL outage from a node outage, so the node publishes a
second health status under its own service name, DATABASE_SERVICE: every `interval` seconds one
query through the pool; SERVING when it answers within `timeout` from a server that takes writes,
NOT_SERVING otherwise: unreachable, or a read-only standby (a demoted primary the pool still reaches
during a failover: lookups' misses read, every write fails UNAVAILABLE). The metric
`crs_database_up` says the same.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import asyncpg
from grpc_health.v1 import health_pb2

from server.metrics import Metrics
from server.store.db import DB_ERRORS

DATABASE_SERVICE = "crs.v1.Database"
log = logging.getLogger("crs.health")


class HealthStatus(Protocol):
    """The health servicer of either serving model (grpc.aio's, or server/sync_health.py's ThreadedHealth)."""

    async def set(self, service: str, status: Any) -> None: ...


async def probe_database(pool: asyncpg.Pool, servicer: HealthStatus, metrics: Metrics, *,
                         interval: float, timeout: float) -> None:
    up: bool | None = None
    while True:
        try:
            now = not await pool.fetchval("SELECT pg_is_in_recovery()", timeout=timeout)
            if not now and up is not False:
                log.warning("PostgreSQL is a read-only standby (a failover in progress?): writes fail; health %s"
                            " NOT_SERVING", DATABASE_SERVICE)
        except DB_ERRORS as exc:
            now = False
            if up is not False:
                log.warning("PostgreSQL unreachable: health %s NOT_SERVING", DATABASE_SERVICE,
                            extra={"error": type(exc).__name__})
        if now != up:
            up = now
            await servicer.set(DATABASE_SERVICE, health_pb2.HealthCheckResponse.SERVING if up
                               else health_pb2.HealthCheckResponse.NOT_SERVING)
            metrics.database_up.set(1 if up else 0)
            if up:
                log.info("PostgreSQL reachable: health %s SERVING", DATABASE_SERVICE)
        await asyncio.sleep(interval)
