"""The agent's MQTT 5 link to the broker (protocol section 2): requests in, deliveries out.

One :class:`MqttTransport` owns one paho-mqtt client. paho's network thread
only runs the callbacks below, and they only count, check a size and stage the
message in memory; the transport's writer thread group-commits staged messages
to the durable inbox (:mod:`agent.state.inbox`) and only then acknowledges them;
the agent's worker takes messages from the inbox in arrival order with
:meth:`MqttTransport.get`, decides, records, and then calls
:meth:`MqttTransport.ack`, which lets the inbox forget the message.

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
- **Acknowledge once it is on disk** (paho ``manual_ack``): the PUBACK for a
  request is sent only after the writer thread has committed it to the
  durable inbox, so a crash never loses a request the broker considers
  delivered: at the next start the worker decides what the inbox still holds
  (and a copy the broker redelivers meanwhile is a duplicate). The worker's
  :meth:`ack` comes after the decision is durably recorded (replay memory,
  access log, pending approval) and only then is the message forgotten.
  A PUBACK goes out only on the connection that delivered the message
  (packet ids are per connection): one delivered on an earlier connection is
  redelivered by the broker, stored again and decided again (harmless: a
  second copy of a request whose jti is used up is a duplicate).
- **No request is lost to a flood.** paho's network thread never waits on a
  disk: it appends to an in-memory stage that the writer empties in one
  transaction per batch (group commit), so thousands of messages a second
  cost a few hundred fsyncs, and their PUBACKs leave in one write per commit.
  Receive Maximum on the CONNECT (1024 by default) lets the broker send ahead
  of our PUBACKs, because what it holds back waits in its per-client queue,
  which Mosquitto caps by dropping; Mosquitto before 2.0.13 (Debian 12 ships
  2.0.11) overshoots it anyway (eclipse/mosquitto#2306). paho's thread must
  therefore read as fast as messages come: :class:`_BoundedClient` reads in
  large chunks and decodes a plain PUBLISH itself, and the service's decision
  worker steps aside while bytes wait unread on the connection. The stage, in
  memory, is bounded (a full stage stops paho reading, and TCP holds the broker
  back): if the disk stops taking messages, the network thread waits for room
  (briefly), then leaves further messages unacknowledged with the broker, which
  offers them again after a reconnect (``inbox_unwritable``). Only when the inbox itself holds its bound
  are messages dropped, acknowledged so they cannot pin the broker's in-flight
  window, and counted (``inbox_full``, shown by ``doorbell-agent status``).
- **Size limit**: payloads over 16384 bytes are counted as ``oversize`` and
  dropped before anything looks inside them. We advertise a Maximum Packet
  Size (:data:`MAX_PACKET_BYTES`), and a conforming broker never sends more;
  paho itself would read a packet of any size (up to 256 MiB) into memory
  before looking at it, so :class:`_BoundedClient` checks the length as soon
  as it is decoded and drops the connection (``packet_too_large``) before a
  byte of a packet over :data:`READ_LIMIT_BYTES` is read: a hostile broker
  costs at most about 1 MiB in memory. A larger packet up to that limit is
  read, then dropped as ``oversize`` and acknowledged like any other, because
  some brokers ignore the Maximum Packet Size (ejabberd 23.01 does) and send
  the same message again after every reconnect: hanging up on it would leave
  the agent deaf to every later request (docs/brokers.md).
- **Publishing** (:meth:`publish`) waits for the PUBACK and returns ``False``
  on a refusal reason code (e.g. "Not authorized") or on timeout. A message
  is handed to paho only while connected (:meth:`publish_nowait`), never
  queued for a later connection, and one given up on is withdrawn
  (:meth:`withdraw`, :mod:`agent.sharing.outgoing`): paho forgets it and
  drops its packet if no byte of it was written yet, so nothing the agent
  gave up on (a delivery the kill switch stopped) leaves after a reconnect.
  When a connection drops, paho lets go of every outgoing message it holds
  (:meth:`_let_go_of_outgoing`) instead of resending it by itself after the
  CONNACK; :meth:`wait_published` reports it as lost, and the caller hands it
  over again, in its own order, after deciding whether it still may.
- **Reconnect** with exponential backoff (paho ``reconnect_delay_set`` and its
  network thread), 1 s doubling to 60 s; never a busy loop.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import hmac
import json
import logging
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from functools import partial
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
from agent.sharing.outgoing import Recall, RecallableClient
from agent.state.inbox import Inbox, InboxMessage
from agent.timeutil import from_us, to_us

log = logging.getLogger("agent.sharing.transport")

MAX_REQUEST_BYTES = 16384
"""Protocol section 3: larger request payloads are dropped unread."""

MAX_PACKET_BYTES = MAX_REQUEST_BYTES + 4096
"""Advertised Maximum Packet Size: a full request plus room for topic and properties."""

READ_LIMIT_BYTES = 1024 * 1024 + 4096
"""The largest packet read at all (then dropped as oversize); a larger one ends the connection unread.

Above what we advertise, for brokers that ignore it: a broker's own limit on what a client may publish
(ejabberd's ``max_payload_size`` in docs/ejabberd/ejabberd.yml, 1 MiB) plus room for the topic."""

DEFAULT_RECEIVE_MAXIMUM = 1024
"""Messages the broker may send ahead of our PUBACKs (which follow the inbox's group commit).

Large on purpose: what the broker cannot send us waits in its per-client queue, which Mosquitto
caps (``max_queued_messages``, 1000) by dropping, so a flood must flow into our inbox rather than
wait there. Memory stays bounded by the stage (:data:`STAGE_MAX_MESSAGES`, :data:`STAGE_MAX_BYTES`):
when it is full, paho's thread stops reading and TCP holds the broker back."""

STAGE_MAX_MESSAGES = 4096
STAGE_MAX_BYTES = 8 * 1024 * 1024
"""What paho's thread may hold in memory for the writer: far more than a sound disk ever lets pile up."""
STAGE_WAIT_S = 10.0
"""How long paho's thread waits for room on the stage before leaving messages with the broker."""
READ_AHEAD = 64
"""Messages the worker reads from the inbox at once."""
FORGET_BATCH = 256
FORGET_AFTER_S = 0.5
"""Decided messages are forgotten with the next batch of new ones, or once this many are done, or
this long after the first: a flood then costs one commit per batch, not one per decision."""
INBOX_RETRY_S = 1.0
"""Pause before the writer tries a failed inbox commit again."""

COUNTER_NAMES = (
    "received",  # committed to the inbox (and then acknowledged to the broker)
    "oversize",  # payload > 16384 bytes, dropped unread
    "packet_too_large",  # a packet over our Maximum Packet Size: connection dropped before its body was read
    "inbox_full",  # dropped (and acknowledged): the inbox held its bound
    "inbox_unwritable",  # not acknowledged: the disk took nothing for STAGE_WAIT_S; the broker offers it again
    "inbox_errors",  # inbox commits that failed and were retried
    "acked",  # PUBACKs sent for requests safe in the inbox
    "ack_skipped",  # stored after the delivering connection was gone; the broker redelivers it
    "done",  # decided, durably recorded and forgotten by the inbox
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
    """Which connection delivered it; its PUBACK goes out only on that one."""
    inbox_id: int = 0
    """Its place in the inbox, once stored; :meth:`MqttTransport.get` only hands out stored messages."""


def _stored_form(msg: IncomingMessage) -> InboxMessage:
    return InboxMessage(topic=msg.topic, payload=msg.payload, received_us=to_us(msg.received_at), qos=msg.qos,
                        dup=msg.dup, retain=msg.retain, expiry_s=msg.expiry_s)


def _incoming(row: InboxMessage) -> IncomingMessage:
    """A stored message as the worker sees it; ``mid`` and ``generation`` belonged to a connection long done with it."""
    return IncomingMessage(topic=row.topic, payload=row.payload, received_at=from_us(row.received_us), qos=row.qos,
                           mid=0, dup=row.dup, retain=row.retain, expiry_s=row.expiry_s, generation=0,
                           inbox_id=row.id)


@dataclass(frozen=True)
class PublishOutcome:
    ok: bool
    reason: str
    """The broker's reason in words ("Success", "Not authorized", ...) or why we gave up."""
    reason_code: int | None = None
    lost: bool = False
    """The connection dropped before the PUBACK, and paho let go of the message: hand it over again
    (after deciding whether to) once connected. See :meth:`MqttTransport._let_go_of_outgoing`."""
    may_have_left: bool = False
    """For a lost message: at least part of it was written to the network, so the broker may have it."""


@dataclass(frozen=True)
class TransportEvent:
    """Handed to ``on_event`` on paho's network thread: keep the handler short."""

    state: ConnectionState
    ready: bool
    detail: str


CLIENT_ID_TAG_CHARS = 16
"""Hex digits of secret in the default client id: 64 bits, far beyond guessing at a broker."""


def default_client_id(device_kid: str, subscription: str, secret: bytes) -> str:
    """A client id that survives restarts (the persistent session hangs on it), names no home, and cannot be guessed.

    On a broker that does not tie client ids to credentials, whoever connects with the agent's
    client id takes over its session and can acknowledge its requests unseen. The device kid is
    public (every manifest carries it) and the filter follows from the request area, so both
    only go in through an HMAC under ``secret``, which only this device holds
    (:meth:`agent.state.devicekey.DeviceKey.client_id_secret`). The filter is still folded in,
    so moving the camera or changing the precision gets a new session rather than one still
    subscribed to the old cell. The kid's first characters only help a broker's operator tell
    devices apart. At most 32 characters.
    """
    if len(secret) < 16:
        raise ValueError("the client id secret must be at least 16 bytes")
    tag = hmac.new(secret, b"mqtt-client-id\x00" + subscription.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"doorbell-{device_kid[:6]}-{tag[:CLIENT_ID_TAG_CHARS]}"


class PacketTooLarge(OSError):
    """The broker started a packet larger than the Maximum Packet Size we advertised."""


_PUBACK = struct.Struct("!BBH")  # PUBACK, remaining length 2, packet id: success, no properties
READ_CHUNK = 65536
"""Bytes taken from the socket at once; the packets in them are then parsed without letting go of the GIL."""


class _BoundedClient(mqtt.Client):
    """paho's client with two changes to how it reads: bounded packets, and buffered reads.

    **Bounded.** paho reads a packet's remaining length and then the whole body (up to 256 MiB)
    into memory before anything looks at it; a hostile broker could make us hold hundreds of MiB.
    Every read goes through ``_sock_recv``, and by the time paho asks for the first byte of a body
    its remaining length is fully decoded: a packet larger than :data:`READ_LIMIT_BYTES` (about 1 MiB,
    above the Maximum Packet Size we advertise, for brokers that ignore it) is refused there,
    before a byte of its body is handed over, and the OSError makes
    paho treat the connection as lost (it closes the socket and reconnects with backoff). At most
    one read buffer (:data:`READ_CHUNK`) of it is ever in memory.

    **Buffered.** paho reads a packet with several socket calls (one byte for the type, one per
    length byte, then the body) and parses only one packet per wake-up of its loop. Each socket
    call releases the GIL, and under load (the decision worker, the recorder) getting it back can
    take up to the interpreter's switch interval: during a flood paho's thread then read a few
    thousand messages a second at most, and the broker dropped the rest from its queue for us.
    Here one socket call takes up to :data:`READ_CHUNK` bytes, later calls are served from that
    buffer, and :meth:`loop_read` parses every complete packet already buffered before paho waits
    on the socket again (data left in the buffer is invisible to its ``select``).

    **A lean PUBLISH.** paho builds and clears a ``Properties`` object for every MQTT 5 PUBLISH,
    walking every property name with string operations: most of its cost per message. A QoS 0 or
    1 PUBLISH whose property section is empty (junk in a flood usually is) is decoded here without
    one; anything else (properties, QoS 2, lengths that do not add up) goes to paho's own decoder.

    Relies on paho 2.x internals (``_in_packet``, ``_sock``, ``_sock_recv``, ``_packet_read``,
    ``_loop_rc_handle``, ``_handle_publish``, ``_handle_on_message``, ``_manual_ack``);
    tests/test_intake_faults.py (a hostile broker) and tests/test_transport.py (floods and
    properties on the real broker) check them.
    """

    max_incoming_packet: int = READ_LIMIT_BYTES
    on_packet_too_large: Callable[[int], None] | None = None
    _rbuf: bytes = b""
    _rbuf_pos: int = 0
    _rbuf_sock: object = None

    def _sock_recv(self, bufsize: int) -> bytes:
        pkt = self._in_packet
        if pkt["have_remaining"]:
            size = 1 + len(pkt["remaining_count"]) + pkt["remaining_length"]
            if size > self.max_incoming_packet:
                if self.on_packet_too_large is not None:
                    self.on_packet_too_large(size)
                self._rbuf, self._rbuf_pos = b"", 0
                raise PacketTooLarge(f"the broker sent a packet of {size} bytes; at most {self.max_incoming_packet} were agreed")
        if self._rbuf_sock is not self._sock:  # a new connection: nothing buffered from the old one counts
            self._rbuf, self._rbuf_pos, self._rbuf_sock = b"", 0, self._sock
        if self._rbuf_pos >= len(self._rbuf):
            self._rbuf, self._rbuf_pos = super()._sock_recv(max(bufsize, READ_CHUNK)), 0  # raises BlockingIOError if none
            if not self._rbuf:
                return b""  # the broker closed the connection
        start = self._rbuf_pos
        self._rbuf_pos = min(len(self._rbuf), start + bufsize)
        return self._rbuf[start:self._rbuf_pos]

    def _handle_publish(self) -> MQTTErrorCode:
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        n = len(packet)
        if qos > 1 or n < 3:
            return super()._handle_publish()
        topic_end = 2 + int.from_bytes(packet[0:2], "big")
        props_at = topic_end + (2 if qos else 0)
        if props_at >= n or packet[props_at] != 0 or topic_end == 2:
            return super()._handle_publish()  # properties, an empty topic (alias) or a short packet: paho decides
        mid = int.from_bytes(packet[topic_end:props_at], "big") if qos else 0
        message = mqtt.MQTTMessage(mid=mid, topic=bytes(packet[2:topic_end]))
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.payload = bytes(packet[props_at + 1:])
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def unparsed_bytes(self) -> int:
        """Bytes read from the socket that paho has not parsed yet (read from any thread: a hint, not a count)."""
        return max(0, len(self._rbuf) - self._rbuf_pos)

    def ack_many(self, mids: Sequence[int]) -> MQTTErrorCode:
        """PUBACK (success) for these QoS 1 messages, as one write.

        paho's ``ack`` queues one packet per message, each a wake-up of the network thread, a TLS
        record and a ``send``: thousands a second during a flood. An MQTT 5 PUBACK without a reason
        code is four bytes; the inbox writer acknowledges a whole commit's worth at once.
        """
        if not mids:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        packet = b"".join(_PUBACK.pack(0x40, 2, mid) for mid in mids)
        return self._packet_queue(0x40, packet, 0, 0)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None and self._rbuf_pos < len(self._rbuf):
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:  # a partial packet: the rest comes with the next read
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return rc


class _AgentClient(_BoundedClient, RecallableClient):
    """The agent's paho client: incoming packets bounded in size (:class:`_BoundedClient`), outgoing
    delivery messages handed over only while connected and recallable (:class:`RecallableClient`)."""


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
    return verified_tls_context("mqtt", ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file)


def verified_tls_context(section: str, *, ca_file: Path | None, cert_file: Path | None = None,
                         key_file: Path | None = None) -> ssl.SSLContext:
    """A client TLS context that always verifies the chain and the host name (TLS 1.2 or later).

    Every broker the agent talks to (the agency's, the homeowner's Home Assistant) goes through here;
    ``section`` names the configuration keys in the errors (``mqtt.ca_file``, ``home_assistant.ca_file``).
    """
    for name, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if path is not None and not path.is_file():
            raise UserError(f"{section}.{name} = {str(path)!r} is not a readable file; fix the path or remove the key")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise UserError(f"{section}.ca_file = {str(ca_file)!r} is not a PEM CA certificate ({exc})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert_file is not None and key_file is not None:
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file))
        except (ssl.SSLError, OSError) as exc:
            raise UserError(
                f"{section}.cert_file/{section}.key_file cannot be used as a client certificate ({exc}); "
                "give a PEM certificate and its unencrypted PEM key"
            ) from None
    return ctx


class MqttTransport:
    """Requests in (durable inbox, acked once stored), deliveries out (wait for PUBACK).

    Typical use by the service::

        flt = geohash.subscription_filter(cfg.mqtt.root, loc.lat, loc.lon, cfg.mqtt.precision)
        t = MqttTransport(cfg.mqtt, lat=loc.lat, lon=loc.lon,
                          client_id=default_client_id(key.kid, flt, key.client_id_secret()),
                          inbox=data_dir / "inbox.sqlite")
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
        inbox: Inbox | Path | None = None,
        receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM,
        on_event: Callable[[TransportEvent], None] | None = None,
        on_dropped: Callable[[str, IncomingMessage | None], None] | None = None,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 60,
        session_file: Path | None = None,
    ) -> None:
        """``session_file`` remembers which filters the broker's session for this client id holds
        (JSON, 0600), so that a later transport with another filter can unsubscribe the old ones.
        Without it only this transport's own reconnects are covered.

        ``inbox`` is where received messages wait for their decision (an :class:`Inbox` or the path
        of its database); the transport closes it when it stops. Without one (see
        :meth:`use_inbox`) the transport keeps its inbox in a private temporary folder that is
        removed at :meth:`stop`: fine for tools and tests, but it does not outlive the process."""
        if not config.tls and not config.allow_plaintext:
            raise UserError("mqtt.tls = false needs mqtt.allow_plaintext = true; refusing an unencrypted broker link")
        cid = config.client_id or client_id
        if not cid:
            raise UserError("no MQTT client id: set mqtt.client_id, or let the agent derive one from its device key")
        if not 1 <= receive_maximum <= 65535:
            raise ValueError("receive_maximum must be 1 to 65535")
        self.config = config
        self.client_id = cid
        self.subscription = geohash.subscription_filter(config.root, lat, lon, config.precision)
        self.plaintext = not config.tls
        self._inbox: Inbox | None = None
        self._inbox_path: Path | None = None
        self._own_inbox_dir: Path | None = None
        self._receive_maximum = receive_maximum
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
        self._lost: dict[int, Recall] = {}  # outgoing messages let go of when a connection dropped
        self._client: mqtt.Client | None = None
        # Receiving: paho's thread stages, the writer stores and acknowledges, the worker reads.
        self._work = threading.Condition(self._lock)  # wakes the writer: something staged or done
        self._staged: deque[IncomingMessage] = deque()
        self._staged_bytes = 0  # staged or being written: room on the stage frees only once stored
        self._staged_count = 0
        self._done: list[int] = []
        self._stored = 0  # bumped after every commit that stored something: wakes get()
        self._writer: threading.Thread | None = None
        self._writer_stopping = False
        self._ahead: deque[IncomingMessage] = deque()  # read from the inbox, not yet handed out (worker only)
        self._last_id = 0
        if inbox is not None:
            self.use_inbox(inbox)

    def use_inbox(self, inbox: Inbox | Path) -> None:
        """Where received messages wait for their decision; set before :meth:`start`."""
        if self._state is not ConnectionState.NEW:
            raise RuntimeError("the inbox is chosen before the transport starts")
        if isinstance(inbox, Inbox):
            self._inbox, self._inbox_path = inbox, None
        else:
            self._inbox, self._inbox_path = None, Path(inbox)

    # ----- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and keep reconnecting; returns at once (see :meth:`wait_ready`)."""
        with self._lock:
            if self._state is not ConnectionState.NEW:
                raise RuntimeError("a transport starts once; make a new one")
            self._state = ConnectionState.CONNECTING
        self._open_inbox()
        self._writer = threading.Thread(target=self._write_loop, name="doorbell-inbox", daemon=True)
        self._writer.start()
        c = _AgentClient(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        c.on_packet_too_large = self._packet_too_large
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
        """Disconnect cleanly (the broker keeps the session), join the network and writer threads, close the inbox.

        The writer first stores what the worker finished and sends the PUBACKs it owes, so they go
        out before the DISCONNECT; messages still on the stage are left unacknowledged with the
        broker, which offers them again to the next session.
        """
        c = self._client
        with self._lock:
            if self._state is ConnectionState.STOPPED:
                return
            was_started = self._state is not ConnectionState.NEW
            self._state = ConnectionState.STOPPED
            self._ready = False
            self._writer_stopping = True
            self._changed.notify_all()
            self._work.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=30)
        if c is not None:
            c.disconnect()
            c.loop_stop()
        if was_started:
            self._close_inbox()
        self._emit("stopped")

    def _open_inbox(self) -> None:
        if self._inbox is not None:
            return
        if self._inbox_path is None:
            # No inbox chosen: a private one for this process (tools, tests); the agent's service gives it data_dir's.
            self._own_inbox_dir = Path(tempfile.mkdtemp(prefix="doorbell-inbox-"))
            self._inbox_path = self._own_inbox_dir / "inbox.sqlite"
        self._inbox = Inbox(self._inbox_path)
        if self._inbox.messages:
            log.info("%d message(s) received before the last stop wait in the inbox for a decision", self._inbox.messages)

    def _close_inbox(self) -> None:
        if self._inbox is not None:
            self._inbox.close()
        if self._own_inbox_dir is not None:
            shutil.rmtree(self._own_inbox_dir, ignore_errors=True)

    def __enter__(self) -> MqttTransport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- for the worker ----------------------------------------------------------------

    def get(self, timeout: float | None = None) -> IncomingMessage | None:
        """The oldest stored message not yet handed out, or ``None`` after ``timeout`` seconds.

        For one worker thread. Messages come from the inbox in arrival order, including those a
        previous run stored but never finished (decided first, at the next start). A message that
        is handed out and never :meth:`ack`-ed stays in the inbox until the next start.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ahead:
                return self._ahead.popleft()
            with self._lock:
                if self._state is ConnectionState.STOPPED or self._inbox is None:
                    return None
                stored = self._stored
                inbox = self._inbox
            rows = inbox.after(self._last_id, READ_AHEAD)
            if rows:
                self._last_id = rows[-1].id
                self._ahead.extend(_incoming(r) for r in rows)
                continue
            with self._work:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._work.wait_for(partial(self._stored_since, stored), timeout=left)

    def unread_bytes(self) -> int:
        """Bytes the broker sent that paho has not parsed yet: > 0 means it is behind.

        For the decision worker, which steps aside while paho catches up (see the service's pacing):
        what waits in the kernel's receive buffer (``FIONREAD``, safe from any thread; never the TLS
        object, which only paho's thread may touch) plus what :class:`_BoundedClient` has read but not
        parsed. Any error (no connection, a socket closing meanwhile) reads as 0.
        """
        c = self._client
        sock = c.socket() if c is not None else None
        if c is None or sock is None:
            return 0
        try:
            waiting = array.array("i", [0])
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting, True)
        except (OSError, ValueError):
            return 0
        return int(waiting[0]) + (c.unparsed_bytes() if isinstance(c, _BoundedClient) else 0)

    def _stored_since(self, seen: int) -> bool:
        return self._stored != seen or self._state is ConnectionState.STOPPED

    def ack(self, msg: IncomingMessage) -> bool:
        """This message is dealt with: call it once its decision is durably recorded.

        The broker already has its PUBACK (sent when the message was stored); this lets the inbox
        forget it, in the writer's next batch. Always True.
        """
        with self._work:
            if msg.inbox_id > 0:
                self._done.append(msg.inbox_id)
                if len(self._done) in (1, FORGET_BATCH):  # the writer waits for the first, then for a batch
                    self._work.notify_all()
            self._counters["done"] += 1
            self._changed.notify_all()
        return True

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 30.0,
                *, expiry_s: int | None = None) -> bool:
        """Publish and wait for the broker's PUBACK; False on refusal or timeout, never a hang."""
        return self.publish_outcome(topic, payload, qos=qos, timeout=timeout, expiry_s=expiry_s).ok

    def publish_outcome(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 30.0,
                        *, expiry_s: int | None = None) -> PublishOutcome:
        """:meth:`publish` with the reason, for logs and tests.

        Waits (within ``timeout``) for a connection before handing the message over: nothing is
        queued for a connection that does not exist yet.
        """
        deadline = time.monotonic() + timeout
        self.wait_connected(timeout)
        handed = self.publish_nowait(topic, payload, qos=qos, expiry_s=expiry_s)
        if isinstance(handed, PublishOutcome):
            if self._state is not ConnectionState.STOPPED and not self.connected:
                return PublishOutcome(False, f"no PUBACK within {timeout:g} s (not connected to the broker)")
            return handed
        return self.wait_published(handed, max(0.0, deadline - time.monotonic()))

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1,
                       *, expiry_s: int | None = None) -> int | PublishOutcome:
        """Hand a message to paho without waiting: its message id for :meth:`wait_published`, or a failure.

        Lets a delivery keep a few chunks in flight instead of one round trip per chunk. Only
        while connected (the broker accepted our CONNECT): otherwise nothing is handed over and
        the failure says so, because paho would keep the message and send it by itself after a
        reconnect, ahead of whatever the caller decides meanwhile (the kill switch, a manifest
        that must go first). Taken back with :meth:`withdraw`.
        """
        c = self._client
        if c is None or self._state is ConnectionState.STOPPED:
            return self._publish_failed("the transport is not running")
        if qos not in (1, 2):
            raise ValueError("deliveries are published with QoS 1 (or 2); QoS 0 has no acknowledgement to wait for")
        assert isinstance(c, RecallableClient)
        props = Properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        try:
            info = c.publish_if_connected(topic, payload, qos=qos, properties=props,
                                          connected=lambda: self._state is ConnectionState.CONNECTED)
        except ValueError as exc:
            return self._publish_failed(f"cannot publish to {topic!r}: {exc}")
        if info is None:
            return self._publish_failed("not connected to the broker; nothing was handed over")
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            c.withdraw([info.mid])
            return self._publish_failed(f"paho refused the message: {mqtt.error_string(info.rc)}")
        return info.mid

    def wait_published(self, mid: int, timeout: float, *, abandon: bool = True) -> PublishOutcome:
        """Wait for the PUBACK of a message handed over by :meth:`publish_nowait`.

        ``abandon=False`` keeps listening for a late PUBACK, for a caller that will wait again.
        Otherwise a message not acknowledged in time is withdrawn (:meth:`withdraw`): it is not
        sent again, though what was already written to the network may still arrive. A message
        whose connection dropped first comes back at once as ``lost`` (see :class:`PublishOutcome`).
        """
        with self._changed:
            self._changed.wait_for(
                lambda: mid in self._acks or mid in self._lost or self._state is ConnectionState.STOPPED,
                timeout=timeout,
            )
            acked = mid in self._acks
            if not acked and mid in self._lost:
                left = self._lost.pop(mid).may_have_left
                self._counters["publish_failed"] += 1
                return PublishOutcome(False, "the connection to the broker was lost before its PUBACK", lost=True,
                                      may_have_left=left)
            if not acked and not abandon and self._state is not ConnectionState.STOPPED:
                return PublishOutcome(False, f"no PUBACK yet after {timeout:g} s")
        if not acked:
            # Outside our lock: paho's thread takes its message lock before ours (on_publish).
            came_in = self.withdraw([mid]).get(mid) is Recall.ACKED  # the PUBACK came in just now?
            with self._changed:
                acked = came_in and mid in self._acks
        if not acked:
            with self._changed:
                self._counters["publish_failed"] += 1
                if self._state is ConnectionState.STOPPED:
                    why = "the transport was stopped before the broker acknowledged it"
                elif self._state is ConnectionState.CONNECTED:
                    why = f"no PUBACK within {timeout:g} s"
                else:
                    why = f"no PUBACK within {timeout:g} s (not connected to the broker)"
            return PublishOutcome(False, why)
        with self._changed:
            rc = self._acks.pop(mid)
            if rc.is_failure:
                self._counters["publish_failed"] += 1
                return PublishOutcome(False, str(rc), rc.value)
            self._counters["published"] += 1
            return PublishOutcome(True, str(rc), rc.value)

    def withdraw(self, mids: list[int]) -> dict[int, Recall]:
        """Take back messages handed over by :meth:`publish_nowait` and not yet acknowledged.

        paho forgets them (they are never sent again, not even after a reconnect) and their
        packets leave the socket queue if not a byte of them was written. For each: ``ACKED`` (the
        broker accepted it before it could be taken back), ``ON_WIRE`` (at least partly written to
        the network: it may reach the broker) or ``WITHDRAWN`` (it never left this process). A
        message the broker refused with a failure reason code counts as ``WITHDRAWN``: nobody
        received it. Never call this while holding the transport's lock.
        """
        c = self._client
        with self._changed:
            lost = {mid: self._lost.pop(mid) for mid in mids if mid in self._lost}
        if c is None or not mids:
            return {mid: lost.get(mid, Recall.WITHDRAWN) for mid in mids}
        assert isinstance(c, RecallableClient)
        result = c.withdraw([mid for mid in mids if mid not in lost])
        result.update(lost)
        with self._changed:
            for mid, what in result.items():
                if what is Recall.ACKED:
                    rc = self._acks.get(mid)
                    if rc is not None and rc.is_failure:
                        self._acks.pop(mid, None)
                        result[mid] = Recall.WITHDRAWN
            self._changed.notify_all()
        return result

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
        """Messages received and not yet decided: on the stage, or in the inbox."""
        with self._lock:
            staged, forgetting = self._staged_count, len(self._done)
            inbox = self._inbox
        return staged + (inbox.messages if inbox is not None else 0) - forgetting

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
                "queued": self._staged_count + (self._inbox.messages if self._inbox is not None else 0) - len(self._done),
                "inbox": self._inbox.status() if self._inbox is not None else None,
                "receive_maximum": self._receive_maximum,
                "counters": dict(self._counters),
            }

    def wait_until(self, predicate: Callable[[MqttTransport], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on every state or counter change)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout=timeout)

    def wait_ready(self, timeout: float) -> bool:
        return self.wait_until(lambda t: t._ready, timeout)

    @property
    def connected(self) -> bool:
        """The broker accepted our CONNECT on the current connection: outgoing messages may be handed over."""
        return self._state is ConnectionState.CONNECTED

    @property
    def generation(self) -> int:
        """Counts accepted connections: a change tells a long delivery that the link was lost and regained."""
        return self._generation

    def wait_connected(self, timeout: float) -> bool:
        """Block until :attr:`connected` (or the transport stops), at most ``timeout`` seconds."""
        return self.wait_until(lambda t: t._state in (ConnectionState.CONNECTED, ConnectionState.STOPPED), timeout) \
            and self.connected

    # ----- paho callbacks (network thread): count, check, stage; nothing slow --------------

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
        self._let_go_of_outgoing()
        if was_connected:
            log.warning("disconnected from the broker (%s); reconnecting with backoff", reason_code)
            self._emit(f"disconnected: {reason_code}")

    def _let_go_of_outgoing(self) -> None:
        """paho's thread, the connection just lost: paho forgets every outgoing message it still holds.

        Otherwise paho sends them again by itself right after the CONNACK, before the agent has had
        a chance to look: a delivery the rules no longer allow, or one the kill switch stopped during
        the outage, would leave, and ahead of messages the agent hands over meanwhile. Each is
        reported to :meth:`wait_published` as lost (and whether it may have reached the broker); the
        caller hands it over again, in its own order, once connected. QoS 1 needs no more than that:
        the broker keeps no state for a PUBLISH it did not acknowledge, so a copy under a new packet
        id is the same as the DUP paho would have sent. Runs after ``_state`` left CONNECTED, so no
        new message can be handed over meanwhile.
        """
        c = self._client
        if not isinstance(c, RecallableClient):
            return
        with c._out_message_mutex:
            mids = list(c._out_messages)
        if not mids:
            return
        recalled = c.withdraw(mids)
        with self._changed:
            for mid, what in recalled.items():
                if what is not Recall.ACKED:
                    self._lost[mid] = what
            self._changed.notify_all()

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
            received_at=datetime.now(UTC),
            qos=message.qos,
            mid=message.mid,
            dup=bool(message.dup),
            retain=bool(message.retain),
            expiry_s=expiry,
            generation=generation,
        )
        size = len(item.payload)
        with self._changed:
            # The stage is emptied by one commit every few milliseconds; it only fills up when the disk
            # stops taking writes. Waiting here holds the broker back through TCP, briefly.
            wait_s = min(STAGE_WAIT_S, self.config.keepalive_s / 2)
            room = self._changed.wait_for(
                lambda: self._state is ConnectionState.STOPPED or (
                    self._staged_count < STAGE_MAX_MESSAGES and self._staged_bytes + size <= STAGE_MAX_BYTES),
                timeout=wait_s,
            )
            if self._state is ConnectionState.STOPPED:
                return  # not stored, not acknowledged: the broker offers it to the next session
            if room:
                self._staged.append(item)
                self._staged_count += 1
                self._staged_bytes += size
                self._work.notify_all()
                return
            self._counters["inbox_unwritable"] += 1
            self._changed.notify_all()
        # Left unacknowledged: the broker keeps it in our session and offers it again after a reconnect.
        log.error("the inbox took no message for %.0f s (is the disk full or failing?); a message was left "
                  "with the broker, which offers it again after a reconnect", wait_s)
        self._notify_dropped("inbox_unwritable", item)

    def _drop(self, client: mqtt.Client, message: mqtt.MQTTMessage, reason: str,
              item: IncomingMessage | None) -> None:
        if message.qos > 0:
            client.ack(message.mid, message.qos)  # done with it: do not let it hold an in-flight slot
        with self._changed:
            self._counters[reason] += 1
            self._changed.notify_all()
        self._notify_dropped(reason, item)

    def _notify_dropped(self, reason: str, item: IncomingMessage | None) -> None:
        if self.on_dropped is not None:
            try:
                self.on_dropped(reason, item)
            except Exception:
                log.exception("drop handler failed")

    def _packet_too_large(self, size: int) -> None:
        """paho's thread, about to drop the connection: a broker that ignores our Maximum Packet Size."""
        text = (f"the broker sent a packet of {size} bytes, far more than the {MAX_PACKET_BYTES} this agent accepts; "
                "the connection was dropped before reading it")
        with self._changed:
            self._counters["packet_too_large"] += 1
            self._last_error = text
            self._changed.notify_all()
        log.warning("%s", text)

    # ----- the inbox writer (its own thread): store, then acknowledge --------------------------

    def _write_loop(self) -> None:
        """Group-commit staged messages (and forget finished ones) in one transaction, then send the PUBACKs.

        One commit per batch, however large the batch: a flood costs a few hundred fsyncs a second,
        not one per message. A commit that fails (full disk, I/O error) is retried with the same
        messages; meanwhile the stage fills and paho's thread holds the broker back.
        """
        assert self._inbox is not None
        inbox = self._inbox
        failing_since: float | None = None
        while True:
            with self._work:
                self._work.wait_for(lambda: bool(self._staged or self._done or self._writer_stopping))
                if not (self._staged or self._writer_stopping) and len(self._done) < FORGET_BATCH:
                    # Only decided messages to forget: let more join this commit. New messages never wait.
                    self._work.wait_for(lambda: bool(self._staged or self._writer_stopping
                                                     or len(self._done) >= FORGET_BATCH), FORGET_AFTER_S)
                stopping = self._writer_stopping
                batch = [] if stopping else list(self._staged)  # at stop, staged messages stay with the broker
                self._staged.clear()
                done, self._done = self._done, []
                if stopping:
                    self._staged_count, self._staged_bytes = 0, 0
            if not batch and not done:
                return
            try:
                ids = inbox.commit([_stored_form(m) for m in batch], done)
            except Exception as exc:  # sqlite3.Error, OSError: nothing was stored or forgotten
                with self._work:
                    self._counters["inbox_errors"] += 1
                    self._staged.extendleft(reversed(batch))
                    self._done[:0] = done
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.error("cannot write the inbox %s (%s); retrying every %g s", inbox.path, exc, INBOX_RETRY_S)
                    if stopping:
                        return
                    self._work.wait_for(lambda: self._writer_stopping, timeout=INBOX_RETRY_S)
                continue
            if failing_since is not None:
                log.warning("the inbox %s is writable again after %.0f s", inbox.path, time.monotonic() - failing_since)
                failing_since = None
            self._acknowledge(batch, ids)
            if stopping:
                return

    def _acknowledge(self, batch: list[IncomingMessage], ids: list[int | None]) -> None:
        """After a commit: PUBACK what is stored (or dropped as over the bound) on the connection that delivered it."""
        with self._lock:
            c, generation = self._client, self._generation
            connected = self._state is ConnectionState.CONNECTED
        acked = skipped = 0
        stored = sum(1 for mid in ids if mid is not None)
        full = [msg for msg, mid in zip(batch, ids, strict=True) if mid is None]
        try:
            owed: list[int] = []  # QoS 1 packet ids to PUBACK on this connection, in one write
            for msg in batch:
                if msg.qos == 0:
                    continue
                if c is None or not connected or msg.generation != generation:
                    skipped += 1
                elif msg.qos == 1:
                    owed.append(msg.mid)
                elif c.ack(msg.mid, msg.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    acked += 1
                else:
                    skipped += 1
            if owed:
                assert isinstance(c, _BoundedClient)
                ok = c.ack_many(owed) == MQTTErrorCode.MQTT_ERR_SUCCESS
                acked, skipped = (acked + len(owed), skipped) if ok else (acked, skipped + len(owed))
        except Exception:  # stored all the same; without its PUBACK the broker offers it again after a reconnect
            log.exception("could not acknowledge stored messages")
        finally:
            with self._changed:  # whatever happened above, the stage must not stay full of written messages
                self._counters["received"] += stored
                self._counters["inbox_full"] += len(full)
                self._counters["acked"] += acked
                self._counters["ack_skipped"] += skipped
                self._staged_count -= len(batch)
                self._staged_bytes -= sum(len(m.payload) for m in batch)
                if stored:
                    self._stored += 1
                self._changed.notify_all()  # paho's thread waiting for room on the stage
                self._work.notify_all()  # get() waiting for a stored message
        if full:
            log.warning("the inbox holds its limit of %d messages / %d bytes; dropped %d message(s)",
                        self._inbox.max_messages if self._inbox else 0, self._inbox.max_bytes if self._inbox else 0,
                        len(full))
            for msg in full:
                self._notify_dropped("inbox_full", msg)

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                        reason_code: ReasonCode, properties: Properties | None) -> None:
        # paho calls this only for a message it still holds, so never for one withdrawn (every give-up
        # withdraws): a late PUBACK cannot be taken for a later message that reuses the id.
        with self._changed:
            self._acks[mid] = reason_code
            self._changed.notify_all()
