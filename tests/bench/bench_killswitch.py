"""The kill switch during a delivery: how soon does the agent stop sending, and does anything leave that the log does not count?

Many deliveries of a two-minute clip (about nine 256 KiB chunks) from the real service, each cut by
the kill switch pressed at a random moment: from the manifest reaching the network to a little after
an uncut delivery would have finished. The switch is pressed in-process with
:meth:`agent.state.killswitch.KillSwitch.engage`, the very call ``doorbell-agent killswitch on``
makes (which then returns); the time it returns is the start of each measurement.

"The network" is the first hop: the agent talks to a real TLS-less Mosquitto listener through
:class:`tests.mqtt_proxy.MqttProxy`, which reads every MQTT packet the agent sends and stamps the
moment it has fully arrived (a packet the agent started writing before the switch may still arrive
after it; the figure includes that). Two links: loopback as it is, and one whose answers (PUBACKs,
CONNACK) take 40 ms to come back, so that chunks are in flight when the switch is pressed, as on a
home uplink to a cloud broker.

Figures, each beside a reference measured in the same run:

1. ``killswitch on`` returned -> the last chunk of that delivery reached the network, p50/p99/max
   over the deliveries (0 when the last chunk had left before the switch). Goal p99 <= 100 ms.
   Reference: one raw 256 KiB QoS 1 publish through the same link, to its PUBACK, p99 (the time the
   network needs for one chunk).
2. Chunks that reached the network beyond what the log says may have been handed over
   (``chunks_handed`` of ``delivery_cut``; all N for ``delivered``), summed. Goal 0. Reference:
   chunks that reached the network in all.
3. ``killswitch on`` returned -> ``delivery_cut`` logged, p99 (how fast the agent reacts).
   Reference: the delivery worker's poll interval.

Run: ``.venv/bin/python -m tests.bench killswitch``; ``BENCH_KILLSWITCH_N`` sets the deliveries per
link (default 120).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import secrets
import statistics
import tempfile
import textwrap
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.bench.report import Report

HOME = (32.29876, -90.18481)
PROGRAM = "jackson-ms/camera-pilot-2026"
FOOTAGE_S = 130
CLIP_S = 120
N = int(os.environ.get("BENCH_KILLSWITCH_N", "120"))
WARMUP = 3
LINKS = ((0.0, "loopback"), (0.040, "answers delayed 40 ms"))
WAIT = 60.0
SEED = 20261203


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


@dataclass
class _Bench:
    tmp: Path
    broker: Any
    cfg: Any
    requester: Any
    proxy: Any
    agency: Any
    now: datetime


@dataclass
class _Sample:
    latency_s: float
    outcome: str
    beyond_log: int
    on_wire: int
    reaction_s: float | None


@dataclass
class _Agent:
    svc: Any
    transport: Any
    decisions: queue.Queue[tuple[str, str]] = field(default_factory=queue.Queue)
    ends: queue.Queue[tuple[str, str, dict[str, Any], float]] = field(default_factory=queue.Queue)

    def decision(self, jti: str) -> str:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                got, reason = self.decisions.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if got == jti:
                return reason
        raise TimeoutError(f"no decision on {jti}")

    def end(self, jti: str) -> tuple[str, dict[str, Any], float]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                event, got, details, t = self.ends.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if got == jti:
                return event, details, t
        raise TimeoutError(f"the delivery of {jti} did not end")


def _setup(tmp: Path, stack: ExitStack) -> _Bench:
    from agent.buffer.segments import SegmentStore
    from agent.city import keygen, load_signing_key
    from agent.city.mqtt import BrokerSettings, MqttSession
    from agent.config import load_config
    from agent.protocol.trust import TrustStore
    from agent.state.truststore import save_trust_store
    from agent.timeutil import to_us
    from tests.bench.bench_wire import _quiet_broker_class
    from tests.buffer_helpers import FPS, write_segment
    from tests.mqtt_proxy import MqttProxy

    broker = _quiet_broker_class()(tmp / "mosquitto")
    stack.callback(broker.stop)
    broker.start()
    proxy = MqttProxy(broker.plain_port)
    stack.callback(proxy.close)
    conf = tmp / "agent.toml"
    conf.write_text(textwrap.dedent(f"""\
        [paths]
        data_dir = "{tmp / 'data'}"

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
    cfg = cfg.model_copy(update={"mqtt": broker.mqtt_config("agent", plaintext=True, precision=4, port=proxy.port,
                                                            client_id="bench-killswitch-agent")})
    keys = keygen(iss="jackson-pd", kid="jpd-bench", out_dir=tmp / "city")
    save_trust_store(TrustStore.from_jwks(keys.public_jwks), cfg.paths.trust_file)
    now = datetime.now(UTC).replace(microsecond=0)
    store = SegmentStore.from_config(cfg)
    start = to_us(now) - (FOOTAGE_S + 5) * 1_000_000
    for i in range(FOOTAGE_S // 4):
        seg = start + i * 4_000_000
        store.add(write_segment(store.new_segment_path(seg), seg, 4 * FPS))
    store.close()
    cred = broker.credentials["agency"]
    agency = MqttSession(BrokerSettings(host=broker.host, port=broker.port, ca_file=broker.ca_file,
                                        cert_file=cred.cert_file, key_file=cred.key_file, username=cred.username,
                                        password=cred.password),
                         client_id=f"bench-ks-city-{secrets.token_hex(3)}", clean_start=True, session_expiry_s=300)
    agency.connect()
    stack.callback(agency.close)
    return _Bench(tmp, broker, cfg, load_signing_key(keys.private_path), proxy, agency, now)


def _start_agent(b: _Bench, stack: ExitStack) -> _Agent:
    from agent.sharing.service import RequestService
    from agent.sharing.transport import MqttTransport
    from agent.state.devicekey import DeviceKey

    loc = b.cfg.require_policy().location
    transport = MqttTransport(b.cfg.require_mqtt(), lat=loc.lat, lon=loc.lon)
    svc = RequestService(b.cfg, transport=transport, device_key=DeviceKey.load_or_create(b.cfg.paths.device_key_file))
    a = _Agent(svc, transport)

    def on_decision(d: Any) -> None:
        if d is not None and d.request is not None:
            a.decisions.put((d.request.jti, str(d.reason)))

    def on_delivery(event: str, job: Any, details: dict[str, Any]) -> None:
        if event not in ("handing", "sent"):
            a.ends.put((event, job.jti, details, time.monotonic()))

    svc.on_decision = on_decision
    svc.delivery_events = on_delivery
    svc.start()

    def stop() -> None:
        svc.stop()
        svc.wait(30)

    stack.callback(stop)
    if not transport.wait_ready(WAIT):
        raise RuntimeError(f"the agent did not connect: {transport.last_error}")
    return a


class _RawChunk:
    """The reference: a bare paho client through the same link, one 256 KiB QoS 1 publish to its PUBACK."""

    def __init__(self, b: _Bench) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        cred = b.broker.credentials["agent"]
        self.acked: dict[int, float] = {}
        self.cond = threading.Condition()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-ks-raw-{secrets.token_hex(3)}",
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(cred.username, cred.password)
        c.on_publish = self._on_publish
        c.connect(b.broker.host, b.proxy.port, keepalive=30)
        c.loop_start()
        self.client = c
        self.topic = f"{b.broker.root}/v1/deliveries/bench-raw-0000000000/raw/0"
        self.payload = os.urandom(262160)

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self.cond:
            self.acked[mid] = time.monotonic()
            self.cond.notify_all()

    def sample(self) -> float:
        t0 = time.monotonic()
        mid = self.client.publish(self.topic, self.payload, qos=1).mid
        with self.cond:
            if not self.cond.wait_for(lambda: mid in self.acked, WAIT):
                raise TimeoutError("the raw reference publish got no PUBACK")
            return self.acked.pop(mid) - t0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _one(b: _Bench, agent: _Agent, press_after_s: float | None, window: tuple[datetime, datetime]) -> tuple[_Sample, float]:
    """One delivery, the switch pressed ``press_after_s`` after its manifest reached the network (None: never)."""
    from agent.city import build_request
    from agent.protocol.geohash import encode, request_topic
    from agent.state.killswitch import KillSwitch

    built = build_request(requester=b.requester, program=PROGRAM, officer="badge-4471", case="JPD-2026-001234",
                          purpose="Burglary reported on this block.", basis="consent", lat=HOME[0] + 0.001,
                          lon=HOME[1] + 0.001, radius_m=300, window_start=window[0], window_end=window[1])
    prefix = f"{b.broker.root}/v1/deliveries/{built.jti}/"
    manifest_seen = threading.Event()
    t_manifest: list[float] = []

    def watch(seen: Any) -> None:
        if seen.topic and seen.topic.startswith(prefix) and seen.topic.endswith("/manifest") and not t_manifest:
            t_manifest.append(seen.at)
            manifest_seen.set()

    b.proxy.on_packet = watch
    b.agency.publish(request_topic(b.broker.root, encode(*HOME, 5)), built.message, expiry_s=600)
    if agent.decision(built.jti) != "granted":
        raise RuntimeError("the benchmark's request was not granted")
    if not manifest_seen.wait(WAIT):
        raise TimeoutError("the manifest never reached the network")
    switch = KillSwitch(b.cfg.paths.killswitch_file)
    t_switch = None
    if press_after_s is not None:
        left = t_manifest[0] + press_after_s - time.monotonic()
        if left > 0:
            time.sleep(left)  # the resident's random moment, not a wait for an event
        switch.engage("benchmark")
        t_switch = time.monotonic()  # `killswitch on` has returned
    event, details, t_end = agent.end(built.jti)
    if t_switch is not None:
        switch.release("benchmark")
    chunks = [(int(p.topic.rsplit("/", 1)[1]), p.at) for p in list(b.proxy.seen)
              if p.topic and p.topic.startswith(prefix) and not p.topic.endswith("/manifest")]
    counted = details["chunks"] if event == "delivered" else details.get("chunks_handed", 0)
    beyond = len({n for n, _ in chunks if n >= counted})
    last = max((at for _, at in chunks), default=None)
    latency = 0.0 if t_switch is None or last is None else max(0.0, last - t_switch)
    reaction = t_end - t_switch if t_switch is not None and event == "delivery_cut" else None
    duration = t_end - t_manifest[0]
    return _Sample(latency, event, beyond, len(chunks), reaction), duration


def run(report: Report) -> None:
    from agent.sharing.delivery import POLL_S

    rng = random.Random(SEED)
    agent_log = logging.getLogger("agent")
    stack_level = agent_log.level
    agent_log.setLevel(logging.ERROR)  # one "kill switch engaged" warning per delivery would bury the figures
    with tempfile.TemporaryDirectory(prefix="bench-killswitch-") as tmp, ExitStack() as stack:
        stack.callback(agent_log.setLevel, stack_level)
        b = _setup(Path(tmp), stack)
        window = (b.now - timedelta(seconds=CLIP_S + 3), b.now - timedelta(seconds=3))
        b.proxy.accept()
        agent = _start_agent(b, stack)
        raw = _RawChunk(b)
        stack.callback(raw.close)
        for delay, name in LINKS:
            b.proxy.down_delay_s = delay
            durations = [_one(b, agent, None, window)[1] for _ in range(WARMUP)]
            full = statistics.median(durations)
            samples: list[_Sample] = []
            refs: list[float] = []
            for _ in range(N):
                sample, _ = _one(b, agent, rng.uniform(0.0, full * 1.1), window)
                samples.append(sample)
                refs.append(raw.sample())
            ms = 1000.0
            lat = [s.latency_s for s in samples]
            cut = [s for s in samples if s.outcome == "delivery_cut"]
            report(f"killswitch ({name}): switch on -> last chunk on the network p50 ({N} deliveries)",
                   _pct(lat, 0.5) * ms, _pct(refs, 0.5) * ms, "ms", "report; ref = raw 256 KiB publish->PUBACK p50")
            report(f"killswitch ({name}): switch on -> last chunk on the network p99",
                   _pct(lat, 0.99) * ms, _pct(refs, 0.99) * ms, "ms", "<= 100 ms; ref = raw 256 KiB publish->PUBACK p99")
            report(f"killswitch ({name}): chunks on the network beyond the log's count",
                   sum(s.beyond_log for s in samples), sum(s.on_wire for s in samples), "chunks",
                   "0; ref = chunks on the network in all")
            reactions = [s.reaction_s for s in cut if s.reaction_s is not None]
            report(f"killswitch ({name}): switch on -> delivery_cut logged p99 ({len(cut)} cut)",
                   _pct(reactions, 0.99) * ms, POLL_S * ms, "ms", "report; ref = the worker's poll interval")
            print(f"    ({name}: uncut delivery {full * ms:.0f} ms from manifest to delivered; outcomes "
                  f"{ {o: sum(1 for s in samples if s.outcome == o) for o in sorted({s.outcome for s in samples})} }; "
                  f"max latency {max(lat) * ms:.1f} ms)", flush=True)


if __name__ == "__main__":
    run(Report())
