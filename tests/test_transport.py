"""The agent's MQTT transport against a real Mosquitto 2 broker with TLS, passwords and ACLs."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.cli.run import intake_lines
from agent.config import MqttConfig
from agent.errors import UserError
from agent.protocol import geohash
from agent.sharing.transport import MAX_REQUEST_BYTES, ConnectionState, IncomingMessage, MqttTransport, default_client_id
from agent.state.devicekey import DeviceKey
from agent.state.inbox import Inbox, InboxMessage
from tests.broker import Broker, PeerClient

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


def test_publishes_with_and_without_properties_arrive_intact(broker: Broker, agency: PeerClient, make_transport) -> None:
    """The transport decodes a QoS 0 or 1 PUBLISH without properties itself (paho's decoder is slow); one
    with properties goes through paho's. Either way topic, payload, QoS and expiry arrive as sent."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    t = started(make_transport(broker.mqtt_config("agent", precision=5)))
    topic = cell_topic(broker, *HOME)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("k", "v")
    agency.client.publish(topic, b"qos 0, no properties", qos=0)
    assert not agency.publish(topic, b"qos 1, no properties").is_failure
    assert not agency.publish(topic, b"qos 1, expiry", expiry_s=600).is_failure
    assert not agency.wait_puback(agency.client.publish(topic, b"qos 1, user property", qos=1, properties=props).mid).is_failure
    got = [t.get(timeout=WAIT) for _ in range(4)]
    assert [(m.topic, m.payload, m.qos, m.expiry_s is not None) for m in got if m is not None] == [
        (topic, b"qos 0, no properties", 0, False), (topic, b"qos 1, no properties", 1, False),
        (topic, b"qos 1, expiry", 1, True), (topic, b"qos 1, user property", 1, False)]
    assert t.wait_until(lambda t: t.counters()["acked"] == 3, WAIT)  # QoS 0 needs none


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


def test_request_sent_while_offline_arrives_on_reconnect_and_undecided_waits_in_the_inbox(
    broker: Broker, agency: PeerClient, make_transport, tmp_path: Path
) -> None:
    cfg = broker.mqtt_config("agent")
    inbox = tmp_path / "inbox.sqlite"
    first = started(make_transport(cfg, inbox=inbox))
    assert first.session_present is False
    first.stop()

    assert not agency.publish(cell_topic(broker, *HOME), b"sent while offline").is_failure

    second = started(make_transport(cfg, inbox=inbox))
    assert second.session_present is True
    msg = second.get(timeout=WAIT)
    assert msg is not None and msg.payload == b"sent while offline" and msg.inbox_id > 0
    second.stop()  # "crash" before the decision was recorded: the message was acknowledged once stored

    third = started(make_transport(cfg, inbox=inbox))
    again = third.get(timeout=WAIT)  # from the inbox: the broker does not send it again
    assert again is not None and (again.payload, again.inbox_id) == (b"sent while offline", msg.inbox_id)
    assert third.counters()["received"] == 0
    assert third.ack(again)
    third.stop()  # the decided message is forgotten on the way out

    fourth = started(make_transport(cfg, inbox=inbox))
    assert not agency.publish(cell_topic(broker, *HOME), b"marker").is_failure
    nxt = fourth.get(timeout=WAIT)
    assert nxt is not None and nxt.payload == b"marker", "a decided request came back"


class StuckInbox(Inbox):
    """An inbox whose disk takes nothing (full, or failing) until ``heal`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.heal = threading.Event()
        self.attempts = threading.Semaphore(0)

    def commit(self, new: Sequence[InboxMessage], done: Collection[int] = ()) -> list[int | None]:
        if not self.heal.is_set():
            self.attempts.release()
            raise OSError(28, "No space left on device")
        return super().commit(new, done)


def test_a_message_is_acknowledged_only_once_it_is_on_disk(broker: Broker, agency: PeerClient, make_transport,
                                                           tmp_path: Path) -> None:
    """While the inbox cannot be written, nothing is acknowledged and paho's thread stays free; what the
    transport held when it stopped comes back from the broker to the next session."""
    cfg = broker.mqtt_config("agent")
    stuck = StuckInbox(tmp_path / "stuck.sqlite")
    t = started(make_transport(cfg, inbox=stuck))
    for i in range(3):
        assert not agency.publish(cell_topic(broker, *HOME), b"%d" % i).is_failure
    assert stuck.attempts.acquire(timeout=WAIT)  # the writer tried, and failed
    # paho's thread does no disk I/O: it still carries our own PUBLISH and its PUBACK.
    assert t.publish(f"{broker.root}/v1/deliveries/j/d/0", b"network thread is free", timeout=WAIT)
    assert t.wait_until(lambda t: t.queued == 3, WAIT), t.status()
    c = t.counters()
    assert (c["received"], c["acked"], c["inbox_errors"] > 0) == (0, 0, True)
    assert t.get(timeout=0.2) is None
    t.stop()  # e.g. the agent is restarted: nothing was acknowledged, so the broker kept all three

    again = started(make_transport(cfg, inbox=tmp_path / "inbox.sqlite"))
    got = [again.get(timeout=WAIT) for _ in range(3)]
    assert [m.payload for m in got if m is not None] == [b"0", b"1", b"2"]
    assert all(m is not None and m.dup for m in got)


def test_the_inbox_recovers_when_the_disk_does(broker: Broker, agency: PeerClient, make_transport,
                                               tmp_path: Path) -> None:
    stuck = StuckInbox(tmp_path / "stuck.sqlite")
    t = started(make_transport(broker.mqtt_config("agent"), inbox=stuck))
    assert not agency.publish(cell_topic(broker, *HOME), b"during the outage").is_failure
    assert stuck.attempts.acquire(timeout=WAIT)
    stuck.heal.set()  # space was freed: the same message is stored and then acknowledged
    msg = t.get(timeout=WAIT)
    assert msg is not None and msg.payload == b"during the outage"
    assert t.wait_until(lambda t: t.counters()["acked"] == 1, WAIT)


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


def test_flood_waits_in_the_inbox_when_the_worker_is_slow(
    broker: Broker, agency: PeerClient, make_transport
) -> None:
    """200 messages while the worker is busy: every one is stored in the inbox and acknowledged, none is
    dropped, the network thread stays free, and the worker then gets every message, in order, once.

    Before the inbox, a full in-memory queue dropped (and acknowledged) what did not fit, and with
    Mosquitto before 2.0.13 (Debian 12's 2.0.11), which overshoots Receive Maximum once messages
    are acknowledged, that happened without any flood. Now it must not happen on any broker.
    """
    dropped: list[tuple[str, object]] = []
    t = started(make_transport(broker.mqtt_config("agent"), receive_maximum=10,
                               on_dropped=lambda reason, msg: dropped.append((reason, msg))))
    topic = cell_topic(broker, *HOME)
    mids = [agency.publish_nowait(topic, b"%d" % i) for i in range(200)]  # message 0: the request before the flood
    for mid in mids:
        agency.wait_puback(mid)
    assert t.publish(f"{broker.root}/v1/deliveries/j/d/0", b"network thread is free", timeout=WAIT)
    assert t.wait_until(lambda t: t.counters()["received"] == 200, WAIT), t.status()
    assert t.queued == 200 and t.counters()["acked"] == 200

    seen: list[int] = []
    while len(seen) < 200:
        msg = t.get(timeout=WAIT)
        assert msg is not None, f"{len(seen)} of 200: {t.status()}"
        seen.append(int(msg.payload))
        assert t.ack(msg)
    assert seen == list(range(200)), "lost, out of order or delivered twice"
    assert t.get(timeout=0.2) is None
    assert dropped == []
    c = t.counters()
    assert (c["inbox_full"], c["inbox_unwritable"], c["ack_skipped"], c["done"]) == (0, 0, 0, 200)
    assert t.wait_until(lambda t: t.queued == 0, WAIT), t.status()  # the decided messages are forgotten


def test_full_inbox_drops_counts_shows_it_and_does_not_block(broker: Broker, agency: PeerClient, make_transport,
                                                             tmp_path: Path) -> None:
    """Only when the inbox holds its bound is a message dropped: acknowledged (so it cannot pin the broker's
    in-flight window), counted, and shown by ``doorbell-agent status``."""
    inbox = Inbox(tmp_path / "inbox.sqlite", max_messages=5)
    t = started(make_transport(broker.mqtt_config("agent"), inbox=inbox, receive_maximum=1000))
    topic = cell_topic(broker, *HOME)
    mids = [agency.publish_nowait(topic, b"%d" % i) for i in range(100)]
    for mid in mids:
        agency.wait_puback(mid)
    assert t.wait_until(lambda t: t.counters()["received"] + t.counters()["inbox_full"] == 100, WAIT)
    c = t.counters()
    assert (c["received"], c["inbox_full"], c["acked"], t.queued) == (5, 95, 100, 5)
    assert t.publish(f"{broker.root}/v1/deliveries/j/d/0", b"still publishing", timeout=WAIT)
    status = t.status()
    assert status["inbox"]["messages"] == 5 and status["counters"]["inbox_full"] == 95
    assert any("95 dropped because the inbox was full" in line for line in intake_lines(status))
    # The first five are kept, in order; once decided they make room again.
    first = [t.get(timeout=WAIT) for _ in range(5)]
    assert [m.payload for m in first if m is not None] == [b"0", b"1", b"2", b"3", b"4"]
    for m in first:
        assert m is not None and t.ack(m)
    assert t.wait_until(lambda t: t.queued == 0, WAIT)
    assert not agency.publish(topic, b"after the flood").is_failure
    later = t.get(timeout=WAIT)
    assert later is not None and later.payload == b"after the flood"


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


def test_default_client_id_is_stable_follows_the_filter_and_cannot_be_derived(tmp_path: Path) -> None:
    """Stable across restarts (the session hangs on it), new for a new filter, and not computable from the
    kid (in every manifest) and the filter (from the request area) without the device's secret."""
    key = DeviceKey.load_or_create(tmp_path / "device-key.pem")
    flt = "civic/x/v1/requests/9/v/x/z/#"
    a = default_client_id(key.kid, flt, key.client_id_secret())
    reloaded = DeviceKey.load(tmp_path / "device-key.pem")
    assert a == default_client_id(reloaded.kid, flt, reloaded.client_id_secret())
    assert a != default_client_id(key.kid, "civic/x/v1/requests/9/v/x/#", key.client_id_secret())
    assert a.startswith("doorbell-" + key.kid[:6] + "-") and len(a) <= 32
    other = DeviceKey.generate()
    assert default_client_id(key.kid, flt, other.client_id_secret()) != a
    assert key.client_id_secret() != other.client_id_secret() and len(key.client_id_secret()) == 32
