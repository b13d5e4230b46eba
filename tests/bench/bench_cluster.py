"""The agent on a two-node ejabberd cluster: agents on node 1, the agency on node 2.

The same real parts as the test suite (TLS, passwords, ACLs by identity; the
real service and buffer; the agency's reference client), run twice in the
same process: once through the two-node ejabberd cluster on loopback
(tests/ejabberd.py, ``join_cluster``), and once through a single Mosquitto
(tests/broker.py, per-message debug logging turned down as in bench_wire),
which is the reference every figure is printed beside:

1. **PUBLISH to logged decision**, p50 and p99 over 200 freshly signed
   requests per broker, in interleaved blocks of 20 (after 10 unmeasured
   warm-up requests each): from the agency's publish (which waits for its
   PUBACK) to the service's ``on_decision`` hook, once the decision is durably
   in the access log. The window holds no footage, so each is decided
   ``no_footage`` and nothing is delivered. Through the cluster a request
   crosses from node 2 to node 1 (Erlang distribution) and comes back as a
   PUBACK.
2. **Grant to delivery received**: a 40-second window of the env's 320x240
   footage, from the agency's publish to the last chunk of a complete
   delivery at the agency (median of 5 interleaved rounds).
3. **Raw chunk throughput**: 40 chunks of 262144 bytes at QoS 1 from a paho
   client logged in as the agent (node 1) to one logged in as the agency
   (node 2), pipelined; MB/s from the first publish to the last message
   received. ejabberd keeps one QoS 1 message in flight per subscriber
   (it ignores the Receive Maximum), Mosquitto up to 20 by default.
4. **A burst into the agent**: 2,000 junk messages of 200 bytes published
   at once (QoS 1, pipelined) to the agent's cell from the agency's node;
   messages per second until the agent's transport has stored all of them in
   its inbox (the PUBACK to the broker follows each group commit). Mosquitto
   sends up to the agent's Receive Maximum (1024) ahead of its PUBACKs;
   ejabberd sends the next message only after the PUBACK for the last one, so
   every message waits for its own commit.

Run: ``.venv/bin/python -m tests.bench cluster``. Skipped, with the reason,
where ejabberd is not installed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.bench.report import Report

LATENCY_N = 200
BLOCK = 20
WARMUP = 10
DELIVERY_ROUNDS = 5
CHUNKS = 40
CHUNK_BYTES = 262144
BURST = 2000
WAIT = 60.0


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))] if s else float("nan")


class _Side:
    """One agent and one agency on a broker setup (the agent's broker, the agency's broker)."""

    def __init__(self, name: str, workdir: Path, agent_broker: Any, agency_broker: Any) -> None:
        from tests.test_service import Agency, Agent, home_topic, make_env

        workdir.mkdir(parents=True)

        def write_config(body: str = "") -> Path:
            path = workdir / "agent.toml"
            path.write_text(f'[paths]\ndata_dir = "{workdir / "data"}"\n\n' + textwrap.dedent(body))
            return path

        self.name = name
        self.env = make_env(workdir, write_config, agent_broker)
        self.agent = Agent(self.env)
        self.decided: queue.Queue[tuple[float, Any]] = queue.Queue()
        self.agent.svc.on_decision = lambda d: self.decided.put((time.perf_counter(), d))
        self.agency = Agency(dataclasses.replace(self.env, broker=agency_broker), f"bench-{name}")
        self.topic = home_topic(self.env)

    def decision_latency(self, n: int) -> tuple[list[float], list[str]]:
        now = self.env.clock.now()
        window = (now - timedelta(hours=3), now - timedelta(hours=3) + timedelta(seconds=10))
        built = [self.agency.request(window=window) for _ in range(n)]
        out, reasons = [], []
        for b in built:
            t0 = time.perf_counter()
            self.agency.session.publish(self.topic, b.message, expiry_s=600)
            t1, decision = self.decided.get(timeout=WAIT)
            out.append(t1 - t0)
            reasons.append(str(decision.reason.value))
        return out, reasons

    def delivery_seconds(self) -> tuple[float, int]:
        from agent.city.receive import DeliveryCollector

        now = self.env.clock.now()
        built = self.agency.request(window=(now - timedelta(seconds=50), now - timedelta(seconds=10)))
        collector = DeliveryCollector(self.env.broker.root, built.jti)
        t0 = time.perf_counter()
        self.agency.session.publish(self.topic, built.message, expiry_s=600)
        while True:
            msg = self.agency.session.next_message(WAIT)
            if msg is None:
                raise TimeoutError(f"{self.name}: no complete delivery within {WAIT} s")
            pending = collector.add(msg.topic, msg.payload)
            if pending is not None and pending.complete and pending.manifest:
                return time.perf_counter() - t0, sum(len(c) for c in pending.chunks.values())

    def burst_rate(self, agency_broker: Any) -> float:
        from tests.broker import PeerClient

        transport = self.agent.transport
        base = transport.counters()["received"]
        with PeerClient(agency_broker, "agency") as flood:
            t0 = time.perf_counter()
            mids = [flood.publish_nowait(self.topic, os.urandom(200)) for _ in range(BURST)]
            if not transport.wait_until(lambda t: t.counters()["received"] >= base + BURST, WAIT * 2):
                raise TimeoutError(f"{self.name}: the agent stored {transport.counters()['received'] - base} of {BURST}")
            elapsed = time.perf_counter() - t0
            for mid in mids:
                flood.wait_puback(mid)
        assert transport.wait_until(lambda t: t.queued == 0, WAIT)  # decided (all malformed) before the next round
        return BURST / elapsed

    def close(self) -> None:
        self.agency.close()
        self.agent.stop()


def _raw_throughput(publisher_broker: Any, subscriber_broker: Any) -> float:
    """MB/s of QoS 1 chunks from an agent login to an agency login, first publish to last arrival."""
    from tests.broker import PeerClient

    root = publisher_broker.root
    payload = os.urandom(CHUNK_BYTES)
    with PeerClient(subscriber_broker, "agency") as sub, PeerClient(publisher_broker, "agent") as pub:
        sub.subscribe(f"{root}/v1/deliveries/#")
        t0 = time.perf_counter()
        mids = [pub.publish_nowait(f"{root}/v1/deliveries/bench/raw/{n}", payload) for n in range(CHUNKS)]
        for _ in range(CHUNKS):
            sub.messages.get(timeout=WAIT)
        elapsed = time.perf_counter() - t0
        for mid in mids:
            pub.wait_puback(mid)
    return CHUNKS * CHUNK_BYTES / elapsed / 1e6


def run(report: Callable[[str, float, float, str, str], None]) -> None:
    from tests.bench.bench_wire import _quiet_broker_class
    from tests.ejabberd import Ejabberd, missing_ejabberd

    why = missing_ejabberd()
    if why is not None:
        print(f"  skipped: {why}", flush=True)
        return
    logging.getLogger("agent").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(tmp)
        started: list[Any] = []
        sides: list[_Side] = []
        try:
            mosquitto = _quiet_broker_class()(work / "mosquitto")
            mosquitto.start()
            started.append(mosquitto)
            t0 = time.perf_counter()
            node1 = Ejabberd(work / "ejabberd1")
            node1.start()
            started.append(node1)
            t1 = time.perf_counter()
            node2 = Ejabberd(work / "ejabberd2", cluster_with=node1)
            node2.start()
            started.append(node2)
            t2 = time.perf_counter()
            print(f"  ejabberd node 1 up in {t1 - t0:.1f} s, node 2 joined its cluster in {t2 - t1:.1f} s", flush=True)

            ours = _Side("cluster", work / "side-cluster", node1, node2)
            sides.append(ours)
            ref = _Side("mosquitto", work / "side-mosquitto", mosquitto, mosquitto)
            sides.append(ref)

            for side in (ours, ref):
                side.decision_latency(WARMUP)
            lat: dict[str, list[float]] = {"cluster": [], "mosquitto": []}
            reasons: set[str] = set()
            for _ in range(LATENCY_N // BLOCK):
                for side in (ours, ref):
                    got, why_not = side.decision_latency(BLOCK)
                    lat[side.name] += got
                    reasons.update(why_not)
            if reasons != {"no_footage"}:
                print(f"  (note: decisions were {sorted(reasons)}, expected only no_footage)", flush=True)
            ms = 1000.0
            report(f"cluster: PUBLISH -> logged decision p50 ({LATENCY_N} no_footage)",
                   _pct(lat["cluster"], 0.5) * ms, _pct(lat["mosquitto"], 0.5) * ms, "ms", "informational")
            report(f"cluster: PUBLISH -> logged decision p99 ({LATENCY_N} no_footage)",
                   _pct(lat["cluster"], 0.99) * ms, _pct(lat["mosquitto"], 0.99) * ms, "ms", "p99 <= 10 ms")

            rounds: dict[str, list[float]] = {"cluster": [], "mosquitto": []}
            size = 0
            for _ in range(DELIVERY_ROUNDS):
                for side in (ours, ref):
                    seconds, size = side.delivery_seconds()
                    rounds[side.name].append(seconds)
            report(f"cluster: grant -> delivery received (40 s clip, {size} B, median of {DELIVERY_ROUNDS})",
                   statistics.median(rounds["cluster"]), statistics.median(rounds["mosquitto"]), "s", "informational")

            raw = {"cluster": [], "mosquitto": []}  # type: dict[str, list[float]]
            for _ in range(3):
                raw["cluster"].append(_raw_throughput(node1, node2))
                raw["mosquitto"].append(_raw_throughput(mosquitto, mosquitto))
            report(f"cluster: raw QoS 1 chunks node 1 -> node 2 ({CHUNKS} x {CHUNK_BYTES} B, median of 3)",
                   statistics.median(raw["cluster"]), statistics.median(raw["mosquitto"]), "MB/s", "informational")

            burst = {"cluster": [], "mosquitto": []}  # type: dict[str, list[float]]
            for _ in range(3):
                burst["cluster"].append(ours.burst_rate(node2))
                burst["mosquitto"].append(ref.burst_rate(mosquitto))
            report(f"cluster: burst of {BURST} into the agent, stored (median of 3)",
                   statistics.median(burst["cluster"]), statistics.median(burst["mosquitto"]), "msg/s", "informational")
        finally:
            for side in sides:
                side.close()
            for broker in reversed(started):
                broker.stop()


if __name__ == "__main__":
    run(Report())
