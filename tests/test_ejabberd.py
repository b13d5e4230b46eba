"""The agent and the agency's reference client, unchanged, on ejabberd's MQTT 5 broker (mod_mqtt).

The same helpers as the Mosquitto tests (tests/test_service.py); only the broker
differs: TLS, users in ejabberd's own database, topic ACLs by identity
(docs/ejabberd/ejabberd.yml). What an agency's operator would check: a request
comes back as a delivery that opens and holds exactly the granted frames;
each role can do only its own half; a wrong password, no password or a
broker certificate from another CA gets nowhere; a request sent while the
agent was away is waiting when it returns, unless it expired first (and the
one ejabberd sends anyway is refused by the agent's own ``exp`` check).
docs/brokers.md says where ejabberd differs from Mosquitto.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import av
import pytest

from agent.buffer.capture.synthetic import read_qr_time
from agent.city import open_delivery
from agent.city.mqtt import BrokerSettings, MqttSession
from agent.errors import UserError
from agent.protocol.geohash import encode, request_topic
from agent.sharing.transport import MqttTransport
from agent.timeutil import parse_utc_z, to_us
from tests.broker import PeerClient
from tests.ejabberd import Ejabberd, ejabberd_node  # noqa: F401  (the fixture)
from tests.test_intake_faults import _connect_as
from tests.test_service import HOME, WAIT, Agency, Agent, Env, home_topic, log_reasons, make_env, stopped_afterwards

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path: Path, write_config: Callable[[str], Path], ejabberd_node: Ejabberd) -> Env:  # noqa: F811
    return make_env(tmp_path, write_config, ejabberd_node)


@pytest.fixture
def agents(env: Env) -> Iterator[list[Agent]]:
    yield from stopped_afterwards()


@pytest.fixture
def agency(env: Env) -> Iterator[Agency]:
    a = Agency(env, f"jpd-{env.client_id[-8:]}")
    yield a
    a.close()


def test_a_request_becomes_a_delivery_with_exactly_the_granted_frames(env: Env, agents: list[Agent], agency: Agency) -> None:
    agents.append(agent := Agent(env))
    built = agency.request()
    agency.publish(built)  # every cell the area touches; the agent hears its own
    decision = agent.next_decision()
    assert decision is not None and decision.reason == "granted"
    collector, _ = agency.collect(built.jti)
    (pending,) = [p for p in collector.pending.values() if p.complete]
    opened = open_delivery(pending.manifest, pending.chunks, built.recipient_private, built.jti)

    start, end = opened.granted
    clip = env.cfg.paths.data_dir / "received.mp4"
    clip.write_bytes(opened.clip)
    with av.open(str(clip)) as container:
        stamps = [read_qr_time(f.to_ndarray(format="bgr24")) for f in container.decode(video=0)]
    assert None not in stamps
    times = [to_us(parse_utc_z(s)) for s in stamps if s is not None]
    assert [t // 1000 for t in times] == [t // 1000 for t in env.frames_in(start, end)]
    assert agent.wait_delivery_end(built.jti)[0] == "delivered"
    assert log_reasons(env) == [(built.jti, "granted"), (built.jti, "delivered")]


def test_each_role_may_only_do_its_own_half_and_sessions_belong_to_their_login(env: Env, agents: list[Agent], agency: Agency) -> None:
    """ejabberd answers a forbidden PUBLISH with 0x90 "Topic Name invalid" and a forbidden SUBSCRIBE with
    0x8F "Topic Filter invalid" (Mosquitto: 0x87 "Not authorized"); both are failures, which is all the
    agent and the reference client look at."""
    agents.append(agent := Agent(env))
    root = env.broker.root
    # The agent may not publish a request (it could otherwise send requests to its neighbours).
    out = agent.transport.publish_outcome(home_topic(env), b"not a request", timeout=WAIT)
    assert not out.ok and out.reason_code == 0x90, out
    # The agency may not publish a delivery, nor listen to requests.
    with pytest.raises(UserError, match="refused the message"):
        agency.session.publish(f"{root}/v1/deliveries/forged-jti/forged/manifest", b"forged")
    with pytest.raises(UserError, match="refused the subscription"):
        agency.session.subscribe(f"{root}/v1/requests/#")
    # An agent may not listen to deliveries, nor to anything outside the deployment's root.
    with PeerClient(env.broker, "agent") as nosy:
        assert [rc.value for rc in nosy.subscribe(f"{root}/v1/deliveries/#")] == [0x8F]
        assert [rc.value for rc in nosy.subscribe("#")] == [0x8F]
    # ejabberd keys an MQTT session by user and client id: the agency logging in with the agent's client id
    # neither resumes the agent's session nor disconnects it (on Mosquitto the secret client id does that).
    assert _connect_as(env.broker, "agency", env.client_id) is False
    assert agent.transport.counters()["disconnects"] == 0 and agent.transport.ready
    # Nothing refused reached anybody: the first thing the agent decides is the next genuine request.
    built = agency.request()
    agency.publish(built, [home_topic(env)])
    decision = agent.next_decision()
    assert decision is not None and decision.reason == "granted" and decision.request is not None and decision.request.jti == built.jti
    agency.collect(built.jti)
    assert agent.wait_delivery_end(built.jti)[0] == "delivered"


def _refusal(broker: Ejabberd, **mqtt_overrides: object) -> str:
    """The agent's own words when the broker will not have it."""
    cfg = broker.mqtt_config("agent", **mqtt_overrides)
    transport = MqttTransport(cfg, lat=HOME[0], lon=HOME[1], reconnect_min_s=5, reconnect_max_s=5)
    transport.start()
    try:
        assert transport.wait_until(lambda t: t.last_error is not None, WAIT)
        assert not transport.ready
        return transport.last_error or ""
    finally:
        transport.stop()


def test_wrong_password_no_password_and_an_untrusted_broker_get_nowhere(ejabberd_node: Ejabberd) -> None:  # noqa: F811
    broker = ejabberd_node
    assert "Not authorized" in (err := _refusal(broker, password="not-the-password")) and "mqtt.password" in err
    assert "Not authorized" in _refusal(broker, username=None, password=None)  # ejabberd has no anonymous MQTT
    assert "does not trust" in _refusal(broker, ca_file=broker.wrong_ca_file)
    cred = broker.credentials["agency"]
    session = MqttSession(BrokerSettings(host=broker.host, port=broker.port, ca_file=broker.ca_file,
                                         username=cred.username, password="wrong"),
                          client_id="city-wrong-password", clean_start=True, session_expiry_s=0)
    with pytest.raises(UserError, match="refused the connection"):
        session.connect()


def test_requests_sent_while_the_agent_is_away_wait_in_its_session_unless_they_expire(
    env: Env, agents: list[Agent], agency: Agency
) -> None:
    """ejabberd keeps the session and queues for it; a queued message whose Message Expiry passed is dropped.

    One exception, in ejabberd 23.01 (and still in its master branch): the first message for an absent
    client becomes its "in flight" message, and that one is sent again on reconnect without looking at
    its expiry. The agent does not depend on the broker for this: it refuses a request past its own
    ``exp`` claim, whatever the transport did (docs/brokers.md).
    """
    agents.append(first := Agent(env))  # establishes the persistent session and its subscription
    first.stop()
    now = env.clock.now()
    stale = agency.request(issued=now - timedelta(minutes=20))  # its exp passed long ago
    agency.session.publish(home_topic(env), stale.message, expiry_s=1)
    short = agency.request()
    agency.session.publish(home_topic(env), short.message, expiry_s=1)  # Message Expiry Interval: 1 s
    far = agency.request(lat=HOME[0] + 0.045, lon=HOME[1])  # kept by the broker, refused by the resident's rules
    agency.session.publish(home_topic(env), far.message, expiry_s=600)
    _wait_seconds(2.2)  # ejabberd drops a queued message once its expiry passed, by its own clock

    agents.append(second := Agent(env))
    assert second.transport.session_present is True
    decisions = [second.next_decision() for _ in range(2)]
    got = [(d.request.jti if d and d.request else None, d.reason if d else None) for d in decisions]
    assert got == [(stale.jti, "expired"), (far.jti, "outside_geofence")]
    assert second.transport.wait_until(lambda t: t.queued == 0, WAIT)
    assert short.jti not in {jti for jti, _ in log_reasons(env)}


def _wait_seconds(seconds: float) -> None:
    """Let real time pass (message expiry is measured by the broker's clock; there is no event to await)."""
    threading.Event().wait(seconds)



def test_a_request_over_the_agreed_packet_size_is_dropped_and_the_next_one_still_arrives(
    ejabberd_node: Ejabberd,  # noqa: F811
) -> None:
    """ejabberd ignores the agent's Maximum Packet Size (20480 bytes) and, for a message the agent did not
    acknowledge, sends it again on every reconnect. The agent reads such a packet (up to its read limit,
    above ejabberd's 1 MiB max_payload_size), drops it as oversize and acknowledges it, instead of hanging
    up on it and hearing nothing else ever after."""
    broker = ejabberd_node
    dropped: list[str] = []
    cfg = broker.mqtt_config("agent", precision=4)
    transport = MqttTransport(cfg, lat=HOME[0], lon=HOME[1], on_dropped=lambda reason, _m: dropped.append(reason))
    transport.start()
    try:
        assert transport.wait_ready(WAIT), transport.last_error
        topic = request_topic(broker.root, encode(*HOME, 5))
        with PeerClient(broker, "agency") as agency:
            assert not agency.publish(topic, b"x" * 200_000).is_failure  # ejabberd accepts it and forwards it
            assert not agency.publish(topic, b"after the big one").is_failure
        msg = transport.get(timeout=WAIT)
        assert msg is not None and msg.payload == b"after the big one"
        c = transport.counters()
        assert (c["oversize"], c["packet_too_large"], c["disconnects"], c["received"]) == (1, 0, 0, 1)
        assert dropped == ["oversize"]
    finally:
        transport.stop()
