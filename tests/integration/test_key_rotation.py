"""Key rotation on a live stack: lookups work before, during (under concurrent load) and after a
fingerprint-key rotation and a KEK rotation; a wrong or missing key stops a node at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from devstack import free_port
from devstack.demo import demo_account_number, demo_pan, demo_routing
from devstack.environment import DevEnvironment, NodeProcess
from server import rpc
from server.crypto import encode_key, new_key
from server.proto import crs_pb2 as pb
from server.settings import settings_to_env
from tests.integration.support import TableLocked, crs_command, own_env, sql, wait_metric
from tests.integration.test_write_races import Side

CUSTOMERS = 150
CARDS = CUSTOMERS * 2


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    e = own_env(shards=2, customers=CUSTOMERS)
    e.start()
    yield e
    e.stop()


def _node(env: DevEnvironment, keys: dict[str, str]) -> NodeProcess:
    overrides: dict[str, object] = {
        "fingerprint_keys": keys["CRS_FINGERPRINT_KEYS"], "kek": keys["CRS_KEK"],
        "fingerprint_key_version": int(keys.get("CRS_FINGERPRINT_KEY_VERSION", "0")),
        "kek_version": int(keys.get("CRS_KEK_VERSION", "1")), "kek_previous": keys.get("CRS_KEK_PREVIOUS", ""),
        "kek_previous_version": int(keys.get("CRS_KEK_PREVIOUS_VERSION", "0")),
        # No near-cache, and Redis answers are per fingerprint version: lookups exercise PostgreSQL.
        "near_cache_size": 0,
    }
    return env.start_node(**overrides)


def _check_all(node: NodeProcess, cards: range) -> None:
    with node.channel() as ch:
        lookup = rpc.stub(ch, "LookupService")
        for i in cards:
            assert lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5).card.last4 == demo_pan(i)[-4:]
        for i in range(0, CUSTOMERS, 7):
            r = lookup.ResolveAccount(pb.ResolveAccountRequest(routing_number=demo_routing(i),
                                                               account_number=demo_account_number(i)), timeout=5)
            assert r.account.last4 == demo_account_number(i)[-4:]


class Load:
    def __init__(self, node: NodeProcess) -> None:
        self.node, self.stop, self.ok, self.errors = node, threading.Event(), 0, []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with self.node.channel() as ch:
            lookup = rpc.stub(ch, "LookupService")
            i = 0
            while not self.stop.is_set():
                i = (i + 13) % CARDS
                try:
                    lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5)
                    self.ok += 1
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def _person(n: int) -> pb.IdentityAttributes:
    return pb.IdentityAttributes(given_name=f"Rota{'xyzw'[n]}", family_name="Keyholder", date_of_birth=f"198{n}-02-03",
                                 phone=f"+1415555{n:04d}", email=f"rota{n}@example.com")


def _create_person(node: NodeProcess, n: int) -> str:
    with node.channel() as ch:
        return str(rpc.stub(ch, "AdminService").CreateCustomer(pb.CreateCustomerRequest(
            identity=_person(n), source_ref=pb.SourceRef(system="rotation", key=f"p{n}")), timeout=5).customer_id)


def _identifies(node: NodeProcess, n: int, customer_id: str) -> None:
    """A variant of person n (a nickname-free typo in the family name) is matched to its customer."""
    variant = _person(n)
    variant.family_name = "Keyholdr"
    with node.channel() as ch:
        answer = rpc.stub(ch, "IdentityService").IdentifyCustomer(pb.IdentifyCustomerRequest(attributes=variant),
                                                                   timeout=5)
    assert answer.decision == pb.MATCH_DECISION_MATCH and answer.candidates[0].customer_id == customer_id


def test_fingerprint_rotation_online(env: DevEnvironment) -> None:
    k1 = env.keys["CRS_FINGERPRINT_KEYS"]                      # "1:..."
    k2 = f"2:{encode_key(new_key())}"
    old = dict(env.keys)
    both_on_1 = old | {"CRS_FINGERPRINT_KEYS": f"{k1},{k2}", "CRS_FINGERPRINT_KEY_VERSION": "1"}
    both_on_2 = old | {"CRS_FINGERPRINT_KEYS": f"{k1},{k2}", "CRS_FINGERPRINT_KEY_VERSION": "2"}
    only_2 = old | {"CRS_FINGERPRINT_KEYS": k2}

    before = _node(env, old)
    _check_all(before, range(0, CARDS, 5))
    people = {0: _create_person(before, 0)}      # identity blocking keys are fingerprinted too
    during = _node(env, both_on_1)
    people[1] = _create_person(during, 1)
    r = crs_command(env, "keys", "retire-fingerprint", "--version", "1", overrides=both_on_1)   # too early: refused
    assert r.returncode == 1 and f"{CARDS} cards rows have no newer fingerprint yet" in r.stderr, r.stderr
    with Load(during) as load:
        r = crs_command(env, "keys", "rotate-fingerprint", "--to", "2", "--batch", "50", overrides=both_on_1)
        assert r.returncode == 0, r.stderr
        assert f"re-fingerprinted {CARDS} cards" in r.stdout and "and 1 identity records" in r.stdout
    assert load.errors == [] and load.ok > 0
    # Version 2's key check is recorded by the rotation itself, before any node runs version 2.
    status = crs_command(env, "keys", "status", overrides=both_on_1).stdout
    assert "fingerprint version 2" in status and "identities" in status, status
    switched = _node(env, both_on_2)
    _check_all(switched, range(CARDS))
    people[2] = _create_person(switched, 2)
    for node in (during, switched):
        for n, customer_id in people.items():
            _identifies(node, n, customer_id)
    _check_all(during, range(0, CARDS, 3))
    # A card issued after the switch is found by nodes on either version.
    with switched.channel() as ch:
        admin = rpc.stub(ch, "AdminService")
        customer = admin.CreateCustomer(pb.CreateCustomerRequest(display_name="Rotated"), timeout=5)
        account = admin.CreateAccount(pb.CreateAccountRequest(
            routing_number=demo_routing(1), account_number="555000111", type=pb.ACCOUNT_TYPE_CHECKING,
            owner_customer_id=customer.customer_id), timeout=5)
        pan = demo_pan(CARDS + 501)
        issued = admin.IssueCard(pb.IssueCardRequest(pan=pan, expiry="2031-01", account_id=account.account_id),
                                 timeout=5)
        with pytest.raises(grpc.RpcError) as info:   # the same PAN again, known under the other version
            admin.IssueCard(pb.IssueCardRequest(pan=pan, expiry="2031-01", account_id=account.account_id), timeout=5)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for node in (during, switched):
        with node.channel() as ch:
            assert rpc.stub(ch, "LookupService").ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5).card.last4
    # Retired in batches (eighteenth audit): one statement over each table held every row it had moved
    # until it ended. A write holding one card now leaves that card to a rerun, and while the retire
    # waits for it, a write to another card goes through.
    held = sql(env.admin_dsn, "SELECT token FROM cards WHERE token <> $1 ORDER BY token LIMIT 1", issued.token)[0][0]
    with TableLocked(env.admin_dsn, "cards", statement=f"SELECT 1 FROM cards WHERE token = '{held}' FOR UPDATE"):
        retire: list[subprocess.CompletedProcess[str]] = []
        thread = threading.Thread(target=lambda: retire.append(crs_command(
            env, "keys", "retire-fingerprint", "--version", "1", "--batch", "50", "--lock-wait", "3",
            overrides=both_on_2)))
        thread.start()
        deadline = time.monotonic() + 30
        while not sql(env.admin_dsn, "SELECT 1 FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"):
            assert time.monotonic() < deadline and thread.is_alive(), "the retire never waited for the held card"
            time.sleep(0.02)
        started = time.monotonic()
        with switched.channel() as ch:
            rpc.stub(ch, "AdminService").SetCardStatus(pb.SetCardStatusRequest(
                card_token=issued.token, status=pb.CARD_STATUS_BLOCKED), timeout=5)
        assert time.monotonic() - started < 2.0, "a write to another card waited for the retire"
        thread.join(60)
    r = retire[0]
    assert r.returncode == 1 and "not done: 1 cards, 0 accounts and 0 identity records" in r.stderr, r.stderr
    assert "retired" not in crs_command(env, "keys", "status", overrides=both_on_2).stdout
    assert sql(env.admin_dsn, "SELECT count(*) FROM identity_blocks WHERE version = 1")[0][0] > 5
    r = crs_command(env, "keys", "retire-fingerprint", "--version", "1", "--batch", "5",   # the one left
                    overrides=both_on_2)
    assert r.returncode == 0 and "version 1 retired" in r.stdout, r.stderr
    assert sql(env.admin_dsn, "SELECT count(*) FROM identity_blocks WHERE version = 1")[0][0] == 0   # 5 a batch
    # What writes or serves fingerprints refuses a retired current version, or a key other than the one
    # the database was fingerprinted with (an outside check: a node served NOT_FOUND for every card on
    # the retired key, and an import wrote records under it, or under a wrong key, that no node matched).
    def serve(overrides: dict[str, str]) -> subprocess.CompletedProcess[str]:
        child = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | settings_to_env(
            env.settings(workers=1, grpc_port=free_port(), metrics_port=0)) | overrides
        return subprocess.run([sys.executable, "-m", "server.cli", "serve"], env=child, capture_output=True,
                              text=True, timeout=60)

    r = serve(old)
    assert r.returncode == 2 and "version 1 was retired" in r.stderr, r.stderr
    wrong_2 = old | {"CRS_FINGERPRINT_KEYS": f"2:{encode_key(new_key())}", "CRS_FINGERPRINT_KEY_VERSION": "2"}
    assert env.stack is not None
    csv_file = env.stack.base_dir / "people.csv"
    csv_file.write_text("source_ref,given_name,family_name,date_of_birth\nk1,Ada,Keyholder,1980-02-03\n")
    for command in (("import", "customers", "--source", "keys", "--report", str(csv_file.with_suffix(".out")),
                     str(csv_file)), ("keys", "rotate-fingerprint", "--to", "2")):
        r = crs_command(env, *command, overrides=wrong_2)
        assert r.returncode == 2 and "not the key this database was fingerprinted with" in r.stderr, r.stderr
    for node in (before, during, switched):
        node.stop()
        env.nodes.remove(node)
    after = _node(env, only_2)
    _check_all(after, range(CARDS))
    for n, customer_id in people.items():
        _identifies(after, n, customer_id)
    status = crs_command(env, "keys", "status", overrides=only_2)
    assert "version 1 retired" in status.stdout and "fingerprinted with version 1" not in status.stdout
    env.keys = only_2   # the environment now runs on version 2 only


_NEWER_KEYS: dict[int, str] = {}   # one key per version for the module's database (its key_checks row)


def _and_a_newer_key(keys: dict[str, str]) -> tuple[int, str]:
    """(the version of the environment's one fingerprint key, CRS_FINGERPRINT_KEYS with a new next one)."""
    old = int(keys["CRS_FINGERPRINT_KEYS"].split(":")[0])
    newer = _NEWER_KEYS.setdefault(old + 1, encode_key(new_key()))
    return old, f"{keys['CRS_FINGERPRINT_KEYS']},{old + 1}:{newer}"


def test_a_change_reaches_nodes_on_either_version_while_they_roll(env: DevEnvironment) -> None:
    """Rotation step 3 half done: one node on the old version, one on the new, both keys on both. A card
    and an account created on the new-version node carry only the new fingerprint; the old-version
    node finds them under it. It used to cache that answer under its own version's key, which no
    write deletes (a write invalidates the versions the row carries): a card reported LOST answered
    ACTIVE by PAN there, and a frozen account active, for the cache TTL."""
    keys = dict(env.keys)
    old, both = _and_a_newer_key(keys)
    on_old = _node(env, keys | {"CRS_FINGERPRINT_KEYS": both, "CRS_FINGERPRINT_KEY_VERSION": str(old)})
    on_new = _node(env, keys | {"CRS_FINGERPRINT_KEYS": both, "CRS_FINGERPRINT_KEY_VERSION": str(old + 1)})
    try:
        with on_new.channel() as ch:
            admin = rpc.stub(ch, "AdminService")
            customer = admin.CreateCustomer(pb.CreateCustomerRequest(display_name="Mid Roll"), timeout=5)
            number = "777000123"
            account = admin.CreateAccount(pb.CreateAccountRequest(
                routing_number=demo_routing(4), account_number=number, type=pb.ACCOUNT_TYPE_CHECKING,
                owner_customer_id=customer.customer_id), timeout=5)
            pan = demo_pan(CARDS + 601)
            card = admin.IssueCard(pb.IssueCardRequest(pan=pan, expiry="2031-01", account_id=account.account_id),
                                   timeout=5)
        by_pan = pb.ResolveCardRequest(pan=pan)
        by_number = pb.ResolveAccountRequest(routing_number=demo_routing(4), account_number=number)
        with on_old.channel() as ch:
            lookup = rpc.stub(ch, "LookupService")
            for _ in range(3):   # a miss, then what would have been cached
                assert lookup.ResolveCard(by_pan, timeout=5).card.status == pb.CARD_STATUS_ACTIVE
                assert lookup.ResolveAccount(by_number, timeout=5).account.status == pb.ACCOUNT_STATUS_OPEN
        # Each of them read PostgreSQL, and the node counts them: the sign of a roll under way.
        for kind in ("card", "account"):
            wait_metric(on_old, "crs_lookups_other_key_version_total", 3, kind=kind)
        with on_new.channel() as ch:
            admin = rpc.stub(ch, "AdminService")
            admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token, status=pb.CARD_STATUS_LOST), timeout=5)
            admin.SetAccountStatus(pb.SetAccountStatusRequest(account_id=account.account_id,
                                                              status=pb.ACCOUNT_STATUS_FROZEN), timeout=5)
        deadline = time.monotonic() + 5
        with on_old.channel() as ch:
            lookup = rpc.stub(ch, "LookupService")
            while (lookup.ResolveCard(by_pan, timeout=5).card.status, lookup.ResolveAccount(
                    by_number, timeout=5).account.status) != (pb.CARD_STATUS_LOST, pb.ACCOUNT_STATUS_FROZEN):
                assert time.monotonic() < deadline, "the old-version node still answers the card or account as before"
                time.sleep(0.1)
    finally:
        for node in (on_old, on_new):
            node.stop()
            env.nodes.remove(node)


def test_a_card_issued_on_a_new_version_node_is_found_by_an_old_version_node_that_missed_it(
        env: DevEnvironment) -> None:
    """Rotation step 3 half done. A node on the old version looks up a card and an account not issued
    yet: NOT_FOUND, cached under its own version's key. Both are then created on a new-version node,
    which deleted only its own version's keys (and the rotation's target: none, it is the newest):
    the old-version node answered NOT_FOUND for the negative TTL (30 s), a new card declined."""
    keys = dict(env.keys)
    old, both = _and_a_newer_key(keys)
    on_old = _node(env, keys | {"CRS_FINGERPRINT_KEYS": both, "CRS_FINGERPRINT_KEY_VERSION": str(old)})
    on_new = _node(env, keys | {"CRS_FINGERPRINT_KEYS": both, "CRS_FINGERPRINT_KEY_VERSION": str(old + 1)})
    pan, number = demo_pan(CARDS + 701), "777000456"
    by_pan = pb.ResolveCardRequest(pan=pan)
    by_number = pb.ResolveAccountRequest(routing_number=demo_routing(5), account_number=number)
    try:
        with on_old.channel() as ch:
            lookup = rpc.stub(ch, "LookupService")
            for call, request in ((lookup.ResolveCard, by_pan), (lookup.ResolveAccount, by_number)):
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=5)
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with on_new.channel() as ch:
            admin = rpc.stub(ch, "AdminService")
            customer = admin.CreateCustomer(pb.CreateCustomerRequest(display_name="New Card"), timeout=5)
            account = admin.CreateAccount(pb.CreateAccountRequest(
                routing_number=demo_routing(5), account_number=number, type=pb.ACCOUNT_TYPE_CHECKING,
                owner_customer_id=customer.customer_id), timeout=5)
            admin.IssueCard(pb.IssueCardRequest(pan=pan, expiry="2031-01", account_id=account.account_id), timeout=5)
        deadline = time.monotonic() + 5   # the relay's second delete is 0.5-1 s after the commit
        with on_old.channel() as ch:
            lookup = rpc.stub(ch, "LookupService")
            while True:
                try:
                    lookup.ResolveCard(by_pan, timeout=5)
                    lookup.ResolveAccount(by_number, timeout=5)
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                    assert time.monotonic() < deadline, "the old-version node still answers NOT_FOUND"
                    time.sleep(0.1)
    finally:
        for node in (on_old, on_new):
            node.stop()
            env.nodes.remove(node)


def test_two_fingerprint_keys_need_the_version_named(env: DevEnvironment) -> None:
    keys = dict(env.keys)
    _, both = _and_a_newer_key(keys)
    base = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")}
    child = base | settings_to_env(env.settings(workers=1, grpc_port=free_port(), metrics_port=0)) | keys | {
        "CRS_FINGERPRINT_KEYS": both, "CRS_FINGERPRINT_KEY_VERSION": "0"}
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve"], env=child, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "CRS_FINGERPRINT_KEY_VERSION must name the version" in r.stderr, r.stderr
    assert keys["CRS_FINGERPRINT_KEYS"].split(":")[1] not in r.stderr


def test_kek_rotation_and_bad_keys_fail_at_start(env: DevEnvironment) -> None:
    keys = dict(env.keys)
    new_kek = encode_key(new_key())
    rotating = keys | {"CRS_KEK": new_kek, "CRS_KEK_VERSION": "2", "CRS_KEK_PREVIOUS": keys["CRS_KEK"],
                       "CRS_KEK_PREVIOUS_VERSION": "1"}
    node = _node(env, rotating)
    with Load(node) as load:
        r = crs_command(env, "keys", "rotate-kek", overrides=rotating)
        assert r.returncode == 0, r.stderr
        assert "re-wrapped 1 data key(s)" in r.stdout
    assert load.errors == [] and load.ok > 0
    rotated = keys | {"CRS_KEK": new_kek, "CRS_KEK_VERSION": "2"}
    after = _node(env, rotated)
    _check_all(after, range(0, CARDS, 4))
    with after.channel() as ch:                 # writes encrypt under the re-wrapped data key
        admin = rpc.stub(ch, "AdminService")
        customer = admin.CreateCustomer(pb.CreateCustomerRequest(display_name="After KEK"), timeout=5)
        admin.CreateAccount(pb.CreateAccountRequest(routing_number=demo_routing(2), account_number="4440001",
                                                    type=pb.ACCOUNT_TYPE_SAVINGS,
                                                    owner_customer_id=customer.customer_id), timeout=5)

    def serve(overrides: dict[str, str]) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")}
        settings = env.settings(workers=1, grpc_port=free_port(), metrics_port=0)
        child = base | settings_to_env(settings) | rotated | overrides
        return subprocess.run([sys.executable, "-m", "server.cli", "serve"], env=child, capture_output=True,
                              text=True, timeout=60)

    r = serve({"CRS_KEK": keys["CRS_KEK"], "CRS_KEK_VERSION": "1"})          # the retired KEK
    assert r.returncode == 2 and "KEK version 2, which is not configured" in r.stderr
    r = serve({"CRS_KEK": encode_key(new_key())})                             # a wrong KEK, same version
    assert r.returncode == 2 and "wrong key-encryption key" in r.stderr
    r = serve({"CRS_FINGERPRINT_KEYS": f"2:{encode_key(new_key())}"})         # a wrong fingerprint key
    assert r.returncode == 2 and "not the key this database was fingerprinted with" in r.stderr
    r = serve({"CRS_FINGERPRINT_KEYS": ""})                                   # a missing one
    assert r.returncode == 2 and "CRS_FINGERPRINT_KEYS" in r.stderr
    env.keys = rotated


def _cards_without(env: DevEnvironment, version: int, but: str = "") -> int:
    """Cards with no `version` fingerprint (but the one whose token is `but`)."""
    return int(sql(env.admin_dsn, "SELECT count(*) AS n FROM cards WHERE fingerprint_version <> $1"
                                  " AND next_fingerprint_version IS DISTINCT FROM $1 AND token <> $2",
                   version, but)[0]["n"])


def _rotating(env: DevEnvironment) -> tuple[int, dict[str, str]]:
    keys = dict(env.keys)
    old, both = _and_a_newer_key(keys)
    return old + 1, keys | {"CRS_FINGERPRINT_KEYS": both, "CRS_FINGERPRINT_KEY_VERSION": str(old)}


def test_a_rotation_that_could_not_lock_a_row_says_so(env: DevEnvironment) -> None:
    """A concurrent write holds a card row locked for longer than --lock-wait: rotate-fingerprint skipped
    it and still said "re-fingerprinted ...", exit 0, and the runbook's next step (nodes on the new
    version) would not have found that card. Now: how many rows are left, rerun, exit 1."""
    new, rotating = _rotating(env)
    token = sql(env.admin_dsn, "SELECT token FROM cards ORDER BY token OFFSET 7 LIMIT 1")[0]["token"]
    side = Side(env.admin_dsn, [("SELECT 1 FROM cards WHERE token = $1 FOR UPDATE", (token,))])
    try:
        r = crs_command(env, "keys", "rotate-fingerprint", "--to", str(new), "--batch", "50", "--lock-wait", "1",
                        overrides=rotating)
    finally:
        side.release()
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "1 cards" in r.stderr and f"rotate-fingerprint --to {new}" in r.stderr and "again" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert _cards_without(env, new) == 1


def test_a_rotation_waits_for_a_row_a_write_holds_and_finishes_it(env: DevEnvironment) -> None:
    """A concurrent write holds one card row locked while the rotation passes it, then commits: the
    rotation went round again for it and ended with every card on the new version. It used to skip it
    (SKIP LOCKED) and report done, exit 0, with that card left on the old version only."""
    new, rotating = _rotating(env)
    token = sql(env.admin_dsn, "SELECT token FROM cards ORDER BY token OFFSET 11 LIMIT 1")[0]["token"]
    side = Side(env.admin_dsn, [("SELECT 1 FROM cards WHERE token = $1 FOR UPDATE", (token,))])
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    run = threading.Thread(target=lambda: result.setdefault("r", crs_command(
        env, "keys", "rotate-fingerprint", "--to", str(new), "--batch", "50", overrides=rotating)), daemon=True)
    run.start()
    try:
        deadline = time.monotonic() + 60
        while _cards_without(env, new, but=token) and run.is_alive():   # the rotation has gone past the locked row
            assert time.monotonic() < deadline, "the rotation did not get through the cards"
            time.sleep(0.1)
        time.sleep(1)
    finally:
        side.release()
    run.join(120)
    r = result["r"]
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert _cards_without(env, new) == 0
    status = crs_command(env, "keys", "status", overrides=rotating)
    assert f"(+ version {new})" in status.stdout



def test_retiring_a_version_nothing_knows_is_bad_usage(env: DevEnvironment) -> None:
    """`retire-fingerprint --version 9`, a version never configured and used by no row, printed
    "version 9 retired" and exited 0. Now: nothing to retire, the versions there are, exit 2."""
    current = env.keys["CRS_FINGERPRINT_KEYS"].split(":")[0]
    r = crs_command(env, "keys", "retire-fingerprint", "--version", "9")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "version 9" in r.stderr and "nothing to retire" in r.stderr and "retired:" not in r.stdout, r.stderr
    assert current in r.stderr.split("versions")[-1], r.stderr
    assert sql(env.admin_dsn, "SELECT count(*) AS n FROM key_checks WHERE version = 9")[0]["n"] == 0
