"""``doorbell-agent run`` and ``status`` as a homeowner uses them, including bad input."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.buffer.segments import SegmentStore
from agent.cli import main
from agent.fsutil import write_json_atomic
from tests.buffer_helpers import now_us, write_segment

ROOT = Path(__file__).resolve().parents[1]
CAMERA = """
[camera]
source = "synthetic"
width = 320
height = 240
fps = 15

[buffer]
segment_seconds = 1
"""


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_status_while_run_is_recording_then_after_it_stops(write_config, capsys, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = write_config(CAMERA)
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    status_file = tmp_path / "data" / "recorder-status.json"
    try:
        wait_for(lambda: len(list((tmp_path / "data" / "segments").rglob("*.mp4"))) >= 2, 30, "two segments")
        wait_for(lambda: status_file.exists() and json.loads(status_file.read_text())["frames_recorded"] > 0,
                 10, "the status file")
        code, out, _ = cli(capsys, "--config", str(cfg), "status")
        assert code == 0
        assert f"Recorder: running (pid {proc.pid})" in out and "camera recording" in out
        assert "synthetic test pattern 320x240" in out and "dropped 0 (0.00%)" in out
        assert "Footage: " in out and "segments" in out
        code, out, _ = cli(capsys, "--config", str(cfg), "status", "--json")
        data = json.loads(out)
        assert data["recorder"]["running"] is True and data["recorder"]["stale"] is False
        assert data["recorder"]["status"]["pid"] == proc.pid
        assert data["buffer"]["segments"] >= 2 and data["buffer"]["bytes"] > 0
        # A second recorder on the same buffer is refused, in plain words.
        code, _, err = cli(capsys, "--config", str(cfg), "run")
        assert code == 2 and "already recording" in err
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "camera: synthetic test pattern 320x240 at 15 fps" in stderr
    assert f"footage goes to {tmp_path / 'data' / 'segments'}" in stderr
    code, out, _ = cli(capsys, "--config", str(cfg), "status")
    assert "Recorder: NOT RUNNING" in out and "doorbell-agent run" in out
    data = json.loads(cli(capsys, "--config", str(cfg), "status", "--json")[1])
    assert data["recorder"]["running"] is False and data["recorder"]["status"]["camera_state"] == "stopped"
    store = SegmentStore(tmp_path / "data" / "buffer.sqlite", tmp_path / "data" / "segments")
    assert data["buffer"]["segments"] == len(store.all())
    store.close()


def test_status_says_stale_when_a_running_recorder_stops_reporting(write_config, capsys, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = write_config(CAMERA)
    data = tmp_path / "data"
    data.mkdir()
    t = now_us()
    write_json_atomic(data / "recorder-status.json", {
        "pid": 4242, "updated_us": t - 60_000_000, "status_interval_s": 2.0, "camera": "synthetic test pattern",
        "camera_state": "reconnecting", "mode": "encode", "codec": "libx264", "frames_captured": 1000,
        "frames_dropped": 10, "reconnects": 3, "fps": 0.0, "last_error": "camera unavailable: no such device",
        "last_error_us": t - 61_000_000,
    })
    store = SegmentStore(data / "buffer.sqlite", data / "segments")
    a = write_segment(store.new_segment_path(t - 30_000_000), t - 30_000_000, 15)
    store.add(a)
    store.add_gap(a.end_us, a.end_us + 5_000_000, "camera unavailable (no such device)")
    store.close()
    fd = os.open(data / "recorder.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # someone holds the recorder lock but has not written status for a minute
    try:
        code, out, _ = cli(capsys, "--config", str(cfg), "status")
        js = json.loads(cli(capsys, "--config", str(cfg), "status", "--json")[1])
    finally:
        os.close(fd)
    assert code == 0 and "STALE" in out and "may be stuck" in out
    assert "dropped 10 (1.00%)" in out and "reconnects 3" in out
    assert "Last problem: camera unavailable: no such device" in out
    assert "Gaps (1):" in out and "(5.0 s): camera unavailable (no such device)" in out
    assert js["recorder"]["stale"] is True and js["recorder"]["running"] is True
    assert js["buffer"]["gaps"][0]["reason"] == "camera unavailable (no such device)"


def test_status_with_nothing_recorded_yet(write_config, capsys) -> None:  # noqa: ANN001
    cfg = write_config(CAMERA)
    code, out, _ = cli(capsys, "--config", str(cfg), "status")
    assert code == 0 and "NOT RUNNING" in out and "Footage: none stored yet." in out


def test_bad_cli_input_gets_a_clear_error(write_config, capsys, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = write_config(CAMERA)
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(cfg), "status", "--jsn"])
    assert exc.value.code == 2 and "unrecognized arguments: --jsn" in capsys.readouterr().err
    code, _, err = cli(capsys, "--config", str(tmp_path / "missing.toml"), "run")
    assert code == 2 and "does not exist" in err
    bad = write_config('[camera]\nsource = "rtsp"\n')
    code, _, err = cli(capsys, "--config", str(bad), "run")
    assert code == 2 and "camera.url" in err
    bad = write_config('[buffer]\nsegment_seconds = 0\n')
    code, _, err = cli(capsys, "--config", str(bad), "status")
    assert code == 2 and "buffer.segment_seconds" in err
