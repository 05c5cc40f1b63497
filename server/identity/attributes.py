"""Identity attributes: parse, validate and normalise what a caller or a source file says about a
person (pure; no I/O). docs/identity.md is the manual.

One `Identity` is what matching compares and what a source record stores (encrypted): every value
normalised once, on the way in, so comparison and blocking never re-parse. Parsing reports each bad
attribute as an `AttributeProblem` with its field name: an RPC refuses the request on the first one
(INVALID_ARGUMENT), a bulk import drops the attribute and lists a warning (a dirty date in a source
system must not lose a customer). A problem's text never contains the value when the value is
sensitive (national id, date of birth).

Free text (names, address lines, locality, region, postcode, email) and source references are kept
and answered in clear, so any of them holding what looks like a card number is refused
(`server.pan.contains_card_number`): PCI DSS allows no PAN outside the card vault
(docs/security.md). The phone is exempt: it is checked against its country's numbering plan, and
one in ten long international numbers would pass Luhn.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, fields, replace
from datetime import date, datetime, timedelta, timezone
from typing import Any

import phonenumbers

from server.identity.nationalid import NATIONAL_ID_TYPES, NationalIdError, normalise_national_id
from server.pan import contains_card_number

MAX_NAME = 100
MAX_LINE = 200
MAX_EMAIL = 254
MIN_BIRTH_YEAR = 1900
_SOURCE_SYSTEM = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_SOURCE_KEY = 128
CARD_NUMBER = "looks like a card number (13-19 digits passing the Luhn check)"
_EMAIL = re.compile(r"[^@\s]{1,64}@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+")
_NAME_DROP = re.compile(r"[^\w '\-]|[\d_]")
_SPACES = re.compile(r"\s+")
_COUNTRY = re.compile(r"[A-Z]{2}")
# Common street-type and unit words, so "12 Main Street" and "12 MAIN ST." compare equal.
_ADDRESS_WORDS = {
    "street": "st", "avenue": "ave", "av": "ave", "road": "rd", "drive": "dr", "lane": "ln",
    "boulevard": "blvd", "court": "ct", "place": "pl", "square": "sq", "terrace": "ter", "highway": "hwy",
    "parkway": "pkwy", "circle": "cir", "apartment": "apt", "suite": "ste", "north": "n", "south": "s",
    "east": "e", "west": "w", "floor": "fl", "unit": "unit", "#": "apt",
}


class AttributeProblem(ValueError):
    """One attribute is unusable. `field` names it; the message never holds a sensitive value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@dataclass(frozen=True)
class Identity:
    """Normalised identity attributes; "" = unknown. Names are case-folded letters without
    accents (any script); date_of_birth ISO; phone E.164; national_id canonical for its type."""

    given_name: str = ""
    family_name: str = ""
    date_of_birth: str = ""
    national_id: str = ""
    national_id_type: str = ""
    address_line1: str = ""
    address_line2: str = ""
    locality: str = ""
    postcode: str = ""
    region: str = ""
    country: str = ""
    phone: str = ""
    email: str = ""

    def to_dict(self) -> dict[str, str]:
        # Not dataclasses.asdict: its deep copy was a third of a bulk import's sealing time.
        return {k: v for k in _FIELD_NAMES if (v := getattr(self, k))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Identity:
        known = {f.name for f in fields(cls)}
        return cls(**{k: str(v) for k, v in data.items() if k in known})

    @property
    def national_id_key(self) -> str:
        """What the national id fingerprint is taken of: type and canonical id."""
        return f"{self.national_id_type or 'OPAQUE'}:{self.national_id}" if self.national_id else ""

    @property
    def national_id_last4(self) -> str:
        return self.national_id[-4:]

    def without(self, field: str) -> Identity:
        if field == "national_id":
            return replace(self, national_id="", national_id_type="")
        return replace(self, **{field: ""})


_FIELD_NAMES = tuple(f.name for f in fields(Identity))


@dataclass(frozen=True)
class SourceRef:
    system: str
    key: str


def parse_source_ref(system: str, key: str) -> SourceRef:
    if not _SOURCE_SYSTEM.fullmatch(system):
        raise AttributeProblem("source_ref.system", "must be 1-64 of a-z, 0-9, '.', '_', '-' (starting with a"
                                                    " letter or digit)")
    if not key or len(key) > MAX_SOURCE_KEY or not key.isprintable() or key != key.strip():
        raise AttributeProblem("source_ref.key", f"must be 1-{MAX_SOURCE_KEY} printable characters without"
                                                 " leading or trailing spaces")
    # Both are stored, listed and echoed in clear (source_records, import reports, GetCustomerIdentity).
    if contains_card_number(system):
        raise AttributeProblem("source_ref.system", CARD_NUMBER)
    if contains_card_number(key):
        raise AttributeProblem("source_ref.key", CARD_NUMBER)
    return SourceRef(system, key)


def _clean_text(field: str, value: str, limit: int, *, card_check: bool = True) -> str:
    """NFKC, no control characters, collapsed spaces, within `limit` characters, and (unless
    `card_check` is off) nothing that looks like a card number."""
    if value.isascii():
        # Most source data: NFKC leaves ASCII alone, and its only controls (Cc) are what
        # isprintable() refuses besides the space (a bulk import's fast path: ~3x cheaper).
        text = value
        if not text.replace(" ", "").isprintable():
            raise AttributeProblem(field, "contains control or unassigned characters")
    else:
        text = unicodedata.normalize("NFKC", value)
        if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") for c in text):
            raise AttributeProblem(field, "contains control or unassigned characters")
    text = _SPACES.sub(" ", text).strip()
    if len(text) > limit:
        raise AttributeProblem(field, f"is longer than {limit} characters")
    if card_check and contains_card_number(text):
        raise AttributeProblem(field, CARD_NUMBER)
    return text


def fold(text: str) -> str:
    """Case-folded ASCII without accents: 'Zoë Ó'Brien' -> "zoe o'brien"."""
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).replace("ß", "ss")


def normalise_name(field: str, value: str) -> str:
    text = _clean_text(field, value, MAX_NAME)
    if not text:
        return ""
    folded = _SPACES.sub(" ", _NAME_DROP.sub(" ", fold(text))).strip(" '-")
    if not any(c.isalpha() for c in folded):
        raise AttributeProblem(field, "has no letters")
    return folded


# The first zone to start each day (UTC+14, Kiribati's Line Islands): a birth date is refused as "after
# today" only once it is in the future everywhere. date.today() was the node's local date, so a node on
# UTC (or further west) refused the date of someone born today east of it, for up to a day.
_FIRST_ZONE = timezone(timedelta(hours=14))


def normalise_date_of_birth(value: str, *, today: date | None = None) -> str:
    text = value.strip()
    if not text:
        return ""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise AttributeProblem("date_of_birth", "must be YYYY-MM-DD")
    try:
        born = date.fromisoformat(text)
    except ValueError:
        raise AttributeProblem("date_of_birth", "is not a calendar date") from None
    if born.year < MIN_BIRTH_YEAR or born > (today or datetime.now(_FIRST_ZONE).date()):
        raise AttributeProblem("date_of_birth", f"must be between {MIN_BIRTH_YEAR} and today")
    return born.isoformat()


def normalise_address_line(field: str, value: str) -> str:
    text = fold(_clean_text(field, value, MAX_LINE))
    words = re.sub(r"[.,;]", " ", text).split()
    return " ".join(_ADDRESS_WORDS.get(w, w) for w in words)


def normalise_postcode(value: str) -> str:
    text = _clean_text("postcode", value, 16).upper().replace(" ", "").replace("-", "")
    if text and not text.isalnum():
        raise AttributeProblem("postcode", "must be letters and digits")
    return text


def normalise_country(value: str) -> str:
    text = value.strip().upper()
    if text and not _COUNTRY.fullmatch(text):
        raise AttributeProblem("country", "must be an ISO 3166-1 alpha-2 code such as US")
    return text


def normalise_phone(value: str, country: str) -> str:
    text = _clean_text("phone", value, 32, card_check=False)
    if not text:
        return ""
    try:
        number = phonenumbers.parse(text, country or "US")
    except phonenumbers.NumberParseException:
        raise AttributeProblem("phone", "is not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise AttributeProblem("phone", "is not a valid number for its country")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def normalise_email(value: str) -> str:
    text = _clean_text("email", value, MAX_EMAIL).lower()
    if text and not _EMAIL.fullmatch(text):
        raise AttributeProblem("email", "is not an email address")
    return text


# The attributes kept as text a person wrote (the others are dates, codes or a phone number).
_FREE_TEXT = frozenset({"given_name", "family_name", "address_line1", "address_line2", "locality", "region",
                        "postcode", "email"})


def parse_identity(raw: dict[str, str], *, strict: bool) -> tuple[Identity, list[AttributeProblem]]:
    """Normalise `raw` (the IdentityAttributes field names, address fields flattened with an
    `address_` prefix for line1/line2). strict: raise the first problem; else drop the attribute and
    return the problems as warnings."""
    problems: list[AttributeProblem] = []
    out: dict[str, str] = {}

    def take(field: str, parse: Any, *args: Any) -> None:
        try:
            value = parse(*args)
            # Checked again as stored: normalising joins what the raw text's check kept apart
            # ("4111;1111;1111;1111" in an address line becomes spaced digit groups; a postcode loses
            # its dashes), and the stored value is what GetCustomerIdentity answers.
            if field in _FREE_TEXT and contains_card_number(value):
                raise AttributeProblem(field, CARD_NUMBER)
            out[field] = value
        except AttributeProblem as problem:
            if strict:
                raise
            problems.append(problem)

    get = raw.get
    take("given_name", normalise_name, "given_name", get("given_name", ""))
    take("family_name", normalise_name, "family_name", get("family_name", ""))
    take("date_of_birth", normalise_date_of_birth, get("date_of_birth", ""))
    take("country", normalise_country, get("country", ""))
    take("address_line1", normalise_address_line, "address_line1", get("address_line1", ""))
    take("address_line2", normalise_address_line, "address_line2", get("address_line2", ""))
    take("locality", lambda v: fold(_clean_text("locality", v, MAX_NAME)), get("locality", ""))
    take("region", lambda v: fold(_clean_text("region", v, MAX_NAME)), get("region", ""))
    take("postcode", normalise_postcode, get("postcode", ""))
    take("phone", normalise_phone, get("phone", ""), out.get("country", ""))
    take("email", normalise_email, get("email", ""))
    id_type = get("national_id_type", "").strip().upper()
    national_id = get("national_id", "")
    if national_id.strip() or id_type:
        try:
            if id_type and id_type not in NATIONAL_ID_TYPES:
                raise AttributeProblem("national_id_type", f"must be one of {', '.join(sorted(NATIONAL_ID_TYPES))}"
                                                           " or empty (an opaque id)")
            if not national_id.strip():
                raise AttributeProblem("national_id", "is empty but national_id_type is set")
            out["national_id"] = normalise_national_id(id_type, national_id)
            out["national_id_type"] = id_type
        except NationalIdError as exc:
            problem = AttributeProblem("national_id", str(exc))
            if strict:
                raise problem from None
            problems.append(problem)
        except AttributeProblem as problem:
            if strict:
                raise
            problems.append(problem)
    return Identity(**out), problems


def has_name(identity: Identity) -> bool:
    return bool(identity.given_name or identity.family_name)
