"""Test helper: sign footage requests with the vectors' published test keys.

Builds messages the way an agency would (or deliberately not), so that tests
can reach cases the vectors do not spell out. Test keys only.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.jose import REQUEST_TYP, b64url_decode, b64url_encode
from tests.conftest import VECTORS


@cache
def _vectors() -> dict[str, Any]:
    return json.loads(VECTORS.read_text(encoding="utf-8"))


def vectors() -> dict[str, Any]:
    return copy.deepcopy(_vectors())


def case(name: str) -> dict[str, Any]:
    for c in _vectors()["cases"]:
        if c["name"] == name:
            return copy.deepcopy(c)
    raise KeyError(name)


def private_key(kid: str) -> Ed25519PrivateKey:
    for k in _vectors()["test_only_private_keys"]["signing"]["keys"]:
        if k["kid"] == kid:
            return Ed25519PrivateKey.from_private_bytes(b64url_decode(k["d"], "d"))
    raise KeyError(kid)


def base_claims() -> dict[str, Any]:
    """The claims of the vectors' base-compact case (granted at its ``now``)."""
    seg = case("base-compact")["message"].split(".")[1]
    return json.loads(b64url_decode(seg, "payload"))


def header(kid: str, alg: str = "Ed25519", **extra: Any) -> dict[str, Any]:
    return {"alg": alg, "kid": kid, "typ": REQUEST_TYP, **extra}


def _b64json(obj: Any) -> str:
    return b64url_encode(json.dumps(obj, separators=(",", ":")).encode())


def _payload_b64(claims: dict[str, Any] | bytes | str) -> str:
    if isinstance(claims, bytes):
        return b64url_encode(claims)
    if isinstance(claims, str):
        return b64url_encode(claims.encode())
    return _b64json(claims)


def signature(kid: str, protected_b64: str, payload_b64: str) -> str:
    return b64url_encode(private_key(kid).sign(f"{protected_b64}.{payload_b64}".encode()))


def compact(claims: dict[str, Any] | bytes | str, kid: str = "jpd-2026a", hdr: dict[str, Any] | None = None,
            signer: str | None = None) -> bytes:  # fmt: skip
    """A compact JWS; ``signer`` signs under the header's kid (for forged-kid tests)."""
    p = _b64json(hdr if hdr is not None else header(kid))
    pl = _payload_b64(claims)
    return f"{p}.{pl}.{signature(signer or kid, p, pl)}".encode()


def general(claims: dict[str, Any] | bytes | str, kids: list[str], signers: list[str] | None = None) -> bytes:
    """A general JSON serialization with one signature per kid."""
    pl = _payload_b64(claims)
    sigs = []
    for i, kid in enumerate(kids):
        p = _b64json(header(kid))
        sigs.append({"protected": p, "signature": signature((signers or kids)[i], p, pl)})
    return json.dumps({"payload": pl, "signatures": sigs}).encode()


def reserialized(compact_message: str, spaces: int) -> bytes:
    """A captured compact request rewritten as general JSON, ``spaces`` wide: new bytes, the same valid signature.

    What anyone who can read and publish on the request topics can make of a request, without any key.
    """
    protected, payload, sig = compact_message.split(".")
    pad = " " * spaces
    return (f'{{{pad}"payload":{pad}"{payload}",{pad}"signatures":[{{"protected":"{protected}",'
            f'"signature":"{sig}"}}]}}').encode()
