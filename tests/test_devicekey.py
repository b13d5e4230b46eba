"""The device identity: made once, kept private, never silently replaced."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent.protocol.jose import b64url_decode, jwk_thumbprint
from agent.state.devicekey import DeviceKey, DeviceKeyError
from tests.conftest import DELIVERY_VECTOR


def test_created_once_with_private_mode_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "state" / "device-key.pem"
    key = DeviceKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = DeviceKey.load_or_create(path)
    assert again.kid == key.kid
    assert again.public_jwk() == key.public_jwk()
    assert [p.name for p in path.parent.iterdir()] == ["device-key.pem"]  # no temp files left


def test_damaged_key_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    path = tmp_path / "device-key.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DeviceKeyError, match="cannot be read"):
        DeviceKey.load_or_create(path)
    assert "not a key" in path.read_text()


def test_kid_is_the_rfc7638_thumbprint_used_in_the_delivery_vector() -> None:
    vector = json.loads(DELIVERY_VECTOR.read_text())
    key = DeviceKey.from_jwk(vector["device_private_jwk"])
    header = json.loads(b64url_decode(vector["manifest"].split(".")[0]))
    assert key.kid == header["kid"] == jwk_thumbprint(key.public_jwk())


def test_strict_base64url() -> None:
    assert b64url_decode("AQID") == b"\x01\x02\x03"
    for bad in ("AQI=", "AQ+D", "A", "AQ D"):
        with pytest.raises(ValueError):
            b64url_decode(bad)
