"""The access log: hash chain, signed checkpoints, counters, concurrency, and the homeowner's log commands."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature

from agent.protocol.decision import Decision, Reason
from agent.protocol.jose import sign_compact
from agent.protocol.request import FootageRequest
from agent.state.accesslog import REFUSALS_LISTED_PER_AGENCY_PER_HOUR, AccessLog, AccessLogError
from agent.state.clock import FixedClock
from agent.state.devicekey import DeviceKey
from agent.state.logverify import TailRules
from agent.state.pin import PinError, pin_path
from agent.timeutil import format_utc
from tests.protocol_signing import base_claims

UTC = UTC
NOW = datetime(2026, 12, 3, 18, 0, 0, tzinfo=UTC)


def decision(log: AccessLog, i: int, *, iss: str = "jackson-pd", reason: str = "granted", at: datetime | None = None) -> tuple[int, str]:
    granted = (NOW - timedelta(minutes=90), NOW - timedelta(minutes=60)) if reason == "granted" else None
    return log.append(
        jti=f"req-{i:04d}-test-aaaaaaaa", iss=iss, sub="badge-4471", case=f"JPD-2026-{i:06d}",
        purpose="Burglary reported on the 1200 block of N State St; looking for a person leaving on foot.",
        area={"lat": 32.299839, "lon": -90.184, "radius_m": 300}, requested=(NOW - timedelta(hours=2), NOW - timedelta(hours=1)),
        reason=reason, granted=granted, kids=["jpd-2026a"], at=at or NOW,
    )  # fmt: skip


def fill(log: AccessLog, n: int, reason: str = "no_footage") -> None:
    """``n`` decisions; refusals by default, since a grant is signed at once (a checkpoint of its own)."""
    for i in range(1, n + 1):
        decision(log, i, reason=reason)


@pytest.fixture
def key() -> DeviceKey:
    return DeviceKey.generate()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite"


def raw(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    return conn


def rows(db: Path) -> list[tuple[Any, ...]]:
    with raw(db) as c:
        return c.execute("SELECT seq, entry, prev_hash, hash FROM access_log ORDER BY seq").fetchall()


# --- the construction, re-implemented from the README text alone --------------------------


def b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def test_an_auditor_can_recompute_the_chain_and_checkpoints(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key, checkpoint_every=4)
    fill(log, 9)
    seq, head = log.append_event("req-0002-test-aaaaaaaa", "delivered", delivery_id="Ojm5DLRgg9SKVkBaY4QfDA", bytes=300800, at=NOW)
    log.close()
    prev = bytes(32)
    with raw(db) as c:
        for s, entry, prev_hash, stored in c.execute("SELECT seq, entry, prev_hash, hash FROM access_log ORDER BY seq"):
            data = entry.encode("utf-8")
            assert json.loads(data)["seq"] == s
            assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            assert prev_hash == prev.hex()
            prev = hashlib.sha256(b"doorbell-agent/access-log/v1\x00" + prev + data).digest()
            assert stored == prev.hex()
        assert (s, prev.hex()) == (seq, head) == (10, head)
        cps = c.execute("SELECT seq, hash, jws FROM access_log_checkpoints ORDER BY id").fetchall()
    assert [cp[0] for cp in cps] == [4, 8]
    prev_jws = None
    for cp_seq, cp_hash, jws in cps:
        h, p, sig = jws.split(".")
        header, payload = json.loads(b64d(h)), json.loads(b64d(p))
        assert header == {"alg": "Ed25519", "kid": key.kid, "typ": "access-log-checkpoint+jwt"}
        assert payload["v"] == 2 and payload["reason"] == "count"
        assert payload["seq"] == cp_seq and payload["hash"] == cp_hash and payload["device"] == key.public_jwk()
        # Each checkpoint names the one signed before it: SHA-256 of its JWS text, or null for the first.
        assert payload["prev"] == (hashlib.sha256(prev_jws.encode()).hexdigest() if prev_jws else None)
        key.public.verify(b64d(sig), f"{h}.{p}".encode())
        prev_jws = jws


def test_append_records_what_the_resident_reads(db: Path) -> None:
    log = AccessLog(db)
    seq, h = decision(log, 1, reason="granted")
    e = log.entries()[0]
    assert (e.seq, e.hash, e.iss, e.jti, e.outcome) == (seq, h, "jackson-pd", "req-0001-test-aaaaaaaa", "granted")
    d = e.data
    assert d["decision"] == "granted" and d["reason"] == "granted"
    assert d["granted"] == {"start": "2026-12-03T16:30:00Z", "end": "2026-12-03T17:00:00Z"}
    assert d["requested"] == {"start": "2026-12-03T16:00:00Z", "end": "2026-12-03T17:00:00Z"}
    assert d["area"] == {"lat": 32.299839, "lon": -90.184, "radius_m": 300.0}
    assert d["kids"] == ["jpd-2026a"] and d["sub"] == "badge-4471" and d["at"] == "2026-12-03T18:00:00.000Z"
    seq2, _ = decision(log, 2, reason="outside_geofence")
    assert log.entries()[1].data["decision"] == "refused" and log.entries()[1].data["granted"] is None


def test_events_reference_their_request(db: Path) -> None:
    log = AccessLog(db)
    first, _ = decision(log, 1, reason="awaiting_resident")
    seq, _ = log.append_event("req-0001-test-aaaaaaaa", "approved", granted=(NOW - timedelta(hours=2), NOW - timedelta(hours=1)), at=NOW)
    e = log.entries(jti="req-0001-test-aaaaaaaa")[-1]
    assert e.type == "event" and e.outcome == "approved" and e.data["ref_seq"] == first and e.iss == "jackson-pd"
    assert e.data["granted"] == {"start": "2026-12-03T16:00:00Z", "end": "2026-12-03T17:00:00Z"}
    with pytest.raises(AccessLogError, match="no logged request"):
        log.append_event("req-9999-unknown-aaaaaa", "delivered")
    with pytest.raises(AccessLogError, match="unknown event"):
        log.append_event("req-0001-test-aaaaaaaa", "shredded")
    assert log.head()[0] == seq  # a refused append leaves nothing behind
    assert log.verify().ok


def test_restart_keeps_the_chain(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key)
    fill(log, 3)
    head = log.head()
    log.close()
    log = AccessLog(db, device_key=key)
    assert log.head() == head
    seq, h = decision(log, 4)
    assert seq == 4 and rows(db)[-1][2] == head[1]
    assert log.verify(key).ok


# --- tampering -------------------------------------------------------------------------------


def test_edit_is_detected(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key)
    fill(log, 6)
    with raw(db) as c:
        c.execute("UPDATE access_log SET entry = replace(entry, 'badge-4471', 'badge-0000') WHERE seq = 3")
    r = log.verify(key)
    assert not r.ok and r.first_bad_seq == 3 and r.first_problem and r.first_problem.kind == "changed"
    assert "entry 3 was changed" in r.first_problem.message


def test_edit_with_its_hash_recomputed_is_detected_at_the_next_entry(db: Path) -> None:
    log = AccessLog(db)
    fill(log, 6)
    (_, entry, prev_hash, _), = [r for r in rows(db) if r[0] == 3]
    forged = entry.replace("badge-4471", "badge-0000")
    new_hash = hashlib.sha256(b"doorbell-agent/access-log/v1\x00" + bytes.fromhex(prev_hash) + forged.encode()).hexdigest()
    with raw(db) as c:
        c.execute("UPDATE access_log SET entry = ?, hash = ? WHERE seq = 3", (forged, new_hash))
    r = log.verify()
    assert not r.ok and r.first_bad_seq == 4 and "does not follow on from entry 3" in r.first_problem.message  # type: ignore[union-attr]


def rechain(db: Path, start: int) -> None:
    """What an attacker without the device key can do: recompute every hash from ``start`` on."""
    with raw(db) as c:
        prev = bytes.fromhex(c.execute("SELECT hash FROM access_log WHERE seq = ?", (start - 1,)).fetchone()[0]) if start > 1 else bytes(32)
        for seq, entry in c.execute("SELECT seq, entry FROM access_log WHERE seq >= ? ORDER BY seq", (start,)).fetchall():
            h = hashlib.sha256(b"doorbell-agent/access-log/v1\x00" + prev + entry.encode()).digest()
            c.execute("UPDATE access_log SET prev_hash = ?, hash = ? WHERE seq = ?", (prev.hex(), h.hex(), seq))
            prev = h


def test_rewritten_chain_is_caught_by_the_signed_checkpoint(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key, checkpoint_every=4)
    fill(log, 9, reason="granted")  # a checkpoint at every grant
    with raw(db) as c:
        c.execute("UPDATE access_log SET entry = replace(entry, '\"granted\"', '\"no_footage\"'), outcome = 'no_footage' WHERE seq = 6")
    rechain(db, 6)
    r = log.verify(key)
    assert not r.ok and r.first_bad_seq == 6 and r.first_problem.kind == "checkpoint_mismatch"  # type: ignore[union-attr]
    assert "entries 6 to 6 were rewritten" in r.first_problem.message  # type: ignore[union-attr]


def test_deleted_entry_is_detected(db: Path) -> None:
    log = AccessLog(db)
    fill(log, 6)
    with raw(db) as c:
        c.execute("DELETE FROM access_log WHERE seq = 4")
    r = log.verify()
    assert not r.ok and r.first_bad_seq == 4 and r.first_problem.kind == "deleted"  # type: ignore[union-attr]
    assert "entry 4 is missing" in r.first_problem.message  # type: ignore[union-attr]


def test_deleted_and_renumbered_entry_is_detected(db: Path) -> None:
    log = AccessLog(db)
    fill(log, 6)
    with raw(db) as c:
        c.execute("DELETE FROM access_log WHERE seq = 4")
        for s in (5, 6):
            c.execute("UPDATE access_log SET seq = ? WHERE seq = ?", (s - 1, s))
    r = log.verify()
    assert not r.ok and r.first_bad_seq == 4 and r.first_problem.kind == "reordered"  # type: ignore[union-attr]


def test_deleted_tail_is_caught_by_the_checkpoint(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key)
    fill(log, 6)
    log.checkpoint(NOW)
    with raw(db) as c:
        c.execute("DELETE FROM access_log WHERE seq >= 5")
    r = log.verify(key)
    assert not r.ok and r.first_bad_seq == 5 and r.first_problem.kind == "truncated"  # type: ignore[union-attr]
    assert "entries 5 to 6 were deleted" in r.first_problem.message  # type: ignore[union-attr]


def test_inserted_entry_is_detected(db: Path) -> None:
    log = AccessLog(db)
    fill(log, 6)
    with raw(db) as c:
        for s in (6, 5, 4):
            c.execute("UPDATE access_log SET seq = ? WHERE seq = ?", (s + 1, s))
        c.execute(
            "INSERT INTO access_log SELECT 4, at_us, type, jti, iss, outcome, replace(entry, '\"seq\":3', '\"seq\":4'), hash, hash "
            "FROM access_log WHERE seq = 3"
        )
    rechain(db, 4)  # even with every hash recomputed, the entry numbered 5 says it was written as 4
    r = log.verify()
    assert not r.ok and r.first_bad_seq == 5 and r.first_problem.kind == "reordered"  # type: ignore[union-attr]


def test_inserted_and_renumbered_entry_is_caught_by_the_checkpoint(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key)
    fill(log, 6)
    log.checkpoint(NOW)
    with raw(db) as c:
        for s in (6, 5, 4):
            c.execute(
                "UPDATE access_log SET seq = ?, entry = replace(entry, ?, ?) WHERE seq = ?",
                (s + 1, f'"seq":{s}', f'"seq":{s + 1}', s),
            )
        c.execute(
            "INSERT INTO access_log SELECT 4, at_us, type, jti, iss, outcome, replace(entry, '\"seq\":3', '\"seq\":4'), hash, hash "
            "FROM access_log WHERE seq = 3"
        )
    rechain(db, 4)
    r = log.verify(key)
    assert not r.ok and r.first_bad_seq == 1 and r.first_problem.kind == "checkpoint_mismatch"  # type: ignore[union-attr]


def test_reordered_entries_are_detected(db: Path) -> None:
    log = AccessLog(db)
    fill(log, 6)
    with raw(db) as c:
        a = c.execute("SELECT entry, prev_hash, hash FROM access_log WHERE seq = 3").fetchone()
        b = c.execute("SELECT entry, prev_hash, hash FROM access_log WHERE seq = 4").fetchone()
        c.execute("UPDATE access_log SET entry = ?, prev_hash = ?, hash = ? WHERE seq = 3", b)
        c.execute("UPDATE access_log SET entry = ?, prev_hash = ?, hash = ? WHERE seq = 4", a)
    r = log.verify()
    assert not r.ok and r.first_bad_seq == 3 and r.first_problem.kind == "reordered"  # type: ignore[union-attr]


def test_edited_index_column_is_detected(db: Path) -> None:
    """Hiding a grant from the rate limit by editing the searchable column alone is caught too."""
    log = AccessLog(db)
    fill(log, 4, reason="granted")
    assert log.grants_since("jackson-pd", NOW - timedelta(days=1)) == 4
    with raw(db) as c:
        c.execute("UPDATE access_log SET outcome = 'no_footage' WHERE seq = 2")
    assert log.grants_since("jackson-pd", NOW - timedelta(days=1)) == 3
    r = log.verify()
    assert not r.ok and r.first_bad_seq == 2 and "searchable columns" in r.first_problem.message  # type: ignore[union-attr]


def test_checkpoint_signature_is_checked(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key)
    fill(log, 3)
    cp = log.checkpoint(NOW)
    assert log.verify(key).ok and log.verify(key).checkpoints_ok == 1
    h, p, s = cp.jws.split(".")
    bad_sig = bytearray(b64d(s))
    bad_sig[0] ^= 1
    forged = f"{h}.{p}." + base64.urlsafe_b64encode(bytes(bad_sig)).rstrip(b"=").decode()
    with raw(db) as c:
        c.execute("UPDATE access_log_checkpoints SET jws = ?", (forged,))
    r = log.verify(key)
    assert not r.ok and r.first_problem.kind == "checkpoint_signature" and "does not verify" in r.first_problem.message  # type: ignore[union-attr]
    with pytest.raises(InvalidSignature):
        key.public.verify(bytes(bad_sig), f"{h}.{p}".encode())


def test_checkpoint_by_another_key_is_refused(db: Path, key: DeviceKey) -> None:
    other = DeviceKey.generate()
    log = AccessLog(db, device_key=other)
    fill(log, 3)
    log.checkpoint(NOW)
    r = log.verify()  # the key written inside a checkpoint proves nothing: without the device's, no verdict
    assert not r.ok and r.first_problem.kind == "device_key"  # type: ignore[union-attr]
    assert log.verify(other).ok  # consistent with the key that signed it...
    r = log.verify(key)  # ...but not this device's key
    assert not r.ok and "not this device's key" in r.first_problem.message  # type: ignore[union-attr]


def test_checkpoint_columns_edited_is_detected(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key)
    fill(log, 3)
    log.checkpoint(NOW)
    with raw(db) as c:
        c.execute("UPDATE access_log_checkpoints SET seq = 2")
    r = log.verify(key)
    assert not r.ok and r.first_problem.kind == "checkpoint_signature"  # type: ignore[union-attr]


# --- checkpoint schedule ------------------------------------------------------------------------


def test_checkpoint_every_n_entries(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key, checkpoint_every=5)
    fill(log, 12)
    assert [c.seq for c in log.checkpoints()] == [5, 10]


def test_checkpoint_at_least_hourly_when_entries_were_added(db: Path, key: DeviceKey) -> None:
    clock = FixedClock(NOW)
    log = AccessLog(db, device_key=key, checkpoint_every=1000, clock=clock.now)
    assert log.checkpoint_if_due() is None  # nothing logged: nothing to sign
    decision(log, 1, reason="no_footage", at=clock.now())
    clock.advance(59 * 60)
    assert log.checkpoint_if_due() is None
    decision(log, 2, reason="no_footage", at=clock.now())
    clock.advance(61)  # the first unsigned entry is now an hour old
    cp = log.checkpoint_if_due()
    assert cp is not None and cp.seq == 2 and cp.reason == "schedule"
    clock.advance(2 * 3600)
    assert log.checkpoint_if_due() is None  # nothing new since (and no heartbeat: this is not the running service)
    decision(log, 3, reason="no_footage", at=clock.now())
    clock.advance(3601)
    decision(log, 4, reason="no_footage", at=clock.now())  # the append itself notices the overdue checkpoint
    assert [c.seq for c in log.checkpoints()] == [2, 4]


def test_checkpoint_on_demand_needs_the_device_key(db: Path) -> None:
    log = AccessLog(db)
    fill(log, 1)
    with pytest.raises(AccessLogError, match="device key"):
        log.checkpoint()


# --- counters and the rate limit ----------------------------------------------------------------


def test_pre_auth_failures_are_counted_not_logged(db: Path) -> None:
    clock = FixedClock(NOW)
    log = AccessLog(db, clock=clock.now)
    for _ in range(500):
        log.count_rejection("malformed")
    for _ in range(3):
        log.count_rejection("bad_signature")
    clock.advance(3600)
    log.count_rejection("malformed")
    assert log.entries() == [] and log.head()[0] == 0
    assert log.rejection_counts() == [
        {"hour": "2026-12-03T18:00:00Z", "reason": "bad_signature", "count": 3},
        {"hour": "2026-12-03T18:00:00Z", "reason": "malformed", "count": 500},
        {"hour": "2026-12-03T19:00:00Z", "reason": "malformed", "count": 1},
    ]
    with raw(db) as c:
        assert c.execute("SELECT COUNT(*) FROM preauth_counters").fetchone()[0] == 3
    with pytest.raises(AccessLogError, match="count_rejection"):
        decision(log, 1, reason="bad_signature")
    with pytest.raises(AccessLogError, match="pre-authentication"):
        log.count_rejection("expired")


def test_grants_since_counts_grants_and_approvals_per_issuer(db: Path) -> None:
    log = AccessLog(db)
    decision(log, 1, at=NOW - timedelta(hours=25))
    decision(log, 2, at=NOW - timedelta(hours=23))
    decision(log, 3, reason="outside_geofence", at=NOW - timedelta(hours=2))
    decision(log, 4, reason="awaiting_resident", at=NOW - timedelta(hours=2))
    log.append_event("req-0004-test-aaaaaaaa", "approved", at=NOW - timedelta(hours=1))
    decision(log, 5, iss="hinds-so", at=NOW - timedelta(hours=1))
    since = NOW - timedelta(hours=24)
    assert log.grants_since("jackson-pd", since) == 2
    assert log.grants_since("hinds-so", since) == 1
    assert log.grants_since("jackson-pd", NOW - timedelta(hours=23)) == 1  # strictly after `since`


# --- concurrency ----------------------------------------------------------------------------------

WRITER = """
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from agent.state.accesslog import AccessLog
log = AccessLog(Path(sys.argv[1]))
who = sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()  # start together
for i in range(int(sys.argv[3])):
    log.append(jti=f"req-{who}-{i:06d}-aaaaaaa", iss=who, sub="s", case="c", purpose="p",
               area={"lat": 1, "lon": 2, "radius_m": 3}, requested=("2026-12-03T16:00:00Z", "2026-12-03T17:00:00Z"),
               reason="no_footage", kids=["k"])
    time.sleep(0.002)  # workload shape, not a wait: SQLite's lock is not fair, a tight loop would starve the other writer
print("done")
"""


def test_two_processes_appending_keep_one_chain(db: Path) -> None:
    AccessLog(db).close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), who, "150"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for who in ("alpha", "bravo")
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "done", err
    log = AccessLog(db)
    r = log.verify()
    assert r.ok and r.entries == 300 and r.head_seq == 300
    whos = [e.iss for e in log.entries()]
    assert whos.count("alpha") == 150 and whos.count("bravo") == 150
    assert whos != sorted(whos), "the writers should have interleaved"


def test_reader_sees_committed_entries_while_a_writer_is_open(db: Path) -> None:
    writer = AccessLog(db)
    reader = AccessLog(db)
    decision(writer, 1)
    assert reader.head() == writer.head() and reader.verify().ok


# --- the homeowner's commands ---------------------------------------------------------------------


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(config), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def agent_dirs(write_config: Callable[[str], Path], tmp_path: Path) -> tuple[Path, Path, DeviceKey]:
    cfg = write_config("")
    data = tmp_path / "data"
    data.mkdir()
    key = DeviceKey.load_or_create(data / "device-key.pem")
    return cfg, data / "state.sqlite", key


def test_cli_verify_intact_then_tampered(agent_dirs: tuple[Path, Path, DeviceKey]) -> None:
    cfg, db, key = agent_dirs
    r = run_cli(cfg, "log", "verify")
    assert r.returncode == 0 and "empty" in r.stdout
    log = AccessLog(db, device_key=key, checkpoint_every=3)
    log.service_started(db.parent)  # as the service does: pin the key, sign a start-up checkpoint
    fill(log, 4)
    log.service_stopping()
    log.close()
    r = run_cli(cfg, "log", "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "intact: 4 entries" in r.stdout and "covering entry 4" in r.stdout and key.kid in r.stdout
    with raw(db) as c:
        c.execute("UPDATE access_log SET entry = replace(entry, 'Burglary', 'Nothing') WHERE seq = 2")
    r = run_cli(cfg, "log", "verify")
    assert r.returncode == 1
    assert "tampered with: entry 2 was changed" in r.stdout and "Entry 1 checks out" in r.stdout
    r = run_cli(cfg, "log", "verify", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["first_bad_seq"] == 2


def test_cli_show_lists_entries_in_plain_words(agent_dirs: tuple[Path, Path, DeviceKey]) -> None:
    cfg, db, key = agent_dirs
    log = AccessLog(db, device_key=key)
    decision(log, 1, reason="granted", at=NOW - timedelta(hours=3))
    decision(log, 2, reason="outside_geofence", at=NOW)
    log.append_event("req-0001-test-aaaaaaaa", "delivered", delivery_id="Ojm5DLRgg9SKVkBaY4QfDA", bytes=300800, at=NOW)
    log.count_rejection("bad_signature", at=NOW)
    log.close()
    r = run_cli(cfg, "log", "show")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "#1" in out and "jackson-pd, officer badge-4471, case JPD-2026-000001: GRANTED" in out
    assert "refused: your camera is outside the search area" in out
    assert "the footage was delivered (300,800 bytes" in out
    assert "1 bad signature" in out
    r = run_cli(cfg, "log", "show", "--since", "2026-12-03T17:00:00Z", "--json")
    doc = json.loads(r.stdout)
    assert [e["seq"] for e in doc["entries"]] == [2, 3]
    assert doc["rejected_before_authentication"][0]["count"] == 1
    r = run_cli(cfg, "log", "show", "--since", "last tuesday")
    assert r.returncode == 2 and "--since" in r.stderr


def test_cli_checkpoint_on_demand(agent_dirs: tuple[Path, Path, DeviceKey]) -> None:
    cfg, db, key = agent_dirs
    log = AccessLog(db)
    fill(log, 2)
    log.close()
    r = run_cli(cfg, "log", "checkpoint")
    assert r.returncode == 0 and "up to entry 2" in r.stdout
    assert AccessLog(db).verify(key).checkpoints_ok == 1


def test_an_event_names_the_decision_that_shared_not_a_refused_copy_or_a_replay(db: Path) -> None:
    """Step 12 lets a genuine request through after a refused copy of it; its delivery must point at the grant."""
    with AccessLog(db) as log:
        refused, _ = decision(log, 7, reason="oversight_required", at=NOW - timedelta(minutes=2))
        granted, _ = decision(log, 7, reason="granted", at=NOW - timedelta(minutes=1))
        decision(log, 7, reason="replayed", at=NOW)
        seq, _ = log.append_event("req-0007-test-aaaaaaaa", "delivered", delivery_id="Ojm5DLRgg9SKVkBaY4QfDA", bytes=1, at=NOW)
        event = log.entries(jti="req-0007-test-aaaaaaaa")[-1]
    assert event.seq == seq and event.data["ref_seq"] == granted != refused


# --- chained checkpoints, runs of the agent, the resident's changes ----------------------------------


def cp_claims(jws: str) -> dict[str, Any]:
    return json.loads(b64d(jws.split(".")[1]))


def test_deleting_a_checkpoint_from_the_middle_breaks_their_chain(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key, checkpoint_every=2)
    fill(log, 8)  # checkpoints at 2, 4, 6, 8
    assert log.verify(key).ok
    with raw(db) as c:
        c.execute("DELETE FROM access_log_checkpoints WHERE seq = 4")
    r = log.verify(key)
    assert not r.ok and r.first_problem.kind == "checkpoint_chain"  # type: ignore[union-attr]
    assert "between the one for entry 2" in r.first_problem.message and "entry 6" in r.first_problem.message  # type: ignore[union-attr]
    with raw(db) as c:
        c.execute("DELETE FROM access_log_checkpoints WHERE seq = 2")
    r = log.verify(key)
    assert any("before the one for entry 6" in p.message and "deleted" in p.message for p in r.problems)


def test_old_checkpoints_without_prev_still_verify(db: Path, key: DeviceKey) -> None:
    """Version 1 checkpoints (older agents) have no prev and no reason; the first version 2 one names the last of them."""
    log = AccessLog(db, device_key=key)
    fill(log, 3)
    seq, head = log.head()
    when = NOW
    v1 = sign_compact({"alg": "Ed25519", "kid": key.kid, "typ": "access-log-checkpoint+jwt"},
                      {"v": 1, "log": "doorbell-agent/access-log/v1", "seq": seq, "hash": head,
                       "iat": int(when.timestamp()), "at": "2026-12-03T18:00:00.000Z", "device": key.public_jwk()}, key)
    with raw(db) as c:
        c.execute("INSERT INTO access_log_checkpoints (seq, hash, at_us, kid, jws) VALUES (?, ?, ?, ?, ?)",
                  (seq, head, int(when.timestamp()) * 1_000_000, key.kid, v1))
    assert log.verify(key).ok
    cp = log.checkpoint(NOW)
    assert cp_claims(cp.jws)["prev"] == hashlib.sha256(v1.encode()).hexdigest()
    assert log.verify(key).ok
    # An old-format checkpoint after a new one was not written by any agent: it was inserted.
    with raw(db) as c:
        c.execute("INSERT INTO access_log_checkpoints (seq, hash, at_us, kid, jws) VALUES (?, ?, ?, ?, ?)",
                  (seq, head, int(when.timestamp()) * 1_000_000, key.kid, v1))
    r = log.verify(key)
    assert not r.ok and any(p.kind == "checkpoint_chain" and "old format" in p.message for p in r.problems)


def test_resident_changes_are_entries_no_agency_query_counts(db: Path, key: DeviceKey) -> None:
    log = AccessLog(db, device_key=key)
    decision(log, 1, reason="granted", at=NOW - timedelta(hours=2))
    seq, _ = log.append_rule_change("killswitch_on", by="homeowner (test)", at=NOW)
    log.append_rule_change("trust_revoked", by="homeowner (test)", details={"kids": ["jpd-2026a"], "issuer": "jackson-pd"}, at=NOW)
    e = log.entries()[seq - 1]
    assert (e.type, e.jti, e.iss, e.outcome) == ("resident", "", "", "killswitch_on")
    assert e.data == {"v": 1, "seq": seq, "type": "resident", "at": "2026-12-03T18:00:00.000Z", "change": "killswitch_on",
                      "by": "homeowner (test)"}
    with raw(db) as c:
        assert c.execute("SELECT jti, iss FROM access_log WHERE seq = ?", (seq,)).fetchone() == ("", "")
    assert log.grants_since("jackson-pd", NOW - timedelta(days=1)) == 1
    assert log.grants_since("", NOW - timedelta(days=1)) == 0
    assert log.last_at() == NOW - timedelta(hours=2)  # the agent's clock check ignores the command line's stamps
    assert [c.reason for c in log.checkpoints()] == ["grant", "rule", "rule"]  # each change signed at once
    assert log.verify(key).ok
    with pytest.raises(AccessLogError, match="unknown resident change"):
        log.append_rule_change("killswitch_sideways", by="x")
    with pytest.raises(AccessLogError, match="'issuer'"):
        log.append_rule_change("trust_added", by="x", details={"iss": "jackson-pd"})
    with raw(db) as c:  # a change dressed up as an agency's grant is caught by the column check
        c.execute("UPDATE access_log SET iss = 'jackson-pd', outcome = 'approved' WHERE seq = ?", (seq,))
    r = log.verify(key)
    assert not r.ok and r.first_bad_seq == seq and "searchable columns" in r.first_problem.message  # type: ignore[union-attr]


def test_service_start_pins_the_key_and_records_how_the_last_run_ended(tmp_path: Path, key: DeviceKey) -> None:
    db = tmp_path / "state.sqlite"
    clock = FixedClock(NOW)
    log = AccessLog(db, device_key=key, clock=clock.now)
    rules = {"program": "p", "location": {"lat": 1.0, "lon": 2.0}, "consent": {"start": "2026-01-01T00:00:00Z"}}
    first = log.service_started(tmp_path, rules=rules)
    assert pin_path(tmp_path).read_text() == key.kid + "\n" and pin_path(tmp_path).stat().st_mode & 0o777 == 0o644
    assert cp_claims(first.jws)["reason"] == "start" and cp_claims(first.jws)["after"] == "first"
    assert log.entries() == []  # the first rules of a fresh log are remembered, not entered
    log.service_stopping()
    clock.advance(60)
    again = log.service_started(tmp_path, rules=rules)
    assert cp_claims(again.jws)["after"] == "clean" and log.entries() == []  # same rules: nothing to record
    clock.advance(60)
    changed = {**rules, "consent": {"start": "2026-02-01T00:00:00Z"}, "location": {"lat": 1.5, "lon": 2.0}}
    crashed = log.service_started(tmp_path, rules=changed)  # no shutdown in between: a crash
    assert cp_claims(crashed.jws)["after"] == "unclean"
    (e,) = log.entries()
    assert e.outcome == "rules_changed" and e.data["changed"] == ["consent", "location"]
    assert e.data["rules"] == {"program": "p", "consent": {"start": "2026-02-01T00:00:00Z"}}  # never the home's location
    assert crashed.seq == 1  # the start-up checkpoint covers the change
    r = log.verify(key, tail=TailRules("running", now=clock.now()))
    assert r.ok and len(r.unclean_stops) == 1, r.problems
    assert any("without a clean shutdown" in n for n in r.notes)
    with pytest.raises(PinError, match="not the pinned one"):
        AccessLog(db, device_key=DeviceKey.generate()).service_started(tmp_path)


def test_the_running_service_signs_hourly_even_when_idle(tmp_path: Path, key: DeviceKey) -> None:
    clock = FixedClock(NOW)
    log = AccessLog(tmp_path / "state.sqlite", device_key=key, clock=clock.now)
    log.service_started(tmp_path)
    clock.advance(59 * 60)
    assert log.checkpoint_if_due() is None
    clock.advance(61)
    cp = log.checkpoint_if_due()
    assert cp is not None and cp.reason == "schedule" and cp.seq == 0
    running = TailRules("running", now=clock.now())
    assert log.verify(key, tail=running).ok
    clock.advance(2 * 3600)  # the heartbeat stopped (or its checkpoints were deleted)
    r = log.verify(key, tail=TailRules("running", now=clock.now()))
    assert not r.ok and r.first_problem.kind == "stale"  # type: ignore[union-attr]


def test_a_running_service_notices_its_log_cut_back_and_signs_that(tmp_path: Path, key: DeviceKey) -> None:
    db = tmp_path / "state.sqlite"
    clock = FixedClock(NOW)
    log = AccessLog(db, device_key=key, clock=clock.now)
    log.service_started(tmp_path)
    for i in range(1, 6):
        decision(log, i, reason="granted" if i in (2, 4) else "no_footage", at=clock.now())
    with raw(db) as c:  # someone with write access to the database, while the agent runs
        c.execute("DELETE FROM access_log WHERE seq >= 3")
        c.execute("DELETE FROM access_log_checkpoints WHERE seq >= 3")
    cp = log.checkpoint_if_due()
    assert cp is not None and cp.reason == "cut_noticed"
    assert cp_claims(cp.jws)["lost"]["seq"] == 5 and cp_claims(cp.jws)["lost"]["found"] == 2
    r = log.verify(key, tail=TailRules("running", now=clock.now()))
    assert not r.ok and any(p.kind == "cut_noticed" and "up to 5" in p.message for p in r.problems)


def test_summary_counts_requests_outcomes_and_minutes(db: Path) -> None:
    log = AccessLog(db)
    decision(log, 1, reason="granted", at=NOW - timedelta(hours=5))  # 30 minutes granted
    log.append_event("req-0001-test-aaaaaaaa", "delivered", delivery_id="d1", bytes=10, at=NOW - timedelta(hours=5))
    decision(log, 2, reason="outside_geofence", at=NOW - timedelta(hours=4))
    decision(log, 3, iss="hinds-so", reason="awaiting_resident", at=NOW - timedelta(hours=3))
    log.append_event("req-0003-test-aaaaaaaa", "approved", granted=(NOW - timedelta(hours=2), NOW - timedelta(hours=2) + timedelta(minutes=12)),
                     at=NOW - timedelta(hours=2))
    log.append_event("req-0003-test-aaaaaaaa", "delivered", delivery_id="d3", bytes=10, at=NOW - timedelta(hours=2))
    decision(log, 4, iss="hinds-so", reason="rate_limited", at=NOW - timedelta(hours=1))
    log.append_rule_change("killswitch_on", by="me", at=NOW - timedelta(minutes=30))
    decision(log, 5, reason="kill_switch", at=NOW - timedelta(days=40))  # outside the period
    log.count_rejection("bad_signature", at=NOW - timedelta(hours=1), count=7)
    s = log.summary(NOW - timedelta(days=30), NOW)
    assert s["requests"] == 4 and s["agencies"] == {"jackson-pd": {"requests": 2, "granted": 1, "refused": 1},
                                                    "hinds-so": {"requests": 2, "granted": 1, "refused": 1}}
    assert (s["granted"], s["granted_by_rules"], s["approved_by_you"]) == (2, 1, 1)
    assert s["refused_by_reason"] == {"outside_geofence": 1, "rate_limited": 1}
    assert s["deliveries"] == 2 and s["minutes_shared"] == 42.0
    assert s["your_changes"] == {"killswitch_on": 1} and s["ignored_before_authentication"] == 7


# --- one entry per request and reason; an hourly limit per agency ------------------------------------


def refusal(i: int, reason: str, *, iss: str = "jackson-pd", exp: datetime = NOW + timedelta(minutes=10)) -> Decision:
    """A real decision on an authenticated request (the vectors' base claims under jti ``i``)."""
    claims = {**base_claims(), "jti": f"req-{i:04d}-test-aaaaaaaa", "iss": iss, "exp": int(exp.timestamp()),
              "iat": int(exp.timestamp()) - 600}
    return Decision(Reason(reason), FootageRequest.from_claims(claims), ("jpd-2026a",), iss, f"{i:064x}")


def test_a_request_gets_one_entry_per_reason_and_further_copies_are_counted_on_it(db: Path) -> None:
    """A captured request re-sent 500 times after its exp, then 200 times re-serialized: two entries."""
    log = AccessLog(db)
    assert log.record_refusal(refusal(1, "expired"), at=NOW) is not None
    before = rows(db)
    for _ in range(499):
        assert log.record_refusal(refusal(1, "expired"), at=NOW + timedelta(minutes=1)) is None
    assert rows(db) == before  # nothing appended, nothing updated in place
    # Step 12: the expired copies did not use up the jti; the genuine copy gets its own entry.
    granted, _ = log.append_decision(Decision(Reason.GRANTED, refusal(1, "expired").request, ("jpd-2026a",), "jackson-pd",
                                              "ab" * 32, (NOW - timedelta(minutes=90), NOW - timedelta(minutes=60))), at=NOW)
    replayed = log.record_refusal(refusal(1, "replayed"), at=NOW)
    assert replayed is not None
    for _ in range(199):
        assert log.record_refusal(refusal(1, "replayed"), at=NOW) is None
    entries = log.entries()
    assert [e.outcome for e in entries] == ["expired", "granted", "replayed"]
    assert log.more_copies(entries) == {1: 499, replayed[0]: 199}
    assert log.refusals_not_listed() == [] and not log.decided_unlisted(entries[0].jti)
    assert log.verify().ok


def test_an_agencys_refusals_beyond_the_hourly_limit_are_counted_not_listed(db: Path) -> None:
    limit = REFUSALS_LISTED_PER_AGENCY_PER_HOUR
    log = AccessLog(db)
    for i in range(limit + 30):  # a key holder signs request after request the resident's rules refuse
        log.record_refusal(refusal(i, "outside_geofence"), at=NOW + timedelta(seconds=i))
    log.record_refusal(refusal(9000, "expired"), at=NOW + timedelta(minutes=5))
    log.record_refusal(refusal(9001, "wrong_issuer", iss="made-up-agency"), at=NOW + timedelta(minutes=5),
                       agency="jackson-pd")  # counted against the agency whose key signed, not the claim
    assert len(log.entries()) == limit
    assert log.refusals_not_listed() == [
        {"hour": "2026-12-03T18:00:00Z", "iss": "jackson-pd", "reason": "expired", "count": 1},
        {"hour": "2026-12-03T18:00:00Z", "iss": "jackson-pd", "reason": "outside_geofence", "count": 30},
        {"hour": "2026-12-03T18:00:00Z", "iss": "jackson-pd", "reason": "wrong_issuer", "count": 1},
    ]
    # A counted refusal that used up its jti (step 12 and later) is remembered, so an identical copy stays a
    # duplicate; one by checks 5 to 11 (expired) is not, so the genuine copy can still be decided.
    assert log.decided_unlisted(refusal(limit, "outside_geofence").request.jti)
    assert not log.decided_unlisted(refusal(9000, "expired").request.jti)
    # Another agency, and the next hour, are listed again; grants and events never count against the limit.
    assert log.record_refusal(refusal(5000, "no_footage", iss="hinds-so"), at=NOW + timedelta(minutes=6)) is not None
    decision(log, 6000, reason="granted", at=NOW + timedelta(minutes=7))
    decision(log, 6001, reason="awaiting_resident", at=NOW + timedelta(minutes=7))
    log.append_event("req-6001-test-aaaaaaaa", "approved", at=NOW + timedelta(minutes=8))
    assert log.record_refusal(refusal(7000, "no_footage"), at=NOW + timedelta(hours=1)) is not None
    assert [e.outcome for e in log.entries()][limit:] == ["no_footage", "granted", "awaiting_resident", "approved", "no_footage"]
    # Remembered until exp + 60 s, then forgotten (any copy is expired by then, before step 12).
    log.record_refusal(refusal(7001 + limit, "kill_switch"), at=NOW + timedelta(hours=2))
    for i in range(limit):
        log.record_refusal(refusal(7001 + i, "kill_switch", exp=NOW + timedelta(hours=3)), at=NOW + timedelta(hours=2))
    assert not log.decided_unlisted(refusal(limit, "outside_geofence").request.jti)
    assert log.verify().ok


def executed(log: AccessLog, call: Callable[[], object]) -> list[str]:
    """The query plans of the statements ``call`` runs on the log's connection."""
    statements: list[str] = []
    log._conn.set_trace_callback(statements.append)
    try:
        call()
    finally:
        log._conn.set_trace_callback(None)
    plans = []
    for sql in statements:
        plans += [str(row[3]) for row in log._conn.execute("EXPLAIN QUERY PLAN " + sql)]
    return plans


def test_the_decisions_queries_do_not_read_the_whole_log(db: Path) -> None:
    """Step 21 reads the agency's grants only, step 8 the newest entry only: not a scan of an agency's refusals."""
    log = AccessLog(db)
    fill(log, 20)
    plans = executed(log, lambda: log.grants_since("jackson-pd", NOW - timedelta(hours=24)))
    assert plans == ["SEARCH access_log USING INDEX access_log_grants (iss=? AND at_us>?)"]
    assert executed(log, log.last_at) == ["SCAN access_log USING INDEX access_log_at"]  # newest first, LIMIT 1


def test_cli_says_how_many_copies_and_refusals_were_counted(agent_dirs: tuple[Path, Path, DeviceKey]) -> None:
    cfg, db, key = agent_dirs
    now = datetime.now(UTC).replace(microsecond=0)
    with AccessLog(db) as log:
        for _ in range(500):
            log.record_refusal(refusal(1, "expired", exp=now), at=now)
        for i in range(2, REFUSALS_LISTED_PER_AGENCY_PER_HOUR + 12):
            log.record_refusal(refusal(i, "outside_geofence", exp=now), at=now)
    r = run_cli(cfg, "log", "show")
    assert r.returncode == 0, r.stderr
    assert "refused: the request had expired\n" in r.stdout
    assert "and 499 more copies of this request, refused the same way (counted, not listed)" in r.stdout
    assert "Refusals counted, not listed (beyond 100 per agency in an hour):" in r.stdout
    assert "jackson-pd, 11 more (11 x your camera is outside the search area)" in r.stdout
    doc = json.loads(run_cli(cfg, "log", "show", "--json").stdout)
    assert [e["more_copies"] for e in doc["entries"][:2]] == [499, 0]
    assert doc["refused_not_listed"] == [{"hour": format_utc(now.replace(minute=0, second=0)), "iss": "jackson-pd",
                                          "reason": "outside_geofence", "count": 11}]
    r = run_cli(cfg, "log", "summary")
    assert ("Also refused, counted but not listed one by one: 499 more copies of requests listed above, refused the "
            "same way; 11 refusals beyond 100 per agency in an hour (jackson-pd 11).") in r.stdout
    s = json.loads(run_cli(cfg, "log", "summary", "--json").stdout)
    assert (s["requests"], s["more_copies"], s["refused_not_listed"]) == (100, 499, 11)
    assert s["refused_not_listed_by_reason"] == {"outside_geofence": 11}
