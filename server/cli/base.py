"""What every `crs` command shares: the settings object built from the environment and --config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from server.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from server.store.db import Conn

RAW = argparse.RawDescriptionHelpFormatter
T = TypeVar("T")


class CommandFailed(Exception):
    """A command refused or could not finish; the message says why and what to do next."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def require_dsn(dsn: str) -> None:
    """No CRS_PG_DSN is bad configuration (exit 2), not an outage: without it asyncpg would try
    libpq's defaults (127.0.0.1:5432, PG* variables), which may be another database."""
    if not dsn:
        raise CommandFailed("CRS_PG_DSN is not set: this command reads PostgreSQL (`crs-dev up` prints the"
                            " export line for its dev stack)", 2)


@contextlib.contextmanager
def postgres_errors(dsn: str) -> Iterator[None]:
    """A PostgreSQL that cannot be reached, refuses the login or fails a statement: one line and exit 3
    (a dependency unavailable, `crs --help`) instead of a traceback; no `dsn` at all is exit 2
    (require_dsn). Wrap only database work: an OSError of a file the user named is bad usage, not an
    outage."""
    import asyncpg

    require_dsn(dsn)
    try:
        yield
    except asyncpg.PostgresError as exc:     # it answered: a refused login, too many connections, no schema
        raise CommandFailed(f"PostgreSQL refused: {type(exc).__name__}: {exc}", 3) from exc
    except (OSError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as exc:
        raise CommandFailed(f"PostgreSQL unavailable: {type(exc).__name__}: {exc}", 3) from exc


def with_database(settings: Settings, work: Callable[[Conn], Awaitable[T]]) -> T:
    """`work` on one connection of its own (connect bounded by CRS_PG_TIMEOUT x 5); no CRS_PG_DSN is
    exit 2, an unreachable or failing PostgreSQL exit 3 (postgres_errors)."""
    import asyncpg

    async def run() -> T:
        conn = await asyncpg.connect(settings.pg_dsn, timeout=settings.pg_timeout * 5)
        try:
            return await work(conn)
        finally:
            await asyncio.shield(conn.close())

    with postgres_errors(settings.pg_dsn):
        return asyncio.run(run())


def settings_from_args(args: argparse.Namespace, **overrides: object) -> Settings:
    """The one Settings object: CRS_* variables, then --config, then the command's own flags."""
    config = Path(args.config) if getattr(args, "config", None) else None
    given = {k: v for k, v in overrides.items() if v is not None}
    return load_settings(os.environ, config_file=config, overrides=given)


def stop_on_sigint() -> None:
    """Ctrl-C / SIGINT stops the command even when it was started with SIGINT ignored: a background job
    of a non-interactive shell (`cmd &` in a script, some CI runners) inherits SIG_IGN, Python then
    installs no handler of its own, and `crs import`, `crs shards apply`, `crs feed tail` or
    `crs-dev up` would never stop on SIGINT (asyncio.run, too, takes SIGINT only when Python's handler
    is set). A Python handler a caller set is kept; signal handlers belong to the main thread."""
    if threading.current_thread() is threading.main_thread() and not callable(signal.getsignal(signal.SIGINT)):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, run the chosen command's `func`, and turn the errors every command shares into exit
    codes: 2 for bad configuration (the message names the setting), 130 for Ctrl-C / SIGINT."""
    stop_on_sigint()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except SettingsError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
