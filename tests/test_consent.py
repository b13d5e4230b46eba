"""`doorbell-agent consent`: the resident's consent and limits, changed without a restart and on the record.

What a resident would check: ``consent show`` says in words who may get what; ``set`` and
``withdraw`` change what the running agent decides at its very next request (a real service on a
real broker), each change is in the access log with the old and new values and the log still
verifies; a damaged consent file shares nothing and says why and how to fix it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import AgentConfig, load_config
from agent.state.accesslog import AccessLog
from agent.state.consent import PolicyReloader, effective_policy
from tests.broker import Broker
from tests.test_service import Agency, Agent, Env, make_env

CONFIG = """
[policy]
program = "jackson-ms/camera-pilot-2026"
location = { lat = 32.3, lon = -90.2 }
timezone = "America/Chicago"
max_radius_m = 1000
[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2036-01-01T00:00:00Z
[mqtt]
host = "localhost"
"""


@pytest.fixture
def config(write_config: Callable[[str], Path]) -> Path:
    return write_config(CONFIG)


def cli(config: Path, *args: str) -> int:
    return main(["--config", str(config), *args])


def resident_entries(cfg: AgentConfig) -> list[dict]:
    with AccessLog(cfg.paths.state_db) as alog:
        return [{"change": e.outcome, **e.data} for e in alog.entries() if e.type == "resident"]


def test_show_says_who_may_get_what_in_words(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(config, "consent", "show") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Consent: GIVEN, from 2025-12-31 18:00 CST until 2035-12-31 18:00 CST."
    assert out[1] == ("Agencies of the program jackson-ms/camera-pilot-2026 may receive up to 1 hour of footage at a "
                      "time, from the last 3 days, for incidents within 1 km of your home, until 2035-12-31 18:00 CST.")


def test_set_changes_the_rules_logs_old_and_new_and_the_log_verifies(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(config, "consent", "set", "--until", "2027-01-15", "--days", "mon-fri", "--hours", "08:00-20:00",
               "--max-length", "30m", "--max-age", "2d", "--radius", "500m", "--approval", "ask") == 0
    out = capsys.readouterr().out
    assert ("may receive up to 30 minutes of footage at a time, from the last 2 days, for incidents within 500 m of "
            "your home, until the end of Fri 15 Jan 2027, recorded Mon-Fri 08:00-20:00 only.") in out
    assert "you approve each request yourself" in out
    cfg = load_config(config)
    policy = effective_policy(cfg)
    # "until 2027-01-15" is the end of that local day: midnight CST is 06:00 UTC on the 16th.
    assert policy.consent.end == datetime(2027, 1, 16, 6, 0, tzinfo=UTC)
    assert policy.max_radius_m == 500 and policy.max_window_s == 1800 and policy.max_age_s == 172800
    assert [(r.days, r.from_, r.to) for r in policy.consent.schedule] == [(["mon", "tue", "wed", "thu", "fri"], "08:00", "20:00")]
    assert policy.program == "jackson-ms/camera-pilot-2026" and policy.location.lat == 32.3  # not the file's to change
    [entry] = resident_entries(cfg)
    assert entry["change"] == "consent_changed"
    assert entry["old"]["max_radius_m"] == 1000 and entry["new"]["max_radius_m"] == 500
    assert entry["old"]["approval"] == "auto" and entry["new"]["approval"] == "ask"
    assert entry["new"]["consent"]["end"] == "2027-01-16T06:00:00Z"

    assert cli(config, "consent", "withdraw") == 0
    assert cli(config, "consent", "set", "--resume") == 0
    capsys.readouterr()
    assert [e["change"] for e in resident_entries(cfg)] == ["consent_changed", "consent_withdrawn", "consent_resumed"]
    assert cli(config, "log", "show") == 0
    shown = capsys.readouterr().out
    assert "you WITHDREW your consent" in shown and "you gave your consent again" in shown
    assert cli(config, "log", "verify") == 0  # the standalone verifier takes the new change names


@pytest.mark.parametrize(("args", "words"), [
    (("--max-length", "5x"), "--max-length '5x' is not a duration"),
    (("--radius", "3km"), "--radius '3km' is above the largest allowed (2km)"),
    (("--days", "funday"), "--days: 'funday' is not a day"),
    (("--hours", "8-20"), "--hours '8-20' is not a range of hours; write HH:MM-HH:MM"),
    (("--until", "next week"), "--until 'next week' is not a date"),
    (("--until", "2020-01-01"), "--until '2020-01-01' is already past"),
    (("--from", "2030-01-01", "--until", "2029-01-01"), "--from must come before the end of your consent (2029-01-02 00:00 CST); give a later --until as well"),
    ((), "nothing to change"),
])
def test_bad_options_name_the_option_and_the_fix(config: Path, capsys: pytest.CaptureFixture[str],
                                                 args: tuple[str, ...], words: str) -> None:
    assert cli(config, "consent", "set", *args) != 0
    assert words in capsys.readouterr().err
    assert not load_config(config).paths.consent_file.exists()


def test_a_damaged_consent_file_shares_nothing_and_says_how_to_fix_it(
        config: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(config)
    cfg.paths.consent_file.parent.mkdir(parents=True, exist_ok=True)
    cfg.paths.consent_file.write_text('{"v": 1, "max_radius_m": 5000}')
    reloader = PolicyReloader(cfg)
    with caplog.at_level(logging.ERROR, logger="agent"):
        policy = reloader.get()
    assert policy.consent.withdrawn  # fail closed
    assert "max_radius_m" in caplog.text and "consent withdraw" in caplog.text
    assert cli(config, "consent", "show") == 0
    assert "NOTHING IS SHARED" in capsys.readouterr().out
    assert cli(config, "status") == 0
    assert "your consent file" in capsys.readouterr().out.split("Sharing: BLOCKED", 1)[1]
    assert cli(config, "config", "check") == 1
    assert "max_radius_m" in capsys.readouterr().err
    assert cli(config, "consent", "set", "--radius", "300m") != 0  # not over a file nobody can read
    assert "consent withdraw" in capsys.readouterr().err
    assert cli(config, "consent", "withdraw") == 0  # always possible, and replaces the damaged file
    assert cli(config, "consent", "set", "--resume") == 0
    assert not reloader.get().consent.withdrawn and reloader.error is None


# -- the running service, on the real broker ---------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, write_config: Callable[[str], Path], broker: Broker) -> Env:
    return make_env(tmp_path, write_config, broker)


@pytest.fixture
def agency(env: Env) -> Iterator[Agency]:
    a = Agency(env, "jpd")
    yield a
    a.close()


def decision_for(agent: Agent, jti: str) -> str:
    """The decision on ``jti``: the request goes to several topics, and the copies are duplicates."""
    while True:
        d = agent.next_decision()
        if d is not None and d.request is not None and d.request.jti == jti and d.reason != "duplicate":
            return str(d.reason)


@pytest.mark.slow
def test_consent_changes_apply_to_the_running_service_without_a_restart(
        env: Env, agency: Agency, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "agent.toml"
    agent = Agent(env)
    try:
        assert cli(config, "consent", "withdraw") == 0
        built = agency.request()
        agency.publish(built)
        assert decision_for(agent, built.jti) == "no_consent"

        assert cli(config, "consent", "set", "--resume") == 0
        built = agency.request()
        agency.publish(built)
        assert decision_for(agent, built.jti) == "granted"
        assert agent.wait_delivery_end(built.jti)[0] == "delivered"

        # A damaged file: nothing is shared, and the journal says why and what to do.
        env.cfg.paths.consent_file.write_text("{not json")
        with caplog.at_level(logging.INFO, logger="agent"):
            built = agency.request()
            agency.publish(built)
            assert decision_for(agent, built.jti) == "no_consent"
        assert "is not valid JSON" in caplog.text and "doorbell-agent consent show" in caplog.text
        assert agent.svc.status()["consent_file_error"] is not None
    finally:
        agent.stop()
    with AccessLog(env.cfg.paths.state_db) as alog:
        outcomes = [e.outcome for e in alog.entries()]
    assert outcomes.count("no_consent") == 2 and "granted" in outcomes
    assert outcomes.index("consent_withdrawn") < outcomes.index("no_consent") < outcomes.index("consent_resumed")


def test_status_json_reports_the_consent_file(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(config, "consent", "set", "--radius", "400m") == 0
    capsys.readouterr()
    assert cli(config, "consent", "show", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rules"]["max_radius_m"] == 400 and "location" not in data["rules"]
    assert data["status"]["source"] == "consent_file" and data["status"]["overridden"] == ["max_radius_m"]
