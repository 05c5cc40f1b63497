"""National identifiers: validation and canonical form per type (pure).

Where python-stdnum knows the type it decides (checksums, reserved ranges such as SSN area 000/666/9xx
and the published test numbers); the UK National Insurance number, which stdnum does not cover, is
checked here against HMRC's published prefix rules. An empty type is an opaque id: 4-20 letters or
digits, no checksum. Error messages never contain the id.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import ModuleType

from stdnum import exceptions as stdnum_errors
from stdnum.br import cpf
from stdnum.ca import sin
from stdnum.es import dni
from stdnum.us import itin, ssn


class NationalIdError(ValueError):
    """The id is not valid for its type (the message never contains the id)."""


_STDNUM: dict[str, ModuleType] = {"US_SSN": ssn, "US_ITIN": itin, "CA_SIN": sin, "ES_DNI": dni, "BR_CPF": cpf}
_NINO = re.compile(r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\d{6}[A-D]")
_NINO_NEVER = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})
_OPAQUE = re.compile(r"[A-Z0-9]{4,20}")


def _gb_nino(text: str) -> str:
    value = re.sub(r"[\s-]", "", text).upper()
    if not _NINO.fullmatch(value) or value[:2] in _NINO_NEVER:
        raise NationalIdError("is not a valid UK National Insurance number")
    return value


def _opaque(text: str) -> str:
    value = re.sub(r"[\s-]", "", text).upper()
    if not _OPAQUE.fullmatch(value):
        raise NationalIdError("an opaque national id must be 4-20 letters or digits")
    return value


def _stdnum(kind: str, module: ModuleType) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            return str(module.compact(module.validate(text)))
        except stdnum_errors.InvalidChecksum:
            raise NationalIdError(f"fails the {kind} check digit") from None
        except stdnum_errors.ValidationError:
            raise NationalIdError(f"is not a valid {kind}") from None
    return check


_CHECKS: dict[str, Callable[[str], str]] = {
    "": _opaque, "GB_NINO": _gb_nino, **{k: _stdnum(k, m) for k, m in _STDNUM.items()}}
NATIONAL_ID_TYPES = frozenset(k for k in _CHECKS if k)


def normalise_national_id(kind: str, text: str) -> str:
    if len(text) > 64 or not text.isprintable():
        raise NationalIdError("is too long or holds control characters")
    check = _CHECKS.get(kind)
    if check is None:
        raise NationalIdError(f"type must be one of {', '.join(sorted(NATIONAL_ID_TYPES))} or empty")
    return check(text)
