"""Home Assistant on the homeowner's own MQTT broker (``[home_assistant]``), by MQTT discovery.

This is never the agency broker: it is the one Home Assistant's MQTT integration uses, usually the
Mosquitto add-on. The agent announces itself with retained discovery messages
(``<prefix>/<component>/<node_id>/<object>/config``), so Home Assistant shows one device with:

- ``switch`` **Kill switch**: ON engages it (through :func:`agent.runtime.controls.set_kill_switch`,
  recorded in the access log as by "homeowner (Home Assistant)"). OFF is refused: a home automation,
  a shared dashboard or whoever has the broker's password must not be able to resume sharing. It is
  logged and ON is published again; only the local page, the command line and the button turn it off.
- ``sensor`` **Last request**: the outcome as one word (``held_for_approval``, ``granted``,
  ``delivered``, ``refused`` ...), with the agency, the time and the length of footage as attributes.
  Nothing about where the camera is: not the area asked for, not the topic.
- ``sensor`` **Pending approvals**: how many requests wait for the homeowner's answer.

Availability is the broker's: a retained ``online`` on ``<node_id>/availability`` once connected and
a retained ``offline`` as the connection's will (and on a clean stop). When Home Assistant restarts
it publishes ``online`` on ``<prefix>/status``; the agent then announces itself again.

paho-mqtt 2.x, MQTT v5. paho's callbacks only queue; one worker thread publishes, and turns the
switch, so nothing slow runs on paho's network thread. Commands that arrive retained are ignored
(an old command must not act again at every reconnect), as are unexpected payloads.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__
from agent.config import AgentConfig, HomeAssistantConfig
from agent.errors import UserError
from agent.homeowner.events import HomeEvent, HomeState
from agent.timeutil import format_utc

log = logging.getLogger("agent.homeowner.homeassistant")

BY = "homeowner (Home Assistant)"
MAX_COMMAND_BYTES = 64
QUEUE_SIZE = 1000
ON, OFF = "ON", "OFF"
ONLINE, OFFLINE = "online", "offline"


class Topics:
    """Every topic the agent uses on the homeowner's broker, from ``discovery_prefix`` and ``node_id``."""

    def __init__(self, ha: HomeAssistantConfig) -> None:
        p, n = ha.discovery_prefix, ha.node_id
        self.node_id = n
        self.ha_status = f"{p}/status"
        self.availability = f"{n}/availability"
        self.switch_config = f"{p}/switch/{n}/killswitch/config"
        self.switch_state = f"{n}/killswitch/state"
        self.switch_command = f"{n}/killswitch/set"
        self.last_config = f"{p}/sensor/{n}/last_request/config"
        self.last_state = f"{n}/last_request/state"
        self.last_attributes = f"{n}/last_request/attributes"
        self.pending_config = f"{p}/sensor/{n}/pending_approvals/config"
        self.pending_state = f"{n}/pending_approvals/state"


def discovery_payloads(topics: Topics) -> dict[str, dict[str, Any]]:
    """The retained discovery messages, by topic, as Home Assistant's MQTT discovery reads them."""
    n = topics.node_id
    device = {"identifiers": [f"doorbell_agent_{n}"], "name": "Doorbell agent", "manufacturer": "doorbell-agent",
              "model": "Doorbell footage agent", "sw_version": __version__}
    common = {"availability_topic": topics.availability, "payload_available": ONLINE,
              "payload_not_available": OFFLINE, "device": device,
              "origin": {"name": "doorbell-agent", "sw_version": __version__}}
    return {
        topics.switch_config: {
            **common, "name": "Kill switch", "unique_id": f"{n}_killswitch",
            "state_topic": topics.switch_state, "command_topic": topics.switch_command,
            "payload_on": ON, "payload_off": OFF, "state_on": ON, "state_off": OFF,
            "optimistic": False, "qos": 1, "retain": False, "icon": "mdi:shield-lock",
        },
        topics.last_config: {
            **common, "name": "Last request", "unique_id": f"{n}_last_request",
            "state_topic": topics.last_state, "json_attributes_topic": topics.last_attributes,
            "icon": "mdi:file-video",
        },
        topics.pending_config: {
            **common, "name": "Pending approvals", "unique_id": f"{n}_pending_approvals",
            "state_topic": topics.pending_state,
            "state_class": "measurement", "unit_of_measurement": "requests", "icon": "mdi:account-clock",
        },
    }


def last_request_attributes(event: HomeEvent | None) -> dict[str, Any]:
    """The last-request sensor's attributes: agency, time, footage length. No location."""
    if event is None:
        return {"agency": None, "time": None, "footage_s": None}
    return {"agency": event.agency, "time": format_utc(event.at), "footage_s": event.footage_s}


def tls_context(ha: HomeAssistantConfig) -> ssl.SSLContext:
    """Verified TLS to the homeowner's broker, the CA from home_assistant.ca_file or the system store."""
    from agent.sharing.transport import verified_tls_context  # the one place client TLS is set up

    return verified_tls_context("home_assistant", ca_file=ha.ca_file)


class HomeAssistantLink:
    """The agent's device in Home Assistant: discovery, states, the kill-switch command."""

    name = "home assistant"

    def __init__(self, cfg: AgentConfig, *, client_id: str | None = None) -> None:
        if cfg.home_assistant is None:
            raise UserError("there is no [home_assistant] section in the configuration")
        self.cfg = cfg
        self.ha = cfg.home_assistant
        self.topics = Topics(self.ha)
        self.connected = threading.Event()
        self.refused_off = 0  # OFF commands refused (for status and tests)
        self._jobs: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=QUEUE_SIZE)
        self._state: HomeState | None = None
        self._last_error: str | None = None
        self._stop = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"doorbell-agent-{self.ha.node_id}-{secrets.token_hex(3)}",
                        protocol=mqtt.MQTTv5)
        if self.ha.tls:
            c.tls_set_context(tls_context(self.ha))
        if self.ha.username:
            c.username_pw_set(self.ha.username, self.ha.password)
        c.will_set(self.topics.availability, OFFLINE, qos=1, retain=True)
        c.reconnect_delay_set(1, 60)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c
        self._worker = threading.Thread(target=self._work, name="doorbell-home-assistant", daemon=True)

    def start(self) -> None:
        self._worker.start()
        self.client.connect_async(self.ha.host, self.ha.port, keepalive=30, clean_start=True)
        self.client.loop_start()
        log.info("Home Assistant: connecting to %s:%d%s", self.ha.host, self.ha.port, " (TLS)" if self.ha.tls else "")

    # ---- paho's thread: queue only

    def _put(self, job: str, arg: Any = None) -> None:
        try:
            self._jobs.put_nowait((job, arg))
        except queue.Full:
            log.warning("Home Assistant: %d updates are waiting; %s dropped", self._jobs.qsize(), job)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self._put("connected" if not rc.is_failure else "refused", str(rc))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self._put("disconnected", str(rc))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._put("message", (msg.topic, bytes(msg.payload[:MAX_COMMAND_BYTES + 1]), bool(msg.retain)))

    # ---- the watcher's thread: queue only

    def on_state(self, state: HomeState) -> None:
        self._put("state", state)

    def on_event(self, event: HomeEvent) -> None:
        pass  # the last request arrives with the state

    # ---- the worker

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job, arg = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._do(job, arg)
            except Exception:  # a bug must not end the link
                log.exception("Home Assistant: handling %s failed", job)

    def _do(self, job: str, arg: Any) -> None:
        if job == "connected":
            self._announce()
            if self._last_error is not None:
                log.info("Home Assistant: connected to %s:%d again", self.ha.host, self.ha.port)
            self._last_error = None
            self.connected.set()
        elif job in ("refused", "disconnected"):
            self.connected.clear()
            why = f"{'the broker refused the connection' if job == 'refused' else 'disconnected'} ({arg})"
            if why != self._last_error and not self._stop.is_set():
                hint = "; check home_assistant.username/password" if job == "refused" else "; reconnecting"
                log.warning("Home Assistant broker %s:%d: %s%s", self.ha.host, self.ha.port, why, hint)
            self._last_error = why
        elif job == "state":
            self._state = arg
            if self.connected.is_set():
                self._publish_state(arg)
        elif job == "message":
            self._command(*arg)

    def _announce(self) -> None:
        """Birth, discovery, subscriptions and the current state: on every (re)connection."""
        self.client.subscribe([(self.topics.switch_command, 1), (self.topics.ha_status, 1)])
        for topic, payload in discovery_payloads(self.topics).items():
            self.client.publish(topic, json.dumps(payload), qos=1, retain=True)
        self.client.publish(self.topics.availability, ONLINE, qos=1, retain=True)
        if self._state is not None:
            self._publish_state(self._state)
        else:
            self._publish_switch(self._switch_engaged())

    def _publish_state(self, state: HomeState) -> None:
        self._publish_switch(state.kill_switch)
        self.client.publish(self.topics.pending_state, str(state.pending_approvals), qos=1, retain=True)
        last = state.last_request
        self.client.publish(self.topics.last_state, last.kind if last else "none", qos=1, retain=True)
        self.client.publish(self.topics.last_attributes, json.dumps(last_request_attributes(last)), qos=1, retain=True)

    def _publish_switch(self, engaged: bool) -> None:
        self.client.publish(self.topics.switch_state, ON if engaged else OFF, qos=1, retain=True)

    def _switch_engaged(self) -> bool:
        from agent.state.killswitch import KillSwitch

        return KillSwitch(self.cfg.paths.killswitch_file).state().engaged

    def _command(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.topics.ha_status:
            if payload.strip() == ONLINE.encode():
                self._announce()  # Home Assistant restarted: tell it again who we are
            return
        if topic != self.topics.switch_command:
            return
        if retained:
            log.warning("Home Assistant: ignored a retained kill-switch command on %s (only live commands count)", topic)
            return
        word = payload.decode("ascii", "replace").strip().upper() if len(payload) <= MAX_COMMAND_BYTES else ""
        if word == ON:
            from agent.runtime.controls import set_kill_switch

            try:
                change = set_kill_switch(self.cfg, True, by=BY)
            except UserError as exc:
                log.error("Home Assistant asked to turn the kill switch on, and it could not be written: %s", exc)
            else:
                log.warning("kill switch turned ON from Home Assistant")
                if change.error:
                    log.error("the kill switch is on, but the access log could not record it: %s", change.error)
        elif word == OFF:
            if self._switch_engaged():
                self.refused_off += 1
                log.warning("Home Assistant asked to turn the kill switch OFF: refused. Only the local page, "
                            "'doorbell-agent killswitch off' and the button turn it off")
        else:
            log.warning("Home Assistant: ignored a kill-switch command that is neither ON nor OFF")
        self._publish_switch(self._switch_engaged())

    # ---- lifecycle

    def close(self, timeout: float = 3.0) -> None:
        """Say ``offline`` (retained), disconnect, stop the worker."""
        self._stop.set()
        try:
            if self.client.is_connected():
                info = self.client.publish(self.topics.availability, OFFLINE, qos=1, retain=True)
                info.wait_for_publish(timeout)
            self.client.disconnect()
        except (RuntimeError, ValueError, OSError) as exc:
            log.debug("Home Assistant: closing: %s", exc)
        self.client.loop_stop()
        self._worker.join(timeout)


def start_home_assistant(cfg: AgentConfig) -> HomeAssistantLink | None:
    """The link if ``[home_assistant]`` is set and usable, else None with a log line saying why."""
    if cfg.home_assistant is None:
        return None
    try:
        link = HomeAssistantLink(cfg)
        link.start()
    except (UserError, OSError, ValueError) as exc:
        log.error("Home Assistant cannot be used (%s); the rest of the agent runs without it", exc)
        return None
    return link
