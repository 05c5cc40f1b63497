"""`crs-dev sample-customers OUT.csv --rows N [--dirty]`: a made-up source file for `crs import
customers`, generated at run time with Faker (no personal data is ever committed).

About 5% of the rows are another source record of an earlier person (a nickname, a typo in the
family name, a reformatted phone, a day/month swap), which the import turns into one customer. With
--dirty about 4% of the rows are broken on purpose, one kind each (an impossible date, a national
id failing its check digit, a missing source_ref, no name, a repeated source_ref, a malformed
phone, a wrong number of columns, a control character), to show the rejects file and the report's
warnings: at least one from MIN_DIRTY_ROWS rows on (4% of 30 rows used to round to none).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from server.cli.import_files import CUSTOMER_COLUMNS

_AREAS = (212, 312, 415, 617, 206, 303, 512, 404, 305, 702)
_NICKNAMES = {"william": "Bill", "robert": "Bob", "elizabeth": "Liz", "margaret": "Peggy", "james": "Jim",
              "richard": "Dick", "katherine": "Kate", "michael": "Mike", "jennifer": "Jen", "thomas": "Tom"}
DIRTY_KINDS = ("bad_date", "bad_ssn", "no_source_ref", "no_name", "repeated_ref", "bad_phone", "columns",
               "control")
DUPLICATE_SHARE = 0.05    # rows that are another source record of an earlier person
DIRTY_SHARE = 0.04        # --dirty: rows broken on purpose
MIN_DIRTY_ROWS = 2        # --dirty: from this many rows on, at least one is broken (never the first)


def _ssn(rng: random.Random) -> str:
    return f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def _person(fake: object, rng: random.Random, n: int) -> dict[str, str]:
    f = fake
    born = f.date_of_birth(minimum_age=18, maximum_age=90)  # type: ignore[attr-defined]
    given = rng.choice((f.first_name_male(), f.first_name_female()))  # type: ignore[attr-defined]
    if rng.random() < 0.05:
        given = rng.choice(tuple(_NICKNAMES)).title()
    family = f.last_name()  # type: ignore[attr-defined]
    return {
        "source_ref": f"C{n:08d}", "given_name": given, "family_name": family,
        "date_of_birth": born.isoformat(), "national_id": _ssn(rng) if rng.random() < 0.7 else "",
        "national_id_type": "US_SSN", "address_line1": f.street_address(),  # type: ignore[attr-defined]
        "address_line2": "", "locality": f.city(), "postcode": f.postcode(),  # type: ignore[attr-defined]
        "region": f.state_abbr(), "country": "US",  # type: ignore[attr-defined]
        "phone": f"({rng.choice(_AREAS)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}",
        "email": f"{given.lower()}.{family.lower()}{rng.randint(1, 999)}@example.com".replace(" ", ""),
    }


def _variant(p: dict[str, str], rng: random.Random, n: int) -> dict[str, str]:
    v = dict(p, source_ref=f"C{n:08d}")
    change = rng.randrange(4)
    if change == 0:
        v["given_name"] = _NICKNAMES.get(p["given_name"].lower(), p["given_name"][:1] + ".")
    elif change == 1 and len(p["family_name"]) > 3:
        i = rng.randrange(1, len(p["family_name"]) - 1)
        v["family_name"] = p["family_name"][:i] + p["family_name"][i + 1] + p["family_name"][i] \
            + p["family_name"][i + 2:]
    elif change == 2:
        v["phone"] = "+1 " + "".join(c for c in p["phone"] if c.isdigit())
    else:
        y, m, d = p["date_of_birth"].split("-")
        if int(d) <= 12:
            v["date_of_birth"] = f"{y}-{d}-{m}"
    v["email"] = "" if rng.random() < 0.5 else v["email"]
    return v


def _dirty(p: dict[str, str], kind: str, rng: random.Random, refs: list[str]) -> list[str]:
    r = dict(p)
    if kind == "bad_date":
        r["date_of_birth"] = rng.choice(("1985-02-30", "12/31/1980", "2999-01-01", "1850-06-01"))
    elif kind == "bad_ssn":
        r["national_id"] = "000-12-3456"
    elif kind == "no_source_ref":
        r["source_ref"] = ""
    elif kind == "no_name":
        r["given_name"] = r["family_name"] = ""
    elif kind == "repeated_ref" and refs:
        r["source_ref"] = rng.choice(refs)
    elif kind == "bad_phone":
        r["phone"] = "12-34"
    elif kind == "control":
        r["family_name"] = r["family_name"] + "\x07"
    cells = [r[c] for c in CUSTOMER_COLUMNS]
    return cells[:-2] if kind == "columns" else cells


def dirty_rows(rows: int, rng: random.Random) -> dict[int, str]:
    """Row index -> how --dirty breaks it: DIRTY_SHARE of the rows, at least one from MIN_DIRTY_ROWS
    on, never the first (a repeated source_ref needs an earlier one); the kinds in turn from a random
    start, so a small file shows as many kinds as it has dirty rows."""
    if rows < MIN_DIRTY_ROWS:
        return {}
    picked = sorted(rng.sample(range(1, rows), max(1, round(rows * DIRTY_SHARE))))
    first = rng.randrange(len(DIRTY_KINDS))
    return {n: DIRTY_KINDS[(first + i) % len(DIRTY_KINDS)] for i, n in enumerate(picked)}


def write_sample(out: Path, rows: int, *, dirty: bool = False, seed: int | None = None) -> dict[str, int]:
    """Write `rows` data rows; returns how many of each kind (people, duplicates, each dirty kind)."""
    from faker import Faker

    rng = random.Random(seed)
    fake = Faker("en_US")
    fake.seed_instance(rng.randrange(1 << 30))
    counts: dict[str, int] = {"people": 0, "duplicates": 0}
    broken = dirty_rows(rows, rng) if dirty else {}
    people: list[dict[str, str]] = []
    refs: list[str] = []
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CUSTOMER_COLUMNS)
        for n in range(rows):
            kind = broken.get(n)
            if kind:
                w.writerow(_dirty(_person(fake, rng, n), kind, rng, refs))
                counts[kind] = counts.get(kind, 0) + 1
                continue
            if rng.random() < DUPLICATE_SHARE and people:
                row = _variant(rng.choice(people), rng, n)
                counts["duplicates"] += 1
            else:
                row = _person(fake, rng, n)
                people.append(row)
                counts["people"] += 1
            refs.append(row["source_ref"])
            w.writerow([row[c] for c in CUSTOMER_COLUMNS])
    return counts
