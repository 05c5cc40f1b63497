"""Why a topology command stops: the errors `crs shards` turns into messages and exit codes.

Apart from the modules that raise them (staging, the move driver, its key steps, the reports) so that
each can import them without importing the others.
"""

from __future__ import annotations

# An error message lists at most this many nodes; `crs shards status` lists them all.
NODES_NAMED = 5


class MigrationError(Exception):
    """The move cannot go on now; the message says why and what to do. Nothing is left half-done:
    rerunning `crs shards apply` resumes, `crs shards abort` goes back."""


class ShardUnreachable(Exception):
    """A shard a command must read did not answer; the message names it and its address (exit 3)."""
