"""server/serve.py RestartBudget: the parent gives up on workers that keep failing, not on exits spread
over a pod's life (the count never went back to zero: any 11th exit of a two-worker pod, days apart,
stopped the pod)."""
from __future__ import annotations

from server.serve import STABLE_SECONDS, RestartBudget


def test_five_quick_exits_per_worker_are_restarted_the_next_gives_up() -> None:
    budget = RestartBudget(workers=2)
    assert [budget.exited(ran_for=0.5) for _ in range(11)] == [False] * 10 + [True]
    assert budget.exhausted


def test_a_worker_that_served_a_while_ends_the_row() -> None:
    budget = RestartBudget(workers=2)
    for _ in range(100):                        # an exit a day: each worker served long before it
        assert not budget.exited(ran_for=STABLE_SECONDS * 1440)
    for _ in range(9):                          # a crash loop starts: counted from the last stable run
        assert not budget.exited(ran_for=1.0)
    assert budget.exited(ran_for=1.0) and budget.in_a_row == 11
