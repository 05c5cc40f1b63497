"""`crs import customers` against what a migration team runs into (docs/audit-2026-12-04.md, fifth
audit): a son filed under his father through an undated row of the same file; a file without its
header row echoing its first row (a card number, a national id) as "unknown column"; two imports at
once loading one person twice; a PostgreSQL error mid-file ending in a traceback."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from devstack.environment import DevEnvironment
from server.cli.import_files import CUSTOMER_COLUMNS
from server.cli.main import main as crs
from server.store.bulk import BulkCustomers
from tests.integration.support import UsedSecrets, fresh_account_number, fresh_pan
from tests.integration.test_import import _import, _line, _row, _sql, _write, env_vars  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("env_vars")]


def _letters(hex_tag: str) -> str:
    return hex_tag.translate(str.maketrans("0123456789", "ghijklmnop"))   # names lose their digits


def _person(ref: str, tag: str, **kw: str) -> dict[str, str]:
    """A John of one household (address, phone) per tag."""
    row = {c: "" for c in CUSTOMER_COLUMNS}
    h = int(uuid.uuid5(uuid.NAMESPACE_DNS, tag).int % 10**9)
    row.update(source_ref=ref, given_name="John", family_name=f"{tag}harrowgate",
               address_line1=f"{h % 9000 + 100} Orchard Lane", locality="Springfield",
               postcode=f"{h % 90000 + 10000}", country="US", phone=f"+1217{h % 10**7:07d}", **kw)
    return row


def test_a_son_is_not_filed_under_his_father_through_an_undated_row(dev_env: DevEnvironment, tmp_path: Path) -> None:
    """The father is on file (1950). A second file holds an undated row (it MATCHes the father) and the
    son's row (1980), which the undated row also matches: the file's cluster joined the father, son and
    all, though the rules tell the son from him. Now the cluster is a new customer with a review."""
    tag = _letters(uuid.uuid4().hex[:6])
    father = _person("F-1", tag, date_of_birth="1950-03-04", email=f"{tag}50@example.com")
    code, first, _ = _import(tmp_path, "customers", _write(tmp_path / "core.csv", [_line(father)]), "core-" + tag)
    assert code == 0
    undated = _person("A-1", tag, email=f"{tag}.john@example.com")
    son = _person("S-1", tag, date_of_birth="1980-07-09", email=f"{tag}.john@example.com")
    code, second, _ = _import(tmp_path, "customers", _write(tmp_path / "crm.csv", [_line(undated), _line(son)]),
                              "crm-" + tag)
    assert code == 0
    got = {r["source_ref"]: r for r in second}
    assert got["S-1"]["customer_id"] != first[0]["customer_id"], "the son was filed under his father"
    assert got["S-1"]["decision"] == "possible_match"
    reviews = _sql(dev_env, "SELECT count(*) AS n FROM identity_reviews WHERE status = 1 AND $1 IN (customer_id,"
                            " candidate_id)", first[0]["customer_id"])
    assert reviews[0]["n"] >= 1, "a person decides"


def test_a_file_without_its_header_never_shows_its_first_row(used_secrets: UsedSecrets, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    pan, number = fresh_pan(used_secrets), fresh_account_number(used_secrets)
    cards = tmp_path / "cards.csv"
    cards.write_text(f"K-1,021000021,{number},{pan},2030-11\n")
    code, _, rejects = _import(tmp_path, "cards", cards, "hdr-" + uuid.uuid4().hex[:6])
    err = capsys.readouterr().err
    assert code == 1 and "is the header row missing?" in err
    for text in (err, *(r["reason"] for r in rejects), *(r["column"] for r in rejects)):
        assert pan not in text and number not in text and pan[-8:] not in text
    people = tmp_path / "people.csv"
    people.write_text("C-1,Mary,Smith,1970-01-02,219-09-9999,US_SSN,1 Main St,,Town,12345,,US,,\n")
    code, _, _ = _import(tmp_path, "customers", people, "hdr2-" + uuid.uuid4().hex[:6])
    err = capsys.readouterr().err
    assert code == 1 and "219-09-9999" not in err and "1970-01-02" not in err and "'source_ref'" not in err


def _at_once(argvs: list[list[str]]) -> list[Any]:
    """`crs` commands in threads, each import's first write held until every one has searched (what two
    imports started together do)."""
    # With imports taking turns the first waits here in vain (the second waits for its lock): a short
    # wait, long enough for imports that do not take turns to meet here.
    barrier = threading.Barrier(len(argvs), timeout=4)
    real = BulkCustomers.write
    first: set[int] = set()

    async def write(self: BulkCustomers, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() not in first:
            first.add(threading.get_ident())
            try:
                await asyncio.to_thread(barrier.wait)
            except threading.BrokenBarrierError:
                pass   # the other import waits for this one's lock: nothing to wait for
        return await real(self, *args, **kwargs)

    results: list[Any] = [None] * len(argvs)

    def go(i: int) -> None:
        try:
            results[i] = crs(argvs[i])
        except BaseException as exc:   # what a traceback would have been
            results[i] = exc

    BulkCustomers.write = write  # type: ignore[method-assign]
    try:
        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(argvs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        BulkCustomers.write = real  # type: ignore[method-assign]
    return results


def test_two_imports_at_once_load_each_person_once(dev_env: DevEnvironment, used_secrets: UsedSecrets,
                                                   tmp_path: Path) -> None:
    """One person in two systems' files, loaded in parallel, became two customers with no review: neither
    import could see the other's rows. Customer imports now take turns (the second waits)."""
    tag = uuid.uuid4().hex[:6]
    people = [_row(used_secrets, f"P{i}") for i in range(8)]
    a = _write(tmp_path / "core.csv", [_line(p) for p in people])
    b = _write(tmp_path / "cards.csv", [_line(p) for p in people])

    def argv(f: Path, source: str) -> list[str]:
        return ["import", "customers", str(f), "--source", source, "--report", f"{f}.{source}.report"]

    assert _at_once([argv(a, "core-" + tag), argv(b, "cardsys-" + tag)]) == [0, 0]
    split = _sql(dev_env, "SELECT source_key FROM source_records WHERE source_system = ANY($1) GROUP BY 1"
                          " HAVING count(DISTINCT customer_id) > 1", ["core-" + tag, "cardsys-" + tag])
    assert not split, f"{len(split)} of 8 people were loaded twice"
    # The same file twice at once (a relaunched job): one loads it, the other finds every row on file.
    c = _write(tmp_path / "same.csv", [_line(_row(used_secrets, f"Q{i}")) for i in range(4)])
    assert _at_once([argv(c, "core2-" + tag), argv(c, "core2-" + tag)]) == [0, 0]
