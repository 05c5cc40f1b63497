"""Bearer tokens that do not fit the service's keys are UNAUTHENTICATED, whatever is wrong with them
(docs/security.md). An RS256 token naming an EC key (or none, with an EC key first) made PyJWT raise
TypeError: INTERNAL with a traceback logged per call, UNKNOWN with the exception's text on reflection."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.auth import JwtVerifier
from server.errors import Unauthenticated

EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CLAIMS = {"sub": "switch", "aud": "crs-lookup", "exp": int(time.time()) + 300}


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> JwtVerifier:
    keys = [json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key())) | {"kid": "ec1", "alg": "ES256"},
            json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key())) | {"kid": "rsa1", "alg": "RS256"}]
    path = Path(tmp_path_factory.mktemp("jwks")) / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return JwtVerifier(jwks_file=path, audience="crs-lookup")


def test_good_tokens_of_either_key_are_accepted(verifier: JwtVerifier) -> None:
    assert verifier.verify(jwt.encode(CLAIMS, EC_KEY, "ES256", headers={"kid": "ec1"}))[0] == "switch"
    assert verifier.verify(jwt.encode(CLAIMS, RSA_KEY, "RS256", headers={"kid": "rsa1"}))[0] == "switch"


@pytest.mark.parametrize("token", [
    jwt.encode(CLAIMS, RSA_KEY, "RS256", headers={"kid": "ec1"}),        # was INTERNAL (TypeError)
    jwt.encode(CLAIMS, RSA_KEY, "RS256"),                                # no kid: the first key, EC
    jwt.encode(CLAIMS, EC_KEY, "ES256", headers={"kid": "rsa1"}),
    _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(CLAIMS) + ".",
    _b64({"alg": "ES256", "kid": ["ec1"]}) + "." + _b64(CLAIMS) + ".AAAA",
    jwt.encode(CLAIMS | {"aud": "other"}, EC_KEY, "ES256", headers={"kid": "ec1"}),
    "not.a.token", "",
], ids=["rs256-on-ec", "rs256-no-kid", "es256-on-rsa", "alg-none", "kid-list", "wrong-aud", "garbage", "empty"])
def test_a_token_that_does_not_fit_is_unauthenticated(verifier: JwtVerifier, token: str) -> None:
    with pytest.raises(Unauthenticated, match="not valid for this service"):
        verifier.verify(token)


@pytest.mark.parametrize(("extra", "granted"), [
    ({}, {"lookup:card", "lookup:customer", "admin:write"}),              # no scope claim: the client's scopes
    ({"scope": "lookup:card"}, {"lookup:card"}),
    ({"scope": ""}, set()),                                             # present but empty: none (was all)
    ({"scope": "   "}, set()),
    ({"scope": []}, set()),
    ({"scope": None}, set()),
    ({"scp": "lookup:card lookup:customer"}, {"lookup:card", "lookup:customer"}),   # scp was ignored: all
    ({"scp": ["lookup:card"]}, {"lookup:card"}),
    ({"scp": []}, set()),
    ({"scp": ["lookup:card", 7, "nope"]}, {"lookup:card"}),            # not the client's, not a string: dropped
    ({"scope": "lookup:card", "scp": ["admin:write"]}, {"lookup:card", "admin:write"}),
], ids=["none", "scope", "scope-empty", "scope-blank", "scope-empty-list", "scope-null", "scp-string", "scp-list",
        "scp-empty", "scp-mixed", "both"])
def test_a_tokens_scope_claims_narrow_the_clients_scopes(verifier: JwtVerifier, extra: dict[str, object],
                                                         granted: set[str]) -> None:
    """F4: a scope claim present but empty granted every scope of the client, and `scp` was ignored."""
    from server.auth import Authenticator, ClientPolicy, ClientRegistry

    policy = ClientPolicy("switch", frozenset({"lookup:card", "lookup:customer", "admin:write"}))
    auth = Authenticator(registry=ClientRegistry({"switch": policy}), jwt=verifier, allow_anonymous=False)
    token = jwt.encode(CLAIMS | extra, EC_KEY, "ES256", headers={"kid": "ec1"})
    assert auth._from_token(f"Bearer {token}").scopes == granted


def _counting_decode(verifier: JwtVerifier, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    decode = jwt.decode

    def counted(token: str, *args: object, **kwargs: object) -> object:
        calls.append(token)
        return decode(token, *args, **kwargs)   # type: ignore[arg-type]

    monkeypatch.setattr(verifier._jwt, "decode", counted)
    return calls


@pytest.mark.parametrize(("claims", "why"), [
    (CLAIMS | {"exp": int(time.time()) - 60}, "has expired"),
    (CLAIMS | {"aud": "other"}, "not valid for this service"),
], ids=["expired", "wrong-aud"])
def test_a_refused_token_is_refused_again_without_a_second_signature_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, claims: dict[str, object], why: str) -> None:
    """A client retrying an expired or forged token in a loop cost a signature check (~105 µs) per call."""
    verifier = _verifier(tmp_path)
    calls = _counting_decode(verifier, monkeypatch)
    token = jwt.encode(claims, EC_KEY, "ES256", headers={"kid": "ec1"})
    for _ in range(3):
        with pytest.raises(Unauthenticated, match=why):
            verifier.verify(token)
    assert len(calls) == 1
    good = jwt.encode(CLAIMS, EC_KEY, "ES256", headers={"kid": "ec1"})
    assert verifier.verify(good)[0] == "switch"   # another token is checked on its own
    assert len(calls) == 2


def test_a_token_not_valid_yet_is_checked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nbf (or iat) in the future: refused now, good later, so never kept as refused."""
    verifier = _verifier(tmp_path)
    calls = _counting_decode(verifier, monkeypatch)
    token = jwt.encode(CLAIMS | {"nbf": int(time.time()) + 3600}, EC_KEY, "ES256", headers={"kid": "ec1"})
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="not valid for this service"):
            verifier.verify(token)
    assert len(calls) == 2


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_a_token_from_an_issuer_whose_clock_runs_ahead_is_accepted(tmp_path: Path, claim: str) -> None:
    """An issuer 5 s ahead of the node: its fresh token's iat (or nbf) is in the node's future. It was
    refused until the node's clock caught up (PyJWT's leeway is 0 unless asked)."""
    token = jwt.encode(CLAIMS | {claim: int(time.time()) + 5}, EC_KEY, "ES256", headers={"kid": "ec1"})
    assert _verifier(tmp_path).verify(token)[0] == "switch"


def test_a_token_expired_past_the_leeway_is_refused_and_a_good_one_kept_no_longer(tmp_path: Path) -> None:
    verifier = _verifier(tmp_path)
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(jwt.encode(CLAIMS | {"exp": int(time.time()) - 31}, EC_KEY, "ES256", headers={"kid": "ec1"}))
    exp = int(time.time()) - 5                   # expired on the issuer's clock, within the leeway
    token = jwt.encode(CLAIMS | {"exp": exp}, EC_KEY, "ES256", headers={"kid": "ec1"})
    assert verifier.verify(token)[0] == "switch"
    assert verifier._cache[token][0] == exp + 30


def test_refused_tokens_kept_are_bounded(tmp_path: Path) -> None:
    verifier = _verifier(tmp_path, cache_size=2)
    for n in range(5):
        with pytest.raises(Unauthenticated):
            verifier.verify(jwt.encode(CLAIMS | {"aud": f"other-{n}"}, EC_KEY, "ES256", headers={"kid": "ec1"}))
    assert len(verifier._refused) == 2


def _verifier(tmp_path: Path, cache_size: int = 10_000) -> JwtVerifier:
    key = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key())) | {"kid": "ec1", "alg": "ES256"}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [key]}))
    return JwtVerifier(jwks_file=path, audience="crs-lookup", cache_size=cache_size)
