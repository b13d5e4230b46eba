"""A small, blocking MQTT 5 session for the reference client (paho-mqtt 2.x).

paho runs its network loop on its own thread; our callbacks only put events
on a queue, and the command's thread waits on that queue, always with a
timeout. TLS verifying the broker's certificate is the default; plaintext
happens only when the caller explicitly asks for it.

Session: ``request`` subscribes to its deliveries under a client id made
from the jti with a session that outlives the connection, so the broker
queues deliveries (QoS 1) until ``receive`` connects again with the same id.
"""

from __future__ import annotations

import queue
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import UserError


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    insecure_plaintext: bool = False
    keepalive_s: int = 30

    @property
    def effective_port(self) -> int:
        return self.port or (1883 if self.insecure_plaintext else 8883)


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes


class MqttSession:
    """Connect, subscribe, publish and receive, each step awaited with a timeout."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        clean_start: bool,
        session_expiry_s: int,
        timeout_s: float = 15.0,
    ) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.messages: queue.Queue[Incoming] = queue.Queue()
        self.session_present = False
        client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
        )
        if not settings.insecure_plaintext:
            try:
                client.tls_set(
                    ca_certs=str(settings.ca_file) if settings.ca_file else None,
                    certfile=str(settings.cert_file) if settings.cert_file else None,
                    keyfile=str(settings.key_file) if settings.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise UserError(f"cannot set up TLS with --ca-file/--cert/--key ({exc})") from None
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        # Callbacks run on paho's thread: they only enqueue.
        client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connect", (rc, flags)))
        client.on_subscribe = lambda c, u, mid, rcs, props: self.events.put(("subscribe", (mid, rcs)))
        client.on_publish = lambda c, u, mid, rc, props: self.events.put(("publish", (mid, rc)))
        client.on_disconnect = lambda c, u, flags, rc, props: self.events.put(("disconnect", rc))
        client.on_message = lambda c, u, msg: self.messages.put(Incoming(msg.topic, bytes(msg.payload)))
        self.client = client
        self._client_id = client_id
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s

    def _await(self, kind: str, what: str) -> Any:
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(f"the broker did not answer in {self.timeout_s:g} s while {what}")
            try:
                event, value = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event == kind:
                return value
            if event == "disconnect":
                raise UserError(f"the broker closed the connection while {what} ({value})")

    def connect(self) -> None:
        s = self.settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        try:
            self.client.connect(
                s.host, s.effective_port, keepalive=s.keepalive_s, clean_start=self._clean_start, properties=props
            )
        except ssl.SSLCertVerificationError as exc:
            raise UserError(
                f"the broker's certificate at {s.host}:{s.effective_port} is not trusted ({exc.verify_message}); "
                "give its CA with --ca-file"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"cannot connect to the broker at {s.host}:{s.effective_port} ({exc})") from None
        self.client.loop_start()
        rc, flags = self._await("connect", "connecting")
        if rc.is_failure:
            self.close()
            raise UserError(f"the broker refused the connection: {rc}; check --username/--password or the certificate")
        self.session_present = bool(getattr(flags, "session_present", False))

    def subscribe(self, topic_filter: str) -> None:
        result, mid = self.client.subscribe(topic_filter, qos=1)
        if result != paho.MQTT_ERR_SUCCESS:
            raise UserError(f"cannot subscribe to {topic_filter} ({paho.error_string(result)})")
        got_mid, codes = self._await("subscribe", f"subscribing to {topic_filter}")
        if got_mid != mid or any(code.is_failure for code in codes):
            raise UserError(f"the broker refused the subscription to {topic_filter} ({codes}); check its access rules")

    def publish(self, topic: str, payload: bytes | str, *, expiry_s: int | None = None) -> None:
        """QoS 1, and wait for the broker's PUBACK (with a timeout)."""
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = max(1, int(expiry_s))
        info = self.client.publish(topic, payload, qos=1, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise UserError(f"cannot publish to {topic} ({paho.error_string(info.rc)})")
        while True:
            mid, rc = self._await("publish", f"publishing to {topic}")
            if mid != info.mid:
                continue  # an earlier message's late acknowledgement
            if rc.is_failure:
                raise UserError(f"the broker refused the message to {topic} ({rc}); check its access rules")
            return

    def next_message(self, timeout_s: float) -> Incoming | None:
        try:
            return self.messages.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
