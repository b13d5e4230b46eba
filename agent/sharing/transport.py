"""The agent's MQTT 5 link to the broker (protocol section 2): requests in, deliveries out.

One :class:`MqttTransport` owns one paho-mqtt client. paho's network thread
only runs the callbacks below, and they only count, check a size and enqueue;
the agent's worker takes messages with :meth:`MqttTransport.get`, decides,
records, and then calls :meth:`MqttTransport.ack`.

Choices, and why:

- **TLS by default**, verifying the broker's certificate chain and host name
  (``ssl.create_default_context``). A plain TCP link needs both
  ``mqtt.tls = false`` and ``mqtt.allow_plaintext = true``; :attr:`plaintext`
  says so, for ``status`` to warn.
- **Persistent session**: a fixed client id, ``clean_start=False`` and a
  Session Expiry Interval on CONNECT, QoS 1 subscription. A request published
  while the agent is offline waits in the broker and arrives on reconnect,
  unless the session or the message (Message Expiry Interval) expired first.
  The agent subscribes on every connect, whether or not the broker kept the
  session: re-subscribing to the same filter is idempotent (Retain Handling 1,
  so retained messages are not sent again), and it means a changed precision
  or location takes effect even with a fixed ``mqtt.client_id``. A session
  also keeps every filter it was ever given, so the filters it holds are
  remembered in ``session_file`` and, when the broker resumes a session, any
  filter other than the current one is unsubscribed before the transport
  counts as ready: a moved camera stops hearing its old cell. The default
  client id (:func:`default_client_id`) includes a hash of the filter, so a
  changed filter starts a fresh session anyway.
- **Acknowledge after recording** (paho ``manual_ack``): the PUBACK for a
  request is sent only when the worker calls :meth:`ack`, after it has decided
  the request and durably recorded it (replay memory, access log, pending
  approval). If the agent dies in between, the broker keeps the message in
  the session and delivers it again (DUP) on reconnect; the replay memory
  turns the second copy into a duplicate. An ack is sent only on the
  connection that delivered the message (packet ids are per connection): a
  message delivered on an earlier connection is redelivered by the broker
  and acknowledged then. Messages the transport drops itself (oversize, full
  queue) are acknowledged at once, so they cannot pin the broker's in-flight
  window.
- **Flow control**: the CONNECT carries Receive Maximum (by default a quarter
  of the queue size), so the broker keeps at most that many unacknowledged
  requests in flight to us; a flood waits in the broker, not in our memory.
  The margin is there because Mosquitto before 2.0.13 (Debian 12 ships
  2.0.11) does not keep to it once messages are acknowledged: each PUBACK
  for the oldest message in flight lets up to Receive Maximum more out
  (eclipse/mosquitto#2306, fixed in 2.0.13), so a worker acknowledging a
  long flood one by one can be sent many more than it asked for. The queue
  is therefore still bounded and drops (and counts) when full, never
  blocking the network thread.
- **Size limit**: payloads over 16384 bytes are counted as ``oversize`` and
  dropped before anything looks inside them. paho does not enforce the
  Maximum Packet Size we advertise, so the check is ours; the advertised
  limit (:data:`MAX_PACKET_BYTES`) asks the broker not to send much larger
  packets at all (those are then dropped by the broker and never counted).
- **Publishing** (:meth:`publish`) waits for the PUBACK and returns ``False``
  on a refusal reason code (e.g. "Not authorized") or on timeout. A message
  that timed out stays in paho's session queue and may still go out after
  a reconnect; a requester discards an incomplete delivery, so a delivery
  that failed is simply abandoned.
- **Reconnect** with exponential backoff (paho ``reconnect_delay_set`` and its
  network thread), 1 s doubling to 60 s; never a busy loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttConfig
from agent.errors import UserError
from agent.fsutil import write_atomically
from agent.protocol import geohash

log = logging.getLogger("agent.sharing.transport")

MAX_REQUEST_BYTES = 16384
"""Protocol section 3: larger request payloads are dropped unread."""

MAX_PACKET_BYTES = MAX_REQUEST_BYTES + 4096
"""Advertised Maximum Packet Size: a full request plus room for topic and properties."""

DEFAULT_QUEUE_SIZE = 256

COUNTER_NAMES = (
    "received",  # enqueued for the worker
    "oversize",  # payload > 16384 bytes, dropped unread
    "queue_full",  # dropped because the worker was behind
    "acked",  # PUBACKs sent for requests the worker finished
    "ack_skipped",  # finished on a later connection; the broker redelivers it
    "callback_errors",  # a bug in a callback, caught so the network thread lives on
    "connects",
    "connect_failures",  # TCP/TLS failures and CONNACK refusals
    "disconnects",
    "subscribe_refused",
    "published",  # PUBACK with a success reason code
    "publish_failed",  # refused by the broker or timed out
)


class ConnectionState(str, Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"  # CONNACK accepted; see ``ready`` for the subscription too
    DISCONNECTED = "disconnected"  # reconnecting with backoff
    STOPPED = "stopped"


@dataclass(frozen=True)
class IncomingMessage:
    """A request as it came off the wire; nothing in it is trusted yet."""

    topic: str
    payload: bytes
    received_at: datetime
    qos: int
    mid: int
    dup: bool
    retain: bool
    expiry_s: int | None
    """Message Expiry Interval left when the broker forwarded it, if the requester set one."""
    generation: int
    """Which connection delivered it; :meth:`MqttTransport.ack` only answers on that one."""


@dataclass(frozen=True)
class PublishOutcome:
    ok: bool
    reason: str
    """The broker's reason in words ("Success", "Not authorized", ...) or why we gave up."""
    reason_code: int | None = None


@dataclass(frozen=True)
class TransportEvent:
    """Handed to ``on_event`` on paho's network thread: keep the handler short."""

    state: ConnectionState
    ready: bool
    detail: str


def default_client_id(device_kid: str, subscription: str = "") -> str:
    """A client id that survives restarts (the persistent session hangs on it) without naming the home.

    ``subscription`` (the filter) is folded in as a short hash, so moving the
    camera or changing the precision gets a new session rather than one still
    subscribed to the old cell.
    """
    suffix = hashlib.sha256(subscription.encode("utf-8")).hexdigest()[:6] if subscription else ""
    return "doorbell-" + device_kid[:16] + ("-" + suffix if suffix else "")


def describe_connect_error(exc: BaseException | None, cfg: MqttConfig) -> str:
    """A failed TCP/TLS connection in words a resident (or installer) can act on."""
    where = f"{cfg.host}:{cfg.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the broker at {where} presented a certificate this agent does not trust "
            f"({exc.verify_message or exc.reason}); check mqtt.ca_file and that mqtt.host matches the certificate"
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS with the broker at {where} failed ({exc.reason or exc}); check that the port speaks TLS "
            f"and, if the broker asks for one, mqtt.cert_file/mqtt.key_file"
        )
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing accepted a connection at {where}; is the broker running and mqtt.port right?"
    if isinstance(exc, socket.gaierror):
        return f"cannot find the broker host {cfg.host!r} ({exc.strerror}); check mqtt.host and the network"
    if isinstance(exc, TimeoutError):
        return f"connecting to the broker at {where} timed out; check the network and mqtt.host/mqtt.port"
    if exc is None:
        return f"connecting to the broker at {where} failed"
    return f"connecting to the broker at {where} failed: {exc}"


def tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    """Chain and host-name verification always on; the CA from mqtt.ca_file or the system store."""
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(cfg, name)
        if path is not None and not path.is_file():
            raise UserError(f"mqtt.{name} = {str(path)!r} is not a readable file; fix the path or remove the key")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca_file) if cfg.ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise UserError(f"mqtt.ca_file = {str(cfg.ca_file)!r} is not a PEM CA certificate ({exc})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cfg.cert_file is not None and cfg.key_file is not None:
        try:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (ssl.SSLError, OSError) as exc:
            raise UserError(
                f"mqtt.cert_file/mqtt.key_file cannot be used as a client certificate ({exc}); "
                "give a PEM certificate and its unencrypted PEM key"
            ) from None
    return ctx


class MqttTransport:
    """Requests in (bounded queue, acked after recording), deliveries out (wait for PUBACK).

    Typical use by the service::

        flt = geohash.subscription_filter(cfg.mqtt.root, loc.lat, loc.lon, cfg.mqtt.precision)
        t = MqttTransport(cfg.mqtt, lat=loc.lat, lon=loc.lon, client_id=default_client_id(key.kid, flt))
        t.start()
        while running:
            msg = t.get(timeout=1.0)
            if msg is None:
                continue
            ...decide, record durably...
            t.ack(msg)
        t.stop()
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        lat: float,
        lon: float,
        client_id: str | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        receive_maximum: int | None = None,
        on_event: Callable[[TransportEvent], None] | None = None,
        on_dropped: Callable[[str, IncomingMessage | None], None] | None = None,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 60,
        session_file: Path | None = None,
    ) -> None:
        """``session_file`` remembers which filters the broker's session for this client id holds
        (JSON, 0600), so that a later transport with another filter can unsubscribe the old ones.
        Without it only this transport's own reconnects are covered."""
        if not config.tls and not config.allow_plaintext:
            raise UserError("mqtt.tls = false needs mqtt.allow_plaintext = true; refusing an unencrypted broker link")
        cid = config.client_id or client_id
        if not cid:
            raise UserError("no MQTT client id: set mqtt.client_id, or let the agent derive one from its device key")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.config = config
        self.client_id = cid
        self.subscription = geohash.subscription_filter(config.root, lat, lon, config.precision)
        self.plaintext = not config.tls
        self._queue: queue.Queue[IncomingMessage] = queue.Queue(maxsize=queue_size)
        self._receive_maximum = min(65535, receive_maximum or max(1, queue_size // 4))
        self._on_event = on_event
        self.on_dropped = on_dropped
        self._ssl = None if self.plaintext else tls_context(config)
        self._reconnect = (reconnect_min_s, reconnect_max_s)

        self._lock = threading.RLock()  # predicates given to wait_until may call counters()
        self._changed = threading.Condition(self._lock)
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._state = ConnectionState.NEW
        self._ready = False
        self._generation = 0
        self._session_present: bool | None = None
        self._last_error: str | None = None
        self._sub_mid: int | None = None
        self._sub_acked = False
        self._unsub_mid: int | None = None
        self.session_file = session_file
        self._session_filters = self._load_session_filters()
        self._acks: dict[int, ReasonCode] = {}
        self._abandoned: set[int] = set()
        self._client: mqtt.Client | None = None

    # ----- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and keep reconnecting; returns at once (see :meth:`wait_ready`)."""
        with self._lock:
            if self._state is not ConnectionState.NEW:
                raise RuntimeError("a transport starts once; make a new one")
            self._state = ConnectionState.CONNECTING
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if self._ssl is not None:
            c.tls_set_context(self._ssl)
        if self.config.username is not None:
            c.username_pw_set(self.config.username, self.config.password)
        c.reconnect_delay_set(*self._reconnect)
        c.on_connect = self._handle_connect
        c.on_connect_fail = self._handle_connect_fail
        c.on_disconnect = self._handle_disconnect
        c.on_subscribe = self._handle_subscribe
        c.on_unsubscribe = self._handle_unsubscribe
        c.on_message = self._handle_message
        c.on_publish = self._handle_publish
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.MaximumPacketSize = MAX_PACKET_BYTES
        props.ReceiveMaximum = self._receive_maximum
        self._client = c
        c.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive_s,
            clean_start=False,
            properties=props,
        )
        c.loop_start()
        log.info("connecting to %s:%d as %s", self.config.host, self.config.port, self.client_id)
        if self.plaintext:
            log.warning("the broker link is NOT encrypted (mqtt.tls = false, mqtt.allow_plaintext = true)")

    def stop(self) -> None:
        """Disconnect cleanly (the broker keeps the session) and join the network thread."""
        c = self._client
        with self._lock:
            if self._state is ConnectionState.STOPPED:
                return
            self._state = ConnectionState.STOPPED
            self._ready = False
            self._changed.notify_all()
        if c is not None:
            c.disconnect()
            c.loop_stop()
        self._emit("stopped")

    def __enter__(self) -> MqttTransport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- for the worker ----------------------------------------------------------------

    def get(self, timeout: float | None = None) -> IncomingMessage | None:
        """The next request, or ``None`` after ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def ack(self, msg: IncomingMessage) -> bool:
        """Tell the broker this request is dealt with; call it after the decision is recorded.

        Returns False (and the broker will redeliver it) if the connection that
        delivered it is gone.
        """
        if msg.qos == 0:
            return True
        with self._lock:
            c = self._client
            if c is None or msg.generation != self._generation or self._state is not ConnectionState.CONNECTED:
                self._counters["ack_skipped"] += 1
                return False
            rc = c.ack(msg.mid, msg.qos)
            ok = rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            self._counters["acked" if ok else "ack_skipped"] += 1
            return ok

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 30.0,
                *, expiry_s: int | None = None) -> bool:
        """Publish and wait for the broker's PUBACK; False on refusal or timeout, never a hang."""
        return self.publish_outcome(topic, payload, qos=qos, timeout=timeout, expiry_s=expiry_s).ok

    def publish_outcome(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 30.0,
                        *, expiry_s: int | None = None) -> PublishOutcome:
        """:meth:`publish` with the reason, for logs and tests."""
        handed = self.publish_nowait(topic, payload, qos=qos, expiry_s=expiry_s)
        if isinstance(handed, PublishOutcome):
            return handed
        return self.wait_published(handed, timeout)

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1,
                       *, expiry_s: int | None = None) -> int | PublishOutcome:
        """Hand a message to paho without waiting: its message id for :meth:`wait_published`, or a failure.

        Lets a delivery keep a few chunks in flight instead of one round trip per chunk.
        """
        c = self._client
        if c is None or self._state is ConnectionState.STOPPED:
            return self._publish_failed("the transport is not running")
        if qos not in (1, 2):
            raise ValueError("deliveries are published with QoS 1 (or 2); QoS 0 has no acknowledgement to wait for")
        props = Properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        try:
            info = c.publish(topic, payload, qos=qos, properties=props)
        except ValueError as exc:
            return self._publish_failed(f"cannot publish to {topic!r}: {exc}")
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return self._publish_failed(f"paho refused the message: {mqtt.error_string(info.rc)}")
        return info.mid

    def wait_published(self, mid: int, timeout: float, *, abandon: bool = True) -> PublishOutcome:
        """Wait for the PUBACK of a message handed over by :meth:`publish_nowait`.

        ``abandon=False`` keeps listening for a late PUBACK, for a caller that will wait again
        (paho resends unacknowledged messages after a reconnect under the same id).
        """
        with self._changed:
            self._changed.wait_for(
                lambda: mid in self._acks or self._state is ConnectionState.STOPPED, timeout=timeout
            )
            if mid not in self._acks:
                if not abandon and self._state is not ConnectionState.STOPPED:
                    return PublishOutcome(False, f"no PUBACK yet after {timeout:g} s")
                self._abandoned.add(mid)  # a late PUBACK must not be mistaken for a later message's
                self._counters["publish_failed"] += 1
                if self._state is ConnectionState.STOPPED:
                    why = "the transport was stopped before the broker acknowledged it"
                elif self._state is ConnectionState.CONNECTED:
                    why = f"no PUBACK within {timeout:g} s"
                else:
                    why = f"no PUBACK within {timeout:g} s (not connected to the broker)"
                return PublishOutcome(False, why)
            rc = self._acks.pop(mid)
            if rc.is_failure:
                self._counters["publish_failed"] += 1
                return PublishOutcome(False, str(rc), rc.value)
            self._counters["published"] += 1
            return PublishOutcome(True, str(rc), rc.value)

    def _publish_failed(self, reason: str) -> PublishOutcome:
        with self._lock:
            self._counters["publish_failed"] += 1
        return PublishOutcome(False, reason)

    # ----- what the status command and tests look at ------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def ready(self) -> bool:
        """Connected, the broker acknowledged our subscription on this connection and dropped any stale one."""
        return self._ready

    @property
    def session_present(self) -> bool | None:
        return self._session_present

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for ``doorbell-agent status``."""
        with self._lock:
            return {
                "state": self._state.value,
                "ready": self._ready,
                "broker": f"{self.config.host}:{self.config.port}",
                "plaintext": self.plaintext,
                "client_id": self.client_id,
                "subscription": self.subscription,
                "session_present": self._session_present,
                "last_error": self._last_error,
                "queued": self._queue.qsize(),
                "counters": dict(self._counters),
            }

    def wait_until(self, predicate: Callable[[MqttTransport], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on every state or counter change)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout=timeout)

    def wait_ready(self, timeout: float) -> bool:
        return self.wait_until(lambda t: t._ready, timeout)

    # ----- paho callbacks (network thread): count, check, enqueue; nothing slow ------------

    def _emit(self, detail: str) -> None:
        if self._on_event is not None:
            try:
                self._on_event(TransportEvent(self._state, self._ready, detail))
            except Exception:  # a broken handler must not take the network thread down
                log.exception("transport event handler failed")

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                        reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._changed:
            if self._state is ConnectionState.STOPPED:
                return
            if reason_code.is_failure:
                self._counters["connect_failures"] += 1
                self._last_error = (
                    f"the broker at {self.config.host}:{self.config.port} refused the connection: {reason_code}"
                    + ("; check mqtt.username and mqtt.password" if reason_code.value in (0x86, 0x87) else "")
                )
                self._state = ConnectionState.DISCONNECTED
                self._changed.notify_all()
                detail = self._last_error
                log.warning("%s", detail)
            else:
                self._generation += 1
                self._counters["connects"] += 1
                self._session_present = bool(flags.session_present)
                self._state = ConnectionState.CONNECTED
                self._last_error = None
                self._ready = False
                detail = "connected; " + ("the broker kept our session" if self._session_present else "new session")
                self._changed.notify_all()
        if not reason_code.is_failure:
            self._subscribe(client)
        log.info("%s", detail)
        self._emit(detail)

    def _subscribe(self, client: mqtt.Client) -> None:
        """Subscribe to our filter and unsubscribe any other filter a resumed session still holds."""
        with self._lock:
            stale = sorted(self._session_filters - {self.subscription}) if self._session_present else []
            held = set(stale) | {self.subscription}
            changed = held != self._session_filters
            self._session_filters = held
            self._sub_acked = False
        if changed:  # recorded before the SUBSCRIBE goes out, so a crash in between still knows of it
            self._save_session_filters(held)
        rc, mid = client.subscribe(self.subscription, options=SubscribeOptions(qos=1, retainHandling=1))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("subscribe to %s not sent: %s", self.subscription, mqtt.error_string(rc))
        unsub_mid = None
        if stale:
            log.info("the broker kept this session's old subscription(s) %s; unsubscribing", ", ".join(stale))
            rc, unsub_mid = client.unsubscribe(stale)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.warning("unsubscribe from %s not sent: %s", ", ".join(stale), mqtt.error_string(rc))
        with self._lock:
            self._sub_mid = mid
            self._unsub_mid = unsub_mid

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block, so the exception is still at hand.
        exc = sys.exc_info()[1]
        text = describe_connect_error(exc, self.config)
        with self._changed:
            if self._state is ConnectionState.STOPPED:
                return
            self._counters["connect_failures"] += 1
            self._last_error = text
            self._state = ConnectionState.DISCONNECTED
            self._changed.notify_all()
        log.warning("%s; retrying with backoff", text)
        self._emit(text)

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                           reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._changed:
            self._ready = False
            if self._state is ConnectionState.STOPPED:
                self._changed.notify_all()
                return
            was_connected = self._state is ConnectionState.CONNECTED
            self._state = ConnectionState.DISCONNECTED
            if was_connected:
                self._counters["disconnects"] += 1
                if reason_code.is_failure:
                    self._last_error = f"lost the broker connection: {reason_code}"
            self._changed.notify_all()
        if was_connected:
            log.warning("disconnected from the broker (%s); reconnecting with backoff", reason_code)
            self._emit(f"disconnected: {reason_code}")

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                          reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        refused = [rc for rc in reason_codes if rc.is_failure]
        with self._changed:
            if mid != self._sub_mid:
                return
            if refused:
                self._counters["subscribe_refused"] += 1
                self._last_error = f"the broker refused the subscription to {self.subscription}: {refused[0]}"
                detail = self._last_error
                log.error("%s; check the broker's ACL for this agent", detail)
            else:
                self._sub_acked = True
                self._ready = self._unsub_mid is None
                detail = f"subscribed to {self.subscription}"
                log.info("%s", detail)
            self._changed.notify_all()
        self._emit(detail)

    def _handle_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                            reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        with self._changed:
            if mid != self._unsub_mid:
                return
            stale = sorted(self._session_filters - {self.subscription})
            # Success and "No subscription existed" both mean the filter is gone; a failure means it may not be.
            kept = {f for f, rc in zip(stale, reason_codes) if rc.is_failure}
            self._session_filters = kept | {self.subscription}
            self._unsub_mid = None
            self._ready = self._sub_acked
            held = set(self._session_filters)
            self._changed.notify_all()
        if kept:
            log.error("the broker would not drop the old subscription(s) %s", ", ".join(sorted(kept)))
        self._save_session_filters(held)
        self._emit("old subscription(s) dropped" if not kept else "old subscription(s) kept by the broker")

    def _load_session_filters(self) -> set[str]:
        """The filters the broker's session for this client id was last known to hold."""
        if self.session_file is None:
            return set()
        try:
            record = json.loads(self.session_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s); old subscriptions of a resumed session may stay", self.session_file, exc)
            return set()
        if not isinstance(record, dict) or record.get("client_id") != self.client_id:
            return set()  # another client id's session: nothing to do with ours
        filters = record.get("filters")
        return {f for f in filters if isinstance(f, str)} if isinstance(filters, list) else set()

    def _save_session_filters(self, filters: set[str]) -> None:
        if self.session_file is None:
            return
        record = {"client_id": self.client_id, "filters": sorted(filters)}
        try:
            write_atomically(self.session_file, json.dumps(record).encode("utf-8"), mode=0o600)
        except OSError as exc:
            log.warning("cannot record the session's subscriptions in %s: %s", self.session_file, exc)

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._take(client, message)
        except Exception:
            with self._lock:
                self._counters["callback_errors"] += 1
            log.exception("error handling an incoming message; dropped")

    def _take(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        if len(message.payload) > MAX_REQUEST_BYTES:
            self._drop(client, message, "oversize", None)
            return
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = repr(message._topic)  # the broker should never forward this; keep it printable
        expiry = getattr(message.properties, "MessageExpiryInterval", None) if message.properties else None
        with self._lock:
            generation = self._generation
        item = IncomingMessage(
            topic=topic,
            payload=bytes(message.payload),
            received_at=datetime.now(timezone.utc),
            qos=message.qos,
            mid=message.mid,
            dup=bool(message.dup),
            retain=bool(message.retain),
            expiry_s=expiry,
            generation=generation,
        )
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._drop(client, message, "queue_full", item)
            return
        with self._changed:
            self._counters["received"] += 1
            self._changed.notify_all()

    def _drop(self, client: mqtt.Client, message: mqtt.MQTTMessage, reason: str,
              item: IncomingMessage | None) -> None:
        if message.qos > 0:
            client.ack(message.mid, message.qos)  # done with it: do not let it hold an in-flight slot
        with self._changed:
            self._counters[reason] += 1
            self._changed.notify_all()
        if self.on_dropped is not None:
            try:
                self.on_dropped(reason, item)
            except Exception:
                log.exception("drop handler failed")

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                        reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._changed:
            if mid in self._abandoned:
                self._abandoned.discard(mid)
                return
            self._acks[mid] = reason_code
            self._changed.notify_all()
