"""Validation and masking of the keys a caller sends: PANs, tokens, ABA routing and account numbers.

Pure functions, no I/O. Every error message describes the problem without repeating the value:
a malformed "PAN" may still be a real card number with a typo.
"""

from __future__ import annotations

import re
import unicodedata

from server.errors import InvalidKey

PAN_MIN_LEN = 12
PAN_MAX_LEN = 19
ACCOUNT_MIN_LEN = 4
ACCOUNT_MAX_LEN = 17
ROUTING_LEN = 9
# The most characters an error message counts: a 16 MB "pan" is reported as "more than 9999".
COUNTED_MAX = 9999
# Card-number-like runs in free text (contains_card_number). From 13: a 12-digit run is as often a phone
# number with its country code or another system's reference, and refusing one in ten of them (the Luhn
# odds) would refuse real addresses and keys; 12-digit PANs (some Maestro) are rare.
CARD_RUN_MIN = 13
CARD_RUN_MAX = PAN_MAX_LEN
TOKEN_PREFIX = "tok_"
CUSTOMER_PREFIX = "cus_"
ACCOUNT_PREFIX = "acc_"
_TOKEN_RE = re.compile(r"tok_[0-9a-z]{20,40}")
_CUSTOMER_RE = re.compile(r"cus_[0-9a-z]{8,40}")
_ACCOUNT_ID_RE = re.compile(r"acc_[0-9a-z]{8,40}")
_EXPIRY_RE = re.compile(r"(20[0-9]{2})-(0[1-9]|1[0-2])")
_ABA_WEIGHTS = (3, 7, 1, 3, 7, 1, 3, 7, 1)


def _is_ascii_digits(value: str) -> bool:
    # str.isdigit() alone accepts Arabic-Indic, fullwidth and superscript digits.
    return value.isascii() and value.isdigit()


# Luhn-doubled value of each ASCII digit, as a bytes.translate table (other bytes map to themselves).
_DOUBLED = bytes((2 * (b - 48) if b < 53 else 2 * (b - 48) - 9) if 48 <= b <= 57 else b for b in range(256))


def luhn_ok(digits: str) -> bool:
    """Luhn over ASCII digits (callers check that first), summed in C over byte slices: ~3x faster than
    a loop per digit, which was ~12% of a BatchResolve key's CPU (docs/decisions.md, serving model)."""
    backwards = digits.encode()[::-1]
    kept = backwards[0::2]
    return (sum(kept) - 48 * len(kept) + sum(backwards[1::2].translate(_DOUBLED))) % 10 == 0


def luhn_check_digit(partial: str) -> str:
    """The digit that makes `partial + digit` Luhn-valid."""
    for d in "0123456789":
        if luhn_ok(partial + d):
            return d
    raise AssertionError("unreachable: one of ten digits always satisfies Luhn")


def parse_pan(value: str) -> str:
    """Return the PAN if it is 12-19 ASCII digits and Luhn-valid, else raise InvalidKey."""
    if not value:
        raise InvalidKey("pan is empty")
    if len(value) < PAN_MIN_LEN or len(value) > PAN_MAX_LEN:
        got = f"more than {COUNTED_MAX}" if len(value) > COUNTED_MAX else str(len(value))
        raise InvalidKey(f"pan must be {PAN_MIN_LEN}-{PAN_MAX_LEN} digits (got {got} characters)")
    if not _is_ascii_digits(value):
        raise InvalidKey("pan must contain only ASCII digits 0-9")
    if not luhn_ok(value):
        raise InvalidKey("pan fails the Luhn check")
    return value


def parse_token(value: str) -> str:
    if not value:
        raise InvalidKey("card token is empty")
    if not _TOKEN_RE.fullmatch(value):
        raise InvalidKey("card token is malformed (expected 'tok_' and 20-40 lowercase letters or digits)")
    return _no_card_number("card token", value)


def parse_customer_id(value: str, field: str = "customer_id") -> str:
    """`field` names the request's field in the message (a merge has two customer ids)."""
    if not value:
        raise InvalidKey(f"{field} is empty")
    if not _CUSTOMER_RE.fullmatch(value):
        raise InvalidKey(f"{field} is malformed (expected 'cus_' and 8-40 lowercase letters or digits)")
    return _no_card_number(field, value)


def parse_account_id(value: str) -> str:
    if not value:
        raise InvalidKey("account_id is empty")
    if not _ACCOUNT_ID_RE.fullmatch(value):
        raise InvalidKey("account_id is malformed (expected 'acc_' and 8-40 lowercase letters or digits)")
    return _no_card_number("account_id", value)


def _no_card_number(field: str, value: str) -> str:
    """An id holding a card number ("cus_<PAN>") is refused before it reaches a cache key, the audit
    log or a NOT_FOUND message; never echoed. The ids new_id makes never hold one (it draws again)."""
    if contains_card_number(value):
        raise InvalidKey(f"{field} holds what looks like a card number (13-19 digits passing the Luhn check)")
    return value


def is_safe_id(value: str) -> bool:
    """A well-formed customer, account or token id holding no card number: what the audit log keeps
    of a refused request's ids."""
    return (any(pattern.fullmatch(value) for pattern in (_CUSTOMER_RE, _ACCOUNT_ID_RE, _TOKEN_RE))
            and not contains_card_number(value))


def aba_ok(routing: str) -> bool:
    return sum(w * (ord(c) - 48) for w, c in zip(_ABA_WEIGHTS, routing, strict=True)) % 10 == 0


def aba_check_digit(first8: str) -> str:
    for d in "0123456789":
        if aba_ok(first8 + d):
            return d
    raise AssertionError("unreachable: one of ten digits always satisfies the ABA checksum")


def routing_number_ok(value: str) -> bool:
    """parse_routing_number's verdict without its message: 9 ASCII digits passing the ABA check."""
    return len(value) == ROUTING_LEN and _is_ascii_digits(value) and aba_ok(value)


def parse_routing_number(value: str) -> str:
    if not value:
        raise InvalidKey("routing_number is empty")
    if len(value) != ROUTING_LEN or not _is_ascii_digits(value):
        raise InvalidKey("routing_number must be exactly 9 ASCII digits")
    if not aba_ok(value):
        raise InvalidKey("routing_number fails the ABA check digit")
    return value


def parse_account_number(value: str) -> str:
    if not value:
        raise InvalidKey("account_number is empty")
    if len(value) < ACCOUNT_MIN_LEN or len(value) > ACCOUNT_MAX_LEN or not _is_ascii_digits(value):
        raise InvalidKey(f"account_number must be {ACCOUNT_MIN_LEN}-{ACCOUNT_MAX_LEN} ASCII digits")
    return value


def parse_expiry(value: str) -> str:
    if not _EXPIRY_RE.fullmatch(value or ""):
        raise InvalidKey("expiry must be YYYY-MM (2000-2099)")
    return value


def mask_pan(pan: str) -> str:
    """First six and last four, the most PCI DSS 3.4.1 allows to display."""
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def mask_pan_parts(bin6: str, last4: str, length: int) -> str:
    return bin6 + "*" * (length - 10) + last4


def mask_account_number(last4: str, length: int = 10) -> str:
    return "*" * max(length - 4, 2) + last4


_ANY_DIGIT = re.compile(r"\d")
_LONG_DIGITS = re.compile(r"(?<![0-9])([0-9]{6})[0-9]{2,9}([0-9]{4})(?![0-9])")


def redact_digits(text: str) -> str:
    """Mask any 12-19 digit run in free text: the last guard before a log line or an audit row is
    written. A card number written in groups ("NNNN NNNN NNNN NNNN", dashes, a card's dotted grouping)
    is no such run: when what is left still holds one (contains_card_number), every digit is masked."""
    masked = _LONG_DIGITS.sub(lambda m: m.group(1) + "******" + m.group(2), text)
    return _ANY_DIGIT.sub("*", masked) if contains_card_number(masked) else masked


# Digit groups split by whitespace or by one dash of any kind (spaces around it allowed): "NNNN NNNN-NNNN
# NNNN". Anything else (a letter, two dashes, brackets) ends the run. \d and \s are Unicode's:
# fullwidth or Arabic-Indic digits and a no-break space are still a card number.
_DIGIT_RUN = re.compile(r"\d+(?:(?:\s*[-\u2010-\u2015\u2212]\s*|\s+)\d+)*")
# A dot, a slash or an underscore splits many keys and dates ("20240115.000123", "2024/01/15/0012345")
# whose digits would pass Luhn one time in ten: those marks count only in a card's own grouping,
# 4-4-4-4 (up to 4-4-4-4-3) or 4-6-5 / 4-6-4, the same mark throughout.
_MARKED_PAN = re.compile(r"(?<!\d)(?:\d{4}([./_])\d{4}(?:\1\d{4}){1,2}(?:\1\d{1,3})?|\d{4}([./_])\d{6}\2\d{4,5})(?!\d)")
_SEPARATOR = re.compile(r"\D+")
# Words no card number is written as, blanked before the search: a UUID; a hex word of a hash's or an
# id's length (24: an ObjectId; 32: MD5 or a UUID without dashes; 40, 48, 56, 64, 96, 128: the SHA
# digests) with a letter in it; and any other hex string of 16 or more characters with a letter in it
# and no run of 13 or more digits. Their digits make 13-19 digit runs that pass Luhn by chance: about
# one uuid4 in 400, and one random 32-hex id in 600, would be refused as a source reference or request
# id and flagged by `crs pci scan`, while no one writes a card number that way. Any other hex word
# holding 13+ digits in a row is read ("<PAN>a", "A<PAN>", "tok_<PAN>abcd" are card numbers with a
# letter beside them: outside audit, 2026-12-05). (A card number split by hex letters, or padded with
# letters to a hash's length, is not found: this guards against card data pasted into text, not
# against someone disguising it.)
_HEX = "[0-9A-Fa-f]"
_ASCII_DIGITS = "0123456789"
_NOT_CARD_WORDS = re.compile(
    rf"(?<![0-9A-Za-z])(?:{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
    rf"|(?=[0-9]*[A-Fa-f])(?:{_HEX}{{128}}|{_HEX}{{96}}|{_HEX}{{64}}|{_HEX}{{56}}|{_HEX}{{48}}|{_HEX}{{40}}"
    rf"|{_HEX}{{32}}|{_HEX}{{24}})(?![0-9A-Za-z])"
    rf"|(?=[0-9]*[A-Fa-f])(?!{_HEX}*?[0-9]{{{CARD_RUN_MIN}}}){_HEX}{{16,}})(?![0-9A-Za-z])")


def contains_card_number(text: str) -> bool:
    """Whether `text` holds what looks like a card number: 13-19 digits, written together or in groups
    split by spaces or dashes (or by dots, slashes or underscores in a card's own grouping), that pass
    the Luhn check. The guard for text that is kept or answered in clear and so must never hold a PAN
    (identity attributes, source references, customer names: docs/security.md).

    A run of groups is judged by its windows of whole groups ("NNNN NNNN NNNN NNNN 12 27": a card
    number and its expiry is caught by its first four groups), leading zeros not counted (a
    zero-padded field of a mainframe extract is still a card number). A single group of more than 19
    digits without separators is a longer number (a PAN is at most 19 digits, ISO/IEC 7812), not judged
    by its inner windows: one in ten of every 13-19 digit window passes Luhn by chance, so a 20-digit
    key would be refused almost always (35 windows: 97%). Scanners that match card numbers between
    word boundaries draw the same line. UUIDs, hash-length hex words, and other hex strings with a
    letter and no 13-digit run, are not read (_NOT_CARD_WORDS)."""
    if len(text) < CARD_RUN_MIN or (text.isascii() and sum(map(text.count, _ASCII_DIGITS)) < CARD_RUN_MIN):
        return False     # too few digits for any card number: ids on the lookup path end here (~1 us, not ~5)
    if not _holds_card_number(text):
        return False
    # Only a text that holds one pays for the second look, without its ids. "#" never joins digit
    # groups, so this can only find less (a space would join "1111 <hex> 1111" into one run).
    return _holds_card_number(_NOT_CARD_WORDS.sub("#", text))


def _holds_card_number(text: str) -> bool:
    for match in _DIGIT_RUN.finditer(text):
        run = match.group()
        if len(run) < CARD_RUN_MIN:
            continue
        if not run.isascii():
            run = "".join(str(unicodedata.digit(c)) if c.isdigit() else " " for c in run)
        if _card_window(_SEPARATOR.split(run)):
            return True
    for match in _MARKED_PAN.finditer(text):
        digits = "".join(str(unicodedata.digit(c)) for c in match.group() if c.isdigit())
        if CARD_RUN_MIN <= len(digits) <= CARD_RUN_MAX and luhn_ok(digits):
            return True
    return False


def _card_window(groups: list[str]) -> bool:
    """Whether some window of whole consecutive groups, leading zeros dropped, is 13-19 digits passing
    Luhn. A window starting with a group of zeros only is the one starting after them, so none starts
    there; every other window ends within 19 groups: linear in the groups (a run of "0 0 0 ..." made
    every window span the rest of the run, and 20 kB took 3 s: outside review, 2026-12-05)."""
    for start, first in enumerate(groups):
        digits, end = first.lstrip("0"), start + 1
        while digits and len(digits) <= CARD_RUN_MAX:   # each group adds a digit at least: 19 at most
            if len(digits) >= CARD_RUN_MIN and luhn_ok(digits):
                return True
            if end == len(groups):
                break
            digits += groups[end]
            end += 1
    return False


def plain_text(field: str, value: str, limit: int) -> str:
    """`value` of a field kept and answered in clear (a customer's display name or segment): 1 to
    `limit` printable characters and no card number (PCI DSS: no PAN outside the card vault). The
    message names the field, never the value."""
    if not value or len(value) > limit:
        raise InvalidKey(f"{field} must be 1-{limit} characters")
    if not value.isprintable():
        raise InvalidKey(f"{field} contains control characters")
    if contains_card_number(value):
        raise InvalidKey(f"{field} looks like a card number (13-19 digits passing the Luhn check)")
    return value
