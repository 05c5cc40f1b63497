"""Generated people with known truth, for the identity model's training and quality benchmark.

Every value is made up at run time (Faker, seeded; national ids drawn at random and checked with
python-stdnum): nothing generated is committed. A *person* has 1..4 records, each from one source
system; the first is the person's `original`, every further one a duplicate of one *variant kind*:

    copy              the same person from another source (only formatting and that source's gaps)
    format            case, accents, abbreviations, phone and national id formats, a middle initial
    typo_given        one typo in the given name (adjacent key, deletion, insertion, transposition)
    typo_family       one typo in the family name
    nickname          a nickname or the canonical name (the `nicknames` table compare.py uses)
    swapped_names     given and family name the wrong way round
    dob_day_month     day and month of the date of birth transposed
    dob_typo          one digit of the date of birth wrong (still a calendar date)
    moved             a new address (and often a new phone)
    missing           several attributes missing
    married           a new family name (often with a new address and email)
    national_id_typo  one digit of the national id wrong (still a valid SSN)

Besides, some people are *hard negatives* of another person: two different people the model must
not merge.

    household    same family name and address (often the landline), other given name and birth date
    twin         same birth date, family name and address, other given name and SSN
    common_name  same given and family name, everything else different
    junior       same given and family name and address, born 18-40 years later (Jr/Sr)

Every source knows some attributes only: a card platform or a CRM rarely holds the national id
(`SOURCES`), which is realistic and what makes the rest of the model matter.

`crs-load identity-people --records N --seed S --out DIR` writes DIR/people.csv (the bulk import's
format) and DIR/truth.csv (source_ref, person, variant, and the hard-negative relation).
"""

from __future__ import annotations

import argparse
import csv
import random
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import phonenumbers
from faker import Faker
from nicknames import NickNamer
from stdnum.us import ssn as stdnum_ssn

HEADER = ("source_ref", "given_name", "family_name", "date_of_birth", "national_id", "national_id_type",
          "address_line1", "address_line2", "locality", "postcode", "region", "country", "phone", "email")
VARIANTS = ("copy", "format", "typo_given", "typo_family", "nickname", "swapped_names", "dob_day_month",
            "dob_typo", "moved", "missing", "married", "national_id_typo")
# How often each variant kind is drawn for a duplicate (relative).
VARIANT_WEIGHTS = {"copy": 10, "format": 12, "typo_given": 8, "typo_family": 8, "nickname": 8, "swapped_names": 4,
                   "dob_day_month": 4, "dob_typo": 5, "moved": 12, "missing": 8, "married": 5,
                   "national_id_typo": 2}
NEGATIVES = ("household", "twin", "common_name", "junior")
# Per source: the probability that a record holds each attribute.
SOURCES: dict[str, dict[str, float]] = {
    "core": {"national_id": 0.95, "date_of_birth": 1.0, "address": 0.98, "phone": 0.8, "email": 0.5},
    "onboarding": {"national_id": 0.8, "date_of_birth": 0.98, "address": 0.95, "phone": 0.9, "email": 0.9},
    "cards": {"national_id": 0.3, "date_of_birth": 0.9, "address": 0.95, "phone": 0.9, "email": 0.8},
    "crm": {"national_id": 0.1, "date_of_birth": 0.7, "address": 0.8, "phone": 0.8, "email": 0.9},
    "mortgage": {"national_id": 0.9, "date_of_birth": 0.95, "address": 0.99, "phone": 0.6, "email": 0.4},
}
RECORDS_PER_PERSON = {1: 45, 2: 30, 3: 15, 4: 10}
NEGATIVE_SHARE = 0.15          # of the people: a hard negative of an earlier person
SHARED_PHONE = 0.3             # a household, twin or junior shares the landline
OTHER_LOCALES = ("es_MX", "fr_FR", "de_DE")    # some names with accents
# Area codes in service (the rest of the number is random, checked with phonenumbers).
_AREA_CODES = ("201", "202", "206", "212", "213", "214", "303", "305", "312", "404", "415", "480", "503", "512",
               "602", "617", "702", "713", "718", "801", "832", "917", "929", "954")
_KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_ABBREVIATIONS = {"Street": "St", "Avenue": "Ave", "Road": "Rd", "Drive": "Dr", "Lane": "Ln", "Court": "Ct",
                  "Place": "Pl", "Boulevard": "Blvd", "Suite": "Ste", "Apt.": "Apartment"}
_namer = NickNamer()


@dataclass(frozen=True)
class Person:
    pid: int
    given: str
    family: str
    born: date
    ssn: str
    line1: str
    line2: str
    locality: str
    postcode: str
    region: str
    phone: str
    email: str
    female: bool


@dataclass(frozen=True)
class Truth:
    source_ref: str
    person: int
    variant: str            # "original" for a person's first record


@dataclass
class People:
    rows: list[dict[str, str]] = field(default_factory=list)
    truth: list[Truth] = field(default_factory=list)
    # (person, the earlier person it resembles, the hard-negative kind)
    negatives: list[tuple[int, int, str]] = field(default_factory=list)


def _adjacent(c: str, rng: random.Random) -> str:
    for row in _KEYBOARD:
        i = row.find(c.lower())
        if i >= 0:
            near = [row[k] for k in (i - 1, i + 1) if 0 <= k < len(row)]
            return rng.choice(near)
    return rng.choice("aeiou")


def typo(text: str, rng: random.Random) -> str:
    """One typing error: adjacent-key substitution, deletion, insertion or transposition."""
    if len(text) < 3:
        return text + _adjacent(text[-1], rng)
    for _ in range(10):
        i = rng.randrange(1, len(text) - 1)   # keep the first letter (most typists do)
        kind = rng.choice(("substitute", "delete", "insert", "transpose"))
        if kind == "substitute":
            out = text[:i] + _adjacent(text[i], rng) + text[i + 1:]
        elif kind == "delete":
            out = text[:i] + text[i + 1:]
        elif kind == "insert":
            out = text[:i] + _adjacent(text[i], rng) + text[i:]
        else:
            out = text[:i] + text[i + 1] + text[i] + text[i + 2:]
        if out.lower() != text.lower():
            return out
    return text + "e"


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def random_ssn(rng: random.Random) -> str:
    while True:
        area = rng.randrange(1, 900)
        if area == 666:
            continue
        value = f"{area:03d}{rng.randrange(1, 100):02d}{rng.randrange(1, 10000):04d}"
        if stdnum_ssn.is_valid(value):
            return value


def ssn_typo(value: str, rng: random.Random) -> str:
    while True:
        i = rng.randrange(len(value))
        out = value[:i] + str((int(value[i]) + rng.randrange(1, 10)) % 10) + value[i + 1:]
        if stdnum_ssn.is_valid(out):
            return out


def random_phone(rng: random.Random) -> str:
    """A valid US number as 10 digits."""
    while True:
        exchange = rng.randrange(200, 1000)
        if exchange % 100 == 11 or exchange == 555:
            continue
        digits = f"{rng.choice(_AREA_CODES)}{exchange:03d}{rng.randrange(10000):04d}"
        if phonenumbers.is_valid_number(phonenumbers.parse(digits, "US")):
            return digits


def format_phone(digits: str, rng: random.Random) -> str:
    a, b, c = digits[:3], digits[3:6], digits[6:]
    return rng.choice((f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"+1 {a} {b} {c}", digits,
                       f"1-{a}-{b}-{c}"))


def format_ssn(value: str, rng: random.Random) -> str:
    return rng.choice((f"{value[:3]}-{value[3:5]}-{value[5:]}", value, f"{value[:3]} {value[3:5]} {value[5:]}"))


def _valid_date(y: int, m: int, d: int) -> date | None:
    try:
        out = date(y, m, d)
    except ValueError:
        return None
    return out if date(1900, 1, 1) <= out <= date.today() else None


def dob_typo(born: date, rng: random.Random) -> date:
    text = born.strftime("%Y%m%d")
    for _ in range(100):
        i = rng.randrange(2, 8)       # a typist does not get the century wrong
        new = text[:i] + str(rng.randrange(10)) + text[i + 1:]
        out = _valid_date(int(new[:4]), int(new[4:6]), int(new[6:]))
        if out and out != born and not (out.month == born.day and out.day == born.month):
            return out
    return born + timedelta(days=1)


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fake = Faker(["en_US", *OTHER_LOCALES])
        self.fake.seed_instance(seed)
        self.people: list[Person] = []

    # --- people ---------------------------------------------------------------------------------
    def _names(self, female: bool) -> tuple[str, str]:
        locale = "en_US" if self.rng.random() < 0.85 else self.rng.choice(OTHER_LOCALES)
        f = self.fake[locale]
        given = f.first_name_female() if female else f.first_name_male()
        return given, f.last_name()

    def _given(self, female: bool, other_than: str) -> str:
        while True:
            given, _ = self._names(female)
            if given.lower() != other_than.lower() and given.lower() not in _nickname_set(other_than):
                return given

    def _address(self) -> dict[str, str]:
        f = self.fake["en_US"]
        line2 = ""
        if self.rng.random() < 0.2:
            line2 = f.secondary_address()
        return {"line1": f"{f.building_number()} {f.street_name()}", "line2": line2, "locality": f.city(),
                "postcode": f.postcode(), "region": f.state_abbr(include_territories=False)}

    def _email(self, given: str, family: str) -> str:
        local = strip_accents(f"{given}.{family}").lower().replace(" ", "").replace("'", "")
        if self.rng.random() < 0.5:
            local += str(self.rng.randrange(1, 100))
        return f"{local}@{self.fake['en_US'].free_email_domain()}"

    def _born(self, low: int = 1935, high: int = 2006) -> date:
        return date(low, 1, 1) + timedelta(days=self.rng.randrange((date(high, 12, 31) - date(low, 1, 1)).days))

    def new_person(self) -> Person:
        female = self.rng.random() < 0.5
        given, family = self._names(female)
        a = self._address()
        return Person(len(self.people), given, family, self._born(), random_ssn(self.rng), a["line1"], a["line2"],
                      a["locality"], a["postcode"], a["region"], random_phone(self.rng), self._email(given, family),
                      female)

    def negative_of(self, base: Person, kind: str) -> Person:
        p = self.new_person()
        rng = self.rng
        same_address = {"line1": base.line1, "line2": base.line2, "locality": base.locality,
                        "postcode": base.postcode, "region": base.region}
        phone = base.phone if rng.random() < SHARED_PHONE else p.phone
        if kind == "household":
            born = base.born + timedelta(days=rng.choice((1, -1)) * rng.randrange(365, 365 * 30))
            given = self._given(p.female, base.given)
            p = replace(p, given=given, family=base.family, born=min(born, date(2006, 12, 31)), phone=phone,
                        email=self._email(given, base.family), **same_address)
        elif kind == "twin":
            given = self._given(p.female, base.given)
            p = replace(p, given=given, family=base.family, born=base.born, phone=phone,
                        email=self._email(given, base.family), **same_address)
        elif kind == "common_name":
            p = replace(p, given=base.given, family=base.family, female=base.female,
                        email=self._email(base.given, base.family))
        else:   # junior
            born = base.born + timedelta(days=rng.randrange(365 * 18, 365 * 40))
            if born > date(2006, 12, 31):
                born = base.born - timedelta(days=rng.randrange(365 * 18, 365 * 40))
            p = replace(p, given=base.given, family=base.family, born=born, female=base.female, phone=phone,
                        email=self._email(base.given, base.family), **same_address)
        return p

    # --- records --------------------------------------------------------------------------------
    def variant_of(self, p: Person, kind: str) -> tuple[Person, str] | None:
        """The person as a duplicate of `kind` sees them, and the kind (None: not applicable)."""
        rng = self.rng
        if kind == "typo_given":
            return replace(p, given=typo(p.given, rng)), kind
        if kind == "typo_family":
            return replace(p, family=typo(p.family, rng)), kind
        if kind == "nickname":
            names = sorted(_nickname_set(p.given) - {p.given.lower()})
            if not names:
                return None
            return replace(p, given=rng.choice(names).title()), kind
        if kind == "swapped_names":
            return replace(p, given=p.family, family=p.given), kind
        if kind == "dob_day_month":
            if p.born.day > 12 or p.born.day == p.born.month:
                return None
            return replace(p, born=date(p.born.year, p.born.day, p.born.month)), kind
        if kind == "dob_typo":
            return replace(p, born=dob_typo(p.born, rng)), kind
        if kind == "moved":
            a = self._address()
            phone = random_phone(rng) if rng.random() < 0.5 else p.phone
            return replace(p, line1=a["line1"], line2=a["line2"], locality=a["locality"], postcode=a["postcode"],
                           region=a["region"], phone=phone), kind
        if kind == "married":
            _, family = self._names(p.female)
            if family.lower() == p.family.lower():
                return None
            out = replace(p, family=family)
            if rng.random() < 0.6:
                a = self._address()
                out = replace(out, line1=a["line1"], line2=a["line2"], locality=a["locality"],
                              postcode=a["postcode"], region=a["region"])
            if rng.random() < 0.5:
                out = replace(out, email=self._email(p.given, family))
            return out, kind
        if kind == "national_id_typo":
            return replace(p, ssn=ssn_typo(p.ssn, rng)), kind
        return p, kind       # copy, format, missing: handled when rendering

    def render(self, p: Person, source: str, key: int, kind: str) -> dict[str, str]:
        rng = self.rng
        has = SOURCES[source]
        fancy = kind == "format" or rng.random() < 0.15       # some formatting noise everywhere
        given, family, line1 = p.given, p.family, p.line1
        if fancy:
            if rng.random() < 0.3:
                given, family = given.upper(), family.upper()
            if rng.random() < 0.3:
                given, family = strip_accents(given), strip_accents(family)
            if rng.random() < 0.2:
                given = f"{given} {chr(rng.randrange(65, 91))}"      # a middle initial
            for word, short in _ABBREVIATIONS.items():
                if rng.random() < 0.5:
                    line1 = line1.replace(word, short)
            if rng.random() < 0.2:
                line1 = line1.upper()
        row = {"source_ref": f"{source}:{key:08d}", "given_name": given, "family_name": family,
               "date_of_birth": "", "national_id": "", "national_id_type": "", "address_line1": "",
               "address_line2": "", "locality": "", "postcode": "", "region": "", "country": "", "phone": "",
               "email": ""}
        if rng.random() < has["date_of_birth"] or kind in ("dob_day_month", "dob_typo"):
            row["date_of_birth"] = p.born.isoformat()
        if rng.random() < has["national_id"] or kind == "national_id_typo":
            row["national_id"] = format_ssn(p.ssn, rng) if fancy else p.ssn
            row["national_id_type"] = "US_SSN"
        if rng.random() < has["address"] or kind in ("moved", "married"):
            row.update(address_line1=line1, address_line2=p.line2, locality=p.locality, postcode=p.postcode,
                       region=p.region, country="US" if rng.random() < 0.9 else "")
        if rng.random() < has["phone"]:
            row["phone"] = format_phone(p.phone, rng) if fancy else p.phone
        if rng.random() < has["email"]:
            row["email"] = p.email.upper() if fancy and rng.random() < 0.3 else p.email
        if kind == "missing":
            for name in rng.sample(("date_of_birth", "national_id", "address", "phone", "email", "given_name"), 2):
                if name == "national_id":
                    row["national_id"] = row["national_id_type"] = ""
                elif name == "address":
                    for k in ("address_line1", "address_line2", "locality", "postcode", "region", "country"):
                        row[k] = ""
                else:
                    row[name] = ""
        return row

    def records_of(self, p: Person, n: int, first_key: int) -> Iterator[tuple[dict[str, str], str]]:
        sources = self.rng.sample(sorted(SOURCES), k=min(n, len(SOURCES)))
        kinds, weights = zip(*VARIANT_WEIGHTS.items(), strict=True)
        for i in range(n):
            source = sources[i % len(sources)]
            if i == 0:
                yield self.render(p, source, first_key, "copy"), "original"
                continue
            while True:
                drawn = self.variant_of(p, self.rng.choices(kinds, weights)[0])
                if drawn is not None:
                    break
            seen, kind = drawn
            yield self.render(seen, source, first_key + i, kind), kind


def _nickname_set(given: str) -> set[str]:
    first = given.lower().split(" ")[0]
    return {first} | set(_namer.nicknames_of(first)) | set(_namer.canonicals_of(first))


def generate(records: int, seed: int) -> People:
    """`records` rows of made-up people (the same for the same seed), with their truth."""
    g = Generator(seed)
    out = People()
    sizes, size_weights = zip(*RECORDS_PER_PERSON.items(), strict=True)
    key = 0
    while len(out.rows) < records:
        if g.people and g.rng.random() < NEGATIVE_SHARE:
            base = g.rng.choice(g.people)
            kind = g.rng.choice(NEGATIVES)
            person = replace(g.negative_of(base, kind), pid=len(g.people))
            out.negatives.append((person.pid, base.pid, kind))
        else:
            person = g.new_person()
        g.people.append(person)
        n = min(g.rng.choices(sizes, size_weights)[0], records - len(out.rows))
        for row, variant in g.records_of(person, n, key):
            out.rows.append(row)
            out.truth.append(Truth(row["source_ref"], person.pid, variant))
        key += n
    return out


def write(people: People, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rows_path, truth_path = directory / "people.csv", directory / "truth.csv"
    with rows_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=HEADER)
        w.writeheader()
        w.writerows(people.rows)
    negative = {pid: (other, kind) for pid, other, kind in people.negatives}
    with truth_path.open("w", newline="", encoding="utf-8") as f:
        tw = csv.writer(f)
        tw.writerow(("source_ref", "person", "variant", "negative_of", "negative_kind"))
        for t in people.truth:
            other, kind = negative.get(t.person, ("", ""))
            tw.writerow((t.source_ref, t.person, t.variant, other, kind))
    return rows_path, truth_path


def cmd_people(args: argparse.Namespace) -> int:
    rows_path, truth_path = write(generate(args.records, args.seed), Path(args.out))
    print(f"wrote {args.records} records to {rows_path} and their truth to {truth_path}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "identity-people", help="made-up people with known duplicates and hard negatives (CSV + truth)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=10_000, help="records to write (default 10000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--out", default="identity-people", help="directory for people.csv and truth.csv")
    p.set_defaults(func=cmd_people)
    return p
