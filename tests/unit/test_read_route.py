"""The replica freshness rule's pure parts: which primary position a replica covers, and the
position carried by an invalidation announcement (server/store/read_route.py, cache/invalidation.py)."""

from __future__ import annotations

from server.cache.invalidation import announcement, parse_announcement
from server.store.read_route import Positions


def test_a_replica_covers_the_newest_poll_it_has_replayed() -> None:
    positions = Positions(keep=60.0)
    for started, position in ((1.0, 100), (1.1, 150), (1.2, 150), (1.3, 400)):
        positions.add(started, position)
    assert positions.covered_since(99) is None          # behind every poll kept
    assert positions.covered_since(100) == 1.0
    assert positions.covered_since(399) == 1.2          # the newest of equal positions
    assert positions.covered_since(10_000) == 1.3


def test_old_polls_are_forgotten() -> None:
    positions = Positions(keep=5.0)
    positions.add(0.0, 10)
    positions.add(10.0, 20)
    assert positions.covered_since(15) is None, "the poll at t=0 is older than keep: it proves nothing now"


def test_an_announcement_carries_keys_and_the_write_position() -> None:
    keys = ["crd:1:ab", "tok:tok_1", "cus:c1"]
    assert parse_announcement(announcement(keys, 123456)) == (keys, 123456)
    assert parse_announcement(announcement(keys, None)) == (keys, None)
    assert announcement(keys, None) == "crd:1:ab\ntok:tok_1\ncus:c1", "without replicas: the old format"
    assert parse_announcement("crd:1:ab\n@wal:12x") == (["crd:1:ab"], None), "a malformed position is ignored"
