"""Sealing a delivery: is our overhead over the bare cipher small?

A 60-second 720p H.264 clip is a few megabytes; we use 6 MB of random bytes.
"Ours" is everything the agent does to produce a delivery (content key, HPKE
seal, sha256 of the clip, signed manifest, then every chunk sealed with its
nonce and aad); the reference is bare ChaCha20-Poly1305 over the same bytes
in the same chunk size, measured in the same run. Throughput in MB/s, so a
ratio near 1 (higher is better) means the protocol's extras cost little.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.city.receive import open_delivery
from agent.city.requests import new_recipient_key
from agent.protocol.sealing import CHUNK_BYTES, seal_delivery
from agent.state.devicekey import DeviceKey
from agent.timeutil import UTC
from tests.bench.report import Report

CLIP_BYTES = 6 * 1024 * 1024
ROUNDS = 15
JTI = "bench-delivery-0000000000"


def _paired_seconds(ours: Callable[[], object], reference: Callable[[], object], rounds: int = ROUNDS) -> tuple[float, float]:
    """Median seconds of each, rounds interleaved so that load from other processes hits both alike."""
    a, b = [], []
    for _ in range(rounds):
        for fn, sink in ((ours, a), (reference, b)):
            t0 = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def run(report: Callable[[str, float, float, str, str], None]) -> None:
    clip = os.urandom(CLIP_BYTES)
    private, public = new_recipient_key()
    device = DeviceKey.generate()
    now = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
    granted = (datetime(2026, 12, 3, 17, 59, tzinfo=UTC), now)

    def ours() -> list[bytes]:
        sealed = seal_delivery(clip, jti=JTI, recipient_jwk=public, device_key=device, granted=granted,
                               frames=1800, width=1280, height=720, log_seq=1, log_hash="00" * 32, now=now)
        return list(sealed.chunks)

    key = os.urandom(32)

    def bare() -> list[bytes]:
        aead = ChaCha20Poly1305(key)
        nonce = bytes(12)
        return [aead.encrypt(nonce, clip[i : i + CHUNK_BYTES], None) for i in range(0, CLIP_BYTES, CHUNK_BYTES)]

    mb = CLIP_BYTES / 1e6
    ours_s, ref_s = _paired_seconds(ours, bare)
    report("seal 6 MB delivery, MB/s (vs bare ChaCha20-Poly1305 chunks)", mb / ours_s, mb / ref_s, "MB/s", ">= 0.5x")

    def bare_and_digest() -> list[bytes]:
        hashlib.sha256(clip).hexdigest()  # the manifest's sha256 is part of the protocol, not our overhead
        return bare()

    ours_s, ref_s = _paired_seconds(ours, bare_and_digest)
    report("seal 6 MB delivery, MB/s (vs bare chunks + sha256 of the clip)", mb / ours_s, mb / ref_s, "MB/s", ">= 0.8x")

    sealed = seal_delivery(clip, jti=JTI, recipient_jwk=public, device_key=device, granted=granted,
                           frames=1800, width=1280, height=720, log_seq=1, log_hash="00" * 32, now=now)
    chunks = list(sealed.chunks)
    ciphertexts = bare()

    def open_ours() -> bytes:
        return open_delivery(sealed.manifest, chunks, private, JTI).clip

    def open_bare() -> list[bytes]:
        aead = ChaCha20Poly1305(key)
        return [aead.decrypt(bytes(12), c, None) for c in ciphertexts]

    ours_s, ref_s = _paired_seconds(open_ours, open_bare)
    report("open 6 MB delivery, MB/s (vs bare ChaCha20-Poly1305 chunks)", mb / ours_s, mb / ref_s, "MB/s", "report only")

    def open_bare_and_digest() -> None:
        hashlib.sha256(b"".join(open_bare())).hexdigest()  # the requester must check the clip's sha256

    ours_s, ref_s = _paired_seconds(open_ours, open_bare_and_digest)
    report("open 6 MB delivery, MB/s (vs bare chunks + join + sha256)", mb / ours_s, mb / ref_s, "MB/s", ">= 0.8x")


if __name__ == "__main__":
    run(Report())
