"""Whether a consumer's checkpoint (epoch, sequence) resumes in the database's current history
(server/feed/epochs.py): pure, no servers. The histories here: epoch A from sequence 1; restored at 50,
so B from 51; B restored again at 30 (a backup from A's time, before B's row), so C from 31 and B gone
from the table; a clean failover of C at 80 gives D from 81."""

from __future__ import annotations

import pytest

from server.feed.epochs import epoch_shape_ok, stale_checkpoint

RESTORED_TWICE = {"A": 1, "C": 31}                 # B's row was not in the backup C was restored from
FAILED_OVER = {"A": 1, "C": 31, "D": 81}


def check(epoch: str, from_sequence: int, current: str, table: dict[str, int]) -> str | None:
    return stale_checkpoint(epoch=epoch, from_sequence=from_sequence, current=current, first_sequences=table)


@pytest.mark.parametrize("epoch", ["", "C"])
def test_no_epoch_and_the_current_one_are_not_checked(epoch: str) -> None:
    assert check(epoch, 10**12, "C", RESTORED_TWICE) is None


def test_an_older_epoch_resumes_below_where_the_next_one_began() -> None:
    assert check("A", 30, "C", RESTORED_TWICE) is None
    assert check("C", 80, "D", FAILED_OVER) is None          # caught up when the standby was promoted
    assert check("A", 30, "D", FAILED_OVER) is None          # two epochs back: below both forks


@pytest.mark.parametrize(("epoch", "sequence", "fork"), [("A", 31, 31), ("A", 45, 31), ("C", 81, 81), ("A", 90, 31)])
def test_an_older_epoch_at_or_past_the_fork_is_refused(epoch: str, sequence: int, fork: int) -> None:
    why = check(epoch, sequence, "D", FAILED_OVER)
    assert why is not None
    assert f"sequence {sequence} of the checkpoint's epoch is from a history this database no longer has" in why
    assert f"sequences from {fork} on were handed out again" in why
    assert why.endswith("take a Snapshot and Watch from its sequence and epoch")


def test_an_unknown_epoch_is_refused() -> None:
    """B's history (51..) is not this database's: its checkpoint is refused even below C's head."""
    why = check("B", 40, "C", RESTORED_TWICE)
    assert why is not None and "the checkpoint's epoch is not one of this database's histories (current: 'C')" in why


def test_sequence_zero_holds_nothing_and_is_not_checked() -> None:
    assert check("B", 0, "C", RESTORED_TWICE) is None


def test_an_epoch_starting_where_another_does_is_taken_as_the_earlier_one() -> None:
    """Two epochs recorded at the same head (no write between them): which came first is unknown, so a
    checkpoint at or past that head is refused (a snapshot too many, never a change missed)."""
    table = {"A": 1, "B": 51, "C": 51}
    assert check("B", 50, "C", table) is None
    assert check("B", 51, "C", table) is not None


def test_an_epoch_after_the_current_one_is_not_its_past() -> None:
    assert check("D", 10, "C", {"A": 1, "C": 31, "D": 81}) is not None


@pytest.mark.parametrize("sequence", [10, 40])
def test_the_callers_epoch_is_never_quoted(sequence: int) -> None:
    """F2: the epoch is the caller's text; a card number there came back in the OUT_OF_RANGE message."""
    from server.pan import luhn_check_digit
    body = "999000048172635"
    mine = body + luhn_check_digit(body) + "/1"                  # a well-shaped epoch holding a card number
    why = check(mine, sequence, "c0ffee/2", {mine: 1, "c0ffee/2": 31} if sequence == 40 else {"c0ffee/2": 31})
    assert why is not None and body not in why and "c0ffee/2" in why


def test_the_epoch_shape() -> None:
    assert epoch_shape_ok("7/1") and epoch_shape_ok("6f3c0d1e2a4b5c6d/4294967295") and epoch_shape_ok("123/9")
    for bad in ("", "7", "7/", "/1", "G/1", "7F/1", "7/1 ", "7/-1", "1" * 17 + "/1", "7/" + "1" * 11, "x" * 3000):
        assert not epoch_shape_ok(bad), bad
