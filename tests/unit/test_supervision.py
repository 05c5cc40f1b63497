"""server/serve.py Supervision: when `crs serve` restarts a worker that exited and when it gives up.

It gave up after 5 exits per worker in a row whatever the siblings did, and then stopped the siblings
too: with PostgreSQL down, a replacement for one crashed worker exits 3 every ~2 s, so 22 s later the
parent SIGTERMed the sibling that still answered from Redis, and the pod went into CrashLoopBackOff."""
from __future__ import annotations

from server.serve import RESTART_BACKOFF, RESTART_BACKOFF_MAX, STABLE_SECONDS, Supervision


def test_restarts_back_off_exponentially_up_to_a_cap() -> None:
    supervision = Supervision(workers=2)
    delays = [supervision.exited(0, ran_for=0.5, exitcode=3, others_serving=True) for _ in range(8)]
    assert delays == [RESTART_BACKOFF * 2 ** n for n in range(5)] + [RESTART_BACKOFF_MAX] * 3
    assert delays[4] < RESTART_BACKOFF_MAX


def test_while_a_sibling_serves_a_failing_worker_is_retried_for_ever() -> None:
    supervision = Supervision(workers=2)
    # PostgreSQL down for hours: the replacement keeps exiting 3, every 30 s once backed off.
    delays = [supervision.exited(1, ran_for=1.5, exitcode=3, others_serving=True) for _ in range(1000)]
    assert None not in delays and delays[-1] == RESTART_BACKOFF_MAX
    assert supervision.verdict == 0


def test_with_no_worker_serving_five_quick_exits_per_worker_are_restarted_the_next_gives_up() -> None:
    supervision = Supervision(workers=2)
    outcomes = [supervision.exited(n % 2, ran_for=0.5, exitcode=3, others_serving=False) for n in range(11)]
    assert all(delay is not None for delay in outcomes[:10]) and outcomes[10] is None
    assert supervision.verdict == 1


def test_a_worker_that_serves_again_ends_the_count_towards_giving_up() -> None:
    supervision = Supervision(workers=2)
    for n in range(10):
        assert supervision.exited(n % 2, ran_for=0.5, exitcode=3, others_serving=False) is not None
    supervision.serving()   # the database came back: one of them serves
    for n in range(10):
        assert supervision.exited(n % 2, ran_for=0.5, exitcode=3, others_serving=False) is not None
    assert supervision.verdict == 0


def test_a_configuration_error_gives_up_at_once_unless_a_sibling_serves() -> None:
    serving = Supervision(workers=2)
    assert serving.exited(0, ran_for=0.5, exitcode=2, others_serving=True) == RESTART_BACKOFF
    alone = Supervision(workers=2)
    assert alone.exited(0, ran_for=0.5, exitcode=2, others_serving=False) is None
    assert alone.verdict == 2


def test_a_worker_that_ran_a_while_starts_its_row_again() -> None:
    supervision = Supervision(workers=2)
    for _ in range(6):
        supervision.exited(0, ran_for=1.0, exitcode=1, others_serving=True)
    assert supervision.exited(0, ran_for=STABLE_SECONDS, exitcode=1, others_serving=True) == RESTART_BACKOFF
    for _ in range(100):   # an exit a day
        assert supervision.exited(0, ran_for=STABLE_SECONDS * 1440, exitcode=0, others_serving=False) \
            == RESTART_BACKOFF
    assert supervision.rows == [1, 0]
