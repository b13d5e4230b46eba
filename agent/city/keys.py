"""An agency's signing keys, as the protocol's trust store wants them (section 1).

``keygen`` makes an Ed25519 key pair and writes two files:

- ``{kid}.private.jwk`` (mode 0600): the private JWK, with the agency's
  ``iss`` and the key's ``role`` beside it so that ``doorbell-city request``
  knows whom it speaks for. Keep it in the agency's key vault.
- ``{kid}.jwks.json``: the public JWK Set to hand to residents, each key with
  ``kid``, ``iss``, ``role``, ``use: sig`` and the optional ``nbf``/``exp``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import UserError
from agent.fsutil import write_atomically
from agent.protocol.jose import b64url_decode, b64url_encode

ISS_PATTERN = re.compile(r"^[a-z0-9._-]{1,64}$")
# kid is free text in JOSE; we keep it to safe file-name characters because it names the key files.
KID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ROLES = ("requester", "oversight")


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key with the trust-store facts that go with it."""

    private: Ed25519PrivateKey
    kid: str
    iss: str
    role: str

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    @property
    def x(self) -> str:
        return b64url_encode(self.private.public_key().public_bytes_raw())


@dataclass(frozen=True)
class KeygenResult:
    private_path: Path
    public_path: Path
    public_jwks: dict[str, Any]


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (no window where a secret is world-readable); never overwrite."""
    if not write_atomically(path, text.encode("utf-8"), mode, replace=False):
        raise UserError(f"{path} already exists; choose another --kid or --out, or move the old file away")


def keygen(
    *, iss: str, kid: str, role: str = "requester", out_dir: Path | str = ".", nbf: int | None = None, exp: int | None = None
) -> KeygenResult:
    """Make a key pair; write the private JWK (0600) and the public JWK Set for residents."""
    if not isinstance(iss, str) or not ISS_PATTERN.match(iss):
        raise UserError(f"--iss {iss!r} is not an agency id; use 1 to 64 of a-z 0-9 . _ - (e.g. jackson-pd)")
    if not isinstance(kid, str) or not KID_PATTERN.match(kid):
        raise UserError(f"--kid {kid!r} is not usable; use 1 to 64 of A-Z a-z 0-9 . _ - (e.g. jpd-2026a)")
    if role not in ROLES:
        raise UserError(f"--role {role!r} must be requester or oversight")
    for name, value in (("nbf", nbf), ("exp", exp)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"--{name} must be a time (NumericDate), not {value!r}")
    if nbf is not None and exp is not None and not nbf < exp:
        raise UserError("--nbf must be before --exp")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    private = Ed25519PrivateKey.generate()
    key = SigningKey(private, kid, iss, role)
    d = private.private_bytes_raw()
    validity = {k: v for k, v in (("nbf", nbf), ("exp", exp)) if v is not None}
    public_jwk = {"kty": "OKP", "crv": "Ed25519", "x": key.x, "kid": kid, "use": "sig", "iss": iss, "role": role, **validity}
    private_jwk = {"kty": "OKP", "crv": "Ed25519", "x": key.x, "d": b64url_encode(d), "kid": kid, "iss": iss, "role": role, **validity}
    jwks = {"keys": [public_jwk]}

    private_path = out / f"{kid}.private.jwk"
    public_path = out / f"{kid}.jwks.json"
    if public_path.exists():
        raise UserError(f"{public_path} already exists; choose another --kid or --out, or move the old file away")
    _write_new(private_path, json.dumps(private_jwk, indent=2) + "\n", 0o600)
    _write_new(public_path, json.dumps(jwks, indent=2) + "\n", 0o644)
    return KeygenResult(private_path, public_path, jwks)


def signing_key_from_jwk(jwk: dict[str, Any], *, source: str = "key") -> SigningKey:
    """A private JWK as ``keygen`` writes it; errors name ``source``."""
    if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or "d" not in jwk:
        raise UserError(f"{source} is not a private Ed25519 JWK (kty OKP, crv Ed25519, with d)")
    for name in ("kid", "iss", "role"):
        if not isinstance(jwk.get(name), str):
            raise UserError(f"{source} has no {name}; make keys with 'doorbell-city keygen'")
    if not ISS_PATTERN.match(jwk["iss"]):
        raise UserError(f"{source} has iss {jwk['iss']!r}, which is not an agency id")
    if jwk["role"] not in ROLES:
        raise UserError(f"{source} has role {jwk['role']!r}; it must be requester or oversight")
    try:
        raw = b64url_decode(jwk["d"], "d")
        private = Ed25519PrivateKey.from_private_bytes(raw)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{source} has an unusable private key d ({exc})") from None
    key = SigningKey(private, jwk["kid"], jwk["iss"], jwk["role"])
    if "x" in jwk and jwk["x"] != key.x:
        raise UserError(f"{source}: the public x does not belong to the private d; the file is damaged")
    return key


def load_signing_key(path: Path | str) -> SigningKey:
    path = Path(path)
    try:
        jwk = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"key file {path} does not exist; make one with 'doorbell-city keygen'") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"key file {path} cannot be read ({exc})") from None
    return signing_key_from_jwk(jwk, source=f"key file {path}")
