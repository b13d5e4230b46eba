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
