"""`doorbell-agent killswitch on --wipe`: the switch first, then every stored minute erased, on the record.

What a resident would check: after the wipe no footage is left, the access log is still there (with
the wipe in it), and the kill switch is on. What the maintainer checks: a wipe while `run` records (a
real recorder writing real H.264 in this process) leaves an index whose every row has its file and
whose every file is indexed, and the recorder goes on recording.
"""

from __future__ import annotations

import builtins
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.buffer.recorder import Recorder
from agent.buffer.segments import SegmentStore
from agent.cli import main
from agent.config import AgentConfig, BufferConfig, CameraConfig, load_config
from agent.runtime.supervisor import _take_lock, lock_path
from agent.state.accesslog import AccessLog
from agent.state.killswitch import KillSwitch
from tests.buffer_helpers import FPS, FiniteSynthetic, H, W, now_us, packet_count, write_segment

CAMERA = CameraConfig(source="synthetic", width=W, height=H, fps=FPS)


@pytest.fixture
def config(write_config: Callable[[str], Path]) -> Path:
    return write_config("[buffer]\nsegment_seconds = 1\n")


def fill(cfg: AgentConfig, n: int = 5) -> int:
    """``n`` one-second segments of real H.264 ending a minute ago; returns their bytes."""
    store = SegmentStore.from_config(cfg)
    total = 0
    try:
        start = now_us() - 60_000_000 - n * 1_000_000
        for i in range(n):
            s = start + i * 1_000_000
            total += store.add(write_segment(store.new_segment_path(s), s, FPS)).bytes
    finally:
        store.close()
    return total


def footage_files(cfg: AgentConfig) -> list[Path]:
    return sorted(p for p in cfg.paths.segments_dir.rglob("*") if p.is_file())


def resident_changes(cfg: AgentConfig) -> list[tuple[str, dict]]:
    with AccessLog(cfg.paths.state_db) as alog:
        return [(e.outcome, e.data) for e in alog.entries() if e.type == "resident"]


def test_wipe_erases_footage_keeps_the_log_and_records_it(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(config)
    main(["--config", str(config), "killswitch", "off"])  # something already in the log, which must stay
    size = fill(cfg)
    assert len(footage_files(cfg)) == 5
    assert main(["--config", str(config), "killswitch", "on", "--wipe", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "Erased 5 footage file(s)" in out and "Your access log was kept." in out
    assert footage_files(cfg) == []
    store = SegmentStore.from_config(cfg)
    try:
        assert store.all() == [] and [g.reason for g in store.gaps()] == ["erased by you (killswitch on --wipe)"]
    finally:
        store.close()
    assert KillSwitch(cfg.paths.killswitch_file).engaged
    changes = resident_changes(cfg)
    assert [c for c, _ in changes] == ["killswitch_off", "killswitch_on", "buffer_wiped"]  # the switch first
    assert changes[-1][1]["segments"] == 5 and changes[-1][1]["bytes"] == size
    assert main(["--config", str(config), "log", "verify"]) == 0
    assert main(["--config", str(config), "log", "show"]) == 0
    assert "you erased the stored footage (segments 5" in capsys.readouterr().out


def test_wipe_asks_first_and_the_switch_is_on_whatever_the_answer(
        config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(config)
    fill(cfg, 2)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    asked: list[str] = []

    def answer(prompt: str) -> str:
        asked.append(prompt)
        assert KillSwitch(cfg.paths.killswitch_file).engaged  # engaged before the question
        return "no"

    monkeypatch.setattr(builtins, "input", answer)
    assert main(["--config", str(config), "killswitch", "on", "--wipe"]) == 0
    assert asked == ["Type yes to erase the footage: "]
    assert "Not erased" in capsys.readouterr().out
    assert len(footage_files(cfg)) == 2
    monkeypatch.setattr(builtins, "input", lambda _prompt: "yes")
    assert main(["--config", str(config), "killswitch", "on", "--wipe"]) == 0
    assert footage_files(cfg) == []


def test_wipe_without_a_terminal_needs_yes(config: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(config)
    fill(cfg, 2)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["--config", str(config), "killswitch", "on", "--wipe"]) != 0
    err = capsys.readouterr().err
    assert "the kill switch is ON, but no footage was erased" in err and "--yes" in err
    assert KillSwitch(cfg.paths.killswitch_file).engaged and len(footage_files(cfg)) == 2
    assert main(["--config", str(config), "killswitch", "off", "--wipe"]) != 0
    assert "--wipe goes with 'on' only" in capsys.readouterr().err


def test_wipe_while_the_recorder_writes_keeps_the_index_whole(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(config)
    fill(cfg, 3)
    store = SegmentStore.from_config(cfg)  # the recorder's own connection, as in `run`
    segments = threading.Semaphore(0)
    rec = Recorder(FiniteSynthetic(100_000, start_us=None, realtime=True), store, CAMERA,  # type: ignore[arg-type]
                   BufferConfig(segment_seconds=1), on_segment=lambda _r: segments.release())
    lock = _take_lock(lock_path(cfg))  # as `run` holds it: the wipe knows a recorder is at work
    rec.start()
    try:
        for _ in range(3):
            assert segments.acquire(timeout=15)
        wiped_at = now_us()
        assert main(["--config", str(config), "killswitch", "on", "--wipe", "--yes", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)["wipe"]
        assert result["recorder_running"] is True and result["segments"] >= 6 and result["problems"] == []
        for _ in range(2):  # it goes on recording
            assert segments.acquire(timeout=15)
    finally:
        rec.stop()
        assert rec.wait(15)
        os.close(lock)
    assert rec.error is None
    rows = store.all()
    store.close()
    # Only what was being written at the wipe (one segment at most) and what came after is left.
    assert len(rows) >= 2 and all(r.start_us > wiped_at - 1_500_000 for r in rows)
    for r in rows:  # every row has its file, and the file is whole
        assert r.path.is_file() and packet_count(r.path)[1]
    indexed = {r.path for r in rows}
    assert set(footage_files(cfg)) == indexed  # and every file is indexed: nothing left over, nothing lost
    again = SegmentStore.from_config(cfg)
    try:
        report = again.reconcile()
        assert not report.dropped_rows and not report.indexed_orphans and not report.removed_orphans
    finally:
        again.close()
    assert [c for c, _ in resident_changes(cfg)] == ["killswitch_on", "buffer_wiped"]


def test_killswitch_without_wipe_loads_no_video_library(config: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from agent.cli import main; main(['--config', sys.argv[1], 'killswitch', 'on']); "
            "print(sorted(m for m in ('av', 'cv2', 'numpy', 'agent.buffer.segments') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
