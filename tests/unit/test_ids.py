"""Entity ids (server/store/admin.py new_id): prefix + lower-case letters and digits, each character
drawn without bias from the whole alphabet."""

from __future__ import annotations

import re
from collections import Counter

from server.store.admin import new_id


def test_ids_have_the_prefix_the_length_and_the_alphabet() -> None:
    ids = [new_id("cus_") for _ in range(2000)] + [new_id("tok_", 24) for _ in range(200)]
    assert all(re.fullmatch(r"cus_[a-z0-9]{20}", i) for i in ids[:2000])
    assert all(re.fullmatch(r"tok_[a-z0-9]{24}", i) for i in ids[2000:])
    assert len(set(ids)) == len(ids)


def test_every_character_is_drawn_about_equally() -> None:
    counts = Counter("".join(new_id("", 20) for _ in range(3600)))     # 72,000 characters, 2,000 expected each
    assert set(counts) == set("abcdefghijklmnopqrstuvwxyz0123456789")
    assert all(1700 < n < 2300 for n in counts.values())                # ~7 standard deviations either side
