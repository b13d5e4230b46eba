"""Storage: how many hours of footage one GB of card holds, from the recorder's own output.

For 720p and 1080p at 15 fps, ``STORAGE_S`` seconds (default 60) are recorded by the real recorder
(agent/buffer/recorder.py: libx264, the buffer's settings, 4-second fragmented MP4 segments, the
index) and the bytes it keeps are scaled to an hour. Reference, same run, same frames: ``ffmpeg -c:v
libx264`` with the same settings (ultrafast, zerolatency, a keyframe every second, no B-frames) into
one MP4. Ratio about 1 means the buffer costs no more than a plain encode; hours per GB (10^9 bytes,
as cards are sold) follow from our figure.

Two kinds of picture, because bitrate depends on what the camera sees far more than on anything else:

- ``synthetic``: the agent's own test pattern (agent/buffer/capture/synthetic.py): a scrolling
  background, one moving bar, a QR clock. Flat and clean: this is the LOW end, not a street scene.
- ``noisy``: ffmpeg's ``testsrc2`` (detailed, moving) with light temporal noise, like what is left of a
  small sensor's noise after the camera's own noise reduction (``noise=alls=4:allf=t``; STORAGE_NOISE
  sets the strength), handed to the recorder as a near-lossless MJPEG file that it decodes and
  re-encodes. Nearer to a real porch camera, but still not one: the buffer's libx264 has no bitrate
  cap (constant quality), so a noisier picture (night, gain up) costs much more. STORAGE_NOISE=12
  shows how much.

Run: ``.venv/bin/python -m tests.bench storage`` (``STORAGE_S=60`` by default).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from tests.bench.report import Report

FPS = 15
SECONDS = int(os.environ.get("STORAGE_S", "60"))
SIZES = ((1280, 720), (1920, 1080))
GB = 1e9
NOISE = int(os.environ.get("STORAGE_NOISE", "4"))  # ffmpeg noise filter strength, temporal
X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
        "-x264-params", f"keyint={FPS}:min-keyint=1:scenecut=0:bframes=0", "-an"]


def _record(source: object, data: Path, w: int, h: int) -> int:
    """Record ``source`` to its end with the real recorder; the bytes of the segments it kept."""
    from agent.buffer.recorder import Recorder
    from agent.buffer.segments import SegmentStore
    from agent.config import BufferConfig, CameraConfig

    store = SegmentStore(data / "buffer.sqlite", data / "segments")
    try:
        rec = Recorder(source, store, CameraConfig(width=w, height=h, fps=FPS, encoder="libx264"),  # type: ignore[arg-type]
                       BufferConfig(segment_seconds=4), status_file=data / "status.json", live=False)
        stats = rec.run()
        assert stats.frames_recorded == SECONDS * FPS, f"recorded {stats.frames_recorded} of {SECONDS * FPS} frames"
        return sum(r.bytes for r in store.all())
    finally:
        store.close()


def _ffmpeg(args: list[str], frames: object = None) -> None:
    proc = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args],
                            stdin=subprocess.PIPE if frames is not None else subprocess.DEVNULL)
    if frames is not None:
        assert proc.stdin is not None
        for img in frames:  # type: ignore[attr-defined]
            proc.stdin.write(img.tobytes())
        proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg failed: {args}")


def _synthetic(t: Path, w: int, h: int) -> tuple[int, int]:
    from agent.buffer.capture import Frame, SourceEnded
    from agent.buffer.capture.synthetic import SyntheticSource

    start_us = time.time_ns() // 1000 - SECONDS * 1_000_000  # recent: older footage is evicted at once
    total = SECONDS * FPS

    class Finite(SyntheticSource):
        def read(self) -> Frame:
            if self._index >= total:
                raise SourceEnded("done")
            return super().read()

    ours = _record(Finite(w, h, FPS, realtime=False, start_us=start_us), t / f"syn-{h}", w, h)
    src = SyntheticSource(w, h, FPS, realtime=False, start_us=start_us)
    frames = (src.draw(start_us + round(i * 1_000_000 / FPS)) for i in range(total))
    ref = t / f"syn-{h}.mp4"
    _ffmpeg(["-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}", "-r", str(FPS), "-i", "-", *X264, str(ref)], frames)
    return ours, ref.stat().st_size


def _noisy(t: Path, w: int, h: int) -> tuple[int, int]:
    from agent.buffer.capture.stream import StreamSource

    camera = t / f"noisy-{h}.mkv"
    _ffmpeg(["-f", "lavfi", "-i", f"testsrc2=s={w}x{h}:r={FPS}:d={SECONDS},noise=alls={NOISE}:allf=t",
             "-c:v", "mjpeg", "-q:v", "2", "-pix_fmt", "yuvj420p", str(camera)])
    ours = _record(StreamSource(str(camera), live=False, realtime=False, start_at="now"), t / f"noisy-{h}", w, h)
    ref = t / f"noisy-{h}.mp4"
    # The same pictures the recorder encodes: the file decoded to BGR (as the recorder's source does), piped.
    decode = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(camera), "-f", "rawvideo",
                               "-pix_fmt", "bgr24", "-"], stdout=subprocess.PIPE)
    encode = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24",
                             "-s", f"{w}x{h}", "-r", str(FPS), "-i", "-", *X264, str(ref)], stdin=decode.stdout)
    assert decode.stdout is not None
    decode.stdout.close()
    if decode.wait() != 0 or encode.returncode != 0:
        raise RuntimeError("ffmpeg reference failed")
    camera.unlink()
    return ours, ref.stat().st_size


def run(report: Report) -> None:
    per_hour = 3600 / SECONDS
    table = []
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        t = Path(tmp)
        for kind, measure in (("synthetic", _synthetic), ("noisy", _noisy)):
            for w, h in SIZES:
                ours, ref = measure(t, w, h)
                bph, ref_bph = ours * per_hour, ref * per_hour
                report(f"storage: MB per hour recorded, {h}p15 {kind}", bph / 1e6, ref_bph / 1e6, "MB/h",
                       "informational (about 1x ffmpeg)")
                table.append((f"{h}p15", kind, bph * 8 / 3600 / 1e3, bph / 1e6, GB / bph, bph * 24 / GB))
    print("\n  | picture | content | bitrate (kbit/s) | MB per hour | hours per GB | GB written per day |")
    print("  |---|---|---|---|---|---|")
    for res, kind, kbps, mbh, hpg, gbd in table:
        print(f"  | {res} | {kind} | {kbps:.0f} | {mbh:.0f} | {hpg:.2f} | {gbd:.1f} |")


if __name__ == "__main__":
    run(Report())
