"""How the suite splits over pytest-xdist's workers (`./crsw test` runs two: `-n 2 --dist loadgroup`).

A worker takes whole groups. Every test that uses the session's shared environment (`dev_env`:
its PostgreSQL, Redis shards and nodes) is one group, so they all run on one worker, in file order,
on one environment, and test_zz_pci_scan, last among them, scans everything they sent (each worker
would otherwise start an environment of its own and the scan would see half the suite). Every other
test is grouped by its module (its path), so a module's own servers (module-scoped fixtures) start once.
Without xdist (`-n 0`, or `-p no:xdist`) the marks are inert and the suite runs in one process, in
file order, as before.
"""

from __future__ import annotations

import pytest

SHARED_ENV_GROUP = "shared-env"


def _group(item: pytest.Item) -> str:
    return SHARED_ENV_GROUP if "dev_env" in getattr(item, "fixturenames", ()) else item.nodeid.partition("::")[0]


@pytest.hookimpl(tryfirst=True)     # before xdist's own hook, which reads the marks into the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))


_UNGROUPED = pytest.StashKey[str]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker with --dist loadgroup, xdist has written each test's group into its id by now
    (the scheduler reads it from there). A pytest whose ids ignore that (9.2: pytest-xdist#1386) would
    spread one module's tests over both workers, each on fresh module fixtures: every test then fails
    with this reason instead of some failing for want of what an earlier test of their module did."""
    if getattr(session.config.option, "loadgroup", False):
        ungrouped = [item.nodeid for item in session.items if not item.nodeid.endswith("@" + _group(item))]
        if ungrouped:
            session.config.stash[_UNGROUPED] = (
                f"--dist loadgroup did not group {ungrouped[0]} ({len(ungrouped)} tests): this pytest and"
                " pytest-xdist do not work together (pytest-xdist#1386); see pyproject.toml")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _UNGROUPED in item.config.stash:
        pytest.fail(item.config.stash[_UNGROUPED], pytrace=False)
