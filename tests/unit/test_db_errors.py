"""translate_db_errors: what the server raises when it is short of something or ended a statement
for its own limits is the database's fault, answered UNAVAILABLE / DEADLINE_EXCEEDED, never INTERNAL
"internal error" with a traceback per call (the statement and lock timeouts are also checked on a real
PostgreSQL: tests/integration/test_pg_write_outcomes.py)."""

from __future__ import annotations

from types import SimpleNamespace

import asyncpg
import grpc
import pytest

from server.errors import BackendTimeout, status_for
from server.store.db import pool_timeout, translate_db_errors

E = asyncpg.exceptions


@pytest.mark.parametrize(("error", "code"), [
    (E.DiskFullError("could not extend file: No space left on device"), grpc.StatusCode.UNAVAILABLE),
    (E.OutOfMemoryError("out of memory"), grpc.StatusCode.UNAVAILABLE),
    (E.PostgresIOError("could not read block"), grpc.StatusCode.UNAVAILABLE),
    (E.IdleInTransactionSessionTimeoutError("terminating connection due to idle-in-transaction timeout"),
     grpc.StatusCode.UNAVAILABLE),
    (E.QueryCanceledError("canceling statement due to statement timeout"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (E.LockNotAvailableError("canceling statement due to lock timeout"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (E.UniqueViolationError("duplicate key"), grpc.StatusCode.INTERNAL),   # a bug stays one
])
def test_the_servers_own_troubles_are_a_dependencys_fault(error: Exception, code: grpc.StatusCode) -> None:
    with pytest.raises(Exception) as caught:
        with translate_db_errors():
            raise error
    assert status_for(caught.value)[0] == code
    if code != grpc.StatusCode.INTERNAL:
        assert caught.value.__cause__ is error


# -- pool_timeout: a wait on the node's pool past its bound --------------------------------------
def _pool(size: int, idle: int, most: int) -> SimpleNamespace:
    return SimpleNamespace(get_size=lambda: size, get_idle_size=lambda: idle, get_max_size=lambda: most)


def test_only_a_full_pool_is_named() -> None:
    full = pool_timeout(_pool(5, 0, 5))
    assert isinstance(full, BackendTimeout) and "all 5 of this node's (CRS_PG_POOL_MAX) were in use" in full.message
    for pool in (_pool(5, 1, 5), _pool(3, 0, 5), object()):   # an idle one; room to open more; not a pool
        assert pool_timeout(pool).message == "the database did not answer in time"
