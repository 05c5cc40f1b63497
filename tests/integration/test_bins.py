"""The BIN table on the real stack: ResolveBin, NOT_FOUND answers that carry the issuer range (status
details for unary calls, LookupResult.bin_range for batch and stream), `crs bins import` with bad
rows, partial overlaps and versions, and a reload under load with zero failed lookups.

Every PAN here is in the reserved test range 999xxx (devstack/bins.py: 9991xx and 9992xx are made-up
issuers that are not ours), generated at run time."""

from __future__ import annotations

import csv
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_status import rpc_status

from devstack.bins import write_sample
from devstack.demo import demo_pan
from devstack.environment import DevEnvironment
from server.pan import luhn_check_digit
from server.proto import crs_pb2 as pb
from tests.integration.support import (
    Clients,
    TableLocked,
    card_key,
    clients_of,
    crs_command,
    expect_code,
    until,
)

POLL = 0.2     # the reloading node's CRS_BIN_POLL_INTERVAL


def _pan(prefix: str) -> str:
    body = prefix + "".join(random.choice("0123456789") for _ in range(15 - len(prefix)))
    return body + luhn_check_digit(body)


def _ranges(err: grpc.RpcError) -> list[pb.BinRange]:
    """The BinRange details of an error (next to the decision hint's ErrorInfo)."""
    status = rpc_status.from_call(err)   # type: ignore[arg-type]
    assert status is not None
    out = []
    for d in status.details:
        found = pb.BinRange()
        if d.Unpack(found):
            out.append(found)
    return out


def _detail(err: grpc.RpcError) -> pb.BinRange:
    (found,) = _ranges(err)
    return found


@pytest.fixture(scope="module")
def fast_node(dev_env: DevEnvironment) -> Iterator[Clients]:
    clients = clients_of(dev_env.start_node(workers=1, bin_poll_interval=POLL))
    yield clients
    clients.channel.close()
    clients.node.stop()
    dev_env.nodes.remove(clients.node)


def test_resolve_bin_most_specific_and_errors(node_a: Clients) -> None:
    nested = node_a.lookup.ResolveBin(pb.ResolveBinRequest(prefix="99920012"), timeout=5)
    assert (nested.issuer_name, nested.product, nested.low, nested.high) == \
        ("Test Issuer B Prepaid", "prepaid", "99920000", "99920099")
    outer = node_a.lookup.ResolveBin(pb.ResolveBinRequest(pan=_pan("9992013")), timeout=5)
    assert (outer.issuer_name, outer.network, outer.issuer_country) == ("Test Issuer B", "testnet-domestic", "GB")
    ours = node_a.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999003"), timeout=5)
    assert ours.on_us and ours.table_version >= 1
    expect_code(lambda: node_a.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999900"), timeout=5),
                grpc.StatusCode.NOT_FOUND)
    for bad in (pb.ResolveBinRequest(), pb.ResolveBinRequest(prefix="12345"), pb.ResolveBinRequest(prefix="9991a0"),
                pb.ResolveBinRequest(prefix="999100123456"), pb.ResolveBinRequest(pan="9991001234567890")):
        err = expect_code(lambda b=bad: node_a.lookup.ResolveBin(b, timeout=5),  # type: ignore[misc]
                          grpc.StatusCode.INVALID_ARGUMENT)
        assert "9991001234567890" not in (err.details() or "")


def test_card_not_ours_answers_not_found_with_its_range(node_a: Clients) -> None:
    pan = _pan("999150")
    err = expect_code(lambda: node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5),
                      grpc.StatusCode.NOT_FOUND)
    assert pan not in (err.details() or "") and "999100-999199" in (err.details() or "")
    found = _detail(err)
    assert (found.issuer_name, found.low, found.on_us) == ("Test Issuer A", "999100", False)
    # Again, now from the negative cache: the same details.
    err = expect_code(lambda: node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5),
                      grpc.StatusCode.NOT_FOUND)
    assert _detail(err).issuer_name == "Test Issuer A"
    # A PAN in no range: NOT_FOUND without a range (the decision hint only).
    err = expect_code(lambda: node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=_pan("999950")), timeout=5),
                      grpc.StatusCode.NOT_FOUND)
    assert _ranges(err) == []


def test_batch_and_stream_results_carry_the_range(node_a: Clients) -> None:
    keys = [pb.LookupKey(pan=_pan("9992001"), correlation_id="prepaid"),
            pb.LookupKey(pan=_pan("999950"), correlation_id="nowhere"),
            pb.LookupKey(card_token="tok_doesnotexist00000000", correlation_id="token"),
            pb.LookupKey(pan="9991", correlation_id="bad")]
    batch = node_a.lookup.BatchResolve(pb.BatchResolveRequest(keys=keys), timeout=5)
    streamed = {r.correlation_id: r for r in node_a.lookup.StreamResolve(iter(keys), timeout=5)}
    for results in ({r.correlation_id: r for r in batch.results}, streamed):
        assert results["prepaid"].code == 5 and results["prepaid"].bin_range.issuer_name == "Test Issuer B Prepaid"
        assert results["nowhere"].code == 5 and not results["nowhere"].HasField("bin_range")
        assert results["token"].code == 5 and not results["token"].HasField("bin_range")
        assert results["bad"].code == 3 and not results["bad"].HasField("bin_range")


def _write(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["low", "high", "pan_length", "network", "issuer_name", "issuer_country", "product", "on_us"])
        w.writerows(rows)
    return path


def test_import_refuses_bad_files_and_keeps_the_table(dev_env: DevEnvironment, fast_node: Clients,
                                                      tmp_path: Path) -> None:
    before = fast_node.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999100"), timeout=5).table_version
    good = ["999100", "999199", "16", "testnet", "Test Issuer A", "US", "credit", "false"]
    bad_rows = [
        good,
        ["99910", "99919", "16", "visa", "Short", "US", "credit", "false"],          # 5 digits
        ["999100", "9991999", "16", "visa", "Lengths", "US", "credit", "false"],    # low/high lengths differ
        ["999199", "999100", "16", "visa", "Reversed", "US", "credit", "false"],    # high < low
        ["999300", "999399", "11", "visa", "Short PAN", "US", "credit", "false"],   # pan_length
        ["999300", "999399", "16", "Visa Card!", "Net", "US", "credit", "false"],   # network
        ["999300", "999399", "16", "visa", "", "US", "credit", "false"],            # issuer
        ["999300", "999399", "16", "visa", "Country", "USA", "credit", "false"],    # country
        ["999300", "999399", "16", "visa", "Product", "US", "gold", "false"],       # product
        ["999300", "999399", "16", "visa", "On us", "US", "credit", "maybe"],       # on_us
        ["999300", "999399", "16", "visa"],                                          # column count
    ]
    rejects = tmp_path / "rejects.csv"
    r = crs_command(dev_env, "bins", "import", str(_write(tmp_path / "bad.csv", bad_rows)), "--rejects", str(rejects))
    assert r.returncode == 2 and "10 rejected rows > --max-rejects 0: the table was not replaced" in r.stderr
    got = list(csv.DictReader(rejects.open()))
    assert [(g["row"], g["column"]) for g in got] == [
        ("3", "low"), ("4", "high"), ("5", "high"), ("6", "pan_length"), ("7", "network"), ("8", "issuer_name"),
        ("9", "issuer_country"), ("10", "product"), ("11", "on_us"), ("12", "")]
    partial = [good, ["999150", "999250", "16", "testnet", "Straddles", "US", "credit", "false"]]
    r = crs_command(dev_env, "bins", "import", str(_write(tmp_path / "partial.csv", partial)))
    assert r.returncode == 2 and "1 partial" in r.stdout and "partial overlaps" in r.stderr
    not_utf8 = tmp_path / "latin1.csv"
    not_utf8.write_bytes(b"low,high,pan_length,network,issuer_name,issuer_country,product,on_us\n"
                         b"999100,999199,16,testnet,Caf\xe9,US,credit,false\n")
    assert crs_command(dev_env, "bins", "import", str(not_utf8)).returncode == 2
    time.sleep(POLL * 3)
    assert fast_node.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999100"), timeout=5).table_version == before


def test_duplicate_ranges_collapse_when_identical_and_refuse_the_file_when_not(
        dev_env: DevEnvironment, fast_node: Clients, tmp_path: Path) -> None:
    before = fast_node.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999100"), timeout=5).table_version
    one = ["999500", "999599", "16", "testnet", "Dup One", "US", "credit", "false"]
    two = ["999500", "999599", "16", "testnet", "Dup Two", "FR", "debit", "true"]
    listed = crs_command(dev_env, "bins", "versions").stdout
    r = crs_command(dev_env, "bins", "import", str(_write(tmp_path / "conflict.csv", [one, two])))
    assert r.returncode == 2 and "1 conflicting duplicates" in r.stderr and "rows 2 and 3" in r.stdout
    # The table was not replaced: no new version, `before` still the active one (not always the newest:
    # another module may have rolled back to it).
    assert crs_command(dev_env, "bins", "versions").stdout == listed and f"* v{before} " in listed
    r = crs_command(dev_env, "bins", "import", str(_write(tmp_path / "same.csv", [one, one])), "--allow-shrink")
    assert r.returncode == 0 and "1 identical rows collapsed" in r.stdout and "(1 ranges)" in r.stdout, r.stderr
    versions = crs_command(dev_env, "bins", "versions").stdout.splitlines()
    assert versions[0].startswith("* v") and " 1 ranges" in versions[0]
    _roll_back(dev_env, fast_node, before)


def test_equally_narrow_partial_overlaps_go_to_the_lower_range_on_nodes_and_cli(
        dev_env: DevEnvironment, fast_node: Clients, tmp_path: Path) -> None:
    """Two ranges as wide as each other, overlapping in 999150-999199: every reader gives those PANs to
    the one that starts lower, whatever the file's order (the nodes used to take PostgreSQL's heap
    order, which a large table's synchronized scans can rotate per reader)."""
    before = fast_node.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999100"), timeout=5).table_version
    upper = ["999150", "999249", "16", "testnet", "Upper", "US", "credit", "false"]
    lower = ["999100", "999199", "16", "testnet", "Lower", "US", "debit", "false"]
    ties = _write(tmp_path / "ties.csv", [upper, lower])
    r = crs_command(dev_env, "bins", "import", str(ties), "--allow-partial-overlaps", "--allow-shrink")
    assert r.returncode == 0, r.stderr
    imported = re.search(r"BIN table version (\d+) is active", r.stdout)
    assert imported is not None, r.stdout
    deadline = time.monotonic() + 30
    while fast_node.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999100"), timeout=5).table_version != int(
            imported[1]):
        assert time.monotonic() < deadline, "the node did not load the new table"
        time.sleep(POLL)
    try:
        for prefix, issuer in (("999160", "Lower"), ("99919999", "Lower"), ("999120", "Lower"), ("999200", "Upper")):
            assert fast_node.lookup.ResolveBin(pb.ResolveBinRequest(prefix=prefix), timeout=5).issuer_name == issuer
            shown = crs_command(dev_env, "bins", "lookup", prefix)
            assert shown.returncode == 0 and f'"issuerName": "{issuer}"' in shown.stdout, (prefix, shown)
        pan = _pan("999170")
        by_pan = crs_command(dev_env, "bins", "lookup", stdin=pan + "\n")
        assert '"issuerName": "Lower"' in by_pan.stdout and pan not in by_pan.stdout
    finally:
        _roll_back(dev_env, fast_node, before)


def test_a_much_smaller_table_needs_allow_shrink(dev_env: DevEnvironment, fast_node: Clients, tmp_path: Path) -> None:
    """A one-row file (a truncated export, the wrong file) would replace the whole table and leave most
    cards without a range: refused, nothing written, unless --allow-shrink says it is meant. Half the
    active table's ranges or more goes through without it."""
    before = fast_node.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999100"), timeout=5).table_version

    def table(name: str, n: int) -> Path:   # n one-prefix ranges, 999100 (the rolled-back-to check) first
        return _write(tmp_path / name, [[f"{999_100 + i}", f"{999_100 + i}", "16", "testnet", "Test Issuer A", "US",
                                          "credit", "false"] for i in range(n)])

    try:
        r = crs_command(dev_env, "bins", "import", str(table("forty.csv", 40)), "--allow-shrink")   # whatever was on
        forty = re.search(r"BIN table version (\d+) is active \(40 ranges\)", r.stdout)
        assert r.returncode == 0 and forty is not None, (r.stdout, r.stderr)
        listed = crs_command(dev_env, "bins", "versions").stdout
        r = crs_command(dev_env, "bins", "import", str(table("one.csv", 1)))
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert (f"the file has 1 ranges and the active table, version {forty[1]}, has 40 ranges" in r.stderr
                and "pass --allow-shrink if it is meant; the table was not replaced" in r.stderr), r.stderr
        assert crs_command(dev_env, "bins", "versions").stdout == listed        # nothing written
        r = crs_command(dev_env, "bins", "import", str(table("nineteen.csv", 19)))
        assert r.returncode == 2 and "the file has 19 ranges" in r.stderr, r.stderr
        r = crs_command(dev_env, "bins", "import", str(table("twenty.csv", 20)))   # half: no flag needed
        assert r.returncode == 0 and "(20 ranges)" in r.stdout, r.stderr
        r = crs_command(dev_env, "bins", "import", str(table("one.csv", 1)), "--allow-shrink")
        assert r.returncode == 0 and "(1 ranges)" in r.stdout, r.stderr
    finally:
        _roll_back(dev_env, fast_node, before)


def _roll_back(env: DevEnvironment, node: Clients, before: int) -> None:
    """Activate `before` again and wait until the node answers from it."""
    assert crs_command(env, "bins", "activate", str(before)).returncode == 0
    deadline = time.monotonic() + 30
    while True:    # a table without 999100 answers NOT_FOUND until the node is back on `before`
        try:
            if node.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999100"), timeout=5).table_version == before:
                return
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        assert time.monotonic() < deadline, "the node did not go back to the previous table"
        time.sleep(POLL)


def test_reload_under_load_then_roll_back(dev_env: DevEnvironment, fast_node: Clients, tmp_path: Path) -> None:
    before = fast_node.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999100"), timeout=5).table_version
    stop, failures, answered = threading.Event(), [], [0]
    pans = [_pan("999150") for _ in range(20)]

    def load() -> None:
        while not stop.is_set():
            try:
                fast_node.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999150"), timeout=5)
                try:
                    fast_node.lookup.ResolveCard(pb.ResolveCardRequest(pan=random.choice(pans)), timeout=5)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND or _detail(exc).low != "999100":
                        raise
                answered[0] += 1
            except Exception as exc:   # every other outcome is a failed lookup
                failures.append(repr(exc))

    sample = tmp_path / "bins.csv"
    write_sample(sample, 50_000, seed=7)
    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        r = crs_command(dev_env, "bins", "import", str(sample))
        assert r.returncode == 0, r.stderr
        imported = re.search(r"BIN table version (\d+) is active", r.stdout)
        assert imported is not None, r.stdout
        deadline = time.monotonic() + 30
        while fast_node.lookup.ResolveBin(pb.ResolveBinRequest(prefix="999100"), timeout=5).table_version == before:
            assert time.monotonic() < deadline, "the node did not load the new table"
            time.sleep(POLL)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == [] and answered[0] > 10
    versions = crs_command(dev_env, "bins", "versions")
    assert f"* v{imported[1]} " in versions.stdout and "50," in versions.stdout
    _roll_back(dev_env, fast_node, before)
    pan = _pan("999150")
    shown = crs_command(dev_env, "bins", "lookup", stdin=pan + "\n")      # a PAN only ever on standard input
    assert shown.returncode == 0 and "Test Issuer A" in shown.stdout and pan not in shown.stdout + shown.stderr
    assert '"low": "999100"' in crs_command(dev_env, "bins", "lookup", "99915012").stdout
    nowhere = crs_command(dev_env, "bins", "lookup", "999950")
    assert nowhere.returncode == 1 and f"no range in BIN table version {before}" in nowhere.stderr
    refused = crs_command(dev_env, "bins", "lookup", pan)
    assert refused.returncode == 2 and "standard input" in refused.stderr and pan not in refused.stderr
    missing = crs_command(dev_env, "bins", "activate", "999999")
    assert missing.returncode == 2 and missing.stderr.splitlines() == [
        "crs: BIN table version 999999 does not exist (crs bins versions lists the stored ones)"]


def test_a_node_that_cannot_confirm_its_table_version_caches_no_card_answer(dev_env: DevEnvironment,
                                                                            fast_node: Clients) -> None:
    """Writers delete a card's keys under a BIN table version until CRS_CACHE_TTL and a little more after
    its deactivation. A node whose polls of bin_tables fail (or hang) cannot know its version was
    deactivated meanwhile (a rollback): answers it cached under it after that would outlive every
    write (a card reported lost answering ACTIVE for the TTL; audit 2026-12-04, seventh, left open).
    Past two polls without a confirmation its card answers are served, not cached; once a poll gets
    through, cached again."""
    node = fast_node.node
    # Demo cards no other test asks for, their keys named before the lock (reading the active version
    # waits on it too).
    cards = iter([(pb.ResolveCardRequest(pan=demo_pan(i)), card_key(node.settings, demo_pan(i)))
                  for i in range(520, 560)])

    def fresh_card() -> tuple[pb.ResolveCardRequest, str]:
        request, key = next(cards)
        for shard in node.settings.redis_shards:
            redis.Redis.from_url(shard.url).delete(key)
        return request, key

    def cached(key: str) -> bool:
        return any(redis.Redis.from_url(shard.url).exists(key) for shard in node.settings.redis_shards)

    def answered_and_cached() -> bool:
        request, key = fresh_card()
        assert fast_node.lookup.ResolveCard(request, timeout=5).card.token.startswith("tok_")
        time.sleep(0.2)   # a fill follows the answer
        return cached(key)

    until("a card answer cached (the node's version confirmed)", answered_and_cached, 10, poll=0.1)
    with TableLocked(dev_env.admin_dsn, "bin_tables"):
        time.sleep(POLL * 3 + 0.2)   # two polls' grace gone
        for _ in range(3):
            assert not answered_and_cached(), "cached under a version no poll confirmed for 3 polls"
    until("card answers cached again once a poll got through", answered_and_cached, 10, poll=0.1)
