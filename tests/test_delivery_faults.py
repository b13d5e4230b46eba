"""Deliveries under faults, against a real Mosquitto, real H.264 footage and the real service.

Each test reproduces a fault reported against the delivery side and fails on the code before the fix:

- the kill switch, or the give-up, did not recall what paho held: chunks queued during a broker
  outage went out after the reconnect, and the requester opened the whole clip although the log
  said ``delivery_cut`` / ``delivery_failed``;
- a small clip was handed over whole before the first PUBACK, so the switch could not stop it;
- after a restart, chunks went out before the manifest;
- a delivery resumed from the outbox was not decided again: a revoked key, new rules, deleted
  footage or a month gone by did not stop it, and it had no deadline;
- an approval shared the window computed when the request was held, not when it was approved.

Where a fault needs the network to misbehave on cue (a dead link, a slow CONNACK, a long round
trip), the agent talks to the broker through :class:`tests.mqtt_proxy.MqttProxy` on the broker's
plaintext listener; otherwise the broker is stopped and started with the fixtures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.buffer.segments import SegmentStore
from agent.city.receive import DeliveryCollector
from agent.config import load_config
from agent.protocol.jose import parse_compact
from agent.protocol.sealing import MANIFEST_TYP
from agent.sharing.service import RequestService
from agent.sharing.transport import ConnectionState, MqttTransport, PublishOutcome
from agent.state.accesslog import AccessLog
from agent.state.killswitch import KillSwitch
from agent.state.truststore import load_trust_store, save_trust_store
from agent.timeutil import format_utc, parse_utc_z, to_us
from tests.broker import Broker
from tests.mqtt_proxy import CONNECT, MqttProxy, SeenPacket
from tests.test_service import (
    HOME,
    PROGRAM,
    WAIT,
    Agency,
    Agent,
    Env,
    everything_received,
    home_topic,
    in_process,
    log_reasons,
    make_env,
    stopped_afterwards,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def policy_toml(*, approval: str = "auto", require_oversight: bool = False, max_age_s: int = 259200,
                retention_hours: float = 72.0, grants_per_day: int = 10) -> str:
    return f"""
[buffer]
segment_seconds = 4
retention_hours = {retention_hours}

[policy]
program = "{PROGRAM}"
location = {{ lat = {HOME[0]}, lon = {HOME[1]} }}
timezone = "America/Chicago"
max_radius_m = 1000
max_age_s = {max_age_s}
grants_per_issuer_per_day = {grants_per_day}
approval = "{approval}"
require_oversight = {"true" if require_oversight else "false"}

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2030-01-01T00:00:00Z
"""


def use_policy(env: Env, write_config: Callable[[str], Path], **policy: Any) -> Path:
    """New rules for the next agent started on ``env`` (as a resident editing agent.toml and restarting)."""
    path = write_config(policy_toml(**policy))
    env.cfg = load_config(path).model_copy(update={"mqtt": env.cfg.mqtt})
    return path


def long_window(env: Env) -> tuple[datetime, datetime]:
    """40 s of footage: several chunks, more than the delivery window."""
    now = env.clock.now()
    return now - timedelta(seconds=50), now - timedelta(seconds=10)


def events_of(env: Env, jti: str) -> list[tuple[str, dict[str, Any]]]:
    with AccessLog(env.cfg.paths.state_db) as alog:
        return [(e.outcome, e.data) for e in alog.entries(jti=jti)]


def outbox_files(env: Env) -> list[str]:
    return sorted(p.name for p in (env.cfg.paths.data_dir / "outbox").iterdir())


def paho_holds(agent: Agent) -> int:
    """How many of our outgoing messages paho would still send by itself (after a reconnect)."""
    client = agent.transport._client
    assert client is not None
    with client._out_message_mutex:
        return len(client._out_messages)


@pytest.fixture
def env(tmp_path: Path, write_config: Callable[[str], Path], broker: Broker) -> Env:
    """As in tests/test_service.py: the test broker, a trusted agency key, 40 s of footage ending 10 s ago."""
    return make_env(tmp_path, write_config, broker)


@pytest.fixture
def agents(env: Env) -> Iterator[list[Agent]]:
    yield from stopped_afterwards()


@pytest.fixture
def proxy(broker: Broker) -> Iterator[MqttProxy]:
    p = MqttProxy(broker.plain_port)
    yield p
    p.close()


def through(env: Env, proxy: MqttProxy) -> None:
    """The agent's broker link goes through ``proxy`` (the broker's plaintext listener)."""
    env.cfg = env.cfg.model_copy(update={"mqtt": env.broker.mqtt_config(
        "agent", plaintext=True, precision=4, client_id=env.client_id, port=proxy.port)})


# ----------------------------------------------------------------------------- the transport and paho


def test_nothing_is_handed_to_paho_while_the_broker_is_down(env: Env, broker: Broker) -> None:
    """paho used to accept a message while disconnected (MQTT_ERR_NO_CONN) and send it by itself after the
    reconnect, whatever the agent had decided meanwhile. Now it is refused and nothing is kept."""
    requester = Agency(env, "persistent-t1", clean_start=False)
    loc = env.cfg.require_policy().location
    transport = MqttTransport(env.cfg.require_mqtt(), lat=loc.lat, lon=loc.lon)
    transport.start()
    try:
        assert transport.wait_ready(WAIT)
        topic = f"{broker.root}/v1/deliveries/j-0000000000000000/d/"
        broker.stop()
        assert transport.wait_until(lambda t: t.state is not ConnectionState.CONNECTED, WAIT)
        refused = transport.publish_nowait(topic + "0", b"handed over while the broker was down")
        assert isinstance(refused, PublishOutcome) and not refused.ok and "not connected" in refused.reason
        assert transport._client is not None and len(transport._client._out_messages) == 0
        broker.start()
        assert transport.wait_ready(WAIT + 60)
        assert transport.publish(topic + "marker", b"marker", timeout=WAIT)
        got = []
        while not got or got[-1] != b"marker":  # one publisher's messages arrive in order: the marker comes last
            msg = requester.session.next_message(WAIT)
            assert msg is not None, f"the marker never arrived; got {got}"
            got.append(msg.payload)
        assert got == [b"marker"]
    finally:
        transport.stop()
        requester.close()


def test_withdraw_takes_back_what_has_not_reached_the_network(env: Env, broker: Broker) -> None:
    """On a slow uplink, handed-over messages wait in paho's socket queue. Withdrawing takes back every one
    not a byte of which was written, reports the ones that were, and paho sends none of them again: exactly
    the reported ones reach the broker. Checks paho's internals as installed."""
    from agent.sharing.outgoing import Recall

    slow = MqttProxy(broker.plain_port, rcvbuf=16384)
    through(env, slow)
    requester = Agency(env, "requester-t2")
    loc = env.cfg.require_policy().location
    transport = MqttTransport(env.cfg.require_mqtt(), lat=loc.lat, lon=loc.lon)
    slow.accept()
    transport.start()
    try:
        assert transport.wait_ready(WAIT)
        client = transport._client
        assert client is not None
        sock = client.socket()
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # a small socket buffer: a slow uplink fills it
        slow.stall()  # the uplink stops: what is handed over backs up into the agent
        topic = f"{broker.root}/v1/deliveries/j-0000000000000000/d/"
        chunk = os.urandom(262160)
        mids = []
        for n in range(12):
            mid = transport.publish_nowait(topic + str(n), chunk)
            assert isinstance(mid, int)
            mids.append(mid)
        # paho's thread writes what the socket takes, then its queue stops shrinking: no event says so, so it
        # is sampled until two looks agree (with a deadline).
        deadline = time.monotonic() + WAIT
        last = -1
        while True:
            with client._out_message_mutex:
                now_len = len(client._out_packet)
            if now_len == last or time.monotonic() > deadline:
                break
            last = now_len
            time.sleep(0.05)
        recalled = transport.withdraw(mids)
        left = [n for n, mid in enumerate(mids) if recalled[mid] is Recall.ON_WIRE]
        kept = [n for n, mid in enumerate(mids) if recalled[mid] is Recall.WITHDRAWN]
        assert left == list(range(len(left))) and 1 <= len(left) < 12, recalled  # a prefix left; the rest is back
        assert len(kept) == 12 - len(left) and all(recalled[m] is not Recall.ACKED for m in mids)
        with client._out_message_mutex:
            assert len(client._out_messages) == 0 and client._inflight_messages == 0
            assert not [p for p in client._out_packet if p["command"] & 0xF0 == 0x30 and p["pos"] == 0]
        slow.release()
        assert transport.publish(topic + "marker", b"marker", timeout=WAIT)
        got: list[str] = []
        while not got or not got[-1].endswith("/marker"):
            msg = requester.session.next_message(WAIT)
            assert msg is not None, f"the marker never arrived; got {got}"
            got.append(msg.topic)
        assert got == [topic + str(n) for n in left] + [topic + "marker"]
    finally:
        transport.stop()
        requester.close()
        slow.close()


# ----------------------------------------------------------------------------- the kill switch


def killswitch_cli(env: Env, config: Path, action: str) -> None:
    """``doorbell-agent killswitch on|off``, as the homeowner runs it."""
    out = subprocess.run([sys.executable, "-m", "agent", "--config", str(config), "killswitch", action],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_kill_switch_during_an_outage_sends_nothing_after_the_reconnect(
    env: Env, agents: list[Agent], write_config: Callable[[str], Path]
) -> None:
    """The reported fault: the broker dies right after the manifest, the agent hands chunks to paho,
    ``killswitch on``; when the broker is back the requester held the whole clip. Now whatever paho held
    is withdrawn at the cut, the requester gets at most what the log counts, and the clip never opens."""
    config = use_policy(env, write_config)
    requester = Agency(env, "persistent-t3", clean_start=False)
    try:
        agents.append(agent := Agent(env))
        down = threading.Event()

        def on_event(event: str, job, details: dict) -> None:  # type: ignore[no-untyped-def]
            agent.events.put((event, job.jti, details))
            if event == "sent" and details["topic"].endswith("/manifest") and not down.is_set():
                env.broker.stop()  # killed right after the manifest; the worker goes on at once
                down.set()

        agent.svc.delivery_events = on_event
        built = requester.request(window=long_window(env))
        requester.publish(built, [home_topic(env)])
        assert down.wait(WAIT)
        assert agent.transport.wait_until(lambda t: t.state is not ConnectionState.CONNECTED, WAIT)
        killswitch_cli(env, config, "on")
        event, details = agent.wait_delivery_end(built.jti)
        assert event == "delivery_cut", details
        assert paho_holds(agent) == 0  # nothing left that paho would send after the reconnect
        env.broker.start()
        assert agent.transport.wait_ready(WAIT + 60)
        sentinel_sender = Agency(env, "sentinel-t3")
        try:
            got = everything_received(env, requester, built.jti, via=sentinel_sender)
        finally:
            sentinel_sender.close()
        chunks = {n for p in got.pending.values() for n in p.chunks}
        assert not any(p.complete for p in got.pending.values()), chunks
        assert details["chunks"] > 2 and details["chunks_handed"] < details["chunks"]
        assert details["manifest_handed"] and details["chunks_acked"] <= details["chunks_handed"]
        assert chunks <= set(range(details["chunks_handed"])), (chunks, details)
        assert [r for j, r in log_reasons(env) if j == built.jti] == ["granted", "delivery_cut"]
    finally:
        requester.close()


def test_kill_switch_before_the_first_puback_still_cuts_a_short_clip(
    env: Env, agents: list[Agent], proxy: MqttProxy
) -> None:
    """On a link with a real round trip, a clip of a few chunks used to be handed over whole before the first
    PUBACK came back, so a switch pressed as the delivery began stopped nothing. Now chunks wait for the
    manifest's PUBACK and the window is small: the switch pressed when the manifest reaches the network
    stops every chunk, and no chunk reaches the network afterwards."""
    through(env, proxy)
    proxy.down_delay_s = 0.3  # every PUBACK takes 300 ms to come back
    proxy.accept()
    switch = KillSwitch(env.cfg.paths.killswitch_file)
    pressed: list[float] = []

    def press_on_manifest(seen: SeenPacket) -> None:
        if seen.topic and seen.topic.endswith("/manifest") and not pressed:
            switch.engage("test: pressed as the delivery began")
            pressed.append(time.monotonic())

    proxy.on_packet = press_on_manifest
    requester = Agency(env, "requester-t4")
    try:
        agents.append(agent := Agent(env))
        built = requester.request(window=long_window(env))
        requester.publish(built, [home_topic(env)])
        event, details = agent.wait_delivery_end(built.jti)
        assert pressed and event == "delivery_cut", details
        on_the_wire = [p.topic for p in proxy.published() if f"/{built.jti}/" in (p.topic or "")]
        assert on_the_wire == [t for t in on_the_wire if t.endswith("/manifest")], on_the_wire  # no chunk, ever
        assert details["chunks"] > 2 and details["chunks_handed"] == 0 and details["manifest_handed"]
        got = everything_received(env, requester, built.jti)
        assert [sorted(p.chunks) for p in got.pending.values()] == [[]]
    finally:
        requester.close()


def test_a_given_up_delivery_sends_nothing_after_the_reconnect(env: Env, agents: list[Agent], proxy: MqttProxy) -> None:
    """The same fault with the give-up: the log said ``delivery_failed`` and the requester still got the clip
    once the link came back, because paho sent what it held after the reconnect. Here the link goes dead
    (no FIN, nothing gets through) the moment the first chunk reaches it, so everything after it is lost
    on the way; the delivery's deadline passes; then the link is cut and comes back. Nothing paho held
    goes out, and the log counts what may have left."""
    through(env, proxy)
    proxy.accept()

    def dead_link_after_chunk_0(seen: SeenPacket) -> None:
        if seen.topic and seen.topic.endswith("/0"):
            proxy.black_hole = True  # chunk 0 went through; nothing after it does, in either direction

    proxy.on_packet = dead_link_after_chunk_0
    requester = Agency(env, "persistent-t12", clean_start=False)
    try:
        agents.append(agent := Agent(env, delivery_give_up_s=3.0))
        built = requester.request(window=long_window(env))
        requester.publish(built, [home_topic(env)])
        event, details = agent.wait_delivery_end(built.jti)
        assert event == "delivery_failed", details
        assert paho_holds(agent) == 0  # nothing left that paho would send after the reconnect
        proxy.cut()  # what the dead link held is lost; the agent reconnects
        proxy.release()
        assert agent.transport.wait_until(lambda t: t.counters()["connects"] >= 2 and t.ready, WAIT + 60)
        got = everything_received(env, requester, built.jti)
        chunks = {n for p in got.pending.values() for n in p.chunks}
        assert not any(p.complete for p in got.pending.values()), chunks
        assert chunks <= set(range(details["chunks_handed"])) and details["chunks_handed"] < details["chunks"]
        assert "deadline" in details["reason"] and not [f for f in outbox_files(env) if f.startswith(built.jti)]
    finally:
        requester.close()


# ----------------------------------------------------------------------------- resuming after a restart


def test_a_resumed_delivery_publishes_its_manifest_before_any_chunk(env: Env, proxy: MqttProxy) -> None:
    """After a restart the agent used to hand the manifest to paho while still connecting (paho kept it
    for the CONNACK) and the chunks a moment later, once the socket existed but before the CONNACK: the
    chunks went out first. Here the broker is unreachable when the agent starts, and then answers the
    CONNECT slowly. Now nothing is handed over before the connection is up, and chunks wait for the
    manifest's PUBACK."""
    through(env, proxy)
    requester = Agency(env, "persistent-t5", clean_start=False)
    built = requester.request(window=long_window(env))
    first = in_process(env)  # the grant is recorded; the agent stops before delivering anything
    try:
        assert first.handle(built.message.encode()).reason == "granted"
    finally:
        first.stop()
        assert first.wait(WAIT)

    cv = threading.Condition()
    attempts: list[str] = []  # what the restarted agent's delivery worker did while the link was not up

    def note(what: str) -> None:
        with cv:
            attempts.append(what)
            cv.notify_all()

    def chunk_reached_network(seen: SeenPacket) -> None:
        if seen.topic and f"/{built.jti}/" in seen.topic and not seen.topic.endswith("/manifest"):
            note("chunk on the wire")
        elif seen.kind == CONNECT:
            note("connect")

    proxy.on_packet = chunk_reached_network
    loc = env.cfg.require_policy().location
    transport = MqttTransport(env.cfg.require_mqtt(), lat=loc.lat, lon=loc.lon)
    # Instrumentation only: note the worker's first attempt to hand something over, or to wait for the link.
    for name in ("publish_nowait", "wait_connected"):
        if hasattr(transport, name):
            original = getattr(transport, name)

            def spy(*args: Any, _original: Callable[..., Any] = original, _name: str = name, **kw: Any) -> Any:
                note(_name)
                return _original(*args, **kw)

            setattr(transport, name, spy)
    svc = RequestService(env.cfg, transport=transport, device_key=env.key, clock=env.clock)

    def slow_down_chunk_0(event: str, job, details: dict) -> None:  # type: ignore[no-untyped-def]
        if event == "handing" and details.get("chunk") == 0:
            # Hold chunk 0 until the agent's socket to the broker exists (its CONNECT has arrived).
            with cv:
                assert cv.wait_for(lambda: "connect" in attempts, WAIT)

    svc.delivery_events = slow_down_chunk_0
    try:
        svc.start()  # resumes the job from the outbox; the broker is unreachable
        with cv:  # the worker tried to hand the manifest over, or is waiting for the link
            assert cv.wait_for(lambda: bool({"publish_nowait", "wait_connected"} & set(attempts)), WAIT)
        proxy.hold_down = True  # the broker will answer the CONNECT, slowly
        proxy.accept()
        with cv:
            assert cv.wait_for(lambda: "connect" in attempts, WAIT + 60)
            mark = len(attempts)
            # A chunk going out before the CONNACK, or the worker still waiting for the link: let the CONNACK through.
            assert cv.wait_for(lambda: {"chunk on the wire", "wait_connected"} & set(attempts[mark:]), WAIT)
        proxy.release()
        order: list[str] = []
        collector = DeliveryCollector(env.broker.root, built.jti)
        while True:
            msg = requester.session.next_message(WAIT)
            assert msg is not None, f"the delivery did not complete; got {order}"
            order.append(msg.topic.rsplit("/", 1)[1])
            pending = collector.add(msg.topic, msg.payload)
            if pending is not None and pending.complete and pending.manifest:
                break
        assert order[0] == "manifest", order
    finally:
        svc.stop()
        svc.wait(WAIT)
        requester.close()


def resume_after(env: Env, agents: list[Agent], change: Callable[[], None]) -> tuple[str, dict[str, Any], str]:
    """Grant a request, stop before delivering it, ``change`` something, start again: how did it end?"""
    requester = Agency(env, "requester-resume")
    try:
        built = requester.request(window=long_window(env))
        first = in_process(env)
        try:
            assert first.handle(built.message.encode()).reason == "granted"
        finally:
            first.stop()
            assert first.wait(WAIT)
        change()
        agents.append(agent := Agent(env))
        event, details = agent.wait_delivery_end(built.jti)
        return event, details, built.jti
    finally:
        requester.close()


def revoke_key(env: Env) -> None:
    trust = load_trust_store(env.cfg.paths.trust_file)
    trust.revoke("jpd-test")
    save_trust_store(trust, env.cfg.paths.trust_file)


def delete_footage(env: Env) -> None:
    store = SegmentStore.from_config(env.cfg)
    try:
        store.enforce_retention(to_us(env.clock.now() + timedelta(days=3650)))
        assert store.all() == []
    finally:
        store.close()


@pytest.mark.parametrize(("change", "event", "reason"), [
    ("the agency's key was revoked", "delivery_refused", "key_not_valid"),
    ("the resident now requires oversight", "delivery_refused", "oversight_required"),
    ("the resident now approves each request", "delivery_refused", "awaiting_resident"),
    ("the footage was deleted", "delivery_refused", "no_footage"),
    ("the clock moved 30 days on", "delivery_failed", "deadline"),
])
def test_a_resumed_delivery_is_decided_again(env: Env, agents: list[Agent], write_config: Callable[[str], Path],
                                             change: str, event: str, reason: str) -> None:
    """A delivery resumed from the outbox used to be checked only against the kill switch and the consent
    period. Now the whole decision runs again on the stored request, with the rules, trust store, footage
    and clock of the moment; a refusal is logged with its reason and the outbox copy is deleted."""
    changes: dict[str, Callable[[], Any]] = {
        "the agency's key was revoked": lambda: revoke_key(env),
        "the resident now requires oversight": lambda: use_policy(env, write_config, require_oversight=True),
        "the resident now approves each request": lambda: use_policy(env, write_config, approval="ask"),
        "the footage was deleted": lambda: delete_footage(env),
        "the clock moved 30 days on": lambda: env.clock.advance(30 * 86400),
    }
    ended, details, jti = resume_after(env, agents, changes[change])
    assert ended == event and reason in details["reason"], details
    assert details["chunks_handed"] == 0 and not details["manifest_handed"]
    assert outbox_files(env) == []
    assert [r for j, r in log_reasons(env) if j == jti] == ["granted", event]


def test_a_delivery_resumed_after_an_outage_is_decided_again(env: Env, agents: list[Agent]) -> None:
    """The broker goes away in the middle of a delivery and the resident revokes the agency's key meanwhile.
    When the broker is back, the grant is decided again before anything more is handed over (paho no longer
    resends what it held by itself): the delivery is refused, and the requester never holds the clip."""
    requester = Agency(env, "persistent-t14", clean_start=False)
    try:
        agents.append(agent := Agent(env))
        down = threading.Event()

        def on_event(event: str, job, details: dict) -> None:  # type: ignore[no-untyped-def]
            agent.events.put((event, job.jti, details))
            if event == "sent" and details["topic"].endswith("/manifest") and not down.is_set():
                env.broker.stop()
                revoke_key(env)
                down.set()

        agent.svc.delivery_events = on_event
        built = requester.request(window=long_window(env))
        requester.publish(built, [home_topic(env)])
        assert down.wait(WAIT)
        assert agent.transport.wait_until(lambda t: t.state is not ConnectionState.CONNECTED, WAIT)
        env.broker.start()
        event, details = agent.wait_delivery_end(built.jti)
        assert event == "delivery_refused" and details["reason"] == "key_not_valid", details
        assert paho_holds(agent) == 0
        trust = load_trust_store(env.cfg.paths.trust_file)
        trust.restore("jpd-test")  # so that the sentinel request of everything_received is granted
        save_trust_store(trust, env.cfg.paths.trust_file)
        sender = Agency(env, "sentinel-t14")
        try:
            got = everything_received(env, requester, built.jti, via=sender)
        finally:
            sender.close()
        chunks = {n for p in got.pending.values() for n in p.chunks}
        assert not any(p.complete for p in got.pending.values()) and chunks <= set(range(details["chunks_handed"]))
    finally:
        requester.close()


def test_a_grant_does_not_count_against_its_own_delivery(env: Env, agents: list[Agent],
                                                        write_config: Callable[[str], Path]) -> None:
    """The re-check counts the issuer's grants of the last 24 hours (step 21) without the one being
    delivered: with one grant a day allowed, that grant's resumed delivery still goes out."""
    use_policy(env, write_config, grants_per_day=1)
    ended, details, jti = resume_after(env, agents, lambda: None)
    assert ended == "delivered", details


def test_a_restarted_agent_decides_a_resumed_delivery_again(env: Env, tmp_path: Path,
                                                           write_config: Callable[[str], Path]) -> None:
    """The same through the real ``doorbell-agent run``: the agent stops with a delivery in its outbox, the
    resident revokes the agency's key with ``doorbell-agent trust revoke``, and the restarted agent refuses
    the delivery (logged with the reason) and deletes the outbox copy instead of sending it."""
    mqtt = env.cfg.require_mqtt()
    config = write_config(policy_toml() + f"""
[camera]
source = "synthetic"
width = 160
height = 120
fps = 5

[clock]
assume_synced = true

[mqtt]
host = "{mqtt.host}"
port = {mqtt.port}
ca_file = "{mqtt.ca_file}"
cert_file = "{mqtt.cert_file}"
key_file = "{mqtt.key_file}"
username = "{mqtt.username}"
password = "{mqtt.password}"
root = "{mqtt.root}"
client_id = "{env.client_id}"
keepalive_s = 5
""")
    requester = Agency(env, "requester-t7")
    now = datetime.now(env.clock.now().tzinfo)  # the subprocess runs on the real clock: ask relative to it
    built = requester.request(window=(now - timedelta(seconds=50), now - timedelta(seconds=10)), issued=now)
    first = in_process(env)
    try:
        env.clock.set(now)
        assert first.handle(built.message.encode()).reason == "granted"
    finally:
        first.stop()
        assert first.wait(WAIT)
    requester.close()
    assert outbox_files(env) == [f"{built.jti}.job.json"]
    out = subprocess.run([sys.executable, "-m", "agent", "--config", str(config), "trust", "revoke", "jpd-test"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(config), "run"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 90
        while True:  # another process: its log entry is the only sign (polled, with a deadline)
            ended = [e for e in events_of(env, built.jti) if e[0] != "granted"]
            if ended or proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert ended, (proc.poll(), (tmp_path / "agent.log").read_text()[-3000:])
        assert ended[0][0] == "delivery_refused" and ended[0][1]["reason"] == "key_not_valid", ended
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert outbox_files(env) == []


def test_the_deadline_is_kept_with_the_job_and_a_restart_does_not_extend_it(env: Env, agents: list[Agent]) -> None:
    """A job now carries an absolute deadline (one hour after its grant). A restart resumes it with the same
    deadline; once past it the delivery is logged as failed and its clip deleted."""
    requester = Agency(env, "requester-t8")
    try:
        agents.append(first := Agent(env))

        def stop_midway(event: str, job, details: dict) -> None:  # type: ignore[no-untyped-def]
            first.events.put((event, job.jti, details))
            if event == "handing" and details["chunk"] == 1:
                first.svc.stop()

        first.svc.delivery_events = stop_midway
        built = requester.request(window=long_window(env))
        requester.publish(built, [home_topic(env)])
        assert first.next_decision().reason == "granted"
        assert first.svc.wait(WAIT)
        job_file = env.cfg.paths.data_dir / "outbox" / f"{built.jti}.job.json"
        job = json.loads(job_file.read_text())
        granted_at = env.clock.now()
        assert job.get("deadline") is not None, job
        assert parse_utc_z(job["deadline"]) == granted_at + timedelta(hours=1)
        assert job["handed"]["manifest"] and job["handed"]["chunks"] >= 1  # recorded before they could leave
        assert f"{built.jti}.mp4" in outbox_files(env)

        env.clock.advance(3601)  # the agent was down for an hour
        agents.append(second := Agent(env))
        event, details = second.wait_delivery_end(built.jti)
        assert event == "delivery_failed" and "deadline" in details["reason"]
        assert details["manifest_handed"] and details["chunks_handed"] >= 1  # what the first run may have sent
        assert outbox_files(env) == []
    finally:
        requester.close()


def test_no_outbox_clip_outlives_the_retention(env: Env, agents: list[Agent], write_config: Callable[[str], Path]) -> None:
    """With a short ``retention_hours`` the deadline is when the clip's first footage leaves the buffer,
    sooner than an hour after the grant."""
    use_policy(env, write_config, retention_hours=0.02)  # 72 s: the footage asked for began 50 s ago
    requester = Agency(env, "requester-t9")
    try:
        built = requester.request(window=long_window(env))
        first = in_process(env)
        try:
            assert first.handle(built.message.encode()).reason == "granted"
        finally:
            first.stop()
            assert first.wait(WAIT)
        job = json.loads((env.cfg.paths.data_dir / "outbox" / f"{built.jti}.job.json").read_text())
        assert job.get("deadline") is not None, job
        assert parse_utc_z(job["deadline"]) == long_window(env)[0] + timedelta(seconds=72)
        env.clock.advance(23)
        agents.append(agent := Agent(env))
        event, details = agent.wait_delivery_end(built.jti)
        assert event == "delivery_failed" and "deadline" in details["reason"]
        assert outbox_files(env) == []
    finally:
        requester.close()


# ----------------------------------------------------------------------------- the window


def test_an_approval_shares_the_window_of_its_recheck(env: Env, agents: list[Agent],
                                                     write_config: Callable[[str], Path]) -> None:
    """The resident approves 11 s after the request was held. The footage shared used to start where it
    did when the request was held: 11 s older than ``max_age_s`` allows at the approval. Now it is the
    window of the re-check at approval time, recorded in the ``approved`` event."""
    from agent.state.approvals import ApprovalQueue

    use_policy(env, write_config, approval="ask", max_age_s=45)
    requester = Agency(env, "requester-t10")
    try:
        agents.append(agent := Agent(env))
        built = requester.request(window=long_window(env))
        requester.publish(built, [home_topic(env)])
        assert agent.next_decision().reason == "awaiting_resident"
        held_at = env.clock.now()
        queue_ = ApprovalQueue(env.cfg.paths.state_db)
        (held,) = queue_.pending(held_at)
        assert held.granted_start == held_at - timedelta(seconds=45)
        approved_at = env.clock.advance(11)
        queue_.approve(held.id, approved_at)
        event, details = agent.wait_delivery_end(built.jti)
        assert event == "delivered", details
        collector, _ = requester.collect(built.jti)  # (a sentinel request would wait for approval too)
        (pending,) = collector.pending.values()
        granted = parse_compact(pending.manifest, typ=MANIFEST_TYP).claims["granted"]
        assert parse_utc_z(granted["start"]) == approved_at - timedelta(seconds=45)
        approved = [d for e, d in events_of(env, built.jti) if e == "approved"]
        # The approved event holds the re-check's window at the moment the service took up the approval; the
        # delivery's own re-check may narrow it further (the service may read the clock just before the test
        # advances it), never widen it.
        logged = approved[0]["granted"]
        assert parse_utc_z(logged["start"]) <= parse_utc_z(granted["start"]) and logged["end"] == granted["end"]
        assert parse_utc_z(logged["start"]) >= held.granted_start
    finally:
        requester.close()


def test_a_window_narrowed_after_part_of_it_left_starts_a_new_delivery(env: Env, agents: list[Agent],
                                                                      write_config: Callable[[str], Path]) -> None:
    """Part of a delivery left before a restart; by the time the agent is back the rules allow less of the
    window (``max_age_s`` moved on). The sealed manifest describes the wider window: it is not resumed. A new
    delivery for the narrower window goes out under a new delivery id, and the log names the old one."""
    use_policy(env, write_config, max_age_s=55)
    requester = Agency(env, "requester-t11")
    try:
        agents.append(first := Agent(env))

        def stop_midway(event: str, job, details: dict) -> None:  # type: ignore[no-untyped-def]
            first.events.put((event, job.jti, details))
            if event == "handing" and details["chunk"] == 1:
                first.svc.stop()

        first.svc.delivery_events = stop_midway
        built = requester.request(window=long_window(env))
        requester.publish(built, [home_topic(env)])
        assert first.next_decision().reason == "granted"
        assert first.svc.wait(WAIT)
        old_id = json.loads((env.cfg.paths.data_dir / "outbox" / f"{built.jti}.job.json").read_text())["delivery_id"]

        later = env.clock.advance(10)  # footage older than later - 55 s is no longer shared
        agents.append(second := Agent(env))
        event, details = second.wait_delivery_end(built.jti)
        assert event == "delivered", details
        got = everything_received(env, requester, built.jti)
        complete = [p for p in got.pending.values() if p.complete and p.manifest]
        assert len(complete) == 1 and complete[0].delivery_id != old_id  # the old one stays incomplete
        claims = parse_compact(complete[0].manifest, typ=MANIFEST_TYP).claims
        assert claims["granted"]["start"] == format_utc(later - timedelta(seconds=55))
        assert details["delivery_id"] == complete[0].delivery_id and details["granted"][0] == later - timedelta(seconds=55)
        (old,) = details["superseded"]
        assert old["delivery_id"] == old_id and old["manifest_handed"] and old["chunks_handed"] >= 1
    finally:
        requester.close()


def test_a_window_narrowed_before_anything_left_keeps_its_delivery_id(env: Env, agents: list[Agent],
                                                                     write_config: Callable[[str], Path]) -> None:
    """Nothing of the delivery had left when the rules narrowed its window: it is cut and sealed again for the
    narrower window under the same delivery id (the one the grant's log entry names)."""
    use_policy(env, write_config, max_age_s=55)
    requester = Agency(env, "requester-t13")
    try:
        built = requester.request(window=long_window(env))
        first = in_process(env)
        try:
            assert first.handle(built.message.encode()).reason == "granted"
        finally:
            first.stop()
            assert first.wait(WAIT)
        with AccessLog(env.cfg.paths.state_db) as alog:
            logged_id = alog.entries(jti=built.jti)[0].data["delivery_id"]
        later = env.clock.advance(10)
        agents.append(agent := Agent(env))
        event, details = agent.wait_delivery_end(built.jti)
        assert event == "delivered", details
        (pending,) = everything_received(env, requester, built.jti).pending.values()
        claims = parse_compact(pending.manifest, typ=MANIFEST_TYP).claims
        assert claims["granted"]["start"] == format_utc(later - timedelta(seconds=55))
        assert pending.delivery_id == logged_id == details["delivery_id"] and "superseded" not in details
    finally:
        requester.close()
