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

    # importing the agency's set again does not bring a revoked key back
    r = run_cli(cfg, "trust", "add", str(jwks))
    assert r.returncode == 0 and f"{len(ps.vectors()['trust']['keys'])} key(s) were already trusted" in r.stdout
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
