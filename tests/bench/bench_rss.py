"""What the agent costs the Pi while it runs, and what a resident waits for.

1. Peak RSS (VmHWM) of ``doorbell-agent run``, a real process with its own
   configuration, recording a 720p15 H.264 camera by stream copy, beside the
   bare interpreter with PyAV imported (the least any recorder needs).
   Goal <= 60 MB. The camera is a video file read in real time (``source =
   "file"``): the same stream-copy path as an RTSP doorbell, without a server.
2. The same for the encode path (synthetic camera, 720p15, libx264), beside the
   same reference. Goal <= 120 MB. Dropped frames beside frames captured: goal 0.
3. Start-up time of ``doorbell-agent killswitch status`` beside ``python -c pass``
   (median of several runs): what a resident waits for when checking or pressing
   the kill switch.

Recording only (no ``[policy]``/``[mqtt]``): the figures are the recorder's.
Run alone: ``.venv/bin/python -m tests.bench rss``; ``BENCH_RSS_S`` sets how long
each recording runs (default 30 s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.report import Report

W, H, FPS = 1280, 720, 15
RECORD_S = int(os.environ.get("BENCH_RSS_S", "30"))
STARTUP_RUNS = 15
ROOT = Path(__file__).resolve().parents[2]

REFERENCE = "import re, av; print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"


def _agent() -> list[str]:
    """The installed console script, as a resident runs it (``python -m agent`` if there is none)."""
    script = Path(sys.executable).with_name("doorbell-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent"]


def _hwm_kb(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None  # a zombie has no memory lines


def _config(tmp: Path, name: str, camera: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(f'[paths]\ndata_dir = "{tmp / name}"\n\n[camera]\n{camera}\n'
                    f"width = {W}\nheight = {H}\nfps = {FPS}\n\n[buffer]\nsegment_seconds = 4\n")
    return path


def _peak_rss_of_run(config: Path, seconds: float) -> tuple[int, dict]:
    """Run ``doorbell-agent run`` for ``seconds``, stop it with SIGTERM; (its VmHWM in kB, its last status)."""
    proc = subprocess.Popen([*_agent(), "--config", str(config), "run"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            peak = max(peak, _hwm_kb(proc.pid) or 0)
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        # Finishing the last segment counts too: VmHWM only grows, so the last reading is the peak.
        while proc.poll() is None:
            peak = max(peak, _hwm_kb(proc.pid) or 0)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"doorbell-agent run failed ({proc.returncode}): {err[-2000:]}")
    status = json.loads((config.parent / config.stem / "recorder-status.json").read_text())
    if not status.get("segments_written"):
        raise RuntimeError(f"doorbell-agent run recorded nothing: {status}")
    return peak, status


def _reference_kb() -> int:
    """VmHWM of the bare interpreter with PyAV imported (the smallest of three runs)."""
    return min(int(subprocess.run([sys.executable, "-c", REFERENCE], capture_output=True, text=True,
                                  check=True).stdout) for _ in range(3))


def _median_wall_s(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _camera_file(path: Path, seconds: int) -> None:
    """A doorbell's H.264: no B-frames, a keyframe a second, 720p15 (what the agent stores as it is)."""
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate={FPS}", "-t", str(seconds),
                    "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(FPS), "-bf", "0",
                    "-pix_fmt", "yuv420p", str(path)], check=True)


def run(report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        t = Path(tmp)
        reference = _reference_kb() / 1024
        # (1) stream copy: the file is longer than the recording, so the camera never "ends"
        video = t / "camera.mp4"
        _camera_file(video, RECORD_S + 30)
        copy_kb, copy = _peak_rss_of_run(_config(t, "copy", f'source = "file"\nurl = "{video}"'), RECORD_S)
        if copy.get("mode") != "stream copy":
            raise RuntimeError(f"expected a stream copy, the recorder says {copy.get('mode')!r}")
        report(f"rss: peak RSS of `run`, 720p15 H.264 by stream copy ({RECORD_S} s)", copy_kb / 1024, reference,
               "MB", "<= 60 MB (ref: python + import av)")
        # (2) encode path
        enc_kb, enc = _peak_rss_of_run(_config(t, "encode", 'source = "synthetic"\nencoder = "libx264"'), RECORD_S)
        report(f"rss: peak RSS of `run`, synthetic 720p15 encoded ({RECORD_S} s)", enc_kb / 1024, reference,
               "MB", "<= 120 MB (ref: python + import av)")
        report("rss: dropped frames, synthetic 720p15 encoded", enc["frames_dropped"], enc["frames_captured"],
               "frames", "0")
        # (3) start-up time of the kill switch
        ks_config = _config(t, "killswitch", 'source = "synthetic"')
        ours = _median_wall_s([*_agent(), "--config", str(ks_config), "killswitch", "status"], STARTUP_RUNS)
        bare = _median_wall_s([sys.executable, "-c", "pass"], STARTUP_RUNS)
        report("rss: start-up of `doorbell-agent killswitch status` (median)", ours * 1000, bare * 1000, "ms",
               "no video library loaded (ref: python -c pass)")
        shutil.rmtree(t, ignore_errors=True)


if __name__ == "__main__":
    run(Report())
