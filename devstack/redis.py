"""One embedded ``redis-server``: no persistence, readiness by the pid it reports."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final
from urllib.parse import quote

from devstack.binaries import find_redis_server, is_executable
from devstack.processes import (
    LOOPBACK,
    ChildAbortedBeforeExec,
    ChildServer,
    EmbeddedServerError,
    LogFile,
    PortInUseError,
    aborted_before_exec,
    free_port,
    live_servers,
    require_kw_path,
    require_port,
    require_timeout,
    spawn,
)


def _resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def redis_pid(port: int, timeout: float = 1.0, *, password: str | None = None) -> int | None:
    """The process_id the Redis server at 127.0.0.1:port reports (INFO server), None if not ready.
    `password`: the default user's (requirepass), sent with AUTH first."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            hello = _resp(b"AUTH", password.encode()) if password is not None else b""
            sock.sendall(hello + _resp(b"INFO", b"server"))
            with sock.makefile("rb") as reader:
                if password is not None and not reader.readline().startswith(b"+OK"):
                    return None
                header = reader.readline()
                if not header.startswith(b"$"):
                    return None  # e.g. -LOADING
                info = reader.read(int(header[1:]))
    except (OSError, ValueError):
        return None
    match = re.search(rb"^process_id:(\d+)", info, re.MULTILINE)
    return int(match.group(1)) if match else None



# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAXMEMORY_RE: Final = re.compile(r"^[1-9][0-9]*(?:[kKmMgG][bB]?)?$")
# A password, or one ACL rule: printable ASCII without spaces or quotes (no escaping in redis.conf).
_SECRET_RE: Final = re.compile(r"^[!#-&(-~]{1,128}$")
_ACL_USER_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _redis_quote(value: str) -> str:
    if any(ch in value for ch in "\n\r\0"):
        raise EmbeddedServerError(f"path not usable in a redis config: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_acl_users(users: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    checked: dict[str, tuple[str, ...]] = {}
    for user, rules in users.items():
        if not isinstance(user, str) or not _ACL_USER_RE.match(user) or user == "default":
            raise ValueError(f"ACL user name must match {_ACL_USER_RE.pattern} and not be 'default', not {user!r}")
        if isinstance(rules, str) or not all(isinstance(r, str) and _SECRET_RE.match(r) for r in rules):
            raise ValueError(f"ACL rules of {user!r} must be a list of words without spaces or quotes")
        checked[user] = tuple(rules)
    return checked


class RedisServer(ChildServer):
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
        requirepass: str | None = None,
        acl_users: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """`requirepass`: the default user's password (then `url` carries it). `acl_users`: ACL users
        to create, name -> rules, e.g. {"alice": ["on", ">secret", "~*", "+@all"]}."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"name must match {_NAME_RE.pattern}, not {name!r}")
        self.name = name
        self.data_dir = require_kw_path("data_dir", data_dir)
        requested_port = require_port(port)
        if maxmemory is not None and (not isinstance(maxmemory, str) or not _MAXMEMORY_RE.match(maxmemory)):
            raise ValueError(f"maxmemory must look like '64mb' or '1000000', not {maxmemory!r}")
        self.maxmemory = maxmemory
        if requirepass is not None and (not isinstance(requirepass, str) or not _SECRET_RE.match(requirepass)):
            raise ValueError("requirepass must be 1-128 printable ASCII characters without spaces or quotes")
        self.requirepass = requirepass
        self.acl_users = _check_acl_users(acl_users or {})
        if binary is not None:
            self.binary = require_kw_path("binary", binary)
            if not is_executable(self.binary):
                raise EmbeddedServerError(f"redis binary {self.binary} is not an executable file")
        else:
            self.binary = find_redis_server()
        self.port: int = requested_port if requested_port is not None else free_port()
        self._port_is_ours = requested_port is None
        self._log = LogFile(self.data_dir / "redis.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running else "stopped"
        return f"<RedisServer {self.name} {self.host}:{self.port} {state}>"

    @property
    def url(self) -> str:
        """redis://host:port/0, with the default user's password when `requirepass` is set."""
        if self.requirepass is not None:
            return self.url_as(None, self.requirepass)
        return f"redis://{self.host}:{self.port}/0"

    def url_as(self, user: str | None, password: str, db: int = 0) -> str:
        """The URL that authenticates as `user` (None: the default user) with `password`, URL-encoded."""
        name = quote(user, safe="") if user is not None else ""
        return f"redis://{name}:{quote(password, safe='')}@{self.host}:{self.port}/{db}"

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
        if self.requirepass is not None:
            lines.append(f"requirepass {self.requirepass}")
        for user, rules in self.acl_users.items():
            lines.append(" ".join(["user", user, *rules]))
        return "\n".join(lines) + "\n"

    def start(self, *, timeout: float = 15.0) -> None:
        """Start and wait until it answers on its port; does nothing when already running."""
        deadline = time.monotonic() + require_timeout(timeout)
        with self._lock:
            if self.is_running:
                return
            self._cleanup_process()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._launch_with_retries(deadline)
            self._port_is_ours = False

    def _launch_and_wait(self, deadline: float) -> None:
        for leftover in ("dump.rdb", "appendonly.aof"):
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / leftover).unlink()
        config = self.data_dir / "redis.conf"
        config.write_text(self._config())
        log = self._log.open()
        proc = spawn([self.binary, config], log=log, cwd=self.data_dir, run_as=None, death_signal=signal.SIGTERM)
        self._proc = proc
        live_servers.add(self)
        while True:
            code = proc.poll()
            if code is not None:
                self._cleanup_process()
                if "Address already in use" in self._log.text():
                    raise PortInUseError(f"redis {self.name} could not bind 127.0.0.1:{self.port}\n{self._log.tail()}")
                if aborted_before_exec(code, self._log.text()):
                    raise ChildAbortedBeforeExec(f"redis {self.name}'s process aborted before exec\n{self._log.tail()}")
                raise EmbeddedServerError(
                    f"redis {self.name} exited with status {code} during startup\n{self._log.tail()}"
                )
            if redis_pid(self.port, password=self.requirepass) == proc.pid:
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise EmbeddedServerError(
                    f"redis {self.name} on 127.0.0.1:{self.port} not ready in time\n{self._log.tail()}"
                )
            time.sleep(0.01)

    def restart(self, *, timeout: float = 15.0) -> None:
        """Come back on the same port, empty (a crashed shard returning). Stops it first if running."""
        with self._lock:
            self.stop()
            self._port_is_ours = False
            self.start(timeout=timeout)

