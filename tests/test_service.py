"""The agent over the wire: a real TLS Mosquitto with ACLs, a real buffer, the agency's reference client.

What an agency engineer and a resident would check: a valid request gets a
clip whose every frame lies in the granted window; a request the resident's
rules refuse gets nothing published at all, and the log says why; a request
sent while the agent was offline is decided when it comes back; the kill
switch stops a delivery between chunks.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import av
import pytest

from agent.buffer.capture.synthetic import read_qr_time
from agent.buffer.segments import SegmentStore
from agent.city import build_request, keygen, load_signing_key, open_delivery
from agent.city.keys import SigningKey
from agent.city.mqtt import BrokerSettings, MqttSession
from agent.city.receive import DeliveryCollector
from agent.city.requests import request_topics
from agent.config import AgentConfig, load_config
from agent.protocol.decision import Decision
from agent.protocol.geohash import encode, request_topic
from agent.protocol.trust import TrustStore
from agent.sharing.service import RequestService
from agent.sharing.transport import MqttTransport
from agent.state.accesslog import AccessLog
from agent.state.clock import FixedClock
from agent.state.devicekey import DeviceKey
from agent.state.killswitch import KillSwitch
from agent.state.truststore import load_trust_store, save_trust_store
from agent.timeutil import parse_utc_z, to_us
from tests.broker import Broker
from tests.buffer_helpers import FPS, write_segment

pytestmark = pytest.mark.slow
UTC = UTC
HOME = (32.29876, -90.18481)
PROGRAM = "jackson-ms/camera-pilot-2026"
WAIT = 30.0


@dataclass
class Env:
    cfg: AgentConfig
    clock: FixedClock
    key: DeviceKey
    requester: SigningKey
    broker: Broker
    client_id: str
    recorded: list[int]  # capture times of every recorded frame

    def frames_in(self, start: datetime, end: datetime) -> list[int]:
        return [t for t in self.recorded if to_us(start) <= t < to_us(end)]


def _policy_toml(approval: str = "auto", *, require_oversight: bool = False) -> str:
    return f"""
[buffer]
segment_seconds = 4

[policy]
program = "{PROGRAM}"
location = {{ lat = {HOME[0]}, lon = {HOME[1]} }}
timezone = "America/Chicago"
max_radius_m = 1000
approval = "{approval}"
require_oversight = {"true" if require_oversight else "false"}

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2030-01-01T00:00:00Z
"""


@pytest.fixture
def env(tmp_path: Path, write_config, broker: Broker) -> Env:
    return make_env(tmp_path, write_config, broker)


def make_env(tmp_path: Path, write_config, broker: Broker) -> Env:  # noqa: ANN001
    """The ``env`` fixture's body, for other test modules' own ``env`` fixtures."""
    now = datetime.now(UTC).replace(microsecond=0)
    cfg = load_config(write_config(_policy_toml()))
    # Unique per environment: a persistent session left by another test with a like-named tmp_path (pytest cuts
    # names to 30 characters) would otherwise hand this agent that test's queued requests.
    client_id = f"agent-under-test-{secrets.token_hex(6)}"
    cfg = cfg.model_copy(update={"mqtt": broker.mqtt_config("agent", precision=4, client_id=client_id)})
    keys = keygen(iss="jackson-pd", kid="jpd-test", out_dir=tmp_path / "city")
    save_trust_store(TrustStore.from_jwks(keys.public_jwks), cfg.paths.trust_file)
    # 40 s of real H.264 ending 10 s before "now", in 4 s segments.
    store = SegmentStore.from_config(cfg)
    recorded: list[int] = []
    start = to_us(now) - 50_000_000
    for i in range(10):
        seg_start = start + i * 4_000_000
        info = write_segment(store.new_segment_path(seg_start), seg_start, 4 * FPS)
        store.add(info)
        recorded += [seg_start + round(n * 1_000_000 / FPS) for n in range(4 * FPS)]
    store.close()
    return Env(cfg, FixedClock(now), DeviceKey.load_or_create(cfg.paths.device_key_file),
               load_signing_key(keys.private_path), broker, client_id, recorded)


class Agent:
    """The service under test, with events to wait on instead of sleeps."""

    def __init__(self, env: Env, *, ready: bool = True, **service_options: Any) -> None:
        """``ready=False`` returns without waiting for the broker; ``service_options`` go to RequestService."""
        self.decisions: queue.Queue[Decision | None] = queue.Queue()
        self.events: queue.Queue[tuple[str, str, dict]] = queue.Queue()
        loc = env.cfg.require_policy().location
        self.transport = MqttTransport(env.cfg.require_mqtt(), lat=loc.lat, lon=loc.lon)
        self.svc = RequestService(env.cfg, transport=self.transport, device_key=env.key, clock=env.clock,
                                  **service_options)
        self.svc.on_decision = self.decisions.put
        self.svc.delivery_events = lambda event, job, details: self.events.put((event, job.jti, details))
        self.svc.start()
        if ready:
            assert self.transport.wait_ready(WAIT), self.transport.last_error

    def next_decision(self) -> Decision | None:
        return self.decisions.get(timeout=WAIT)

    def wait_delivery_end(self, jti: str) -> tuple[str, dict]:
        while True:
            event, got, details = self.events.get(timeout=WAIT)
            if got == jti and event not in ("sent", "handing"):
                return event, details

    def stop(self) -> None:
        self.svc.stop()
        assert self.svc.wait(WAIT)


@pytest.fixture
def agents(env: Env) -> Iterator[list[Agent]]:
    yield from stopped_afterwards()


def stopped_afterwards() -> Iterator[list[Agent]]:
    """The ``agents`` fixture's body: the agents a test appends are stopped when it ends."""
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


class Agency:
    """The city side, built from the reference client library."""

    def __init__(self, env: Env, name: str, *, clean_start: bool = True) -> None:
        cred = env.broker.credentials["agency"]
        settings = BrokerSettings(host=env.broker.host, port=env.broker.port, ca_file=env.broker.ca_file,
                                  cert_file=cred.cert_file, key_file=cred.key_file,
                                  username=cred.username, password=cred.password)
        self.session = MqttSession(settings, client_id=f"city-{name}", clean_start=clean_start, session_expiry_s=300)
        self.session.connect()
        self.session.subscribe(f"{env.broker.root}/v1/deliveries/#")
        self.env = env

    def request(self, *, lat: float = HOME[0] + 0.001, lon: float = HOME[1] + 0.001, radius_m: float = 300,
                window: tuple[datetime, datetime] | None = None, signer: SigningKey | None = None,
                jti: str | None = None, purpose: str = "Burglary reported on this block.",
                oversight: SigningKey | None = None, issued: datetime | None = None):
        now = self.env.clock.now()
        start, end = window or (now - timedelta(seconds=40), now - timedelta(seconds=30))
        return build_request(requester=signer or self.env.requester, oversight=oversight, program=PROGRAM,
                             officer="badge-4471", case="JPD-2026-001234", purpose=purpose, basis="consent",
                             lat=lat, lon=lon, radius_m=radius_m, window_start=start, window_end=end,
                             now=issued or now, jti=jti)

    def publish(self, built, topics: list[str] | None = None) -> None:
        for topic in topics or request_topics(self.env.broker.root, *HOME, 300):
            self.session.publish(topic, built.message, expiry_s=600)

    def collect(self, jti: str) -> tuple[DeliveryCollector, list[str]]:
        """Every delivery message for ``jti`` until one delivery is complete."""
        collector = DeliveryCollector(self.env.broker.root, jti)
        seen: list[str] = []
        while True:
            msg = self.session.next_message(WAIT)
            assert msg is not None, f"no complete delivery for {jti}; got {seen}"
            seen.append(msg.topic)
            pending = collector.add(msg.topic, msg.payload)
            if pending is not None and pending.complete and pending.manifest:
                return collector, seen

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def agency(env: Env) -> Iterator[Agency]:
    a = Agency(env, "jpd")
    yield a
    a.close()


def home_topic(env: Env) -> str:
    return request_topic(env.broker.root, encode(*HOME, 5))


def log_reasons(env: Env) -> list[tuple[str, str]]:
    with AccessLog(env.cfg.paths.state_db) as alog:
        return [(e.jti, e.outcome) for e in alog.entries()]


def test_valid_request_delivers_exactly_the_granted_frames(env: Env, agents: list[Agent], agency: Agency) -> None:
    agents.append(agent := Agent(env))
    built = agency.request()
    agency.publish(built)
    collector, _ = agency.collect(built.jti)
    (pending,) = [p for p in collector.pending.values() if p.complete]
    opened = open_delivery(pending.manifest, pending.chunks, built.recipient_private, built.jti)

    start, end = opened.granted
    assert (start, end) == (env.clock.now() - timedelta(seconds=40), env.clock.now() - timedelta(seconds=30))
    clip = env.cfg.paths.data_dir / "received.mp4"
    clip.write_bytes(opened.clip)
    with av.open(str(clip)) as container:
        stamps = [read_qr_time(f.to_ndarray(format="bgr24")) for f in container.decode(video=0)]
    assert None not in stamps
    times = [to_us(parse_utc_z(s)) for s in stamps]
    assert all(to_us(start) <= t < to_us(end) for t in times)
    # Every recorded frame in the window, each exactly once (QR text has millisecond precision).
    assert [t // 1000 for t in times] == [t // 1000 for t in env.frames_in(start, end)]
    assert opened.claims["log"]["seq"] == 1
    assert agent.wait_delivery_end(built.jti)[0] == "delivered"
    assert log_reasons(env) == [(built.jti, "granted"), (built.jti, "delivered")]


def test_refused_and_forged_requests_publish_nothing(env: Env, agents: list[Agent], agency: Agency,
                                                    tmp_path: Path) -> None:
    agents.append(agent := Agent(env))
    # A request for an incident 5 km away, sent (wrongly) to this camera's cell.
    far = agency.request(lat=HOME[0] + 0.045, lon=HOME[1])
    agency.publish(far, [home_topic(env)])
    assert agent.next_decision().reason == "outside_geofence"
    # A request signed by a key the resident never imported.
    stranger = keygen(iss="jackson-pd", kid="stranger", out_dir=tmp_path / "stranger")
    forged = agency.request(signer=load_signing_key(stranger.private_path))
    agency.publish(forged, [home_topic(env)])
    assert agent.next_decision().reason == "unknown_key"
    # A payload over the protocol's 16384 bytes, dropped unread.
    agency.session.publish(home_topic(env), b"x" * 20000)
    # A valid request afterwards: its delivery is the first and only thing published.
    good = agency.request()
    agency.publish(good, [home_topic(env)])
    _, topics = agency.collect(good.jti)
    assert all(f"/deliveries/{good.jti}/" in t for t in topics)
    assert log_reasons(env)[:2] == [(far.jti, "outside_geofence"), (good.jti, "granted")]
    agent.stop()  # counters of unauthenticated messages are written in batches; stopping writes the rest
    with AccessLog(env.cfg.paths.state_db) as alog:
        assert {r["reason"]: r["count"] for r in alog.rejection_counts()} == {"unknown_key": 1, "oversize": 1}


def test_replay_after_restart_is_refused_and_duplicates_ignored(env: Env, agents: list[Agent],
                                                                agency: Agency) -> None:
    agents.append(first := Agent(env))
    original = agency.request()
    agency.publish(original, [home_topic(env)])
    agency.collect(original.jti)
    assert first.wait_delivery_end(original.jti)[0] == "delivered"
    first.stop()

    agents.append(second := Agent(env))
    agency.publish(original, [home_topic(env)])  # the identical message again: a duplicate
    assert second.next_decision().reason == "duplicate"
    replay = agency.request(jti=original.jti, purpose="Same id, different request.")
    agency.publish(replay, [home_topic(env)])
    assert second.next_decision().reason == "replayed"
    sentinel = agency.request()
    agency.publish(sentinel, [home_topic(env)])
    _, topics = agency.collect(sentinel.jti)
    assert all(f"/deliveries/{sentinel.jti}/" in t for t in topics)
    reasons = log_reasons(env)
    assert (original.jti, "replayed") in reasons
    assert reasons.count((original.jti, "granted")) == 1


def strip_cosignature(message: str) -> str:
    """The request as its agency alone signed it: the oversight co-signature cut off."""
    jws = json.loads(message)
    return json.dumps({"payload": jws["payload"], "signatures": jws["signatures"][:1]})


@pytest.fixture
def oversight(env: Env, write_config, tmp_path: Path) -> SigningKey:
    """The resident requires oversight; the oversight body (another iss than the police) is trusted."""
    cfg = load_config(write_config(_policy_toml(require_oversight=True)))
    env.cfg = cfg.model_copy(update={"mqtt": env.cfg.mqtt})
    made = keygen(iss="jackson-oversight", kid="jxn-oversight-test", role="oversight", out_dir=tmp_path / "oversight")
    trust = load_trust_store(env.cfg.paths.trust_file)
    trust.add(TrustStore.from_jwks(made.public_jwks))
    save_trust_store(trust, env.cfg.paths.trust_file)
    return load_signing_key(made.private_path)


def test_copies_refused_before_the_replay_check_do_not_use_up_the_jti(
    env: Env, oversight: SigningKey, agents: list[Agent], agency: Agency
) -> None:
    """Protocol step 12: a jti counts as seen only once a message carrying it passed checks 1 to 11.

    Before the genuine request arrives, the camera hears two copies with its jti that fail earlier
    checks: one signed 20 minutes ago that arrives after its exp, and one stripped of its oversight
    co-signature. Neither may block the genuine, co-signed request: it is granted and delivered to
    its own recipient key, and only from then on is its jti used up.
    """
    agents.append(agent := Agent(env))
    genuine = agency.request(oversight=oversight)
    late = agency.request(oversight=oversight, jti=genuine.jti, issued=env.clock.now() - timedelta(minutes=20))
    agency.publish(late, [home_topic(env)])
    assert agent.next_decision().reason == "expired"
    agency.session.publish(home_topic(env), strip_cosignature(genuine.message), expiry_s=600)
    assert agent.next_decision().reason == "oversight_required"

    agency.publish(genuine, [home_topic(env)])
    assert agent.next_decision().reason == "granted"
    collector, _ = agency.collect(genuine.jti)
    (pending,) = [p for p in collector.pending.values() if p.complete]
    opened = open_delivery(pending.manifest, pending.chunks, genuine.recipient_private, genuine.jti)
    assert opened.granted == (env.clock.now() - timedelta(seconds=40), env.clock.now() - timedelta(seconds=30))
    assert agent.wait_delivery_end(genuine.jti)[0] == "delivered"

    agency.publish(genuine, [home_topic(env)])  # now the jti is used up: the same message is a duplicate
    assert agent.next_decision().reason == "duplicate"
    assert [r for j, r in log_reasons(env) if j == genuine.jti] == ["expired", "oversight_required", "granted", "delivered"]


def test_request_sent_while_agent_offline_is_decided_on_reconnect(env: Env, agents: list[Agent],
                                                                  agency: Agency) -> None:
    agents.append(first := Agent(env))  # establishes the persistent session and its subscription
    first.stop()
    built = agency.request()
    agency.publish(built)
    agents.append(second := Agent(env))
    assert second.transport.session_present is True
    assert second.next_decision().reason == "granted"
    agency.collect(built.jti)
    assert second.wait_delivery_end(built.jti)[0] == "delivered"


def test_kill_switch_during_delivery_stops_further_chunks(env: Env, agents: list[Agent], agency: Agency) -> None:
    agents.append(agent := Agent(env))
    switch = KillSwitch(env.cfg.paths.killswitch_file)
    engaged = threading.Event()

    def on_event(event: str, job, details: dict) -> None:  # type: ignore[no-untyped-def]
        agent.events.put((event, job.jti, details))
        if event == "handing" and details["chunk"] == 1:  # chunk 0 is on its way, chunk 1 is next
            switch.engage("test: homeowner pressed the button")
            engaged.set()

    agent.svc.delivery_events = on_event
    now = env.clock.now()
    built = agency.request(window=(now - timedelta(seconds=50), now - timedelta(seconds=10)))
    agency.publish(built, [home_topic(env)])
    event, details = agent.wait_delivery_end(built.jti)
    assert engaged.is_set()
    assert event == "delivery_cut"
    handed, total = details["chunks_handed"], details["chunks"]
    # Chunk 0 was handed over before the switch went on: it arrives, unless it was still queued in this
    # process and could be withdrawn. Nothing after it is ever published, and the log says exactly what
    # the requester holds: fewer than N chunks.
    assert handed <= 1 < total and details["manifest_handed"] and details["chunks_acked"] <= handed
    assert log_reasons(env)[-1] == (built.jti, "delivery_cut")
    collector = everything_received(env, agency, built.jti)
    (pending,) = collector.pending.values()
    assert sorted(pending.chunks) == list(range(handed)) and not pending.complete


def everything_received(env: Env, agency: Agency, jti: str, *, via: Agency | None = None) -> DeliveryCollector:
    """Every delivery message the requester (``agency``) got for ``jti``, up to now.

    The kill switch is released and a fresh request is granted and delivered: the broker forwards one
    client's messages in order, so once that delivery is complete, anything the agent published for
    ``jti`` before it has arrived too, and whatever has not will never come. ``via`` publishes the
    fresh request instead of ``agency`` (whose connection may have been through a broker restart).
    """
    KillSwitch(env.cfg.paths.killswitch_file).release("test: done checking")
    sentinel = agency.request()
    (via or agency).publish(sentinel, [home_topic(env)])
    mine = DeliveryCollector(env.broker.root, jti)
    marker = DeliveryCollector(env.broker.root, sentinel.jti)
    while True:
        msg = agency.session.next_message(WAIT)
        assert msg is not None, ("the sentinel delivery did not arrive; got for " + jti + ": "
                                 + str({d: sorted(p.chunks) for d, p in mine.pending.items()}))
        mine.add(msg.topic, msg.payload)
        got = marker.add(msg.topic, msg.payload)
        if got is not None and got.complete and got.manifest:
            return mine


def test_ask_approval_delivers_only_after_the_resident_approves(env: Env, agents: list[Agent],
                                                               write_config, agency: Agency) -> None:
    from agent.state.approvals import ApprovalQueue

    cfg = load_config(write_config(_policy_toml("ask")))
    env.cfg = cfg.model_copy(update={"mqtt": env.cfg.mqtt})
    agents.append(agent := Agent(env))
    built = agency.request()
    agency.publish(built, [home_topic(env)])
    assert agent.next_decision().reason == "awaiting_resident"
    queue_ = ApprovalQueue(env.cfg.paths.state_db)
    (held,) = queue_.pending(env.clock.now())
    assert held.jti == built.jti
    queue_.approve(held.id, env.clock.now())
    agency.collect(built.jti)
    assert agent.wait_delivery_end(built.jti)[0] == "delivered"
    assert [r for j, r in log_reasons(env) if j == built.jti] == ["awaiting_resident", "approved", "delivered"]



def test_delivery_interrupted_by_broker_restart_resumes_as_one_delivery(env: Env, agents: list[Agent]) -> None:
    agency = Agency(env, "jpd-persistent", clean_start=False)
    try:
        agents.append(agent := Agent(env))
        restarts: list[threading.Thread] = []

        def restart_broker() -> None:
            assert agent.transport.wait_until(lambda t: not t.ready, WAIT)
            env.broker.start()

        def on_event(event: str, job, details: dict) -> None:  # type: ignore[no-untyped-def]
            agent.events.put((event, job.jti, details))
            if event == "handing" and details["chunk"] == 1 and not restarts:
                env.broker.stop()  # the broker goes away in the middle of the delivery
                restarts.append(threading.Thread(target=restart_broker, daemon=True))
                restarts[0].start()

        agent.svc.delivery_events = on_event
        now = env.clock.now()
        built = agency.request(window=(now - timedelta(seconds=50), now - timedelta(seconds=10)))
        agency.publish(built, [home_topic(env)])
        event, details = agent.wait_delivery_end(built.jti)
        assert len(restarts) == 1
        restarts[0].join(WAIT)
        assert event == "delivered", details
        collector, _ = agency.collect(built.jti)
        complete = [p for p in collector.pending.values() if p.complete]
        assert len(collector.pending) == 1 and len(complete) == 1  # one grant, one delivery
        opened = open_delivery(complete[0].manifest, complete[0].chunks, built.recipient_private, built.jti)
        assert opened.claims["enc"]["chunks"] == details["chunks"] > 2
        assert agent.transport.counters()["connects"] >= 2
        assert [r for j, r in log_reasons(env) if j == built.jti] == ["granted", "delivered"]
    finally:
        agency.close()


def test_delivery_interrupted_by_agent_restart_resumes_from_the_outbox(env: Env, agents: list[Agent],
                                                                      agency: Agency) -> None:
    agents.append(first := Agent(env))

    def stop_midway(event: str, job, details: dict) -> None:  # type: ignore[no-untyped-def]
        first.events.put((event, job.jti, details))
        if event == "handing" and details["chunk"] == 1:
            first.svc.stop()  # e.g. systemctl restart while chunk 0 is on its way

    first.svc.delivery_events = stop_midway
    now = env.clock.now()
    built = agency.request(window=(now - timedelta(seconds=50), now - timedelta(seconds=10)))
    agency.publish(built, [home_topic(env)])
    assert first.next_decision().reason == "granted"
    assert first.svc.wait(WAIT)
    outbox = env.cfg.paths.data_dir / "outbox"
    assert {p.name for p in outbox.iterdir()} == {f"{built.jti}.job.json", f"{built.jti}.mp4", f"{built.jti}.sealed.json"}
    assert (outbox / f"{built.jti}.sealed.json").stat().st_mode & 0o077 == 0

    agents.append(second := Agent(env))
    assert second.wait_delivery_end(built.jti)[0] == "delivered"
    collector, _ = agency.collect(built.jti)
    assert len(collector.pending) == 1  # the resumed delivery is the same delivery, byte for byte
    (pending,) = collector.pending.values()
    opened = open_delivery(pending.manifest, pending.chunks, built.recipient_private, built.jti)
    assert opened.claims["log"]["seq"] == 1
    assert [r for j, r in log_reasons(env) if j == built.jti] == ["granted", "delivered"]
    assert list(outbox.iterdir()) == []


def test_kill_switch_during_a_broker_outage_cuts_the_delivery(env: Env, agents: list[Agent], agency: Agency) -> None:
    agents.append(agent := Agent(env))
    switch = KillSwitch(env.cfg.paths.killswitch_file)

    def on_event(event: str, job, details: dict) -> None:  # type: ignore[no-untyped-def]
        agent.events.put((event, job.jti, details))
        if event == "handing" and details["chunk"] == 1:
            env.broker.stop()  # nothing more gets through...
            switch.engage("test: homeowner pressed the button during the outage")

    agent.svc.delivery_events = on_event
    now = env.clock.now()
    built = agency.request(window=(now - timedelta(seconds=50), now - timedelta(seconds=10)))
    agency.publish(built, [home_topic(env)])
    event, details = agent.wait_delivery_end(built.jti)
    assert event == "delivery_cut" and details["chunks_acked"] <= details["chunks_handed"] <= 1
    # What was in flight was withdrawn: paho holds nothing it could send after a reconnect.
    assert len(agent.transport._client._out_messages) == 0  # type: ignore[union-attr]


def in_process(env: Env) -> RequestService:
    """The service with its real transport, not started: ``handle`` decides and records exactly as the
    worker does, and ``start()`` connects to the test broker like the running agent."""
    loc = env.cfg.require_policy().location
    transport = MqttTransport(env.cfg.require_mqtt(), lat=loc.lat, lon=loc.lon)
    return RequestService(env.cfg, transport=transport, device_key=env.key, clock=env.clock)


def test_a_request_remembered_but_never_logged_is_decided_again(env: Env, agency: Agency) -> None:
    built = agency.request()
    svc = in_process(env)
    try:
        # As if the agent died between the replay memory's write and the log's: the broker offers it again.
        first = decide_only(svc, built.message.encode())
        svc.replay.remember(first.request.jti, first.payload_sha256, first.request.exp)
        again = svc.handle(built.message.encode())
        assert again is not None and again.reason == "granted"
        assert svc.outbox.has(built.jti)
        assert svc.handle(built.message.encode()).reason == "duplicate"  # now it is on the record
    finally:
        svc.stop()
        svc.wait(WAIT)
    assert [r for j, r in log_reasons(env) if j == built.jti] == ["granted"]


def test_a_refused_copy_on_the_record_does_not_hide_a_grant_that_was_never_logged(env: Env, agency: Agency) -> None:
    """A late copy of a request was refused (expired) and logged. Then the genuine copy was remembered,
    but the agent died before logging its grant. When the broker offers it again it is decided and
    granted, not taken for a duplicate of a decision already on the record."""
    genuine = agency.request()
    late = agency.request(jti=genuine.jti, issued=env.clock.now() - timedelta(minutes=20))
    svc = in_process(env)
    try:
        assert svc.handle(late.message.encode()).reason == "expired"
        first = decide_only(svc, genuine.message.encode())
        assert first.reason == "granted"
        svc.replay.remember(first.request.jti, first.payload_sha256, first.request.exp)  # ...and then the agent died
        again = svc.handle(genuine.message.encode())
        assert again is not None and again.reason == "granted"
        assert svc.outbox.has(genuine.jti)
    finally:
        svc.stop()
        svc.wait(WAIT)
    assert [r for j, r in log_reasons(env) if j == genuine.jti] == ["expired", "granted"]


def decide_only(svc: RequestService, payload: bytes) -> Decision:
    from agent.protocol.decision import decide

    trust = svc.trust.get()
    assert trust is not None
    return decide(payload, trust=trust, policy=svc.policy, state=svc.state, now=svc.clock.now())


def test_outbox_jobs_without_a_logged_grant_or_already_ended_are_not_delivered(env: Env, agency: Agency) -> None:
    """After a crash, the outbox holds a job whose grant never reached the log and one whose delivery
    had already ended: on restart neither is delivered, and both are tidied away."""
    from agent.sharing.outbox import DeliveryJob

    svc = in_process(env)
    now = env.clock.now()
    ended = agency.request()
    assert svc.handle(ended.message.encode()).reason == "granted"
    svc.accesslog.append_event(ended.jti, "delivery_cut", chunks_sent=0)  # ...and then the agent died
    orphan = DeliveryJob("never-logged-request-0001", "AAAAAAAAAAAAAAAAAAAAAA", "jackson-pd",
                         {"kty": "OKP", "crv": "X25519", "x": "FxN29gacW5zXqV82vQMVqoibS8BzLh7u3w2ynrrRjS4"},
                         now - timedelta(seconds=40), now - timedelta(seconds=30), 0, "")
    svc.outbox.add(orphan)
    svc.stop()
    assert svc.wait(WAIT)

    restarted = in_process(env)
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    restarted.delivery_events = lambda event, job, details: events.put((event, job.jti))
    restarted.start()
    try:
        assert restarted.transport.wait_ready(WAIT), restarted.transport.last_error
        # A fresh grant after the restart: its job is queued behind anything start() resumed, so once
        # it is delivered the delivery worker has been through every resumed job.
        sentinel = agency.request()
        agency.publish(sentinel, [home_topic(env)])
        seen: list[tuple[str, str]] = []
        while ("delivered", sentinel.jti) not in seen:
            seen.append(events.get(timeout=WAIT))
    finally:
        restarted.stop()
        assert restarted.wait(WAIT)
    assert {jti for _, jti in seen} == {sentinel.jti}
    assert list(restarted.outbox.root.iterdir()) == []
    assert [r for j, r in log_reasons(env) if j in (ended.jti, orphan.jti)] == ["granted", "delivery_cut"]


def test_approval_is_rechecked_against_a_key_revoked_meanwhile(env: Env, write_config, agency: Agency) -> None:
    from agent.state.approvals import ApprovalQueue

    cfg = load_config(write_config(_policy_toml("ask")))
    env.cfg = cfg.model_copy(update={"mqtt": env.cfg.mqtt})
    svc = in_process(env)
    built = agency.request()
    assert svc.handle(built.message.encode()).reason == "awaiting_resident"
    trust = load_trust_store(env.cfg.paths.trust_file)
    trust.revoke("jpd-test")
    save_trust_store(trust, env.cfg.paths.trust_file)
    queue_ = ApprovalQueue(env.cfg.paths.state_db)
    (held,) = queue_.pending(env.clock.now())
    queue_.approve(held.id, env.clock.now())
    svc.chores()
    assert not svc.outbox.has(built.jti)
    assert [r for j, r in log_reasons(env) if j == built.jti] == ["awaiting_resident", "delivery_refused"]
    with AccessLog(env.cfg.paths.state_db) as alog:
        assert "key_not_valid" in alog.entries(jti=built.jti)[-1].data["reason"]
    svc.chores()  # claimed once: nothing more happens
    assert len(log_reasons(env)) == 2
