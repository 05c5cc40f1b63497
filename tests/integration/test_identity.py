"""IdentityService through gRPC on the real stack: identification on create (MATCH answers the existing
customer, POSSIBLE_MATCH queues a review, NEW creates), evidence, source references, the golden record,
scopes, and bad input."""

from __future__ import annotations

import random
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from devstack.environment import DevEnvironment
from server.errors import FailedPrecondition
from server.proto import crs_pb2 as pb
from tests.integration.support import Clients, UsedSecrets, clients_of, expect_code, fresh_pan


def _ref(system: str = "core") -> pb.SourceRef:
    return pb.SourceRef(system=system, key=uuid.uuid4().hex[:12])


def random_ssn() -> str:
    """A structurally valid SSN made up at run time (no real-looking id is committed)."""
    return f"{random.randint(1, 665):03d}-{random.randint(1, 99):02d}-{random.randint(1, 9999):04d}"


def random_dob() -> str:
    """Made up at run time; day and month both 1-12 and different, so a day/month swap is a date too."""
    month, day = random.sample(range(1, 13), 2)
    return f"{random.randint(1930, 2004)}-{month:02d}-{day:02d}"


def _family_name() -> str:
    """A made-up family name unlike any other test's (no shared prefix for Jaro-Winkler to reward)."""
    return "".join(random.choice("bdfgklmnprstvz") + random.choice("aeiou") for _ in range(4)).title()


def _person(**over: str) -> pb.IdentityAttributes:
    suffix = uuid.uuid4().hex[:6]
    base = {"given_name": "Margaret", "family_name": _family_name(), "date_of_birth": random_dob(),
            "phone": f"+1 415 555 {random.randint(0, 9999):04d}", "email": f"mq{suffix}@example.com"}
    base.update(over)
    address = pb.PostalAddress(line1=f"{random.randint(1, 9999)} Harbor Street", postcode="94110",
                               locality="San Francisco", country="US")
    return pb.IdentityAttributes(address=address, **base)


def _create(c: Clients, person: pb.IdentityAttributes, ref: pb.SourceRef | None = None, **extra: object) -> pb.Customer:
    return c.admin.CreateCustomer(pb.CreateCustomerRequest(identity=person, source_ref=ref or _ref(), **extra),
                                  timeout=10)


def test_identify_new_then_match_with_evidence(node_a: Clients, used_secrets: UsedSecrets) -> None:
    person = _person()
    used_secrets.identity.add(person.date_of_birth)
    assert node_a.identity.IdentifyCustomer(pb.IdentifyCustomerRequest(attributes=person), timeout=10).decision \
        == pb.MATCH_DECISION_NEW
    first = _create(node_a, person)
    assert first.display_name == f"Margaret {person.family_name}"
    # The same person from another system, with a nickname, a day/month swap and a reformatted phone.
    variant = pb.IdentityAttributes()
    variant.CopyFrom(person)
    y, m, d = person.date_of_birth.split("-")
    digits = person.phone[-4:]
    variant.given_name, variant.date_of_birth, variant.phone = "Peggy", f"{y}-{d}-{m}", f"(415) 555-{digits}"
    answer = node_a.identity.IdentifyCustomer(pb.IdentifyCustomerRequest(attributes=variant), timeout=10)
    assert answer.decision == pb.MATCH_DECISION_MATCH and answer.model_version
    best = answer.candidates[0]
    assert best.customer_id == first.customer_id and best.probability >= 0.99
    levels = {e.attribute: e.level for e in best.evidence}
    assert levels["given_name"] == "nickname" and levels["date_of_birth"] == "day_month_swapped"
    assert levels["phone"] == "exact" and levels["national_id"] == "missing"
    # Creating it answers the existing customer and adds the crosswalk entry.
    ref = _ref("cards-legacy")
    again = _create(node_a, variant, ref)
    assert again.customer_id == first.customer_id and again.version == first.version + 1
    resolved = node_a.identity.ResolveSourceRef(ref, timeout=5)
    assert resolved.customer_id == first.customer_id
    golden = node_a.identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(source_ref=ref), timeout=5)
    assert {r.system for r in golden.source_refs} == {"core", "cards-legacy"}
    assert golden.attributes.phone == "+1415555" + person.phone[-4:]


def test_exact_rule_and_national_id_masking(node_a: Clients, used_secrets: UsedSecrets) -> None:
    ssn = random_ssn()
    person = _person(national_id=ssn, national_id_type="US_SSN")
    used_secrets.identity |= {ssn.replace("-", ""), person.date_of_birth}
    first = _create(node_a, person)
    # Same SSN and date of birth: MATCH by rule, whatever else differs.
    other = pb.IdentityAttributes(given_name="M.", family_name="Different", date_of_birth=person.date_of_birth,
                                  national_id=ssn.replace("-", ""), national_id_type="US_SSN")
    answer = node_a.identity.IdentifyCustomer(pb.IdentifyCustomerRequest(attributes=other), timeout=10)
    assert answer.decision == pb.MATCH_DECISION_MATCH
    assert answer.candidates[0].customer_id == first.customer_id
    assert answer.candidates[0].rule == "national_id+date_of_birth"
    golden = node_a.identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(customer_id=first.customer_id),
                                                 timeout=5)
    assert golden.attributes.national_id == "" and golden.attributes.national_id_last4 == ssn[-4:]
    assert ssn.replace("-", "") not in str(golden) and ssn[:6] not in str(golden)


def test_twin_is_not_merged(node_a: Clients) -> None:
    person = _person(given_name="Alice")
    first = _create(node_a, person)
    twin = pb.IdentityAttributes()
    twin.CopyFrom(person)
    twin.given_name, twin.email, twin.phone = "Beatrice", "", ""
    created = _create(node_a, twin)
    assert created.customer_id != first.customer_id


def test_bad_identity_input(node_a: Clients) -> None:
    nowhere = _person()
    nowhere.address.country = "Atlantis"
    bad = [   # each message names the request's field as the proto spells it
        (_person(date_of_birth="1971-02-30"), "attributes.date_of_birth"),
        (nowhere, "attributes.address.country"),
        (_person(national_id="000-12-3456", national_id_type="US_SSN"), "national_id"),
        (_person(national_id="123", national_id_type="XX_NOPE"), "national_id_type"),
        (_person(phone="12"), "phone"),
        (_person(email="not-an-email"), "email"),
        (pb.IdentityAttributes(date_of_birth="1971-04-09"), "attributes needs a given_name or a family_name"),
    ]
    for attrs, word in bad:
        err = expect_code(lambda a=attrs: node_a.identity.IdentifyCustomer(  # type: ignore[misc]
            pb.IdentifyCustomerRequest(attributes=a), timeout=5), grpc.StatusCode.INVALID_ARGUMENT)
        assert word in (err.details() or ""), err.details()
        assert "000-12" not in (err.details() or "")
    err = expect_code(lambda: node_a.admin.CreateCustomer(pb.CreateCustomerRequest(identity=_person()), timeout=5),
                      grpc.StatusCode.INVALID_ARGUMENT)
    assert "source_ref" in (err.details() or "")
    ref = _ref()
    _create(node_a, _person(), ref)
    expect_code(lambda: _create(node_a, _person(given_name="Zed"), ref), grpc.StatusCode.ALREADY_EXISTS)
    expect_code(lambda: node_a.identity.ResolveSourceRef(_ref(), timeout=5), grpc.StatusCode.NOT_FOUND)
    expect_code(lambda: node_a.identity.ResolveSourceRef(pb.SourceRef(system="Bad System!", key="x"), timeout=5),
                grpc.StatusCode.INVALID_ARGUMENT)


def test_identity_rpcs_check_their_arguments(node_a: Clients, used_secrets: UsedSecrets) -> None:
    """Each IdentityService RPC refuses a malformed or missing argument with INVALID_ARGUMENT naming
    it (an unknown one with NOT_FOUND), and no answer echoes a card number put where an id goes."""
    identity = node_a.identity
    pan = fresh_pan(used_secrets)
    bad, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    ref, person = _ref("onboarding"), _person()
    existing = _create(node_a, person, ref)
    nameless = pb.IdentityAttributes(email="nameless@example.com")
    cases = [
        ("max_candidates must be 0-50", bad, lambda: identity.IdentifyCustomer(pb.IdentifyCustomerRequest(
            attributes=person, max_candidates=51), timeout=5)),
        ("max_candidates must be 0-50", bad, lambda: identity.IdentifyCustomer(pb.IdentifyCustomerRequest(
            attributes=person, max_candidates=-1), timeout=5)),
        ("attributes needs a given_name or a family_name", bad, lambda: identity.IdentifyCustomer(
            pb.IdentifyCustomerRequest(), timeout=5)),
        ("give a customer_id or a source_ref", bad, lambda: identity.GetCustomerIdentity(
            pb.GetCustomerIdentityRequest(), timeout=5)),
        ("customer_id is malformed", bad, lambda: identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(
            customer_id=pan), timeout=5)),
        ("customer_id is empty", bad, lambda: identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(
            customer_id=""), timeout=5)),
        ("customer not found", nf, lambda: identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(
            customer_id="cus_" + "0" * 20), timeout=5)),
        ("no customer has this source reference", nf, lambda: identity.GetCustomerIdentity(
            pb.GetCustomerIdentityRequest(source_ref=_ref()), timeout=5)),
        ("source_ref.system must be", bad, lambda: identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(
            source_ref=pb.SourceRef(system="", key="k-1")), timeout=5)),
        ("source_ref.key must be 1-128 printable characters", bad, lambda: identity.ResolveSourceRef(
            pb.SourceRef(system="core", key=""), timeout=5)),
        ("source_ref.key must be 1-128 printable characters", bad, lambda: identity.ResolveSourceRef(
            pb.SourceRef(system="core", key=" k-1"), timeout=5)),
        ("source_ref.key must be 1-128 printable characters", bad, lambda: identity.ResolveSourceRef(
            pb.SourceRef(system="core", key="k" * 129), timeout=5)),
        ("source_ref.system must be", bad, lambda: identity.ResolveSourceRef(
            pb.SourceRef(system="Core", key="k-1"), timeout=5)),
        ("customer_id is empty", bad, lambda: identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
            source_ref=ref, attributes=person), timeout=5)),
        ("customer_id is malformed", bad, lambda: identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
            customer_id=pan, source_ref=ref, attributes=person), timeout=5)),
        ("source_ref.system must be", bad, lambda: identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
            customer_id=existing.customer_id, attributes=person), timeout=5)),
        ("attributes needs a given_name or a family_name", bad, lambda: identity.UpdateCustomerIdentity(
            pb.UpdateCustomerIdentityRequest(customer_id=existing.customer_id, source_ref=ref, attributes=nameless),
            timeout=5)),
        ("attributes.date_of_birth", bad, lambda: identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
            customer_id=existing.customer_id, source_ref=ref, attributes=_person(date_of_birth="1971-02-30")),
            timeout=5)),
    ]
    wrong = []
    for message, code, call in cases:
        try:
            call()
            wrong.append((message, "OK", ""))
            continue
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if exc.code() != code or message not in details:
                wrong.append((message, exc.code().name, details))
            assert pan not in str(exc) and pan[6:] not in str(exc), f"a card number echoed: {details}"
    assert wrong == [], wrong
    # The controls: the bounds themselves are accepted, and nothing was changed by the refusals.
    assert identity.IdentifyCustomer(pb.IdentifyCustomerRequest(attributes=person, max_candidates=50),
                                     timeout=10).candidates[0].customer_id == existing.customer_id
    assert identity.ResolveSourceRef(ref, timeout=5).customer_id == existing.customer_id
    golden = identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(customer_id=existing.customer_id), timeout=5)
    assert golden.attributes.email == person.email and len(golden.source_refs) == 1


def test_switch_may_not_read_identity(dev_env: object, node_a: Clients) -> None:
    channel = node_a.node.channel("switch")
    try:
        from server import rpc
        stub = rpc.stub(channel, "IdentityService")
        expect_code(lambda: stub.IdentifyCustomer(pb.IdentifyCustomerRequest(attributes=_person()), timeout=5),
                    grpc.StatusCode.PERMISSION_DENIED)
        expect_code(lambda: stub.ResolveSourceRef(_ref(), timeout=5), grpc.StatusCode.PERMISSION_DENIED)
    finally:
        channel.close()


def test_concurrent_creates_of_one_person_make_one_customer(node_a: Clients, node_b: Clients) -> None:
    """Identification inside the write is serialised per blocking key: eight creates of the same person
    at once, from two node processes, end as one customer with eight source records."""
    person = _person()
    refs = [_ref(f"system-{i}") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: _create(node_a if i % 2 else node_b, person, refs[i]).customer_id, range(8)))
    assert len(set(ids)) == 1
    golden = node_a.identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(customer_id=ids[0]), timeout=5)
    assert {(r.system, r.key) for r in golden.source_refs} == {(r.system, r.key) for r in refs}


def _twin(person: pb.IdentityAttributes) -> pb.IdentityAttributes:
    """Everything shared (household phone and email too) but the given name: never MATCH by rule."""
    twin = pb.IdentityAttributes()
    twin.CopyFrom(person)
    twin.given_name = "Beatrice"
    return twin


def test_possible_match_policies(dev_env: DevEnvironment, node_a: Clients) -> None:
    person = _person(given_name="Alice")
    first = _create(node_a, person)
    answer = node_a.identity.IdentifyCustomer(pb.IdentifyCustomerRequest(attributes=_twin(person)), timeout=10)
    assert answer.decision == pb.MATCH_DECISION_POSSIBLE_MATCH
    assert answer.candidates[0].customer_id == first.customer_id
    assert {e.attribute: e.level for e in answer.candidates[0].evidence}["given_name"] == "else"
    # Policy "review" (default): a new customer, and a review task for the pair.
    created = _create(node_a, _twin(person))
    assert created.customer_id != first.customer_id
    # Policy "refuse": FAILED_PRECONDITION naming the candidate; force_new creates anyway.
    strict = clients_of(dev_env.start_node(workers=1, identity_possible_match="refuse"))
    try:
        third = _person(given_name="Carol")
        _create(strict, third)
        err = expect_code(lambda: _create(strict, _twin(third)), grpc.StatusCode.FAILED_PRECONDITION)
        assert "possible match with cus_" in (err.details() or "")
        assert _create(strict, _twin(third), force_new=True).customer_id.startswith("cus_")
    finally:
        strict.channel.close()
        strict.node.stop()
        dev_env.nodes.remove(strict.node)


def test_update_identity_replaces_one_record_and_reidentifies(node_a: Clients, used_secrets: UsedSecrets) -> None:
    person = _person()
    used_secrets.identity.add(person.date_of_birth)
    ref = _ref("onboarding")
    customer = _create(node_a, person, ref)
    moved = pb.IdentityAttributes()
    moved.CopyFrom(person)
    moved.address.line1, moved.address.postcode, moved.phone = "400 Elm Avenue", "10001", "+1 212 555 0199"
    answer = node_a.identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
        customer_id=customer.customer_id, source_ref=ref, attributes=moved), timeout=10)
    assert answer.attributes.address.postcode == "10001" and answer.attributes.phone == "+12125550199"
    assert answer.attributes.address.line1 == "400 elm ave"
    assert answer.attributes.date_of_birth == ""   # the answer is stored for replays: no date of birth
    # The old record's values are gone from the search: the old phone alone no longer finds anyone.
    old_phone_only = pb.IdentityAttributes(given_name="Xavier", phone=person.phone)
    found = node_a.identity.IdentifyCustomer(pb.IdentifyCustomerRequest(attributes=old_phone_only), timeout=10)
    assert customer.customer_id not in {c.customer_id for c in found.candidates}
    # A source ref of another customer cannot be updated through this one.
    other = _create(node_a, _person(given_name="Otto"))
    expect_code(lambda: node_a.identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
        customer_id=other.customer_id, source_ref=ref, attributes=moved), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION)
    expect_code(lambda: node_a.identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
        customer_id="cus_doesnotexist0000", source_ref=_ref(), attributes=moved), timeout=10),
        grpc.StatusCode.NOT_FOUND)


def test_card_numbers_in_attributes_or_source_refs_are_invalid_argument_never_echoed(
        node_a: Clients, used_secrets: UsedSecrets) -> None:
    """No card number outside the card vault (docs/security.md): one in a free-text attribute or a
    source reference is INVALID_ARGUMENT naming the field, on every RPC that takes them, and the
    answer never holds it."""
    pans = [fresh_pan(used_secrets) for _ in range(3)]
    spaced = " ".join(pans[1][i:i + 4] for i in range(0, 16, 4))
    dashed = "-".join(pans[2][i:i + 4] for i in range(0, 16, 4))
    ref, person = _ref("onboarding"), _person()
    existing = _create(node_a, person, ref)

    def with_address(**fields: str) -> pb.IdentityAttributes:
        person = _person()
        for name, value in fields.items():
            setattr(person.address, name, value)
        return person

    identify, create = node_a.identity.IdentifyCustomer, node_a.admin.CreateCustomer
    calls = [
        ("attributes.address.line2", lambda: identify(pb.IdentifyCustomerRequest(
            attributes=with_address(line2=f"card {spaced} x")), timeout=5)),
        ("identity.address.region", lambda: create(pb.CreateCustomerRequest(
            identity=with_address(region=pans[0]), source_ref=_ref()), timeout=5)),
        ("identity.family_name", lambda: create(pb.CreateCustomerRequest(
            identity=_person(family_name=dashed), source_ref=_ref()), timeout=5)),
        ("attributes.email", lambda: node_a.identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
            customer_id=existing.customer_id, source_ref=ref, attributes=_person(email=f"{pans[0]}@example.com")),
            timeout=5)),
        ("source_ref.key", lambda: create(pb.CreateCustomerRequest(
            identity=_person(), source_ref=pb.SourceRef(system="cards", key=pans[0])), timeout=5)),
        ("source_ref.key", lambda: node_a.identity.UpdateCustomerIdentity(pb.UpdateCustomerIdentityRequest(
            customer_id=existing.customer_id, source_ref=pb.SourceRef(system="cards", key=f"K {spaced}"),
            attributes=_person()), timeout=5)),
        ("source_ref.key", lambda: node_a.identity.ResolveSourceRef(pb.SourceRef(system="cards", key=dashed),
                                                                    timeout=5)),
        ("source_ref.key", lambda: node_a.identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(
            source_ref=pb.SourceRef(system="cards", key=pans[1])), timeout=5)),
        ("source_ref.system", lambda: node_a.identity.ResolveSourceRef(pb.SourceRef(system=pans[2], key="K-1"),
                                                                       timeout=5)),
    ]
    for field, call in calls:
        err = expect_code(call, grpc.StatusCode.INVALID_ARGUMENT)
        details = err.details() or ""
        assert details.startswith(f"{field} looks like a card number"), details
        for pan in pans:
            for form in (pan, spaced, dashed, pan[6:]):
                assert form not in str(err), f"{field}: the card number was echoed"
    # Nothing was written: the existing customer is as it was, with its one source reference.
    golden = node_a.identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(customer_id=existing.customer_id),
                                                 timeout=5)
    assert [(r.system, r.key) for r in golden.source_refs] == [(ref.system, ref.key)]
    assert golden.attributes.email == person.email
    assert node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=existing.customer_id),
                                     timeout=5).customer.version == existing.version
    assert not any(form in str(golden) for pan in pans for form in (pan, pan[6:]))


def test_a_golden_record_too_big_for_one_answer_is_refused_with_a_status_that_says_why(
        dev_env: DevEnvironment, node_a: Clients, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source system's records of one person make one customer now (twentieth audit): at about
    60,000 of them its golden record passed the 4 MiB a client accepts, and GetCustomerIdentity failed
    with the client library's RESOURCE_EXHAUSTED, unexplained. Here the bound is made small instead."""
    import asyncio

    import asyncpg

    from server.identity.model import MatchModel, Thresholds
    from server.settings import load_settings
    from server.store import identity as identity_store
    from server.store.db import active_data_key

    customer = _create(node_a, _person())
    settings = load_settings(dict(dev_env.keys) | {"CRS_PG_DSN": dev_env.operator_dsn, "CRS_ALLOW_PLAINTEXT": "true",
                                                  "CRS_ALLOW_ANONYMOUS": "true"})

    async def read(bound: int) -> pb.CustomerIdentity:
        monkeypatch.setattr(identity_store, "ANSWER_MAX_BYTES", bound)
        pool = await asyncpg.create_pool(dev_env.operator_dsn, min_size=1, max_size=1)
        try:
            keyring = settings.keyring()
            reads = identity_store.IdentityReads(
                pool=pool, codec=identity_store.IdentityCodec(keyring=keyring, data_key=await active_data_key(
                    pool, keyring)), model=MatchModel.load(), thresholds=Thresholds(), timeout=5.0)
            return await reads.customer_identity(customer.customer_id)
        finally:
            await pool.close()

    assert asyncio.run(read(4 * 1024 * 1024)).source_refs
    with pytest.raises(FailedPrecondition, match="1 source records and 0 merged customers, is larger than the 0 MiB"):
        asyncio.run(read(1024 + 10))
