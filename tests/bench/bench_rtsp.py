"""Recording a real RTSP camera by stream copy: the agent beside FFmpeg doing the same job.

The camera is GStreamer's RTSP server (tests/rtsp_server.py, 720p15 H.264, a
keyframe a second), fed live synthetic frames. Two clients watch the same
shared stream at the same time for ``BENCH_RTSP_S`` seconds (default 30):

- ``doorbell-agent run`` with ``camera.source = "rtsp"`` (recording only), and
- ``ffmpeg -rtsp_transport tcp -i URL -c copy -f segment -segment_time 4``,
  the least any stream-copy recorder into 4-second files can cost.

The agent runs with ``[web] enabled = false``: the figures are the recorder's.
Figures: CPU time per second of video (user + system, from /proc) and peak RSS
(VmHWM) of each, the agent's beside FFmpeg's as a ratio. The camera itself (the
server and the frame feeder) is not counted.

Needs Debian's GStreamer RTSP server (install.sh --dev); says so and measures
nothing without it. Run alone: ``.venv/bin/python -m tests.bench rtsp``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.report import Report

W, H, FPS = 1280, 720, 15
RECORD_S = int(os.environ.get("BENCH_RTSP_S", "30"))
ROOT = Path(__file__).resolve().parents[2]
TICK = os.sysconf("SC_CLK_TCK")


def _agent() -> list[str]:
    script = Path(sys.executable).with_name("doorbell-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent"]


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process (None once it has been reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)


def _hwm_kb(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def run(report: Report) -> None:
    from tests.test_rtsp_camera import RtspCamera, gst_rtsp_missing

    missing = gst_rtsp_missing()
    if missing:
        print(f"  skipped: {missing}")
        return
    with tempfile.TemporaryDirectory(prefix="bench-rtsp-") as tmp:
        t = Path(tmp)
        camera = RtspCamera(t / "sent.txt", width=W, height=H, fps=FPS)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            config = t / "agent.toml"
            config.write_text(f'[paths]\ndata_dir = "{t / "agent"}"\n\n[camera]\nsource = "rtsp"\nurl = "{camera.url}"\n'
                              f"width = {W}\nheight = {H}\nfps = {FPS}\n\n[buffer]\nsegment_seconds = 4\n\n"
                              "[web]\nenabled = false\n")
            (t / "ffmpeg").mkdir()
            procs["agent"] = subprocess.Popen([*_agent(), "--config", str(config), "run"], cwd=ROOT,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs["ffmpeg"] = subprocess.Popen(
                ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-rtsp_transport", "tcp", "-i", camera.url,
                 "-c", "copy", "-f", "segment", "-segment_time", "4", "-reset_timestamps", "1",
                 str(t / "ffmpeg" / "seg%05d.mp4")],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            # Both connect and probe the stream first; measure from when both are receiving.
            time.sleep(5)
            start = {name: _cpu_s(p.pid) or 0.0 for name, p in procs.items()}
            status_file = t / "agent" / "recorder-status.json"
            early = json.loads(status_file.read_text()) if status_file.exists() else {}
            t0 = time.monotonic()
            peak = dict.fromkeys(procs, 0)
            while time.monotonic() - t0 < RECORD_S:
                for name, p in procs.items():
                    if p.poll() is not None:
                        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                        raise RuntimeError(f"{name} stopped early ({p.returncode}): {err[-2000:]}")
                    peak[name] = max(peak[name], _hwm_kb(p.pid) or 0)
                time.sleep(0.2)
            elapsed = time.monotonic() - t0
            cpu = {name: (_cpu_s(p.pid) or 0.0) - start[name] for name, p in procs.items()}
            for name, p in procs.items():
                peak[name] = max(peak[name], _hwm_kb(p.pid) or 0)
                p.send_signal(signal.SIGTERM if name == "agent" else signal.SIGINT)
            for p in procs.values():
                p.wait(timeout=30)
            agent_err = procs["agent"].stderr.read().decode(errors="replace") if procs["agent"].stderr else ""
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
            camera.stop()
        status = json.loads((t / "agent" / "recorder-status.json").read_text())
        if status.get("mode") != "stream copy" or not status.get("segments_written"):
            raise RuntimeError(f"the agent did not record by stream copy: {status}")
        # Why frames were dropped, if any were: the agent's own warnings say.
        for line in [x for x in agent_err.splitlines() if "drop" in x or "clock went back" in x][:5]:
            print(f"  agent: {line[:200]}")
        ffmpeg_segments = len(list((t / "ffmpeg").glob("seg*.mp4")))
        report(f"rtsp: CPU per second of 720p15 video, `run` stream copy ({RECORD_S} s)",
               100 * cpu["agent"] / elapsed, 100 * cpu["ffmpeg"] / elapsed, "% core", "near ffmpeg -c copy (ref)")
        report("rtsp: peak RSS of `run` recording RTSP by stream copy", peak["agent"] / 1024, peak["ffmpeg"] / 1024,
               "MB", "<= 60 MB (ref: ffmpeg -c copy -f segment)")
        report("rtsp: segments written, `run` beside ffmpeg", status["segments_written"], ffmpeg_segments,
               "files", "about 1 (same 4 s segments)")
        print(f"  frames dropped in the first seconds (connecting): {early.get('frames_dropped', '?')} of "
              f"{early.get('frames_captured', '?')} (status written every 5 s, so possibly before that)")
        report("rtsp: frames dropped by `run` beside frames captured", status["frames_dropped"],
               status["frames_captured"], "frames", "0")


if __name__ == "__main__":
    run(Report())
