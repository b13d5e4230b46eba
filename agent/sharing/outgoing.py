"""Outgoing QoS 1 messages that can be taken back until they reach the network.

Why this exists: paho keeps every unacknowledged QoS 1 message in its session
(``_out_messages``) and sends it again after a reconnect, and it queues a
message handed over while it is not connected (``MQTT_ERR_NO_CONN``) to send
it on the next connection. For a delivery that is exactly wrong once the
resident presses the kill switch (or the agent gives the delivery up): a chunk
queued during a broker outage would still leave after the switch, and the
requester could assemble the whole clip. paho has no public way to take one
message back (``drop_out_messages`` drops them all, and leaves the packets
already queued for the socket), so :class:`RecallableClient` adds two things:

- :meth:`RecallableClient.publish_if_connected`: hand a message over only while
  the caller says the link is up, atomically with paho's own bookkeeping, and
  never leave it queued for a later connection;
- :meth:`RecallableClient.withdraw`: forget messages paho holds for us and pull
  their packets out of the socket queue if not one byte of them was written.
  What was written (even partly) cannot be recalled: it is reported as
  :attr:`Recall.ON_WIRE`, so the caller can count it as handed over, and it is
  at least never sent again.

Both touch paho 2.x internals, under paho's own lock (``_out_message_mutex``,
which every path that changes ``_out_messages`` holds) plus one lock of ours
around ``_packet_write`` (the only code that writes packets to the socket,
which paho runs without any lock). :func:`check_internals` verifies on every
new client that the internals are the ones this was written against, so a
paho upgrade that changes them stops the agent with a clear error rather than
silently leaking chunks; ``tests/test_delivery_faults.py`` checks the behaviour
against a real broker with the installed paho.

Lock order, to stay clear of deadlocks with paho's network thread (which holds
``_out_message_mutex`` while it calls ``on_publish``, and while it writes
packets after a CONNACK): ``_out_message_mutex`` first, then ``_write_lock``;
never call in here while holding a lock that a paho callback takes.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MessageState, MessageType, MQTTErrorCode
from paho.mqtt.properties import Properties

_PUBLISH = int(MessageType.PUBLISH)
_AWAITING_BROKER = frozenset({
    MessageState.MQTT_MS_WAIT_FOR_PUBACK, MessageState.MQTT_MS_WAIT_FOR_PUBREC, MessageState.MQTT_MS_WAIT_FOR_PUBCOMP,
})  # fmt: skip
"""States in which paho counts a message in ``_inflight_messages`` (its packet was queued for the socket)."""


class Recall(str, Enum):
    """What became of a message :meth:`RecallableClient.withdraw` was asked to take back."""

    ACKED = "acked"
    """paho no longer held it: the broker had acknowledged it (or it was never handed over)."""
    ON_WIRE = "on_wire"
    """At least part of it was written to the network (on this or an earlier connection): it may
    reach the broker, but paho will never send it again."""
    WITHDRAWN = "withdrawn"
    """Not one byte of it left this process, and now it never will."""

    @property
    def may_have_left(self) -> bool:
        return self is not Recall.WITHDRAWN


class PahoInternalsChanged(RuntimeError):
    """The installed paho-mqtt is not laid out as :class:`RecallableClient` expects."""


def check_internals(client: mqtt.Client) -> None:
    """Fail loudly if paho's internals differ from those of paho-mqtt 2.1/2.2 that this module relies on."""
    problems = []
    expected: dict[str, type | tuple[type, ...]] = {
        "_out_messages": dict, "_out_packet": collections.deque, "_inflight_messages": int,
        "_max_inflight_messages": int,
    }  # fmt: skip
    for name, kind in expected.items():
        if not isinstance(getattr(client, name, None), kind):
            problems.append(f"{name} is not a {kind}")
    mutex = getattr(client, "_out_message_mutex", None)
    if not (hasattr(mutex, "acquire") and hasattr(mutex, "release")):
        problems.append("_out_message_mutex is not a lock")
    for name in ("_packet_write", "_update_inflight"):
        if not callable(getattr(mqtt.Client, name, None)):
            problems.append(f"Client.{name} is missing")
    if not hasattr(client, "_sock"):
        problems.append("_sock is missing")
    if problems:
        raise PahoInternalsChanged(
            f"paho-mqtt {getattr(mqtt, '__version__', '?')} is not supported: {'; '.join(problems)}. "
            "The agent needs paho-mqtt 2.1 or 2.2 to be able to take back chunks of a delivery the kill switch stops."
        )


class RecallableClient(mqtt.Client):
    """paho's client, with QoS 1 messages handed over only while connected and taken back on request.

    Combine it with other paho subclasses by multiple inheritance; every override calls ``super()``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_lock = threading.RLock()
        check_internals(self)

    def _packet_write(self) -> MQTTErrorCode:
        # paho pops a packet, writes it and may push the rest of it back, all without a lock: while
        # :meth:`withdraw` holds this lock, no packet is half-way through a write it cannot see.
        with self._write_lock:
            return super()._packet_write()

    def publish_if_connected(self, topic: str, payload: bytes, *, qos: int, properties: Properties | None,
                             connected: Callable[[], bool]) -> mqtt.MQTTMessageInfo | None:
        """Hand a message to paho only if ``connected()`` says the broker has accepted our CONNECT.

        Returns None, having handed over nothing, when not connected. The check and the hand-over
        happen under paho's message lock, so a reconnect cannot slip in between; a message paho
        would have queued for the next connection (``MQTT_ERR_NO_CONN``: the socket went away
        meanwhile) is taken back at once, so nothing is left to go out by itself later.
        ``ValueError`` (a bad topic) propagates.
        """
        with self._out_message_mutex:
            if not connected() or self._sock is None:
                return None
            info = self.publish(topic, payload, qos=qos, properties=properties)
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                self._forget(info.mid)
                return None
            return info

    def withdraw(self, mids: Iterable[int]) -> dict[int, Recall]:
        """Take back these messages: paho forgets them, and unwritten packets leave the socket queue.

        Returns what became of each (see :class:`Recall`). A packet of which some bytes are already
        written stays in the queue and is finished (cutting it off would break the MQTT stream); it
        is :attr:`Recall.ON_WIRE`. A message that went out on an earlier connection (paho marks it
        DUP when the connection drops) is :attr:`Recall.ON_WIRE` too, since the broker may have it.
        """
        wanted = list(mids)
        out: dict[int, Recall] = {}
        with self._out_message_mutex, self._write_lock:
            queued: dict[int, list[Any]] = {}
            for pkt in list(self._out_packet):  # a copy: paho's reconnect may clear the deque meanwhile
                if pkt["command"] & 0xF0 == _PUBLISH and pkt["qos"] > 0:
                    queued.setdefault(pkt["mid"], []).append(pkt)
            freed = False
            for mid in wanted:
                msg = self._out_messages.get(mid)
                if msg is None:
                    out[mid] = Recall.ACKED
                    continue
                left = bool(msg.dup)
                packets = queued.get(mid, [])
                for pkt in packets:
                    if pkt["pos"] > 0:
                        left = True  # partly written: it has to be finished
                    else:
                        try:
                            self._out_packet.remove(pkt)
                        except ValueError:
                            pass  # the deque was cleared by a reconnect: it was never written
                if msg.state in _AWAITING_BROKER and not packets:
                    left = True  # its packet was queued on this connection and is gone: written in full
                freed |= self._forget(mid)
                out[mid] = Recall.ON_WIRE if left else Recall.WITHDRAWN
            if freed and self._max_inflight_messages > 0 and self._sock is not None:
                self._update_inflight()  # as paho does after a PUBACK: a message queued behind ours may go
        return out

    def _forget(self, mid: int) -> bool:
        """Drop ``mid`` from paho's session (message lock held); True if it held an in-flight slot."""
        msg = self._out_messages.pop(mid, None)
        if msg is None:
            return False
        if msg.state in _AWAITING_BROKER and self._inflight_messages > 0:
            self._inflight_messages -= 1
            return True
        return False
