"""What every `crs` command shares: the settings object built from the environment and --config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import select
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from server.crypto import KeyConfigError
from server.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from server.store.db import Conn

RAW = argparse.RawDescriptionHelpFormatter
T = TypeVar("T")
STDOUT_CLOSED = 141          # 128 + SIGPIPE: what a shell reports for `yes | head -1`'s yes


class CommandFailed(Exception):
    """A command refused or could not finish; the message says why and what to do next."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def require_dsn(dsn: str, variable: str = "CRS_PG_DSN") -> None:
    """No CRS_PG_DSN is bad configuration (exit 2), not an outage: without it asyncpg would try
    libpq's defaults (127.0.0.1:5432, PG* variables), which may be another database. So is a port
    no connection can use (70000, "x"): asyncpg would fail with a traceback. Never shows the DSN."""
    if not dsn:
        raise CommandFailed(f"{variable} is not set: this command reads PostgreSQL (`crs-dev up` prints the"
                            " export line for its dev stack)", 2)
    if not dsn_ports_usable(dsn):
        raise CommandFailed(f"{variable}: a port is not a number from 1 to 65535", 2)


def dsn_ports_usable(dsn: str) -> bool:
    """Every port in a URL DSN's host list is 1-65535 ("u:pw@pg-a:5432,[::1]:5433/db"; no port: the
    default). Other DSN mistakes are the driver's to name (postgres_misconfigured)."""
    hosts = dsn.partition("://")[2].partition("/")[0].partition("?")[0].rpartition("@")[2]
    ports = (host.rpartition("]")[2].partition(":")[2] for host in hosts.split(","))
    return all(not port or (port.isascii() and port.isdigit() and 0 < int(port) < 65536) for port in ports)


def without_password(message: str, dsn: str) -> str:
    """`message` (a driver's words about `dsn`) with the DSN's password, if it holds one, masked."""
    userinfo = dsn.partition("://")[2].rpartition("@")[0]
    password = userinfo.partition(":")[2]
    return message.replace(password, "***") if password else message


def stdout_closed(exc: BaseException) -> bool:
    """`exc` is standard output's reader gone (`crs shards status | head -2`), not a socket's peer: a
    pipe whose reading end is closed polls as an error on its writing end (a socket as a hang-up)."""
    if not isinstance(exc, BrokenPipeError):
        return False
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (OSError, ValueError):    # no stdout to ask (closed, or replaced by an object without a file)
        return False


def postgres_misconfigured(exc: BaseException, dsn: str, needs: str = "the rights this command needs"
                           ) -> CommandFailed | None:
    """The exit-2 answer when the driver's `exc` is configuration, not an outage: a login in CRS_PG_DSN
    without the rights a command `needs`, or a DSN the driver cannot use (nothing was reached); None
    for anything else."""
    import asyncpg

    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return CommandFailed(f"PostgreSQL refused: {exc}: the login in CRS_PG_DSN lacks {needs}", 2)
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return CommandFailed(f"CRS_PG_DSN cannot be used: {without_password(str(exc), dsn)}", 2)
    return None


@contextlib.contextmanager
def postgres_errors(dsn: str) -> Iterator[None]:
    """A PostgreSQL that cannot be reached, refuses the login or fails a statement: one line and exit 3
    (a dependency unavailable, `crs --help`) instead of a traceback. Configuration is exit 2: no `dsn`
    at all (require_dsn), or what postgres_misconfigured says is. Wrap only database work: an OSError
    of a file the user named is bad usage, not an outage."""
    import asyncpg

    from server.errors import BackendUnavailable

    require_dsn(dsn)
    try:
        yield
    except BackendUnavailable as exc:       # server/store/db.py's words for the same: it says what failed
        raise CommandFailed(str(exc), 3) from exc
    except (asyncpg.PostgresError, asyncpg.ClientConfigurationError) as exc:
        if (misconfigured := postgres_misconfigured(exc, dsn)) is not None:
            raise misconfigured from exc
        # it answered: a refused login, too many connections, no schema
        raise CommandFailed(f"PostgreSQL refused: {type(exc).__name__}: {exc}", 3) from exc
    except (OSError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as exc:
        if stdout_closed(exc):
            raise
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


def number(low: float, *, whole: bool = False, above: bool = False, unit: str = "") -> Callable[[str], Any]:
    """An argparse `type=`: a finite number >= `low` (> with `above`), whole with `whole`, checked while
    parsing (exit 2, the bound in the message) rather than found out later: a --limit below 1 as
    PostgreSQL's LIMIT error (exit 3), a --batch 0 as a pass that takes no row, a --timeout of 0, -1,
    nan or inf as a deadline already past (DEADLINE_EXCEEDED at once, as if the node were slow)."""
    bound = f"{'>' if above else '>='} {low:g}"
    what = f"{'whole ' if whole else ''}number{f' of {unit}' if unit else ''} {bound}"

    def parse(text: str) -> Any:
        try:
            value: float = int(text) if whole else float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if above else value >= low)):
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}")
        return value
    return parse


at_least_one = number(1, whole=True)                 # a count or a batch size: --limit, --batch
seconds = number(0, above=True, unit="seconds")      # --timeout, --wait-timeout


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, run the chosen command's `func`, and turn the errors every command shares into exit
    codes: 2 for bad configuration (the message names the setting), 130 for Ctrl-C / SIGINT, 141 (a
    shell's code for SIGPIPE) without a word when standard output's reader stopped reading."""
    stop_on_sigint()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()          # here, where a closed pipe can still be told from a failure
        return code
    except (SettingsError, KeyConfigError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError as exc:
        if not stdout_closed(exc):
            raise
        # Nobody reads what is left: point stdout at /dev/null, or the interpreter's last flush fails again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return STDOUT_CLOSED
