"""IdentityService through gRPC on the real stack: identification on create (MATCH answers the existing
customer, POSSIBLE_MATCH queues a review, NEW creates), evidence, source references, the golden record,
scopes, and bad input."""

from __future__ import annotations

import random
import uuid

import grpc

from server.proto import crs_pb2 as pb
from tests.integration.support import Clients, UsedSecrets, expect_code


def _ref(system: str = "core") -> pb.SourceRef:
    return pb.SourceRef(system=system, key=uuid.uuid4().hex[:12])


def random_ssn() -> str:
    """A structurally valid SSN made up at run time (no real-looking id is committed)."""
    return f"{random.randint(1, 665):03d}-{random.randint(1, 99):02d}-{random.randint(1, 9999):04d}"


def random_dob() -> str:
    """Made up at run time; day and month both 1-12 and different, so a day/month swap is a date too."""
    month, day = random.sample(range(1, 13), 2)
    return f"{random.randint(1930, 2004)}-{month:02d}-{day:02d}"


def _person(**over: str) -> pb.IdentityAttributes:
    suffix = uuid.uuid4().hex[:6]
    base = {"given_name": "Margaret", "family_name": f"Quill{suffix}", "date_of_birth": random_dob(),
            "phone": "+1 415 555 0134", "email": f"mq{suffix}@example.com"}
    base.update(over)
    address = pb.PostalAddress(line1="12 Harbor Street", postcode="94110", locality="San Francisco", country="US")
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
    assert first.display_name.startswith("Margaret Quill")
    # The same person from another system, with a nickname, a day/month swap and a reformatted phone.
    variant = pb.IdentityAttributes()
    variant.CopyFrom(person)
    y, m, d = person.date_of_birth.split("-")
    variant.given_name, variant.date_of_birth, variant.phone = "Peggy", f"{y}-{d}-{m}", "(415) 555-0134"
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
    assert golden.attributes.phone == "+14155550134"


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
    bad = [
        (_person(date_of_birth="1971-02-30"), "date_of_birth"),
        (_person(national_id="000-12-3456", national_id_type="US_SSN"), "national_id"),
        (_person(national_id="123", national_id_type="XX_NOPE"), "national_id_type"),
        (_person(phone="12"), "phone"),
        (_person(email="not-an-email"), "email"),
        (pb.IdentityAttributes(date_of_birth="1971-04-09"), "given_name or a family_name"),
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
