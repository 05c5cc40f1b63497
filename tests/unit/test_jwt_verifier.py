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
