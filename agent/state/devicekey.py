"""The device's own Ed25519 identity: signs delivery manifests and log checkpoints.

Made once at first start and kept in a 0600 PEM file. Its RFC 7638
thumbprint is the ``kid`` agencies see in manifests, so it must never change
silently: a key file that exists but cannot be read is an error, never a
reason to mint a new identity.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import UserError
from agent.fsutil import write_atomically
from agent.protocol.jose import b64url_decode, ed25519_public_jwk, jwk_thumbprint


class DeviceKeyError(UserError):
    pass


@dataclass(frozen=True)
class DeviceKey:
    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def public_jwk(self) -> dict[str, str]:
        return ed25519_public_jwk(self.public)

    @property
    def kid(self) -> str:
        return jwk_thumbprint(self.public_jwk())

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def client_id_secret(self) -> bytes:
        """32 bytes that only this device can compute, for the secret part of its MQTT client id.

        The default client id must not be derivable from public facts (the kid is in every
        manifest): see :func:`agent.sharing.transport.default_client_id`. Derived from the private
        key (HMAC-SHA256 under it, with a label used for nothing else) rather than kept in a file of
        its own: it is as random as the key, it lives and is backed up with the key, and it cannot
        get out of step with it.
        """
        raw = self.private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return hmac.new(raw, b"doorbell-agent/mqtt-client-id/v1", hashlib.sha256).digest()

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_jwk(cls, jwk: dict[str, str]) -> DeviceKey:
        """For tests and the published delivery vector's device key."""
        return cls(Ed25519PrivateKey.from_private_bytes(b64url_decode(jwk["d"], "d")))

    @classmethod
    def load(cls, path: Path) -> DeviceKey:
        try:
            data = path.read_bytes()
            key = serialization.load_pem_private_key(data, password=None)
        except FileNotFoundError:
            raise DeviceKeyError(f"device key {path} does not exist; start the agent once to create it") from None
        except (OSError, ValueError, TypeError) as exc:
            raise DeviceKeyError(
                f"device key {path} cannot be read ({exc}); nothing will be signed or shared until it is restored"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise DeviceKeyError(f"device key {path} is not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> DeviceKey:
        """Load the key, or make it if (and only if) no file exists yet."""
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        pem = key.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomically(path, pem, 0o600, replace=False)  # another process won the race: use its key
        return cls.load(path)
