"""`bulk_gc` (server/cli/import_reader.py): the cycle collector's settings for an import, and back."""

from __future__ import annotations

import gc

import pytest

from server.cli.import_reader import GC_YOUNG, bulk_gc


def test_bulk_gc_freezes_raises_the_young_threshold_and_restores_both() -> None:
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    with bulk_gc():
        assert gc.get_threshold() == (GC_YOUNG, before[1], before[2])
        assert gc.get_freeze_count() > frozen            # what was alive before the load is not scanned
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_bulk_gc_restores_after_an_error() -> None:
    before = gc.get_threshold()
    with pytest.raises(KeyboardInterrupt), bulk_gc():
        raise KeyboardInterrupt
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
