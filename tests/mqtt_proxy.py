"""A TCP relay between a test's MQTT client and the real Mosquitto, to make network faults happen on cue.

Runs in front of the broker's plaintext listener (the only one whose packets a relay can read). It
can refuse connections (the port is bound but not listening, so a connect is refused at once, as
with a broker that is down), delay or hold what the broker sends back (a slow link, a CONNACK that
takes its time), black-hole both directions while keeping the connections open (a link that died
without a FIN), and cut every connection, dropping whatever it holds. It parses the MQTT packets
the client sends, so a test can wait for "the agent's CONNECT arrived" or react the moment a given
PUBLISH reaches the network, instead of sleeping.

Only for tests on 127.0.0.1; every wait has a timeout.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.broker import free_ports

CONNECT, PUBLISH = 1, 3


@dataclass
class SeenPacket:
    at: float  # time.monotonic() when the whole packet had reached the relay
    kind: int  # MQTT control packet type (1 CONNECT, 3 PUBLISH, ...)
    topic: str | None  # for PUBLISH
    size: int


class _Parser:
    """Splits a byte stream into MQTT control packets (fixed header, remaining length, body)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while True:
            if len(self.buf) < 2:
                return out
            length, mult, i = 0, 1, 1
            while True:
                if i >= len(self.buf):
                    return out
                b = self.buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if len(self.buf) < i + length:
                return out
            out.append(bytes(self.buf[: i + length]))
            del self.buf[: i + length]


def _describe(packet: bytes) -> tuple[int, str | None]:
    kind = packet[0] >> 4
    if kind != PUBLISH:
        return kind, None
    i = 1
    while packet[i] & 0x80:
        i += 1
    i += 1
    n = int.from_bytes(packet[i : i + 2], "big")
    return kind, packet[i + 2 : i + 2 + n].decode("utf-8", "replace")


@dataclass
class _Link:
    client: socket.socket
    upstream: socket.socket
    down: queue.Queue[tuple[float, bytes] | None] = field(default_factory=queue.Queue)
    held_up: list[bytes] = field(default_factory=list)
    held_down: list[bytes] = field(default_factory=list)
    closed: bool = False


class MqttProxy:
    """See the module docstring. ``upstream_port`` is the broker's plaintext port."""

    def __init__(self, upstream_port: int, *, host: str = "127.0.0.1", rcvbuf: int | None = None) -> None:
        """``rcvbuf`` shrinks the relay's receive buffer for the client's connections, so that a
        :meth:`stall` backs data up into the client quickly (a slow uplink)."""
        self.host = host
        self.rcvbuf = rcvbuf
        self._flowing = threading.Event()
        self._flowing.set()
        self.upstream_port = upstream_port
        self.port = free_ports(1)[0]
        self._lock = threading.Condition()
        self._links: list[_Link] = []
        self._listener: socket.socket | None = None
        self._stopped = False
        self.black_hole = False  # both directions held; nothing is forwarded
        self.hold_down = False  # broker -> client held (e.g. the CONNACK)
        self.down_delay_s = 0.0  # latency added to everything the broker sends back
        self.seen: list[SeenPacket] = []  # what the client sent, in order
        self.on_packet: Callable[[SeenPacket], None] | None = None  # runs on the relay's thread: keep it short
        self._bind()

    # ---- control

    def _bind(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf is not None:  # before listen(): accepted sockets inherit it, window scaling included
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        s.bind((self.host, self.port))
        self._listener = s  # bound, not listening: a connect is refused, as by a host with no broker

    def accept(self) -> None:
        """Start taking connections (and relaying them to the broker)."""
        with self._lock:
            assert self._listener is not None
            self._listener.listen(8)
            listener = self._listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True, name="proxy-accept").start()

    def refuse(self) -> None:
        """Stop taking connections (those open stay open; see :meth:`cut`)."""
        with self._lock:
            old, self._listener = self._listener, None
        if old is not None:
            old.close()
        self._bind()

    def cut(self) -> None:
        """Close every connection at once; whatever the relay still holds is lost."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            self._close(link)

    def stall(self) -> None:
        """Stop reading from the client: what it sends backs up in its own socket and then in its process."""
        self._flowing.clear()

    def release(self) -> None:
        """Read from the client again, and forward what was held (black hole or held downstream), in order."""
        self._flowing.set()
        with self._lock:
            self.black_hole = self.hold_down = False
            for link in self._links:
                for data in link.held_up:
                    self._send(link.upstream, data)
                for data in link.held_down:
                    link.down.put((time.monotonic(), data))
                link.held_up.clear()
                link.held_down.clear()

    def wait_for(self, predicate: Callable[[list[SeenPacket]], bool], timeout: float) -> bool:
        """Block until ``predicate(seen)`` holds (checked whenever a packet arrives)."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self.seen), timeout)

    def published(self, suffix: str = "") -> list[SeenPacket]:
        with self._lock:
            return [p for p in self.seen if p.kind == PUBLISH and (p.topic or "").endswith(suffix)]

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.cut()

    # ---- relaying

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # refused or closed
            try:
                upstream = socket.create_connection((self.host, self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            link = _Link(client, upstream)
            with self._lock:
                if self._stopped:
                    client.close()
                    upstream.close()
                    return
                self._links.append(link)
            for target, name in ((self._pump_up, "up"), (self._pump_down, "down"), (self._send_down, "send-down")):
                threading.Thread(target=target, args=(link,), daemon=True, name=f"proxy-{name}").start()

    def _pump_up(self, link: _Link) -> None:
        parser = _Parser()
        while True:
            while not self._flowing.wait(0.5):
                if link.closed:
                    return
            try:
                data = link.client.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._close(link)
                return
            for packet in parser.feed(data):
                kind, topic = _describe(packet)
                seen = SeenPacket(time.monotonic(), kind, topic, len(packet))
                with self._lock:
                    if link.closed:
                        return
                    self.seen.append(seen)
                    if self.black_hole:
                        link.held_up.append(packet)
                    else:
                        self._send(link.upstream, packet)
                    self._lock.notify_all()
                if self.on_packet is not None:
                    self.on_packet(seen)

    def _pump_down(self, link: _Link) -> None:
        while True:
            try:
                data = link.upstream.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._close(link)
                return
            with self._lock:
                if link.closed:
                    return
                if self.black_hole or self.hold_down:
                    link.held_down.append(data)
                    continue
            link.down.put((time.monotonic() + self.down_delay_s, data))

    def _send_down(self, link: _Link) -> None:
        while True:
            item = link.down.get()
            if item is None:
                return
            due, data = item
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # the link's latency, not a wait for an event
            with self._lock:
                if link.closed:
                    return
            self._send(link.client, data)

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the other side is gone; its pump notices

    def _close(self, link: _Link) -> None:
        with self._lock:
            if link.closed:
                return
            link.closed = True
            if link in self._links:
                self._links.remove(link)
            self._lock.notify_all()
        link.down.put(None)
        for s in (link.client, link.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
