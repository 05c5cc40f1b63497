"""Exec a server or tool the way devstack/ wants it, from a fresh process (run as a script, stdlib only).

    python -I -S devstack/child_exec.py DEATH_SIGNAL PARENT_PID UID GID -- PROGRAM [ARG...]

Drops to UID/GID (each "-" to keep them; supplementary groups are cleared with the GID), then asks
Linux to send DEATH_SIGNAL (0: none) when the parent goes away, and execs PROGRAM. If PARENT_PID is
already gone by then, it exits (status 1) instead of running the program.

Why a launcher instead of `subprocess.Popen(preexec_fn=..., user=...)`: either makes subprocess
fork() the whole test process, and a fork runs gRPC's pthread_atfork handlers, which abort or crash
the child now and then when channels are live (grpc/grpc#43055; docs/decisions.md "The embedded
launcher runs its children through an exec helper"). Without them subprocess uses vfork(), which runs
no handlers; this script then does in a clean, single-threaded process what preexec_fn did in the
forked copy, in the same order (a credential change clears the death signal, so it comes last).
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1


def main(args: list[str]) -> None:
    if len(args) < 6 or args[4] != "--":
        raise SystemExit("usage: child_exec.py DEATH_SIGNAL PARENT_PID UID GID -- PROGRAM [ARG...]")
    death_signal, parent, uid, gid, argv = int(args[0]), int(args[1]), args[2], args[3], args[5:]
    if gid != "-":
        os.setgroups([])
        os.setgid(int(gid))
    if uid != "-":
        os.setuid(int(uid))
    if death_signal and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, death_signal, 0, 0, 0) != 0:
            raise SystemExit(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
        if os.getppid() != parent:   # the parent died before the death signal was armed
            raise SystemExit(f"child_exec: parent {parent} is gone; not starting {argv[0]}")
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"child_exec: cannot run {argv[0]}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
