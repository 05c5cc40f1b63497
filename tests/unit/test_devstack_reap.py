"""A SIGKILLed child is reaped even when its Popen's own lock was left held (devstack/processes.py
reap_killed): a KeyboardInterrupt raised by a signal handler inside subprocess's poll leaves it so,
and Popen.wait() then blocked for ever (an interrupted sweep hung in its clean-up)."""

from __future__ import annotations

import signal
import subprocess
import time

from devstack.processes import pid_alive, reap_killed, signal_group


def test_a_killed_child_is_reaped_even_with_its_popen_lock_left_held() -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert proc._waitpid_lock.acquire(blocking=False)   # as the interrupted poll left it
        started = time.monotonic()
        signal_group(proc, signal.SIGKILL)
        reap_killed(proc, patience=0.5)
        assert time.monotonic() - started < 5
        assert proc.returncode == -signal.SIGKILL
        assert proc.poll() == -signal.SIGKILL and not pid_alive(proc.pid)   # reaped: no zombie
    finally:
        if proc.returncode is None:
            proc.kill()


def test_a_killed_child_is_reaped_through_its_popen_when_it_can_be() -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    signal_group(proc, signal.SIGKILL)
    reap_killed(proc, patience=5)
    assert proc.returncode == -signal.SIGKILL and not proc._waitpid_lock.locked()
