"""The durable stores behind the decision: the vectors decided with real SQLite, files and clock.

The decision procedure reads `AgentState`; the running agent implements it with
:class:`agent.sharing.service.LiveState` over the replay memory, the access log,
the kill-switch file, a clock and the buffer's segment index. Here that same
adapter is built over real stores, so the vectors check that the stores answer
exactly as the protocol's state does, across a restart too.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.buffer.segmentfile import SegmentFileInfo
from agent.buffer.segments import MAX_SEGMENT_US, SegmentStore
from agent.protocol.conformance import STATE_MEMBERS, describe
from agent.protocol.decision import Policy, decide
from agent.protocol.trust import TrustStore
from agent.sharing.service import LiveState
from agent.state.accesslog import AccessLog
from agent.state.clock import FixedClock
from agent.state.killswitch import KillSwitch
from agent.state.replay import ReplayMemory
from agent.timeutil import parse_utc_z, to_us
from tests import protocol_signing as ps

FRAME_US = 66_667  # 15 fps


def index_recordings(store: SegmentStore, recorded: list[dict[str, str]]) -> None:
    """Index the vector's recorded spans as the recorder would: back-to-back segments of at most 10 minutes.

    Only the index is written (the decision reads spans from it, never the files); days of
    footage as real video would make this test take hours.
    """
    for r in recorded:
        start, end = to_us(parse_utc_z(r["start"])), to_us(parse_utc_z(r["end"]))
        for s in range(start, end, MAX_SEGMENT_US):
            e = min(s + MAX_SEGMENT_US, end)
            store.add(SegmentFileInfo(store.new_segment_path(s), s, e, max(1, (e - s) // FRAME_US), 0, "", 1))


def durable_state(tmp: Path, agent: dict[str, Any], now: datetime) -> LiveState:
    """The production adapter over stores in ``tmp``; opening it again on the same ``tmp`` is a restart."""
    store = SegmentStore(tmp / "buffer.sqlite", tmp / "segments")
    if not store.all():  # the footage outlives a restart, like the rest of the state
        index_recordings(store, agent.get("recorded", []))
    state = LiveState(
        clock=FixedClock(now, synced=agent.get("clock_synced", True)),
        killswitch=KillSwitch(tmp / "killswitch"),
        replay=ReplayMemory(tmp / "state.sqlite"),
        accesslog=AccessLog(tmp / "state.sqlite"),
        store=store,
    )
    if agent.get("kill_switch"):
        state.killswitch.engage(by="test", now=now)
    for s in agent.get("seen", []):
        state.replay.remember(s["jti"], s["payload_sha256"], s["exp"])
    for i, g in enumerate(agent.get("grants", [])):
        state.accesslog.append(
            jti=f"earlier-grant-{i:04d}-aaaa", iss=g["iss"], sub="s", case="c", purpose="p",
            area={"lat": 0, "lon": 0, "radius_m": 1}, requested=("2026-12-01T00:00:00Z", "2026-12-01T00:01:00Z"),
            reason="granted", kids=["k"], at=parse_utc_z(g["at"]),
        )  # fmt: skip
    return state


STATEFUL = [c["name"] for c in ps.vectors()["cases"] if set(c.get("agent", {})) & set(STATE_MEMBERS)]


@pytest.mark.parametrize("name", STATEFUL)
def test_vector_cases_with_state_decide_the_same_on_durable_stores(tmp_path: Path, name: str) -> None:
    """Every vector that sets the agent's state decides the same with that state kept in the agent's own stores."""
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
    seq, h = state.accesslog.append_decision(d, at=now)
    for store in (state.replay, state.accesslog, state.store):
        store.close()

    again = durable_state(tmp_path, doc["agent"], now + timedelta(seconds=30))  # the agent restarted
    assert decide(base["message"].encode(), trust=trust, policy=policy, state=again, now=now).reason.value == "duplicate"
    r = decide(twin["message"].encode(), trust=trust, policy=policy, state=again, now=now)
    assert r.reason.value == "replayed"
    assert again.accesslog.head() == (seq, h) and again.accesslog.grants_since("jackson-pd", now - timedelta(days=1)) == 1
    entry = again.accesslog.entries()[0].data
    assert entry["granted"] == {"start": "2026-12-03T16:30:00Z", "end": "2026-12-03T17:00:00Z"}
    assert entry["case"] == "JPD-2026-001234" and entry["kids"] == ["jpd-2026a"]


def test_kill_switch_file_blocks_sharing_and_corruption_fails_closed(tmp_path: Path) -> None:
    """A kill-switch file the agent cannot make sense of counts as engaged; releasing it lets a request through."""
    doc = ps.vectors()
    trust = TrustStore.from_jwks(doc["trust"])
    policy = Policy.from_mapping({k: v for k, v in doc["agent"].items() if k not in STATE_MEMBERS})
    base = ps.case("base-compact")
    now = parse_utc_z(base["now"])
    state = durable_state(tmp_path, doc["agent"], now)
    (tmp_path / "killswitch").write_text(json.dumps({"engaged": False}))  # off, but not in the expected shape
    assert decide(base["message"].encode(), trust=trust, policy=policy, state=state, now=now).reason.value == "kill_switch"
    state.killswitch.release(by="test", now=now)
    assert decide(base["message"].encode(), trust=trust, policy=policy, state=state, now=now).reason.value == "granted"
