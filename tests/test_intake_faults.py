"""Faults on the intake side, each reproduced as it was reported, against the real parts.

- The same request is never granted twice: not after a forward clock step made housekeeping
  purge the replay memory, nor when the replay memory lost a jti the access log still holds.
  A clock that goes back behind a time the agent already acted on is noticed (step 8).
- No request is lost to a flood: a burst of copies of one request on Debian 12's Mosquitto
  2.0.11 (which overshoots Receive Maximum) is stored whole in the durable inbox.
- A broker that sends a packet larger than the Maximum Packet Size we advertised costs about
  that size in memory, not the packet's.
- Local state cannot be turned against the resident: the default client id cannot be derived
  from public facts (so nobody can take over the agent's session), and ``run`` keeps footage,
  databases, outbox files and the data directory private while a clip the resident saves
  stays theirs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.buffer.segmentfile import SegmentFileInfo
from agent.buffer.segments import SegmentStore
from agent.city import build_request, keygen, load_signing_key
from agent.city.keys import SigningKey
from agent.city.mqtt import BrokerSettings, MqttSession
from agent.config import AgentConfig, MqttConfig, load_config
from agent.protocol.decision import Decision
from agent.protocol.geohash import encode, request_topic
from agent.protocol.trust import TrustStore
from agent.sharing.service import RequestService, start_service
from agent.sharing.transport import MqttTransport
from agent.state.accesslog import AccessLog
from agent.state.clock import FixedClock
from agent.state.devicekey import DeviceKey
from agent.state.truststore import save_trust_store
from agent.timeutil import format_utc, from_us, to_us
from tests.broker import Broker

ROOT_DIR = Path(__file__).resolve().parents[1]
HOME = (32.29876, -90.18481)
PROGRAM = "jackson-ms/camera-pilot-2026"
WAIT = 30.0
POLICY = f"""
[buffer]
segment_seconds = 4

[policy]
program = "{PROGRAM}"
location = {{ lat = {HOME[0]}, lon = {HOME[1]} }}
timezone = "America/Chicago"
max_radius_m = 1000
grants_per_issuer_per_day = 1000

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2030-01-01T00:00:00Z
"""


# ----------------------------------------------------------------------------- a resident's agent, in process


@dataclass
class Home:
    cfg: AgentConfig
    clock: FixedClock
    key: DeviceKey
    requester: SigningKey
    t0: datetime

    def request(self, *, jti: str | None = None, purpose: str = "Burglary reported on this block.",
                issued: datetime | None = None, window: tuple[datetime, datetime] | None = None) -> bytes:
        now = issued or self.clock.now()
        start, end = window or (self.t0 - timedelta(seconds=40), self.t0 - timedelta(seconds=30))
        built = build_request(requester=self.requester, program=PROGRAM, officer="badge-4471", case="JPD-2026-001234",
                              purpose=purpose, basis="consent", lat=HOME[0] + 0.001, lon=HOME[1] + 0.001,
                              radius_m=300, window_start=start, window_end=end, now=now, jti=jti)
        return built.message.encode()

    def service(self) -> RequestService:
        """The real service over real stores, not started: ``handle`` and ``chores`` run exactly as the worker runs them."""
        loc = self.cfg.require_policy().location
        transport = MqttTransport(self.cfg.require_mqtt(), lat=loc.lat, lon=loc.lon)
        return RequestService(self.cfg, transport=transport, device_key=self.key, clock=self.clock)


def _index_footage(cfg: AgentConfig, start_us: int, end_us: int) -> None:
    """Footage in the buffer's index only: the decision reads spans, never the files (nothing is delivered here)."""
    store = SegmentStore.from_config(cfg)
    for s in range(start_us, end_us, 4_000_000):
        e = min(s + 4_000_000, end_us)
        store.add(SegmentFileInfo(store.new_segment_path(s), s, e, (e - s) // 66_667, 0, "", 1))
    store.close()


@pytest.fixture
def home(tmp_path: Path, write_config: Any) -> Home:
    now = datetime.now(UTC).replace(microsecond=0)
    cfg = load_config(write_config(POLICY))
    # Never connected in these tests: a plain-TCP setting needs no certificate files.
    mqtt_cfg = MqttConfig(host="127.0.0.1", port=1, tls=False, allow_plaintext=True, root="civic/test",
                          client_id="never-connects")
    cfg = cfg.model_copy(update={"mqtt": mqtt_cfg})
    keys = keygen(iss="jackson-pd", kid="jpd-test", out_dir=tmp_path / "city")
    save_trust_store(TrustStore.from_jwks(keys.public_jwks), cfg.paths.trust_file)
    _index_footage(cfg, to_us(now) - 3600_000_000, to_us(now) - 10_000_000)
    return Home(cfg, FixedClock(now), DeviceKey.load_or_create(cfg.paths.device_key_file),
                load_signing_key(keys.private_path), now)


@pytest.fixture
def service(home: Home) -> Iterator[RequestService]:
    svc = home.service()
    yield svc
    svc.stop()
    assert svc.wait(WAIT)


def outcomes(home: Home, jti: str) -> list[str]:
    with AccessLog(home.cfg.paths.state_db) as alog:
        return [e.outcome for e in alog.entries(jti=jti)]


def forget_everything_remembered(home: Home) -> None:
    """The replay memory loses its rows (an earlier purge at a wrong time, a restored backup): only the log knows."""
    conn = sqlite3.connect(home.cfg.paths.state_db)
    try:
        conn.execute("DELETE FROM replay_memory")
        conn.commit()
    finally:
        conn.close()


# ----------------------------------------------------------------------------- the same request is never granted twice


def test_a_forward_clock_step_does_not_let_a_request_be_granted_twice(home: Home, service: RequestService,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """As reported: a request is granted; the (still "synchronized") clock steps two hours ahead and
    housekeeping purges the replay memory; the clock comes back; the same message arrives again. It
    used to be granted a second time (two jobs, two deliveries under one outbox name)."""
    payload = home.request()
    first = service.handle(payload)
    assert first is not None and first.reason == "granted" and first.request is not None
    jti = first.request.jti
    job = service.outbox.pending()[0]

    home.clock.advance(2 * 3600)  # a bad time server
    service.chores()  # purges what expired by the clock's reckoning

    home.clock.set(home.t0 + timedelta(seconds=10))  # the clock is corrected
    with caplog.at_level(logging.INFO, logger="agent"):
        again = service.handle(payload)
    assert again is not None and again.reason == "clock_unsynced"
    assert "went back" in service.state.unsynced_why
    assert any("went back" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert outcomes(home, jti) == ["granted", "clock_unsynced"]
    assert [(j.jti, j.delivery_id) for j in service.outbox.pending()] == [(job.jti, job.delivery_id)]

    home.clock.set(home.t0 + timedelta(hours=2, seconds=1))  # real time has passed the mark
    assert service.state.clock_synced
    late = service.handle(payload)
    assert late is not None and late.reason == "expired"


def test_a_jti_the_access_log_holds_stays_seen_when_the_replay_memory_lost_it(home: Home, service: RequestService) -> None:
    """The log is the record that outlives any purge: the identical message is a duplicate (dropped, not
    logged), a different one under the same jti is ``replayed``; neither is granted again."""
    payload = home.request()
    first = service.handle(payload)
    assert first is not None and first.reason == "granted" and first.request is not None
    jti = first.request.jti
    forget_everything_remembered(home)
    assert service.replay.seen(jti) is None

    duplicate = service.handle(payload)
    assert duplicate is not None and duplicate.reason == "duplicate"
    replay = service.handle(home.request(jti=jti, purpose="Same id, different request."))
    assert replay is not None and replay.reason == "replayed"
    assert outcomes(home, jti) == ["granted", "replayed"]
    assert service.counters.granted == 1 and len(service.outbox.pending()) == 1


def test_a_grant_logged_before_payload_hashes_were_recorded_still_uses_up_its_jti(home: Home,
                                                                                   service: RequestService) -> None:
    """An entry from before ``payload_sha256`` was recorded: the jti is used up, any copy is ``replayed``
    (it cannot be told from a duplicate, and refusing is the safe side), and the log still verifies."""
    payload = home.request()
    probe = service.handle(home.request(purpose="A different request, to learn the message's claims."))
    assert probe is not None and probe.reason == "granted"
    d = _decide_only(service, payload)
    assert d.request is not None
    service.accesslog.append_request(d.request, reason="granted", kids=d.kids, granted=d.granted,
                                     at=home.clock.now())  # the old entry shape: no payload_sha256
    old = service.accesslog.entries(jti=d.request.jti)[-1].data
    assert "payload_sha256" not in old and "payload_sha256" in service.accesslog.entries()[0].data

    again = service.handle(payload)
    assert again is not None and again.reason == "replayed"
    assert outcomes(home, d.request.jti) == ["granted", "replayed"]
    report = service.accesslog.verify(home.key)
    assert report.ok, report.problems


def test_refusals_before_the_replay_check_on_the_record_do_not_use_up_the_jti(home: Home,
                                                                               service: RequestService) -> None:
    """Step 12 with the log as memory: a copy refused at check 11 (``expired``) is on the record, but a jti
    is used up only past check 11, so the genuine request is still granted."""
    genuine = home.request()
    d = _decide_only(service, genuine)
    assert d.request is not None
    late = home.request(jti=d.request.jti, issued=home.clock.now() - timedelta(minutes=20))
    refused = service.handle(late)
    assert refused is not None and refused.reason == "expired"
    forget_everything_remembered(home)
    granted = service.handle(genuine)
    assert granted is not None and granted.reason == "granted"
    assert outcomes(home, d.request.jti) == ["expired", "granted"]


def test_a_clock_that_went_back_is_not_trusted_until_it_catches_up(home: Home, service: RequestService,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The highest time the agent acted on is kept durably; a clock reading more than a few seconds earlier
    is treated as unsynchronized (fail closed, with a log line saying why) until it passes that time."""
    first = service.handle(home.request())
    assert first is not None and first.reason == "granted"

    home.clock.set(home.t0 - timedelta(seconds=60))
    with caplog.at_level(logging.INFO, logger="agent"):
        refused = service.handle(home.request(issued=home.t0 - timedelta(seconds=60)))
        assert refused is not None and refused.reason == "clock_unsynced"
        assert service.handle(home.request(issued=home.t0 - timedelta(seconds=60))).reason == "clock_unsynced"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "went back" in r.getMessage()]
    assert len(warnings) == 1 and "60 s before" in warnings[0]  # said once, with the reason
    refusal = [r.getMessage() for r in caplog.records if "refused: clock_unsynced" in r.getMessage()]
    assert refusal and "went back" in refusal[0]

    service.stop()
    assert service.wait(WAIT)
    restarted = home.service()  # the mark is durable: a restart does not make the clock trusted again
    try:
        assert not restarted.state.clock_synced
        home.clock.set(home.t0 - timedelta(seconds=3))  # within the tolerance for NTP's own corrections
        ok = restarted.handle(home.request(issued=home.t0 - timedelta(seconds=3)))
        assert ok is not None and ok.reason == "granted"
    finally:
        restarted.stop()
        assert restarted.wait(WAIT)


def _decide_only(svc: RequestService, payload: bytes) -> Decision:
    from agent.protocol.decision import decide

    trust = svc.trust.get()
    assert trust is not None
    return decide(payload, trust=trust, policy=svc.policy, state=svc.state, now=svc.clock.now())


# ----------------------------------------------------------------------------- no request is lost to a flood


def test_an_unpaced_burst_of_copies_of_one_request_loses_none(broker: Broker, home: Home) -> None:
    """As reported: 600 copies of one request, published without pacing, to the real service on Debian 12's
    Mosquitto (2.0.11 overshoots Receive Maximum once messages are acknowledged). The in-memory queue
    used to drop about half of them as ``queue_full``; now every copy is stored, decided once and in
    order: the first is decided, the other 599 are duplicates."""
    cfg = home.cfg.model_copy(update={"mqtt": broker.mqtt_config("agent", precision=4)})
    loc = cfg.require_policy().location
    transport = MqttTransport(cfg.require_mqtt(), lat=loc.lat, lon=loc.lon)
    svc = RequestService(cfg, transport=transport, device_key=home.key, clock=home.clock)
    decided: list[str] = []
    all_decided = threading.Event()

    def on_decision(d: Decision | None) -> None:
        decided.append(str(d.reason) if d is not None else "none")
        if len(decided) == 600:
            all_decided.set()

    svc.on_decision = on_decision
    # No footage in the window: decided ``no_footage`` (past check 12, so the jti is used up) and nothing is delivered.
    payload = home.request(window=(home.t0 - timedelta(hours=3), home.t0 - timedelta(hours=3) + timedelta(seconds=10)))
    svc.start()
    cred = broker.credentials["agency"]
    agency = MqttSession(BrokerSettings(host=broker.host, port=broker.port, ca_file=broker.ca_file,
                                        cert_file=cred.cert_file, key_file=cred.key_file,
                                        username=cred.username, password=cred.password),
                         client_id="city-burst", clean_start=True, session_expiry_s=60)
    try:
        assert transport.wait_ready(WAIT), transport.last_error
        agency.connect()
        topic = request_topic(broker.root, encode(*HOME, 5))
        mids = [agency.client.publish(topic, payload, qos=1).mid for _ in range(600)]
        assert mids and all_decided.wait(60), f"{len(decided)} of 600 decided: {transport.status()}"
    finally:
        agency.close()
        svc.stop()
        assert svc.wait(WAIT)
    c = transport.counters()
    assert (c["received"], c["inbox_full"], c["inbox_unwritable"]) == (600, 0, 0), c
    assert decided[0] == "no_footage" and decided[1:] == ["duplicate"] * 599
    assert svc.counters.duplicates == 599 and svc.counters.decided == 1


# ----------------------------------------------------------------------------- a packet larger than agreed


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the client went away")
            buf += chunk
        return buf

    first = exactly(1)[0]
    length, shift = 0, 0
    while True:
        b = exactly(1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, exactly(length)


def _hostile_broker(listener: socket.socket, body_bytes: int, result: dict[str, Any]) -> None:
    """Answers CONNECT and SUBSCRIBE like a broker, then starts a PUBLISH of ``body_bytes`` and streams it."""
    listener.settimeout(WAIT)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(WAIT)
        kind, _ = _read_packet(conn)
        assert kind >> 4 == 1  # CONNECT
        conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK: no session, success, no properties
        kind, body = _read_packet(conn)
        assert kind >> 4 == 8  # SUBSCRIBE
        conn.sendall(b"\x90\x04" + body[:2] + b"\x00\x01")  # SUBACK: its packet id, no properties, QoS 1
        topic = b"civic/test/v1/requests/9/v/x/z/e"
        var = len(topic).to_bytes(2, "big") + topic + b"\x00\x01" + b"\x00"  # topic, packet id, no properties
        conn.sendall(b"\x32" + _varint(len(var) + body_bytes) + var)
        chunk, sent = bytes(1 << 20), 0
        try:
            while sent < body_bytes:
                n = min(len(chunk), body_bytes - sent)
                conn.sendall(chunk[:n])
                sent += n
        except OSError:
            pass  # the agent hung up: what we wanted
        result["sent"] = sent


CHILD = """
import json, sys
from agent.config import MqttConfig
from agent.sharing.transport import MqttTransport

def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

cfg = MqttConfig(host="127.0.0.1", port=int(sys.argv[1]), tls=False, allow_plaintext=True, root="civic/test",
                 client_id="hostile-broker-test", keepalive_s=60)
t = MqttTransport(cfg, lat=32.29876, lon=-90.18481)
before = peak_kib()
t.start()
seen = t.wait_until(lambda t: t.counters().get("packet_too_large", 0) + t.counters().get("oversize", 0) > 0, 60)
print(json.dumps({"before_kib": before, "peak_kib": peak_kib(), "seen": seen, "counters": t.counters()}), flush=True)
t.stop()
"""


def test_a_packet_larger_than_advertised_costs_about_that_size_in_memory(tmp_path: Path) -> None:
    """A hostile broker on loopback announces a 64 MiB PUBLISH and streams it. paho used to read the
    whole packet into memory before anything looked at its size (a 200 MiB one took the agent from 93
    to 697 MiB); now the connection is dropped as soon as the length is decoded."""
    body = 64 * 1024 * 1024
    listener = socket.create_server(("127.0.0.1", 0))
    result: dict[str, Any] = {}
    server = threading.Thread(target=_hostile_broker, args=(listener, body, result), daemon=True)
    server.start()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(listener.getsockname()[1])], cwd=ROOT_DIR,
                              capture_output=True, text=True, timeout=120)
    finally:
        server.join(WAIT)
        listener.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["seen"], got
    growth_mib = (got["peak_kib"] - got["before_kib"]) / 1024
    assert growth_mib < 16, f"the agent's peak memory grew by {growth_mib:.0f} MiB for a {body >> 20} MiB packet"
    assert got["counters"]["packet_too_large"] == 1 and got["counters"]["oversize"] == 0
    assert result["sent"] < body, "the agent read the whole packet"


# ----------------------------------------------------------------------------- local state


def test_another_login_cannot_take_over_the_agents_session(broker: Broker, home: Home) -> None:
    """On a broker that does not tie client ids to credentials (Mosquitto's default), whoever connects with
    the agent's client id takes over its session: it is disconnected and the intruder can acknowledge its
    requests unseen. The id used to be the device kid (in every manifest) and a hash of the filter (which
    follows from the request area); now it carries a secret only the device can compute."""
    cfg = home.cfg.model_copy(update={"mqtt": broker.mqtt_config("agent", precision=4, client_id=None)})
    svc = start_service(cfg)
    try:
        assert svc.transport.wait_ready(WAIT), svc.transport.last_error
        kid = DeviceKey.load(cfg.paths.device_key_file).kid  # public: every manifest names it
        sub = svc.transport.subscription  # public: the requester's own cell cover, at the default precision
        guessed = "doorbell-" + kid[:16] + "-" + hashlib.sha256(sub.encode()).hexdigest()[:6]
        session_present = _connect_as(broker, "agency", guessed)
        assert session_present is False, "another login resumed the agent's session"
        assert svc.transport.counters()["disconnects"] == 0 and svc.transport.ready
    finally:
        svc.stop()
        assert svc.wait(WAIT)


def _connect_as(broker: Broker, role: str, client_id: str) -> bool:
    """Connect with ``client_id`` and ``clean_start=False``; return whether the broker resumed a session."""
    cred = broker.credentials[role]
    got: dict[str, bool] = {}
    done = threading.Event()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        got["session_present"] = bool(flags.session_present)
        done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(broker.ca_file))
    ctx.load_cert_chain(str(cred.cert_file), str(cred.key_file))
    c.tls_set_context(ctx)
    c.username_pw_set(cred.username, cred.password)
    c.on_connect = on_connect
    c.connect(broker.host, broker.port, keepalive=10, clean_start=False)
    c.loop_start()
    try:
        assert done.wait(WAIT), "the intruder could not connect"
        return got["session_present"]
    finally:
        c.disconnect()
        c.loop_stop()


def _run_config(tmp_path: Path, broker: Broker) -> Path:
    cred = broker.credentials["agent"]
    data = tmp_path / "fresh" / "data"  # does not exist yet: the agent creates it
    conf = tmp_path / "agent.toml"
    conf.write_text(textwrap.dedent(f"""\
        [paths]
        data_dir = "{data}"

        [camera]
        source = "synthetic"
        width = 320
        height = 240
        fps = 15

        [buffer]
        segment_seconds = 1
        """) + POLICY.replace("[buffer]\nsegment_seconds = 4\n", "") + textwrap.dedent(f"""
        [mqtt]
        host = "{broker.host}"
        port = {broker.port}
        ca_file = "{broker.ca_file}"
        cert_file = "{cred.cert_file}"
        key_file = "{cred.key_file}"
        username = "{cred.username}"
        password = "{cred.password}"
        root = "{broker.root}"
        session_expiry_s = 60
        """))
    return conf


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)  # polling files another process writes: there is no event to wait on


@pytest.mark.slow
def test_run_keeps_its_files_private_and_a_saved_clip_stays_the_residents(tmp_path: Path, broker: Broker) -> None:
    """``run`` creates data_dir itself here (a development setup; install.sh makes it 0700): under umask 077
    nothing in it is readable by anyone else. ``clip -o`` runs with the resident's own umask."""
    conf = _run_config(tmp_path, broker)
    data = tmp_path / "fresh" / "data"
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(conf), "run"], cwd=ROOT_DIR, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.umask(0o022))  # what a login shell usually has
    try:
        _wait_for(lambda: len(list((data / "segments").rglob("*.mp4"))) >= 2
                  and (data / "service-status.json").exists() and (data / "inbox.sqlite").exists(), 60,
                  "two segments, the service's status and its inbox")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]
    made = [data, *data.rglob("*")]
    names = {p.name for p in made}
    assert {"outbox", "state.sqlite", "buffer.sqlite", "inbox.sqlite", "device-key.pem"} <= names, names
    exposed = sorted(f"{p.relative_to(tmp_path)} {p.stat().st_mode & 0o777:o}" for p in made
                     if p.stat().st_mode & 0o077)
    assert exposed == [], exposed

    store = SegmentStore(data / "buffer.sqlite", data / "segments")
    first = store.all()[0]
    store.close()
    clip = tmp_path / "porch.mp4"
    saved = subprocess.run([sys.executable, "-m", "agent", "--config", str(conf), "clip",
                            "--from", format_utc(from_us(first.start_us)), "--to", format_utc(from_us(first.end_us)),
                            "-o", str(clip)], cwd=ROOT_DIR, env=env, capture_output=True, text=True, timeout=120,
                           preexec_fn=lambda: os.umask(0o022))
    assert saved.returncode == 0, saved.stderr
    assert clip.stat().st_mode & 0o777 == 0o644  # readable as the resident's umask says, not 0600
    clip.unlink()
