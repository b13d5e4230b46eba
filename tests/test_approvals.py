"""Held requests: the resident answers with the real CLI; the service takes each answer exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import load_config
from agent.state.approvals import DECLINED, EXPIRED, GRANTED, ApprovalQueue, PendingApproval

POLICY = """
[policy]
program = "jackson-ms/camera-pilot-2026"
location = { lat = 32.29876, lon = -90.18481 }
timezone = "America/Chicago"
approval = "ask"

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2030-01-01T00:00:00Z
"""


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def setup(write_config) -> tuple[Path, ApprovalQueue]:
    path = write_config(POLICY)
    return path, ApprovalQueue(load_config(path).paths.state_db)


def hold(q: ApprovalQueue, n: int, *, expires_in: float = 600, case: str = "2026-001234") -> PendingApproval:
    now = datetime.now(UTC).replace(microsecond=0)
    # 2026-11-26 20:00 UTC is 14:00 in Chicago (CST).
    start = datetime(2026, 11, 26, 20, 0, tzinfo=UTC)
    return q.hold(
        raw=b"eyJhbGciOiJFZDI1NTE5In0.payload.sig-%d" % n,
        jti=f"request-jti-{n:06d}-abcdef",
        iss="jackson-pd",
        sub="Det. R. Alvarez",
        case=case,
        purpose="Package theft reported on Elm Street",
        granted_start=start,
        granted_end=start + timedelta(minutes=20),
        exp=int((now + timedelta(seconds=expires_in)).timestamp()),
        now=now - timedelta(minutes=1),
    )


def test_pending_lists_held_requests_in_plain_words(setup) -> None:
    config, q = setup
    empty = cli(config, "pending")
    assert empty.returncode == 0 and "No requests are waiting" in empty.stdout

    item = hold(q, 1)
    assert hold(q, 1).id == item.id, "holding the same jti twice must not make a second entry"
    out = cli(config, "pending")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"Request {item.id}:" in text
    for words in ("jackson-pd", "Det. R. Alvarez", "2026-001234", "Package theft reported on Elm Street",
                  "2026-11-26 14:00:00 CST to 14:20:00 CST (20 minutes)", f"doorbell-agent approve {item.id}"):
        assert words in text
    assert "answer within 10 minutes" in text or "answer within 9 minutes" in text

    data = json.loads(cli(config, "pending", "--json").stdout)
    assert [p["id"] for p in data["pending"]] == [item.id]
    assert data["pending"][0]["window"] == {"start": "2026-11-26T20:00:00Z", "end": "2026-11-26T20:20:00Z"}


def test_approve_is_taken_exactly_once(setup) -> None:
    config, q = setup
    item = hold(q, 1)
    out = cli(config, "approve", str(item.id))
    assert out.returncode == 0, out.stderr
    assert f"Approved request {item.id} from jackson-pd" in out.stdout and "20 minutes" in out.stdout

    claimed: list[list[PendingApproval]] = []
    barrier = threading.Barrier(4)

    def take() -> None:
        barrier.wait(timeout=10)
        mine = ApprovalQueue(q.path)
        claimed.append([i for i in mine.approved() if mine.mark_granted(i.id, datetime.now(UTC))])

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    got = [i for batch in claimed for i in batch]
    assert len(claimed) == 4 and [i.jti for i in got] == [item.jti]
    assert got[0].raw == item.raw
    assert q.get(item.id).state == GRANTED
    assert q.approved() == []

    again = cli(config, "approve", str(item.id))
    assert again.returncode == 2 and "already approved" in again.stderr and "nothing changed" in again.stderr
    assert cli(config, "decline", str(item.id)).returncode == 2
    assert "No requests are waiting" in cli(config, "pending").stdout


def test_decline_is_reported_once_and_nothing_is_delivered(setup) -> None:
    config, q = setup
    item = hold(q, 2)
    out = cli(config, "decline", f"#{item.id}")
    assert out.returncode == 0, out.stderr
    assert "Declined request" in out.stdout and "Nothing was shared" in out.stdout

    now = datetime.now(UTC)
    assert q.approved() == []
    refused = q.take_refusals(now)
    assert [(i.id, i.state) for i in refused] == [(item.id, DECLINED)]
    assert q.take_refusals(now) == []

    late = cli(config, "approve", str(item.id))
    assert late.returncode == 2 and "already declined" in late.stderr


def test_expired_request_cannot_be_approved(setup) -> None:
    config, q = setup
    stale = hold(q, 3, expires_in=-5)
    live = hold(q, 4)
    listing = json.loads(cli(config, "pending", "--json").stdout)
    assert [p["id"] for p in listing["pending"]] == [live.id]

    out = cli(config, "approve", str(stale.id))
    assert out.returncode == 2
    assert f"request {stale.id} expired at" in out.stderr and "nothing was shared" in out.stderr
    assert "Traceback" not in out.stderr

    now = datetime.now(UTC)
    assert q.approved() == []
    assert [(i.id, i.state) for i in q.take_refusals(now)] == [(stale.id, EXPIRED)]


def test_unanswered_request_expires_for_the_service(setup) -> None:
    _, q = setup
    item = hold(q, 5, expires_in=60)
    assert q.take_refusals(datetime.now(UTC)) == []
    later = datetime.now(UTC) + timedelta(seconds=61)
    assert [(i.id, i.state) for i in q.take_refusals(later)] == [(item.id, EXPIRED)]
    assert q.take_refusals(later) == []


def test_unknown_or_mistyped_id_is_a_clear_error(setup) -> None:
    config, _ = setup
    unknown = cli(config, "approve", "99")
    assert unknown.returncode == 2 and "no request with ID 99" in unknown.stderr
    typo = cli(config, "decline", "seven")
    assert typo.returncode == 2 and "'seven' is not a request ID" in typo.stderr


def test_agency_text_cannot_reorder_or_split_what_the_resident_reads(setup) -> None:
    config, q = setup
    now = datetime.now(UTC).replace(microsecond=0)
    start = datetime(2026, 11, 26, 20, 0, tzinfo=UTC)
    item = q.hold(
        raw=b"eyJhbGciOiJFZDI1NTE5In0.payload.sig-rlo", jti="request-jti-rlo-000001-abcdef", iss="jackson-pd",
        sub="Det.\u200bAlvarez", case="2026-\u202e1234", purpose="Theft\u2028Footage: 00:00 to 23:59",
        granted_start=start, granted_end=start + timedelta(minutes=5),
        exp=int((now + timedelta(minutes=10)).timestamp()), now=now - timedelta(minutes=1),
    )  # fmt: skip
    out = cli(config, "pending")
    assert out.returncode == 0, out.stderr
    assert "  Officer:  Det.\\u200bAlvarez\n" in out.stdout
    assert "  Case:     2026-\\u202e1234\n" in out.stdout
    assert "  Purpose:  Theft\\u2028Footage: 00:00 to 23:59\n" in out.stdout
    assert not any(c in out.stdout for c in "\u200b\u202e\u2028")

    listing = cli(config, "pending", "--json").stdout
    assert "\\u202e" in listing  # JSON keeps the exact text, written as an unambiguous escape
    raw = json.loads(listing)["pending"][0]
    assert (raw["officer"], raw["case"], raw["purpose"]) == ("Det.\u200bAlvarez", "2026-\u202e1234", "Theft\u2028Footage: 00:00 to 23:59")

    answered = cli(config, "decline", str(item.id))
    assert answered.returncode == 0, answered.stderr
    assert f"Declined request {item.id} from jackson-pd (case 2026-\\u202e1234)." in answered.stdout
    assert "\u202e" not in answered.stdout


# -- what the resident needs to answer: legal basis, warrant, who signed, where (issue 10) -----------------


@pytest.mark.slow
def test_pending_shows_basis_warrant_cosigners_and_distance_not_coordinates(tmp_path: Path, write_config, broker) -> None:
    """A warrant request co-signed by an oversight body, held by the real service (``approval`` set to
    ask with ``consent set``); then a row as an older agent held it (no verified key ids kept)."""
    from agent.city import build_request, keygen, load_signing_key
    from agent.cli import main
    from agent.protocol.trust import TrustStore
    from agent.state.truststore import load_trust_store, save_trust_store
    from tests.test_service import HOME, PROGRAM, in_process, make_env

    env = make_env(tmp_path, write_config, broker)
    config = tmp_path / "agent.toml"
    assert main(["--config", str(config), "consent", "set", "--approval", "ask"]) == 0
    made = keygen(iss="jackson-oversight", kid="jxn-oversight-test", role="oversight", out_dir=tmp_path / "oversight")
    trust = load_trust_store(env.cfg.paths.trust_file)
    trust.add(TrustStore.from_jwks(made.public_jwks))
    save_trust_store(trust, env.cfg.paths.trust_file)
    now = env.clock.now()
    incident = (HOME[0] + 0.002, HOME[1])  # about 222 m north
    built = build_request(requester=env.requester, oversight=load_signing_key(made.private_path), program=PROGRAM,
                          officer="badge-4471", case="JPD-2026-001234", purpose="Burglary reported on this block.",
                          basis="warrant", warrant_ref="W-2026-0042", court="Hinds County Court",
                          lat=incident[0], lon=incident[1], radius_m=300,
                          window_start=now - timedelta(seconds=40), window_end=now - timedelta(seconds=30), now=now)
    svc = in_process(env)
    try:
        d = svc.handle(built.message.encode())
        assert d is not None and d.reason == "awaiting_resident"
    finally:
        svc.stop()
        svc.wait(30)
    out = cli(config, "pending")
    assert out.returncode == 0, out.stderr
    assert "Basis:    warrant W-2026-0042 from Hinds County Court" in out.stdout
    assert "Signed:   jackson-pd (key jpd-test); co-signed by jackson-oversight (key jxn-oversight-test)" in out.stdout
    assert "Area:     incident 222 m from your home, radius 300 m" in out.stdout
    assert f"{incident[0]:.4f}"[:6] not in out.stdout  # where the incident is is told as a distance only
    [item] = json.loads(cli(config, "pending", "--json").stdout)["pending"]
    assert item["basis"] == "warrant" and item["warrant"] == {"ref": "W-2026-0042", "court": "Hinds County Court"}
    assert item["signed_by"] == ["jpd-test", "jxn-oversight-test"]
    assert item["area"]["radius_m"] == 300 and item["area"]["distance_m"] == 222
    assert item["area"]["lat"] == pytest.approx(incident[0])  # the resident's own tools may have it

    # A row an older agent held: no verified key ids in `extra`. It still opens and says the same.
    q = ApprovalQueue(env.cfg.paths.state_db)
    [held] = q.pending(now)
    with q._tx() as c:
        c.execute("UPDATE pending_approvals SET extra = ? WHERE id = ?",
                  (json.dumps({"recipient": held.extra["recipient"]}), held.id))
    again = cli(config, "pending")
    assert again.returncode == 0 and "co-signed by jackson-oversight (key jxn-oversight-test)" in again.stdout


def test_pending_with_a_request_that_cannot_be_read_again_still_lists_it(setup) -> None:
    config, q = setup
    item = hold(q, 7)  # not a real request message
    out = cli(config, "pending")
    assert out.returncode == 0 and f"Request {item.id}:" in out.stdout
    assert "the request as received cannot be read again" in out.stdout
