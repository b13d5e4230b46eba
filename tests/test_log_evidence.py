"""The access log as evidence: each attack on it, run against real SQLite files and the real CLI.

Attacks by someone with write access to the state database (the service user, or root):
cutting the newest entries together with the checkpoints that cover them, rewriting an entry
and re-chaining it while dropping later checkpoints, removing or replacing the device key and
forging checkpoints with another one, turning the kill switch off without a record. And the
auditor's side: an exported bundle verifies on a machine without the agent, fails after any
single edit, and the manifests agencies hold witness the log.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from agent.protocol.jose import b64url_encode
from agent.protocol.sealing import MANIFEST_TYP, seal_delivery
from agent.state.accesslog import AccessLog
from agent.state.clock import FixedClock
from agent.state.devicekey import DeviceKey
from agent.state.killswitch import KillSwitch
from agent.state.logverify import MANIFEST_TYP as WITNESS_TYP
from agent.state.logverify import verify_bundle
from tests.test_accesslog import NOW, decision, rechain

# --- a home: configuration, data directory, device key, and the agent's runs -----------------------


@dataclass
class Home:
    config: Path
    data: Path
    key: DeviceKey

    @property
    def db(self) -> Path:
        return self.data / "state.sqlite"

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=60, env=env)

    def verify(self, *args: str) -> tuple[int, dict[str, Any]]:
        r = self.cli("log", "verify", "--json", *args)
        assert r.returncode in (0, 1), r.stderr
        return r.returncode, json.loads(r.stdout)

    @contextmanager
    def run(self, clock: Callable[[], datetime] | None = None, *, crash: bool = False) -> Iterator[AccessLog]:
        """One run of the sharing service, as far as the log sees it: start-up, appends, clean shutdown (or a crash)."""
        log = AccessLog(self.db, device_key=self.key, clock=clock or FixedClock(NOW).now)
        log.service_started(self.data)
        try:
            yield log
        finally:
            if not crash:
                log.service_stopping()
            log.close()


@pytest.fixture
def home(write_config: Callable[[str], Path], tmp_path: Path) -> Home:
    cfg = write_config("")
    data = tmp_path / "data"
    data.mkdir()
    return Home(cfg, data, DeviceKey.load_or_create(data / "device-key.pem"))


def sql(db: Path, *statements: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for s in statements:
            conn.execute(s)
    finally:
        conn.close()


def kinds(report: dict[str, Any]) -> set[str]:
    return {p["kind"] for p in report["problems"]}


def manifest(key: DeviceKey, jti: str, seq: int, digest: str) -> str:
    """The manifest the device signs for a grant, exactly as agencies receive and keep it."""
    recipient = X25519PrivateKey.generate().public_key().public_bytes_raw()
    sealed = seal_delivery(b"\x00" * 1000, jti=jti, recipient_jwk={"kty": "OKP", "crv": "X25519", "x": b64url_encode(recipient)},
                           device_key=key, granted=(NOW - timedelta(minutes=90), NOW - timedelta(minutes=60)),
                           frames=1, width=2, height=2, log_seq=seq, log_hash=digest, now=NOW)
    return sealed.manifest


def six_entries(log: AccessLog) -> dict[int, str]:
    """Entries 1 to 6, grants at 2 and 5 (each signed at once); returns {seq: hash} of the grants."""
    grants = {}
    for i in range(1, 7):
        seq, digest = decision(log, i, reason="granted" if i in (2, 5) else "no_footage")
        if i in (2, 5):
            grants[seq] = digest
    return grants


def test_an_intact_log_verifies_with_the_pinned_key(home: Home) -> None:
    with home.run() as log:
        six_entries(log)
    assert (home.data / "device-key.thumbprint").read_text().strip() == home.key.kid
    r = home.cli("log", "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "intact: 6 entries" in r.stdout and home.key.kid in r.stdout and "pinned in" in r.stdout


# --- shortening the log ----------------------------------------------------------------------------


def test_cutting_the_newest_entries_with_their_checkpoints_is_detected(home: Home) -> None:
    with home.run() as log:
        six_entries(log)
    # Entries 3 to 6 go, and so do the checkpoints that covered them (the grant at 5, the shutdown at 6): what is
    # left ends exactly at a genuine checkpoint (the grant at 2), so the chain alone cannot tell.
    sql(home.db, "DELETE FROM access_log WHERE seq >= 3", "DELETE FROM access_log_checkpoints WHERE seq >= 3")
    code, rep = home.verify()
    assert code == 1 and kinds(rep) == {"unclean_stop"}, rep
    r = home.cli("log", "verify")
    assert r.returncode == 1
    assert "cannot be vouched for" in r.stdout and "with no shutdown" in r.stdout
    assert "crashed or lost power" in r.stdout and "deleted together with the checkpoints" in r.stdout


def test_a_crash_is_reported_as_such_and_named_after_the_restart(home: Home) -> None:
    with home.run(crash=True) as log:
        decision(log, 1, reason="granted")
        decision(log, 2, reason="no_footage")  # not signed yet when the power goes
    r = home.cli("log", "verify")
    assert r.returncode == 1
    assert "entries 2 to 2 are not covered" in r.stdout and "did not shut down cleanly" in r.stdout
    assert "start the agent and it signs them at start-up" in r.stdout
    with home.run(FixedClock(NOW + timedelta(minutes=5)).now):
        pass  # the restart signs what was left, saying the previous run ended uncleanly
    r = home.cli("log", "verify")
    assert r.returncode == 0, r.stdout
    assert "Note: the agent stopped without a clean shutdown (a crash or power cut)" in r.stdout
    assert "entries 2 to 2, written before the stop, were signed only at the restart" in r.stdout
    code, rep = home.verify()
    assert code == 0 and len(rep["unclean_stops"]) == 1


def running_status(home: Home) -> None:
    """The sharing service's status file, as a live service keeps it fresh (this test process plays the service)."""
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    (home.data / "service-status.json").write_text(json.dumps({"pid": os.getpid(), "updated_us": now_us, "status_interval_s": 5.0}))


def test_a_cut_while_the_agent_runs_is_noticed_and_signed(home: Home) -> None:
    log = AccessLog(home.db, device_key=home.key)  # the running service: real clock
    log.service_started(home.data)
    six_entries(log)
    running_status(home)
    code, rep = home.verify()
    assert code == 0 and rep["mode"] == "running", rep
    sql(home.db, "DELETE FROM access_log WHERE seq >= 4", "DELETE FROM access_log_checkpoints WHERE seq >= 4")
    log.checkpoint_if_due()  # the service's housekeeping, once a second
    log.close()
    running_status(home)
    r = home.cli("log", "verify")
    assert r.returncode == 1
    assert "has been tampered with" in r.stdout and "found its log cut back" in r.stdout and "up to 6" in r.stdout


def test_a_running_agent_without_its_start_checkpoint_or_heartbeat_is_detected(home: Home) -> None:
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    log = AccessLog(home.db, device_key=home.key, clock=FixedClock(two_hours_ago).now)
    log.service_started(home.data)
    six_entries(log)
    log.close()
    running_status(home)
    code, rep = home.verify()  # nothing signed for two hours by an agent that signs hourly
    assert code == 1 and "stale" in kinds(rep)
    sql(home.db, "DELETE FROM access_log_checkpoints WHERE id = (SELECT MIN(id) FROM access_log_checkpoints)")
    code, rep = home.verify()
    assert code == 1 and {"not_started", "checkpoint_chain"} <= kinds(rep)


# --- rewriting the log -----------------------------------------------------------------------------


def test_rewriting_an_entry_rechaining_and_dropping_later_checkpoints_is_detected(home: Home) -> None:
    with home.run() as log:
        grants = six_entries(log)
    sql(home.db, "UPDATE access_log SET entry = replace(entry, 'Burglary', 'Nothing') WHERE seq = 3",
        "DELETE FROM access_log_checkpoints WHERE seq >= 3")
    rechain(home.db, 3)
    code, rep = home.verify()
    assert code == 1 and kinds(rep) == {"tail_unsigned"} and rep["first_bad_seq"] == 3, rep
    r = home.cli("log", "verify")
    assert "entries 3 to 6 are not covered by any checkpoint the device signed" in r.stdout
    assert "Entries 1 to 2 check out." in r.stdout
    # The agency that received grant 5 holds the device's signed word for what entry 5 was.
    (home.data / "g5.manifest.jws").write_text(manifest(home.key, "req-0005-test-aaaaaaaa", 5, grants[5]) + "\n")
    code, rep = home.verify("--witness", str(home.data / "g5.manifest.jws"))
    assert code == 1 and "witness" in kinds(rep)
    assert any("entry 5 is not what the device signed" in p["message"] for p in rep["problems"])


# --- the device key ---------------------------------------------------------------------------------


def forge_everything(home: Home, attacker: DeviceKey) -> None:
    """Rewrite entry 2, re-chain, and replace every checkpoint with a full, well-formed chain signed by ``attacker``."""
    sql(home.db, "UPDATE access_log SET entry = replace(entry, 'Burglary', 'Nothing') WHERE seq = 2",
        "DELETE FROM access_log_checkpoints")
    rechain(home.db, 2)
    forged = AccessLog(home.db, device_key=attacker, clock=FixedClock(NOW).now)
    forged.service_started(home.data / "elsewhere")  # the attacker's own "pin", out of the way
    forged.service_stopping()
    forged.close()


def test_removing_the_device_key_does_not_let_forged_checkpoints_pass(home: Home) -> None:
    with home.run() as log:
        six_entries(log)
    attacker = DeviceKey.generate()
    forge_everything(home, attacker)
    (home.data / "device-key.pem").unlink()
    code, rep = home.verify()
    assert code == 1 and "checkpoint_signature" in kinds(rep), rep
    assert any(f"not this device's key '{home.key.kid}'" in p["message"] for p in rep["problems"])
    assert any("device key" in n and "missing" in n for n in rep["notes"])
    # The attacker puts their own key in place: the pin names which is which.
    pem = attacker.private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    (home.data / "device-key.pem").write_bytes(pem)
    r = home.cli("log", "verify")
    assert r.returncode == 1
    assert f"(thumbprint {attacker.kid}) is not the pinned key ({home.key.kid}" in r.stdout
    # ...and deletes the pin too: verify refuses to vouch for anything it cannot check against a known key.
    (home.data / "device-key.thumbprint").unlink()
    code, rep = home.verify()
    assert code == 1 and "device_key" in kinds(rep)
    assert any("not pinned" in p["message"] for p in rep["problems"])
    # The homeowner (or an auditor) gives the thumbprint they know: the forgery shows.
    code, rep = home.verify("--device-key", home.key.kid)
    assert code == 1 and "checkpoint_signature" in kinds(rep)
    # With the pin rewritten to the forger's key, the device alone is fooled (README says so); the thumbprint
    # the homeowner noted, or the kid of any manifest an agency holds, is not.
    (home.data / "device-key.thumbprint").write_text(attacker.kid + "\n")
    assert home.verify()[0] == 0
    assert home.cli("status", "--json").stdout.count(attacker.kid) >= 1
    code, rep = home.verify("--device-key", home.key.kid)
    assert code == 1 and "device_key" in kinds(rep) and "checkpoint_signature" in kinds(rep)


def test_a_replaced_device_key_signs_nothing(home: Home) -> None:
    with home.run() as log:
        six_entries(log)
    other = DeviceKey.generate()
    (home.data / "device-key.pem").write_bytes(other.private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    r = home.cli("log", "checkpoint")
    assert r.returncode == 2 and "not the pinned one" in r.stderr and "Restore the original device-key.pem" in r.stderr
    r = home.cli("log", "export", "-o", str(home.data / "b.jsonl"))
    assert r.returncode == 2 and "not the pinned one" in r.stderr
    r = home.cli("killswitch", "on")  # the kill switch works whatever the key: the change is recorded, unsigned
    assert r.returncode == 0 and "not signed yet" in r.stdout and "not the pinned one" in r.stdout
    r = home.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    dk = json.loads(r.stdout)["sharing"]["device_key"]
    assert dk["thumbprint"] == home.key.kid and dk["key_file_thumbprint"] == other.kid and "replaced" in dk["problem"]


def test_status_shows_the_pinned_thumbprint(home: Home, write_config: Callable[[str], Path]) -> None:
    with home.run():
        pass
    r = home.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sharing"]["device_key"] == {"thumbprint": home.key.kid, "key_file_thumbprint": home.key.kid,
                                                             "problem": None}


# --- the resident's own changes ------------------------------------------------------------------------


def test_kill_switch_changes_are_signed_entries(home: Home) -> None:
    with home.run():
        pass
    for action in ("on", "off"):
        r = home.cli("killswitch", action)
        assert r.returncode == 0, r.stderr
        assert "Recorded in your access log as entry #" in r.stdout and "not signed" not in r.stdout
    r = home.cli("log", "show")
    assert "YOUR CHANGE: the kill switch was turned ON: nothing is shared" in r.stdout
    assert "YOUR CHANGE: the kill switch was turned off" in r.stdout and "command line, user" in r.stdout
    r = home.cli("log", "verify")
    assert r.returncode == 0 and "intact: 2 entries" in r.stdout, r.stdout
    with AccessLog(home.db) as log:
        assert [(e.type, e.outcome) for e in log.entries()] == [("resident", "killswitch_on"), ("resident", "killswitch_off")]
        assert [c.reason for c in log.checkpoints()][-2:] == ["rule", "rule"]
    # Deleting the record of a change is caught by the checkpoint signed right after it.
    sql(home.db, "DELETE FROM access_log WHERE seq = 2")
    code, rep = home.verify()
    assert code == 1 and kinds(rep) == {"truncated"}, rep


def test_turning_the_kill_switch_off_off_the_record_is_refused(home: Home) -> None:
    assert home.cli("killswitch", "on").returncode == 0
    home.db.unlink()
    for extra in ("-wal", "-shm"):
        Path(str(home.db) + extra).unlink(missing_ok=True)
    home.db.mkdir()  # the log cannot be written
    r = home.cli("killswitch", "off")
    assert r.returncode == 2
    assert "the kill switch stays ON: turning it off could not be recorded" in r.stderr
    assert KillSwitch(home.data / "killswitch").engaged
    r = home.cli("killswitch", "on")  # turning it on is never held up by the log
    assert r.returncode == 0 and "NOT recorded in your access log" in r.stderr
    assert KillSwitch(home.data / "killswitch").engaged


def test_a_fresh_install_without_a_key_lists_changes_without_failing(home: Home) -> None:
    (home.data / "device-key.pem").unlink()  # the sharing service never ran: no key, nothing pinned
    assert home.cli("killswitch", "on").returncode == 0
    r = home.cli("log", "verify")
    assert r.returncode == 0 and "are recorded and are signed when it first starts" in r.stdout, r.stdout


# --- export and independent verification -----------------------------------------------------------


@pytest.fixture
def bundle(home: Home) -> bytes:
    with home.run() as log:
        six_entries(log)
        log.append_rule_change("trust_added", by="homeowner (test)", details={"kids": ["jpd-2026a"], "issuer": "jackson-pd"})
        log.append_event("req-0002-test-aaaaaaaa", "delivered", delivery_id="Ojm5DLRgg9SKVkBaY4QfDA", bytes=300800)
    out = home.data.parent / "audit" / "log.jsonl"
    out.parent.mkdir()
    r = home.cli("log", "export", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"log verify --bundle {out} --device-key {home.key.kid}" in r.stdout
    return out.read_bytes()


def auditor_verify(tmp_path: Path, data: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    """``log verify --bundle`` on 'another machine': a fresh folder, no configuration, no agent state."""
    machine = tmp_path / "auditor"
    machine.mkdir(exist_ok=True)
    (machine / "bundle.jsonl").write_bytes(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOORBELL_AGENT")}
    env["DOORBELL_AGENT_CONFIG"] = str(machine / "no-such-agent.toml")
    return subprocess.run([sys.executable, "-m", "agent", "log", "verify", "--bundle", "bundle.jsonl", *args],
                          capture_output=True, text=True, timeout=60, cwd=machine, env=env)


def test_a_bundle_verifies_on_a_machine_without_the_agent(home: Home, bundle: bytes, tmp_path: Path) -> None:
    lines = bundle.decode().splitlines()
    header = json.loads(lines[0])
    assert header["kind"] == "header" and header["kid"] == home.key.kid and header["entries"] == 8
    assert json.loads(lines[-1])["kind"] == "checkpoint"
    r = auditor_verify(tmp_path, bundle, "--device-key", home.key.kid)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "The bundle bundle.jsonl is intact: 8 entries" in r.stdout
    r = auditor_verify(tmp_path, bundle)
    assert r.returncode == 2 and "--bundle needs --device-key THUMBPRINT" in r.stderr
    r = auditor_verify(tmp_path, bundle, "--device-key", DeviceKey.generate().kid)  # another camera's thumbprint
    assert r.returncode == 1 and "not this device's key" in r.stdout
    # The manifest the agency kept for grant 5 matches the bundle.
    with AccessLog(home.db) as log:
        g5 = [e for e in log.entries() if e.seq == 5][0]
    (tmp_path / "auditor" / "g5.manifest.jws").write_text(manifest(home.key, g5.jti, 5, g5.hash))
    r = auditor_verify(tmp_path, bundle, "--device-key", home.key.kid, "--witness", "g5.manifest.jws")
    assert r.returncode == 0 and "Manifest g5.manifest.jws matches entry 5" in r.stdout, r.stdout


def single_edits(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Every line deleted, duplicated, or swapped with the next; a byte changed at every 7th position; the end cut."""
    lines = data.split(b"\n")[:-1]
    for i in range(len(lines)):
        yield f"delete line {i + 1}", b"\n".join(lines[:i] + lines[i + 1:]) + b"\n"
        yield f"duplicate line {i + 1}", b"\n".join(lines[: i + 1] + lines[i:]) + b"\n"
        if i + 1 < len(lines):
            yield f"swap lines {i + 1} and {i + 2}", b"\n".join(lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2:]) + b"\n"
    for pos in range(0, len(data), 7):
        for new in {data[pos] ^ 0x01, ord(" ") if data[pos] != ord(" ") else ord("x")}:
            edited = bytearray(data)
            edited[pos] = new
            yield f"byte {pos} {data[pos:pos + 1]!r} -> {bytes([new])!r}", bytes(edited)
    yield "last newline removed", data[:-1]
    yield "a blank line added", data + b"\n"


def test_any_single_edit_to_a_bundle_is_detected(home: Home, bundle: bytes, tmp_path: Path) -> None:
    assert verify_bundle(bundle, home.key.kid).ok
    edits = list(single_edits(bundle))
    assert len(edits) > 1000
    passed = [name for name, edited in edits if verify_bundle(edited, home.key.kid).ok]
    assert passed == []
    # The same code through the real CLI, for a few of them.
    lines = bundle.split(b"\n")[:-1]
    entry = json.loads(lines[3])
    entry["entry"] = entry["entry"].replace("no_footage", "kill_switch")
    edits = {
        "an entry rewritten": b"\n".join(lines[:3] + [json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode()] + lines[4:]) + b"\n",
        "the last entries and checkpoints cut": b"\n".join(lines[:-3]) + b"\n",
        "the export checkpoint removed": b"\n".join(lines[:-1]) + b"\n",
        "spacing changed": bundle.replace(b'"kind":"entry"', b'"kind": "entry"', 1),
    }
    for name, edited in edits.items():
        r = auditor_verify(tmp_path, edited, "--device-key", home.key.kid)
        assert r.returncode == 1, name
        assert "The bundle bundle.jsonl has been tampered with" in r.stdout, (name, r.stdout)


def test_export_to_standard_output_and_as_a_spreadsheet(home: Home, bundle: bytes, tmp_path: Path) -> None:
    r = home.cli("log", "export", "-o", "-")
    assert r.returncode == 0 and r.stdout.startswith('{"kind":"header"') and "log verify --bundle" in r.stderr
    assert auditor_verify(tmp_path, r.stdout.encode(), "--device-key", home.key.kid).returncode == 0
    out = tmp_path / "log.csv"
    r = home.cli("log", "export", "-o", str(out), "--format", "csv")
    assert r.returncode == 0 and "cannot be verified" in r.stdout
    text = out.read_text()
    assert text.startswith('"NOT VERIFIABLE:') and "agency key(s) added to your trust store" in text
    assert auditor_verify(tmp_path, out.read_bytes(), "--device-key", home.key.kid).returncode == 1
    r = home.cli("log", "export", "-o", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr


# --- witnesses: the manifests agencies hold --------------------------------------------------------------


def test_a_cut_back_to_a_clean_shutdown_is_caught_by_the_agencys_manifest(home: Home) -> None:
    """The limit of the device alone, and who closes it: a log cut back exactly to an earlier clean shutdown
    looks whole on the device, but the agency that received a later grant holds the device's signature over it."""
    with home.run() as log:
        decision(log, 1, reason="granted")
    with home.run(FixedClock(NOW + timedelta(hours=1)).now) as log:
        seq, digest = decision(log, 2, reason="granted", at=NOW + timedelta(hours=1))
        decision(log, 3, reason="no_footage", at=NOW + timedelta(hours=1))
    m = home.data / "case-2.manifest.jws"
    m.write_text(manifest(home.key, "req-0002-test-aaaaaaaa", seq, digest) + "\n")
    code, rep = home.verify("--witness", str(m))
    assert code == 0 and rep["witnesses"][0]["ok"], rep
    with AccessLog(home.db) as log:
        first_shutdown = [i for i, c in enumerate(log.checkpoints()) if c.reason == "shutdown"][0]
    sql(home.db, "DELETE FROM access_log WHERE seq >= 2",
        f"DELETE FROM access_log_checkpoints WHERE id > (SELECT id FROM access_log_checkpoints ORDER BY id LIMIT 1 OFFSET {first_shutdown})")
    code, rep = home.verify()
    assert code == 0  # the device alone cannot tell (README: "What is and is not detected")
    r = home.cli("log", "verify", "--witness", str(m))
    assert r.returncode == 1
    assert "the log ends at entry 1, but on" in r.stdout and "case-2.manifest.jws" in r.stdout and "at entry 2" in r.stdout


def test_a_manifest_from_another_camera_or_not_a_manifest_is_a_problem(home: Home) -> None:
    with home.run() as log:
        seq, digest = decision(log, 1, reason="granted")
    other = home.data / "other.manifest.jws"
    other.write_text(manifest(DeviceKey.generate(), "req-0001-test-aaaaaaaa", seq, digest))
    junk = home.data / "junk.manifest.jws"
    junk.write_text("not a manifest")
    code, rep = home.verify("--witness", str(other), str(junk))
    assert code == 1 and kinds(rep) == {"witness"}
    assert any("comes from another camera" in p["message"] for p in rep["problems"])
    assert any("junk.manifest.jws is not a device-signed delivery manifest" in p["message"] for p in rep["problems"])
    r = home.cli("log", "verify", "--witness", str(home.data / "missing.jws"))
    assert r.returncode == 2 and "cannot read it" in r.stderr
    assert WITNESS_TYP == MANIFEST_TYP


# --- the transparency report ---------------------------------------------------------------------------


def test_summary_in_plain_words_and_json(home: Home) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with home.run(FixedClock(now).now) as log:
        decision(log, 1, reason="granted", at=now - timedelta(days=1))
        log.append_event("req-0001-test-aaaaaaaa", "delivered", delivery_id="d", bytes=5, at=now - timedelta(days=1))
        decision(log, 2, reason="outside_geofence", at=now - timedelta(days=2))
        decision(log, 3, iss="hinds-so", reason="warrant_required", at=now - timedelta(days=3))
        decision(log, 4, iss="hinds-so", reason="granted", at=now - timedelta(days=60))
        log.append_rule_change("killswitch_on", by="me", at=now - timedelta(hours=1))
    r = home.cli("log", "summary")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Transparency report for the last 30 day(s)" in out
    assert "Requests: 3 from 2 agencies." in out and "jackson-pd: 2 request(s), 1 granted, 1 refused" in out
    assert "1 x your camera is outside the search area" in out and "1 x you require a warrant" in out
    assert "Footage shared: 30 minute(s) in 1 completed delivery." in out
    assert "the kill switch was turned ON: nothing is shared (1x)" in out
    r = home.cli("log", "summary", "--days", "90", "--json")
    s = json.loads(r.stdout)
    assert s["requests"] == 4 and s["granted"] == 2 and s["days"] == 90
    r = home.cli("log", "summary", "--days", "0")
    assert r.returncode == 2 and "--days" in r.stderr


def test_rules_changes_show_in_the_log(home: Home) -> None:
    rules = {"program": "p", "consent": {"start": "2026-01-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}}
    log = AccessLog(home.db, device_key=home.key, clock=FixedClock(NOW).now)
    log.service_started(home.data, rules=rules)
    decision(log, 1, reason="no_footage")
    log.service_stopping()
    log.service_started(home.data, rules={**rules, "consent": {"start": "2026-01-01T00:00:00Z", "end": "2026-06-01T00:00:00Z"}})
    log.service_stopping()
    log.close()
    r = home.cli("log", "show")
    assert "YOUR CHANGE: your rules changed (changed: consent), by the configuration file, read at start-up" in r.stdout
    assert home.cli("log", "verify").returncode == 0


def test_copy_of_state_is_not_needed_for_a_bundle(tmp_path: Path, home: Home, bundle: bytes) -> None:
    shutil.rmtree(home.data)  # the device is gone; the auditor has the bundle and the thumbprint
    assert auditor_verify(tmp_path, bundle, "--device-key", home.key.kid).returncode == 0


def test_a_thumbprint_that_starts_with_a_dash_is_read_as_a_value(home: Home) -> None:
    """About one device key in 64 has a thumbprint beginning with ``-``; copied from ``status`` it must work."""
    with home.run() as log:
        six_entries(log)
    r = home.cli("log", "verify", "--device-key", "-" + home.key.kid[1:])
    assert "expected one argument" not in r.stderr
    assert r.returncode == 1 and "-" + home.key.kid[1:] in r.stdout + r.stderr
