"""Run a protocol vectors file (the shape of ``vectors-v1.json``) through the real decision path.

For each case, as the file's ``how_to_use`` says: start from ``agent``,
replace the members the case's ``agent`` names, load ``trust`` as the trust
store, set the clock to ``now``, feed ``message`` (as UTF-8 bytes, the MQTT
payload) to :func:`agent.protocol.decision.decide`, and compare the reason (and, for
``granted``, the window) with ``expect``. The state the decision reads (seen
jtis, earlier grants, recorded footage, clock sync, kill switch) comes from
the vector through :class:`VectorState`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.errors import UserError
from agent.protocol.decision import Decision, Policy, decide
from agent.protocol.trust import TrustStore, TrustStoreError
from agent.timeutil import format_utc, parse_utc_z

# The project's copies of the protocol's worked cases, shipped inside the package so that an installed
# agent can check itself (``doorbell-agent conformance`` with no argument).
BUNDLED_VECTORS = Path(__file__).with_name("vectors") / "vectors-v1.json"
BUNDLED_DELIVERY = Path(__file__).with_name("vectors") / "delivery-v1.json"

STATE_MEMBERS = ("recorded", "clock_synced", "kill_switch", "seen", "grants")


class VectorsError(UserError):
    """The vectors file itself is missing or not in the expected shape."""


@dataclass
class VectorState:
    """An in-memory :class:`agent.protocol.decision.AgentState`; also handy for tests and benchmarks."""

    clock_synced: bool = True
    kill_switch: bool = False
    seen_jtis: dict[str, str] = field(default_factory=dict)
    grants: list[tuple[str, datetime]] = field(default_factory=list)
    spans: list[tuple[datetime, datetime]] = field(default_factory=list)

    def seen(self, jti: str) -> str | None:
        return self.seen_jtis.get(jti)

    def grants_since(self, iss: str, since: datetime) -> int:
        return sum(1 for who, at in self.grants if who == iss and at > since)

    def recorded(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        return [(s, e) for s, e in self.spans if s <= end and e >= start]

    @classmethod
    def from_vector(cls, agent: dict[str, Any]) -> VectorState:
        return cls(
            clock_synced=_bool(agent.get("clock_synced", True), "clock_synced"),
            kill_switch=_bool(agent.get("kill_switch", False), "kill_switch"),
            seen_jtis={s["jti"]: s["payload_sha256"] for s in agent.get("seen", [])},
            grants=[(g["iss"], parse_utc_z(g["at"])) for g in agent.get("grants", [])],
            spans=[(parse_utc_z(r["start"]), parse_utc_z(r["end"])) for r in agent.get("recorded", [])],
        )


def _bool(v: Any, name: str) -> bool:
    if type(v) is not bool:
        raise ValueError(f"{name} must be true or false")
    return v


@dataclass(frozen=True)
class CaseResult:
    name: str
    expected: str  # "reason" or "granted start/end"
    got: str
    ok: bool
    decision: Decision | None = None  # None when the case itself could not be set up
    detail: str = ""


def describe(reason: str, granted: tuple[datetime, datetime] | None) -> str:
    if reason == "granted" and granted is not None:
        return f"granted {format_utc(granted[0])}/{format_utc(granted[1])}"
    return reason


def _expected(expect: dict[str, Any]) -> str:
    reason = expect["reason"]
    if reason == "granted":
        g = expect["granted"]
        return describe(reason, (parse_utc_z(g["start"]), parse_utc_z(g["end"])))
    return str(reason)


def run_case(case: dict[str, Any], base_agent: dict[str, Any], trust: TrustStore) -> CaseResult:
    """One case; a case that cannot be set up is reported as differing, never raised."""
    name = str(case.get("name", "?"))
    try:
        expected = _expected(case["expect"])
        agent = {**base_agent, **case.get("agent", {})}
        policy = Policy.from_mapping({k: v for k, v in agent.items() if k not in STATE_MEMBERS})
        state = VectorState.from_vector(agent)
        now: datetime = parse_utc_z(case["now"])
        message = case["message"].encode("utf-8")
    except (KeyError, TypeError, ValueError, ValidationError) as exc:  # ValidationError is a ValueError; listed for clarity
        return CaseResult(name, _safe_expected(case), f"case not usable: {type(exc).__name__}: {exc}", False)
    decision = decide(message, trust=trust, policy=policy, state=state, now=now)
    got = describe(decision.reason.value, decision.granted)
    return CaseResult(name, expected, got, got == expected, decision, decision.detail)


def _safe_expected(case: dict[str, Any]) -> str:
    try:
        return _expected(case["expect"])
    except (KeyError, TypeError, ValueError):
        return "?"


def run_vectors_obj(doc: Any) -> list[CaseResult]:
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list) or not isinstance(doc.get("agent"), dict):
        raise VectorsError("a vectors file is a JSON object with 'agent', 'trust' and a list of 'cases'")
    try:
        trust = TrustStore.from_jwks(doc.get("trust"))
    except TrustStoreError as exc:
        raise VectorsError(f"the vectors' trust store is invalid: {exc}") from None
    return [run_case(case if isinstance(case, dict) else {}, doc["agent"], trust) for case in doc["cases"]]


def run_vectors(path: str | os.PathLike[str] = BUNDLED_VECTORS) -> list[CaseResult]:
    """Run every case of a vectors file; raise :class:`VectorsError` if the file is missing or not vectors."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VectorsError(f"{p} does not exist; give the path of a vectors file, or no path for the bundled vectors-v1.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VectorsError(f"cannot read {p}: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VectorsError(f"{p} is not JSON: {exc}") from None
    try:
        return run_vectors_obj(doc)
    except VectorsError as exc:
        raise VectorsError(f"{p}: {exc}") from None
