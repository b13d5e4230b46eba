"""A 60-second exact clip at 720p/15 fps from the rolling buffer, against ffmpeg making the same cut.

Ours: :func:`agent.buffer.clips.cut_clip` (copies whole keyframe groups, re-encodes
only the two groups straddling the window's edges).

Reference: the fastest frame-exact cut we know with the ffmpeg CLI: the concat
demuxer over the window's segments, input-side ``-ss``/``-t`` (accurate seek,
on by default when transcoding), re-encoded with the recorder's own x264
options (ultrafast, zerolatency, no B-frames). Stream copy (``-c copy``) is
not a reference: it cannot cut between keyframes, so it is not exact. Both
outputs are checked to hold the same number of frames.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import av

from agent.buffer.clips import cut_clip
from agent.buffer.segments import SegmentStore
from tests.bench.report import Report
from tests.clipfixtures import BASE_US, record_buffer, record_foreign_buffer

ROUNDS = 3


def _frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for p in c.demux(c.streams.video[0]) if p.size)


def run(report: Report) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-clip-"))
    try:
        print("  recording 72 s of 1280x720 at 15 fps into 4 s segments ...", flush=True)
        record_buffer(tmp / "data", seconds=72, gap_s=None, width=1280, height=720)
        _measure(report, tmp, "clip: 60 s exact cut, 720p15, own footage (median wall time)")
        print("  recording 72 s of camera-encoded 1280x720 (High profile, stream copy) ...", flush=True)
        shutil.rmtree(tmp / "data")
        record_foreign_buffer(tmp / "data", seconds=72, width=1280, height=720)
        _measure(report, tmp, "clip: 60 s exact cut, 720p15, RTSP-style footage")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(report: Report, tmp: Path, name: str) -> None:
    start_us, end_us = BASE_US + 3_500_000, BASE_US + 63_500_000  # mid-group to mid-group
    store = SegmentStore(tmp / "data" / "buffer.sqlite", tmp / "data" / "segments")
    segs = store.overlapping(start_us, end_us)
    store.close()
    listing = tmp / "list.txt"
    listing.write_text("".join(f"file '{s.path}'\n" for s in segs))
    offset_s = (start_us - segs[0].start_us) / 1e6
    ref_cmd = ["ffmpeg", "-v", "error", "-y", "-ss", f"{offset_s:.6f}", "-t", "60", "-f", "concat", "-safe", "0",
               "-i", str(listing), "-an", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
               "-x264-params", "keyint=15:min-keyint=1:scenecut=0:bframes=0", str(tmp / "ref.mp4")]
    ours_t, ref_t = [], []
    info = None
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        info = cut_clip(segs, start_us, end_us, tmp / "ours.mp4")
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(ref_cmd, check=True, timeout=600)
        ref_t.append(time.perf_counter() - t0)
    assert info is not None
    ref_frames = _frames(tmp / "ref.mp4")
    print(f"  ours: {info.frames} frames ({info.copied_frames} copied, {info.reencoded_frames} re-encoded, "
          f"mode {info.mode}), {info.bytes / 1e6:.1f} MB; ffmpeg: {ref_frames} frames", flush=True)
    if ref_frames != info.frames:
        print(f"  NOTE: ffmpeg's cut holds {ref_frames} frames, ours {info.frames}", flush=True)
    report(name, statistics.median(ours_t), statistics.median(ref_t), "s",
           "<= 1.0x ffmpeg concat + -ss/-t re-encode")


if __name__ == "__main__":
    run(Report())
