"""Strict JWS parsing and Ed25519 verification (PROTOCOL.md section 3)."""

from __future__ import annotations

import json

import pytest

from agent.protocol.jose import (
    MAX_MESSAGE_BYTES,
    BadSignatureError,
    MalformedError,
    OversizeError,
    UnknownKeyError,
    b64url_decode,
    b64url_encode,
    parse_unverified,
    verify_signatures,
)
from agent.protocol.trust import TrustStore
from tests import protocol_signing as ps


@pytest.fixture(scope="module")
def trust() -> TrustStore:
    return TrustStore.from_jwks(ps.vectors()["trust"])


def base() -> bytes:
    return ps.case("base-compact")["message"].encode()


def test_compact_parses_and_verifies(trust: TrustStore) -> None:
    jws = parse_unverified(base())
    assert jws.form == "compact"
    assert jws.claims["jti"] == "req-0001-base-aaaaaaaa"
    assert [s.kid for s in jws.signatures] == ["jpd-2026a"]
    assert verify_signatures(jws, trust.public_key) == ("jpd-2026a",)


def test_general_json_with_surrounding_whitespace_is_accepted(trust: TrustStore) -> None:
    msg = b"\n  " + ps.general(ps.base_claims(), ["jpd-2026a", "jxn-oversight-1"]) + b"\n"
    jws = parse_unverified(msg)
    assert jws.form == "json"
    assert verify_signatures(jws, trust.public_key) == ("jpd-2026a", "jxn-oversight-1")


def test_same_kid_twice_is_one_signer(trust: TrustStore) -> None:
    jws = parse_unverified(ps.general(ps.base_claims(), ["jpd-2026a", "jpd-2026a"]))
    assert len(jws.signatures) == 2
    assert verify_signatures(jws, trust.public_key) == ("jpd-2026a",)


def test_four_signatures_accepted_five_refused() -> None:
    four = ["jpd-2026a", "jxn-oversight-1", "hcso-2026", "jpd-2026a"]
    assert len(parse_unverified(ps.general(ps.base_claims(), four)).signatures) == 4
    with pytest.raises(MalformedError, match="1..4"):
        parse_unverified(ps.general(ps.base_claims(), four + ["jpd-2026a"]))


def test_zero_signatures_refused() -> None:
    msg = json.dumps({"payload": b64url_encode(b"{}"), "signatures": []}).encode()
    with pytest.raises(MalformedError, match="signatures"):
        parse_unverified(msg)


def test_size_cap_is_checked_before_parsing() -> None:
    junk = b"\xff" * MAX_MESSAGE_BYTES  # not even UTF-8: would be malformed if parsed
    with pytest.raises(MalformedError):
        parse_unverified(junk)
    with pytest.raises(OversizeError):
        parse_unverified(junk + b"\xff")


def test_padding_in_signature_segment_is_malformed() -> None:
    msg = base().decode()
    assert len(msg.split(".")[2]) == 86  # 64 bytes: base64 would pad with '=='
    with pytest.raises(MalformedError, match="signature"):
        parse_unverified((msg + "==").encode())


def test_non_canonical_base64url_is_malformed() -> None:
    """A second spelling of the same signature bytes would make a different message with a valid signature."""
    msg = base().decode()
    h, p, s = msg.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(s[-1])
    twin = s[:-1] + alphabet[last ^ 0b0001]  # flips one of the 4 unused trailing bits
    assert b64url_decode(s, "sig") == __import__("base64").urlsafe_b64decode(twin + "==")
    with pytest.raises(MalformedError, match="non-canonical"):
        parse_unverified(f"{h}.{p}.{twin}".encode())


@pytest.mark.parametrize("bad", ["a+b", "a/b", "ab=c", "a b", "a\nb", "é"])
def test_characters_outside_base64url_are_malformed(bad: str) -> None:
    with pytest.raises(MalformedError):
        b64url_decode(bad, "x")


def test_whitespace_inside_compact_is_malformed() -> None:
    msg = base().decode()
    with pytest.raises(MalformedError):
        parse_unverified((msg.replace(".", ". ", 1)).encode())
    with pytest.raises(MalformedError):
        parse_unverified((msg + "\n").encode())


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v":NaN}',
        b'{"v":Infinity}',
        b'{"v":-Infinity}',
        b'{"v":1e400}',
        b'{"a":1,"a":1}',
        b'{"area":{"lat":1,"lat":1}}',
        b"\xef\xbb\xbf{}",  # a BOM is not JSON
        b'{"purpose":"\xff"}',  # not UTF-8
        b"[" * 5000 + b"]" * 5000,  # deep nesting: refused, never a crash
        b"[]",
    ],
)
def test_strict_json_payload(payload: bytes) -> None:
    with pytest.raises(MalformedError):
        parse_unverified(ps.compact(payload))


@pytest.mark.parametrize(
    "hdr",
    [
        {"alg": "Ed25519", "kid": "jpd-2026a", "typ": "footage-request+jwt", "b64": False},
        {"alg": "Ed25519", "kid": "jpd-2026a", "typ": "footage-request+jwt", "jwk": {}},
        {"alg": "ES256", "kid": "jpd-2026a", "typ": "footage-request+jwt"},
        {"alg": "ed25519", "kid": "jpd-2026a", "typ": "footage-request+jwt"},
        {"alg": "Ed25519", "kid": 7, "typ": "footage-request+jwt"},
        {"alg": "Ed25519", "kid": "", "typ": "footage-request+jwt"},
        {"alg": "Ed25519", "kid": "jpd-2026a", "typ": "FOOTAGE-REQUEST+JWT"},
        {"alg": "Ed25519", "kid": "jpd-2026a"},
    ],
)
def test_header_must_be_exactly_alg_kid_typ(hdr: dict) -> None:
    with pytest.raises(MalformedError):
        parse_unverified(ps.compact(ps.base_claims(), hdr=hdr))


def test_duplicate_header_member_is_malformed() -> None:
    p = b64url_encode(b'{"alg":"Ed25519","kid":"jpd-2026a","kid":"x","typ":"footage-request+jwt"}')
    pl = base().decode().split(".")[1]
    msg = f"{p}.{pl}.{ps.signature('jpd-2026a', p, pl)}".encode()
    with pytest.raises(MalformedError, match="duplicate"):
        parse_unverified(msg)


def test_json_serialization_shape_is_exact() -> None:
    good = json.loads(ps.general(ps.base_claims(), ["jpd-2026a"]))
    flattened = {"payload": good["payload"], **good["signatures"][0]}
    with pytest.raises(MalformedError):
        parse_unverified(json.dumps(flattened).encode())
    extra = {**good, "header": {"kid": "jpd-2026a"}}
    with pytest.raises(MalformedError):
        parse_unverified(json.dumps(extra).encode())
    dup = ps.general(ps.base_claims(), ["jpd-2026a"]).replace(b'{"payload"', b'{"payload": "", "payload"', 1)
    with pytest.raises(MalformedError, match="duplicate"):
        parse_unverified(dup)


def test_unknown_kid_is_reported_before_a_bad_signature(trust: TrustStore) -> None:
    msg = ps.general(ps.base_claims(), ["jpd-2026a", "stranger"], signers=["hcso-2026", "stranger"])
    with pytest.raises(UnknownKeyError) as exc:
        verify_signatures(parse_unverified(msg), trust.public_key)
    assert exc.value.kid == "stranger"


def test_one_bad_signature_invalidates_all(trust: TrustStore) -> None:
    msg = ps.general(ps.base_claims(), ["jpd-2026a", "jxn-oversight-1"], signers=["jpd-2026a", "hcso-2026"])
    with pytest.raises(BadSignatureError) as exc:
        verify_signatures(parse_unverified(msg), trust.public_key)
    assert exc.value.index == 1


def test_short_signature_does_not_verify(trust: TrustStore) -> None:
    h, p, s = base().decode().split(".")
    short = b64url_encode(b64url_decode(s, "s")[:63])
    with pytest.raises(BadSignatureError):
        verify_signatures(parse_unverified(f"{h}.{p}.{short}".encode()), trust.public_key)


def test_eddsa_name_verifies_the_same_key(trust: TrustStore) -> None:
    msg = ps.compact(ps.base_claims(), hdr=ps.header("jpd-2026a", alg="EdDSA"))
    assert verify_signatures(parse_unverified(msg), trust.public_key) == ("jpd-2026a",)
