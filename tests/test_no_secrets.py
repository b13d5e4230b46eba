"""No secret anywhere a resident or a log reader looks.

A realistic flow with every kind of secret the agent holds: an MQTT password, an
RTSP camera address with a password, the device's private key, and the content
key of a delivery it sealed. The real agent (``doorbell-agent run``) records a
real RTSP camera (GStreamer's server, see tests/rtsp_server.py; a synthetic
camera where that is missing), talks to a real Mosquitto over TLS with a user
name and password, grants a signed request and delivers it. The camera is then
switched off, so the agent has something to complain about. Notifications go to a
local webhook with a secret path and token, as a resident's phone would get them. Then every output a
resident or a reader of the logs sees is searched for each secret: the agent's
own log (stderr of ``run``), ``status`` and ``status --json``, ``config check``
(and ``--json``), ``doctor`` (and ``--json``), ``log show``, ``log export`` (the
bundle and the CSV copy), the status files on disk, the local page (agent.web),
the notifications' text (agent.homeowner), and the error messages of broken
configurations.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.city import build_request, keygen, load_signing_key
from agent.city.mqtt import BrokerSettings, MqttSession
from agent.city.receive import DeliveryCollector, x25519_private_from_jwk
from agent.city.requests import request_topics
from agent.config import load_config
from agent.fsutil import read_status
from agent.protocol.jose import b64url_decode, b64url_encode
from agent.protocol.sealing import CONTENT_KEY_BYTES, HPKE_SUITE, hpke_info
from agent.protocol.trust import TrustStore
from agent.state.devicekey import DeviceKey
from agent.state.truststore import save_trust_store
from tests.broker import Broker

ROOT_DIR = Path(__file__).resolve().parents[1]
HOME = (32.29876, -90.18481)
PROGRAM = "test-town/camera-pilot"


def agent_cmd(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "agent", "--config", str(cfg), *args]


def cli(cfg: Path, *args: str, ok: bool | None = True) -> str:
    """Run a ``doorbell-agent`` command; its standard output and error, as a resident sees them."""
    done = subprocess.run(agent_cmd(cfg, *args), cwd=ROOT_DIR, capture_output=True, text=True, timeout=120)
    if ok is not None:
        assert (done.returncode == 0) == ok, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return f"$ doorbell-agent {' '.join(args)}\n{done.stdout}\n{done.stderr}"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the agent exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def secret_forms(name: str, raw: bytes | str) -> dict[str, str]:
    """Every spelling of a secret that could show up in text."""
    if isinstance(raw, str):
        return {name: raw}
    return {
        f"{name} (base64url)": b64url_encode(raw),
        f"{name} (base64)": base64.b64encode(raw).decode().rstrip("="),
        f"{name} (hex)": raw.hex(),
    }


def device_key_forms(path: Path) -> dict[str, str]:
    pem = path.read_text()
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    key = DeviceKey.load(path)
    raw = key.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
    forms = {f"device key PEM line {i}": line for i, line in enumerate(body)}
    forms.update(secret_forms("device key d", raw))
    return forms


def find_leaks(outputs: dict[str, str], needles: dict[str, str]) -> list[str]:
    return [f"{what} appears in {where}" for where, text in outputs.items() for what, needle in needles.items()
            if needle and needle in text]


def content_key_of(manifest: str, recipient_private: dict[str, str], jti: str) -> bytes:
    """Unseal the delivery's ChaCha20 content key as the agency does (agent.city.receive.open_delivery)."""
    payload = manifest.split(".")[1]
    claims = json.loads(b64url_decode(payload, "manifest payload"))
    key = HPKE_SUITE.decrypt(b64url_decode(claims["enc"]["key"], "enc.key"), x25519_private_from_jwk(recipient_private),
                             hpke_info(jti, claims["delivery_id"]))
    assert len(key) == CONTENT_KEY_BYTES
    return key


def config_text(data: Path, broker: Broker, camera: str, notify: str = "") -> str:
    now = datetime.now(UTC)
    cred = broker.credentials["agent"]
    return f"""[paths]
data_dir = "{data}"

[camera]
{camera}
width = 320
height = 240
fps = 15

[buffer]
segment_seconds = 2

[clock]
assume_synced = true

[policy]
program = "{PROGRAM}"
location = {{ lat = {HOME[0]}, lon = {HOME[1]} }}
timezone = "America/Chicago"
max_radius_m = 1000
approval = "auto"

[policy.consent]
start = {(now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}
end = {(now + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")}

[mqtt]
host = "{broker.host}"
port = {broker.port}
ca_file = "{broker.ca_file}"
cert_file = "{cred.cert_file}"
key_file = "{cred.key_file}"
username = "{cred.username}"
password = "{cred.password}"
root = "{broker.root}"
precision = 4
keepalive_s = 5

[web]
listen = "127.0.0.1:0"
{notify}"""


class Webhook:
    """The resident's phone: a local HTTP receiver for the agent's notifications (agent.homeowner.webhook)."""

    def __init__(self) -> None:
        self.bodies: list[str] = []
        self.got = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server interface
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.bodies.append(body.decode(errors="replace"))
                outer.got.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_no_secret_reaches_any_output(broker: Broker, tmp_path: Path) -> None:
    from tests.test_rtsp_camera import RtspCamera, gst_rtsp_missing

    rtsp_password = "rtsp-" + secrets.token_urlsafe(10)
    query_password = "query-" + secrets.token_urlsafe(10)  # some cameras take it as ?password=
    camera_proc: RtspCamera | None = None
    if gst_rtsp_missing() is None:
        camera_proc = RtspCamera(tmp_path / "sent.txt")
        # GStreamer's server asks for no password, so FFmpeg never sends it: the URL still carries it everywhere.
        url = camera_proc.url.replace("rtsp://", f"rtsp://doorcam:{rtsp_password}@")
        camera = f'source = "rtsp"\nurl = "{url}?channel=1&password={query_password}"'
    else:
        camera = 'source = "synthetic"'
    data = tmp_path / "data"
    cfg_path = tmp_path / "agent.toml"
    # The webhook's path and token are secrets too (an ntfy topic, a Home Assistant webhook id).
    hook_path, hook_token = "hook-" + secrets.token_urlsafe(12), "token-" + secrets.token_urlsafe(12)
    phone = Webhook()
    notify = f'\n[notify]\nurl = "http://127.0.0.1:{phone.port}/{hook_path}"\ntoken = "{hook_token}"\n'
    cfg_path.write_text(config_text(data, broker, camera, notify))
    cfg = load_config(cfg_path)
    city = keygen(iss="test-pd", kid="test-pd-1", out_dir=tmp_path / "city")
    data.mkdir()
    save_trust_store(TrustStore.from_jwks(city.public_jwks), cfg.paths.trust_file)

    outputs: dict[str, str] = {}
    agent_log = tmp_path / "agent.log"
    proc = subprocess.Popen(agent_cmd(cfg_path, "run"), cwd=ROOT_DIR, stdout=subprocess.DEVNULL,
                            stderr=open(agent_log, "wb"))  # noqa: SIM115 - closed with the process
    content_key = b""
    try:
        segments = data / "segments"
        wait_for(lambda: len(list(segments.rglob("*.mp4"))) >= 2, 60, "two recorded segments", proc)
        t0 = datetime.now(UTC)
        window = (t0 - timedelta(seconds=3), t0 - timedelta(seconds=1))
        built = build_request(
            requester=load_signing_key(city.private_path), program=PROGRAM, officer="badge-0001", case="T-0001",
            purpose="A package was taken from a porch on this block.", basis="consent",
            lat=HOME[0] + 0.001, lon=HOME[1] + 0.001, radius_m=300, window_start=window[0], window_end=window[1],
        )  # fmt: skip
        agency = broker.credentials["agency"]
        session = MqttSession(BrokerSettings(host=broker.host, port=broker.port, ca_file=broker.ca_file,
                                             cert_file=agency.cert_file, key_file=agency.key_file,
                                             username=agency.username, password=agency.password),
                              client_id=f"city-{built.jti}", clean_start=True, session_expiry_s=600)
        session.connect()
        try:
            collector = DeliveryCollector(broker.root, built.jti)
            session.subscribe(f"{collector.prefix}#")
            # Publish until the agent's subscription is in place (it may still be connecting), then wait.
            done = None
            deadline = time.monotonic() + 60
            next_publish = 0.0
            while done is None:
                assert time.monotonic() < deadline, f"no delivery within 60 s; agent log:\n{agent_log.read_text()[-3000:]}"
                if time.monotonic() >= next_publish:
                    for topic in request_topics(broker.root, HOME[0] + 0.001, HOME[1] + 0.001, 300):
                        session.publish(topic, built.message, expiry_s=600)
                    next_publish = time.monotonic() + 2
                msg = session.next_message(0.5)
                if msg is not None:
                    pending = collector.add(msg.topic, msg.payload)
                    if pending is not None and pending.complete and pending.manifest:
                        done = pending
        finally:
            session.close()
        assert done.manifest is not None
        content_key = content_key_of(done.manifest, built.recipient_private, built.jti)

        assert phone.got.wait(30), "no notification reached the resident's webhook within 30 s"
        # The camera goes away: the agent logs it and `status` shows why.
        if camera_proc is not None:
            camera_proc.stop()
            wait_for(lambda: "camera" in agent_log.read_text() and "reconnect" in agent_log.read_text(), 30,
                     "the agent to notice the camera is gone", proc)
            wait_for(lambda: (read_status(cfg.paths.status_file) or {}).get("camera_state") == "reconnecting", 30,
                     "the status file to say the camera is reconnecting", proc)

        for args in (("status",), ("status", "--json"), ("config", "check"), ("config", "check", "--json"),
                     ("log", "show"), ("log", "show", "--json"), ("log", "summary", "--json")):
            outputs[" ".join(args)] = cli(cfg_path, *args)
        # The resident's local page (agent.web), where `run` serves it.
        page = re.search(r"local page: (http://127\.0\.0\.1:\d+/)", agent_log.read_text())
        if page is not None:
            for path in ("", "log", "shared/2"):
                with urllib.request.urlopen(page.group(1) + path, timeout=10) as resp:
                    outputs[f"local page /{path}"] = resp.read().decode(errors="replace")
        # doctor fails here (the camera is off): its words are what matter.
        outputs["doctor"] = cli(cfg_path, "doctor", "--timeout", "2", ok=None)
        outputs["doctor --json"] = cli(cfg_path, "doctor", "--json", "--timeout", "2", ok=None)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if camera_proc is not None:
                camera_proc.stop()
            phone.close()
    assert proc.returncode == 0, agent_log.read_text()[-3000:]
    outputs["the agent's log (stderr of run)"] = agent_log.read_text(errors="replace")
    outputs["status after stop"] = cli(cfg_path, "status")
    for i, body in enumerate(phone.bodies):
        outputs[f"notification {i}"] = body
    bundle, csv = tmp_path / "log.jsonl", tmp_path / "log.csv"
    outputs["log export"] = cli(cfg_path, "log", "export", "-o", str(bundle))
    outputs["log export --format csv"] = cli(cfg_path, "log", "export", "--format", "csv", "-o", str(csv))
    outputs["exported bundle"] = bundle.read_text()
    outputs["exported CSV"] = csv.read_text()
    for status_file in sorted(data.glob("*.json")):
        outputs[f"status file {status_file.name}"] = status_file.read_text()
    assert any("status" in k for k in outputs if k.startswith("status file")), sorted(outputs)

    # Configurations that are wrong in the places next to the secrets.
    text = cfg_path.read_text()
    broken = {
        "a password that is a number": text.replace(f'password = "{broker.credentials["agent"].password}"',
                                                   "password = 918273645501"),
        "a misspelt password key": text.replace("password = ", "pasword = "),
        "a TOML error on the password line": text.replace(f'password = "{broker.credentials["agent"].password}"',
                                                         f'password = "{broker.credentials["agent"].password}'),
        "an http:// camera address with a password": text.replace('url = "rtsp://', 'url = "http://'),
        "a bad port beside the password": text.replace(f"port = {broker.port}", 'port = "eighty"'),
    }
    for what, body in broken.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(body)
        outputs[f"config check: {what}"] = cli(bad, "config", "check", ok=None)
        outputs[f"config check --json: {what}"] = cli(bad, "config", "check", "--json", ok=None)
        outputs[f"run: {what}"] = cli(bad, "run", ok=False) if what.startswith("an http") and camera_proc else ""

    needles = {
        "the MQTT password": broker.credentials["agent"].password,
        "the RTSP password": rtsp_password,
        "the RTSP password in the query": query_password,
        "the numeric MQTT password": "918273645501",
        "the webhook's path": hook_path,
        "the webhook's token": hook_token,
        **device_key_forms(cfg.paths.device_key_file),
        **secret_forms("the delivery's content key", content_key),
    }
    (tmp_path / "outputs.json").write_text(json.dumps(outputs, indent=1))  # what was searched, for a failing run
    leaks = find_leaks(outputs, needles)
    assert not leaks, "\n".join(leaks)
    # The search itself works: what the outputs must show, they show.
    assert camera_proc is None or "doorcam:********@" in outputs["config check --json"]
    assert camera_proc is None or "channel=1&password=********" in outputs["status"]
    assert all(len(needle) >= 12 for needle in needles.values()), "a secret too short to search for"
    assert DeviceKey.load(cfg.paths.device_key_file).kid[:12] in outputs["status"] + outputs["status --json"]
    assert "delivered" in outputs["log show"] or "granted" in outputs["log show"], outputs["log show"]
    assert os.path.getsize(bundle) > 0


@pytest.mark.parametrize(("url", "shown"), [
    ("rtsp://10.0.0.5/h264?user=admin&password=s3cret", "rtsp://10.0.0.5/h264?user=admin&password=********"),
    ("rtsp://admin:s3cret@10.0.0.5/cam/realmonitor?channel=1&subtype=0&PWD=s3cret&x",
     "rtsp://admin:********@10.0.0.5/cam/realmonitor?channel=1&subtype=0&PWD=********&x"),
    ("rtsp://10.0.0.5/live?token=s3cret", "rtsp://10.0.0.5/live?token=********"),
    ("rtsp://10.0.0.5:554/live?channel=1", "rtsp://10.0.0.5:554/live?channel=1"),
])
def test_camera_addresses_are_shown_without_passwords_in_the_query(url: str, shown: str) -> None:
    from agent.display import redact_url

    assert redact_url(url) == shown


def test_a_wrong_camera_scheme_is_named_without_its_password() -> None:
    from pydantic import ValidationError

    from agent.config import CameraConfig, format_validation_error

    with pytest.raises(ValidationError) as err:
        CameraConfig(source="rtsp", url="http://admin:s3cret@10.0.0.5/video?pwd=s3cret")
    text = format_validation_error(err.value, Path("agent.toml"))
    assert "s3cret" not in text and "http://admin:********@10.0.0.5/video" in text
