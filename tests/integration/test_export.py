"""`crs export` and `crs feed tail` on the real stack, run as `python -m server.cli` subprocesses:
an extract of every type in both formats equals the database, its manifest's checksums match its
files, Watch from the manifest's sequence returns exactly the changes made after it, no clear PAN or
account number is exported; tail --no-follow prints what was committed and stops; bad usage exits 2."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import grpc
import pytest

from devstack.demo import demo_account_number, demo_pan, demo_routing
from devstack.environment import DevEnvironment
from server import rpc
from server.cli.export import COLUMNS, FORMAT_VERSION, MANIFEST
from server.proto import crs_pb2 as pb
from tests.integration.support import Clients, UsedSecrets, fresh_account_number, fresh_pan, new_customer, sql

REPO = Path(__file__).resolve().parents[2]
TYPES = ("customers", "accounts", "cards", "relationships")
KEYS = {"customers": ("customer_id",), "accounts": ("account_id",), "cards": ("token",),
        "relationships": ("account_id", "customer_id")}
DB_KEYS = {"customers": "SELECT customer_id FROM customers", "accounts": "SELECT account_id FROM accounts",
           "cards": "SELECT token FROM cards", "relationships": "SELECT account_id, customer_id FROM account_customers"}


def _crs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _connection(env: DevEnvironment, node: Clients, client: str = "feed") -> list[str]:
    assert env.pki is not None
    return ["--target", node.node.address, "--tls-dir", str(env.pki.directory), "--client", client]


def _database_keys(dsn: str) -> dict[str, set[tuple[str, ...]]]:
    async def read() -> dict[str, set[tuple[str, ...]]]:
        conn = await asyncpg.connect(dsn)
        try:
            return {name: {tuple(r) for r in await conn.fetch(query)} for name, query in DB_KEYS.items()}
        finally:
            await conn.close()

    return asyncio.run(read())


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix == ".csv":
            reader = csv.reader(f)
            header = next(reader)
            assert tuple(header) == COLUMNS[path.stem], header
            return [dict(zip(header, row, strict=True)) for row in reader]
        return [json.loads(line) for line in f]


def _export(env: DevEnvironment, node: Clients, out: Path, fmt: str, *extra: str) -> dict[str, object]:
    r = _crs("export", "--format", fmt, "--out", str(out), "--types", ",".join(TYPES), *extra, *_connection(env, node))
    assert r.returncode == 0, r.stderr
    assert "exporting" in r.stderr and f"sequence {json.loads((out / MANIFEST).read_text())['sequence']}" in r.stdout
    manifest: dict[str, object] = json.loads((out / MANIFEST).read_text())
    return manifest


def test_export_every_type_in_both_formats_is_the_database_at_one_point(
        dev_env: DevEnvironment, node_a: Clients, used_secrets: UsedSecrets, tmp_path: Path) -> None:
    # Something of every type that this test knows the clear numbers of.
    customer = new_customer(node_a.admin, "Exported")
    account_number, pan = fresh_account_number(used_secrets), fresh_pan(used_secrets)
    account = node_a.admin.CreateAccount(pb.CreateAccountRequest(
        routing_number=demo_routing(3), account_number=account_number, type=pb.ACCOUNT_TYPE_CHECKING,
        currency="USD", owner_customer_id=customer.customer_id), timeout=5)
    card = node_a.admin.IssueCard(pb.IssueCardRequest(pan=pan, expiry="2031-05", account_id=account.account_id),
                                  timeout=5)

    manifests = {fmt: _export(dev_env, node_a, tmp_path / fmt, fmt) for fmt in ("jsonl", "csv")}
    database = _database_keys(dev_env.admin_dsn)
    extracted: dict[str, dict[str, list[dict[str, str]]]] = {}
    for fmt, manifest in manifests.items():
        out = tmp_path / fmt
        assert manifest["format_version"] == FORMAT_VERSION and manifest["format"] == fmt
        assert manifest["types"] == list(TYPES) and isinstance(manifest["exported_at"], str)
        files = manifest["files"]
        assert isinstance(files, dict) and set(files) == set(TYPES)
        assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *(f"{t}.{fmt}" for t in TYPES)])
        extracted[fmt] = {}
        for name in TYPES:
            entry, path = files[name], out / f"{name}.{fmt}"
            assert entry["file"] == path.name
            assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            rows = extracted[fmt][name] = _rows(path)
            assert entry["rows"] == len(rows) == len(database[name]), name
            assert {tuple(r[k] for k in KEYS[name]) for r in rows} == database[name], name
    # Nothing was written between the two: the same point and the same values in both formats.
    assert manifests["jsonl"]["sequence"] == manifests["csv"]["sequence"]
    epoch = sql(dev_env.admin_dsn, "SELECT feed_current_epoch() AS epoch")[0]["epoch"]
    assert manifests["jsonl"]["epoch"] == manifests["csv"]["epoch"] == epoch
    for name in TYPES:
        as_text = [{k: str(v) for k, v in row.items()} for row in extracted["jsonl"][name]]
        assert as_text == extracted["csv"][name], name
    exported_card = next(c for c in extracted["jsonl"]["cards"] if c["token"] == card.token)
    assert exported_card["masked_pan"] == card.masked_pan and exported_card["account_id"] == account.account_id

    # Masked: no clear PAN or account number in any exported file.
    secrets = {pan, account_number, *used_secrets.pans, *used_secrets.account_numbers}
    secrets |= {demo_pan(i) for i in range(600)} | {demo_account_number(i) for i in range(450)}
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert not [s for s in secrets if s.encode() in data], f"clear card/account number in {path}"

    # Watch from the manifest's sequence: exactly what was written after the export, nothing before.
    point = manifests["jsonl"]["sequence"]
    assert isinstance(point, int)
    after = new_customer(node_a.admin, "After The Export")
    node_a.admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token, status=pb.CARD_STATUS_BLOCKED),
                               timeout=5)
    with node_a.node.channel("feed") as channel:
        call = rpc.stub(channel, "ChangeFeedService").Watch(pb.WatchRequest(from_sequence=point), timeout=20)
        changes: list[pb.ChangeEvent] = []
        for event in call:
            if event.WhichOneof("payload") != "progress":
                changes.append(event)
            if len(changes) == 2:
                call.cancel()
                break
    assert [(e.entity_id, e.op) for e in changes] == [(after.customer_id, pb.OPERATION_CREATE),
                                                      (card.token, pb.OPERATION_UPDATE)]
    assert all(e.sequence > point for e in changes) and changes[1].card.status == pb.CARD_STATUS_BLOCKED


def test_export_refuses_a_non_empty_directory_and_reports_grpc_errors(dev_env: DevEnvironment, node_a: Clients,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "extract"
    out.mkdir()
    (out / "keep.txt").write_text("not an extract")
    r = _crs("export", "--out", str(out), "--types", "customers", *_connection(dev_env, node_a))
    assert r.returncode == 1 and "not empty" in r.stderr and "--force" in r.stderr
    r = _crs("export", "--out", str(out), "--types", "customers", "--force", *_connection(dev_env, node_a))
    assert r.returncode == 0, r.stderr
    assert (out / MANIFEST).exists() and (out / "customers.jsonl").exists() and (out / "keep.txt").exists()
    # A client without feed:read: the gRPC status, exit 1, and the old manifest gone (no complete-looking extract).
    r = _crs("export", "--out", str(out), "--types", "customers", "--force",
             *_connection(dev_env, node_a, client="switch"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("PERMISSION_DENIED: "), r.stderr
    assert not (out / MANIFEST).exists() and not [p for p in out.iterdir() if p.name.endswith(".partial")]


def _snapshot_point(node: Clients) -> int:
    with node.node.channel("feed") as channel:
        call = rpc.stub(channel, "ChangeFeedService").Snapshot(
            pb.SnapshotRequest(entity_types=[pb.ENTITY_TYPE_RELATIONSHIP]), timeout=30)
        point = int(next(iter(call)).sequence)
        call.cancel()
    return point


def test_feed_tail_no_follow_prints_what_was_committed_after_from_and_exits(
        dev_env: DevEnvironment, node_a: Clients, used_secrets: UsedSecrets) -> None:
    point = _snapshot_point(node_a)
    customer = new_customer(node_a.admin, "Tailed")
    node_a.admin.SetCustomerStatus(pb.SetCustomerStatusRequest(customer_id=customer.customer_id,
                                                               status=pb.CUSTOMER_STATUS_SUSPENDED), timeout=5)
    account = node_a.admin.CreateAccount(pb.CreateAccountRequest(
        routing_number=demo_routing(4), account_number=fresh_account_number(used_secrets),
        type=pb.ACCOUNT_TYPE_SAVINGS, currency="USD", owner_customer_id=customer.customer_id), timeout=5)

    started = time.monotonic()
    epoch = sql(dev_env.admin_dsn, "SELECT feed_current_epoch() AS epoch")[0]["epoch"]
    r = _crs("feed", "tail", "--no-follow", "--from", str(point), "--epoch", epoch, *_connection(dev_env, node_a),
             timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 30
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    changes, last = lines[:-1], lines[-1]
    assert [(e["entity_id"], e["op"]) for e in changes] == [
        (customer.customer_id, "OPERATION_CREATE"), (customer.customer_id, "OPERATION_UPDATE"),
        (account.account_id, "OPERATION_CREATE"), (f"{account.account_id}:{customer.customer_id}", "OPERATION_CREATE")]
    assert changes[1]["customer"]["status"] == "CUSTOMER_STATUS_SUSPENDED"
    assert changes[2]["account"]["masked_account_number"].startswith("*")
    sequences = [int(e["sequence"]) for e in changes]
    assert sequences == sorted(sequences) and sequences[0] > point
    assert int(last["progress"]["high_water_sequence"]) >= sequences[-1]
    assert {line["epoch"] for line in lines} == {epoch}
    assert f"caught up at sequence {last['sequence']} (resume with --from {last['sequence']} --epoch {epoch})" \
        in r.stderr

    # Filtered to customers, progress marks left out.
    r = _crs("feed", "tail", "--no-follow", "--no-progress", "--from", str(point), "--types", "customer",
             *_connection(dev_env, node_a), timeout=60)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["entity_id"] for line in r.stdout.splitlines()] == [customer.customer_id] * 2


@pytest.mark.parametrize("args", [["feed", "tail", "--types", "customer,pan"], ["export", "--out", "x", "--types",
                                                                                "cards,merges"]])
def test_bad_types_exit_2_naming_what_is_accepted(args: list[str]) -> None:
    r = _crs(*args, timeout=30)
    assert r.returncode == 2 and "unknown entity type(s)" in r.stderr and "choose from" in r.stderr, r.stderr


def test_feed_tail_reports_an_error_as_its_status(dev_env: DevEnvironment, node_a: Clients) -> None:
    r = _crs("feed", "tail", "--no-follow", *_connection(dev_env, node_a, client="switch"), timeout=30)
    assert r.returncode == 1 and r.stderr.strip().startswith("PERMISSION_DENIED: "), r.stderr
    assert grpc.StatusCode.PERMISSION_DENIED.name in r.stderr
    # A checkpoint from a history this database does not have (docs/feed.md, "a restored database").
    r = _crs("feed", "tail", "--no-follow", "--from", "1", "--epoch", "5eed/1", *_connection(dev_env, node_a),
             timeout=30)
    assert r.returncode == 1 and r.stderr.strip().startswith("OUT_OF_RANGE: the checkpoint's epoch is not one of"
                                                              " this database's histories"), r.stderr
    assert "5eed/1" not in r.stderr   # the caller's epoch is never quoted back
