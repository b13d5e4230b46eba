"""The agent's MQTT transport against a real Mosquitto 2 broker with TLS, passwords and ACLs."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.protocol import geohash
from agent.config import MqttConfig
from agent.errors import UserError
from agent.sharing.transport import MAX_REQUEST_BYTES, ConnectionState, IncomingMessage, MqttTransport, default_client_id
from tests.broker import MOSQUITTO, Broker, PeerClient

HOME = (32.29876, -90.18481)  # Jackson, MS
FAR = (40.71280, -74.00600)  # New York
WAIT = 10.0


def cell_topic(b: Broker, lat: float, lon: float) -> str:
    return geohash.request_topic(b.root, geohash.encode(lat, lon, 5))


@pytest.fixture
def make_transport() -> Iterator:
    made: list[MqttTransport] = []

    def make(cfg: MqttConfig, **kw: object) -> MqttTransport:
        t = MqttTransport(cfg, lat=HOME[0], lon=HOME[1], **kw)  # type: ignore[arg-type]
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


@pytest.fixture
def agency(broker: Broker) -> Iterator[PeerClient]:
    with PeerClient(broker, "agency") as p:
        yield p


def started(t: MqttTransport) -> MqttTransport:
    t.start()
    assert t.wait_ready(WAIT), f"transport not ready: {t.status()}"
    return t


def test_receives_own_cell_not_a_far_one(broker: Broker, agency: PeerClient, make_transport) -> None:
    t = started(make_transport(broker.mqtt_config("agent", precision=5)))
    assert t.subscription == f"{broker.root}/v1/requests/" + "/".join(geohash.encode(*HOME, 5)) + "/#"
    assert not t.plaintext and t.state is ConnectionState.CONNECTED

    assert not agency.publish(cell_topic(broker, *FAR), b"far away").is_failure
    assert not agency.publish(cell_topic(broker, *HOME), b"for this cell", expiry_s=600).is_failure

    msg = t.get(timeout=WAIT)
    assert isinstance(msg, IncomingMessage)
    # Mosquitto forwards one publisher's messages in order: had the far one been routed here, it came first.
    assert (msg.topic, msg.payload) == (cell_topic(broker, *HOME), b"for this cell")
    assert msg.qos == 1 and 0 < (msg.expiry_s or 0) <= 600
    assert t.ack(msg)
    assert t.get(timeout=0) is None
    assert t.counters()["received"] == 1


def test_wrong_ca_is_refused_with_a_clear_error(broker: Broker, make_transport) -> None:
    t = make_transport(broker.mqtt_config("agent", ca_file=broker.wrong_ca_file))
    t.start()
    assert t.wait_until(lambda t: t.last_error is not None, WAIT)
    assert "does not trust" in t.last_error and "mqtt.ca_file" in t.last_error
    assert any(why in t.last_error for why in ("self-signed certificate", "unable to get local issuer"))
    assert t.state is ConnectionState.DISCONNECTED and not t.ready
    assert t.counters()["connects"] == 0


def test_wrong_password_is_refused_with_a_clear_error(broker: Broker, make_transport) -> None:
    t = make_transport(broker.mqtt_config("agent", password="not-the-password"))
    t.start()
    assert t.wait_until(lambda t: t.last_error is not None, WAIT)
    assert "refused the connection" in t.last_error and "mqtt.password" in t.last_error
    assert t.counters()["connects"] == 0


def test_plaintext_only_when_explicitly_allowed(broker: Broker, make_transport) -> None:
    with pytest.raises(ValidationError, match="allow_plaintext"):
        MqttConfig(host=broker.host, port=broker.plain_port, tls=False)
    sneaky = MqttConfig.model_construct(**{**broker.mqtt_config("agent").model_dump(), "tls": False})
    with pytest.raises(UserError, match="allow_plaintext"):
        MqttTransport(sneaky, lat=HOME[0], lon=HOME[1])

    # TLS settings pointed at a plain listener fail instead of falling back.
    tls_to_plain = make_transport(broker.mqtt_config("agent", port=broker.plain_port))
    tls_to_plain.start()
    assert tls_to_plain.wait_until(lambda t: t.last_error is not None, WAIT)
    assert tls_to_plain.counters()["connects"] == 0

    t = started(make_transport(broker.mqtt_config("agent", plaintext=True)))
    assert t.plaintext and t.status()["plaintext"] is True


def test_acl_agent_reads_requests_writes_deliveries_only(broker: Broker, agency: PeerClient, make_transport) -> None:
    t = started(make_transport(broker.mqtt_config("agent")))
    request_topic = cell_topic(broker, *HOME)
    delivery_topic = f"{broker.root}/v1/deliveries/{secrets.token_urlsafe(16)}/d1/manifest"

    refused = t.publish_outcome(request_topic, b"forged request", timeout=WAIT)
    assert not refused.ok and refused.reason == "Not authorized" and refused.reason_code == 0x87
    assert t.publish(delivery_topic, b"manifest", timeout=WAIT)

    assert str(agency.publish(delivery_topic, b"forged delivery")) == "Not authorized"
    assert not agency.publish(request_topic, b"request").is_failure

    # Mosquitto grants the SUBSCRIBE but never forwards what the ACL does not let a user read.
    agency.subscribe(f"{broker.root}/v1/requests/#")
    agency.subscribe(f"{broker.root}/v1/deliveries/#")
    assert not agency.publish(request_topic, b"agency reading requests").is_failure
    assert t.publish(delivery_topic, b"chunk", timeout=WAIT)
    got = agency.messages.get(timeout=WAIT)
    assert (got.topic, got.payload) == (delivery_topic, b"chunk")
    assert agency.messages.empty()

    c = t.counters()
    assert (c["published"], c["publish_failed"]) == (2, 1)


def test_request_sent_while_offline_arrives_on_reconnect_and_unacked_is_redelivered(
    broker: Broker, agency: PeerClient, make_transport
) -> None:
    cfg = broker.mqtt_config("agent")
    first = started(make_transport(cfg))
    assert first.session_present is False
    first.stop()

    assert not agency.publish(cell_topic(broker, *HOME), b"sent while offline").is_failure

    second = started(make_transport(cfg))
    assert second.session_present is True
    msg = second.get(timeout=WAIT)
    assert msg is not None and msg.payload == b"sent while offline"
    second.stop()  # "crash" before the decision was recorded: no PUBACK went out

    third = started(make_transport(cfg))
    again = third.get(timeout=WAIT)
    assert again is not None and again.payload == b"sent while offline" and again.dup
    assert third.ack(again)
    third.stop()

    fourth = started(make_transport(cfg))
    assert not agency.publish(cell_topic(broker, *HOME), b"marker").is_failure
    nxt = fourth.get(timeout=WAIT)
    assert nxt is not None and nxt.payload == b"marker", "an acknowledged request came back"


def test_request_that_expires_while_offline_is_not_delivered(
    broker: Broker, agency: PeerClient, make_transport
) -> None:
    cfg = broker.mqtt_config("agent")
    started(make_transport(cfg)).stop()
    assert not agency.publish(cell_topic(broker, *HOME), b"expires", expiry_s=1).is_failure
    assert not agency.publish(cell_topic(broker, *HOME), b"lasts", expiry_s=600).is_failure
    time.sleep(2.1)  # the passage of time is the point: the first message's expiry interval runs out
    t = started(make_transport(cfg))
    msg = t.get(timeout=WAIT)
    assert msg is not None and msg.payload == b"lasts"
    assert t.get(timeout=0) is None


def test_session_survives_a_broker_restart(broker: Broker, agency: PeerClient, make_transport) -> None:
    cfg = broker.mqtt_config("agent")
    started(make_transport(cfg)).stop()
    agency.close()
    broker.restart()
    with PeerClient(broker, "agency") as again:
        assert not again.publish(cell_topic(broker, *HOME), b"after restart").is_failure
    t = started(make_transport(cfg))
    assert t.session_present is True
    msg = t.get(timeout=WAIT)
    assert msg is not None and msg.payload == b"after restart"


def test_oversize_is_counted_and_dropped_unread(broker: Broker, agency: PeerClient, make_transport) -> None:
    dropped: list[tuple[str, object]] = []
    t = started(make_transport(broker.mqtt_config("agent"), on_dropped=lambda r, m: dropped.append((r, m))))
    topic = cell_topic(broker, *HOME)
    agency.publish(topic, b"x" * (MAX_REQUEST_BYTES + 1))
    agency.publish(topic, b"y" * 200_000)  # beyond our Maximum Packet Size: the broker never sends it
    agency.publish(topic, b"z" * MAX_REQUEST_BYTES)

    msg = t.get(timeout=WAIT)
    assert msg is not None and msg.payload == b"z" * MAX_REQUEST_BYTES
    c = t.counters()
    assert (c["oversize"], c["received"]) == (1, 1)
    assert dropped == [("oversize", None)]


def broker_overshoots_receive_maximum() -> bool:
    """Mosquitto before 2.0.13 lets up to Receive Maximum more messages out on every PUBACK for the
    oldest message in flight (eclipse/mosquitto#2306), so a client acknowledging a flood one by one is
    sent far more than it asked for. Debian 12 ships 2.0.11."""
    out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"mosquitto version (\d+)\.(\d+)\.(\d+)", out)
    return m is None or tuple(int(g) for g in m.groups()) < (2, 0, 13)


def test_flood_waits_in_the_broker_when_the_worker_is_slow(
    broker: Broker, agency: PeerClient, make_transport
) -> None:
    """200 messages while the worker is busy: the broker holds all but Receive Maximum of them, the
    network thread stays free, and the worker then gets every message, in order, except those the
    transport dropped with its queue full; each of those is counted and reported, none is lost
    silently or delivered twice, and a request that arrived before the flood is never pushed out.

    With a broker that keeps to Receive Maximum nothing is dropped at all. Mosquitto before 2.0.13
    does not once the worker acknowledges (see broker_overshoots_receive_maximum), so there a slow
    worker may see drops; they must still all be accounted for.
    """
    dropped: list[tuple[str, int]] = []
    t = started(make_transport(broker.mqtt_config("agent"), queue_size=40,
                               on_dropped=lambda reason, msg: dropped.append((reason, int(msg.payload)))))
    topic = cell_topic(broker, *HOME)
    mids = [agency.publish_nowait(topic, b"%d" % i) for i in range(200)]  # message 0: the request before the flood
    for mid in mids:
        agency.wait_puback(mid)
    # The broker answers our PUBLISH after the messages it sent us before it: once the PUBACK is in,
    # everything it let out has arrived. Receive Maximum (queue size / 4) kept the rest back.
    assert t.publish(f"{broker.root}/v1/deliveries/j/d/0", b"network thread is free", timeout=WAIT)
    assert (t.counters()["received"], t.queued) == (10, 10)

    seen: list[int] = []
    while len(seen) < t.counters()["received"] or len(seen) + len(dropped) < 200:
        msg = t.get(timeout=WAIT)
        assert msg is not None, f"{len(seen)} received and {len(dropped)} dropped of 200: {t.status()}"
        seen.append(int(msg.payload))
        assert t.ack(msg)
    assert seen == sorted(set(seen)), "delivered out of order or twice"
    assert sorted(seen + [n for _, n in dropped]) == list(range(200)), "a message was lost or duplicated"
    assert seen[0] == 0
    assert {reason for reason, _ in dropped} <= {"queue_full"}
    # The network thread counts a message just after queueing it: wait for the last count to land.
    assert t.wait_until(lambda t: (t.counters()["received"], t.counters()["acked"], t.counters()["queue_full"])
                        == (len(seen), len(seen), len(dropped)), WAIT), t.counters()
    if not broker_overshoots_receive_maximum():
        assert dropped == []


def test_full_queue_drops_and_counts_without_blocking(broker: Broker, agency: PeerClient, make_transport) -> None:
    t = started(make_transport(broker.mqtt_config("agent"), queue_size=5, receive_maximum=1000))
    topic = cell_topic(broker, *HOME)
    mids = [agency.publish_nowait(topic, b"%d" % i) for i in range(100)]
    for mid in mids:
        agency.wait_puback(mid)
    assert t.wait_until(lambda t: t.counters()["received"] + t.counters()["queue_full"] == 100, WAIT)
    assert (t.counters()["received"], t.counters()["queue_full"], t.queued) == (5, 95, 5)
    assert t.publish(f"{broker.root}/v1/deliveries/j/d/0", b"still publishing", timeout=WAIT)


@pytest.mark.slow
def test_publish_reports_failure_when_the_broker_is_down_then_recovers(
    broker: Broker, make_transport
) -> None:
    t = started(make_transport(broker.mqtt_config("agent")))
    broker.stop()
    assert t.wait_until(lambda t: t.state is ConnectionState.DISCONNECTED, WAIT)
    began = time.monotonic()
    outcome = t.publish_outcome(f"{broker.root}/v1/deliveries/j/d/manifest", b"m", timeout=1.0)
    assert not outcome.ok and "no PUBACK" in outcome.reason and "not connected" in outcome.reason
    assert time.monotonic() - began < 3
    broker.start()
    assert t.wait_ready(WAIT + 60), t.status()
    assert t.publish(f"{broker.root}/v1/deliveries/j/d/manifest", b"m", timeout=WAIT)
    assert t.counters()["disconnects"] == 1 and t.counters()["connects"] == 2


def test_changed_location_takes_effect_with_a_fixed_client_id(broker: Broker, agency: PeerClient,
                                                              tmp_path: Path) -> None:
    """The camera moves but keeps its client id: it hears its new cell, and no longer its old one,
    although the broker resumes the session that was subscribed to the old cell."""
    cfg = broker.mqtt_config("agent", precision=5)
    session_file = tmp_path / "mqtt-session.json"
    with MqttTransport(cfg, lat=HOME[0], lon=HOME[1], session_file=session_file) as before:
        assert before.wait_ready(WAIT)
    with MqttTransport(cfg, lat=FAR[0], lon=FAR[1], session_file=session_file) as moved:
        assert moved.wait_ready(WAIT) and moved.session_present is True
        assert not agency.publish(cell_topic(broker, *HOME), b"old cell").is_failure
        assert not agency.publish(cell_topic(broker, *FAR), b"new cell").is_failure
        # Mosquitto forwards one publisher's messages in order: had the old cell been routed here, it came first.
        msg = moved.get(timeout=WAIT)
        assert msg is not None and msg.payload == b"new cell"
        assert moved.get(timeout=0) is None and moved.counters()["received"] == 1
    assert json.loads(session_file.read_text())["filters"] == [moved.subscription]
    assert session_file.stat().st_mode & 0o077 == 0


def test_default_client_id_is_stable_and_follows_the_filter() -> None:
    kid = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    a = default_client_id(kid, "civic/x/v1/requests/9/v/x/z/#")
    assert a == default_client_id(kid, "civic/x/v1/requests/9/v/x/z/#")
    assert a != default_client_id(kid, "civic/x/v1/requests/9/v/x/#")
    assert a.startswith("doorbell-NzbLsXh8uDCcd-6M") and len(a) <= 32
