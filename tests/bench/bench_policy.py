"""Benchmark: parse + verify + decide one request, beside one bare Ed25519 verification.

The reference is the floor: every request needs at least one signature
check. The goal is that everything else (strict parsing, claims validation,
the 22 checks, schedule arithmetic) costs at most twice that again.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

from agent.protocol.conformance import STATE_MEMBERS, VectorState
from agent.protocol.decision import Policy, Reason, decide
from agent.protocol.jose import parse_unverified
from agent.protocol.trust import TrustStore
from tests.bench.report import Report
from tests.conftest import VECTORS

N = 10_000



def _timings(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(200):  # warm up
        fn()
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000)
    return out


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run(report: Report) -> None:
    doc = json.loads(VECTORS.read_text(encoding="utf-8"))
    case = next(c for c in doc["cases"] if c["name"] == "base-compact")
    message = case["message"].encode()
    trust = TrustStore.from_jwks(doc["trust"])
    agent = doc["agent"]
    policy = Policy.from_mapping({k: v for k, v in agent.items() if k not in STATE_MEMBERS})
    state = VectorState.from_vector(agent)  # seen() is empty: every run decides in full
    from agent.timeutil import parse_utc_z

    now = parse_utc_z(case["now"])
    assert decide(message, trust=trust, policy=policy, state=state, now=now).reason is Reason.GRANTED

    sig = parse_unverified(message).signatures[0]
    key = trust.public_key(sig.kid)
    assert key is not None

    def bare() -> None:
        key.verify(sig.signature, sig.signing_input)

    def full() -> None:
        decide(message, trust=trust, policy=policy, state=state, now=now)

    ref = _timings(bare, N)
    ours = _timings(full, N)
    ref_p50 = statistics.median(ref)
    report("parse+verify+decide p50 (vs bare Ed25519 verify p50)", statistics.median(ours), ref_p50, "us", "<= 3x")
    report("parse+verify+decide p99 (vs bare Ed25519 verify p99)", _p(ours, 99), _p(ref, 99), "us", "report only")


if __name__ == "__main__":
    run(Report())
