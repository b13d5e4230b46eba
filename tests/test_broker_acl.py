"""The broker configuration the project ships (docs/mosquitto/), run by a real Mosquitto.

The files are used as shipped: only ports, paths, certificates and the log
destination are changed to fit a test directory, and a ``user`` line keeps
Mosquitto from dropping to the ``mosquitto`` account. Each test asserts what a
client of the broker sees: the CONNACK, the PUBACK or SUBACK reason code, and
which messages reach a subscriber. A refused message is shown never to arrive by
publishing an allowed one after it to the same subscriber: Mosquitto routes in
order, so the allowed one arriving first and alone proves the refused one was
not delivered, without waiting for a timeout.
"""

from __future__ import annotations

import getpass
import queue
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.broker import MOSQUITTO, MOSQUITTO_PASSWD, free_ports, mint_pki

SHIPPED = Path(__file__).resolve().parents[1] / "docs" / "mosquitto"
ROOT = "civic/example-city"  # the root written in the shipped ACL files
REQUEST = f"{ROOT}/v1/requests/9/v/x/z/g"
# Mosquitto 2.0 answers every refused login (no credentials, a wrong password, a user from the
# other listener's password file) with CONNACK 0x87, and a refused QoS 1 publish with PUBACK 0x87.
NOT_AUTHORIZED = 0x87

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed (apt install mosquitto)")


@dataclass
class ShippedBroker:
    workdir: Path
    agent_port: int
    agency_port: int
    ca_file: Path
    passwords: dict[str, str]
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) >= 1, f"the shipped configuration no longer contains {old!r}; update this test"
    return text.replace(old, new)


def render_config(workdir: Path, agent_port: int, agency_port: int, server_cert: Path, server_key: Path, ca: Path) -> str:
    """The shipped mosquitto.conf with only ports, paths and certificates changed."""
    text = (SHIPPED / "mosquitto.conf").read_text()
    for old, new in [
        ("listener 8883\n", f"listener {agent_port} 127.0.0.1\n"),
        ("listener 8884\n", f"listener {agency_port} 127.0.0.1\n"),
        ("/etc/mosquitto/certs/server.pem", str(server_cert)),
        ("/etc/mosquitto/certs/server.key", str(server_key)),
        ("/etc/mosquitto/certs/ca.pem", str(ca)),
        ("/etc/mosquitto/doorbell/", f"{workdir}/"),
        ("/var/lib/mosquitto/", f"{workdir}/persist/"),
        ("log_dest syslog\n", f"log_dest file {workdir / 'mosquitto.log'}\n"),
    ]:
        text = _replace_once(text, old, new)
    settings = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert not [line for line in settings if "/etc/" in line or "/var/" in line]
    return f"user {getpass.getuser()}\n" + text


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedBroker]:
    w = tmp_path_factory.mktemp("shipped-broker")
    (w / "persist").mkdir()
    pki = mint_pki(w / "pki", client_names=())
    agent_port, agency_port = free_ports(2)
    (w / "mosquitto.conf").write_text(render_config(w, agent_port, agency_port, pki.server_cert, pki.server_key, pki.ca_file))
    for name in ("agents.acl", "agencies.acl"):
        shutil.copy(SHIPPED / name, w / name)
    passwords = {name: secrets.token_urlsafe(12) for name in ("agent-1", "agent-2", "agency-a", "agency-b")}
    for name, pw in passwords.items():
        pwfile = w / ("agents.passwd" if name.startswith("agent-") else "agencies.passwd")
        args = [MOSQUITTO_PASSWD, "-b"] + (["-c"] if not pwfile.exists() else []) + [str(pwfile), name, pw]
        subprocess.run(args, check=True, capture_output=True, timeout=30)
    with open(w / "stderr", "wb") as err:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(w / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=err)
    broker = ShippedBroker(w, agent_port, agency_port, pki.ca_file, passwords, proc)
    try:
        _wait_tls(broker, timeout=10)
        yield broker
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_tls(broker: ShippedBroker, timeout: float) -> None:
    ctx = ssl.create_default_context(cafile=str(broker.ca_file))
    deadline = time.monotonic() + timeout
    pending = {broker.agent_port, broker.agency_port}
    while pending:
        for port in list(pending):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, ctx.wrap_socket(raw, server_hostname="localhost"):
                    pending.discard(port)
            except OSError:
                pass
        if not pending:
            return
        if broker.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mosquitto did not start with the shipped configuration:\n"
                               f"{(broker.workdir / 'stderr').read_text(errors='replace')}\n{broker.log()}")
        try:
            broker.proc.wait(timeout=0.05)  # the pause between attempts; notices an early exit at once
        except subprocess.TimeoutExpired:
            pass


class Client:
    """A plain MQTT 5 client over TLS recording what the broker answers."""

    def __init__(self, broker: ShippedBroker, port: int, user: str | None, *, password: str | None = None,
                 client_id: str | None = None, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.disconnected = False
        self._acks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"acl-test-{secrets.token_hex(4)}",
                        protocol=mqtt.MQTTv5)
        c.tls_set_context(ssl.create_default_context(cafile=str(broker.ca_file)))
        if user is not None:
            c.username_pw_set(user, password if password is not None else broker.passwords[user])
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        c.reconnect_delay_set(60, 60)  # a refused client must not retry during the test
        self.client = c
        c.connect("localhost", port, keepalive=30, clean_start=True)
        c.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self.connack is not None or self.disconnected, timeout):
                self.close()
                raise TimeoutError(f"no CONNACK within {timeout} s")

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.disconnected = True
            if self.connack is None and rc.is_failure:
                self.connack = rc
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self._acks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        with self._cond:
            self._subacks[mid] = rcs
            self._cond.notify_all()

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1; the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1)
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._acks or self.disconnected, self.timeout):
                raise TimeoutError(f"no PUBACK for {topic} within {self.timeout} s")
            assert info.mid in self._acks, f"disconnected instead of a PUBACK for {topic}"
            return self._acks.pop(info.mid)

    def subscribe(self, topic_filter: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, self.timeout):
                raise TimeoutError(f"no SUBACK for {topic_filter} within {self.timeout} s")
            return self._subacks.pop(mid)

    def next_message(self) -> tuple[str, bytes]:
        try:
            return self.messages.get(timeout=self.timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {self.timeout} s") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(shipped: ShippedBroker) -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def agent(shipped: ShippedBroker, clients: list[Client], name: str = "agent-1") -> Client:
    c = Client(shipped, shipped.agent_port, name)
    clients.append(c)
    assert c.accepted, f"{name} was refused on the agents' listener: {c.connack}\n{shipped.log()}"
    return c


def agency(shipped: ShippedBroker, clients: list[Client], name: str = "agency-a") -> Client:
    c = Client(shipped, shipped.agency_port, name)
    clients.append(c)
    assert c.accepted, f"{name} was refused on the agencies' listener: {c.connack}\n{shipped.log()}"
    return c


def delivery_topic(jti: str) -> str:
    return f"{ROOT}/v1/deliveries/{jti}/{secrets.token_hex(8)}/manifest"


# -- who may connect -------------------------------------------------------------------------------


def test_a_client_without_credentials_is_refused_on_both_listeners(shipped: ShippedBroker, clients: list[Client]) -> None:
    for port in (shipped.agent_port, shipped.agency_port):
        c = Client(shipped, port, None)
        clients.append(c)
        assert not c.accepted and c.connack is not None and c.connack.value == NOT_AUTHORIZED, c.connack


def test_a_wrong_password_is_refused(shipped: ShippedBroker, clients: list[Client]) -> None:
    c = Client(shipped, shipped.agent_port, "agent-1", password="not-" + shipped.passwords["agent-1"])
    clients.append(c)
    assert not c.accepted and c.connack is not None and c.connack.value == NOT_AUTHORIZED, c.connack


def test_each_role_logs_in_only_on_its_own_listener(shipped: ShippedBroker, clients: list[Client]) -> None:
    on_agents = Client(shipped, shipped.agent_port, "agency-a")
    on_agencies = Client(shipped, shipped.agency_port, "agent-1")
    clients += [on_agents, on_agencies]
    for c in (on_agents, on_agencies):
        assert not c.accepted and c.connack is not None and c.connack.value == NOT_AUTHORIZED, c.connack


# -- what each role may publish and read ----------------------------------------------------------


def test_the_allowed_flow_works_request_to_agent_and_delivery_to_agency(shipped: ShippedBroker, clients: list[Client]) -> None:
    cam, city = agent(shipped, clients), agency(shipped, clients)
    jti = secrets.token_hex(8)
    assert not any(rc.is_failure for rc in cam.subscribe(f"{ROOT}/v1/requests/9/v/x/#"))
    assert not any(rc.is_failure for rc in city.subscribe(f"{ROOT}/v1/deliveries/{jti}/#"))
    assert city.publish(REQUEST, b"signed request").value == 0
    assert cam.next_message() == (REQUEST, b"signed request")
    topic = delivery_topic(jti)
    assert cam.publish(topic, b"sealed manifest").value == 0
    assert city.next_message() == (topic, b"sealed manifest")


def test_an_agency_cannot_publish_a_delivery(shipped: ShippedBroker, clients: list[Client]) -> None:
    cam, forger, requester = agent(shipped, clients), agency(shipped, clients, "agency-b"), agency(shipped, clients)
    jti = secrets.token_hex(8)
    requester.subscribe(f"{ROOT}/v1/deliveries/{jti}/#")
    forged = delivery_topic(jti)
    rc = forger.publish(forged, b"forged footage")
    # Mosquitto 2 answers a QoS 1 publish it refuses with PUBACK 0x87 and drops the message.
    assert rc.value == NOT_AUTHORIZED, rc
    genuine = delivery_topic(jti)
    assert cam.publish(genuine, b"real manifest").value == 0
    assert requester.next_message() == (genuine, b"real manifest")
    assert requester.messages.empty()


def test_an_agent_cannot_publish_a_request(shipped: ShippedBroker, clients: list[Client]) -> None:
    rogue, neighbour, city = agent(shipped, clients), agent(shipped, clients, "agent-2"), agency(shipped, clients)
    neighbour.subscribe(f"{ROOT}/v1/requests/#")
    rc = rogue.publish(REQUEST, b"forged request")
    assert rc.value == NOT_AUTHORIZED, rc
    assert city.publish(REQUEST, b"real request").value == 0
    assert neighbour.next_message() == (REQUEST, b"real request")
    assert neighbour.messages.empty()


def test_an_agent_cannot_read_deliveries(shipped: ShippedBroker, clients: list[Client]) -> None:
    cam, snoop, city = agent(shipped, clients), agent(shipped, clients, "agent-2"), agency(shipped, clients)
    jti = secrets.token_hex(8)
    codes = snoop.subscribe(f"{ROOT}/v1/deliveries/#")
    snoop.subscribe(f"{ROOT}/v1/requests/#")
    city.subscribe(f"{ROOT}/v1/deliveries/{jti}/#")
    topic = delivery_topic(jti)
    assert cam.publish(topic, b"another camera's footage").value == 0
    assert city.next_message() == (topic, b"another camera's footage")  # it was routed...
    assert city.publish(REQUEST, b"marker").value == 0
    # ...but not to the snooping agent, which sees only the request published after it.
    assert snoop.next_message() == (REQUEST, b"marker"), f"SUBACK was {codes}"
    assert snoop.messages.empty()


def test_an_agency_cannot_read_requests(shipped: ShippedBroker, clients: list[Client]) -> None:
    a, b, cam = agency(shipped, clients), agency(shipped, clients, "agency-b"), agent(shipped, clients)
    jti = secrets.token_hex(8)
    codes = b.subscribe(f"{ROOT}/v1/requests/#")
    b.subscribe(f"{ROOT}/v1/deliveries/{jti}/#")
    assert a.publish(REQUEST, b"agency a is looking here").value == 0
    topic = delivery_topic(jti)
    assert cam.publish(topic, b"marker").value == 0
    assert b.next_message() == (topic, b"marker"), f"SUBACK was {codes}"
    assert b.messages.empty()


def test_what_the_configuration_cannot_forbid_an_agency_reading_another_agencys_deliveries(
        shipped: ShippedBroker, clients: list[Client]) -> None:
    """Documented in agencies.acl: delivery topics name the request, not the agency. What a reader
    gets is ciphertext sealed to the requester (and the manifest's metadata); if the topic layout
    ever gains an agency level, this test must become a refusal."""
    cam, other = agent(shipped, clients), agency(shipped, clients, "agency-b")
    jti = secrets.token_hex(8)  # agency a's request
    assert not any(rc.is_failure for rc in other.subscribe(f"{ROOT}/v1/deliveries/{jti}/#"))
    topic = delivery_topic(jti)
    assert cam.publish(topic, b"sealed for agency a").value == 0
    assert other.next_message() == (topic, b"sealed for agency a")


def test_an_agent_cannot_take_over_an_agencys_session_by_its_client_id(shipped: ShippedBroker, clients: list[Client]) -> None:
    """An agency's client id, doorbell-city-<jti>, is in every request; on the agents' listener the
    broker uses the agent's user name as its client id instead, so the agency stays connected."""
    jti = secrets.token_hex(8)
    city = Client(shipped, shipped.agency_port, "agency-a", client_id=f"doorbell-city-{jti}")
    clients.append(city)
    assert city.accepted
    city.subscribe(f"{ROOT}/v1/deliveries/{jti}/#")
    rogue = Client(shipped, shipped.agent_port, "agent-2", client_id=f"doorbell-city-{jti}")
    clients.append(rogue)
    assert rogue.accepted
    topic = delivery_topic(jti)
    assert agent(shipped, clients).publish(topic, b"still connected").value == 0
    assert city.next_message() == (topic, b"still connected")
    assert not city.disconnected


def test_the_agent_receives_requests_and_keeps_its_session_on_the_shipped_broker(
        shipped: ShippedBroker, clients: list[Client], tmp_path: Path) -> None:
    """The agent's own MQTT transport, as `run` uses it, with its persistent session (which survives
    the broker replacing its client id by its user name)."""
    from agent.config import MqttConfig
    from agent.protocol import geohash
    from agent.sharing.transport import MqttTransport

    home = (32.29876, -90.18481)
    cfg = MqttConfig(host="localhost", port=shipped.agent_port, ca_file=shipped.ca_file, username="agent-1",
                     password=shipped.passwords["agent-1"], root=ROOT, client_id="doorbell-test-agent",
                     session_expiry_s=300, keepalive_s=5)
    topic = geohash.request_topic(ROOT, geohash.encode(*home, 5))
    city = agency(shipped, clients)
    for n, payload in enumerate((b"while online", b"while offline")):
        t = MqttTransport(cfg, lat=home[0], lon=home[1], inbox=tmp_path / "inbox.sqlite")
        try:
            t.start()
            assert t.wait_ready(10), f"transport not ready: {t.status()}"
            assert t.session_present is (n == 1)
            if n == 0:
                assert city.publish(topic, payload).value == 0
            msg = t.get(timeout=10)
            assert msg is not None and msg.payload == payload
            assert t.ack(msg)
        finally:
            t.stop()
        if n == 0:
            # Offline now: the request waits in the agent's session on the broker.
            assert city.publish(topic, b"while offline").value == 0
