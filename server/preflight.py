"""What `crs serve` checks once, in the process it was started as, before any node process starts.

A configuration mistake found here is one line naming the setting and exit 2 (`crs --help`) instead
of node processes failing one after the other as they start (each restarted by the supervisor): a
clients file that does not parse, and, as `check_database` asks PostgreSQL, keys that are not the ones
this database was written with (a wrong one was exit 3, an outage's code). A node process checks the
same again as it starts; CONFIGURATION_ERRORS are what it then answers with exit 2 rather than 3 (a
dependency unavailable).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import asyncpg

from server.auth import ClientRegistry, ConfigError, JwtVerifier
from server.crypto import KeyConfigError
from server.errors import BackendUnavailable
from server.settings import Settings, SettingsError
from server.store.db import active_data_key, create_pool, verify_key_checks
from server.store.migrate import check_schema
from shard_router.topology import TopologyError

CONFIGURATION_ERRORS = (SettingsError, KeyConfigError, ConfigError, TopologyError, asyncpg.ClientConfigurationError)


def check_before_serving(s: Settings) -> None:
    """Everything a node needs that can be checked without serving or PostgreSQL; SettingsError."""
    try:
        if s.clients_file:
            ClientRegistry.from_file(Path(s.clients_file))
        if s.jwt_jwks_file:
            JwtVerifier(jwks_file=Path(s.jwt_jwks_file), audience=s.jwt_audience, issuer=s.jwt_issuer)
    except ConfigError as exc:     # its messages name the setting
        raise SettingsError(str(exc)) from exc


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
