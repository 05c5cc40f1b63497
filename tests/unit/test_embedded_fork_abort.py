"""The launcher retries a server start whose forked child gRPC aborted before exec (grpc/grpc#43055)."""

from __future__ import annotations

import signal

from devstack.processes import aborted_before_exec as _aborted_before_exec

GRPC_LINE = ("E1123 12:23:29.374468    7647 ev_epoll1_linux.cc:373] (event_engine) Epoll1Poller:0x563e2500bf10"
             " encountered epoll_wait error: Bad file descriptor")


def test_only_a_silent_or_grpc_only_sigabrt_counts() -> None:
    assert _aborted_before_exec(-signal.SIGABRT, GRPC_LINE + "\n")
    assert _aborted_before_exec(-signal.SIGABRT, "")
    assert not _aborted_before_exec(-signal.SIGABRT, "1:C 23 Nov 2026 12:00:00.000 # oO0OoO0OoO0Oo Redis is starting\n")
    assert not _aborted_before_exec(1, GRPC_LINE)
    assert not _aborted_before_exec(-signal.SIGKILL, "")
