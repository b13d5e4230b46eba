"""Sealing a granted clip for its requester (protocol section 5).

The agent never sends footage the broker can read: a random content key
encrypts the clip in 262144-byte chunks (ChaCha20-Poly1305), the content key
is sealed with HPKE to the one-time X25519 key named in the request, and a
manifest signed by the device key binds it all together (which request,
which delivery, which minutes, which access-log entry).

Publishing is the caller's job, chunk by chunk, so that it can look at the
kill switch before every chunk: :class:`SealedDelivery` seals each chunk only
when it is asked for (:meth:`SealedDelivery.chunk` or iterating
``sealed.chunks``).

Resuming after a reconnect
--------------------------
Chunk ``n`` is a pure function of (content key, jti, delivery_id, n, N, clip
bytes): the nonce and the aad are fixed by ``n`` and ``N``. The manifest is
not: HPKE encapsulation is randomized and ``iat`` is the signing time. So to
resume from chunk ``k`` *the same* delivery (instead of starting a second,
different one the requester would have to reconcile), persist, before the
first publish:

- the exact clip bytes (or the clip file, never re-muxed: MP4 muxing need
  not be byte-identical twice),
- :meth:`SealedDelivery.resume_state` (the signed manifest text and the
  content key; the content key is a secret: keep it in a 0600 file and delete
  it when the delivery is finished or abandoned),

then call :func:`resume_delivery` and publish the manifest again (an
identical QoS 1 duplicate is harmless) and chunks ``k..N-1``.
:func:`resume_delivery` checks the clip against the manifest's ``bytes`` and
``sha256`` so a changed clip cannot be sent under an old manifest.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, overload

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.protocol.jose import JwsError, Signer, b64url_decode, b64url_encode, parse_compact, sign_compact
from agent.timeutil import UTC, format_utc

CHUNK_BYTES = 262144
SUITE_NAME = "X25519-HKDF-SHA256/ChaCha20Poly1305"
MANIFEST_TYP = "footage-delivery+jwt"
INFO_PREFIX = "footage-delivery/v1 "
CONTENT_KEY_BYTES = 32

# RFC 9180 base mode: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.
HPKE_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)

_JTI = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class DeviceIdentity(Signer, Protocol):
    """The device key as sealing needs it (``agent.state.devicekey.DeviceKey`` in the agent)."""

    @property
    def kid(self) -> str: ...

    def public_jwk(self) -> dict[str, str]: ...


class DeliveryError(ValueError):
    """The inputs cannot make a valid delivery (a bug upstream, not a network event)."""


def hpke_info(jti: str, delivery_id: str) -> bytes:
    return (INFO_PREFIX + jti + " " + delivery_id).encode("ascii")


def chunk_nonce(n: int) -> bytes:
    """Four zero bytes then ``n`` as 8-byte big-endian: unique per chunk under one content key."""
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")


def chunk_aad(jti: str, delivery_id: str, n: int, count: int) -> bytes:
    """Binds a chunk to its request, its delivery, its place and the total, so chunks
    cannot be reordered, moved between deliveries, or the tail cut off unnoticed."""
    return f"{jti} {delivery_id} {n} {count}".encode("ascii")


def chunk_count(clip_bytes: int) -> int:
    return math.ceil(clip_bytes / CHUNK_BYTES)


def manifest_topic(root: str, jti: str, delivery_id: str) -> str:
    return f"{root}/v1/deliveries/{jti}/{delivery_id}/manifest"


def chunk_topic(root: str, jti: str, delivery_id: str, n: int) -> str:
    return f"{root}/v1/deliveries/{jti}/{delivery_id}/{n}"


def new_delivery_id() -> str:
    """16 random bytes, base64url: new for every delivery, never derived from anything."""
    return b64url_encode(os.urandom(16))


def _x25519_public(jwk: dict[str, Any]) -> X25519PublicKey:
    if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "X25519":
        raise DeliveryError("recipient key must be a JWK with kty OKP and crv X25519")
    try:
        raw = b64url_decode(jwk.get("x"), "recipient.x")  # type: ignore[arg-type]
    except ValueError as exc:
        raise DeliveryError(f"recipient key x is not base64url: {exc}") from None
    if len(raw) != 32:
        raise DeliveryError("recipient key x must be 32 bytes")
    return X25519PublicKey.from_public_bytes(raw)


class SealedChunks(Sequence[bytes]):
    """The delivery's chunk ciphertexts, sealed one at a time on access.

    Behaves like a read-only list (``len``, indexing, iteration, ``==`` with a
    list) but holds no ciphertext: iterating it while publishing keeps memory
    at one chunk and lets the publisher stop before sealing the next one.
    """

    def __init__(self, sealed: SealedDelivery) -> None:
        self._sealed = sealed

    def __len__(self) -> int:
        return self._sealed.chunk_count

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [self._sealed.chunk(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("chunk index out of range")
        return self._sealed.chunk(index)

    def __iter__(self) -> Iterator[bytes]:
        for n in range(len(self)):
            yield self._sealed.chunk(n)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"<SealedChunks {len(self)} of {self._sealed.delivery_id}>"


@dataclass(frozen=True, eq=False)
class SealedDelivery:
    """One delivery, ready to publish: the manifest first, then ``chunk(0..N-1)`` in order."""

    jti: str
    delivery_id: str
    manifest: str
    clip: bytes | memoryview = field(repr=False)
    content_key: bytes = field(repr=False)

    @property
    def chunk_count(self) -> int:
        return chunk_count(len(self.clip))

    @property
    def chunks(self) -> SealedChunks:
        return SealedChunks(self)

    def chunk(self, n: int) -> bytes:
        """Chunk ``n``'s MQTT payload (ciphertext with tag); deterministic, so a resend is identical."""
        count = self.chunk_count
        if not 0 <= n < count:
            raise IndexError(f"chunk {n} does not exist; this delivery has {count} chunks")
        plain = memoryview(self.clip)[n * CHUNK_BYTES : (n + 1) * CHUNK_BYTES]  # no copy of the clip
        return ChaCha20Poly1305(self.content_key).encrypt(
            chunk_nonce(n), plain, chunk_aad(self.jti, self.delivery_id, n, count)
        )

    def manifest_topic(self, root: str) -> str:
        return manifest_topic(root, self.jti, self.delivery_id)

    def chunk_topic(self, root: str, n: int) -> str:
        return chunk_topic(root, self.jti, self.delivery_id, n)

    def publications(self, root: str, *, from_chunk: int = 0) -> Iterator[tuple[str, bytes]]:
        """(topic, payload) in publishing order: the manifest, then chunks ``from_chunk..N-1``.

        Lazy: each chunk is sealed only when the loop asks for it, so a
        publisher that checks the kill switch before each step and stops
        has sealed (and sent) nothing more.
        """
        yield self.manifest_topic(root), self.manifest.encode("ascii")
        for n in range(from_chunk, self.chunk_count):
            yield self.chunk_topic(root, n), self.chunk(n)

    def resume_state(self) -> dict[str, str]:
        """What to keep (0600, deleted afterwards) to resume this same delivery later."""
        return {"manifest": self.manifest, "content_key": b64url_encode(self.content_key)}


def _view(clip: bytes | bytearray | memoryview) -> memoryview:
    """A read-only view, not a copy: a long clip may be a memory-mapped file of hundreds of MB.

    A memoryview given by the caller is used as it is, so the caller can release it (and close
    the mapping) once the delivery is done.
    """
    view = clip if isinstance(clip, memoryview) else memoryview(clip)
    if view.readonly is False:
        view = view.toreadonly()
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def seal_delivery(
    clip: bytes | bytearray | memoryview,
    *,
    jti: str,
    recipient_jwk: dict[str, Any],
    device_key: DeviceIdentity,
    granted: tuple[datetime, datetime],
    frames: int,
    width: int,
    height: int,
    log_seq: int,
    log_hash: str,
    now: datetime,
    delivery_id: str | None = None,
) -> SealedDelivery:
    """Draw a content key and a delivery id, seal the key to the requester, sign the manifest.

    ``delivery_id`` is only for tests; a real delivery always gets a fresh one.
    """
    if not isinstance(clip, (bytes, bytearray, memoryview)) or len(clip) == 0:
        raise DeliveryError("there is no clip to deliver (0 bytes)")
    if not isinstance(jti, str) or not _JTI.match(jti):
        raise DeliveryError(f"jti {jti!r} is not a protocol request id")
    start, end = granted
    if start.tzinfo is None or end.tzinfo is None or not start < end:
        raise DeliveryError("granted must be two timezone-aware times, start before end")
    if now.tzinfo is None:
        raise DeliveryError("now must be timezone-aware")
    for name, value in (("frames", frames), ("width", width), ("height", height), ("log_seq", log_seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DeliveryError(f"{name} must be a non-negative integer, not {value!r}")
    if not isinstance(log_hash, str) or not log_hash:
        raise DeliveryError("log_hash must be the access-log entry's hash as text")
    recipient = _x25519_public(recipient_jwk)
    clip = _view(clip)
    delivery_id = delivery_id or new_delivery_id()

    content_key = os.urandom(CONTENT_KEY_BYTES)
    # Suite.encrypt returns the encapsulated key followed by the ciphertext: the manifest's `key`.
    sealed_key = HPKE_SUITE.encrypt(content_key, recipient, hpke_info(jti, delivery_id))

    device_jwk = device_key.public_jwk()
    header = {"alg": "Ed25519", "kid": device_key.kid, "typ": MANIFEST_TYP}
    payload = {
        "v": 1,
        "jti": jti,
        "delivery_id": delivery_id,
        "iat": int(now.astimezone(UTC).timestamp()),
        "device": device_jwk,
        "granted": {"start": format_utc(start), "end": format_utc(end)},
        "media": {
            "type": "video/mp4",
            "bytes": len(clip),
            "sha256": hashlib.sha256(clip).hexdigest(),
            "frames": frames,
            "width": width,
            "height": height,
        },
        "enc": {
            "suite": SUITE_NAME,
            "key": b64url_encode(sealed_key),
            "chunk_bytes": CHUNK_BYTES,
            "chunks": chunk_count(len(clip)),
        },
        "log": {"seq": log_seq, "hash": log_hash},
    }
    manifest = sign_compact(header, payload, device_key)
    return SealedDelivery(jti=jti, delivery_id=delivery_id, manifest=manifest, clip=clip, content_key=content_key)


def resume_delivery(clip: bytes | bytearray | memoryview, state: dict[str, str]) -> SealedDelivery:
    """Rebuild a delivery from :meth:`SealedDelivery.resume_state` and the same clip bytes.

    The chunks it seals are byte-identical to the first attempt's, so the
    requester sees one delivery whatever mix of attempts its chunks came from.
    """
    try:
        manifest = state["manifest"]
        content_key = b64url_decode(state["content_key"], "content_key")
        payload = parse_compact(manifest, typ=MANIFEST_TYP).claims
        jti, delivery_id = payload["jti"], payload["delivery_id"]
        media, enc = payload["media"], payload["enc"]
    except (KeyError, JwsError, TypeError) as exc:
        raise DeliveryError(f"the saved delivery state is unreadable ({exc}); start a new delivery") from None
    if len(content_key) != CONTENT_KEY_BYTES:
        raise DeliveryError("the saved content key is not 32 bytes; start a new delivery")
    clip = _view(clip)
    if len(clip) != media["bytes"] or hashlib.sha256(clip).hexdigest() != media["sha256"]:
        raise DeliveryError("the clip differs from the one the saved manifest describes; start a new delivery")
    if enc["chunks"] != chunk_count(len(clip)):
        raise DeliveryError("the saved manifest's chunk count does not match the clip")
    return SealedDelivery(jti=jti, delivery_id=delivery_id, manifest=manifest, clip=clip, content_key=content_key)
