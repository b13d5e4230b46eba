"""Section 5: the published delivery opens, our deliveries open, and tampering never does."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.city import DeliveryRejected, open_delivery
from agent.city.requests import new_recipient_key
from agent.protocol import sealing
from agent.protocol.jose import b64url_decode, jwk_thumbprint
from agent.protocol.jose import b64url_encode as b64url
from agent.protocol.sealing import (
    CHUNK_BYTES,
    HPKE_SUITE,
    SealedDelivery,
    chunk_nonce,
    chunk_topic,
    manifest_topic,
    resume_delivery,
    seal_delivery,
)
from agent.state.devicekey import DeviceKey
from agent.timeutil import UTC
from tests.conftest import DELIVERY_VECTOR

JTI = "req-0001-base-aaaaaaaa"
NOW = datetime(2026, 12, 3, 18, 0, 2, tzinfo=UTC)
GRANTED = (datetime(2026, 12, 3, 16, 30, tzinfo=UTC), datetime(2026, 12, 3, 17, 0, tzinfo=UTC))


def _vector() -> dict[str, Any]:
    return json.loads(DELIVERY_VECTOR.read_text())


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parts(manifest: str) -> tuple[dict[str, Any], dict[str, Any]]:
    h, p, _ = manifest.split(".")
    return json.loads(_b64(h)), json.loads(_b64(p))


def _seal(clip: bytes, recipient_public: dict[str, str], device: DeviceKey | None = None) -> SealedDelivery:
    return seal_delivery(
        clip,
        jti=JTI,
        recipient_jwk=recipient_public,
        device_key=device or DeviceKey.generate(),
        granted=GRANTED,
        frames=27000,
        width=1280,
        height=720,
        log_seq=41,
        log_hash="00fabcfdd130769a950583e7c684eeac56194874ca21e0bf51cfd3a0fce69e0d",
        now=NOW,
    )


@pytest.fixture
def recipient() -> tuple[dict[str, str], dict[str, str]]:
    return new_recipient_key()


@pytest.fixture
def clip() -> bytes:
    return os.urandom(3 * CHUNK_BYTES + 1234)  # four chunks, the last one short


# --- the published vector ---------------------------------------------------------------


def test_the_published_delivery_opens_to_the_recipe_plaintext() -> None:
    v = _vector()
    chunks = [_b64(c) for c in v["chunks_base64url"]]
    opened = open_delivery(v["manifest"], chunks, v["recipient_private_jwk"], v["jti"])
    recipe = b"".join(hashlib.sha256(b"clip bytes %d" % i).digest() for i in range(9400))
    assert opened.clip == recipe
    assert len(opened.clip) == v["plaintext_bytes"]
    assert hashlib.sha256(opened.clip).hexdigest() == v["plaintext_sha256"]
    device = DeviceKey.from_jwk(v["device_private_jwk"])
    assert opened.device_kid == device.kid
    assert opened.granted == GRANTED
    did = opened.delivery_id
    assert manifest_topic("civic/jackson-ms", v["jti"], did) == v["topics"]["manifest"]
    assert [chunk_topic("civic/jackson-ms", v["jti"], did, n) for n in range(len(chunks))] == v["topics"]["chunks"]


def test_the_published_delivery_fails_for_another_jti() -> None:
    v = _vector()
    chunks = [_b64(c) for c in v["chunks_base64url"]]
    with pytest.raises(DeliveryRejected, match="is for request"):
        open_delivery(v["manifest"], chunks, v["recipient_private_jwk"], "req-0002-other-bbbbbbbb")


def test_the_published_delivery_fails_with_its_chunks_swapped() -> None:
    v = _vector()
    chunks = [_b64(c) for c in v["chunks_base64url"]]
    with pytest.raises(DeliveryRejected, match="chunk 0 of 2 does not authenticate"):
        open_delivery(v["manifest"], chunks[::-1], v["recipient_private_jwk"], v["jti"])


# --- our own deliveries ----------------------------------------------------------------------


def test_seal_then_open_gives_back_the_clip(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    device = DeviceKey.generate()
    sealed = _seal(clip, public, device)
    assert len(sealed.chunks) == 4
    payloads = list(sealed.chunks)
    assert [len(p) for p in payloads] == [CHUNK_BYTES + 16] * 3 + [1234 + 16]
    opened = open_delivery(sealed.manifest, payloads, private, JTI, delivery_id=sealed.delivery_id)
    assert opened.clip == clip
    assert opened.device_kid == device.kid
    assert opened.claims["media"]["sha256"] == hashlib.sha256(clip).hexdigest()
    # a dict keyed by chunk number, in arrival order, works the same
    shuffled = {n: payloads[n] for n in (2, 0, 3, 1)}
    assert open_delivery(sealed.manifest, shuffled, private, JTI).clip == clip


def test_manifest_header_and_members_are_exactly_section_5(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    device = DeviceKey.generate()
    sealed = _seal(clip, public, device)
    header, payload = _parts(sealed.manifest)
    assert header == {"alg": "Ed25519", "kid": jwk_thumbprint(device.public_jwk()), "typ": "footage-delivery+jwt"}
    assert list(payload) == ["v", "jti", "delivery_id", "iat", "device", "granted", "media", "enc", "log"]
    assert payload["v"] == 1 and payload["jti"] == JTI
    assert payload["delivery_id"] == sealed.delivery_id and len(b64url_decode(sealed.delivery_id)) == 16
    assert payload["iat"] == int(NOW.timestamp())
    assert payload["device"] == device.public_jwk()
    assert payload["granted"] == {"start": "2026-12-03T16:30:00Z", "end": "2026-12-03T17:00:00Z"}
    assert payload["media"] == {
        "type": "video/mp4", "bytes": len(clip), "sha256": hashlib.sha256(clip).hexdigest(),
        "frames": 27000, "width": 1280, "height": 720,
    }
    enc = payload["enc"]
    assert set(enc) == {"suite", "key", "chunk_bytes", "chunks"}
    assert enc["suite"] == "X25519-HKDF-SHA256/ChaCha20Poly1305"
    assert enc["chunk_bytes"] == 262144 and enc["chunks"] == 4
    assert len(b64url_decode(enc["key"])) == 32 + 32 + 16  # encapsulated key, then sealed 32-byte key + tag
    assert payload["log"] == {"seq": 41, "hash": "00fabcfdd130769a950583e7c684eeac56194874ca21e0bf51cfd3a0fce69e0d"}
    # the signature verifies with the plain library, over the exact signing input
    h, p, s = sealed.manifest.split(".")
    Ed25519PublicKey.from_public_bytes(b64url_decode(device.public_jwk()["x"])).verify(b64url_decode(s), f"{h}.{p}".encode())


def test_chunks_follow_the_nonce_and_aad_rules_independently(recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    """Open a chunk by hand, from the spec's words, not through our own opener."""
    private, public = recipient
    clip = os.urandom(CHUNK_BYTES + 10)
    sealed = _seal(clip, public)
    _, payload = _parts(sealed.manifest)
    x_priv = X25519PrivateKey.from_private_bytes(b64url_decode(private["d"]))
    info = f"footage-delivery/v1 {JTI} {sealed.delivery_id}".encode()
    key = HPKE_SUITE.decrypt(b64url_decode(payload["enc"]["key"]), x_priv, info)
    aead = ChaCha20Poly1305(key)
    second = aead.decrypt(b"\0\0\0\0" + (1).to_bytes(8, "big"), sealed.chunk(1), f"{JTI} {sealed.delivery_id} 1 2".encode())
    assert second == clip[CHUNK_BYTES:]


def test_each_delivery_gets_a_new_id_and_key(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    _, public = recipient
    a, b = _seal(clip, public), _seal(clip, public)
    assert a.delivery_id != b.delivery_id
    assert a.chunk(0) != b.chunk(0)


def test_missing_chunk_fails(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    sealed = _seal(clip, public)
    chunks = {n: sealed.chunk(n) for n in range(len(sealed.chunks))}
    del chunks[3]  # the tail: what a kill switch leaves behind
    with pytest.raises(DeliveryRejected, match="1 of 4 chunks are missing.*chunk 3"):
        open_delivery(sealed.manifest, chunks, private, JTI)


def test_reordered_pair_fails(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    sealed = _seal(clip, public)
    chunks = list(sealed.chunks)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(DeliveryRejected, match="chunk 1 of 4 does not authenticate"):
        open_delivery(sealed.manifest, chunks, private, JTI)


def test_flipped_bit_fails(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    sealed = _seal(clip, public)
    chunks = list(sealed.chunks)
    chunks[2] = chunks[2][:500] + bytes([chunks[2][500] ^ 0x01]) + chunks[2][501:]
    with pytest.raises(DeliveryRejected, match="chunk 2 of 4 does not authenticate"):
        open_delivery(sealed.manifest, chunks, private, JTI)


def test_chunk_from_another_delivery_fails(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    a, b = _seal(clip, public), _seal(clip, public)
    chunks = list(a.chunks)
    chunks[0] = b.chunk(0)
    with pytest.raises(DeliveryRejected, match="chunk 0 of 4"):
        open_delivery(a.manifest, chunks, private, JTI)


def test_wrong_jti_fails_even_if_the_manifest_is_resigned(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    """The jti is in the HPKE info and every chunk's aad, not only in the manifest."""
    private, public = recipient
    device = DeviceKey.generate()
    sealed = _seal(clip, public, device)
    header, payload = _parts(sealed.manifest)
    other = "req-0002-other-bbbbbbbb"
    payload["jti"] = other
    h = b64url(json.dumps(header).encode())
    p = b64url(json.dumps(payload).encode())
    forged = f"{h}.{p}.{b64url(device.sign(f'{h}.{p}'.encode()))}"
    with pytest.raises(DeliveryRejected, match="cannot be unsealed"):
        open_delivery(forged, list(sealed.chunks), private, other)


def test_truncated_chunk_count_in_aad_fails(recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    """Dropping the last chunk and resigning a shorter manifest cannot pass: N is in every aad."""
    private, public = recipient
    device = DeviceKey.generate()
    clip = os.urandom(2 * CHUNK_BYTES)
    sealed = _seal(clip, public, device)
    header, payload = _parts(sealed.manifest)
    payload["media"]["bytes"] = CHUNK_BYTES
    payload["media"]["sha256"] = hashlib.sha256(clip[:CHUNK_BYTES]).hexdigest()
    payload["enc"]["chunks"] = 1
    h, p = b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode())
    forged = f"{h}.{p}.{b64url(device.sign(f'{h}.{p}'.encode()))}"
    with pytest.raises(DeliveryRejected, match="chunk 0 of 1 does not authenticate"):
        open_delivery(forged, [sealed.chunk(0)], private, JTI)


def test_manifest_signed_by_another_key_fails(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    sealed = _seal(clip, public)
    h, p, _ = sealed.manifest.split(".")
    forged = f"{h}.{p}.{b64url(DeviceKey.generate().sign(f'{h}.{p}'.encode()))}"
    with pytest.raises(DeliveryRejected, match="signature does not verify"):
        open_delivery(forged, list(sealed.chunks), private, JTI)


def test_manifest_whose_kid_is_not_the_device_thumbprint_fails(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    device = DeviceKey.generate()
    sealed = _seal(clip, public, device)
    header, payload = _parts(sealed.manifest)
    header["kid"] = DeviceKey.generate().kid
    h, p = b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode())
    forged = f"{h}.{p}.{b64url(device.sign(f'{h}.{p}'.encode()))}"
    with pytest.raises(DeliveryRejected, match="kid is not the thumbprint"):
        open_delivery(forged, list(sealed.chunks), private, JTI)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h, p: p.update(extra=1), "unexpected \\['extra'\\]"),
        (lambda h, p: p["media"].pop("frames"), "missing \\['frames'\\]"),
        (lambda h, p: h.update(typ="JWT"), "typ"),
        (lambda h, p: h.update(crit=["x"]), "header members must be exactly alg, kid, typ"),
        (lambda h, p: p["enc"].update(chunk_bytes=1000), "chunk_bytes"),
        (lambda h, p: p.update(v=True), "v is True"),
    ],
)
def test_manifest_out_of_shape_fails(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]], mutate: Any, message: str) -> None:
    private, public = recipient
    device = DeviceKey.generate()
    sealed = _seal(clip, public, device)
    header, payload = _parts(sealed.manifest)
    mutate(header, payload)
    h, p = b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode())
    forged = f"{h}.{p}.{b64url(device.sign(f'{h}.{p}'.encode()))}"
    with pytest.raises(DeliveryRejected, match=message):
        open_delivery(forged, list(sealed.chunks), private, JTI)


def test_wrong_recipient_key_fails(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    _, public = recipient
    sealed = _seal(clip, public)
    other_private, _ = new_recipient_key()
    with pytest.raises(DeliveryRejected, match="cannot be unsealed"):
        open_delivery(sealed.manifest, list(sealed.chunks), other_private, JTI)


# --- publishing chunk by chunk, and resuming -------------------------------------------------


def test_resume_reproduces_the_same_delivery(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    """Chunks 0-1 from the first attempt and 2-3 after a 'restart' make one valid delivery."""
    private, public = recipient
    first = _seal(clip, public)
    sent = {n: first.chunk(n) for n in (0, 1)}
    state = json.loads(json.dumps(first.resume_state()))  # what survives a restart: plain JSON
    again = resume_delivery(clip, state)
    assert again.delivery_id == first.delivery_id and again.manifest == first.manifest
    sent.update({n: again.chunk(n) for n in (2, 3)})
    assert again.chunk(1) == first.chunk(1)
    assert open_delivery(again.manifest, sent, private, JTI).clip == clip


def test_resume_refuses_a_different_clip(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    _, public = recipient
    first = _seal(clip, public)
    changed = bytes([clip[0] ^ 1]) + clip[1:]
    with pytest.raises(ValueError, match="differs"):
        resume_delivery(changed, first.resume_state())


def test_chunks_are_sealed_only_when_asked(recipient: tuple[dict[str, str], dict[str, str]],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A publisher that stops (kill switch) after chunk 1 never sealed chunk 2, nor any later one.

    Every ChaCha20-Poly1305 encryption the sealing module performs is recorded by its nonce,
    which names the chunk (protocol section 5), so sealing one chunk too many is seen.
    """
    private, public = recipient
    encrypted: list[int] = []
    nonces = {chunk_nonce(n): n for n in range(5)}

    class RecordingAead:
        def __init__(self, key: bytes) -> None:
            self._aead = ChaCha20Poly1305(key)

        def encrypt(self, nonce: bytes, data: Any, aad: bytes) -> bytes:
            encrypted.append(nonces[bytes(nonce)])
            return self._aead.encrypt(nonce, data, aad)

    monkeypatch.setattr(sealing, "ChaCha20Poly1305", RecordingAead)
    clip = os.urandom(5 * CHUNK_BYTES)
    sealed = _seal(clip, public)
    assert sealed.chunk_count == 5 and encrypted == []  # the manifest is signed, no chunk sealed yet

    taken = []
    for n, payload in enumerate(sealed.chunks):
        taken.append(payload)
        if n == 1:
            break
    assert encrypted == [0, 1]

    published = []
    for topic, _payload in sealed.publications("civic/test"):
        published.append(topic)
        if len(published) == 3:  # the manifest, chunk 0, chunk 1: then the kill switch
            break
    assert published[1:] == [sealed.chunk_topic("civic/test", 0), sealed.chunk_topic("civic/test", 1)]
    assert encrypted == [0, 1, 0, 1]

    with pytest.raises(IndexError):
        sealed.chunk(5)
    assert encrypted == [0, 1, 0, 1]
    # What was taken is the real ciphertext: with the rest sealed afterwards the delivery opens.
    rest = {n: sealed.chunk(n) for n in range(2, 5)}
    assert open_delivery(sealed.manifest, {0: taken[0], 1: taken[1], **rest}, private, JTI).clip == clip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"jti": "short"}, "jti"),
        ({"recipient_jwk": {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}}, "X25519"),
        ({"granted": (GRANTED[1], GRANTED[0])}, "start before end"),
        ({"frames": -1}, "frames"),
        ({"now": datetime(2026, 12, 3)}, "timezone"),
    ],
)
def test_seal_rejects_bad_inputs(recipient: tuple[dict[str, str], dict[str, str]], kwargs: dict[str, Any], message: str) -> None:
    _, public = recipient
    args: dict[str, Any] = dict(
        jti=JTI, recipient_jwk=public, device_key=DeviceKey.generate(), granted=GRANTED, frames=1, width=1, height=1,
        log_seq=1, log_hash="ab", now=NOW,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        seal_delivery(b"clip", **args)


def test_empty_clip_is_refused(recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    _, public = recipient
    with pytest.raises(ValueError, match="no clip"):
        _seal(b"", public)


def test_granted_window_keeps_subsecond_precision(recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    start = GRANTED[0] + timedelta(microseconds=250000)
    sealed = seal_delivery(
        b"x" * 10, jti=JTI, recipient_jwk=public, device_key=DeviceKey.generate(), granted=(start, GRANTED[1]),
        frames=1, width=2, height=2, log_seq=0, log_hash="h", now=NOW,
    )
    assert open_delivery(sealed.manifest, list(sealed.chunks), private, JTI).granted[0] == start


def test_extra_chunk_beyond_the_manifest_fails(recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    sealed = _seal(b"short clip", public)
    with pytest.raises(DeliveryRejected, match="chunk 1 is beyond the 1 chunks"):
        open_delivery(sealed.manifest, {0: sealed.chunk(0), 1: b"junk"}, private, JTI)


def test_collector_sorts_messages_into_deliveries_and_ignores_junk(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    from agent.city.receive import DeliveryCollector

    private, public = recipient
    a, b = _seal(clip, public), _seal(b"other camera", public)
    col = DeliveryCollector(root="civic/x", jti=JTI)
    junk = [
        ("civic/x/v1/deliveries/another-request-000000/" + a.delivery_id + "/0", b"x"),  # another jti
        (a.chunk_topic("civic/x", 0).replace("/0", "/00"), b"x"),  # leading zero: not a chunk number
        (a.chunk_topic("civic/x", 0).replace("/0", "/-1"), b"x"),
        ("civic/x/v1/deliveries/" + JTI + "/not-an-id/manifest", a.manifest.encode()),
        (manifest_topic("civic/x", JTI, b.delivery_id), b"\xff not a manifest"),
    ]
    for topic, payload in junk:
        assert col.add(topic, payload) is None
    assert col.ignored == len(junk)
    # chunks before the manifest, out of order, one duplicated: still one complete delivery
    for n in (3, 1):
        col.add(a.chunk_topic("civic/x", n), a.chunk(n))
    col.add(a.manifest_topic("civic/x"), a.manifest.encode())
    col.add(a.chunk_topic("civic/x", 1), a.chunk(1))
    col.add(a.chunk_topic("civic/x", 0), a.chunk(0))
    assert not col.pending[a.delivery_id].complete
    pend = col.add(a.chunk_topic("civic/x", 2), a.chunk(2))
    assert pend is not None and pend.complete and pend.conflicts == 0
    assert open_delivery(pend.manifest or "", pend.chunks, private, JTI, delivery_id=pend.delivery_id).clip == clip
    col.add(b.chunk_topic("civic/x", 0), b.chunk(0))
    assert set(col.pending) == {a.delivery_id, b.delivery_id} and not col.pending[b.delivery_id].complete


def test_publications_come_manifest_first_then_chunks_and_resume_midway(clip: bytes, recipient: tuple[dict[str, str], dict[str, str]]) -> None:
    private, public = recipient
    sealed = _seal(clip, public)
    pubs = list(sealed.publications("civic/x"))
    assert [t for t, _ in pubs] == [sealed.manifest_topic("civic/x")] + [sealed.chunk_topic("civic/x", n) for n in range(4)]
    assert pubs[0][1].decode() == sealed.manifest
    later = list(resume_delivery(clip, sealed.resume_state()).publications("civic/x", from_chunk=2))
    assert [t.rsplit("/", 1)[1] for t, _ in later] == ["manifest", "2", "3"]
    chunks = {0: pubs[1][1], 1: pubs[2][1], 2: later[1][1], 3: later[2][1]}
    assert open_delivery(later[0][1].decode(), chunks, private, JTI).clip == clip
