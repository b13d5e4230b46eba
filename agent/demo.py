"""``doorbell-agent demo``: the whole product on one machine, in under a minute.

It plays all three parts with the real code paths: a resident's agent
recording a synthetic camera, a local Mosquitto broker, and a city backend
using the reference client (``agent.city``). The city signs a request for a
few seconds of footage; the agent decides, logs, cuts, seals and publishes;
the city verifies and decrypts the delivery and checks every frame's
capture time against the granted window.

Everything lives in a fresh work directory. The broker listens on a free
loopback port without TLS (a local demo has nothing to protect in transit;
a real deployment uses TLS, see README).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from agent.errors import UserError
from agent.state.truststore import save_trust_store

ROOT = "civic/demo-town"
PROGRAM = "demo-town/camera-pilot"
HOME = (32.29876, -90.18481)


@dataclass
class DemoResult:
    clip: Path
    manifest: Path
    frames: int
    frames_in_window: int
    granted: tuple[datetime, datetime]
    log_entries: list[str]
    log_ok: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """A throwaway Mosquitto on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            raise UserError("the demo needs the Mosquitto broker; install it with ./install.sh --dev "
                            "(or: sudo apt install mosquitto)")
        self.port = _free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        f"log_dest file {workdir / 'mosquitto.log'}\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise UserError(f"the local broker did not start: {err.strip() or 'exit ' + str(self.proc.returncode)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise UserError("the local broker did not start listening within 10 seconds")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _config_text(data: Path, port: int, now: datetime) -> str:
    start = (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    end = (now + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"""# Written by doorbell-agent demo.
[paths]
data_dir = "{data}"

[camera]
source = "synthetic"
width = 640
height = 360
fps = 15
masks = [[[480, 0], [640, 0], [640, 120], [480, 120]]]

[buffer]
segment_seconds = 2

[clock]
assume_synced = true   # a demo on a laptop may not have network time; a real agent must

[policy]
program = "{PROGRAM}"
location = {{ lat = {HOME[0]}, lon = {HOME[1]} }}
timezone = "America/Chicago"
max_radius_m = 1000
approval = "auto"

[policy.consent]
start = {start}
end = {end}

[mqtt]
host = "127.0.0.1"
port = {port}
tls = false
allow_plaintext = true   # local demo broker only
root = "{ROOT}"
precision = 4
"""


def run_demo(workdir: Path | None, *, seconds: float = 12.0, out: TextIO = sys.stdout) -> DemoResult:
    """Run the demo; raise UserError on anything a person can fix."""
    import av

    from agent.buffer.capture.synthetic import read_qr_time
    from agent.city import build_request, keygen, load_signing_key, open_delivery
    from agent.city.mqtt import BrokerSettings, MqttSession
    from agent.city.receive import DeliveryCollector
    from agent.city.requests import request_topics
    from agent.config import load_config
    from agent.protocol.trust import TrustStore
    from agent.runtime.supervisor import start_recording
    from agent.sharing.service import start_service
    from agent.state.accesslog import AccessLog
    from agent.state.logverify import TailRules
    from agent.state.pin import pin_path, read_pin
    from agent.timeutil import format_local, parse_utc_z

    if seconds < 6:
        raise UserError("--seconds must be at least 6: the demo asks for footage from the middle of the recording")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="doorbell-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    say = lambda text: print(text, file=out, flush=True)  # noqa: E731
    say(f"Demo workspace: {work}")

    broker = LocalBroker(work)
    recording = service = None
    try:
        say(f"1. Started a local MQTT broker on 127.0.0.1:{broker.port}.")
        cfg_path = work / "agent.toml"
        cfg_path.write_text(_config_text(work / "agent-data", broker.port, datetime.now(UTC)))
        cfg = load_config(cfg_path)

        city = work / "city"
        keys = keygen(iss="demo-pd", kid="demo-pd-1", out_dir=city)
        trust = TrustStore.from_jwks(keys.public_jwks)
        cfg.paths.data_dir.mkdir(parents=True, exist_ok=True)
        save_trust_store(trust, cfg.paths.trust_file)
        say("2. The city made a signing key; the resident imported its public key (doorbell-agent trust add).")

        recording = start_recording(cfg)
        service = start_service(cfg)
        t0 = datetime.now(UTC)
        say(f"3. The agent is recording a synthetic camera (top-right corner privacy-masked) "
            f"and listening for requests. Recording {seconds:g} s:")
        _progress(seconds, say)

        window = (t0 + timedelta(seconds=2), t0 + timedelta(seconds=seconds - 2))
        built = build_request(
            requester=load_signing_key(keys.private_path), program=PROGRAM, officer="badge-0001",
            case="DEMO-0001", purpose="Demo: a package was taken from a porch on this block.",
            basis="consent", lat=HOME[0] + 0.001, lon=HOME[1] + 0.001, radius_m=300,
            window_start=window[0], window_end=window[1],
        )  # fmt: skip
        session = MqttSession(BrokerSettings(host="127.0.0.1", port=broker.port, insecure_plaintext=True),
                              client_id=f"city-{built.jti}", clean_start=True, session_expiry_s=600)
        session.connect()
        collector = DeliveryCollector(ROOT, built.jti)
        session.subscribe(f"{collector.prefix}#")
        topics = request_topics(ROOT, HOME[0] + 0.001, HOME[1] + 0.001, 300)
        for topic in topics:
            session.publish(topic, built.message, expiry_s=600)
        say(f"4. The city signed request {built.jti} for {format_local(window[0])} to "
            f"{format_local(window[1])} and published it to {len(topics)} geohash cell topic(s).")

        done = None
        deadline = time.monotonic() + 60
        while done is None and time.monotonic() < deadline:
            msg = session.next_message(1.0)
            if msg is not None:
                pending = collector.add(msg.topic, msg.payload)
                if pending is not None and pending.complete and pending.manifest:
                    done = pending
        session.close()
        if done is None:
            raise UserError("no delivery arrived within 60 s; see the agent's log lines above")
        manifest = done.manifest
        assert manifest is not None  # the loop above only keeps a delivery that has its manifest
        opened = open_delivery(manifest, done.chunks, built.recipient_private, built.jti)
        out_dir = work / "delivered"
        out_dir.mkdir(exist_ok=True)
        clip_path = out_dir / f"{opened.delivery_id}.mp4"
        clip_path.write_bytes(opened.clip)
        manifest_path = out_dir / f"{opened.delivery_id}.manifest.jws"
        manifest_path.write_text(manifest)
        granted = opened.granted
        say(f"5. The city received delivery {opened.delivery_id}: {len(done.chunks)} encrypted chunk(s), "
            f"manifest signed by device {opened.device_kid[:12]}..., {len(opened.clip)} bytes, sha256 checked.")

        frames = inside = 0
        with av.open(str(clip_path)) as container:
            for frame in container.decode(video=0):
                frames += 1
                text = read_qr_time(frame.to_ndarray(format="bgr24"))
                if text and granted[0] <= parse_utc_z(text) < granted[1]:
                    inside += 1
        say(f"6. Every frame carries its capture time as a QR code: {inside} of {frames} frames read back "
            f"inside the granted window {format_local(granted[0])} to {format_local(granted[1])}.")
    finally:
        for comp in (service, recording):
            if comp is not None:
                comp.stop()
        for comp in (service, recording):
            if comp is not None:
                comp.wait(30)
        broker.stop()

    with AccessLog(cfg.paths.state_db) as alog:
        entries = [f"   #{e.seq} {format_local(e.at)} {e.type}: {e.outcome} (agency {e.iss})" for e in alog.entries()]
        report = alog.verify(read_pin(pin_path(cfg.paths.data_dir)), tail=TailRules("stopped"))  # the pinned key
    say("7. The resident's access log (doorbell-agent log show):")
    for line in entries:
        say(line)
    say(f"   Log chain check: {'intact' if report.ok else 'BROKEN'}.")
    say(f"Clip: {clip_path}\nManifest (chain-of-custody record): {manifest_path}")
    return DemoResult(clip_path, manifest_path, frames, inside, granted, entries, report.ok)


def _progress(seconds: float, say) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    ev = threading.Event()
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        print(f"\r   {seconds - left:4.0f} / {seconds:g} s", end="", file=sys.stderr, flush=True)
        ev.wait(min(1.0, left))
    print(file=sys.stderr)
