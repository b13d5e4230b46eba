"""Opening deliveries (protocol section 5), as the requester.

:func:`open_delivery` is the whole check, pure and strict: it accepts a
delivery only if the manifest is exactly as the protocol says, is signed by
the device key it names, and every chunk opens in its place. Anything else
raises :class:`DeliveryRejected` with a sentence saying what was wrong.

:class:`DeliveryCollector` sorts incoming MQTT messages into deliveries (a
request may get one from every camera that shares) and says when one is
complete; it does no I/O either.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.errors import UserError
from agent.protocol.jose import JwsError, b64url_decode, ed25519_from_jwk, jwk_thumbprint, parse_compact
from agent.protocol.sealing import (
    CHUNK_BYTES,
    CONTENT_KEY_BYTES,
    HPKE_SUITE,
    MANIFEST_TYP,
    SUITE_NAME,
    chunk_aad,
    chunk_count,
    chunk_nonce,
    hpke_info,
)
from agent.timeutil import parse_utc_z

_B64URL_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")  # 16 bytes in unpadded base64url
_JTI = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_CHUNKS = 65536  # 16 GiB; far beyond any clip, small enough to refuse a silly manifest early

MANIFEST_MEMBERS = {"v", "jti", "delivery_id", "iat", "device", "granted", "media", "enc", "log"}
MEDIA_MEMBERS = {"type", "bytes", "sha256", "frames", "width", "height"}
ENC_MEMBERS = {"suite", "key", "chunk_bytes", "chunks"}


class DeliveryRejected(UserError):
    """This delivery must not be trusted; the message says why."""


@dataclass(frozen=True)
class OpenedDelivery:
    clip: bytes = field(repr=False)
    claims: dict[str, Any]
    header: dict[str, Any]
    manifest: str = field(repr=False)

    @property
    def delivery_id(self) -> str:
        return self.claims["delivery_id"]

    @property
    def device_kid(self) -> str:
        return self.header["kid"]

    @property
    def granted(self) -> tuple[datetime, datetime]:
        g = self.claims["granted"]
        return parse_utc_z(g["start"]), parse_utc_z(g["end"])


def _members(obj: Any, expected: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DeliveryRejected(f"manifest {where} is not an object")
    if set(obj) != expected:
        missing, extra = sorted(expected - set(obj)), sorted(set(obj) - expected)
        raise DeliveryRejected(f"manifest {where} has the wrong members (missing {missing}, unexpected {extra})")
    return obj


def _int(obj: dict[str, Any], name: str, where: str, minimum: int = 0) -> int:
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise DeliveryRejected(f"manifest {where}.{name} must be an integer >= {minimum}, not {v!r}")
    return v


def _str(obj: dict[str, Any], name: str, where: str) -> str:
    v = obj[name]
    if not isinstance(v, str) or not v:
        raise DeliveryRejected(f"manifest {where}.{name} must be a non-empty string")
    return v


def verify_manifest(manifest: str, *, jti: str, delivery_id: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the manifest's form and device signature; return (header, claims).

    The device is identified by the public key inside the manifest, and
    ``kid`` must be its RFC 7638 thumbprint: the thumbprint is the camera's
    stable identity across deliveries, which an agency can pin if it wants.
    """
    try:
        jws = parse_compact(manifest, typ=MANIFEST_TYP)
    except JwsError as exc:
        raise DeliveryRejected(f"the manifest is not a strict device-signed JWS ({exc})") from None
    claims = _members(jws.claims, MANIFEST_MEMBERS, "payload")
    device = claims["device"]
    if not isinstance(device, dict) or set(device) != {"kty", "crv", "x"}:
        raise DeliveryRejected("manifest device must be a public Ed25519 JWK with exactly kty, crv and x")
    try:
        public = ed25519_from_jwk(device, "device")
    except JwsError:
        raise DeliveryRejected("manifest device must be a public Ed25519 JWK (kty OKP, crv Ed25519, 32-byte x)") from None
    if jws.kid != jwk_thumbprint(device):
        raise DeliveryRejected("the manifest's kid is not the thumbprint of its device key")
    try:
        jws.verify(public)
    except JwsError:
        raise DeliveryRejected("the manifest signature does not verify with the device key it names") from None
    header = {"alg": "Ed25519", "kid": jws.kid, "typ": MANIFEST_TYP}

    # Signed, so from here on we are checking the device's claims, not a forger's.
    if claims["v"] != 1 or isinstance(claims["v"], bool):
        raise DeliveryRejected(f"manifest v is {claims['v']!r}; this client reads version 1")
    if claims["jti"] != jti:
        raise DeliveryRejected(f"the manifest is for request {claims['jti']!r}, not {jti!r}")
    if not isinstance(jti, str) or not _JTI.match(jti):
        raise DeliveryRejected(f"{jti!r} is not a protocol request id")
    if not isinstance(claims["delivery_id"], str) or not _B64URL_ID.match(claims["delivery_id"]):
        raise DeliveryRejected("manifest delivery_id is not 16 bytes of base64url")
    if delivery_id is not None and claims["delivery_id"] != delivery_id:
        raise DeliveryRejected(f"the manifest names delivery {claims['delivery_id']!r} but arrived as {delivery_id!r}")
    _int(claims, "iat", "payload")
    granted = _members(claims["granted"], {"start", "end"}, "granted")
    try:
        start, end = parse_utc_z(granted["start"]), parse_utc_z(granted["end"])
    except ValueError as exc:
        raise DeliveryRejected(f"manifest granted: {exc}") from None
    if not start < end:
        raise DeliveryRejected("manifest granted.start is not before granted.end")
    media = _members(claims["media"], MEDIA_MEMBERS, "media")
    if media["type"] != "video/mp4":
        raise DeliveryRejected(f"manifest media.type is {media['type']!r}, not video/mp4")
    _int(media, "bytes", "media", 1)
    for name in ("frames", "width", "height"):
        _int(media, name, "media")
    if not isinstance(media["sha256"], str) or not _HEX64.match(media["sha256"]):
        raise DeliveryRejected("manifest media.sha256 must be 64 lowercase hex digits")
    enc = _members(claims["enc"], ENC_MEMBERS, "enc")
    if enc["suite"] != SUITE_NAME:
        raise DeliveryRejected(f"manifest enc.suite is {enc['suite']!r}; this client knows {SUITE_NAME}")
    if _int(enc, "chunk_bytes", "enc") != CHUNK_BYTES:
        raise DeliveryRejected(f"manifest enc.chunk_bytes must be {CHUNK_BYTES}")
    n = _int(enc, "chunks", "enc", 1)
    if n > MAX_CHUNKS or n != chunk_count(media["bytes"]):
        raise DeliveryRejected(f"manifest says {n} chunks for {media['bytes']} bytes; that should be {chunk_count(media['bytes'])}")
    _str(enc, "key", "enc")
    log = _members(claims["log"], {"seq", "hash"}, "log")
    _int(log, "seq", "log")
    _str(log, "hash", "log")
    return header, claims


def x25519_private_from_jwk(jwk: Mapping[str, Any]) -> X25519PrivateKey:
    if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "X25519" or "d" not in jwk:
        raise UserError("the recipient key is not a private X25519 JWK (kty OKP, crv X25519, with d)")
    try:
        return X25519PrivateKey.from_private_bytes(b64url_decode(jwk["d"], "recipient.d"))
    except (ValueError, TypeError) as exc:
        raise UserError(f"the recipient key's d is unusable ({exc})") from None


def open_delivery(
    manifest: str,
    chunks: Mapping[int, bytes] | Sequence[bytes],
    recipient_private_jwk: Mapping[str, Any],
    jti: str,
    *,
    delivery_id: str | None = None,
) -> OpenedDelivery:
    """Verify, unseal and reassemble one delivery; raise :class:`DeliveryRejected` if anything is off.

    ``chunks`` maps chunk number to MQTT payload (a list means chunk ``i`` at
    index ``i``). ``delivery_id``, if given, is the one the topics carried.
    """
    header, claims = verify_manifest(manifest, jti=jti, delivery_id=delivery_id)
    did = claims["delivery_id"]
    media, enc = claims["media"], claims["enc"]
    count = enc["chunks"]
    recipient = x25519_private_from_jwk(recipient_private_jwk)

    try:
        content_key = HPKE_SUITE.decrypt(b64url_decode(enc["key"], "enc.key"), recipient, hpke_info(jti, did))
    except (ValueError, InvalidTag):
        raise DeliveryRejected(
            "the content key cannot be unsealed with this request's recipient key; "
            "the delivery is for another request or key, or was altered"
        ) from None
    if len(content_key) != CONTENT_KEY_BYTES:
        raise DeliveryRejected("the unsealed content key is not 32 bytes")

    by_number: Mapping[int, bytes] = chunks if isinstance(chunks, Mapping) else dict(enumerate(chunks))
    missing = [n for n in range(count) if n not in by_number]
    if missing:
        raise DeliveryRejected(
            f"{len(missing)} of {count} chunks are missing (first missing: chunk {missing[0]}); "
            "the delivery was cut off (kill switch or lost connection) and must be discarded"
        )
    extra = sorted(n for n in by_number if not (isinstance(n, int) and 0 <= n < count))
    if extra:
        raise DeliveryRejected(f"chunk {extra[0]} is beyond the {count} chunks the manifest announces")

    aead = ChaCha20Poly1305(content_key)
    parts: list[bytes] = []
    for n in range(count):
        try:
            plain = aead.decrypt(chunk_nonce(n), by_number[n], chunk_aad(jti, did, n, count))
        except InvalidTag:
            raise DeliveryRejected(
                f"chunk {n} of {count} does not authenticate: it was altered, is out of order, or belongs to another delivery"
            ) from None
        last = n == count - 1
        if (not last and len(plain) != CHUNK_BYTES) or (last and not 1 <= len(plain) <= CHUNK_BYTES):
            raise DeliveryRejected(f"chunk {n} has {len(plain)} bytes; every chunk but the last must have {CHUNK_BYTES}")
        parts.append(plain)
    clip = b"".join(parts)
    if len(clip) != media["bytes"]:
        raise DeliveryRejected(f"the clip has {len(clip)} bytes; the manifest says {media['bytes']}")
    if hashlib.sha256(clip).hexdigest() != media["sha256"]:
        raise DeliveryRejected("the clip's sha256 differs from the manifest's")
    return OpenedDelivery(clip=clip, claims=claims, header=header, manifest=manifest)


# --- sorting MQTT messages into deliveries ---------------------------------------------------


@dataclass
class PendingDelivery:
    delivery_id: str
    manifest: str | None = None
    expected: int | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    conflicts: int = 0

    @property
    def complete(self) -> bool:
        return self.expected is not None and all(n in self.chunks for n in range(self.expected))


@dataclass
class DeliveryCollector:
    """Groups ``{root}/v1/deliveries/{jti}/{delivery_id}/...`` messages by delivery.

    Anything that does not fit (a foreign topic, a bad chunk number, a
    manifest that cannot be read) is counted in ``ignored`` and otherwise
    dropped: the network never gets to crash the receiver.
    """

    root: str
    jti: str
    pending: dict[str, PendingDelivery] = field(default_factory=dict)
    ignored: int = 0

    @property
    def prefix(self) -> str:
        return f"{self.root}/v1/deliveries/{self.jti}/"

    def add(self, topic: str, payload: bytes) -> PendingDelivery | None:
        """File one message; return its delivery (None if the message was ignored)."""
        if not topic.startswith(self.prefix):
            self.ignored += 1
            return None
        rest = topic[len(self.prefix) :].split("/")
        if len(rest) != 2 or not _B64URL_ID.match(rest[0]):
            self.ignored += 1
            return None
        did, leaf = rest
        if leaf != "manifest" and not (leaf.isascii() and leaf.isdigit() and (leaf == "0" or leaf[0] != "0")):
            self.ignored += 1
            return None
        if did not in self.pending and len(self.pending) >= 1000:
            self.ignored += 1  # a flood of bogus delivery ids must not eat the memory
            return None
        if leaf == "manifest":
            try:
                text = payload.decode("ascii")
                count = parse_compact(text, typ=MANIFEST_TYP).claims["enc"]["chunks"]
            except (UnicodeDecodeError, ValueError, IndexError, KeyError, TypeError, RecursionError):
                self.ignored += 1
                return None
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_CHUNKS:
                self.ignored += 1
                return None
            pend = self.pending.setdefault(did, PendingDelivery(did))
            pend.manifest, pend.expected = text, count  # the signature is checked by open_delivery
            return pend
        n = int(leaf)
        if n >= MAX_CHUNKS:
            self.ignored += 1
            return None
        pend = self.pending.setdefault(did, PendingDelivery(did))
        if n in pend.chunks:
            if pend.chunks[n] != payload:
                pend.conflicts += 1  # keep the first; a wrong one fails authentication later
            return pend
        pend.chunks[n] = bytes(payload)
        return pend
