"""hardware/pi-check, the resident's camera check: it runs, and its verdicts are right on known input."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import av
import pytest

from agent.buffer.capture import EncodedPacket
from tests.test_sources import _annexb_access_units, _pictures

SCRIPT = Path(__file__).resolve().parents[1] / "hardware" / "pi-check"


def load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("pi_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("pi_check", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_pi_check_runs_on_the_test_pattern() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--source", "synthetic", "--seconds", "1.5"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS  frame spacing" in out.stdout and "colours of a raw frame" in out.stdout


def packets(units: list[tuple[bytes, bool]], start_us: int, fps: float) -> list[tuple[int, EncodedPacket]]:
    items = []
    for i, (data, key) in enumerate(units):
        us = start_us + round(i * 1_000_000 / fps)
        items.append((us + 20_000, EncodedPacket(us, av.Packet(data), key)))
    return items


def test_pi_check_verdicts_on_real_h264(capsys: pytest.CaptureFixture[str]) -> None:
    pc = load()
    units = _annexb_access_units(_pictures(16))  # keyint 5 at 10 fps: keyframes 0.5 s apart, SPS/PPS in each
    pc.failures = 0
    pc.analyse(packets(units, 1_750_000_000_000_000, 10), 10, 0.5)
    out = capsys.readouterr().out
    assert "PASS  keyframe spacing" in out and "PASS  SPS/PPS in every keyframe" in out and pc.failures == 0
    # Keyframes further apart than configured, and one without its parameter sets: both fail.
    stripped = [(d if i != 5 else d[d.find(b"\x00\x00\x01\x65") - 1:], k) for i, (d, k) in enumerate(units)]
    pc.failures = 0
    pc.analyse(packets(stripped, 1_750_000_000_000_000, 10), 10, 0.25)
    out = capsys.readouterr().out
    assert "FAIL  keyframe spacing" in out and "FAIL  SPS/PPS in every keyframe: 1 of" in out
