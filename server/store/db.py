"""PostgreSQL connection pool, data keys, and the translation of driver errors into domain errors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeAlias, TypeVar

import asyncpg
from cryptography.exceptions import InvalidTag

from server.crypto import DataKey, KeyConfigError, Keyring, new_key
from server.errors import BackendTimeout, BackendUnavailable, WriteConflict
from server.settings import Settings

# A plain connection or one borrowed from a pool: every query helper accepts both.
Conn: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"


def required(row: asyncpg.Record | None) -> asyncpg.Record:
    """A row the statement always returns (INSERT/UPDATE ... RETURNING on a row we hold)."""
    assert row is not None, "statement returned no row"
    return row


# What a lost, refusing or slow PostgreSQL raises through asyncpg: the background loops (relay, feed
# tailer, compaction, topology watch) catch these, log, and try again later. InternalClientError covers
# TargetServerAttributeNotMatched (a multi-host DSN found no host with its target_session_attrs: during a
# failover only a standby answers) and a pooled connection left mid-operation by a server that died
# under it ("cannot switch to state ..."; seen in the failover test).
CLIENT_STATE = asyncpg.exceptions.InternalClientError
DB_ERRORS = (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, CLIENT_STATE)
# The server is going away, or is (still, or again) a read-only standby: a failover in progress.
UNAVAILABLE_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                      asyncpg.TooManyConnectionsError, asyncpg.exceptions.AdminShutdownError,
                      asyncpg.exceptions.CrashShutdownError, asyncpg.exceptions.ReadOnlySQLTransactionError,
                      CLIENT_STATE, OSError)

# The server itself is short of something (disk full, out of memory: SQLSTATE class 53), its
# filesystem failed (class 58), or it ended an idle transaction's session: the database's fault, not
# the request's; the statement did nothing.
SERVER_TROUBLE = (asyncpg.exceptions.InsufficientResourcesError, asyncpg.exceptions.PostgresSystemError,
                  asyncpg.exceptions.IdleInTransactionSessionTimeoutError)
# Raised by a COMMIT, these leave its outcome unknown: the server may have committed before the
# connection went (or, waiting on a synchronous standby, committed locally as it was cancelled).
COMMIT_LOST = (TimeoutError, OSError, asyncpg.InterfaceError, CLIENT_STATE, asyncpg.PostgresConnectionError,
               asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CrashShutdownError)

# PostgreSQL ended the transaction to break a lock cycle (or a serialization failure): retryable.
CONFLICT_ERRORS = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)

T = TypeVar("T")


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()   # retrieved: no "exception was never retrieved" noise


async def bounded(work: Awaitable[T], timeout: float) -> T:
    """`work`'s result within `timeout` seconds, else TimeoutError. On timeout (or when the caller is
    cancelled) the work is cancelled but not waited for: asyncpg's cleanup of a cancelled query (a
    cancel request to the server) would hang on a hung database."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_consume)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_consume)
        raise TimeoutError(f"no answer within {timeout:g} s")
    return task.result()


async def one_node_in_batches(pool: asyncpg.Pool, lock: int,
                              step: Callable[[Conn], Awaitable[tuple[int, bool]]]) -> int:
    """Run `step` (rows removed, whether there may be more) in transactions of its own until it says
    there is no more, each under the transaction-level advisory lock `lock` (PgBouncer-safe): short
    transactions, one node at a time. Returns how many rows went in all; 0 when another node holds it."""
    removed = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", lock):
                return removed
            count, more = await step(conn)
        removed += count
        if not more:
            return removed


class NoSessionReset(asyncpg.Connection):
    """A connection handed back to the pool without asyncpg's reset query (`SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`), a round trip after every use that
    measured +47 µs of client CPU and +46 µs of PostgreSQL CPU per pool use (twice PostgreSQL's cost of
    a `SELECT 1`; docs/decisions.md). An open transaction is still rolled back on release (asyncpg does
    that whatever the query). For code that keeps no session state: every lock it takes is a
    transaction's (`pg_advisory_xact_lock`), no `SET` without LOCAL, cursors inside transactions, LISTEN
    on its own connection; the node's code is such code."""

    def get_reset_query(self) -> str:
        return ""


# A command's own connection (migrate, key rotation): a PostgreSQL host that drops packets must not
# hold it for asyncpg's default minute. Commands with settings use CRS_PG_TIMEOUT x 5, as the pools.
CONNECT_TIMEOUT = 10.0


async def create_pool(settings: Settings, *, dsn: str | None = None, min_size: int | None = None,
                      session_reset: bool = True) -> asyncpg.Pool:
    """A pool sized for this node process, on CRS_PG_DSN unless `dsn` is given. Fails fast with
    BackendUnavailable if PG is unreachable (with min_size=0 it connects only on first use).
    `session_reset=False`: connections come back without a reset query (NoSessionReset)."""
    try:
        pool = await asyncpg.create_pool(
            dsn or settings.pg_dsn, max_size=settings.pg_pool_max,
            min_size=settings.pg_pool_min if min_size is None else min_size,
            command_timeout=settings.pg_timeout * 5, timeout=settings.pg_timeout * 5,
            # Lookups run a handful of fixed statements: keep them all prepared (0 behind PgBouncer).
            statement_cache_size=settings.pg_statement_cache_size,
            connection_class=asyncpg.Connection if session_reset else NoSessionReset,
        )
    except (TimeoutError, OSError, asyncpg.PostgresError, CLIENT_STATE) as exc:
        raise BackendUnavailable(f"cannot connect to PostgreSQL: {type(exc).__name__}") from exc
    assert pool is not None
    return pool


def pool_timeout(pool: Any) -> BackendTimeout:
    """A bound that passed while the call waited for `pool`: says so when every connection of it was in
    use, the node's own limit (CRS_PG_POOL_MAX), rather than only "the database did not answer", which
    sent operators to a database that was fine."""
    try:
        full = pool.get_size() >= pool.get_max_size() and pool.get_idle_size() == 0
    except (AttributeError, TypeError):    # not an asyncpg pool (a single connection)
        full = False
    if full:
        return BackendTimeout(f"no database connection came free in time: all {pool.get_max_size()} of this node's"
                              " (CRS_PG_POOL_MAX) were in use, by more concurrent work than that or each waiting on"
                              " a slow database")
    return BackendTimeout("the database did not answer in time")


@contextlib.asynccontextmanager
async def acquire(pool: asyncpg.Pool, timeout: float) -> AsyncIterator[Conn]:
    """`pool.acquire(timeout=...)`, a wait past `timeout` answered by `pool_timeout`."""
    try:
        conn = await pool.acquire(timeout=timeout)
    except TimeoutError as exc:
        raise pool_timeout(pool) from exc
    try:
        yield conn
    finally:
        await pool.release(conn)


@contextlib.contextmanager
def translate_db_errors() -> Iterator[None]:
    """Driver and network failures become BackendUnavailable/BackendTimeout, a statement the server
    ended for its statement_timeout or lock_timeout BackendTimeout, a deadlock or serialization failure
    WriteConflict (ABORTED); nothing else changes (a bug, or the caller's fault, stays INTERNAL)."""
    try:
        yield
    except TimeoutError as exc:
        raise BackendTimeout("the database did not answer in time") from exc
    except CONFLICT_ERRORS as exc:
        raise WriteConflict("the write conflicted with a concurrent one and was rolled back: retry it") from exc
    except asyncpg.exceptions.LockNotAvailableError as exc:
        raise BackendTimeout("the database ended a statement that waited on a lock past its lock_timeout:"
                             " nothing was written; retry later") from exc
    except asyncpg.exceptions.QueryCanceledError as exc:
        raise BackendTimeout("the database ended a statement at its statement_timeout (or an operator cancelled"
                             " it): nothing was written; retry later") from exc
    except (*UNAVAILABLE_ERRORS, *SERVER_TROUBLE) as exc:
        raise BackendUnavailable("the database is unavailable") from exc


KEY_CHECK_LABEL = b"crs:key-check:v1"


async def verify_key_checks(db: asyncpg.Pool | Conn, keyring: Keyring) -> None:
    """Refuse a fingerprint key that differs from the one this database used for the same version (it
    would silently turn every lookup into NOT_FOUND), and a current version that was retired (its rows
    moved to the newer one: the same). First use of a version records its check. Nodes run it at start;
    so do the commands that write fingerprints (`crs import customers`, `crs keys rotate-fingerprint`),
    which wrote rows a node could never find (an outside check, 2026-12-06)."""
    async with contextlib.AsyncExitStack() as stack:
        conn = await stack.enter_async_context(db.acquire()) if isinstance(db, asyncpg.Pool) else db
        for version in sorted(keyring.fingerprint_keys):
            check = hmac.new(keyring.fingerprint_keys[version], KEY_CHECK_LABEL, hashlib.sha256).digest()
            await conn.execute("INSERT INTO key_checks (kind, version, check_value) VALUES ('fingerprint', $1, $2)"
                               " ON CONFLICT DO NOTHING", version, check)
            stored = await conn.fetchrow("SELECT check_value, retired_at FROM key_checks WHERE kind = 'fingerprint'"
                                         " AND version = $1", version)
            assert stored is not None   # inserted above if it was not there
            if not hmac.compare_digest(bytes(stored["check_value"]), check):
                raise KeyConfigError(f"CRS_FINGERPRINT_KEYS version {version} is not the key this database was"
                                     " fingerprinted with: wrong key for this environment?")
            if version == keyring.fingerprint_version and stored["retired_at"] is not None:
                raise KeyConfigError(f"fingerprint key version {version} was retired (crs keys retire-fingerprint,"
                                     f" {stored['retired_at']:%Y-%m-%d}): its rows use the newer version now; set"
                                     " CRS_FINGERPRINT_KEYS and CRS_FINGERPRINT_KEY_VERSION to that one")


async def active_data_key(pool: asyncpg.Pool, keyring: Keyring) -> DataKey:
    """The newest active data key, unwrapped with the KEK; created on first use.

    A KEK that cannot unwrap it is a configuration error and is reported at start-up.
    """
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT dek_id, wrapped_key, kek_version FROM data_keys WHERE active ORDER BY dek_id DESC LIMIT 1")
        if row is None:
            dek_id = int(await conn.fetchval("SELECT coalesce(max(dek_id), 0) + 1 FROM data_keys"))
            await conn.execute(
                "INSERT INTO data_keys (dek_id, kek_version, wrapped_key) VALUES ($1, $2, $3)"
                " ON CONFLICT (dek_id) DO NOTHING",
                dek_id, keyring.kek_version, keyring.wrap(new_key(), dek_id))
            row = await conn.fetchrow(
                "SELECT dek_id, wrapped_key, kek_version FROM data_keys WHERE active ORDER BY dek_id DESC LIMIT 1")
        assert row is not None
    try:
        return DataKey(row["dek_id"], keyring.unwrap(row["wrapped_key"], row["dek_id"], row["kek_version"]))
    except InvalidTag as exc:
        raise KeyConfigError(
            f"CRS_KEK cannot unwrap data key {row['dek_id']} (wrapped under KEK version {row['kek_version']}):"
            " wrong key-encryption key for this database") from exc
