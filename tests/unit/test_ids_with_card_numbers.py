"""A card number inside a well-formed id ("cus_<PAN>", "acc_<PAN>", "tok_<PAN>abcd") is refused by the id
parsers without being echoed, never kept in a refused write's audit row, never made by new_id, and
found by `crs pci scan` in an array column (audit_log.entity_ids)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devstack.demo import TEST_BIN_PREFIX
from server.caller import Caller
from server.cli import pci
from server.errors import InvalidKey
from server.pan import is_safe_id, luhn_check_digit, parse_account_id, parse_customer_id, parse_token
from server.proto import crs_pb2 as pb
from server.store import admin, envelope

CALLER = Caller("ops", frozenset({"admin:write"}), "mtls")


def made_up_pan(length: int = 16) -> str:
    body = f"{TEST_BIN_PREFIX}{48172635:0{length - len(TEST_BIN_PREFIX) - 1}d}"
    return body + luhn_check_digit(body)


PAN = made_up_pan()


@pytest.mark.parametrize(("parse", "value"), [
    (parse_customer_id, f"cus_{PAN}"), (parse_customer_id, f"cus_ab{PAN}"),
    (parse_account_id, f"acc_{PAN}"), (parse_token, f"tok_{PAN}abcd"), (parse_token, f"tok_abcd{PAN}"),
])
def test_an_id_holding_a_card_number_is_refused_never_echoed(parse: Any, value: str) -> None:
    with pytest.raises(InvalidKey) as caught:
        parse(value)
    assert PAN[6:12] not in str(caught.value) and "card number" in str(caught.value)


def test_ids_without_a_card_number_still_parse() -> None:
    wrong = PAN[:-1] + str((int(PAN[-1]) + 1) % 10)
    assert parse_customer_id(f"cus_{wrong}") and parse_account_id("acc_demo0000000001")
    assert parse_token("tok_" + "1234567890ab" * 2) and parse_customer_id("cus_" + "123456789012")


def test_the_audit_keeps_of_a_refused_request_only_ids_the_parsers_would_take() -> None:
    """is_safe_id: the parsers' own patterns (a token is tok_ and 20-40 characters, not 8), and no
    card number inside."""
    assert is_safe_id("cus_abcdefgh") and is_safe_id("acc_demo0000000001") and is_safe_id("tok_" + "a1" * 10)
    assert not is_safe_id("tok_abcdefgh") and not is_safe_id("cus_abc") and not is_safe_id("xyz_abcdefgh")
    assert not is_safe_id(f"cus_{PAN}") and not is_safe_id(f"tok_{PAN}abcd")


def test_new_id_draws_again_rather_than_make_one_holding_a_card_number(monkeypatch: pytest.MonkeyPatch) -> None:
    # Byte 26 + d maps to the digit d, byte 0 + i to the i-th letter (admin._ID_TABLE).
    draws = [bytes(26 + int(d) for d in PAN) + bytes(range(12)), bytes(range(28))]
    monkeypatch.setattr(admin.secrets, "token_bytes", lambda n: draws.pop(0))
    made = admin.new_id("cus_")
    assert made == "cus_" + bytes(range(20)).translate(admin._ID_TABLE).decode() and not draws
    parse_customer_id(made)


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    async def execute(self, sql: str, *args: Any) -> None:
        self.rows.append(args)


def _store(conn: Recorder, monkeypatch: pytest.MonkeyPatch) -> envelope.WriteEnvelope:
    @contextlib.asynccontextmanager
    async def acquire(pool: Any, timeout: float) -> AsyncIterator[Recorder]:
        yield conn
    monkeypatch.setattr(envelope, "acquire", acquire)
    return envelope.WriteEnvelope(pool=None, keyring=None, timeout=1.0)  # type: ignore[arg-type]


async def test_a_refused_writes_audit_row_keeps_no_id_holding_a_card_number(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = Recorder()
    request = pb.LinkCustomerRequest(request_id="r1", account_id=f"acc_{PAN}", customer_id="cus_demo0000000001")
    await _store(conn, monkeypatch).audit_failure(CALLER, "LinkCustomer", request, "INVALID_ARGUMENT")
    [row] = conn.rows
    assert row[5] == ["cus_demo0000000001"] and PAN not in repr(row) and PAN[6:12] not in repr(row)


class ScanConn:
    """What scan reads: audit_log with a text[] column holding an id with a card number."""

    def __init__(self) -> None:
        self.selects: list[str] = []

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, str]]:
        if "information_schema" in sql:
            return [{"t": "audit_log", "c": "entity_ids", "d": "ARRAY"}] if "ARRAY" in args[0] else []
        return [{"name": "id"}]

    def transaction(self, **kw: Any) -> Any:
        return _NullAsync()

    async def cursor(self, sql: str, prefetch: int) -> AsyncIterator[tuple[str, str]]:
        self.selects.append(sql)
        yield ("1", "{cus_demo0000000001,cus_" + PAN + "}" if '"entity_ids"::text' in sql else "")


class _NullAsync:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_pci_scan_reads_array_columns_as_text() -> None:
    conn = ScanConn()
    findings, rows = await pci.scan(conn)  # type: ignore[arg-type]
    assert rows == 1 and [f.line() for f in findings] == ["audit_log.entity_ids  id=1"], conn.selects


@pytest.mark.parametrize("sep", [" ", "-", "\n"])
async def test_a_long_request_id_is_masked_before_it_is_cut(monkeypatch: pytest.MonkeyPatch, sep: str) -> None:
    """F5: a request_id over 128 characters is refused and audited cut to 128; a card number across the
    cut was cut first, its first groups no card number any more, and kept in clear."""
    conn = Recorder()
    grouped = sep.join(PAN[i:i + 4] for i in range(0, 16, 4))
    request = pb.UpdateCustomerRequest(request_id="x" * (envelope.MAX_REQUEST_ID - 12) + grouped,
                                       customer_id="cus_demo0000000001")
    await _store(conn, monkeypatch).audit_failure(CALLER, "UpdateCustomer", request, "INVALID_ARGUMENT")
    [row] = conn.rows
    kept = row[3]
    assert len(kept) <= envelope.MAX_REQUEST_ID and not any(c.isdigit() for c in kept), kept
