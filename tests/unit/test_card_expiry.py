"""A card's expiry, judged in UTC, and the answers not cached because the card expires before they
would leave the caches (server/store/reads.py)."""

from __future__ import annotations

import datetime as dt

from server.store.reads import expires_within

UTC = dt.UTC
LIFE = 346.0     # card_answer_life at the defaults: the Redis TTL at its longest, the near-cache's, a grace


def test_a_card_expires_as_its_expiry_month_ends_in_utc() -> None:
    last_minutes = dt.datetime(2030, 1, 31, 23, 55, tzinfo=UTC)
    assert expires_within("2030-01", last_minutes, LIFE)          # good now, expired in 346 s
    assert not expires_within("2030-01", last_minutes, 250)       # still good 250 s on (23:59:10)
    assert not expires_within("2030-02", last_minutes, LIFE)      # a month left
    assert not expires_within("2029-12", last_minutes, LIFE)      # expired already: cached like any answer
    earlier = dt.datetime(2030, 1, 31, 23, 50, tzinfo=UTC)
    assert not expires_within("2030-01", earlier, LIFE)
    new_year = dt.datetime(2030, 12, 31, 23, 59, 30, tzinfo=UTC)   # December into January
    assert expires_within("2030-12", new_year, 31) and not expires_within("2030-12", new_year, 29)
    assert not expires_within("2031-01", new_year, LIFE)


def test_utc_not_the_node_s_zone_decides() -> None:
    """At 23:55 UTC on the 31st a node in UTC-5 reads 18:55, and one in UTC+9 reads 08:55 on the 1st:
    all of them judge the same instant the same way."""
    instant = dt.datetime(2030, 1, 31, 23, 55, tzinfo=UTC)
    for hours in (-5, 0, 9):
        local = instant.astimezone(dt.timezone(dt.timedelta(hours=hours)))
        assert expires_within("2030-01", local, LIFE) and not expires_within("2030-01", local, 250)
