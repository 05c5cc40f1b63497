"""Child-process plumbing for the embedded servers: spawn, signal, wait, log, clean up.

Child processes never outlive us: each runs in its own process group, is stopped by ``stop()`` and
by an ``atexit`` hook, and on Linux gets ``PR_SET_PDEATHSIG`` so that a parent killed with SIGKILL
takes its servers down. The death signal fires when the *thread* that forked the child exits, so
every server is spawned from one long-lived daemon thread (``_Spawner``), whichever thread called
``start()``; starting servers from worker threads (``EmbeddedStack.start``, ``asyncio.to_thread``)
is therefore safe.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import psutil

LOOPBACK: Final = "127.0.0.1"
LOG_TAIL_LINES: Final = 25
PORT_RETRIES: Final = 3   # a port the launcher picked itself was taken: try another this many times
ABORT_RETRIES: Final = 8  # a child that aborted before exec (docs/decisions.md): start it this many times


class EmbeddedServerError(RuntimeError):
    """A server could not be found, prepared, started or stopped."""


class PortInUseError(EmbeddedServerError):
    """Its port is taken. When the launcher picked the port itself, it retries with another one."""


class ChildAbortedBeforeExec(EmbeddedServerError):
    """The forked child died of SIGABRT, having logged nothing but gRPC lines. gRPC >= 1.81 does this now and
    then in a process with live channels (the test suite): its post-fork handler restarts a poller
    thread that aborts when ``close_fds`` closes its epoll descriptor (grpc/grpc#43055). Children now
    start through ``exec_argv`` so subprocess vforks and no handler runs; the retry stays as a backstop.
    Nothing ran, so the start is retried."""


_GRPC_LOG_LINE = re.compile(r"[EWIF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.cc:\d+\]")


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


def aborted_before_exec(code: int, log_text: str) -> bool:
    """SIGABRT, and nothing in the log but gRPC C-core lines: the server itself never ran."""
    return code == -signal.SIGABRT and all(_GRPC_LOG_LINE.match(line) for line in log_text.splitlines() if line)


# --------------------------------------------------------------------------------------------------
# Process plumbing
# --------------------------------------------------------------------------------------------------

CHILD_EXEC: Final = Path(__file__).with_name("child_exec.py")


def exec_argv(argv: Sequence[str | Path], *, run_as: RunAs | None, death_signal: int) -> list[str]:
    """``argv`` run through devstack/child_exec.py: it drops to ``run_as``, arms ``death_signal`` (sent
    when this thread goes away; 0 = none; Linux only) and execs. Popen then needs no preexec_fn and no
    user/group, so it vforks: a fork would run gRPC's atfork handlers in the child, which abort it
    now and then (grpc/grpc#43055; docs/decisions.md)."""
    uid, gid = (str(run_as.uid), str(run_as.gid)) if run_as is not None else ("-", "-")
    return [sys.executable, "-I", "-S", str(CHILD_EXEC), str(death_signal), str(os.getpid()), uid, gid, "--",
            *(str(arg) for arg in argv)]


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user PostgreSQL runs as when we are root."""

    name: str
    uid: int
    gid: int


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


def spawn(
    argv: Sequence[str | Path],
    *,
    log: IO[bytes],
    cwd: Path,
    run_as: RunAs | None,
    death_signal: int,
) -> subprocess.Popen[bytes]:
    """Start a server process: own process group, output to ``log``, death signal set (Linux)."""
    command = exec_argv(argv, run_as=run_as, death_signal=death_signal)

    def job() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            process_group=0,
            close_fds=True,
        )

    return _spawner.popen(job)


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
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


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout=max(timeout, 0.0))
    except subprocess.TimeoutExpired:
        return False
    return True


def reap_killed(proc: subprocess.Popen[bytes], patience: float = 10.0) -> None:
    """Wait for a child sent SIGKILL: through its Popen for up to `patience` seconds, then with
    os.waitpid directly. Popen.wait() without a timeout blocks for ever on Popen's own lock when an
    exception raised by a signal handler (the sweep turns SIGTERM into KeyboardInterrupt) landed
    inside subprocess's poll of that child and left the lock held: a sweep interrupted by its time
    limit then hung in its clean-up with a zombie redis-server (tests/integration/test_sweep_smoke.py)."""
    if wait_exit(proc, patience):
        return
    try:
        _, status = os.waitpid(proc.pid, 0)
    except ChildProcessError:     # already reaped, by whoever held the lock
        proc.returncode = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        return
    proc.returncode = os.waitstatus_to_exitcode(status)


def child_pids(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (empty when it is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:   # e.g. AccessDenied: it exists
        return True


def wait_pids_gone(pids: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    remaining = list(pids)
    while remaining and time.monotonic() < deadline:
        remaining = [pid for pid in remaining if pid_alive(pid)]
        if remaining:
            time.sleep(0.02)


class LogFile:
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

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        kept = self.text().splitlines()[-lines:]
        body = "\n".join(f"    {line}" for line in kept) if kept else "    (empty)"
        return f"last lines of {self.path}:\n{body}"


def make_dirs(path: Path, *, open_up: bool) -> list[Path]:
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


def require_kw_path(name: str, value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, not {type(value).__name__}")
    return Path(value).absolute()


def require_port(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"port must be an int in 1..65535 or None, not {value!r}")
    return value


def require_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {value!r}")
    return float(value)



# --------------------------------------------------------------------------------------------------
# Live-object registry (atexit)
# --------------------------------------------------------------------------------------------------

live_servers: weakref.WeakSet[ChildServer] = weakref.WeakSet()


def _cleanup_at_exit() -> None:
    for server in list(live_servers):
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_cleanup_at_exit)



class ChildServer:
    """What PostgresServer and RedisServer share: the child process, its log, and how it is stopped."""

    _STOP_SIGNAL: signal.Signals = signal.SIGTERM
    _STOP_TIMEOUT: float = 10.0   # seconds a clean shutdown may take before it is escalated
    _proc: subprocess.Popen[bytes] | None
    _log: LogFile
    _lock: threading.RLock

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
            live_servers.discard(self)

    port: int
    _port_is_ours: bool

    def _launch_and_wait(self, deadline: float) -> None:
        raise NotImplementedError

    def _launch_with_retries(self, deadline: float) -> None:
        """Launch; a port taken meanwhile is replaced when we picked it (PORT_RETRIES times), and a
        child that aborted before exec (ChildAbortedBeforeExec: nothing ran) is started again, up to
        ABORT_RETRIES times, a little later each time: the aborts come in runs (three in a row
        failed a suite's fixture once), while the parent's gRPC threads are busy."""
        ports = aborts = 0
        while True:
            try:
                self._launch_and_wait(deadline)
                return
            except PortInUseError:
                ports += 1
                if not self._port_is_ours or ports >= PORT_RETRIES:
                    raise
                self.port = free_port()
            except ChildAbortedBeforeExec:
                aborts += 1
                if aborts >= ABORT_RETRIES or time.monotonic() + 0.05 * aborts >= deadline:
                    raise
                time.sleep(0.05 * aborts)

    def _signal_stop(self) -> None:
        """Ask for a shutdown without waiting (used to stop several servers at once)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self._STOP_SIGNAL)

    def stop(self, *, timeout: float | None = None) -> None:
        """Ask for a clean shutdown (`_STOP_SIGNAL`); escalate if it hangs. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self._STOP_SIGNAL)
                if not wait_exit(proc, self._STOP_TIMEOUT if timeout is None else timeout):
                    self._escalate(proc)
            self._cleanup_process()

    def kill(self) -> None:
        """Die at once, like a crash (for fault tests)."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                self._kill_now(proc)
            self._cleanup_process()

    def _escalate(self, proc: subprocess.Popen[bytes]) -> None:
        """The clean shutdown hung: by default, kill."""
        self._kill_now(proc)

    def _kill_now(self, proc: subprocess.Popen[bytes]) -> None:
        signal_group(proc, signal.SIGKILL)
        reap_killed(proc)

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            warnings.warn(f"{self!r} was garbage-collected while running; call stop()", ResourceWarning,
                          stacklevel=2, source=self)
            with contextlib.suppress(Exception):
                proc.send_signal(self._STOP_SIGNAL)

