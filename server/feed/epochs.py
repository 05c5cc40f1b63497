"""Whether a consumer's checkpoint (epoch, sequence) is part of the database's current history. Pure.

An epoch names one history of the database (server/store/migrations/0014_feed_epochs.sql: the cluster's
system identifier and its timeline). A restore from a backup or a failover that lost commits starts a
new one, recorded with its first sequence: the restored head + 1. Sequences below it are common to the
new history and the one it came from; from there on the numbers were handed out again, for other
changes. So a checkpoint from an older epoch resumes only below the first sequence of every epoch
that followed it.

Which epochs followed: the table comes back with a physical restore, so it lists the epochs of the
current history's own past, and along that past each new epoch starts at or above the one before
(its restored head is at or past the point where the previous epoch's row was written). Epochs whose
first sequence equals the consumer's own are taken as later ones: that refuses, at worst, a
checkpoint that could have resumed (the consumer takes a snapshot), never the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

RESTART = "take a Snapshot and Watch from its sequence and epoch"
# What feed_current_epoch() makes (migration 0014): the cluster's system identifier in lower-case hex
# (64 bits), "/", its timeline in decimal (32 bits).
_EPOCH_SHAPE = re.compile(r"[0-9a-f]{1,16}/[0-9]{1,10}")


def epoch_shape_ok(epoch: str) -> bool:
    """Whether `epoch` has the shape of one this service hands out (Snapshot, Watch's events)."""
    return bool(_EPOCH_SHAPE.fullmatch(epoch))


def stale_checkpoint(*, epoch: str, from_sequence: int, current: str, first_sequences: Mapping[str, int]) -> str | None:
    """Why Watch(from_sequence, epoch) cannot resume in the `current` epoch, or None when it can.
    `first_sequences`: feed_epochs, epoch -> its first sequence. An empty `epoch` is not checked (a
    consumer from before epochs), nor is sequence 0 (the consumer holds nothing yet). The answer
    never quotes the caller's `epoch` (it may be anything, a card number included): only ours."""
    if not epoch or epoch == current or from_sequence == 0:
        return None
    first = first_sequences.get(epoch)
    if first is None:
        return (f"the checkpoint's epoch is not one of this database's histories (current: {current!r}): it is"
                f" from a history this database no longer has, or another environment's; {RESTART}")
    later = [f for e, f in first_sequences.items() if e != epoch and f >= first]
    fork = min(later, default=0)   # none: not a past of the current epoch (which always has its row)
    if from_sequence < fork:
        return None
    return (f"sequence {from_sequence} of the checkpoint's epoch is from a history this database no longer has"
            f" (restored from a backup, or a failover lost commits: sequences from {fork} on were handed out again,"
            f" for other changes; the current epoch is {current!r}); {RESTART}")
