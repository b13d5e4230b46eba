"""``config check`` catches what ``run`` would fail on, shows no secret; ``doctor`` checks the rest and says how to fix it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.broker import Broker

SECRET = "hunter2-very-secret"

POLICY = """
[policy]
program = "jackson-ms/camera-pilot-2026"
location = { lat = 32.29876, lon = -90.18481 }
timezone = "America/Chicago"

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2099-01-01T00:00:00Z
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)


def mqtt_section(broker: Broker, **over: str) -> str:
    cred = broker.credentials["agent"]
    values = {"host": f'"{broker.host}"', "port": str(broker.port), "ca_file": f'"{broker.ca_file}"',
              "cert_file": f'"{cred.cert_file}"', "key_file": f'"{cred.key_file}"',
              "username": f'"{cred.username}"', "password": f'"{SECRET}"', "root": f'"{broker.root}"'}
    values.update(over)
    return "\n[mqtt]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


# -- config check ---------------------------------------------------------------------------------


def test_check_never_shows_the_password(write_config: Callable[[str], Path], broker: Broker) -> None:
    cfg = write_config(POLICY + mqtt_section(broker) + '\n[camera]\nsource = "rtsp"\n'
                       'url = "rtsp://admin:camsecret@192.0.2.7:554/stream1"\n')
    for args in (["config", "check"], ["config", "check", "--json"]):
        r = run_cli("--config", str(cfg), *args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert SECRET not in r.stdout + r.stderr and "camsecret" not in r.stdout + r.stderr
    data = json.loads(run_cli("--config", str(cfg), "config", "check", "--json").stdout)
    assert data["ok"] is True and data["config"]["mqtt"]["password"] == "********"
    assert data["config"]["camera"]["url"] == "rtsp://admin:********@192.0.2.7:554/stream1"


@pytest.mark.parametrize(("key", "words"), [
    ("ca_file", "mqtt.ca_file = "), ("cert_file", "mqtt.cert_file = "), ("key_file", "mqtt.key_file = "),
])
def test_check_catches_a_missing_tls_file(write_config: Callable[[str], Path], broker: Broker, tmp_path: Path,
                                          key: str, words: str) -> None:
    cfg = write_config(POLICY + mqtt_section(broker, **{key: f'"{tmp_path / "gone.pem"}"'}))
    r = run_cli("--config", str(cfg), "config", "check")
    assert r.returncode == 1, r.stdout + r.stderr
    assert words in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_check_catches_a_file_that_is_not_pem(write_config: Callable[[str], Path], broker: Broker, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    r = run_cli("--config", str(write_config(POLICY + mqtt_section(broker, ca_file=f'"{junk}"'))), "config", "check")
    assert r.returncode == 1 and "not a PEM CA certificate" in r.stderr, r.stderr
    mismatched = mqtt_section(broker, key_file=f'"{broker.credentials["agency"].key_file}"')  # not the cert's key
    r = run_cli("--config", str(write_config(POLICY + mismatched)), "config", "check")
    assert r.returncode == 1 and "cannot be used as a client certificate" in r.stderr, r.stderr


def test_check_catches_an_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[paths]\ndata_dir = "{blocker}"\n')
    r = run_cli("--config", str(cfg), "config", "check")
    assert r.returncode == 1 and "is not a directory" in r.stderr, r.stderr
    cfg.write_text('[paths]\ndata_dir = "/proc/doorbell-agent"\n')  # not writable even for root
    r = run_cli("--config", str(cfg), "config", "check", "--json")
    data = json.loads(r.stdout)
    assert r.returncode == 1 and not data["ok"] and "cannot be written" in data["problems"][0], r.stdout


def test_check_catches_min_free_larger_than_the_disk(write_config: Callable[[str], Path]) -> None:
    r = run_cli("--config", str(write_config("[buffer]\nmin_free_bytes = 1000000000000000000\n")), "config", "check")
    assert r.returncode == 1 and "buffer.min_free_bytes" in r.stderr and "whole disk" in r.stderr, r.stderr


# -- doctor ---------------------------------------------------------------------------------------


def doctor(cfg: Path) -> tuple[int, dict[str, list[dict[str, str]]]]:
    r = run_cli("--config", str(cfg), "doctor", "--json", "--timeout", "3")
    assert "Traceback" not in r.stderr, r.stderr
    assert SECRET not in r.stdout + r.stderr
    data = json.loads(r.stdout)
    by: dict[str, list[dict[str, str]]] = {}
    for c in data["checks"]:
        by.setdefault(c["name"], []).append(c)
        if c["status"] in ("warn", "fail"):
            assert c["fix"], f"{c['name']}: '{c['message']}' says nothing about how to fix it"
    assert data["ok"] == (r.returncode == 0)
    return r.returncode, by


def test_doctor_with_a_working_broker(write_config: Callable[[str], Path], broker: Broker) -> None:
    code, by = doctor(write_config(POLICY + mqtt_section(broker)))
    assert [c["status"] for c in by["broker"]][0] == "ok", by["broker"]
    assert by["config"][0]["status"] == "ok"
    # The test PKI lives two days: client certificate, CA and the broker's own, each with its date.
    certs = by["certificates"]
    assert len(certs) == 3 and all(c["status"] in ("ok", "warn") for c in certs), certs
    assert any("broker's certificate" in c["message"] for c in certs)
    assert by["trust"][0]["status"] == "fail" and "trust add" in by["trust"][0]["fix"]  # no agency key yet
    assert by["consent"][0]["status"] == "ok"
    assert by["camera"][0]["status"] == "warn"  # the synthetic test pattern
    assert {"clock", "disk", "permissions", "service"} <= set(by)
    assert code == 1


def test_doctor_broker_unreachable_and_wrong_ca(write_config: Callable[[str], Path], broker: Broker,
                                                tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    _, by = doctor(write_config(POLICY + mqtt_section(broker, port=str(free_port))))
    assert by["broker"][0]["status"] == "fail" and "cannot reach the broker" in by["broker"][0]["message"]
    other_ca = broker.credentials["agent"].cert_file  # a certificate, but not the CA that signed the broker's
    _, by = doctor(write_config(POLICY + mqtt_section(broker, ca_file=f'"{other_ca}"')))
    assert by["broker"][0]["status"] == "fail", by["broker"]


def test_doctor_text_output_and_permissions(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    cfg = write_config(POLICY.replace("2099-01-01", (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%d")))
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    cfg.chmod(0o644)
    code, by = doctor(cfg)
    perms = {c["message"] for c in by["permissions"] if c["status"] == "fail"}
    assert any("open to other users" in m for m in perms) and any("can be read by every user" in m for m in perms)
    assert by["consent"][0]["status"] == "warn" and "ends in" in by["consent"][0]["message"]
    assert by["broker"][0]["status"] == "skip"
    r = run_cli("--config", str(cfg), "doctor")
    assert r.returncode == 1 and "[FAIL] permissions" in r.stdout and "fix: sudo chmod 0700" in r.stdout


def test_doctor_disk_against_retention(write_config: Callable[[str], Path]) -> None:
    import shutil

    free = shutil.disk_usage(write_config("").parent).free
    _, by = doctor(write_config(f"[buffer]\nmax_bytes = {free * 4}\nmin_free_bytes = 0\n"))
    assert by["disk"][0]["status"] == "warn" and "less than the buffer needs" in by["disk"][0]["message"]


def test_doctor_measures_what_max_bytes_holds_from_recent_footage(write_config: Callable[[str], Path]) -> None:
    """With footage in the buffer, the hours max_bytes holds come from what the recorder stored lately."""
    import sqlite3

    from agent.buffer.segments import SegmentStore
    from agent.cli.doctor import check_retention
    from agent.config import load_config

    body = "[buffer]\nretention_hours = 24\nmax_bytes = {}\n"
    cfg = load_config(write_config(body.format(2 * 1024**3)))
    assert check_retention(cfg)[0].message.startswith("buffer.max_bytes (2.0 GB) cannot hold the 24 hours")  # estimated
    SegmentStore.from_config(cfg).close()  # the recorder's index, with its schema
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    start = now_us - 3600 * 10**6
    with sqlite3.connect(cfg.paths.buffer_db) as conn:  # an hour of 4 s segments at 1 GB per hour
        conn.executemany("INSERT INTO segments (start_us, end_us, frames, bytes, sha256, path) VALUES (?, ?, 60, ?, '', '')",
                         [(start + i * 4_000_000, start + (i + 1) * 4_000_000, 1024**3 // 900) for i in range(900)])
    (check,) = check_retention(cfg)
    assert check.status == "warn", check
    assert check.message.startswith("buffer.max_bytes (2.0 GB) holds only about 2.0 hours of footage at the rate this "
                                    "camera recorded lately (1024.0 MB per hour), not the 24 hours"), check.message
    assert check.fix is not None and "(26.4 GB)" in check.fix and "buffer.retention_hours to 2.0" in check.fix
    cfg = load_config(write_config(body.format(30 * 1024**3)))  # 30 GB hold 24 hours at this rate: fine
    assert check_retention(cfg)[0].status == "ok"


def test_doctor_expired_certificate(write_config: Callable[[str], Path], broker: Broker, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(days=30)).not_valid_after(now - timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    old = tmp_path / "old-ca.pem"
    old.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _, by = doctor(write_config(POLICY + mqtt_section(broker, ca_file=f'"{old}"')))
    expired = [c for c in by["certificates"] if "expired" in c["message"]]
    assert expired and expired[0]["status"] == "fail" and "mqtt.ca_file" in expired[0]["message"], by["certificates"]


@pytest.mark.parametrize(("props", "expect"), [
    ("LoadState=loaded\nActiveState=active\nSubState=running\nResult=success\nNRestarts=0\nWatchdogUSec=1min\n"
     "UnitFileState=enabled\n", {"service": "ok", "watchdog": "ok"}),
    ("LoadState=loaded\nActiveState=activating\nSubState=auto-restart\nResult=watchdog\nNRestarts=3\n"
     "WatchdogUSec=1min\nUnitFileState=enabled\n", {"service": "fail", "watchdog": "fail"}),
    ("LoadState=not-found\n", {"service": "fail"}),
])
def test_doctor_service_and_watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, props: str,
                                     expect: dict[str, str]) -> None:
    from agent.cli import doctor as doc
    from agent.config import AgentConfig

    fake = tmp_path / "systemctl"
    fake.write_text(f"#!/bin/sh\nprintf '%s' '{props}'\n")
    fake.chmod(0o755)
    run_dir = tmp_path / "run-systemd-system"
    run_dir.mkdir()
    monkeypatch.setattr(doc, "SYSTEMD_RUN_DIR", run_dir)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    checks = doc.check_service(AgentConfig())
    got = {}
    for c in checks:
        got.setdefault(c.name, c.status)
        if c.status in ("warn", "fail"):
            assert c.fix
    assert {k: got.get(k) for k in expect} == expect, checks
    if "watchdog" in expect and expect["watchdog"] == "fail":
        assert any("camera stopped delivering frames" in c.message for c in checks)
