"""The decision procedure (PROTOCOL.md section 4) beyond the published vectors."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.protocol.conformance import STATE_MEMBERS, VectorState
from agent.protocol.decision import Decision, Policy, Reason, decide
from agent.protocol.trust import TrustStore
from tests import protocol_signing as ps

UTC = UTC
NOW = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
BASE = ps.case("base-compact")["message"].encode()


def agent_obj(**changes: Any) -> dict[str, Any]:
    return {**ps.vectors()["agent"], **changes}


def policy(**changes: Any) -> Policy:
    return Policy.from_mapping({k: v for k, v in agent_obj(**changes).items() if k not in STATE_MEMBERS})


def state(**changes: Any) -> VectorState:
    return VectorState.from_vector(agent_obj(**changes))


@pytest.fixture(scope="module")
def trust() -> TrustStore:
    return TrustStore.from_jwks(ps.vectors()["trust"])


def run(message: bytes, trust: TrustStore, *, now: datetime = NOW, st: VectorState | None = None,
        **policy_changes: Any) -> Decision:  # fmt: skip
    return decide(message, trust=trust, policy=policy(**policy_changes), state=st or state(), now=now)


def claims(**changes: Any) -> dict[str, Any]:
    c = ps.base_claims()
    for k, v in changes.items():
        if v is ...:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def test_granted_decision_carries_what_the_log_needs(trust: TrustStore) -> None:
    d = run(BASE, trust)
    assert d.reason is Reason.GRANTED and d.shares and not d.pre_auth
    assert d.request is not None and d.request.jti == "req-0001-base-aaaaaaaa"
    assert d.kids == ("jpd-2026a",) and d.issuer == "jackson-pd"
    assert d.payload_sha256 == hashlib.sha256(BASE).hexdigest()
    assert d.granted == (datetime(2026, 12, 3, 16, 30, tzinfo=UTC), datetime(2026, 12, 3, 17, tzinfo=UTC))
    assert Reason.GRANTED == "granted" and str(Reason.GRANTED) == "granted"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"x" * 16385, Reason.OVERSIZE),
        (b"hello police", Reason.MALFORMED),
        (ps.compact(claims(), kid="stranger"), Reason.UNKNOWN_KEY),
        (ps.compact(claims(), kid="jpd-2026a", signer="hcso-2026"), Reason.BAD_SIGNATURE),
    ],
)
def test_pre_authentication_failures_carry_nothing_from_the_message(trust: TrustStore, message: bytes, reason: Reason) -> None:
    d = run(message, trust)
    assert d.reason is reason and d.pre_auth
    assert d.request is None and d.issuer is None and d.kids == () and d.payload_sha256 is None and d.granted is None
    assert d.detail  # but says why, for the debug log


def test_true_as_latitude_is_malformed(trust: TrustStore) -> None:
    c = claims()
    c["area"]["lat"] = True
    assert run(ps.compact(c), trust).reason is Reason.MALFORMED


def test_nan_and_control_characters_are_malformed(trust: TrustStore) -> None:
    text = json.dumps(claims(), separators=(",", ":"))
    assert '"lat":32.299839' in text
    nan = ps.compact(text.replace('"lat":32.299839', '"lat":NaN'))
    assert run(nan, trust).reason is Reason.MALFORMED
    assert run(ps.compact(claims(purpose="Open the door\x1b[2J")), trust).reason is Reason.MALFORMED


def test_five_signatures_are_malformed_even_if_all_verify(trust: TrustStore) -> None:
    assert run(ps.general(claims(), ["jpd-2026a"] * 5), trust).reason is Reason.MALFORMED
    assert run(ps.general(claims(), ["jpd-2026a"] * 4), trust).reason is Reason.GRANTED


def test_same_kid_twice_counts_once(trust: TrustStore) -> None:
    d = run(ps.general(claims(), ["jpd-2026a", "jpd-2026a"]), trust)
    assert d.reason is Reason.GRANTED and d.kids == ("jpd-2026a",)


def test_any_signer_out_of_period_makes_key_not_valid(trust: TrustStore) -> None:
    t = TrustStore.from_jwks(ps.vectors()["trust"])
    t.revoke("jxn-oversight-1")
    msg = ps.general(claims(), ["jpd-2026a", "jxn-oversight-1"])
    assert run(msg, trust).reason is Reason.GRANTED
    assert run(msg, t).reason is Reason.KEY_NOT_VALID


def test_wrong_issuer_beats_everything_after_it(trust: TrustStore) -> None:
    msg = ps.compact(claims(aud="elsewhere"), kid="hcso-2026")
    assert run(msg, trust, st=state(clock_synced=False, kill_switch=True)).reason is Reason.WRONG_ISSUER


def test_duplicate_and_replay_use_the_whole_message_hash(trust: TrustStore) -> None:
    first = run(BASE, trust)
    seen = {"seen": [{"jti": "req-0001-base-aaaaaaaa", "payload_sha256": first.payload_sha256}]}
    assert run(BASE, trust, st=state(**seen)).reason is Reason.DUPLICATE
    same_claims_json = ps.general(claims(), ["jpd-2026a"])  # same request, other serialization
    assert run(same_claims_json, trust, st=state(**seen)).reason is Reason.REPLAYED


def test_nbf_skew(trust: TrustStore) -> None:
    iat = int(NOW.timestamp()) - 30
    at_edge = ps.compact(claims(iat=iat, exp=iat + 600, nbf=int(NOW.timestamp()) + 60))
    beyond = ps.compact(claims(iat=iat, exp=iat + 600, nbf=int(NOW.timestamp()) + 61))
    assert run(at_edge, trust).reason is Reason.GRANTED
    assert run(beyond, trust).reason is Reason.NOT_YET_VALID


def test_expiry_edge_is_inclusive(trust: TrustStore) -> None:
    exp = int(NOW.timestamp()) - 60
    assert run(ps.compact(claims(iat=exp - 600, exp=exp)), trust).reason is Reason.GRANTED
    assert run(ps.compact(claims(iat=exp - 601, exp=exp - 1)), trust).reason is Reason.EXPIRED


def test_consent_withdrawn_and_period_edges(trust: TrustStore) -> None:
    consent = dict(ps.vectors()["agent"]["consent"])
    assert run(BASE, trust, consent={**consent, "withdrawn": True}).reason is Reason.NO_CONSENT
    assert run(BASE, trust, consent={**consent, "end": "2026-12-03T18:00:00Z"}).reason is Reason.NO_CONSENT
    d = run(BASE, trust, consent={**consent, "start": "2026-12-03T16:59:59Z"})
    assert d.reason is Reason.GRANTED and d.granted == (datetime(2026, 12, 3, 16, 59, 59, tzinfo=UTC), datetime(2026, 12, 3, 17, tzinfo=UTC))
    d = run(BASE, trust, consent={**consent, "start": "2026-12-03T16:59:59.500Z"})
    assert d.reason is Reason.OUTSIDE_CONSENT  # half a second is less than one


def test_a_gap_in_recording_stays_inside_the_grant(trust: TrustStore) -> None:
    rec = [{"start": "2026-12-03T16:35:00Z", "end": "2026-12-03T16:40:00Z"}, {"start": "2026-12-03T16:50:00Z", "end": "2026-12-03T16:55:00Z"}]
    d = run(BASE, trust, st=state(recorded=rec))
    assert d.reason is Reason.GRANTED
    assert d.granted == (datetime(2026, 12, 3, 16, 35, tzinfo=UTC), datetime(2026, 12, 3, 16, 55, tzinfo=UTC))


def test_under_one_second_of_footage_is_no_footage(trust: TrustStore) -> None:
    rec = [{"start": "2026-12-03T16:59:59.200Z", "end": "2026-12-03T17:05:00Z"}]
    assert run(BASE, trust, st=state(recorded=rec)).reason is Reason.NO_FOOTAGE
    rec = [{"start": "2026-12-03T16:59:59Z", "end": "2026-12-03T17:05:00Z"}]
    d = run(BASE, trust, st=state(recorded=rec))
    assert d.reason is Reason.GRANTED and d.granted == (datetime(2026, 12, 3, 16, 59, 59, tzinfo=UTC), datetime(2026, 12, 3, 17, tzinfo=UTC))


def test_rate_limit_window_is_exclusive_at_24h(trust: TrustStore) -> None:
    grants = [{"iss": "jackson-pd", "at": "2026-12-03T17:00:00Z"}] * 9
    edge = grants + [{"iss": "jackson-pd", "at": "2026-12-02T18:00:00Z"}]  # exactly 24 h ago: out of the window
    inside = grants + [{"iss": "jackson-pd", "at": "2026-12-02T18:00:01Z"}]
    assert run(BASE, trust, st=state(grants=edge)).reason is Reason.GRANTED
    assert run(BASE, trust, st=state(grants=inside)).reason is Reason.RATE_LIMITED
    assert run(BASE, trust, grants_per_issuer_per_day=0).reason is Reason.RATE_LIMITED


def test_awaiting_resident_carries_the_window(trust: TrustStore) -> None:
    d = run(BASE, trust, approval="ask")
    assert d.reason is Reason.AWAITING_RESIDENT and not d.shares
    assert d.granted == (datetime(2026, 12, 3, 16, 30, tzinfo=UTC), datetime(2026, 12, 3, 17, tzinfo=UTC))


def test_schedule_across_fall_back_in_a_decision(trust: TrustStore) -> None:
    """01:00-02:00 local on the night clocks go back is two real hours; a 2 h window gets both."""
    now = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    iat = int(now.timestamp()) - 10
    msg = ps.compact(claims(iat=iat, exp=iat + 600, window={"start": "2026-11-01T05:30:00Z", "end": "2026-11-01T07:30:00Z"}))
    consent = {"start": "2026-10-01T00:00:00Z", "end": "2027-01-04T00:00:00Z", "schedule": [{"days": ["sun"], "from": "01:00", "to": "02:00"}]}
    st = state(recorded=[{"start": "2026-10-31T00:00:00Z", "end": "2026-11-01T08:59:00Z"}])
    d = run(msg, trust, now=now, st=st, consent=consent, max_window_s=7200)
    assert d.reason is Reason.GRANTED
    assert d.granted == (datetime(2026, 11, 1, 6, 0, tzinfo=UTC), datetime(2026, 11, 1, 7, 30, tzinfo=UTC))


def test_policy_from_a_real_configuration_file(trust: TrustStore, write_config: Any) -> None:
    path: Path = write_config(
        """
        [policy]
        program = "jackson-ms/camera-pilot-2026"
        location = { lat = 32.29876, lon = -90.18481 }
        timezone = "America/Chicago"
        approval = "auto"

        [policy.consent]
        start = 2026-11-20T00:00:00Z
        end = 2027-01-04T00:00:00Z
        schedule = [ { days = ["thu"], from = "10:00", to = "10:40" } ]
        """
    )
    pol = Policy.from_config(load_config(path).require_policy())
    d = decide(BASE, trust=trust, policy=pol, state=state(), now=NOW)
    assert d.reason is Reason.GRANTED
    assert d.granted == (datetime(2026, 12, 3, 16, 30, tzinfo=UTC), datetime(2026, 12, 3, 16, 40, tzinfo=UTC))


def test_mangled_messages_never_raise_and_never_share(trust: TrustStore) -> None:
    rng = random.Random(7)
    json_msg = ps.general(claims(), ["jpd-2026a", "jxn-oversight-1"])
    pol, st = policy(), state()
    for original in (BASE, json_msg):
        for _ in range(1500):
            m = bytearray(original)
            for _ in range(rng.randint(1, 3)):
                op = rng.random()
                i = rng.randrange(len(m))
                if op < 0.6:
                    m[i] = rng.randrange(256)
                elif op < 0.8:
                    del m[i]
                else:
                    m.insert(i, rng.randrange(256))
            if bytes(m) == original or _same_json(bytes(m), original):
                continue  # JSON whitespace is not signed: an equivalent message may be granted
            d = decide(bytes(m), trust=trust, policy=pol, state=st, now=NOW)
            assert d.reason in (Reason.MALFORMED, Reason.BAD_SIGNATURE, Reason.UNKNOWN_KEY), (bytes(m), d)


def _same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def test_naive_now_is_a_programming_error(trust: TrustStore) -> None:
    with pytest.raises(ValueError, match="aware"):
        run(BASE, trust, now=NOW.replace(tzinfo=None))
