"""Home Assistant by MQTT discovery, on a homeowner's broker: a second real Mosquitto with a password.

The other side is a plain paho client subscribed the way Home Assistant's MQTT integration is (to
``homeassistant/#`` for discovery and to the topics the discovery messages name); the checks read
the JSON fields Home Assistant reads. The kill switch is engaged from Home Assistant and checked on
disk and in the access log; an OFF is refused; the sensors follow a request the real sharing service
holds for approval.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import queue
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import AgentConfig, ClockConfig, HomeAssistantConfig, load_config
from agent.homeowner import HomeownerComponent, start_homeowner
from agent.homeowner.homeassistant import HomeAssistantLink
from agent.runtime.controls import set_kill_switch
from agent.state.accesslog import AccessLog
from agent.state.killswitch import KillSwitch
from tests.broker import MOSQUITTO, MOSQUITTO_PASSWD, Broker, free_ports
from tests.mqtt_proxy import MqttProxy
from tests.test_webhook import assert_no_location, policy_toml

WAIT = 20.0
NODE = "doorbell_agent"
PREFIX = "homeassistant"


@dataclass
class HomeBroker:
    """The homeowner's own Mosquitto (as the Home Assistant add-on runs it): plain MQTT, one user."""

    port: int
    username: str
    password: str
    proc: subprocess.Popen[bytes]
    log_file: Path

    def config(self, **overrides: Any) -> HomeAssistantConfig:
        values: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "username": self.username,
                                  "password": self.password}
        values.update(overrides)
        return HomeAssistantConfig(**values)


@pytest.fixture(scope="module")
def home_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeBroker]:
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.fail(f"{MOSQUITTO} is not installed; these tests need a real Mosquitto 2.x broker")
    d = tmp_path_factory.mktemp("ha-mosquitto")
    (port,) = free_ports(1)
    user, password = "homeassistant", secrets.token_urlsafe(12)
    (d / "passwd").touch(mode=0o600)
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(d / "passwd"), user, password], check=True, capture_output=True, timeout=30)
    (d / "mosquitto.conf").write_text(
        f"user {getpass.getuser()}\npersistence false\nlog_dest file {d / 'mosquitto.log'}\nlog_type all\n"
        f"allow_anonymous false\npassword_file {d / 'passwd'}\nlistener {port} 127.0.0.1\n"
    )
    proc = subprocess.Popen([MOSQUITTO, "-c", str(d / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the homeowner's mosquitto did not start"
            try:
                proc.wait(0.05)  # the pause between attempts; notices an early exit at once
            except subprocess.TimeoutExpired:
                pass
    yield HomeBroker(port, user, password, proc, d / "mosquitto.log")
    proc.terminate()
    proc.wait(10)


class HomeAssistantSide:
    """What Home Assistant's MQTT integration does: subscribe to discovery and to the named topics."""

    def __init__(self, hb: HomeBroker) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.all: list[mqtt.MQTTMessage] = []
        self.latest: dict[str, mqtt.MQTTMessage] = {}
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ha-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5)
        c.username_pw_set(hb.username, hb.password)
        c.on_message = lambda _c, _u, m: self.messages.put(m)
        c.connect("127.0.0.1", hb.port, keepalive=10, clean_start=True)
        c.loop_start()
        # Retain As Published (MQTT 5): the retain flag is kept on messages that arrive live as well, not only on
        # those the broker replays at subscription; the agent may publish discovery before or after this subscribes.
        keep = SubscribeOptions(qos=1, retainAsPublished=True)
        c.subscribe([(f"{PREFIX}/#", keep), (f"{NODE}/#", keep)])
        self.client = c

    def wait(self, topic: str, pred: Callable[[mqtt.MQTTMessage], bool] = lambda m: True,
             timeout: float = WAIT, *, new: bool = False) -> mqtt.MQTTMessage:
        """The latest message on ``topic`` if it matches (unless ``new``), else the next one that does."""
        if not new and topic in self.latest and pred(self.latest[topic]):
            return self.latest[topic]
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"nothing matching on {topic}; latest: {self.latest.get(topic) and self.latest[topic].payload!r}"
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            self.all.append(m)
            self.latest[m.topic] = m
            if m.topic == topic and pred(m):
                return m

    def config(self, component: str, obj: str) -> dict[str, Any]:
        msg = self.wait(f"{PREFIX}/{component}/{NODE}/{obj}/config")
        assert msg.retain, "discovery messages are retained, so Home Assistant finds them after a restart"
        return json.loads(msg.payload)

    def command(self, topic: str, payload: str, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ha_side(home_broker: HomeBroker) -> Iterator[HomeAssistantSide]:
    side = HomeAssistantSide(home_broker)
    yield side
    side.close()


def clear_retained(hb: HomeBroker) -> None:
    """Each test starts as a fresh Home Assistant install would: nothing retained from a previous test."""
    side = HomeAssistantSide(hb)
    try:
        for topic in [f"{PREFIX}/{c}/{NODE}/{o}/config" for c, o in (("switch", "killswitch"), ("sensor", "last_request"),
                                                                     ("sensor", "pending_approvals"))] + \
                     [f"{NODE}/{t}" for t in ("availability", "killswitch/state", "last_request/state",
                                              "last_request/attributes", "pending_approvals/state")]:
            side.command(topic, "", retain=True)
    finally:
        side.close()


@pytest.fixture
def cfg(write_config: Callable[[str], Path], home_broker: HomeBroker) -> AgentConfig:
    clear_retained(home_broker)
    c = load_config(write_config(policy_toml()))
    c.paths.data_dir.mkdir(parents=True)
    return c.model_copy(update={"home_assistant": home_broker.config()})


@pytest.fixture
def running(cfg: AgentConfig) -> Iterator[HomeownerComponent]:
    comp = start_homeowner(cfg, poll_s=0.1)
    assert comp is not None
    yield comp
    comp.stop()
    assert comp.wait(WAIT)


def link_of(comp: HomeownerComponent) -> HomeAssistantLink:
    (link,) = [p for p in comp.parts if isinstance(p, HomeAssistantLink)]
    return link


def test_discovery_as_home_assistant_reads_it(cfg: AgentConfig, running: HomeownerComponent,
                                              ha_side: HomeAssistantSide) -> None:
    switch = ha_side.config("switch", "killswitch")
    last = ha_side.config("sensor", "last_request")
    pending = ha_side.config("sensor", "pending_approvals")
    for entity in (switch, last, pending):
        assert entity["availability_topic"] == f"{NODE}/availability"
        assert (entity["payload_available"], entity["payload_not_available"]) == ("online", "offline")
        assert entity["device"]["identifiers"] == [f"doorbell_agent_{NODE}"]
        assert entity["device"]["name"] == "Doorbell agent"
        assert entity["unique_id"].startswith(NODE + "_")
    assert len({e["unique_id"] for e in (switch, last, pending)}) == 3
    assert switch["name"] == "Kill switch"
    assert switch["command_topic"] == f"{NODE}/killswitch/set" and switch["state_topic"] == f"{NODE}/killswitch/state"
    assert (switch["payload_on"], switch["payload_off"]) == ("ON", "OFF")
    assert (switch["state_on"], switch["state_off"]) == ("ON", "OFF")
    assert last["state_topic"] == f"{NODE}/last_request/state"
    assert last["json_attributes_topic"] == f"{NODE}/last_request/attributes"
    assert pending["state_topic"] == f"{NODE}/pending_approvals/state" and pending["state_class"] == "measurement"

    avail = ha_side.wait(f"{NODE}/availability", lambda m: m.payload == b"online")
    assert avail.retain
    assert ha_side.wait(switch["state_topic"]).payload == b"OFF"
    assert ha_side.wait(pending["state_topic"]).payload == b"0"
    assert ha_side.wait(last["state_topic"]).payload == b"none"
    for m in ha_side.all:
        assert_no_location(m.topic + m.payload.decode("utf-8", "replace"), cfg)


def test_home_assistant_engages_the_switch_and_cannot_release_it(cfg: AgentConfig, running: HomeownerComponent,
                                                                 ha_side: HomeAssistantSide, home_broker: HomeBroker,
                                                                 caplog) -> None:
    caplog.set_level(logging.INFO, logger="agent.homeowner.homeassistant")
    ha_side.wait(f"{NODE}/availability", lambda m: m.payload == b"online")
    state_topic, command_topic = f"{NODE}/killswitch/state", f"{NODE}/killswitch/set"
    ha_side.wait(state_topic, lambda m: m.payload == b"OFF")

    ha_side.command(command_topic, "ON")
    ha_side.wait(state_topic, lambda m: m.payload == b"ON")
    state = KillSwitch(cfg.paths.killswitch_file).state()
    assert state.engaged and state.by == "homeowner (Home Assistant)"
    with AccessLog(cfg.paths.state_db) as alog:
        (entry,) = [e for e in alog.entries() if e.type == "resident"]
    assert entry.outcome == "killswitch_on" and entry.data["by"] == "homeowner (Home Assistant)"

    link = link_of(running)
    ha_side.command(command_topic, "OFF")
    deadline = time.monotonic() + WAIT
    while link.refused_off < 1:
        assert time.monotonic() < deadline, "the OFF command was never handled"
        time.sleep(0.05)  # the refusal changes nothing Home Assistant can see but the state it republishes
    fresh = HomeAssistantSide(home_broker)  # what the broker holds now, as a dashboard opened now sees it
    try:
        assert fresh.wait(state_topic).payload == b"ON", "the refused OFF leaves the state ON"
    finally:
        fresh.close()
    assert KillSwitch(cfg.paths.killswitch_file).state().engaged
    with AccessLog(cfg.paths.state_db) as alog:
        assert [e.outcome for e in alog.entries() if e.type == "resident"] == ["killswitch_on"]
    assert "asked to turn the kill switch OFF: refused" in caplog.text

    # The homeowner releases it on the command line (another process): Home Assistant follows.
    set_kill_switch(cfg, False, by="homeowner (command line)")
    ha_side.wait(state_topic, lambda m: m.payload == b"OFF")


def test_a_retained_command_does_not_act(cfg: AgentConfig, ha_side: HomeAssistantSide, caplog) -> None:
    """A command stored on the broker reaches the agent at every (re)connection: it must not act then."""
    caplog.set_level(logging.WARNING, logger="agent.homeowner.homeassistant")
    ha_side.command(f"{NODE}/killswitch/set", "ON", retain=True)  # left behind on the broker
    comp = start_homeowner(cfg, poll_s=0.1)
    assert comp is not None
    try:
        ha_side.wait(f"{NODE}/availability", lambda m: m.payload == b"online")
        deadline = time.monotonic() + WAIT
        while "ignored a retained kill-switch command" not in caplog.text:
            assert time.monotonic() < deadline, "the retained command was not seen"
            time.sleep(0.05)  # the log line is the only sign of a command that did nothing
        assert not KillSwitch(cfg.paths.killswitch_file).state().engaged
        assert ha_side.wait(f"{NODE}/killswitch/state").payload == b"OFF"
    finally:
        comp.stop()
        assert comp.wait(WAIT)
        ha_side.command(f"{NODE}/killswitch/set", "", retain=True)


def test_availability_goes_offline_on_a_lost_connection_and_a_stop(cfg: AgentConfig, home_broker: HomeBroker,
                                                                   ha_side: HomeAssistantSide) -> None:
    proxy = MqttProxy(home_broker.port)
    proxy.accept()
    cfg = cfg.model_copy(update={"home_assistant": home_broker.config(port=proxy.port)})
    comp = start_homeowner(cfg, poll_s=0.1)
    assert comp is not None
    avail = f"{NODE}/availability"
    try:
        ha_side.wait(avail, lambda m: m.payload == b"online")
        proxy.cut()  # the link dies without a DISCONNECT: the broker publishes the will
        ha_side.wait(avail, lambda m: m.payload == b"offline")
        ha_side.wait(avail, lambda m: m.payload == b"online")  # reconnected, announced again
    finally:
        comp.stop()
        assert comp.wait(WAIT)
        proxy.close()
    ha_side.wait(avail, lambda m: m.payload == b"offline", new=True)
    later = HomeAssistantSide(home_broker)  # Home Assistant starting afterwards: told by the retained message
    try:
        stored = later.wait(avail)
        assert stored.payload == b"offline" and stored.retain
    finally:
        later.close()


def test_wrong_password_is_a_log_line_and_the_rest_runs(cfg: AgentConfig, home_broker: HomeBroker, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.homeowner.homeassistant")
    cfg = cfg.model_copy(update={"home_assistant": home_broker.config(password="wrong")})
    comp = start_homeowner(cfg, poll_s=0.1)
    assert comp is not None
    try:
        deadline = time.monotonic() + WAIT
        while "refused the connection" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)  # no event to wait on: the refusal shows only in the log
        assert "home_assistant.username/password" in caplog.text
        assert comp.wait(0) is False
    finally:
        comp.stop()
        assert comp.wait(WAIT)


@pytest.mark.slow
def test_sensors_follow_a_request_held_by_the_real_service(tmp_path: Path, write_config, broker: Broker,
                                                           home_broker: HomeBroker, ha_side: HomeAssistantSide) -> None:
    from tests.test_service import Agency, Agent, make_env

    clear_retained(home_broker)
    env = make_env(tmp_path, write_config, broker)
    policy = env.cfg.require_policy().model_copy(update={"approval": "ask"})
    env.cfg = env.cfg.model_copy(update={"policy": policy, "home_assistant": home_broker.config(),
                                         "clock": ClockConfig(assume_synced=True)})
    agent = Agent(env)
    agency = Agency(env, "jpd")
    comp = start_homeowner(env.cfg, poll_s=0.1)
    assert comp is not None
    try:
        ha_side.wait(f"{NODE}/last_request/state", lambda m: m.payload == b"none")
        built = agency.request()
        agency.publish(built)
        ha_side.wait(f"{NODE}/last_request/state", lambda m: m.payload == b"held_for_approval")
        attrs = json.loads(ha_side.wait(f"{NODE}/last_request/attributes",
                                        lambda m: json.loads(m.payload).get("agency") == "jackson-pd").payload)
        assert set(attrs) == {"agency", "time", "footage_s"}
        assert attrs["footage_s"] == 10.0  # the request asked for 10 s
        assert attrs["time"].endswith("Z")
        assert ha_side.wait(f"{NODE}/pending_approvals/state", lambda m: m.payload == b"1")
        for m in ha_side.all:
            assert_no_location(m.topic + m.payload.decode("utf-8", "replace"), env.cfg)
    finally:
        comp.stop()
        assert comp.wait(WAIT)
        agency.close()
        agent.stop()
