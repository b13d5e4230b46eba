"""Agency-supplied text shown to the resident: what could reorder, hide or split it becomes a visible escape."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import load_config
from agent.display import safe_text
from agent.state.accesslog import AccessLog


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("case 2026-\u202eexe.txt", "case 2026-\\u202eexe.txt"),  # right-to-left override (Cf)
        ("\u2066jackson-pd\u2069", "\\u2066jackson-pd\\u2069"),  # bidi isolates (Cf)
        ("Det.\u200bAlvarez", "Det.\\u200bAlvarez"),  # zero-width space (Cf)
        ("\ufeffcase", "\\ufeffcase"),  # byte-order mark / zero-width no-break space (Cf)
        ("a\u00adb", "a\\u00adb"),  # soft hyphen (Cf): invisible in most terminals
        ("line\nGRANTED", "line\\nGRANTED"),  # control (Cc): a fake second line
        ("tab\there\r", "tab\\there\\r"),
        ("\x1b[2Jcleared", "\\u001b[2Jcleared"),  # a terminal escape sequence
        ("\x85next", "\\u0085next"),  # C1 control
        ("para\u2029graph", "para\\u2029graph"),  # paragraph separator (Zp)
        ("line\u2028sep", "line\\u2028sep"),  # line separator (Zl)
        ("\ue000private", "\\ue000private"),  # private use (Co)
        ("lone \ud800", "lone \\ud800"),  # lone surrogate (Cs)
        ("tag\U000e0041", "tag\\U000e0041"),  # tag character (Cf), outside the BMP
        ("\U0010fffe", "\\U0010fffe"),  # a noncharacter (Cn)
        ("C:\\u202e", "C:\\\\u202e"),  # a typed backslash cannot pass for one of our escapes
    ],
)
def test_invisible_or_reordering_characters_are_escaped(raw: str, shown: str) -> None:
    assert safe_text(raw) == shown
    assert safe_text(raw).isprintable()


@pytest.mark.parametrize(
    "text",
    ["jackson-pd", "Det. R. Alvarez", "Package theft reported on Elm Street", "Peña, José", "Zoë Müller",
     "Ο Γιώργος", "محمد", "警察署", "emoji 🚓", "non\u00a0breaking", ""],
)
def test_ordinary_text_is_shown_as_it_is(text: str) -> None:
    assert safe_text(text) == text


def test_non_strings_are_shown_through_str() -> None:
    assert safe_text(None) == "None" and safe_text(12) == "12"


def test_log_show_escapes_agency_text_and_json_keeps_it(write_config: Callable[[str], Path]) -> None:
    """`log show` run as the resident runs it: a right-to-left override in a case number stays visible."""
    config = write_config('[policy]\nprogram = "p"\nlocation = { lat = 32.3, lon = -90.2 }\ntimezone = "America/Chicago"\n'
                          "[policy.consent]\nstart = 2026-01-01T00:00:00Z\nend = 2030-01-01T00:00:00Z\n")
    db = load_config(config).paths.state_db
    db.parent.mkdir(parents=True, exist_ok=True)
    now = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
    with AccessLog(db) as log:
        log.append(
            jti="req-0001-rlo-aaaaaaaa", iss="jackson-pd", sub="Det.\u200bAlvarez", case="JPD-\u202e4321",
            purpose="Burglary\nreq-0002 GRANTED by you", area={"lat": 32.3, "lon": -90.2, "radius_m": 300},
            requested=(now - timedelta(hours=2), now - timedelta(hours=1)), reason="outside_geofence",
            kids=["jpd-2026a"], basis="warrant", warrant={"ref": "W-\u2066-1", "court": "Hinds\u00a0County"}, at=now,
        )  # fmt: skip
    run = [sys.executable, "-m", "agent", "--config", str(config), "log", "show"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "officer Det.\\u200bAlvarez, case JPD-\\u202e4321: refused" in out.stdout
    assert "      purpose: Burglary\\nreq-0002 GRANTED by you\n" in out.stdout  # one line, not a forged second one
    assert "warrant W-\\u2066-1 (Hinds\u00a0County)" in out.stdout  # a no-break space is ordinary text
    assert not any(c in out.stdout for c in "\u200b\u202e\u2066")

    data = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60).stdout)
    entry = data["entries"][0]["entry"]
    assert entry["case"] == "JPD-\u202e4321" and entry["purpose"] == "Burglary\nreq-0002 GRANTED by you"


def test_a_spreadsheet_export_runs_no_formula_and_shows_hidden_characters() -> None:
    """A purpose of ``=HYPERLINK(...)`` must reach the resident's spreadsheet as text, not as a live formula."""
    from agent.display import spreadsheet_cell

    assert spreadsheet_cell("=HYPERLINK(\"http://x\",\"click\")") == "'=HYPERLINK(\"http://x\",\"click\")"
    for lead in "+-@":
        assert spreadsheet_cell(lead + "1") == "'" + lead + "1"
    assert spreadsheet_cell("case 12\u202etxt") == "case 12\\u202etxt"
    assert spreadsheet_cell(300800) == 300800 and spreadsheet_cell(None) == ""
