"""Rolling-buffer benchmarks: 720p at 15 fps, each figure beside a reference from the same run.

1. CPU seconds per minute recorded (encode + mux + index), frames pre-drawn,
   vs ffmpeg encoding the same raw frames (libx264 ultrafast/zerolatency, -g 15,
   4 s segments). Goal <= 1.2x.
2. CPU per minute of H.264 stream copy (a file camera) vs ``ffmpeg -c copy -f segment``.
   Goal <= 1.5x.
3. Bytes written to disk by the recording process (/proc/self/io write_bytes)
   over bytes of video kept. Goal <= 1.05.
4. Segment finalize latency p99 (flush, fsync, hash, rename, index) vs writing
   and fsyncing the same bytes raw. Goal <= 50 ms.
5. Peak RSS of a process recording a realtime camera vs the same interpreter with
   the same libraries imported and idle. Goal <= 120 MB. Dropped frames: goal 0.

Each measurement runs in a child process, so its rusage and I/O are its own.
Run alone: ``.venv/bin/python -m tests.bench.bench_buffer``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.report import Report

W, H, FPS = 1280, 720, 15
VIDEO_S = 60
LIVE_S = int(os.environ.get("BENCH_LIVE_S", "20"))
DRAWN = 30  # distinct pre-drawn frames, cycled (drawing is not what is measured)
ROOT = Path(__file__).resolve().parents[2]



def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _peak_rss_kb() -> int:
    """VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _predrawn() -> list:  # noqa: ANN201
    from agent.buffer.capture.synthetic import SyntheticSource

    src = SyntheticSource(W, H, FPS, realtime=False, start_us=0)
    return [src.draw(round(i * 1_000_000 / FPS)) for i in range(DRAWN)]


class _Predrawn:
    """A camera replaying pre-drawn pictures at increasing capture times, as fast as asked."""

    kind = "raw"
    stream_template = None
    live = False

    def __init__(self, images: list, frames: int, start_us: int) -> None:  # noqa: ANN001
        self.images, self.frames, self.start_us = images, frames, start_us
        self.width, self.height, self.fps = W, H, float(FPS)
        self.i = 0

    def open(self) -> None:
        self.i = 0

    def read(self):  # noqa: ANN201
        from agent.buffer.capture import Frame, SourceEnded

        if self.i >= self.frames:
            raise SourceEnded("done")
        f = Frame(self.start_us + round(self.i * 1_000_000 / FPS), self.images[self.i % len(self.images)])
        self.i += 1
        return f

    def close(self) -> None:
        return None

    def describe(self) -> str:
        return "pre-drawn frames"


def _record(source, data: Path, *, live: bool | None = None) -> dict:  # noqa: ANN001
    from agent.buffer.recorder import Recorder
    from agent.buffer.segments import SegmentStore
    from agent.config import BufferConfig, CameraConfig

    store = SegmentStore(data / "buffer.sqlite", data / "segments")
    rec = Recorder(source, store, CameraConfig(width=W, height=H, fps=FPS, encoder="libx264"),
                   BufferConfig(segment_seconds=4), status_file=data / "status.json", live=live)
    cpu0, wb0, t0 = _cpu(), _write_bytes(), time.perf_counter()
    stats = rec.run()
    cpu, wb, wall = _cpu() - cpu0, _write_bytes() - wb0, time.perf_counter() - t0
    kept = sum(r.bytes for r in store.all())
    return {"cpu_s": cpu, "wall_s": wall, "write_bytes": wb, "kept_bytes": kept,
            "finalize_s": list(rec.finalize_latencies_s), "captured": stats.frames_captured,
            "dropped": stats.frames_dropped, "recorded": stats.frames_recorded,
            "segments": stats.segments_written, "maxrss_kb": _peak_rss_kb()}


def child(mode: str, data: str, extra: str = "") -> None:
    out: dict
    d = Path(data)
    now = time.time_ns() // 1000
    if mode == "encode":
        images = _predrawn()
        out = _record(_Predrawn(images, VIDEO_S * FPS, now - VIDEO_S * 1_000_000), d)
    elif mode == "copy":
        from agent.buffer.capture.factory import make_source
        from agent.config import CameraConfig

        src = make_source(CameraConfig(source="file", url=extra, width=W, height=H, fps=FPS), realtime=False)
        out = _record(src, d, live=False)
        out["source"] = src.describe()
    elif mode == "live":
        from agent.buffer.capture import SourceEnded
        from agent.buffer.capture.synthetic import SyntheticSource

        class Live(SyntheticSource):
            def read(self):  # noqa: ANN202
                if self._index >= LIVE_S * FPS:
                    raise SourceEnded("done")
                return super().read()

        out = _record(Live(W, H, FPS, realtime=True), d, live=True)
    elif mode == "idle":
        import av  # noqa: F401
        import cv2  # noqa: F401
        import numpy  # noqa: F401

        from agent.buffer import recorder, segments  # noqa: F401
        out = {"maxrss_kb": _peak_rss_kb()}
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


def _child(mode: str, data: Path, extra: str = "") -> dict:
    r = subprocess.run([sys.executable, "-m", "tests.bench.bench_buffer", "--child", mode, str(data), extra],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ffmpeg(args: list[str], stdin_frames: list | None = None, repeat: int = 0) -> float:  # noqa: ANN001
    """Run ffmpeg, feeding raw frames if given; its CPU seconds from wait4."""
    proc = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args],
                            stdin=subprocess.PIPE if stdin_frames is not None else subprocess.DEVNULL)
    if stdin_frames is not None:
        assert proc.stdin is not None
        for i in range(repeat):
            proc.stdin.write(stdin_frames[i % len(stdin_frames)].tobytes())
        proc.stdin.close()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {args}")
    return ru.ru_utime + ru.ru_stime


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))] if s else float("nan")


def _raw_write_latency(sizes: list[int], where: Path) -> list[float]:
    """The floor: write the same number of bytes to a new file, fsync, rename, fsync the directory."""
    out = []
    where.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        blob = os.urandom(n)
        part, final = where / f"{i}.bin.part", where / f"{i}.bin"
        t0 = time.perf_counter()
        with open(part, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, final)
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        out.append(time.perf_counter() - t0)
    return out


def run(report: Report) -> None:
    per_min = 60 / VIDEO_S
    with tempfile.TemporaryDirectory(prefix="bench-buffer-") as tmp:
        t = Path(tmp)
        raw_args = ["-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{W}x{H}", "-r", str(FPS), "-i", "-"]
        enc_args = ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(FPS)]
        images = _predrawn()
        # (1) encode path
        ours = _child("encode", t / "ours-encode")
        (t / "ff-encode").mkdir()
        ref_cpu = _ffmpeg([*raw_args, *enc_args, "-f", "segment", "-segment_time", "4",
                           str(t / "ff-encode" / "%04d.mp4")], images, VIDEO_S * FPS)
        report("buffer: CPU s per minute recorded, encode (720p15)", ours["cpu_s"] * per_min, ref_cpu * per_min,
               "s", "<= 1.2x ffmpeg")
        # (3) bytes written over bytes kept
        report("buffer: bytes written to disk / video bytes kept", ours["write_bytes"] / ours["kept_bytes"], 1.0,
               "ratio", "<= 1.05")
        # (4) finalize latency
        sizes = [ours["kept_bytes"] // max(1, ours["segments"])] * len(ours["finalize_s"])
        raw = _raw_write_latency(sizes, t / "raw-write")
        report("buffer: segment finalize latency p99", _p99(ours["finalize_s"]) * 1000, _p99(raw) * 1000, "ms",
               "<= 50 ms")
        # (2) stream copy path, from an H.264 file camera
        source = t / "camera.mp4"
        _ffmpeg([*raw_args, *enc_args, "-bf", "0", str(source)], images, VIDEO_S * FPS)
        del images
        copy = _child("copy", t / "ours-copy", str(source))
        (t / "ff-copy").mkdir()
        ref_copy = _ffmpeg(["-i", str(source), "-c", "copy", "-f", "segment", "-segment_time", "4",
                            str(t / "ff-copy" / "%04d.mp4")])
        report(f"buffer: CPU s per minute, stream copy ({copy['source']})", copy["cpu_s"] * per_min,
               ref_copy * per_min, "s", "<= 1.5x ffmpeg -c copy")
        report("buffer: bytes written / kept, stream copy", copy["write_bytes"] / copy["kept_bytes"], 1.0, "ratio",
               "<= 1.05")
        # (5) realtime camera: peak RSS and dropped frames
        live = _child("live", t / "ours-live")
        idle = _child("idle", t / "idle")
        report(f"buffer: peak RSS recording a realtime 720p15 camera ({LIVE_S} s)", live["maxrss_kb"] / 1024,
               idle["maxrss_kb"] / 1024, "MB", "<= 120 MB")
        report("buffer: dropped frames, realtime camera", live["dropped"], live["captured"], "frames", "0")
        report("buffer: segment finalize latency p99, realtime camera", _p99(live["finalize_s"]) * 1000,
               _p99(raw) * 1000, "ms", "<= 50 ms")
        shutil.rmtree(t, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
    else:
        run(Report())
