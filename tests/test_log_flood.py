"""One entry per decision, not per copy: floods of signed messages against the real service and log.

Signatures cannot be forged, but signed bytes can be captured and sent again. Before, every copy
was decided and listed, so anyone who could publish on the request topics grew the resident's
log (and slowed the rate-limit query) without any key. Each attack runs over a real TLS
Mosquitto, or through ``RequestService.handle`` exactly as the decision worker calls it, into a
real SQLite log:

- a captured request re-sent 200 times, each re-serialized (compact rewritten as general JSON,
  whitespace varied, the same valid signature): one ``replayed`` entry, 199 copies counted on it;
- copies sent before the genuine request with an old ``iat``, and the captured genuine bytes sent
  again after ``exp``: one ``expired`` entry with the rest counted on it, and the genuine copy is
  still granted (step 12: a copy refused before check 12 does not use up the jti);
- a key holder signing request after request the rules refuse: 100 listed in the hour, the rest
  counted per agency, invented agency names included; grants are still listed;
- a refusal that was only counted, but used up its jti: an identical copy stays a duplicate, even
  once the kill switch that refused it is off and the agent has restarted.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from agent.state.accesslog import REFUSALS_LISTED_PER_AGENCY_PER_HOUR, AccessLog
from agent.state.killswitch import KillSwitch
from tests.broker import Broker
from tests.protocol_signing import reserialized
from tests.test_service import HOME, WAIT, Agency, Agent, Env, home_topic, in_process, log_reasons, make_env, stopped_afterwards

pytestmark = pytest.mark.slow
LIMIT = REFUSALS_LISTED_PER_AGENCY_PER_HOUR


@pytest.fixture
def env(tmp_path: Path, write_config, broker: Broker) -> Env:  # noqa: ANN001
    return make_env(tmp_path, write_config, broker)


@pytest.fixture
def agents(env: Env) -> Iterator[list[Agent]]:
    yield from stopped_afterwards()


@pytest.fixture
def agency(env: Env) -> Iterator[Agency]:
    a = Agency(env, "jpd")
    yield a
    a.close()


def log_show(tmp_path: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "agent", "--config", str(tmp_path / "agent.toml"), "log", "show", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def copies_counted(env: Env, jti: str) -> dict[str, int]:
    """{outcome: copies counted on it} for the request's decision entries."""
    with AccessLog(env.cfg.paths.state_db) as alog:
        entries = alog.entries(jti=jti)
        more = alog.more_copies(entries)
        assert alog.verify(env.key.kid).ok  # nothing in the chain was touched
    return {e.outcome: more.get(e.seq, 0) for e in entries if e.type == "decision"}


def test_re_serialized_copies_of_a_captured_request_are_listed_once(env: Env, agents: list[Agent], agency: Agency,
                                                                    tmp_path: Path) -> None:
    agents.append(agent := Agent(env))
    genuine = agency.request()
    agency.publish(genuine, [home_topic(env)])
    assert agent.next_decision().reason == "granted"
    assert agent.wait_delivery_end(genuine.jti)[0] == "delivered"
    for i in range(200):  # no key needed: the captured bytes, rewritten
        agency.session.publish(home_topic(env), reserialized(genuine.message, i), expiry_s=600)
    assert Counter(str(agent.next_decision().reason) for _ in range(200)) == {"replayed": 200}
    assert [r for j, r in log_reasons(env) if j == genuine.jti] == ["granted", "delivered", "replayed"]
    assert copies_counted(env, genuine.jti) == {"granted": 0, "replayed": 199}
    assert "and 199 more copies of this request, refused the same way (counted, not listed)" in log_show(tmp_path)
    entries = json.loads(log_show(tmp_path, "--json"))["entries"]
    assert [e["more_copies"] for e in entries if e["entry"]["type"] == "decision"] == [0, 199]


def test_expired_copies_are_listed_once_and_do_not_block_the_genuine_request(env: Env, agents: list[Agent],
                                                                            agency: Agency) -> None:
    agents.append(agent := Agent(env))
    genuine = agency.request()
    old = agency.request(jti=genuine.jti, issued=env.clock.now() - timedelta(minutes=20))
    for _ in range(250):
        agency.session.publish(home_topic(env), old.message, expiry_s=600)
    assert Counter(str(agent.next_decision().reason) for _ in range(250)) == {"expired": 250}
    agency.publish(genuine, [home_topic(env)])  # step 12: the expired copies did not use up its jti
    assert agent.next_decision().reason == "granted"
    assert agent.wait_delivery_end(genuine.jti)[0] == "delivered"
    env.clock.advance(16 * 60)  # the captured genuine bytes, sent again after its exp
    for _ in range(250):
        agency.session.publish(home_topic(env), genuine.message, expiry_s=600)
    assert Counter(str(agent.next_decision().reason) for _ in range(250)) == {"expired": 250}
    assert [r for j, r in log_reasons(env) if j == genuine.jti] == ["expired", "granted", "delivered"]
    assert copies_counted(env, genuine.jti) == {"expired": 499, "granted": 0}


def test_a_key_holders_refusals_beyond_the_hourly_limit_are_counted_and_grants_still_listed(env: Env,
                                                                                           agency: Agency) -> None:
    svc = in_process(env)
    impostor = dataclasses.replace(env.requester, iss="made-up-agency")  # the agency's key, another agency's name
    try:
        for _ in range(LIMIT + 20):
            far = agency.request(lat=HOME[0] + 0.045, lon=HOME[1])
            assert svc.handle(far.message.encode()).reason == "outside_geofence"
        for _ in range(5):
            assert svc.handle(agency.request(signer=impostor).message.encode()).reason == "wrong_issuer"
        good = agency.request()
        assert svc.handle(good.message.encode()).reason == "granted"
        assert svc.counters.refusals_counted == 25
    finally:
        svc.stop()
        assert svc.wait(WAIT)
    assert Counter(r for _, r in log_reasons(env)) == {"outside_geofence": LIMIT, "granted": 1}
    with AccessLog(env.cfg.paths.state_db) as alog:
        assert [(c["iss"], c["reason"], c["count"]) for c in alog.refusals_not_listed()] == [
            ("jackson-pd", "outside_geofence", 20), ("jackson-pd", "wrong_issuer", 5)]
        assert alog.verify(env.key.kid).ok


def test_a_refusal_only_counted_still_uses_up_its_jti(env: Env, agency: Agency) -> None:
    """Over the limit, a request refused while the kill switch was on is counted, not listed. Its jti is
    still used up: once the switch is off (and after a restart) an identical copy is a duplicate, never
    decided afresh and granted."""
    switch = KillSwitch(env.cfg.paths.killswitch_file)
    svc = in_process(env)
    try:
        for _ in range(LIMIT):
            far = agency.request(lat=HOME[0] + 0.045, lon=HOME[1])
            assert svc.handle(far.message.encode()).reason == "outside_geofence"
        switch.engage("test: homeowner pressed the button")
        held_back = agency.request()
        assert svc.handle(held_back.message.encode()).reason == "kill_switch"
        switch.release("test: released")
        assert svc.handle(held_back.message.encode()).reason == "duplicate"
    finally:
        svc.stop()
        assert svc.wait(WAIT)
    restarted = in_process(env)
    try:
        assert restarted.handle(held_back.message.encode()).reason == "duplicate"
        assert not restarted.outbox.has(held_back.jti)
    finally:
        restarted.stop()
        assert restarted.wait(WAIT)
    assert held_back.jti not in {j for j, _ in log_reasons(env)}
    with AccessLog(env.cfg.paths.state_db) as alog:
        assert [(c["reason"], c["count"]) for c in alog.refusals_not_listed()] == [("kill_switch", 1)]
