"""The README's first command: the demo must run end to end and say that everything checked out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_chain(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "agent", "demo", "--seconds", "7", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "Demo finished: everything checked out." in out
    assert "Log chain check: intact." in out
    clips = list((tmp_path / "delivered").glob("*.mp4"))
    assert len(clips) == 1 and clips[0].stat().st_size > 0
    assert "Traceback" not in run.stderr


def test_demo_refuses_a_too_short_recording(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "agent", "demo", "--seconds", "2", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--seconds must be at least 6" in run.stderr
