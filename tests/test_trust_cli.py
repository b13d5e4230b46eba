"""`doorbell-agent trust add|list|revoke`, run as the homeowner runs it: the real CLI in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.trust import TrustStore
from agent.state.truststore import load_trust_store, save_trust_store
from tests import protocol_signing as ps


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(config), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def setup(write_config: Callable[[str], Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    """(config, the agency's JWK Set file, where the agent keeps its trust store)."""
    cfg = write_config('[policy]\nprogram = "p"\nlocation = { lat = 32.3, lon = -90.2 }\ntimezone = "America/Chicago"\n'
                       "[policy.consent]\nstart = 2026-11-20T00:00:00Z\nend = 2027-01-04T00:00:00Z\n")
    jwks = tmp_path / "agency.jwks.json"
    jwks.write_text(json.dumps(ps.vectors()["trust"]))
    return cfg, jwks, tmp_path / "data" / "trust.jwks.json"


def write(tmp_path: Path, name: str, obj: Any) -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_add_list_revoke(setup: tuple[Path, Path, Path]) -> None:
    cfg, jwks, store_file = setup
    r = run_cli(cfg, "trust", "add", str(jwks))
    assert r.returncode == 0, r.stderr
    assert "Added key jpd-2026a: requester key of jackson-pd" in r.stdout and f"now holds {len(ps.vectors()['trust']['keys'])} key(s)" in r.stdout
    assert load_trust_store(store_file).to_jwks() == ps.vectors()["trust"]

    r = run_cli(cfg, "trust", "list", "--json")
    keys = {k["kid"]: k for k in json.loads(r.stdout)["keys"]}
    assert keys["jpd-old"] == {
        "kid": "jpd-old", "agency": "jackson-pd", "role": "requester", "valid_from": "2025-01-01T00:00:00Z",
        "valid_until": "2026-06-01T00:00:00Z", "revoked": False, "status": "expired",
    }  # fmt: skip
    assert keys["jpd-2025"]["revoked"] is True and keys["jxn-oversight-1"]["role"] == "oversight"

    r = run_cli(cfg, "trust", "list")
    assert r.returncode == 0
    # local time of the resident's zone (America/Chicago): 2025-01-01T00:00Z is New Year's Eve, 18:00 CST
    assert "valid from: 2024-12-31 18:00 CST" in r.stdout and "agency: hinds-so" in r.stdout

    r = run_cli(cfg, "trust", "revoke", "jpd-2026a")
    assert r.returncode == 0 and "Revoked key jpd-2026a of jackson-pd" in r.stdout
    key = load_trust_store(store_file).get("jpd-2026a")
    assert key is not None and key.revoked

    # importing the agency's set again does not bring a revoked key back, and says so
    r = run_cli(cfg, "trust", "add", str(jwks))
    assert r.returncode == 0 and f"{len(ps.vectors()['trust']['keys']) - 1} key(s) were already trusted" in r.stdout
    assert "Key jpd-2026a stays revoked" in r.stdout and "doorbell-agent trust restore jpd-2026a" in r.stdout
    assert load_trust_store(store_file).get("jpd-2026a").revoked  # type: ignore[union-attr]
    r = run_cli(cfg, "trust", "add", "--force", str(jwks))  # not even when forced
    assert r.returncode == 0 and "Key jpd-2026a stays revoked" in r.stdout
    assert load_trust_store(store_file).get("jpd-2026a").revoked  # type: ignore[union-attr]


def test_adding_merges_with_existing_keys(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg, jwks, store_file = setup
    keys = ps.vectors()["trust"]["keys"]
    assert run_cli(cfg, "trust", "add", str(write(tmp_path, "a.json", {"keys": keys[:2]}))).returncode == 0
    assert run_cli(cfg, "trust", "add", str(write(tmp_path, "b.json", {"keys": keys[2:3]}))).returncode == 0
    assert sorted(k.kid for k in load_trust_store(store_file)) == sorted(k["kid"] for k in keys[:3])


BAD_FILES: list[tuple[str, Any, str]] = [
    ("not-json", "{not json", "not valid JSON"),
    ("not-a-set", [], "JWK Set"),
    ("empty", {"keys": []}, "holds no keys"),
    ("private-key", {"keys": [{**ps.vectors()["test_only_private_keys"]["signing"]["keys"][0], "iss": "a", "role": "requester"}]}, "private key"),
    ("short-x", {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "k1", "iss": "a", "role": "requester"}]}, "kid 'k1'): x must be"),
    ("bad-role", {"keys": [{**ps.vectors()["trust"]["keys"][0], "kid": "new", "role": "boss"}]}, "role 'boss'"),
    ("bad-iss", {"keys": [{**ps.vectors()["trust"]["keys"][0], "kid": "new", "iss": "Jackson PD"}]}, "iss 'Jackson PD'"),
    ("rsa", {"keys": [{"kty": "RSA", "crv": "Ed25519", "x": "AAAA", "kid": "r", "iss": "a", "role": "requester"}]}, "OKP/Ed25519"),
]


@pytest.mark.parametrize("name, content, words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_gives_a_clear_error_and_changes_nothing(setup: tuple[Path, Path, Path], tmp_path: Path, name: str, content: Any, words: str) -> None:
    cfg, jwks, store_file = setup
    keys = ps.vectors()["trust"]["keys"]
    store_file.parent.mkdir(parents=True, exist_ok=True)
    save_trust_store(TrustStore.from_jwks({"keys": keys[:1]}), store_file)
    before = store_file.read_bytes()
    r = run_cli(cfg, "trust", "add", str(write(tmp_path, f"{name}.json", content)))
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr
    assert store_file.read_bytes() == before


def test_same_kid_with_a_different_key_is_refused(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg, jwks, store_file = setup
    assert run_cli(cfg, "trust", "add", str(jwks)).returncode == 0
    before = store_file.read_bytes()
    keys = ps.vectors()["trust"]["keys"]
    impostor = {**keys[0], "x": "UhFAFJtGD9v1BYxbug79A955fx2KnWgS44qU-CAF28E"}  # kid jpd-2026a, another key
    new_ok = {**keys[0], "kid": "jpd-2026b", "x": "Qw8wOBavTVcbQAofvjwTMlRcrFzLpns1JIEtWLOiCdE"}
    r = run_cli(cfg, "trust", "add", str(write(tmp_path, "impostor.json", {"keys": [new_ok, impostor]})))
    assert r.returncode == 2
    assert "kid 'jpd-2026a' is already in the store with a different key" in r.stderr and "Nothing was imported" in r.stderr
    assert store_file.read_bytes() == before  # not even the good key of the same file


def test_revoke_unknown_kid_names_the_known_ones(setup: tuple[Path, Path, Path]) -> None:
    cfg, jwks, store_file = setup
    run_cli(cfg, "trust", "add", str(jwks))
    before = store_file.read_bytes()
    r = run_cli(cfg, "trust", "revoke", "jpd-2099")
    assert r.returncode == 2 and "no key with kid 'jpd-2099'" in r.stderr and "jpd-2026a" in r.stderr
    assert store_file.read_bytes() == before


def test_corrupt_store_is_reported_not_overwritten(setup: tuple[Path, Path, Path]) -> None:
    cfg, jwks, store_file = setup
    store_file.parent.mkdir(parents=True, exist_ok=True)
    store_file.write_text('{"keys": [')
    r = run_cli(cfg, "trust", "add", str(jwks))
    assert r.returncode == 2 and "current trust store cannot be used" in r.stderr
    assert store_file.read_text() == '{"keys": ['


def test_missing_file_and_empty_store(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg, _, _ = setup
    r = run_cli(cfg, "trust", "add", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "cannot read" in r.stderr and "nope.json" in r.stderr
    r = run_cli(cfg, "trust", "list")
    assert r.returncode == 0 and "No keys are trusted yet" in r.stdout


def keys_with(kid: str, **members: Any) -> dict[str, Any]:
    """The vectors' trust set with one key's members changed (a value of None removes the member)."""
    doc = ps.vectors()["trust"]
    for key in doc["keys"]:
        if key["kid"] == kid:
            for name, value in members.items():
                if value is None:
                    key.pop(name, None)
                else:
                    key[name] = value
    return doc


def test_reimporting_an_older_set_cannot_widen_a_key(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg, _, store_file = setup
    # the agency gave jpd-2026a an end date (2027-01-01T00:00Z, New Year's Eve 18:00 in Chicago)
    assert run_cli(cfg, "trust", "add", str(write(tmp_path, "new.json", keys_with("jpd-2026a", exp=1798761600)))).returncode == 0
    before = store_file.read_bytes()

    old = write(tmp_path, "old.json", ps.vectors()["trust"])  # the copy from before: no end date
    r = run_cli(cfg, "trust", "add", str(old))
    assert r.returncode == 2, r.stdout
    assert "jpd-2026a: valid until 2026-12-31 18:00 CST → no end date" in r.stderr
    assert "Nothing was imported" in r.stderr and f"doorbell-agent trust add --force {old}" in r.stderr
    assert "Traceback" not in r.stderr
    assert store_file.read_bytes() == before

    r = run_cli(cfg, "trust", "add", "--force", str(old))
    assert r.returncode == 0, r.stderr
    assert "Updated key jpd-2026a of jackson-pd (forced)" in r.stdout
    assert "  jpd-2026a: valid until 2026-12-31 18:00 CST → no end date" in r.stdout
    assert load_trust_store(store_file).get("jpd-2026a").exp is None  # type: ignore[union-attr]


def test_narrowing_needs_no_force_and_is_shown(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg, jwks, store_file = setup
    assert run_cli(cfg, "trust", "add", str(jwks)).returncode == 0
    # jpd-2027 starts a day later (2027-01-02T00:00Z) and jpd-2026a gets an end date: both only narrow
    doc = keys_with("jpd-2027", nbf=1798848000)
    doc["keys"][0]["exp"] = 1798761600
    r = run_cli(cfg, "trust", "add", str(write(tmp_path, "narrower.json", doc)))
    assert r.returncode == 0, r.stderr
    assert "Updated key jpd-2026a of jackson-pd, now valid:\n  jpd-2026a: valid until no end date → 2026-12-31 18:00 CST" in r.stdout
    assert "jpd-2027: valid from 2026-12-31 18:00 CST → 2027-01-01 18:00 CST" in r.stdout
    assert "(forced)" not in r.stdout
    store = load_trust_store(store_file)
    assert store.get("jpd-2027").nbf == 1798848000 and store.get("jpd-2026a").exp == 1798761600  # type: ignore[union-attr]

    revoking = {"keys": [k for k in keys_with("hcso-2026", revoked=True)["keys"] if k["kid"] == "hcso-2026"]}
    data = json.loads(run_cli(cfg, "trust", "add", "--json", str(write(tmp_path, "revoking.json", revoking))).stdout)
    assert data["changes"] == [{"kid": "hcso-2026", "field": "revoked", "from": False, "to": True, "widens": False}]
    assert data["updated"] == ["hcso-2026"] and data["forced"] is False


STATUS_CONFIG = """
[policy]
program = "p"
location = { lat = 32.3, lon = -90.2 }
timezone = "America/Chicago"
[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2036-01-01T00:00:00Z
[mqtt]
host = "localhost"
[clock]
assume_synced = true
"""


def test_restore_brings_a_revoked_key_back(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    cfg = write_config(STATUS_CONFIG)
    store_file = tmp_path / "data" / "trust.jwks.json"
    one = write(tmp_path, "one.json", {"keys": ps.vectors()["trust"]["keys"][:1]})
    assert run_cli(cfg, "trust", "add", str(one)).returncode == 0
    assert run_cli(cfg, "trust", "revoke", "jpd-2026a").returncode == 0
    assert "no agency key is trusted" in run_cli(cfg, "status").stdout
    assert "Key jpd-2026a stays revoked" in run_cli(cfg, "trust", "add", str(one)).stdout
    listing = run_cli(cfg, "trust", "list").stdout
    assert "status: revoked" in listing and "to trust it again: doorbell-agent trust restore jpd-2026a" in listing

    r = run_cli(cfg, "trust", "restore", "jpd-2026a")
    assert r.returncode == 0, r.stderr
    assert "Restored key jpd-2026a of jackson-pd: requests signed with it are accepted again" in r.stdout
    assert not load_trust_store(store_file).get("jpd-2026a").revoked  # type: ignore[union-attr]
    status = run_cli(cfg, "status").stdout
    assert "Sharing: allowed for signed requests that meet your rules (1 trusted agency key(s)" in status

    again = run_cli(cfg, "trust", "restore", "jpd-2026a", "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout) == {"kid": "jpd-2026a", "agency": "jackson-pd", "revoked": False, "was_revoked": False, "status": "valid"}


def test_restore_of_an_expired_key_says_it_is_still_refused(setup: tuple[Path, Path, Path]) -> None:
    cfg, jwks, _ = setup
    assert run_cli(cfg, "trust", "add", str(jwks)).returncode == 0
    assert run_cli(cfg, "trust", "revoke", "jpd-old").returncode == 0
    r = run_cli(cfg, "trust", "restore", "jpd-old")
    assert r.returncode == 0 and "Restored key jpd-old of jackson-pd, but it is expired" in r.stdout
    assert "still refused" in r.stdout and "until 2026-05-31 19:00 CDT" in r.stdout


def test_restore_unknown_kid_names_the_known_ones(setup: tuple[Path, Path, Path]) -> None:
    cfg, jwks, store_file = setup
    run_cli(cfg, "trust", "add", str(jwks))
    before = store_file.read_bytes()
    r = run_cli(cfg, "trust", "restore", "jpd-2099")
    assert r.returncode == 2 and "no key with kid 'jpd-2099'" in r.stderr and "jpd-2026a" in r.stderr
    assert "Nothing was changed" in r.stderr
    assert store_file.read_bytes() == before


def test_one_file_with_requester_and_oversight_keys_of_one_agency_warns(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg, jwks, _ = setup
    keys = ps.vectors()["trust"]["keys"]
    jpd_only = write(tmp_path, "jpd.json", {"keys": [k for k in keys if k["iss"] == "jackson-pd"]})
    r = run_cli(cfg, "trust", "add", str(jpd_only))
    assert r.returncode == 0
    assert "WARNING: this file holds both requester and oversight keys of jackson-pd" in r.stdout
    assert "jpd-internal-affairs never counts as independent oversight for requests of jackson-pd" in r.stdout
    assert "No key you trust counts as independent oversight for jackson-pd" in r.stdout

    r = run_cli(cfg, "trust", "add", str(jwks))  # now with the city's oversight board
    assert "Keys that count as independent oversight for jackson-pd: jxn-oversight-1 (jackson-oversight)." in r.stdout
    data = json.loads(run_cli(cfg, "trust", "add", "--json", str(jwks)).stdout)
    assert data["self_oversight"] == {"jackson-pd": {
        "requester": ["jpd-2026a", "jpd-2025", "jpd-old", "jpd-2027"], "oversight": ["jpd-internal-affairs"],
        "independent_oversight": ["jxn-oversight-1"]}}  # fmt: skip

    board = write(tmp_path, "board.json", {"keys": [k for k in keys if k["iss"] != "jackson-pd"]})
    r = run_cli(cfg, "trust", "add", str(board))
    assert r.returncode == 0 and "WARNING" not in r.stdout


def test_suggested_restore_command_is_quoted_for_the_shell(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg, _, _ = setup
    key = {**ps.vectors()["trust"]["keys"][0], "kid": "jpd;touch${IFS}pwned", "revoked": True}
    r = run_cli(cfg, "trust", "add", str(write(tmp_path, "odd.json", {"keys": [key]})))
    assert r.returncode == 0, r.stderr
    listing = run_cli(cfg, "trust", "list").stdout
    assert "(to trust it again: doorbell-agent trust restore 'jpd;touch${IFS}pwned')" in listing


def log_changes(cfg: Path) -> list[dict[str, Any]]:
    """The resident's changes in the access log, as `log show --json` gives them."""
    r = run_cli(cfg, "log", "show", "--json")
    assert r.returncode == 0, r.stderr
    return [e["entry"] for e in json.loads(r.stdout)["entries"] if e["entry"].get("type") == "resident"]


def test_every_change_is_recorded_in_the_access_log(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg, jwks, _ = setup
    r = run_cli(cfg, "trust", "add", str(jwks))
    assert r.returncode == 0 and "Recorded in your access log as entry #1" in r.stdout
    assert run_cli(cfg, "trust", "add", str(jwks)).returncode == 0  # nothing changed: nothing recorded
    assert "Recorded in your access log as entry #2" in run_cli(cfg, "trust", "revoke", "hcso-2026").stdout
    assert run_cli(cfg, "trust", "revoke", "hcso-2026").returncode == 0  # already revoked: nothing recorded
    assert "Recorded in your access log as entry #3" in run_cli(cfg, "trust", "restore", "hcso-2026").stdout
    older = write(tmp_path, "older.json", keys_with("jpd-old", exp=None))
    assert run_cli(cfg, "trust", "add", "--force", str(older)).returncode == 0

    changes = log_changes(cfg)
    assert [c["change"] for c in changes] == ["trust_added", "trust_revoked", "trust_restored", "trust_added"]
    assert changes[0]["kids"] == [k["kid"] for k in ps.vectors()["trust"]["keys"]] and changes[0]["file"] == str(jwks)
    assert (changes[1]["kids"], changes[1]["issuer"]) == (["hcso-2026"], "hinds-so")
    assert changes[3]["forced"] is True and changes[3]["kids"] == ["jpd-old"]
    assert changes[3]["changed"] == ["jpd-old: valid until 2026-06-01T00:00:00Z → no end date"]
    assert all(c["by"].startswith("homeowner (command line, user ") for c in changes)

    shown = run_cli(cfg, "log", "show").stdout
    assert "YOUR CHANGE: agency key(s) restored in your trust store (issuer hinds-so; kids hcso-2026)" in shown


def test_widening_trust_off_the_record_is_undone(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Fail closed: when the access log cannot be written, what would widen trust is undone; what narrows it stays."""
    from agent.config import load_config

    cfg, jwks, store_file = setup
    one = write(tmp_path, "one.json", {"keys": ps.vectors()["trust"]["keys"][:1]})
    assert run_cli(cfg, "trust", "add", str(one)).returncode == 0
    state_db = load_config(cfg).paths.state_db
    for path in state_db.parent.glob(state_db.name + "*"):
        path.unlink()
    state_db.mkdir()  # the log cannot be opened
    before = store_file.read_bytes()

    r = run_cli(cfg, "trust", "add", str(jwks))
    assert r.returncode == 2 and "could not be recorded in the access log" in r.stderr and "undone" in r.stderr
    assert store_file.read_bytes() == before

    r = run_cli(cfg, "trust", "revoke", "jpd-2026a")
    assert r.returncode == 0 and "Revoked key jpd-2026a" in r.stdout
    assert "NOT recorded in your access log" in r.stderr
    assert load_trust_store(store_file).get("jpd-2026a").revoked  # type: ignore[union-attr]

    r = run_cli(cfg, "trust", "restore", "jpd-2026a")
    assert r.returncode == 2 and "could not be recorded" in r.stderr
    assert load_trust_store(store_file).get("jpd-2026a").revoked  # type: ignore[union-attr]
