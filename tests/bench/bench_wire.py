"""The agent over the wire: a real TLS Mosquitto with ACLs, the real service, the agency's reference client.

Every figure is printed beside a reference measured in the same run on the
same broker, as a ratio:

1. **PUBLISH to logged decision**, p50 and p99 over 1,000 distinct, freshly
   signed requests (built before timing starts, sent one at a time, after 20
   unmeasured warm-up requests): from the
   agency's publish call to the service's ``on_decision`` hook, which fires
   once the decision is durably in the access log and the request is acked.
   The requests ask for a window the buffer holds no footage for, so each is
   decided ``no_footage``: fully verified, checked against every rule, written
   to the replay memory and the access log (fsync), and nothing is delivered.
   Reference: the raw MQTT round trip paho -> Mosquitto -> paho for a payload of
   the same size (the floor), interleaved with ours; and one bare Ed25519
   verification beside the service's own decide-and-record time. Goal: p99 <= 10 ms.
2. **Flood**: 5,000 invalid messages per second for 10 seconds (random bytes,
   a trusted key's signature broken, an unknown key; a third each) at QoS 1 to
   the agent's request topic, from a separate process (a minimal asyncio MQTT 5
   client over TLS, two connections, each keeping within the broker's Receive
   Maximum), while the agent records a realtime synthetic 720p/15 camera, with
   one valid request published in the middle. Reported: dropped frames (vs the
   same recorder with no flood, same run), whether the valid request was
   granted and how long it took, access-log entries added, pre-auth counters,
   what the transport received and dropped, the achieved rate. Then the same
   flood again with an agency that re-publishes the identical request every
   second until it is decided (the replay memory makes extra copies harmless).
3. **Delivery** of a 60-second 720p/15 fps clip (buffer pre-filled by the real
   recorder from a non-realtime synthetic camera): bytes/s from the first
   chunk's publish (taken as the manifest's PUBACK event, right after which the
   agent seals and publishes chunk 0) to the last chunk's PUBACK (the service's
   ``delivery_events``), median of 7 interleaved rounds, vs raw paho publishing the same
   bytes in the same 262144-byte chunks at QoS 1 (pipelined, and one at a time
   as the agent does); and grant to first chunk. Goals >= 0.6x and <= 0.5 s.

Everything (broker, publisher, agent, agency) runs on this machine over
127.0.0.1, so the flood's publisher competes with the agent for the same
CPU: harsher than an attacker on another machine. The test broker's
per-message debug logging (``log_type all``) is turned down to
error/warning/notice/information here, as on a real broker; nothing else of
its configuration (TLS, passwords, client certificates, ACLs, persistence,
Mosquitto's default queue limits) is changed.

Run: ``.venv/bin/python -m tests.bench wire`` (or ``-m tests.bench.bench_wire``).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.bench.report import Report

ROOT_DIR = Path(__file__).resolve().parents[2]
HOME = (32.29876, -90.18481)
PROGRAM = "jackson-ms/camera-pilot-2026"
FPS = 15
FILL = (1280, 720)  # the buffer for the delivery benchmark
FILL_S = 66  # footage recorded before the agent starts (a 60 s window fits with room)
FILL_AGO_S = 90  # ... starting this long before the benchmark starts
CLIP_S = 60
LATENCY_N = 1000
LATENCY_WARMUP = 20
DELIVERY_ROUNDS = 7
FLOOD_RATE = 5000
FLOOD_S = 10.0
FLOOD_CLIENTS = int(os.environ.get("BENCH_WIRE_FLOOD_CLIENTS", "2"))  # MQTT connections in the publisher process
FLOOD_RES = tuple(int(v) for v in os.environ.get("BENCH_WIRE_FLOOD_RES", "1280x720").split("x"))
BASELINE_S = 8.0
RETRY_AFTER_FLOOD_S = 10.0  # the re-publishing agency keeps trying this long after the flood ends  # recording with no flood, for the dropped-frames reference
WAIT = 30.0


# ----------------------------------------------------------------------------- small helpers


def _pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def _quiet_broker_class():
    from tests.broker import Broker

    class QuietBroker(Broker):
        """The test suite's broker, minus one debug line per message (a real broker does not log those)."""

        def _write_config(self) -> None:
            super()._write_config()
            conf = self.workdir / "mosquitto.conf"
            quiet = "".join(f"log_type {t}\n" for t in ("error", "warning", "notice", "information"))
            conf.write_text(conf.read_text().replace("log_type all\n", quiet))

    return QuietBroker


class _Hooks:
    """What the benchmark hears from the service; the hooks run on its worker threads, so they only stamp and enqueue."""

    def __init__(self) -> None:
        self.decisions: queue.Queue[tuple[str, str, float]] = queue.Queue()
        self.events: queue.Queue[tuple[str, str, dict[str, Any], float]] = queue.Queue()
        self.first: dict[str, tuple[str, float]] = {}  # jti -> the first decision about it, and when

    def on_decision(self, decision: Any) -> None:
        t = time.perf_counter()
        if decision is not None and decision.request is not None:  # garbage is counted elsewhere
            self.first.setdefault(decision.request.jti, (str(decision.reason), t))
            self.decisions.put((decision.request.jti, str(decision.reason), t))

    def on_delivery(self, event: str, job: Any, details: dict[str, Any]) -> None:
        self.events.put((event, job.jti, details, time.perf_counter()))

    def decision_for(self, jti: str, timeout: float = WAIT) -> tuple[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the agent did not decide request {jti} within {timeout:g} s")
            try:
                got, reason, t = self.decisions.get(timeout=left)
            except queue.Empty:
                continue
            if got == jti:
                return reason, t

    def delivery_of(self, jti: str, timeout: float = WAIT) -> tuple[str, list[tuple[str, float]], dict[str, Any]]:
        """(how it ended, [(topic, time of its PUBACK)...], the end's details)."""
        sent: list[tuple[str, float]] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the delivery for {jti} did not finish within {timeout:g} s")
            try:
                event, got, details, t = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if got != jti:
                continue
            if event == "sent":
                sent.append((details["topic"], t))
            elif event != "handing":
                return event, sent, details


@dataclass
class _Env:
    tmp: Path
    broker: Any
    cfg: Any
    requester: Any  # agent.city.keys.SigningKey
    stranger: Any
    trusted_public: Any  # Ed25519PublicKey of the requester
    fill_start: datetime


def _setup(tmp: Path, stack: ExitStack) -> _Env:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.city import keygen, load_signing_key
    from agent.config import load_config
    from agent.protocol.jose import b64url_decode
    from agent.protocol.trust import TrustStore
    from agent.state.truststore import save_trust_store

    broker = _quiet_broker_class()(tmp / "mosquitto")
    stack.callback(broker.stop)
    broker.start()
    data = tmp / "data"
    conf = tmp / "agent.toml"
    conf.write_text(textwrap.dedent(f"""\
        [paths]
        data_dir = "{data}"

        [camera]
        width = {FILL[0]}
        height = {FILL[1]}
        fps = {FPS}
        encoder = "libx264"

        [buffer]
        segment_seconds = 4

        [clock]
        assume_synced = true

        [policy]
        program = "{PROGRAM}"
        location = {{ lat = {HOME[0]}, lon = {HOME[1]} }}
        timezone = "America/Chicago"
        max_radius_m = 1000
        grants_per_issuer_per_day = 1000

        [policy.consent]
        start = 2026-01-01T00:00:00Z
        end = 2030-01-01T00:00:00Z
        """))
    cfg = load_config(conf)
    cfg = cfg.model_copy(update={"mqtt": broker.mqtt_config("agent", precision=4, client_id="bench-agent")})
    keys = keygen(iss="jackson-pd", kid="jpd-bench", out_dir=tmp / "city")
    save_trust_store(TrustStore.from_jwks(keys.public_jwks), cfg.paths.trust_file)
    other = keygen(iss="jackson-pd", kid="stranger", out_dir=tmp / "stranger")
    public = Ed25519PublicKey.from_public_bytes(b64url_decode(keys.public_jwks["keys"][0]["x"]))
    fill_start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=FILL_AGO_S)
    return _Env(tmp, broker, cfg, load_signing_key(keys.private_path), load_signing_key(other.private_path),
                public, fill_start)


def _fill_buffer(env: _Env) -> float:
    """FILL_S seconds of 720p15 footage through the real recorder (non-realtime camera); returns wall seconds."""
    from agent.buffer.capture import SourceEnded
    from agent.buffer.capture.synthetic import SyntheticSource
    from agent.runtime.supervisor import start_recording
    from agent.timeutil import to_us

    class Finite(SyntheticSource):
        def read(self):
            if self._index >= FILL_S * FPS:
                raise SourceEnded("the benchmark's footage is complete")
            return super().read()

    t0 = time.perf_counter()
    handle = start_recording(env.cfg, source=Finite(*FILL, FPS, realtime=False, start_us=to_us(env.fill_start)))
    try:
        if not handle.wait(300):
            raise RuntimeError("filling the buffer took over 300 s")
    finally:
        handle.stop()
        handle.wait(30)
    if handle.recorder.error is not None:
        raise RuntimeError(f"filling the buffer failed: {handle.recorder.error}")
    return time.perf_counter() - t0


class _Agent:
    def __init__(self, env: _Env) -> None:
        from agent.sharing.service import RequestService
        from agent.sharing.transport import MqttTransport
        from agent.state.devicekey import DeviceKey

        self.hooks = _Hooks()
        loc = env.cfg.require_policy().location
        self.transport = MqttTransport(env.cfg.require_mqtt(), lat=loc.lat, lon=loc.lon, on_dropped=self._dropped)
        self.svc = RequestService(env.cfg, transport=self.transport,
                                  device_key=DeviceKey.load_or_create(env.cfg.paths.device_key_file))
        self.svc.on_decision = self.hooks.on_decision
        self.svc.delivery_events = self.hooks.on_delivery
        self._watched: bytes | None = None
        self.dropped_reason: str | None = None
        self.svc.start()
        if not self.transport.wait_ready(WAIT):
            self.stop()
            raise RuntimeError(f"the agent did not connect: {self.transport.last_error}")

    def watch_drops(self, payload: bytes) -> None:
        """Note it if the transport itself drops this payload (paho's thread calls _dropped)."""
        self._watched, self.dropped_reason = payload, None

    def _dropped(self, reason: str, item: Any) -> None:
        if item is not None and self._watched is not None and item.payload == self._watched:
            self.dropped_reason = f"dropped by the agent's transport: {reason}"

    def stop(self) -> None:
        self.svc.stop()
        if not self.svc.wait(WAIT):
            print("  (warning: the agent's threads did not stop within 30 s)", flush=True)


class _Agency:
    """The city side, from the reference client library; subscribed to every delivery."""

    def __init__(self, env: _Env) -> None:
        from agent.city.mqtt import BrokerSettings, MqttSession
        from agent.protocol.geohash import encode, request_topic

        cred = env.broker.credentials["agency"]
        settings = BrokerSettings(host=env.broker.host, port=env.broker.port, ca_file=env.broker.ca_file,
                                  cert_file=cred.cert_file, key_file=cred.key_file,
                                  username=cred.username, password=cred.password)
        self.session = MqttSession(settings, client_id=f"bench-city-{secrets.token_hex(3)}", clean_start=True,
                                   session_expiry_s=300)
        self.session.connect()
        self.session.subscribe(f"{env.broker.root}/v1/deliveries/#")
        self.env = env
        self.topic = request_topic(env.broker.root, encode(*HOME, 5))

    def build(self, window: tuple[datetime, datetime], *, signer: Any = None, jti: str | None = None):
        from agent.city import build_request

        return build_request(requester=signer or self.env.requester, program=PROGRAM, officer="badge-4471",
                             case="JPD-2026-001234", purpose="Burglary reported on this block.", basis="consent",
                             lat=HOME[0] + 0.001, lon=HOME[1] + 0.001, radius_m=300,
                             window_start=window[0], window_end=window[1], jti=jti)

    def publish(self, message: str | bytes, topic: str | None = None) -> None:
        self.session.publish(topic or self.topic, message, expiry_s=600)

    def collect(self, jti: str, timeout: float = WAIT):
        """Messages off the wire until one delivery for ``jti`` is complete; others are skipped."""
        from agent.city.receive import DeliveryCollector

        collector = DeliveryCollector(self.env.broker.root, jti)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.session.next_message(deadline - time.monotonic())
            if msg is None:
                break
            pending = collector.add(msg.topic, msg.payload)
            if pending is not None and pending.complete and pending.manifest:
                return pending
        raise TimeoutError(f"no complete delivery for {jti} within {timeout:g} s")

    def drain(self, count: int, timeout: float = WAIT) -> int:
        got = 0
        deadline = time.monotonic() + timeout
        while got < count and time.monotonic() < deadline:
            if self.session.next_message(deadline - time.monotonic()) is not None:
                got += 1
        return got

    def close(self) -> None:
        self.session.close()


class _Peer:
    """A bare paho client on the same broker (tests.broker.PeerClient) whose callbacks stamp the time."""

    def __init__(self, env: _Env, role: str) -> None:
        from tests.broker import PeerClient

        self.peer = PeerClient(env.broker, role)  # type: ignore[arg-type]
        self.received: queue.Queue[tuple[float, str, int]] = queue.Queue()
        self.acked_at: dict[int, float] = {}
        c = self.peer.client
        c.on_message = lambda _c, _u, m: self.received.put((time.perf_counter(), m.topic, len(m.payload)))
        original = c.on_publish

        def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
            self.acked_at[mid] = time.perf_counter()
            original(client, userdata, mid, rc, props)

        c.on_publish = on_publish

    def close(self) -> None:
        self.peer.close()


# ----------------------------------------------------------------------------- 1. latency


def bench_latency(report: Report, env: _Env, agent: _Agent, agency: _Agency) -> dict[str, float]:
    from agent.protocol.geohash import encode, request_topic
    from agent.protocol.jose import b64url_decode

    now = datetime.now(UTC)
    empty = (now - timedelta(hours=2), now - timedelta(hours=2) + timedelta(seconds=10))  # before any footage
    built = [agency.build(empty) for _ in range(LATENCY_WARMUP + LATENCY_N)]
    size = len(built[0].message.encode())
    filler = os.urandom(size)  # raw reference payload: the same size
    raw_topic = request_topic(env.broker.root, encode(0.0, 0.0, 5))  # a cell no agent here listens to
    sub = _Peer(env, "agent")
    handle_s: list[float] = []
    # The durable writes the service makes per decision (replay memory, then access log) as two bare WAL
    # commits with synchronous=FULL on the same disk, measured in the same loop so disk hiccups hit both alike.
    from agent.state.db import connect as connect_state_db

    conn = connect_state_db(env.tmp / "commit-reference.sqlite")  # same disk as the state db
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
    commits: list[float] = []
    row = "x" * 600
    try:
        sub.peer.subscribe(raw_topic)
        original = agent.svc.handle

        def timed(payload: bytes):
            t0 = time.perf_counter()
            try:
                return original(payload)
            finally:
                handle_s.append(time.perf_counter() - t0)

        agent.svc.handle = timed  # type: ignore[method-assign]  # instrumentation only: the call is unchanged
        ours: list[float] = []
        raw: list[float] = []
        reasons: dict[str, int] = {}
        for i, b in enumerate(built):
            t0 = time.perf_counter()
            agency.publish(b.message)
            reason, t1 = agent.hooks.decision_for(b.jti)
            reasons[reason] = reasons.get(reason, 0) + 1
            t2 = time.perf_counter()
            agency.publish(filler, raw_topic)
            t3, _, _ = sub.received.get(timeout=WAIT)
            t4 = time.perf_counter()
            for _ in range(2):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO t (b) VALUES (?)", (row,))
                conn.execute("COMMIT")
            t5 = time.perf_counter()
            if i >= LATENCY_WARMUP:
                ours.append(t1 - t0)
                raw.append(t3 - t2)
                commits.append(t5 - t4)
    finally:
        agent.svc.__dict__.pop("handle", None)
        sub.close()
        conn.close()
    handle_s = handle_s[LATENCY_WARMUP:]
    if set(reasons) != {"no_footage"}:
        print(f"  (note: decisions were {reasons}, expected only no_footage)", flush=True)

    # One bare Ed25519 verification of the same kind of message (cryptography), median of 1,000.
    h, p, s = built[0].message.split(".")
    signing_input, sig = f"{h}.{p}".encode("ascii"), b64url_decode(s)
    verify: list[float] = []
    for _ in range(1000):
        t0 = time.perf_counter()
        env.trusted_public.verify(sig, signing_input)
        verify.append(time.perf_counter() - t0)

    ms = 1000.0
    report(f"wire: PUBLISH -> logged decision p50 ({LATENCY_N} no_footage, {size} B)", _pct(ours, 0.5) * ms,
           _pct(raw, 0.5) * ms, "ms", "report; ref = raw paho->mosquitto->paho RTT p50")
    report("wire: PUBLISH -> logged decision p99", _pct(ours, 0.99) * ms, _pct(raw, 0.99) * ms, "ms",
           "<= 10 ms; ref = raw RTT p99")
    report("wire: decide + record durably in the agent (handle) p50", _pct(handle_s, 0.5) * ms,
           statistics.median(verify) * ms, "ms", "report; ref = one bare Ed25519 verify")
    report("wire: decide + record durably in the agent (handle) p99", _pct(handle_s, 0.99) * ms,
           _pct(commits, 0.99) * ms, "ms", "report; ref = two bare FULL SQLite commits p99")
    print(f"    (two bare FULL commits p50 {_pct(commits, 0.5) * ms:.2f} ms; PUBLISH -> decision over 10 ms: "
          f"{sum(1 for x in ours if x > 0.010)} of {len(ours)}; max {max(ours) * ms:.1f} ms)", flush=True)
    return {"p50_s": _pct(ours, 0.5), "raw_p50_s": _pct(raw, 0.5), "max_s": max(ours)}


# ----------------------------------------------------------------------------- 3. delivery


def bench_delivery(report: Report, env: _Env, agent: _Agent, agency: _Agency) -> None:
    from agent.city import open_delivery

    window = (env.fill_start + timedelta(seconds=2), env.fill_start + timedelta(seconds=2 + CLIP_S))
    pub = _Peer(env, "agent")  # the raw reference publishes with the agent's credentials (ACL: deliveries/#)
    ours_bps: list[float] = []
    first_chunk_s: list[float] = []
    pipelined_bps: list[float] = []
    one_by_one_bps: list[float] = []
    one_chunk_s: list[float] = []
    clip_bytes = chunks_n = 0
    try:
        for r in range(DELIVERY_ROUNDS):
            built = agency.build(window)
            agency.publish(built.message)
            reason, t_grant = agent.hooks.decision_for(built.jti)
            if reason != "granted":
                raise RuntimeError(f"the 60 s request was decided {reason!r}, not granted; the figures would be meaningless")
            ended, sent, details = agent.hooks.delivery_of(built.jti, timeout=120)
            pending = agency.collect(built.jti)
            if ended != "delivered":
                raise RuntimeError(f"the delivery ended {ended!r}: {details}")
            chunks = [pending.chunks[n] for n in range(pending.expected or 0)]
            if r == 0:  # the requester can open it, and it is the minute asked for
                opened = open_delivery(pending.manifest, chunks, built.recipient_private, built.jti)
                clip_bytes, chunks_n = len(opened.clip), len(chunks)
                got = opened.granted[1] - opened.granted[0]
                if abs(got.total_seconds() - CLIP_S) > 1.0:
                    print(f"  (note: granted {got.total_seconds():.1f} s, not {CLIP_S} s)", flush=True)
            chunk_times = [t for topic, t in sent if not topic.endswith("/manifest")]
            manifest_at = next(t for topic, t in sent if topic.endswith("/manifest"))
            wire_bytes = sum(len(c) for c in chunks)
            ours_bps.append(wire_bytes / (chunk_times[-1] - manifest_at))
            first_chunk_s.append(chunk_times[0] - t_grant)

            # Reference A: raw paho, same chunk payloads, QoS 1, pipelined (paho's and Mosquitto's in-flight window).
            base = f"{env.broker.root}/v1/deliveries/rawref{r}/x"
            t0 = time.perf_counter()
            mids = [pub.peer.publish_nowait(f"{base}/{n}", c) for n, c in enumerate(chunks)]
            for m in mids:
                pub.peer.wait_puback(m, timeout=WAIT)
            pipelined_bps.append(wire_bytes / (max(pub.acked_at[m] for m in mids) - t0))
            agency.drain(len(chunks))
            # Reference B: raw paho, one chunk at a time, each waiting for its PUBACK (as the agent publishes).
            base = f"{env.broker.root}/v1/deliveries/rawseq{r}/x"
            t0 = time.perf_counter()
            each = []
            for n, c in enumerate(chunks):
                ts = time.perf_counter()
                m = pub.peer.publish_nowait(f"{base}/{n}", c)
                pub.peer.wait_puback(m, timeout=WAIT)
                each.append(pub.acked_at[m] - ts)
            one_by_one_bps.append(wire_bytes / (pub.acked_at[m] - t0))
            one_chunk_s.append(statistics.median(each))
            agency.drain(len(chunks))
    finally:
        pub.close()

    mb = 1e6
    report(f"wire: delivery throughput, 60 s 720p15 clip ({clip_bytes / mb:.1f} MB, {chunks_n} chunks)",
           statistics.median(ours_bps) / mb, statistics.median(pipelined_bps) / mb, "MB/s",
           ">= 0.6x; ref = raw paho QoS 1 pipelined")
    report("wire: delivery throughput (same), vs raw one chunk at a time",
           statistics.median(ours_bps) / mb, statistics.median(one_by_one_bps) / mb, "MB/s",
           "report; ref = raw paho QoS 1, wait for each PUBACK")
    report("wire: grant -> first chunk acked (cut + seal + manifest + chunk 0)", statistics.median(first_chunk_s),
           statistics.median(one_chunk_s), "s", "<= 0.5 s; ref = raw publish->PUBACK of one chunk, median")
    paired = [o / p for o, p in zip(ours_bps, pipelined_bps)]
    paired_seq = [o / p for o, p in zip(ours_bps, one_by_one_bps)]
    print(f"    ({DELIVERY_ROUNDS} rounds, interleaved; ours MB/s each: {', '.join(f'{v / mb:.1f}' for v in ours_bps)}; "
          f"median of per-round ratios: {statistics.median(paired):.2f}x pipelined, "
          f"{statistics.median(paired_seq):.2f}x one at a time; grant->first chunk max {max(first_chunk_s):.3f} s)",
          flush=True)


# ----------------------------------------------------------------------------- 2. flood


def _flood_pool(env: _Env, agency: _Agency, n: int = 300) -> list[bytes]:
    """Invalid requests of three kinds: random bytes, a trusted key's signature broken, an unknown key."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    window = (now - timedelta(hours=3), now - timedelta(hours=3) + timedelta(seconds=10))
    out: list[bytes] = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append(os.urandom(rng.randint(64, 1400)))
        elif kind == 1:
            h, p, s = agency.build(window).message.split(".")
            k = rng.randint(5, 60)
            s = s[:k] + ("A" if s[k] != "A" else "B") + s[k + 1:]
            out.append(f"{h}.{p}.{s}".encode())
        else:
            out.append(agency.build(window, signer=env.stranger).message.encode())
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return len(b).to_bytes(2, "big") + b


def _connect_packet(client_id: str, username: str, password: str) -> bytes:
    """MQTT 5 CONNECT: clean start, username and password, keepalive 60 s, no properties."""
    body = _mqtt_str("MQTT") + b"\x05\xc2" + (60).to_bytes(2, "big") + b"\x00"
    body += _mqtt_str(client_id) + _mqtt_str(username) + _mqtt_str(password)
    return b"\x10" + _varint(len(body)) + body


_CONNACK_PROPS = {0x11: 4, 0x21: 2, 0x24: 1, 0x25: 1, 0x27: 4, 0x22: 2, 0x28: 1, 0x29: 1, 0x2A: 1, 0x13: 2}


def _receive_maximum(body: bytes) -> int:
    """The broker's Receive Maximum from a CONNACK body (65535 if absent)."""
    i, shift, length = 2, 0, 0
    while True:
        b = body[i]
        length |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            break
    end = i + length
    while i < end:
        pid = body[i]
        i += 1
        if pid == 0x21:
            return int.from_bytes(body[i:i + 2], "big")
        if pid in _CONNACK_PROPS:
            i += _CONNACK_PROPS[pid]
        elif pid == 0x26:  # user property: two strings
            for _ in range(2):
                i += 2 + int.from_bytes(body[i:i + 2], "big")
        else:  # a string or binary property
            i += 2 + int.from_bytes(body[i:i + 2], "big")
    return 65535


async def _read_packet(reader: Any) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, await reader.readexactly(length)


async def _one_publisher(spec: dict[str, Any], ctx: Any, index: int, connected: Any, go: Any) -> dict[str, Any]:
    """One MQTT connection publishing QoS 1 at rate/clients, within the broker's Receive Maximum."""
    import asyncio

    pool = [base64.b64decode(p) for p in spec["pool"]]
    topic = _mqtt_str(spec["topic"])
    reader, writer = await asyncio.open_connection(spec["host"], spec["port"], ssl=ctx,
                                                   server_hostname=spec["host"])
    writer.write(_connect_packet(f"{spec['client_id']}-{index}", spec["username"], spec["password"]))
    await writer.drain()
    kind, body = await _read_packet(reader)
    if kind >> 4 != 2 or body[1] != 0:
        raise SystemExit(f"flood publisher: the broker refused the connection (reason {body[1]:#x})")
    window = min(_receive_maximum(body), 65000)
    connected.release()
    await go.wait()
    rate = spec["rate"] / spec["clients"]
    total = int(rate * spec["seconds"])
    st = {"acked": 0, "failed": 0, "last_ack": 0.0}
    room = asyncio.Event()

    async def read_acks() -> None:
        while True:
            kind, body = await _read_packet(reader)
            if kind >> 4 == 4:  # PUBACK: packet id, then a reason code (absent means success)
                st["acked"] += 1
                if len(body) > 2 and body[2] >= 0x80:
                    st["failed"] += 1
                st["last_ack"] = time.monotonic()
                room.set()

    acks = asyncio.ensure_future(read_acks())
    loop_start = time.monotonic()
    stop_at = loop_start + spec["seconds"]
    sent = 0
    while sent < total:
        now = time.monotonic()
        if now >= stop_at:
            break
        due = min(total, int((now - loop_start) * rate) + 1) - sent
        n = min(due, window - (sent - st["acked"]))
        if n <= 0:
            room.clear()
            if due > 0:  # the broker's window is full: wait for a PUBACK (the rate is what it took)
                try:
                    await asyncio.wait_for(room.wait(), max(0.001, stop_at - now))
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(max(0.0005, loop_start + (sent + 1) / rate - now))
            continue
        packets = []
        for k in range(sent, sent + n):
            payload = pool[k % len(pool)]
            var = topic + (k % 65535 + 1).to_bytes(2, "big") + b"\x00"
            packets.append(b"\x32" + _varint(len(var) + len(payload)) + var + payload)
        writer.write(b"".join(packets))
        sent += n
        await writer.drain()
    publish_end = time.monotonic()
    wait_until = time.monotonic() + 15
    while st["acked"] < sent and time.monotonic() < wait_until:
        room.clear()
        try:
            await asyncio.wait_for(room.wait(), 0.5)
        except TimeoutError:
            pass
    acks.cancel()
    writer.write(b"\xe0\x00")  # DISCONNECT, normal
    try:
        await writer.drain()
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (TimeoutError, OSError):
        pass
    return {"sent": sent, "acked": st["acked"], "failed": st["failed"], "window": window,
            "start": loop_start, "publish_s": publish_end - loop_start,
            "ack_s": (st["last_ack"] or publish_end) - loop_start}


def _flood_child(spec_path: str) -> None:
    """The flood publisher, in its own process: raw MQTT 5 over TLS (asyncio), paced, bounded in count and time.

    A hand-rolled client rather than paho: paho's per-message Python cost held
    a publisher to about 3,000 messages/s on this machine, and the attacker's
    CPU is not what is being measured.
    """
    import asyncio
    import ssl

    spec = json.loads(Path(spec_path).read_text())
    if spec["host"] != "127.0.0.1":
        raise SystemExit("the flood publisher only ever talks to 127.0.0.1")
    ctx = ssl.create_default_context(cafile=spec["ca"])
    ctx.load_cert_chain(spec["cert"], spec["key"])

    async def main() -> list[dict[str, Any]]:
        go, connected = asyncio.Event(), asyncio.Semaphore(0)
        tasks = [asyncio.ensure_future(_one_publisher(spec, ctx, i, connected, go)) for i in range(spec["clients"])]
        loop = asyncio.get_running_loop()
        for _ in tasks:  # every client connected (or one failed) before saying "ready"
            waiter = asyncio.ensure_future(connected.acquire())
            await asyncio.wait([waiter, *tasks], timeout=15, return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in tasks if t.done()]
            if failed:
                failed[0].result()  # raises the reason
            if not waiter.done():
                raise SystemExit("flood publisher: no CONNACK within 15 s")
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        go.set()
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(main())
    start = min(r["start"] for r in results)
    print(json.dumps({"sent": sum(r["sent"] for r in results), "acked": sum(r["acked"] for r in results),
                      "failed": sum(r["failed"] for r in results), "window": [r["window"] for r in results],
                      "publish_s": max(r["start"] + r["publish_s"] for r in results) - start,
                      "ack_s": max(r["start"] + r["ack_s"] for r in results) - start}), flush=True)


def _start_flood(env: _Env, pool: list[bytes], topic: str, stack: ExitStack) -> subprocess.Popen[str]:
    """The publisher process, connected and waiting for "go"; it is killed at the end whatever happens."""
    cred = env.broker.credentials["agency"]
    spec = env.tmp / "flood.json"
    spec.write_text(json.dumps({
        "host": env.broker.host, "port": env.broker.port, "ca": str(env.broker.ca_file),
        "cert": str(cred.cert_file), "key": str(cred.key_file), "username": cred.username,
        "password": cred.password, "client_id": f"bench-flood-{secrets.token_hex(3)}", "topic": topic,
        "rate": FLOOD_RATE, "seconds": FLOOD_S, "clients": FLOOD_CLIENTS,
        "pool": [base64.b64encode(p).decode() for p in pool],
    }))
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.bench_wire", "--flood", str(spec)], cwd=ROOT_DIR,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    stack.callback(_reap, proc)
    line = _readline(proc, 30)
    if line.strip() != "ready":
        raise RuntimeError(f"the flood publisher did not start (said {line!r})")
    return proc


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        raise TimeoutError(f"no answer from the flood publisher (pid {proc.pid}) within {timeout:g} s")
    return box[0]


def _reap(proc: subprocess.Popen[str]) -> None:
    """Stop one publisher we started (by its own handle), if it is still there."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _counts(agent: _Agent) -> tuple[dict[str, int], dict[str, int], int]:
    """(transport counters, pre-auth counters by reason, access-log head seq)."""
    pre: dict[str, int] = {}
    for row in agent.svc.accesslog.rejection_counts():
        pre[row["reason"]] = pre.get(row["reason"], 0) + row["count"]
    return agent.transport.counters(), pre, agent.svc.accesslog.head()[0]


def _flood_phase(env: _Env, agent: _Agent, agency: _Agency, rec: Any, pool: list[bytes],
                 retry_s: float | None) -> dict[str, Any]:
    """One 10 s flood with one valid request published mid-way (and, if ``retry_s``, re-published until decided)."""
    valid = agency.build((env.fill_start + timedelta(seconds=10), env.fill_start + timedelta(seconds=20)))
    agent.watch_drops(valid.message.encode())
    log_offset = env.broker.log_size()
    with ExitStack() as stack:
        proc = _start_flood(env, pool, agency.topic, stack)
        tr0, pre0, seq0 = _counts(agent)
        s1, t_s1 = rec.snapshot(), time.monotonic()
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        t_go = time.monotonic()
        max_queued, copies = 0, 0
        t0: float | None = None
        next_copy = t_go + FLOOD_S / 2
        retry_until = t_go + FLOOD_S + RETRY_AFTER_FLOOD_S

        def maybe_publish() -> None:
            """The valid request mid-way; with ``retry_s``, the identical message again until it is decided."""
            nonlocal t0, copies, next_copy
            now = time.monotonic()
            if now < next_copy or (copies and not (retry_s and now < retry_until and valid.jti not in agent.hooks.first)):
                return
            t0 = t0 if t0 is not None else time.perf_counter()
            agency.publish(valid.message)  # returns at the broker's PUBACK
            copies += 1
            next_copy = time.monotonic() + (retry_s or FLOOD_S)

        while time.monotonic() < t_go + FLOOD_S:  # sample the transport's queue; publish the valid one mid-way
            max_queued = max(max_queued, agent.transport.queued)
            maybe_publish()
            time.sleep(0.02)
        result = json.loads(_readline(proc, 40))
        t_pub_end = time.monotonic()
        s2, t_s2 = rec.snapshot(), time.monotonic()  # the flood window, as the recorder saw it
        # The agent drains what the broker still holds for it: wait until its counters stop moving.
        last, last_change = None, time.monotonic()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            max_queued = max(max_queued, agent.transport.queued)
            maybe_publish()
            tr, pre, _ = _counts(agent)
            now_counts = (tr.get("received", 0), tr.get("inbox_full", 0), sum(pre.values()))
            if now_counts != last:
                last, last_change = now_counts, time.monotonic()
            elif time.monotonic() - last_change >= 2.0 and agent.transport.queued == 0 \
                    and (not retry_s or valid.jti in agent.hooks.first or time.monotonic() >= retry_until):
                break
            time.sleep(0.1)
        assert t0 is not None
        first = agent.hooks.first.get(valid.jti)
        if first is not None:
            reason, latency = first[0], first[1] - t0
        else:
            where = agent.dropped_reason or "dropped by the broker before it reached the agent"
            reason, latency = f"LOST ({where})", float("nan")
        delivered = None
        if reason == "granted":
            delivered, _, _ = agent.hooks.delivery_of(valid.jti, timeout=60)
            agency.collect(valid.jti, timeout=30)
        tr1, pre1, _ = _counts(agent)
    new_entries = [e for e in agent.svc.accesslog.entries() if e.seq > seq0]
    pre_added = {k: pre1.get(k, 0) - pre0.get(k, 0) for k in pre1 if pre1.get(k, 0) != pre0.get(k, 0)}
    return {
        "valid_jti": valid.jti, "reason": reason, "latency_s": latency, "copies": copies, "delivered": delivered,
        "result": result, "t_go": t_go, "t_pub_end": t_pub_end, "drained_at": last_change, "max_queued": max_queued,
        "received": tr1.get("received", 0) - tr0.get("received", 0),
        "queue_full": tr1.get("inbox_full", 0) - tr0.get("inbox_full", 0),  # dropped with the inbox full
        "pre_added": pre_added, "pre_total": sum(pre_added.values()),
        "entries": [(e.seq, e.jti, e.outcome) for e in new_entries],
        "other_entries": sum(1 for e in new_entries if e.jti != valid.jti),
        "captured": s2.frames_captured - s1.frames_captured, "dropped": s2.frames_dropped - s1.frames_dropped,
        "expected_frames": (t_s2 - t_s1) * FPS, "transport": tr1,
        "broker_drops": [ln for ln in env.broker.log_tail(log_offset, limit=1 << 20).splitlines()
                         if "dropped" in ln.lower()],
    }


def bench_flood(report: Report, env: _Env, agent: _Agent, agency: _Agency, unflooded_p50_s: float) -> None:
    from agent.buffer.capture.synthetic import SyntheticSource
    from agent.runtime.supervisor import start_recording

    w, h = FLOOD_RES
    res = f"{w}x{h}/{FPS}"
    pool = _flood_pool(env, agency)
    handle = start_recording(env.cfg, source=SyntheticSource(w, h, FPS, realtime=True))
    try:
        rec = handle.recorder
        time.sleep(2.0)  # let the camera settle; frames before the baseline are not counted
        s0 = rec.snapshot()
        time.sleep(BASELINE_S)  # the no-flood reference: same recorder, same run
        s1 = rec.snapshot()
        a = _flood_phase(env, agent, agency, rec, pool, retry_s=None)
        b = _flood_phase(env, agent, agency, rec, pool, retry_s=1.0)
        s3 = rec.snapshot()
    finally:
        handle.stop()
        if not handle.wait(30):
            print("  (warning: the recorder did not stop within 30 s)", flush=True)

    r = a["result"]
    report(f"flood: achieved invalid-message rate (1 process, {FLOOD_CLIENTS} conn., QoS 1)",
           r["acked"] / r["ack_s"] if r["ack_s"] else 0.0, FLOOD_RATE, "msg/s", f"target {FLOOD_RATE}/s for {FLOOD_S:g} s")
    report(f"flood: dropped frames during flood, realtime {res} camera", a["dropped"], a["captured"], "frames",
           "0 (ref = frames captured meanwhile)")
    report(f"flood: dropped frames, same recorder, no flood ({BASELINE_S:g} s)", s1.frames_dropped - s0.frames_dropped,
           s1.frames_captured - s0.frames_captured, "frames", "0 (ref = frames captured meanwhile)")
    report("flood: frames captured during flood vs 15 fps x wall time", a["captured"], a["expected_frames"], "frames",
           "ratio ~1 (a starved camera captures fewer)")
    report(f"flood: valid request mid-flood, one publish: {a['reason']}; PUBLISH -> decision", a["latency_s"] * 1000,
           unflooded_p50_s * 1000, "ms", "granted; ref = unflooded p50 (fig. 1)")
    report("flood: access-log entries added by the flood (not the valid one's)", a["other_entries"], a["received"],
           "entries", "0 (ref = messages the agent received)")
    report("flood: pre-auth counters added / messages the agent decided", a["pre_total"],
           a["received"] - (0 if a["reason"].startswith("LOST") else 1), "msgs",
           "ratio 1.0 (the log grows only by counters)")
    report("flood: messages the agent's transport received / broker PUBACKed", a["received"], r["acked"], "msgs",
           "report (the rest were dropped, see below)")
    report("flood: agent's decision rate, flood start until drained",
           a["pre_total"] / max(1e-9, a["drained_at"] - a["t_go"]), FLOOD_RATE, "msg/s", "report")
    _flood_notes(a, agent)
    report(f"flood (agency re-publishes each 1 s until decided, {b['copies']} copies): {b['reason']}; "
           "first PUBLISH -> decision",
           b["latency_s"] * 1000, unflooded_p50_s * 1000, "ms", "report; ref = unflooded p50")
    report("flood (re-publishing run): dropped frames", b["dropped"], b["captured"], "frames", "0")
    report("flood (re-publishing run): access-log entries added, not the valid one's", b["other_entries"],
           b["received"], "entries", "0")
    _flood_notes(b, agent)
    print(f"    recorder over the whole benchmark: {s3.frames_captured} frames captured, {s3.frames_dropped} dropped",
          flush=True)


def _flood_notes(f: dict[str, Any], agent: _Agent) -> None:
    r = f["result"]
    print(f"    publisher: {r['sent']} sent, {r['acked']} PUBACKs ({r['failed']} with a failure code) in "
          f"{r['ack_s']:.1f} s, broker Receive Maximum {r['window']}; agent transport: received {f['received']}, "
          f"inbox_full {f['queue_full']} (max inbox depth seen {f['max_queued']}; the agent asks for Receive "
          f"Maximum {agent.transport._receive_maximum}); dropped by the broker (per-client queue limit): about "
          f"{r['acked'] + f['copies'] - f['received'] - f['queue_full']}", flush=True)
    print(f"    pre-auth counters added: {f['pre_added']}; access log added: "
          f"{[(seq, 'valid' if j == f['valid_jti'] else j, o) for seq, j, o in f['entries']]}; "
          f"valid delivery: {f['delivered']}; the agent drained {f['drained_at'] - f['t_pub_end']:+.1f} s after the "
          f"publisher finished", flush=True)
    if f["broker_drops"]:
        print(f"    broker log: {f['broker_drops'][0].strip()!r}", flush=True)


# ----------------------------------------------------------------------------- entry point


def run(report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp, ExitStack() as stack:
        t = time.perf_counter()
        env = _setup(Path(tmp), stack)
        fill_s = _fill_buffer(env)
        print(f"    (setup: broker + {FILL_S} s of {FILL[0]}x{FILL[1]} footage recorded in {fill_s:.1f} s; "
              f"{time.perf_counter() - t:.1f} s)", flush=True)
        agent = _Agent(env)
        stack.callback(agent.stop)
        agency = _Agency(env)
        stack.callback(agency.close)
        lat = bench_latency(report, env, agent, agency)
        bench_delivery(report, env, agent, agency)
        bench_flood(report, env, agent, agency, lat["p50_s"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--flood":
        _flood_child(sys.argv[2])
    else:
        run(Report())
