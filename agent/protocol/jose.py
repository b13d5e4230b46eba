"""Strict JWS for footage requests (PROTOCOL.md section 3), in two layers.

The dangerous layer, :func:`parse_unverified`, turns untrusted bytes into an
:class:`UnverifiedJws`: nothing in it is authentic yet, it is only known to be
well formed. Its strictness is the point: every message the agent accepts
has exactly one shape, so a second copy of a request cannot be told apart
from the first by anything but its bytes, and no JOSE feature (``jku``,
``crit``, ``b64``, unprotected headers, ``alg: none``, HMAC) is ever reachable.

Only :func:`verify_signatures` makes it trusted: it returns the distinct
signer kids once every signature present has verified.

Both layers raise rather than return codes; :mod:`agent.protocol.decision` maps the
exceptions to section-4 reasons.

This is also the project's only home for base64url, strict JSON, canonical JSON, JWK
thumbprints and compact JWS signing and verifying: requests, delivery manifests, access-log
checkpoints and the agency client all go through it, so one rule holds everywhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MAX_MESSAGE_BYTES = 16384
MAX_SIGNATURES = 4
REQUEST_TYP = "footage-request+jwt"
ALGORITHMS = frozenset({"Ed25519", "EdDSA"})  # RFC 9864 name, and the RFC 8037 name for the same thing
HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class JwsError(ValueError):
    """Base class: the message was refused before any trust was placed in it."""


class OversizeError(JwsError):
    """Larger than the protocol's cap; nothing of it was parsed."""


class MalformedError(JwsError):
    """Not a well-formed request. ``where`` names the part (for the debug log, never for the sender)."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where = where
        self.why = why


class UnknownKeyError(JwsError):
    def __init__(self, kid: str) -> None:
        super().__init__(f"kid {kid!r} is not in the trust store")
        self.kid = kid


class BadSignatureError(JwsError):
    def __init__(self, kid: str, index: int) -> None:
        super().__init__(f"signature {index} (kid {kid!r}) does not verify")
        self.kid = kid
        self.index = index


# --- strict JSON -----------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate member {k!r}")
            seen.add(k)
    return obj


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf without passing through parse_constant
        raise ValueError(f"number {text} is not finite")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_float=_finite_float, parse_constant=_no_constant)


def strict_json(text: str | bytes, where: str) -> Any:
    """RFC 8259 JSON with no duplicate member names and no non-finite numbers; UTF-8 only."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")  # strict: invalid UTF-8 and a BOM both fail
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MalformedError(where, f"not strict JSON ({exc})") from None


def canonical_json(obj: Any) -> bytes:
    """The bytes this project hashes (access-log entries, thumbprints): sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def compact_json(obj: Any) -> bytes:
    """What this project signs: members in the order given (readable for people), no whitespace, UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def b64url_decode(segment: str, where: str = "value") -> bytes:
    """Unpadded base64url, alphabet checked, and canonical: exactly one spelling per byte string.

    Raises :class:`MalformedError` (a ``ValueError``) naming ``where``.
    """
    if not isinstance(segment, str) or not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise MalformedError(where, "not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise MalformedError(where, "not base64url") from None
    if b64url_encode(raw) != segment:  # non-zero trailing bits: a second spelling of the same bytes
        raise MalformedError(where, "non-canonical base64url")
    return raw


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# --- the dangerous layer: parsed, NOT verified -------------------------------------


@dataclass(frozen=True, slots=True)
class UnverifiedSignature:
    """One signature as found in the message. Its ``kid`` is a claim, not a fact."""

    kid: str
    alg: str
    signing_input: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class UnverifiedJws:
    """A well-formed JWS whose signatures have not been checked. Do not act on ``claims``."""

    form: Literal["compact", "json"]
    payload: bytes
    claims: dict[str, Any]
    signatures: tuple[UnverifiedSignature, ...]


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of an OKP public JWK: the ``kid`` of the device key."""
    canonical = canonical_json({"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]})
    return b64url_encode(hashlib.sha256(canonical).digest())


def ed25519_public_jwk(key: Ed25519PublicKey) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(key.public_bytes_raw())}


def ed25519_from_jwk(jwk: Any, where: str = "jwk") -> Ed25519PublicKey:
    """The public key of an OKP/Ed25519 JWK; :class:`MalformedError` for anything else."""
    if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise MalformedError(where, "not an OKP Ed25519 public key")
    raw = b64url_decode(jwk.get("x"), f"{where}.x")  # type: ignore[arg-type]
    if len(raw) != 32:
        raise MalformedError(f"{where}.x", "an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


# --- signing ------------------------------------------------------------------------


class Signer(Protocol):
    """Anything that signs with Ed25519: the device key, an agency key, a bare private key."""

    def sign(self, data: bytes) -> bytes: ...


def sign_compact(header: Mapping[str, Any], payload: Mapping[str, Any], signer: Signer) -> str:
    """JWS compact serialization (RFC 7515), signed with Ed25519."""
    signing_input = b64url_encode(compact_json(header)) + "." + b64url_encode(compact_json(payload))
    return signing_input + "." + b64url_encode(signer.sign(signing_input.encode("ascii")))


def sign_general(payload: Mapping[str, Any], signers: Sequence[tuple[Mapping[str, Any], Signer]]) -> str:
    """General JSON serialization with one signature per (protected header, signer)."""
    payload_b64 = b64url_encode(compact_json(payload))
    signatures = []
    for header, signer in signers:
        protected = b64url_encode(compact_json(header))
        signature = b64url_encode(signer.sign(f"{protected}.{payload_b64}".encode("ascii")))
        signatures.append({"protected": protected, "signature": signature})
    return json.dumps({"payload": payload_b64, "signatures": signatures}, separators=(",", ":"))


# --- compact JWS from a known party (manifests, checkpoints) ------------------------


@dataclass(frozen=True, slots=True)
class CompactJws:
    """A strictly parsed compact JWS with header ``{alg: Ed25519, kid, typ}``; not yet verified."""

    kid: str
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes

    def verify(self, key: Ed25519PublicKey) -> dict[str, Any]:
        """The claims, once the signature verifies with ``key``; :class:`BadSignatureError` otherwise."""
        try:
            key.verify(self.signature, self.signing_input)
        except InvalidSignature:
            raise BadSignatureError(self.kid, 0) from None
        return self.claims


def parse_compact(token: str, *, typ: str) -> CompactJws:
    """Parse a compact JWS of type ``typ`` signed with Ed25519, without trusting it.

    The same strictness as requests: exactly the header members ``alg``, ``kid``,
    ``typ``, canonical base64url, strict JSON with an object payload.
    """
    if not isinstance(token, str) or not token.isascii():
        raise MalformedError("jws", "not ASCII text")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedError("jws", "not a JWS compact serialization (three dot-separated parts)")
    _alg, kid = _header(parts[0], "header", typ=typ, algorithms=frozenset({"Ed25519"}))
    payload = b64url_decode(parts[1], "payload")
    signature = b64url_decode(parts[2], "signature")
    return CompactJws(kid, _claims(payload), f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def _header(protected_b64: str, where: str, *, typ: str = REQUEST_TYP, algorithms: frozenset[str] = ALGORITHMS) -> tuple[str, str]:
    header = strict_json(b64url_decode(protected_b64, where), where)
    if not isinstance(header, dict):
        raise MalformedError(where, "protected header is not a JSON object")
    if header.keys() != HEADER_MEMBERS:
        extra = sorted(header.keys() - HEADER_MEMBERS)
        missing = sorted(HEADER_MEMBERS - header.keys())
        raise MalformedError(where, f"header members must be exactly alg, kid, typ (extra {extra}, missing {missing})")
    alg, kid, got_typ = header["alg"], header["kid"], header["typ"]
    if not isinstance(alg, str) or alg not in algorithms:
        raise MalformedError(f"{where}.alg", f"{alg!r} is not {' or '.join(sorted(algorithms))}")
    if got_typ != typ:
        raise MalformedError(f"{where}.typ", f"{got_typ!r} is not {typ!r}")
    if not isinstance(kid, str) or not 1 <= len(kid) <= 256:
        raise MalformedError(f"{where}.kid", "kid must be a string of 1..256 characters")
    return alg, kid


def _claims(payload: bytes) -> dict[str, Any]:
    claims = strict_json(payload, "payload")
    if not isinstance(claims, dict):
        raise MalformedError("payload", "claims are not a JSON object")
    return claims


def parse_unverified(message: bytes) -> UnverifiedJws:
    """Parse a request message, compact or general JSON serialization, without trusting it.

    Raises :class:`OversizeError` before looking at a byte of an oversized
    message, and :class:`MalformedError` for anything not exactly section 3.
    """
    if len(message) > MAX_MESSAGE_BYTES:
        raise OversizeError(f"{len(message)} bytes is more than {MAX_MESSAGE_BYTES}")
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError("message", "not UTF-8 text") from None
    if text.lstrip(" \t\r\n").startswith("{"):
        return _parse_json(text)
    return _parse_compact(text)


def _parse_compact(text: str) -> UnverifiedJws:
    parts = text.split(".")
    if len(parts) != 3:
        raise MalformedError("message", "neither a JWS compact serialization (three base64url parts) nor a JSON object")
    protected_b64, payload_b64, signature_b64 = parts
    alg, kid = _header(protected_b64, "signatures[0].protected")
    payload = b64url_decode(payload_b64, "payload")
    signature = b64url_decode(signature_b64, "signatures[0].signature")
    sig = UnverifiedSignature(kid, alg, f"{protected_b64}.{payload_b64}".encode("ascii"), signature)
    return UnverifiedJws("compact", payload, _claims(payload), (sig,))


def _parse_json(text: str) -> UnverifiedJws:
    obj = strict_json(text, "message")
    if not isinstance(obj, dict) or obj.keys() != {"payload", "signatures"}:
        raise MalformedError("message", "the JSON serialization must have exactly the members payload and signatures")
    payload_b64, sigs = obj["payload"], obj["signatures"]
    if not isinstance(payload_b64, str):
        raise MalformedError("payload", "not a string")
    if not isinstance(sigs, list) or not 1 <= len(sigs) <= MAX_SIGNATURES:
        raise MalformedError("signatures", f"must be a list of 1..{MAX_SIGNATURES} signatures")
    payload = b64url_decode(payload_b64, "payload")
    parsed: list[UnverifiedSignature] = []
    for i, s in enumerate(sigs):
        where = f"signatures[{i}]"
        if not isinstance(s, dict) or s.keys() != {"protected", "signature"}:
            raise MalformedError(where, "must have exactly the members protected and signature (no unprotected header)")
        protected_b64, signature_b64 = s["protected"], s["signature"]
        if not isinstance(protected_b64, str) or not isinstance(signature_b64, str):
            raise MalformedError(where, "protected and signature must be strings")
        alg, kid = _header(protected_b64, f"{where}.protected")
        signature = b64url_decode(signature_b64, f"{where}.signature")
        parsed.append(UnverifiedSignature(kid, alg, f"{protected_b64}.{payload_b64}".encode("ascii"), signature))
    return UnverifiedJws("json", payload, _claims(payload), tuple(parsed))


# --- the trusting layer -------------------------------------------------------------


def verify_signatures(jws: UnverifiedJws, key_for: Callable[[str], Ed25519PublicKey | None]) -> tuple[str, ...]:
    """Check every signature; return the distinct signer kids in order of appearance.

    All kids are looked up before any signature is checked, so an unknown key
    is reported as such (section 4, step 3) even beside a bad signature.
    One signature that fails invalidates the whole message.
    """
    keys = []
    for sig in jws.signatures:
        key = key_for(sig.kid)
        if key is None:
            raise UnknownKeyError(sig.kid)
        keys.append(key)
    for i, (sig, key) in enumerate(zip(jws.signatures, keys)):
        try:
            key.verify(sig.signature, sig.signing_input)
        except InvalidSignature:
            raise BadSignatureError(sig.kid, i) from None
    return tuple(dict.fromkeys(sig.kid for sig in jws.signatures))
