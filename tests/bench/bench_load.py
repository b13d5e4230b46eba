"""City-scale load: many agents on one Mosquitto, an agency asking for footage every second.

Every agent is the real thing except its camera: the sharing service, the MQTT
transport with its durable inbox, the access log, the decision, the sealing,
each agent with its own home, keys, trust store, state database and buffer
(pre-written real H.264 segments, copied per agent). They all run in this
process, on one TLS Mosquitto with ACLs (tests/broker.py). The agency is the
reference client: one request a second at a random spot in a 3 km city, a
300 m circle, published to the geohash cells that cover it.

Checked, not only measured: every agent inside a circle delivers exactly once
and no agent outside publishes anything (violations are printed and counted).

Figures, each beside a reference from the same run:
- decisions per second across all agents, beside ``decide()`` alone on one
  thread (what the pure decision could do with no I/O at all);
- delivery latency percentiles (request published → last chunk at the
  agency), beside a bare QoS 1 round trip through the same broker;
- the broker's CPU, beside this process's CPU (all agents and the agency);
- messages each agent receives per request, at subscription precision 0 to 5,
  beside the messages it must receive (requests whose circle holds it).

    .venv/bin/python -m tests.bench load
    DOORBELL_LOAD_AGENTS=200 DOORBELL_LOAD_SECONDS=60 DOORBELL_LOAD_SWEEP_SECONDS=15 .venv/bin/python -m tests.bench load

The defaults are the issue's: 200 agents, a request every second for a minute.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from agent.buffer.segments import SegmentStore
from agent.city import build_request, keygen, load_signing_key
from agent.city.keys import SigningKey
from agent.city.mqtt import BrokerSettings, MqttSession
from agent.city.requests import request_topics
from agent.config import AgentConfig, load_config
from agent.protocol.decision import Policy, decide
from agent.protocol.geo import haversine_m
from agent.protocol.jose import parse_compact
from agent.protocol.sealing import MANIFEST_TYP
from agent.protocol.trust import TrustStore
from agent.sharing.service import RequestService
from agent.sharing.transport import MqttTransport
from agent.state.devicekey import DeviceKey
from agent.state.truststore import load_trust_store, save_trust_store
from tests.broker import Broker
from tests.buffer_helpers import FPS, write_segment

AGENTS = int(os.environ.get("DOORBELL_LOAD_AGENTS", "200"))
SECONDS = int(os.environ.get("DOORBELL_LOAD_SECONDS", "60"))
SWEEP_SECONDS = int(os.environ.get("DOORBELL_LOAD_SWEEP_SECONDS", "15"))
CITY = (32.29876, -90.18481)  # Jackson, MS
CITY_RADIUS_M = 3000.0
CIRCLE_M = 300.0
MAIN_PRECISION = 4  # the agent's default (mqtt.precision)
PROGRAM = "jackson-ms/camera-pilot-2026"
WAIT_S = 120.0


def _spot(rng: random.Random) -> tuple[float, float]:
    """A uniformly random point of the city disk."""
    r = CITY_RADIUS_M * math.sqrt(rng.random())
    a = rng.random() * 2 * math.pi
    dlat = r * math.cos(a) / 111_320.0
    dlon = r * math.sin(a) / (111_320.0 * math.cos(math.radians(CITY[0])))
    return CITY[0] + dlat, CITY[1] + dlon


def _policy_toml(data_dir: Path, lat: float, lon: float) -> str:
    return f"""
[paths]
data_dir = "{data_dir}"

[buffer]
segment_seconds = 4

[clock]
assume_synced = true

[web]
enabled = false

[policy]
program = "{PROGRAM}"
location = {{ lat = {lat!r}, lon = {lon!r} }}
timezone = "America/Chicago"
max_radius_m = 1000
grants_per_issuer_per_day = 1000

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2030-01-01T00:00:00Z
"""


@dataclass
class Home:
    index: int
    lat: float
    lon: float
    cfg: AgentConfig
    key: DeviceKey


@dataclass
class Running:
    home: Home
    transport: MqttTransport
    service: RequestService


@dataclass
class Round:
    """What one run of the agency saw: when each request went out, and each delivery came in."""

    published: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # jti -> (t, lat, lon)
    delivered: dict[tuple[str, str], float] = field(default_factory=dict)  # (jti, device kid) -> t complete
    decisions: int = 0
    due: int = 0  # deliveries expected: (request, agent inside its circle)
    received: dict[int, int] = field(default_factory=dict)  # agent -> request messages its transport took in
    wall_s: float = 0.0
    broker_cpu_s: float = 0.0
    own_cpu_s: float = 0.0


def _prepare(workdir: Path, broker: Broker, requester_jwks: dict, rng: random.Random) -> list[Home]:
    """Homes scattered over the city, each with its own keys, trust store and a copy of real footage."""
    template = workdir / "template"
    now_us = time.time_ns() // 1000
    start = now_us - 20_000_000
    infos = [write_segment(template / f"{start + i * 4_000_000}.mp4", start + i * 4_000_000, 4 * FPS) for i in range(3)]
    homes = []
    for i in range(AGENTS):
        lat, lon = _spot(rng)
        data_dir = workdir / "agents" / f"{i:04d}"
        data_dir.mkdir(parents=True)
        cfg_file = data_dir.parent / f"{i:04d}.toml"
        cfg_file.write_text(_policy_toml(data_dir, lat, lon))
        cfg = load_config(cfg_file)
        store = SegmentStore.from_config(cfg)
        for info in infos:
            dest = store.new_segment_path(info.start_us)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(info.path, dest)
            store.add(replace(info, path=dest))
        store.close()
        save_trust_store(TrustStore.from_jwks(requester_jwks), cfg.paths.trust_file)
        homes.append(Home(i, lat, lon, cfg, DeviceKey.load_or_create(cfg.paths.device_key_file)))
    return homes


def _window(homes: list[Home]) -> tuple[datetime, datetime]:
    """Four seconds inside the footage every home holds."""
    store = SegmentStore.from_config(homes[0].cfg)
    try:
        summary = store.summary()
    finally:
        store.close()
    assert summary.start_us is not None
    start = datetime.fromtimestamp(summary.start_us / 1e6, tz=UTC) + timedelta(seconds=2)
    return start, start + timedelta(seconds=4)


def _start_agents(homes: list[Home], broker: Broker, precision: int, on_decision: Callable[[object], None]) -> list[Running]:
    running = []
    for h in homes:
        mqtt = broker.mqtt_config("agent", precision=precision, client_id=f"load-{h.index:04d}-p{precision}",
                                  keepalive_s=30)
        cfg = h.cfg.model_copy(update={"mqtt": mqtt})
        transport = MqttTransport(mqtt, lat=h.lat, lon=h.lon)
        svc = RequestService(cfg, transport=transport, device_key=h.key)
        svc.on_decision = on_decision
        svc.start()
        running.append(Running(h, transport, svc))
    for r in running:
        if not r.transport.wait_ready(WAIT_S):
            cid = f"load-{r.home.index:04d}-p{precision}"
            seen = [line for line in broker.log_tail(0, 50_000_000).splitlines() if cid in line][-15:]
            why = ("the broker is not running" if not broker.running else f"last error {r.transport.last_error}; "
                   f"status {r.transport.status()}") + "\nthe broker's log of it:\n" + "\n".join(seen)
            _stop_agents(running)
            raise RuntimeError(f"agent {r.home.index} did not connect: {why}")
    return running


def _stop_agents(running: list[Running]) -> None:
    for r in running:
        r.service.stop()
    for r in running:
        r.service.wait(WAIT_S)


def _agency_session(broker: Broker, name: str) -> MqttSession:
    cred = broker.credentials["agency"]
    settings = BrokerSettings(host=broker.host, port=broker.port, ca_file=broker.ca_file, cert_file=cred.cert_file,
                              key_file=cred.key_file, username=cred.username, password=cred.password)
    session = MqttSession(settings, client_id=name, clean_start=True, session_expiry_s=600)
    session.connect()
    return session


def _collect(session: MqttSession, rnd: Round, stop: threading.Event, root: str) -> None:
    """The agency's receiver: notes when each (request, device) delivery is complete."""
    chunks: dict[tuple[str, str], set[int]] = defaultdict(set)
    expected: dict[tuple[str, str], tuple[int, str]] = {}
    prefix = f"{root}/v1/deliveries/"
    while not stop.is_set():
        msg = session.next_message(0.2)
        if msg is None:
            continue
        parts = msg.topic[len(prefix):].split("/")
        if len(parts) != 3:
            continue
        jti, did, leaf = parts
        if leaf == "manifest":
            jws = parse_compact(msg.payload.decode("ascii"), typ=MANIFEST_TYP)
            expected[(jti, did)] = (int(jws.claims["enc"]["chunks"]), jws.kid)
        else:
            chunks[(jti, did)].add(int(leaf))
        got = expected.get((jti, did))
        if got is not None and len(chunks[(jti, did)]) == got[0]:
            rnd.delivered.setdefault((jti, got[1]), time.monotonic())


AGENTS_PER_PROCESS = 40
"""paho's network loop uses select(), which cannot watch a descriptor numbered 1024 or more; each agent holds
about 20 (its SQLite files and their journals, a socket), so one process hosts at most this many. A real agent
is alone in its process: this is the benchmark's limit, not the agent's."""


def _agents_process(homes: list[Home], broker: Broker, precision: int, conn: Connection) -> None:
    """A child process hosting some of the agents: start them, say so, then on "finish" report and stop."""
    decided = [0]
    lock = threading.Lock()

    def on_decision(_d: object) -> None:
        with lock:
            decided[0] += 1

    try:
        running = _start_agents(homes, broker, precision, on_decision)
    except Exception as exc:  # the parent prints it: a child's traceback would be lost
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    before = {r.home.index: r.transport.status()["counters"]["received"] for r in running}
    cpu0 = time.process_time()
    conn.send(("ready", None))
    conn.recv()  # "finish": the agency has what it waited for
    deadline = time.monotonic() + WAIT_S
    # Refusals publish nothing: wait until every agent has decided what it received before counting.
    while time.monotonic() < deadline and sum(r.transport.queued for r in running):
        time.sleep(0.2)
    received = {r.home.index: r.transport.status()["counters"]["received"] - before[r.home.index] for r in running}
    with lock:
        conn.send(("done", (decided[0], received, time.process_time() - cpu0)))
    _stop_agents(running)


def _run_round(broker: Broker, homes: list[Home], requester: SigningKey, precision: int, seconds: int,
               window: tuple[datetime, datetime], rng: random.Random) -> Round:
    """Agents at ``precision`` (in child processes); a request a second for ``seconds``; every expected delivery."""
    ctx = multiprocessing.get_context("fork")
    workers: list[tuple[BaseProcess, Connection]] = []
    for i in range(0, len(homes), AGENTS_PER_PROCESS):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_agents_process, args=(homes[i:i + AGENTS_PER_PROCESS], broker, precision, theirs),
                           daemon=True)
        proc.start()
        workers.append((proc, ours))
    try:
        for proc, conn in workers:
            if not conn.poll(WAIT_S * 2):
                raise RuntimeError(f"agent process {proc.pid} did not start its agents in time")
            kind, detail = conn.recv()
            if kind != "ready":
                raise RuntimeError(f"an agent process failed: {detail}")
        rnd = Round()
        session = _agency_session(broker, f"load-agency-p{precision}")
        session.subscribe(f"{broker.root}/v1/deliveries/#")
        stop = threading.Event()
        receiver = threading.Thread(target=_collect, args=(session, rnd, stop, broker.root), daemon=True)
        receiver.start()
        broker_cpu0, own_cpu0, wall0 = _broker_cpu(broker), time.process_time(), time.monotonic()
        expected: set[tuple[str, str]] = set()
        for n in range(seconds):
            time.sleep(max(0.0, wall0 + n - time.monotonic()))
            lat, lon = _spot(rng)
            built = build_request(requester=requester, program=PROGRAM, officer="badge-4471",
                                  case=f"LOAD-{precision}-{n}", purpose="Load test.", basis="consent", lat=lat, lon=lon,
                                  radius_m=CIRCLE_M, window_start=window[0], window_end=window[1], now=datetime.now(UTC))
            rnd.published[built.jti] = (time.monotonic(), lat, lon)
            for topic in request_topics(broker.root, lat, lon, CIRCLE_M):
                session.publish(topic, built.message, expiry_s=600)
            expected |= {(built.jti, h.key.kid) for h in homes if haversine_m(h.lat, h.lon, lat, lon) <= CIRCLE_M}
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not expected <= set(rnd.delivered):
            time.sleep(0.2)
        for _proc, conn in workers:
            conn.send("finish")
        children_cpu = 0.0
        for proc, conn in workers:
            if not conn.poll(WAIT_S * 2):
                raise RuntimeError(f"agent process {proc.pid} did not report")
            _kind, (decisions, received, cpu) = conn.recv()
            rnd.decisions += decisions
            rnd.received.update(received)
            children_cpu += cpu
        rnd.wall_s = time.monotonic() - wall0
        rnd.broker_cpu_s = _broker_cpu(broker) - broker_cpu0
        rnd.own_cpu_s = time.process_time() - own_cpu0 + children_cpu
        stop.set()
        receiver.join(5)
        session.close()
    finally:
        for proc, _conn in workers:
            proc.join(WAIT_S)
            if proc.is_alive():
                proc.kill()
    rnd.due = len(expected)
    missing = expected - set(rnd.delivered)
    extra = set(rnd.delivered) - expected
    print(f"  precision {precision}: {len(rnd.published)} requests, {len(expected)} deliveries due, "
          f"{len(rnd.delivered)} complete; missing {len(missing)}, from agents outside the circle {len(extra)}", flush=True)
    return rnd


def _broker_cpu(broker: Broker) -> float:
    """CPU seconds the broker process has used (user + system)."""
    assert broker._proc is not None
    fields = Path(f"/proc/{broker._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bare_round_trip_ms(broker: Broker, rounds: int = 200) -> list[float]:
    """A small QoS 1 message from the agency to a subscriber with an agent's identity, through the same broker."""
    cred = broker.credentials["agent"]
    sub = MqttSession(BrokerSettings(host=broker.host, port=broker.port, ca_file=broker.ca_file, cert_file=cred.cert_file,
                                     key_file=cred.key_file, username=cred.username, password=cred.password),
                      client_id="load-ping-sub", clean_start=True, session_expiry_s=0)
    sub.connect()
    sub.subscribe(f"{broker.root}/v1/requests/ping/#")  # no agent runs now: only this subscriber gets them
    pub = _agency_session(broker, "load-ping-pub")
    out = []
    try:
        for i in range(rounds):
            t0 = time.perf_counter()
            pub.publish(f"{broker.root}/v1/requests/ping/{i}", b"x" * 64, expiry_s=60)
            msg = sub.next_message(10)
            assert msg is not None, "the broker lost a ping"
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        sub.close()
        pub.close()
    return out


def _decide_alone_per_s(homes: list[Home], requester: SigningKey, window: tuple[datetime, datetime]) -> float:
    """``decide()`` on one thread, no I/O: the pure decision's own speed on the same kind of request."""
    h = homes[0]
    trust = load_trust_store(h.cfg.paths.trust_file)
    policy = Policy.from_config(h.cfg.require_policy())

    held = [(window[0] - timedelta(seconds=10), window[1] + timedelta(seconds=10))]

    class _State:
        clock_synced = True
        kill_switch = False

        def seen(self, jti: str) -> None:
            return None

        def grants_since(self, iss: str, since: datetime) -> int:
            return 0

        def recorded(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
            return held

    built = build_request(requester=requester, program=PROGRAM, officer="badge-4471", case="LOAD-ref",
                          purpose="Load test.", basis="consent", lat=h.lat, lon=h.lon, radius_m=CIRCLE_M,
                          window_start=window[0], window_end=window[1], now=datetime.now(UTC))
    payload = built.message.encode("ascii")
    now = datetime.now(UTC)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        d = decide(payload, trust=trust, policy=policy, state=_State(), now=now)
        n += 1
    assert str(d.reason) == "granted", f"the reference decision must be the real work of a grant, got {d.reason}"
    return n / (time.perf_counter() - t0)


def run(report: Callable[[str, float, float, str, str], None]) -> None:
    rng = random.Random(20261129)
    with tempfile.TemporaryDirectory(prefix="doorbell-load-") as tmp:
        workdir = Path(tmp)
        broker = Broker(workdir / "broker")
        broker.start()
        try:
            keys = keygen(iss="jackson-pd", kid="jpd-load", out_dir=workdir / "city")
            requester = load_signing_key(keys.private_path)
            t0 = time.monotonic()
            homes = _prepare(workdir, broker, keys.public_jwks, rng)
            window = _window(homes)
            print(f"  {AGENTS} agents prepared in {time.monotonic() - t0:.0f} s", flush=True)
            rnd = _run_round(broker, homes, requester, MAIN_PRECISION, SECONDS, window, rng)
            report(f"deliveries complete, {SECONDS} requests (vs due: agents inside the circles)", len(rnd.delivered),
                   rnd.due, "", "1.0x, and none from outside")
            latencies = sorted((t - rnd.published[jti][0]) * 1000 for (jti, _kid), t in rnd.delivered.items())
            bare = sorted(_bare_round_trip_ms(broker))
            ref_decide = _decide_alone_per_s(homes, requester, window)
            report(f"decisions per second, {AGENTS} agents (vs decide() alone, one thread)", rnd.decisions / rnd.wall_s,
                   ref_decide, "/s", "informative")
            for q in (50, 90, 99):
                report(f"delivery latency p{q}, ms (vs bare QoS 1 round trip p{q})", _pct(latencies, q), _pct(bare, q),
                       "ms", "informative")
            report("broker CPU, % of one core (vs all agents + the agency, their processes)", 100 * rnd.broker_cpu_s / rnd.wall_s,
                   100 * rnd.own_cpu_s / rnd.wall_s, "%", "informative")
            for precision in range(6):
                sweep = _run_round(broker, homes, requester, precision, SWEEP_SECONDS, window, rng)
                received = sweep.received
                needed = Counter(kid for (_jti, kid) in {
                    (jti, h.key.kid) for jti, (_t, lat, lon) in sweep.published.items() for h in homes
                    if haversine_m(h.lat, h.lon, lat, lon) <= CIRCLE_M})
                per_agent = statistics.mean(received.values()) / max(len(sweep.published), 1)
                must = sum(needed.values()) / AGENTS / max(len(sweep.published), 1)
                report(f"messages per agent per request, precision {precision} (vs must receive)", per_agent, must,
                       "msg", "lower is better")
        finally:
            broker.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def _pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


