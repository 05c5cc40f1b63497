"""One embedded ``redis-server``: no persistence, readiness by the pid it reports."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Final

from devstack.binaries import find_redis_server, free_port, is_executable
from devstack.processes import (
    LOOPBACK,
    PORT_RETRIES,
    ChildAbortedBeforeExec,
    ChildServer,
    EmbeddedServerError,
    LogFile,
    PortInUseError,
    aborted_before_exec,
    live_servers,
    require_kw_path,
    require_port,
    require_timeout,
    spawn,
)


def redis_pid(port: int, timeout: float = 1.0) -> int | None:
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
# Redis
# --------------------------------------------------------------------------------------------------

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAXMEMORY_RE: Final = re.compile(r"^[1-9][0-9]*(?:[kKmMgG][bB]?)?$")


def _redis_quote(value: str) -> str:
    if any(ch in value for ch in "\n\r\0"):
        raise EmbeddedServerError(f"path not usable in a redis config: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"name must match {_NAME_RE.pattern}, not {name!r}")
        self.name = name
        self.data_dir = require_kw_path("data_dir", data_dir)
        requested_port = require_port(port)
        if maxmemory is not None and (not isinstance(maxmemory, str) or not _MAXMEMORY_RE.match(maxmemory)):
            raise ValueError(f"maxmemory must look like '64mb' or '1000000', not {maxmemory!r}")
        self.maxmemory = maxmemory
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
        deadline = time.monotonic() + require_timeout(timeout)
        with self._lock:
            if self.is_running:
                return
            self._cleanup_process()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            for attempt in range(PORT_RETRIES):
                try:
                    self._launch_and_wait(deadline)
                    break
                except PortInUseError:
                    if not self._port_is_ours or attempt == PORT_RETRIES - 1:
                        raise
                    self.port = free_port()
                except ChildAbortedBeforeExec:
                    if attempt == PORT_RETRIES - 1:
                        raise
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
            if redis_pid(self.port) == proc.pid:
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

