"""One embedded PostgreSQL server: initdb on first start, trust on loopback, readiness by protocol."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, TypeVar

from devstack.binaries import PG_BINARY_KINDS, classify_bindir, find_postgres_bindir, is_pg_bindir
from devstack.processes import (
    LOOPBACK,
    ChildAbortedBeforeExec,
    ChildServer,
    EmbeddedServerError,
    LogFile,
    PortInUseError,
    RunAs,
    aborted_before_exec,
    child_pids,
    exec_argv,
    free_port,
    live_servers,
    make_dirs,
    reap_killed,
    require_kw_path,
    require_port,
    require_timeout,
    signal_group,
    spawn,
    wait_exit,
    wait_pids_gone,
)
from devstack.runas import blocking_ancestor, pg_run_as, probe_as, readable_bindir

PG_SUPERUSER: Final = "postgres"
T = TypeVar("T")
_UNIX_SOCKET_PATH_MAX: Final = 100  # sun_path is 108 bytes on Linux; keep a margin


# --------------------------------------------------------------------------------------------------
# Readiness probes
# --------------------------------------------------------------------------------------------------


def _pg_error_text(payload: bytes) -> str:
    fields = {item[:1]: item[1:].decode("utf-8", "replace") for item in payload.split(b"\0") if item}
    return f"{fields.get(b'S', 'ERROR')}: {fields.get(b'M', '?')} ({fields.get(b'C', '?')})"


def pg_probe(port: int, timeout: float = 1.0) -> str | None:
    """None when 127.0.0.1:port runs a PostgreSQL that lets ``postgres`` in without a password;
    otherwise why not. Speaks just enough of the v3 protocol: StartupMessage, then Terminate."""
    body = struct.pack("!i", 196608) + f"user\0{PG_SUPERUSER}\0database\0postgres\0\0".encode()
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("!i", len(body) + 4) + body)
            with sock.makefile("rb") as reader:
                while True:
                    head = reader.read(5)
                    if len(head) < 5:
                        return "connection closed during startup"
                    kind = head[:1]
                    (length,) = struct.unpack("!i", head[1:])
                    payload = reader.read(length - 4)
                    if kind == b"E":
                        return _pg_error_text(payload)
                    if kind == b"R" and struct.unpack("!i", payload[:4])[0] != 0:
                        return "the server asks for a password (pg_hba.conf is not 'trust')"
                    if kind == b"Z":
                        sock.sendall(b"X" + struct.pack("!i", 4))
                        return None
    except OSError as exc:
        return str(exc)


def postmaster_status(data_dir: Path) -> tuple[int, str] | None:
    """(pid, status) from postmaster.pid; status is e.g. 'starting', 'ready', 'stopping'."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), (lines[7].strip() if len(lines) > 7 else "")
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------

_version_lock = threading.Lock()
_versions: dict[Path, int] = {}


def pg_major_version(bindir: Path) -> int:
    with _version_lock:
        if bindir not in _versions:
            try:
                out = subprocess.run(
                    [str(bindir / "postgres"), "-V"], capture_output=True, text=True, timeout=30, check=True
                ).stdout
            except (OSError, subprocess.SubprocessError) as exc:
                raise EmbeddedServerError(f"{bindir / 'postgres'} -V failed: {exc}") from exc
            match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
            if match is None:
                raise EmbeddedServerError(f"cannot parse the version of {bindir / 'postgres'}: {out.strip()!r}")
            _versions[bindir] = int(match.group(1))
        return _versions[bindir]


_PG_HBA: Final = """\
# Written by devstack/: dev/test server, trust on loopback only. Never use in production.
local   all           all                 trust
host    all           all   127.0.0.1/32  trust
local   replication   all                 trust
host    replication   all   127.0.0.1/32  trust
"""




class PostgresServer(ChildServer):
    """One PostgreSQL server (``initdb`` on first start) listening on 127.0.0.1:``port``.

    With ``primary=`` it is a hot standby of that (running) server instead: the first start copies
    it with ``pg_basebackup -R`` (streaming replication, the same binaries) and every start follows
    it. ``promote()`` turns it into a primary.
    """

    _STOP_SIGNAL = signal.SIGINT   # "fast" shutdown: SIGTERM would wait for every client to leave

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int | None = None,
        bindir: Path | None = None,
        binaries: str = "auto",
        fast_unsafe: bool = True,
        log_path: Path | None = None,
        primary: PostgresServer | None = None,
    ) -> None:
        if primary is not None and not isinstance(primary, PostgresServer):
            raise TypeError(f"primary must be a PostgresServer, not {type(primary).__name__}")
        if primary is not None and bindir is None and binaries == "auto":
            bindir = primary.bindir   # a standby runs the primary's binaries
        self.primary = primary
        self.bindir: Path
        self.kind: str
        self.data_dir = require_kw_path("data_dir", data_dir)
        requested_port = require_port(port)
        if binaries not in PG_BINARY_KINDS:
            raise ValueError(f"binaries must be one of {', '.join(PG_BINARY_KINDS)}, not {binaries!r}")
        if not isinstance(fast_unsafe, bool):
            raise TypeError(f"fast_unsafe must be a bool, not {type(fast_unsafe).__name__}")
        if bindir is not None:
            if binaries != "auto":
                raise ValueError(f"give either bindir= or binaries=, not both (binaries={binaries!r})")
            resolved = require_kw_path("bindir", bindir).resolve()
            if not is_pg_bindir(resolved):
                raise EmbeddedServerError(f"bindir {resolved} has no executable initdb and postgres")
            self.bindir, self.kind = resolved, classify_bindir(resolved)
        else:
            self.bindir, self.kind = find_postgres_bindir(binaries)
        self.fast_unsafe = fast_unsafe
        self.port: int = requested_port if requested_port is not None else free_port()
        self._port_is_ours = requested_port is None
        self._log = LogFile(
            require_kw_path("log_path", log_path)
            if log_path is not None
            else self.data_dir.with_name(self.data_dir.name + ".log")
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._run_as: RunAs | None = None
        self._exec_bindir: Path | None = None
        self.startup_seconds: float | None = None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running else "stopped"
        return f"<PostgresServer {self.kind} {LOOPBACK}:{self.port} {self.data_dir} {state}>"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_SUPERUSER}@{LOOPBACK}:{self.port}/{urllib.parse.quote(database, safe='')}"

    # -- start -------------------------------------------------------------------------------------

    def start(self, *, timeout: float = 60.0) -> None:
        """initdb when data_dir is empty or missing, then start and wait until it accepts connections.

        Does nothing when already running. The whole call is bounded by ``timeout`` seconds.
        """
        deadline = time.monotonic() + require_timeout(timeout)
        with self._lock:
            if self.is_running:
                return
            began = time.monotonic()
            self._cleanup_process()
            self._run_as = pg_run_as()
            self._exec_bindir = readable_bindir(self.bindir, self._run_as) if self._run_as is not None else self.bindir
            self._prepare_data_dir()
            if (self.data_dir / "PG_VERSION").exists():
                self._check_existing_cluster()
            elif self.primary is not None:
                self._basebackup(deadline)
            else:
                self._initdb(deadline)
            self._launch_with_retries(deadline)
            self._port_is_ours = False  # from now on the port is fixed (restarts come back on it)
            self.startup_seconds = time.monotonic() - began

    def _prepare_data_dir(self) -> None:
        run_as = self._run_as
        if not self.data_dir.exists():
            make_dirs(self.data_dir.parent, open_up=run_as is not None)
            self.data_dir.mkdir(mode=0o700)
            self.data_dir.chmod(0o700)
            if run_as is not None:
                os.chown(self.data_dir, run_as.uid, run_as.gid)
        elif not self.data_dir.is_dir():
            raise EmbeddedServerError(f"data_dir {self.data_dir} exists and is not a directory")
        else:
            is_empty = not any(self.data_dir.iterdir())
            if not is_empty and not (self.data_dir / "PG_VERSION").exists():
                raise EmbeddedServerError(f"data_dir {self.data_dir} is not empty and not a PostgreSQL data directory")
            if run_as is not None and self.data_dir.stat().st_uid != run_as.uid:
                raise EmbeddedServerError(
                    f"data_dir {self.data_dir} exists but is not owned by '{run_as.name}', the user"
                    " PostgreSQL runs as (we are root), and the launcher does not chown directories it did"
                    " not create; pass a data_dir that does not exist yet"
                )
        if run_as is not None and not probe_as(run_as, 'test -w "$1" && test -x "$1"', self.data_dir):
            raise EmbeddedServerError(
                f"PostgreSQL runs as user '{run_as.name}' (we are root) and cannot reach data_dir"
                f" {self.data_dir}: {blocking_ancestor(self.data_dir, run_as)}; the launcher never chmods"
                " directories it did not create, so use a base directory under a world-traversable one"
                " (e.g. EmbeddedStack(base_dir=None), a fresh directory in /tmp), not pytest's tmp_path"
            )

    def _check_existing_cluster(self) -> None:
        assert self._exec_bindir is not None
        try:
            on_disk = int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError) as exc:
            raise EmbeddedServerError(f"cannot read {self.data_dir / 'PG_VERSION'}: {exc}") from exc
        binary = pg_major_version(self._exec_bindir)
        if on_disk != binary:
            raise EmbeddedServerError(
                f"data_dir {self.data_dir} holds a PostgreSQL {on_disk} cluster but the {self.kind}"
                f" binaries in {self.bindir} are PostgreSQL {binary}; use matching binaries or a fresh"
                " data_dir"
            )

    def _initdb(self, deadline: float) -> None:
        bindir = self._exec_bindir
        assert bindir is not None
        argv = [
            str(bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", PG_SUPERUSER,
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C",
        ]  # fmt: skip
        if pg_major_version(bindir) >= 13:
            argv.append("--no-instructions")
        if self.fast_unsafe:
            argv.append("--no-sync")
        self._run_tool(argv, "initdb", deadline)
        (self.data_dir / "pg_hba.conf").write_text(_PG_HBA)  # rewrites initdb's file: owner unchanged

    def _basebackup(self, deadline: float) -> None:
        """Copy the running primary into the empty data_dir as a standby that streams from it."""
        assert self._exec_bindir is not None and self.primary is not None
        if not self.primary.is_running:
            raise EmbeddedServerError(f"the primary {self.primary!r} must run before its standby is created")
        argv = [
            str(self._exec_bindir / "pg_basebackup"),
            "-h", LOOPBACK, "-p", str(self.primary.port), "-U", PG_SUPERUSER,
            "-D", str(self.data_dir),
            "-R",                      # standby.signal + primary_conninfo: follow the primary
            "-X", "stream",
            "--checkpoint=fast",
        ]  # fmt: skip
        if self.fast_unsafe:
            argv.append("--no-sync")
        self._run_tool(argv, "pg_basebackup", deadline)

    def _run_tool(self, argv: list[str], what: str, deadline: float) -> None:
        log = self._log.open()
        try:
            result = subprocess.run(
                exec_argv(argv, run_as=self._run_as, death_signal=signal.SIGTERM),   # vfork: see exec_argv
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                timeout=max(deadline - time.monotonic(), 1.0),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(f"{what} timed out\n{self._log.tail()}") from exc
        finally:
            log.flush()
        if result.returncode != 0:
            raise EmbeddedServerError(f"{what} failed with exit status {result.returncode}\n{self._log.tail()}")

    def _server_argv(self) -> list[str]:
        assert self._exec_bindir is not None
        socket_dir = str(self.data_dir) if len(str(self.data_dir)) < _UNIX_SOCKET_PATH_MAX - 20 else ""
        settings = {
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            "unix_socket_directories": socket_dir,
            "max_connections": "200",
            "shared_buffers": "128MB",
            "logging_collector": "off",
        }
        if self.fast_unsafe:
            # fsync off risks data only if the *machine* crashes. synchronous_commit stays on: with it
            # off, a killed postmaster loses commits that clients were already told succeeded, and the
            # fault tests kill PostgreSQL to prove an accepted write is never lost.
            settings |= {"fsync": "off", "full_page_writes": "off"}
        argv = [str(self._exec_bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def _launch_and_wait(self, deadline: float) -> None:
        log = self._log.open()
        proc = spawn(
            self._server_argv(),
            log=log,
            cwd=self.data_dir,
            run_as=self._run_as,
            death_signal=signal.SIGINT,  # "fast shutdown"; SIGTERM would wait for every client to leave
        )
        self._proc = proc
        live_servers.add(self)
        last_probe = "not probed yet"
        while True:
            code = proc.poll()
            if code is not None:
                self._cleanup_process()
                text = self._log.text()
                if "Address already in use" in text or "could not create any TCP/IP sockets" in text:
                    raise PortInUseError(f"PostgreSQL could not bind 127.0.0.1:{self.port}\n{self._log.tail()}")
                if aborted_before_exec(code, text):
                    raise ChildAbortedBeforeExec(f"PostgreSQL's process aborted before exec\n{self._log.tail()}")
                raise EmbeddedServerError(
                    f"PostgreSQL ({self.kind}, {self.bindir}) exited with status {code} during startup"
                    f"\n{self._log.tail()}"
                )
            status = postmaster_status(self.data_dir)
            # A hot standby reports "standby" once it accepts read-only connections.
            if status is not None and status[0] == proc.pid and status[1] in ("ready", "standby"):
                last_probe = pg_probe(self.port) or ""
                if not last_probe:
                    return
            if time.monotonic() >= deadline:
                self.stop()
                raise EmbeddedServerError(
                    f"PostgreSQL on 127.0.0.1:{self.port} not ready in time (last probe: {last_probe})"
                    f"\n{self._log.tail()}"
                )
            time.sleep(0.02)

    # -- stop --------------------------------------------------------------------------------------

    _STOP_TIMEOUT = 15.0

    def _escalate(self, proc: subprocess.Popen[bytes]) -> None:
        """Fast shutdown hung: immediate shutdown (SIGQUIT), then SIGKILL of the whole tree."""
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGQUIT)
        if not wait_exit(proc, 5.0):
            self._kill_now(proc)

    def _kill_now(self, proc: subprocess.Popen[bytes]) -> None:
        # Backends call setsid(), so they are not in the postmaster's process group: collect them first.
        children = child_pids(proc.pid)
        signal_group(proc, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        reap_killed(proc)
        wait_pids_gone(children, 5.0)

    # -- SQL ---------------------------------------------------------------------------------------

    def _with_connection(self, database: str, work: Callable[[Any], Awaitable[T]]) -> T:
        """`work(conn)` on a superuser connection to `database`. asyncpg runs on a loop of its own in
        a fresh thread, so this works whether or not the caller's thread runs an event loop."""
        if not self.is_running:
            raise EmbeddedServerError(f"{self!r} is not running")
        dsn = self.dsn(database)

        async def run() -> T:
            import asyncpg

            conn = await asyncpg.connect(dsn, timeout=30)
            try:
                return await work(conn)
            finally:
                await conn.close()

        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="crs-pg-sql") as pool:
            return pool.submit(lambda: asyncio.run(run())).result()

    def execute(self, *statements: str, database: str = "postgres") -> list[object]:
        """Run each statement as the superuser; each one's first value."""
        async def run(conn: Any) -> list[object]:
            return [await conn.fetchval(statement, timeout=90) for statement in statements]

        return self._with_connection(database, run)

    def promote(self) -> None:
        """A standby becomes a primary (``pg_promote()``, waiting until it accepts writes)."""
        if self.execute("SELECT pg_promote(true, 60)") != [True]:
            raise EmbeddedServerError(f"{self!r} did not finish promotion within 60 s")

    def require_synchronous_standby(self) -> None:
        """Commits wait until a standby has flushed them (``synchronous_standby_names = '*'``): a
        failover to that standby then loses no acknowledged write."""
        self.execute("ALTER SYSTEM SET synchronous_standby_names = '*'", "SELECT pg_reload_conf()")

    def create_database(self, name: str) -> None:
        """CREATE DATABASE ``name`` (owned by postgres) unless it exists."""
        if not isinstance(name, str) or not name or "\0" in name or len(name.encode()) > 63:
            raise ValueError(f"database name must be a non-empty str of at most 63 bytes, not {name!r}")

        async def create(conn: Any) -> None:
            import asyncpg

            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                return
            quoted = '"' + name.replace('"', '""') + '"'
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f"CREATE DATABASE {quoted}")

        self._with_connection("postgres", create)
