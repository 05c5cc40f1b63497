"""The golden record: one customer's attributes chosen from the records of every source that fed it
(survivorship), and the conversions between `Identity` and crs.v1.IdentityAttributes (pure).

Survivorship rules (docs/identity.md, "Survivorship"), applied per attribute group so that values
that belong together are never mixed from two records:
- national id (with its type) and date of birth: the value most records agree on; a tie goes to
  the most recently updated record. A typo in one source does not outvote two that agree.
- name (given and family together): the most recently updated record that has both, else any part;
  a given name that is only an initial gives way to an older record of the same family name that
  spells it out ("b morrow" after "brittany morrow": brittany).
- postal address (every line together): the most recently updated record with a first line.
- phone, email: the most recently updated record that has one.
Nothing is overwritten: every record keeps what its source said, so an unmerge recomputes each
customer's golden record from its own records exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from server.identity.attributes import Identity
from server.proto import crs_pb2 as pb

_ADDRESS = ("address_line1", "address_line2", "locality", "postcode", "region", "country")


@dataclass(frozen=True)
class Contribution:
    """One source record of a customer, as survivorship sees it."""

    identity: Identity
    updated_at: datetime
    record_id: int


def golden(records: Sequence[Contribution]) -> Identity:
    if not records:
        return Identity()
    newest_first = sorted(records, key=lambda r: (r.updated_at, r.record_id), reverse=True)
    out: dict[str, str] = {}

    def voted(*fields: str) -> None:
        values = [tuple(getattr(r.identity, f) for f in fields) for r in newest_first]
        counts = Counter(v for v in values if v[0])
        if counts:
            top = max(counts.values())
            winner = next(v for v in values if v[0] and counts[v] == top)   # newest among the most agreed
            out.update(zip(fields, winner, strict=True))

    def newest(*fields: str, need: str | None = None) -> None:
        for r in newest_first:
            if getattr(r.identity, need or fields[0]):
                out.update({f: getattr(r.identity, f) for f in fields})
                return

    voted("national_id", "national_id_type")
    voted("date_of_birth")
    both = [r for r in newest_first if r.identity.given_name and r.identity.family_name]
    if both:
        name = _spelt_out(both)
        out["given_name"], out["family_name"] = name.given_name, name.family_name
    else:
        newest("given_name")
        newest("family_name")
    newest(*_ADDRESS, need="address_line1")
    newest("phone")
    newest("email")
    return Identity(**out)


def _spelt_out(named: Sequence[Contribution]) -> Identity:
    """The newest record's name, unless its given name is an initial that a record of the same family
    name spells out: then the newest such record's (an initial adds nothing the full name lacks)."""
    newest = named[0].identity
    if len(newest.given_name) == 1:
        for r in named[1:]:
            given = r.identity.given_name
            if r.identity.family_name == newest.family_name and len(given) > 1 and given[0] == newest.given_name:
                return r.identity
    return newest


def raw_attributes(msg: pb.IdentityAttributes) -> dict[str, str]:
    """An IdentityAttributes request as the flat dict parse_identity takes."""
    a = msg.address
    return {"given_name": msg.given_name, "family_name": msg.family_name, "date_of_birth": msg.date_of_birth,
            "national_id": msg.national_id, "national_id_type": msg.national_id_type,
            "address_line1": a.line1, "address_line2": a.line2, "locality": a.locality, "postcode": a.postcode,
            "region": a.region, "country": a.country, "phone": msg.phone, "email": msg.email}


# parse_identity's field names (the import's columns) as IdentityAttributes spells them.
REQUEST_FIELDS = {"address_line1": "address.line1", "address_line2": "address.line2", "locality": "address.locality",
                  "postcode": "address.postcode", "region": "address.region", "country": "address.country"}


def attributes_msg(identity: Identity) -> pb.IdentityAttributes:
    """An answer: normalised values, the national id as its last four only."""
    i = identity
    return pb.IdentityAttributes(
        given_name=i.given_name, family_name=i.family_name, date_of_birth=i.date_of_birth,
        national_id_type=i.national_id_type, national_id_last4=i.national_id_last4,
        address=pb.PostalAddress(line1=i.address_line1, line2=i.address_line2, locality=i.locality,
                                 postcode=i.postcode, region=i.region, country=i.country),
        phone=i.phone, email=i.email)


def display_name(identity: Identity) -> str:
    return " ".join(p.title() for p in (identity.given_name, identity.family_name) if p)
