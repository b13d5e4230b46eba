"""`doorbell-agent status` on sharing, run as the homeowner runs it: it must give the real reason nothing is shared."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.protocol.trust import TrustStore
from agent.state.truststore import save_trust_store
from tests import protocol_signing as ps

CONFIG = """
[policy]
program = "p"
location = {{ lat = 32.3, lon = -90.2 }}
timezone = "America/Chicago"
[policy.consent]
start = {start}
end = {end}
withdrawn = {withdrawn}
[mqtt]
host = "localhost"
[clock]
assume_synced = true
"""


def status(write_config: Callable[[str], Path], tmp_path: Path, *, start: str, end: str, withdrawn: bool = False) -> tuple[str, dict]:
    """(the plain-words output, the --json output) with one valid agency key trusted and the clock taken as right."""
    config = write_config(CONFIG.format(start=start, end=end, withdrawn=str(withdrawn).lower()))
    save_trust_store(TrustStore.from_jwks({"keys": ps.vectors()["trust"]["keys"][:1]}), tmp_path / "data" / "trust.jwks.json")
    run = [sys.executable, "-m", "agent", "--config", str(config), "status"]
    text = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    data = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60)
    return text.stdout, json.loads(data.stdout)["sharing"]


def sharing_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("Sharing:"))


def test_consent_given_says_until_when(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    out, data = status(write_config, tmp_path, start="2026-01-01T00:00:00Z", end="2036-01-01T06:00:00Z")
    assert sharing_line(out) == ("Sharing: allowed for signed requests that meet your rules (1 trusted agency key(s); "
                                 "your consent runs until 2036-01-01 00:00:00 CST).")
    assert data["consent"] == {"consents": True, "state": "given", "why": None, "withdrawn": False,
                               "start": "2026-01-01T00:00:00Z", "end": "2036-01-01T06:00:00Z"}


@pytest.mark.parametrize(
    ("period", "withdrawn", "state", "words"),
    [
        (("2026-01-01T00:00:00Z", "2036-01-01T00:00:00Z"), True, "withdrawn",
         "you withdrew your consent (policy.consent.withdrawn = true)"),
        (("2025-01-01T00:00:00Z", "2025-06-01T05:00:00Z"), False, "ended",
         "your consent period ended on 2025-06-01 00:00 CDT (policy.consent.end)"),
        (("2035-12-24T06:00:00Z", "2036-01-01T00:00:00Z"), False, "not_started",
         "your consent period starts only on 2035-12-24 00:00 CST (policy.consent.start)"),
        (("2025-01-01T00:00:00Z", "2025-06-01T05:00:00Z"), True, "withdrawn",  # withdrawn is the reason that stays
         "you withdrew your consent"),
    ],
    ids=["withdrawn", "ended", "not-started", "ended-and-withdrawn"],
)
def test_no_consent_blocks_sharing_and_says_why(
    write_config: Callable[[str], Path], tmp_path: Path, period: tuple[str, str], withdrawn: bool, state: str, words: str
) -> None:
    out, data = status(write_config, tmp_path, start=period[0], end=period[1], withdrawn=withdrawn)
    line = sharing_line(out)
    assert line.startswith("Sharing: BLOCKED, nothing will be shared because ") and words in line, line
    assert "allowed" not in out
    assert data["consent"]["consents"] is False and data["consent"]["state"] == state
    assert words in data["consent"]["why"]


def test_consent_is_one_reason_among_others(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    config = write_config(CONFIG.format(start="2026-01-01T00:00:00Z", end="2036-01-01T00:00:00Z", withdrawn="true"))
    out = subprocess.run([sys.executable, "-m", "agent", "--config", str(config), "status"], capture_output=True, text=True, timeout=60)
    line = sharing_line(out.stdout)
    assert "no agency key is trusted" in line and "you withdrew your consent" in line


def test_consent_period_ends_as_the_decision_says(write_config: Callable[[str], Path]) -> None:
    """``[start, end)`` exactly as :meth:`Policy.consents_at` (step 14): status and the decision cannot disagree."""
    from datetime import UTC, datetime, timedelta

    from agent.config import load_config
    from agent.protocol.decision import Policy
    from agent.runtime.status import consent_status

    cfg = load_config(write_config(CONFIG.format(start="2026-01-01T00:00:00Z", end="2027-01-01T00:00:00Z", withdrawn="false")))
    assert cfg.policy is not None
    policy = Policy.from_config(cfg.policy)
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    for now, state in [(start - timedelta(microseconds=1), "not_started"), (start, "given"),
                       (end - timedelta(microseconds=1), "given"), (end, "ended")]:
        got = consent_status(cfg, now)
        assert (got["state"], got["consents"]) == (state, policy.consents_at(now)), now


@pytest.mark.slow
def test_status_right_after_the_agent_stops_says_stopped_and_counts_what_the_log_holds(
        tmp_path: Path, write_config: Callable[[str], Path], broker) -> None:  # noqa: ANN001
    """Issue 10: `status` after a stop showed "connected" and the stopped process's own counters.

    A real service on the real broker grants one request and refuses one, and stops; `status`
    (another process) must say the listener stopped and take its figures from the access log.
    """
    from agent.state.accesslog import AccessLog
    from tests.test_service import Agency, Agent, make_env

    env = make_env(tmp_path, write_config, broker)
    config = tmp_path / "agent.toml"
    with config.open("a") as f:  # status shows the sharing side only with an [mqtt] section
        f.write('\n[mqtt]\nhost = "localhost"\n[clock]\nassume_synced = true\n')
    agency = Agency(env, "jpd")
    agent = Agent(env)
    try:
        granted, refused = agency.request(), agency.request(radius_m=1500)  # over max_radius_m
        for built in (granted, refused):
            agency.publish(built)
        assert agent.wait_delivery_end(granted.jti)[0] == "delivered"
        seen = set()
        while not {granted.jti, refused.jti} <= seen:
            d = agent.next_decision()
            if d is not None and d.request is not None:
                seen.add(d.request.jti)
    finally:
        agent.stop()
        agency.close()
    run = [sys.executable, "-m", "agent", "--config", str(config), "status"]
    data = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60, check=True).stdout)
    svc = data["sharing"]["service"]
    assert svc["stopped"] is True and svc["transport"]["ready"] is False and svc["transport"]["state"] == "stopped"
    with AccessLog(env.cfg.paths.state_db) as alog:
        outcomes = [e.outcome for e in alog.entries()]
    counts = data["sharing"]["log"]
    assert counts["error"] is None
    assert (counts["requests"], counts["granted"], counts["refused"], counts["delivered"]) == (
        sum(o in ("granted", "radius_too_large") for o in outcomes), outcomes.count("granted"),
        outcomes.count("radius_too_large"), outcomes.count("delivered")) == (2, 1, 1, 1)
    text = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "Request listener: STOPPED at" in text and "connected" not in text.replace("not connected", "")
    assert "2 request(s), 1 granted, 1 refused, 0 held for you, 1 deliveries completed" in text
