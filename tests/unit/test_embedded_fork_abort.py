"""The launcher retries a server start whose forked child gRPC aborted before exec (grpc/grpc#43055)."""

from __future__ import annotations

import signal
import time

import pytest

from devstack.processes import ABORT_RETRIES, ChildAbortedBeforeExec, ChildServer
from devstack.processes import aborted_before_exec as _aborted_before_exec

GRPC_LINE = ("E1123 12:23:29.374468    7647 ev_epoll1_linux.cc:373] (event_engine) Epoll1Poller:0x563e2500bf10"
             " encountered epoll_wait error: Bad file descriptor")


def test_only_a_silent_or_grpc_only_sigabrt_counts() -> None:
    assert _aborted_before_exec(-signal.SIGABRT, GRPC_LINE + "\n")
    assert _aborted_before_exec(-signal.SIGABRT, "")
    assert not _aborted_before_exec(-signal.SIGABRT, "1:C 23 Nov 2026 12:00:00.000 # oO0OoO0OoO0Oo Redis is starting\n")
    assert not _aborted_before_exec(1, GRPC_LINE)
    assert not _aborted_before_exec(-signal.SIGKILL, "")


class _Flaky(ChildServer):
    """A server whose first `aborts` starts abort before exec (no process: the launch is a stub)."""

    def __init__(self, aborts: int) -> None:
        self.aborts, self.starts = aborts, 0
        self.port, self._port_is_ours = 1, True

    def _launch_and_wait(self, deadline: float) -> None:
        self.starts += 1
        if self.starts <= self.aborts:
            raise ChildAbortedBeforeExec("aborted before exec")


def test_aborted_starts_are_retried_up_to_abort_retries() -> None:
    """Three aborts in a row once failed a suite's fixture: the launcher now tries ABORT_RETRIES times."""
    server = _Flaky(aborts=ABORT_RETRIES - 1)
    server._launch_with_retries(time.monotonic() + 30)
    assert server.starts == ABORT_RETRIES
    server = _Flaky(aborts=ABORT_RETRIES)
    with pytest.raises(ChildAbortedBeforeExec):
        server._launch_with_retries(time.monotonic() + 30)
    assert server.starts == ABORT_RETRIES
