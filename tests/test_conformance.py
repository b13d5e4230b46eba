"""The protocol's worked cases (../shared/protocol/vectors-v1.json) through the real path, and the CLI around them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.protocol.conformance import CaseResult, VectorsError, run_vectors
from tests.conftest import VECTORS

CASE_NAMES = [c["name"] for c in json.loads(VECTORS.read_text(encoding="utf-8"))["cases"]]


@pytest.fixture(scope="module")
def results() -> dict[str, CaseResult]:
    return {r.name: r for r in run_vectors(VECTORS)}


def test_every_case_is_run(results: dict[str, CaseResult]) -> None:
    assert list(results) == CASE_NAMES and len(CASE_NAMES) >= 77


@pytest.mark.parametrize("name", CASE_NAMES)
def test_vector_case(results: dict[str, CaseResult], name: str) -> None:
    r = results[name]
    assert r.ok, f"{name}: expected {r.expected}, got {r.got} ({r.detail})"
    assert r.decision is not None and r.decision.reason.value == r.got.split()[0]


def doctored(tmp_path: Path, name: str, reason: str) -> Path:
    doc = json.loads(VECTORS.read_text(encoding="utf-8"))
    for c in doc["cases"]:
        if c["name"] == name:
            c["expect"] = {"reason": reason}
    path = tmp_path / "doctored.json"
    path.write_text(json.dumps(doc))
    return path


def test_cli_passes_on_the_vectors_without_a_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("DOORBELL_AGENT_CONFIG", str(tmp_path / "no-such-config.toml"))
    assert main(["conformance", str(VECTORS)]) == 0
    out = capsys.readouterr().out
    assert f"All {len(CASE_NAMES)} cases match" in out


def test_cli_fails_on_a_doctored_expectation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = doctored(tmp_path, "wrong-audience", "expired")
    assert main(["conformance", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("DIFFERS wrong-audience: expected expired, got wrong_audience")
    assert out[-1] == f"1 of {len(CASE_NAMES)} cases differ from the vectors."


def test_cli_json_lists_every_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = doctored(tmp_path, "expired-100s-ago", "not_yet_valid")
    assert main(["conformance", str(path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["cases"] == len(CASE_NAMES) and doc["differ"] == 1
    bad = [r for r in doc["results"] if not r["ok"]]
    assert bad == [{"name": "expired-100s-ago", "expected": "not_yet_valid", "got": "expired", "ok": False}]


def test_installed_command_exit_status(tmp_path: Path) -> None:
    """What CI and an agency engineer run: the console script's exit status."""
    path = doctored(tmp_path, "approval-asked", "declined_by_resident")
    proc = subprocess.run([sys.executable, "-m", "agent", "conformance", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "DIFFERS approval-asked" in proc.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("{not json", "is not JSON"), ('{"cases": 3}', "a vectors file is"), ('{"agent": {}, "cases": [], "trust": {"keys": [{}]}}', "trust store is invalid")],
)
def test_bad_vectors_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str) -> None:
    path = tmp_path / "v.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(VectorsError, match=message):
        run_vectors(path)
    assert main(["conformance", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_unusable_case_is_reported_not_raised(tmp_path: Path) -> None:
    doc = json.loads(VECTORS.read_text(encoding="utf-8"))
    del doc["cases"][0]["now"]
    doc["cases"][1]["agent"] = {"timezone": "Mars/Olympus"}
    path = tmp_path / "v.json"
    path.write_text(json.dumps(doc))
    results = run_vectors(path)
    assert [r.ok for r in results[:3]] == [False, False, True]
    assert "case not usable" in results[0].got and "time zone" in results[1].got
