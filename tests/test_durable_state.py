"""The durable stores behind the decision: the vectors decided with real SQLite, files and clock.

The decision procedure reads `AgentState`; here that state is the replay memory,
the access log, the kill-switch file and a clock, so the vectors check that the
stores answer exactly as the protocol's state does, across a restart too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.state.accesslog import AccessLog
from agent.state.clock import ClockSource, FixedClock
from agent.protocol.conformance import STATE_MEMBERS, describe
from agent.state.killswitch import KillSwitch
from agent.protocol.decision import Policy, decide
from agent.state.replay import ReplayMemory
from agent.timeutil import parse_utc_z
from agent.protocol.trust import TrustStore
from tests import protocol_signing as ps


@dataclass
class DurableState:
    replay: ReplayMemory
    log: AccessLog
    switch: KillSwitch
    clock: ClockSource
    spans: list[tuple[datetime, datetime]]

    @property
    def clock_synced(self) -> bool:
        return self.clock.synced()[0]

    @property
    def kill_switch(self) -> bool:
        return self.switch.engaged

    def seen(self, jti: str) -> str | None:
        return self.replay.seen(jti)

    def grants_since(self, iss: str, since: datetime) -> int:
        return self.log.grants_since(iss, since)

    def recorded(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        return [(s, e) for s, e in self.spans if s <= end and e >= start]


def durable_state(tmp: Path, agent: dict[str, Any], now: datetime) -> DurableState:
    state = DurableState(
        replay=ReplayMemory(tmp / "state.sqlite"),
        log=AccessLog(tmp / "state.sqlite"),
        switch=KillSwitch(tmp / "killswitch"),
        clock=FixedClock(now, synced=agent.get("clock_synced", True)),
        spans=[(parse_utc_z(r["start"]), parse_utc_z(r["end"])) for r in agent.get("recorded", [])],
    )
    if agent.get("kill_switch"):
        state.switch.engage(by="test", now=now)
    for s in agent.get("seen", []):
        state.replay.remember(s["jti"], s["payload_sha256"], s["exp"])
    for i, g in enumerate(agent.get("grants", [])):
        state.log.append(
            jti=f"earlier-grant-{i:04d}-aaaa", iss=g["iss"], sub="s", case="c", purpose="p",
            area={"lat": 0, "lon": 0, "radius_m": 1}, requested=("2026-12-01T00:00:00Z", "2026-12-01T00:01:00Z"),
            reason="granted", kids=["k"], at=parse_utc_z(g["at"]),
        )  # fmt: skip
    return state


STATEFUL = [c["name"] for c in ps.vectors()["cases"] if set(c.get("agent", {})) & {"seen", "grants", "kill_switch", "clock_synced"}]


@pytest.mark.parametrize("name", STATEFUL)
def test_vector_cases_with_state_decide_the_same_on_durable_stores(tmp_path: Path, name: str) -> None:
    doc = ps.vectors()
    case = ps.case(name)
    agent = {**doc["agent"], **case.get("agent", {})}
    policy = Policy.from_mapping({k: v for k, v in agent.items() if k not in STATE_MEMBERS})
    now = parse_utc_z(case["now"])
    state = durable_state(tmp_path, agent, now)
    d = decide(case["message"].encode(), trust=TrustStore.from_jwks(doc["trust"]), policy=policy, state=state, now=now)
    expect = case["expect"]
    want = describe(expect["reason"], (parse_utc_z(expect["granted"]["start"]), parse_utc_z(expect["granted"]["end"])) if "granted" in expect else None)
    assert describe(d.reason.value, d.granted) == want


def test_a_request_after_a_restart_is_a_duplicate_and_its_twin_a_replay(tmp_path: Path) -> None:
    """Grant, log and remember a request; restart; the same copy is dropped and a different payload is refused."""
    doc = ps.vectors()
    trust = TrustStore.from_jwks(doc["trust"])
    policy = Policy.from_mapping({k: v for k, v in doc["agent"].items() if k not in STATE_MEMBERS})
    base = ps.case("base-compact")
    twin = ps.case("replayed-jti-different-payload")
    now = parse_utc_z(base["now"])

    state = durable_state(tmp_path, doc["agent"], now)
    d = decide(base["message"].encode(), trust=trust, policy=policy, state=state, now=now)
    assert d.reason.value == "granted" and d.request is not None and d.payload_sha256
    state.replay.remember(d.request.jti, d.payload_sha256, d.request.exp)
    seq, h = state.log.append_decision(d, at=now)
    state.replay.close()
    state.log.close()

    again = durable_state(tmp_path, doc["agent"], now + timedelta(seconds=30))  # the agent restarted
    assert decide(base["message"].encode(), trust=trust, policy=policy, state=again, now=now).reason.value == "duplicate"
    r = decide(twin["message"].encode(), trust=trust, policy=policy, state=again, now=now)
    assert r.reason.value == "replayed"
    assert again.log.head() == (seq, h) and again.log.grants_since("jackson-pd", now - timedelta(days=1)) == 1
    entry = again.log.entries()[0].data
    assert entry["granted"] == {"start": "2026-12-03T16:30:00Z", "end": "2026-12-03T17:00:00Z"}
    assert entry["case"] == "JPD-2026-001234" and entry["kids"] == ["jpd-2026a"]


def test_kill_switch_file_blocks_sharing_and_corruption_fails_closed(tmp_path: Path) -> None:
    doc = ps.vectors()
    trust = TrustStore.from_jwks(doc["trust"])
    policy = Policy.from_mapping({k: v for k, v in doc["agent"].items() if k not in STATE_MEMBERS})
    base = ps.case("base-compact")
    now = parse_utc_z(base["now"])
    state = durable_state(tmp_path, doc["agent"], now)
    (tmp_path / "killswitch").write_text(json.dumps({"engaged": False}))  # off, but not in the expected shape
    assert decide(base["message"].encode(), trust=trust, policy=policy, state=state, now=now).reason.value == "kill_switch"
    state.switch.release(by="test", now=now)
    assert decide(base["message"].encode(), trust=trust, policy=policy, state=state, now=now).reason.value == "granted"
