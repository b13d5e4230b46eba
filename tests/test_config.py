"""The configuration file: a resident's typo must be caught, named and explained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config

POLICY = """
[policy]
program = "jackson-ms/camera-pilot-2026"
location = { lat = 32.29876, lon = -90.18481 }
timezone = "America/Chicago"

[policy.consent]
start = 2026-11-20T00:00:00Z
end = 2027-01-04T00:00:00Z
schedule = [ { days = ["thu"], from = "22:00", to = "03:00" } ]
"""


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, env=env, timeout=60)


def test_valid_config_loads_with_policy(write_config) -> None:
    cfg = load_config(write_config(POLICY))
    pol = cfg.require_policy()
    assert pol.program == "jackson-ms/camera-pilot-2026"
    assert pol.consent.schedule[0].from_ == "22:00"
    assert pol.consent.start.tzinfo is not None
    assert cfg.mqtt is None


def test_missing_file_is_an_error_not_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_unknown_key_is_named(write_config) -> None:
    path = write_config(POLICY.replace("[policy]\n", "[policy]\nrequire_warant = true\n"))
    with pytest.raises(ConfigError, match=r"policy\.require_warant: unknown setting"):
        load_config(path)


def test_bad_value_names_key_value_and_range(write_config) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config("[camera]\nfps = 120\n"))
    assert "camera.fps = 120" in str(err.value)
    assert "less than or equal to 60" in str(err.value)


def test_bad_timezone_and_schedule_time(write_config) -> None:
    body = POLICY.replace("America/Chicago", "Mars/Olympus").replace('"03:00"', '"25:00"')
    with pytest.raises(ConfigError) as err:
        load_config(write_config(body))
    text = str(err.value)
    assert "Mars/Olympus" in text and "IANA" in text
    assert "25:00" in text and "HH:MM" in text


def test_environment_overrides_file(write_config, monkeypatch) -> None:
    path = write_config("[camera]\nfps = 10\n")
    monkeypatch.setenv("DOORBELL_AGENT_CAMERA__FPS", "5")
    assert load_config(path).camera.fps == 5
    monkeypatch.setenv("DOORBELL_AGENT_CAMERA__FPS", "fast")
    with pytest.raises(ConfigError, match="DOORBELL_AGENT_CAMERA__FPS"):
        load_config(path)


def test_plaintext_mqtt_needs_explicit_consent(write_config) -> None:
    with pytest.raises(ConfigError, match="allow_plaintext"):
        load_config(write_config('[mqtt]\nhost = "b"\ntls = false\n'))
    cfg = load_config(write_config('[mqtt]\nhost = "b"\ntls = false\nallow_plaintext = true\n'))
    assert cfg.require_mqtt().tls is False


def test_invalid_toml_syntax_is_reported(write_config) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write_config("[camera\n"))


def test_config_check_command(write_config) -> None:
    good = run_cli("--config", str(write_config(POLICY)), "config", "check")
    assert good.returncode == 0, good.stderr
    assert "configuration is valid" in good.stdout
    bad = run_cli("--config", str(write_config("[camera]\nsource = \"webcam\"\n")), "config", "check")
    assert bad.returncode == 2
    assert "camera.source = 'webcam'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_example_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "agent" / "example-agent.toml"
    cfg = load_config(example)
    assert cfg.camera.source == "v4l2"


def test_a_rejected_password_is_never_echoed(write_config) -> None:
    """A password that fails validation (a number, say) must not land in the journal with the error."""
    body = '[mqtt]\nhost = "broker.example.org"\nroot = "civic/test"\nusername = "porch"\npassword = 73912468\n'
    with pytest.raises(ConfigError) as err:
        load_config(write_config(body))
    text = str(err.value)
    assert "mqtt.password" in text and "(hidden)" in text and "73912468" not in text


def test_an_http_address_for_an_rtsp_camera_is_caught_by_config_check(write_config) -> None:
    """`config check` refuses what `run` would: an RTSP camera needs an rtsp:// address; the password stays hidden."""
    body = '[camera]\nsource = "rtsp"\nurl = "http://admin:Sup3rSecretPw@192.0.2.7/video.cgi?pwd=Sup3rSecretPw"\n'
    r = run_cli("--config", str(write_config(body)), "config", "check")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "camera.url = (hidden): an RTSP camera's address must start with rtsp://" in r.stderr, r.stderr
    assert "http://admin:********@192.0.2.7/video.cgi" in r.stderr and "camera.source = 'file'" in r.stderr
    assert "Sup3rSecretPw" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    ok = body.replace("http://", "rtsp://").replace("/video.cgi?pwd=Sup3rSecretPw", ":554/stream1")
    assert load_config(write_config(ok)).camera.url == "rtsp://admin:Sup3rSecretPw@192.0.2.7:554/stream1"
    assert load_config(write_config(ok.replace("rtsp://", "RTSPS://"))).camera.source == "rtsp"


def test_config_check_warns_when_max_bytes_cannot_hold_retention(write_config) -> None:
    """The defaults (8 GiB, 72 hours) hold 4.5 to 33 hours at 720p15: said plainly, as a warning (exit 0)."""
    r = run_cli("--config", str(write_config("")), "config", "check")
    assert r.returncode == 0, r.stderr
    assert ("WARNING: buffer.max_bytes (8.0 GB) cannot hold the 72 hours of buffer.retention_hours: at 1280x720 at "
            "15 fps it holds between 4.5 and 32.9 hours") in r.stdout, r.stdout
    data = json.loads(run_cli("--config", str(write_config("")), "config", "check", "--json").stdout)
    assert data["ok"] is True and "cannot hold" in data["warnings"][0]
    enough = run_cli("--config", str(write_config("[buffer]\nretention_hours = 4\n")), "config", "check")
    assert enough.returncode == 0 and "WARNING: buffer.max_bytes" not in enough.stdout, enough.stdout
    maybe = run_cli("--config", str(write_config("[buffer]\nretention_hours = 24\n")), "config", "check")
    assert "may not hold the 24 hours" in maybe.stdout, maybe.stdout
