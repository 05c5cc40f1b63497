"""Children started the way a background job of a non-interactive shell is: with SIGINT ignored.

Through `sh -c 'trap "" INT; exec ...'`, not `Popen(preexec_fn=...)`: a preexec_fn makes subprocess
fork the test process, threads and all, and run Python in the child before exec, which Python's docs
call unsafe with threads (the suite's processes have several). Twice in a dozen full runs such a
child ended before printing a line, with nothing on stderr. SIG_IGN survives exec; a handler would not.
"""

from __future__ import annotations

SIGINT_IGNORED = ["/bin/sh", "-c", 'trap "" INT; exec "$@"', "sh"]


def with_sigint_ignored(argv: list[str]) -> list[str]:
    """`argv` run with SIGINT ignored from its first instruction."""
    return [*SIGINT_IGNORED, *argv]
