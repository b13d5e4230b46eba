"""A real RTSP doorbell: GStreamer's RTSP server sends H.264, the recorder stores it by stream copy.

The camera (tests/rtsp_server.py, run by Debian's Python, which has GStreamer's
bindings) is fed pictures from the project's synthetic camera, each showing its
capture time as a QR code, and writes down the time of every frame it actually
sent. A clip cut from the recording is then compared with that list frame by
frame; a camera restart must show up as a gap with its reason, and recording
must resume by itself.
"""

from __future__ import annotations

import os
import queue
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from agent.buffer.capture.stream import StreamSource
from agent.buffer.capture.synthetic import SyntheticSource
from agent.buffer.clips import cut_clip
from agent.buffer.recorder import Recorder, RecorderStats
from agent.buffer.segments import SegmentRecord, SegmentStore
from agent.config import BufferConfig, CameraConfig
from tests.clipfixtures import decode_clip, shows_time, stamp

SERVER = Path(__file__).with_name("rtsp_server.py")
DEBIAN_PYTHON = "/usr/bin/python3"
W, H, FPS = 320, 240, 15
FRAME_US = round(1_000_000 / FPS)


def gst_rtsp_missing() -> str | None:
    """Why the RTSP server cannot run here, or None if it can."""
    if not os.path.exists(DEBIAN_PYTHON):
        return f"{DEBIAN_PYTHON} is missing"
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "assert all(Gst.ElementFactory.find(n) for n in ('appsrc', 'videoconvert', 'x264enc', 'rtph264pay'))")
    try:
        done = subprocess.run([DEBIAN_PYTHON, "-c", probe], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {DEBIAN_PYTHON}: {exc}"
    if done.returncode != 0:
        return ("GStreamer's RTSP server is not importable from /usr/bin/python3; install python3-gi "
                "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-{base,good,bad,ugly} (install.sh --dev does)")
    return None


_MISSING = gst_rtsp_missing()
needs_gst = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


class RtspCamera:
    """One run of the RTSP server, fed live synthetic frames by a thread of this process."""

    def __init__(self, sent_file: Path, *, port: int = 0, width: int = W, height: int = H, fps: int = FPS,
                 keyint: int = 0, slices: int = 1, ready_timeout_s: float = 20.0) -> None:
        self.sent_file = sent_file
        self.width, self.height, self.fps = width, height, fps
        cmd = [DEBIAN_PYTHON, str(SERVER), "--port", str(port), "--width", str(width), "--height", str(height),
               "--fps", str(fps), "--sent", str(sent_file)]
        if keyint:
            cmd += ["--keyint", str(keyint)]
        if slices > 1:
            cmd += ["--slices", str(slices)]
        self._stop = threading.Event()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, lines), daemon=True).start()
        self.url = ""
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise TimeoutError(f"the RTSP server did not say READY within {ready_timeout_s:g} s") from None
            if line.startswith("URL "):
                self.url = line.split()[1]
            elif line == "READY":
                break
            elif line == "" or line.startswith("ERROR"):
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"the RTSP server did not start: {line} {err}")
        self.port = int(self.url.split(":")[2].split("/")[0])
        self._feeder = threading.Thread(target=self._feed, name="rtsp-feeder", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        """Draw each frame at its capture time and hand it to the server at once."""
        src = SyntheticSource(self.width, self.height, self.fps, realtime=True)
        src.open()
        stdin = self.proc.stdin
        assert stdin is not None
        while not self._stop.is_set():
            frame = src.read()
            try:
                stdin.write(struct.pack("<q", frame.capture_us) + frame.image.tobytes())
                stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                return

    def stop(self) -> None:
        """Stop the camera as a power cut would: connections drop, nothing more is sent."""
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass

    def sent(self) -> list[int]:
        """Capture times of every frame the server has sent, in order, over all its runs."""
        return [int(x) for x in self.sent_file.read_text().split()]


def _pump(stream: IO[bytes], lines: queue.Queue[str]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace").strip())
    lines.put("")


@pytest.fixture
def camera(tmp_path: Path) -> Iterator[RtspCamera]:
    cam = RtspCamera(tmp_path / "sent.txt")
    yield cam
    cam.stop()


class Recording:
    """A real recorder on the camera, with segments reported as they are stored."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.store = SegmentStore(tmp_path / "buffer.sqlite", tmp_path / "segments")
        self.segments: list[SegmentRecord] = []
        self._cond = threading.Condition()
        cam_cfg = CameraConfig(source="rtsp", url=url, width=W, height=H, fps=FPS, reconnect_max_s=1.0)
        self.source = StreamSource(url, live=True, timeout_s=3)
        self.recorder = Recorder(self.source, self.store, cam_cfg, BufferConfig(segment_seconds=2),
                                 status_file=tmp_path / "status.json", initial_backoff_s=0.2,
                                 on_segment=self._stored)
        self.recorder.start()

    def _stored(self, record: SegmentRecord) -> None:
        with self._cond:
            self.segments.append(record)
            self._cond.notify_all()

    def wait_segments(self, pred: Callable[[list[SegmentRecord]], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self.segments) or self.recorder.wait(0), timeout):
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; status: {self.recorder.snapshot()}")
        assert pred(self.segments), f"the recorder stopped before {what}: {self.recorder.error}"

    def wait_state(self, state: str, timeout: float) -> RecorderStats:
        """Poll the recorder's own status (the same figures `status` shows) until it says ``state``."""
        deadline = time.monotonic() + timeout
        while (snap := self.recorder.snapshot()).camera_state != state:
            if time.monotonic() > deadline:
                raise AssertionError(f"camera_state stayed {snap.camera_state!r}, not {state!r}, for {timeout:g} s")
            if self.recorder.wait(0.05):
                raise AssertionError(f"the recorder stopped: {self.recorder.error}")
        return snap

    def stop(self) -> RecorderStats:
        self.recorder.stop()
        assert self.recorder.wait(15), "the recorder did not stop within 15 s"
        return self.recorder.stats


def clip_stamps(path: Path, first_us: int) -> tuple[list[str | None], list[int], dict[int, np.ndarray]]:
    """The QR time each frame of a clip shows, and the capture time the recording gave it."""
    d = decode_clip(path)
    return d.qr, [first_us + p for p in d.pts_us], dict(d.unreadable)


def check_frames_match_sent(qr: list[str | None], unreadable: dict[int, np.ndarray], sent: list[int]) -> list[int]:
    """The clip is one unbroken run of the frames the camera sent: returns their send times."""
    readable = [(i, s) for i, s in enumerate(qr) if s is not None]
    assert len(readable) >= len(qr) - 2, f"{len(qr) - len(readable)} of {len(qr)} QR codes unreadable"
    by_stamp = {stamp(t): k for k, t in enumerate(sent)}
    i0, s0 = readable[0]
    assert s0 in by_stamp, f"frame {i0} shows {s0}, a time the camera never sent"
    start = by_stamp[s0] - i0
    expected = sent[start:start + len(qr)]
    assert len(expected) == len(qr)
    for i, shown in enumerate(qr):
        if shown is None:
            img = unreadable[i]
            assert shows_time(img, expected[i], FRAME_US, W, H), f"frame {i} is not the picture sent at {stamp(expected[i])}"
        else:
            assert shown == stamp(expected[i]), f"frame {i} shows {shown}, expected the next frame sent, {stamp(expected[i])}"
    return expected


@needs_gst
def test_a_clip_from_a_real_rtsp_camera_holds_exactly_the_frames_it_sent(camera: RtspCamera, tmp_path: Path) -> None:
    rec = Recording(tmp_path, camera.url)
    try:
        rec.wait_segments(lambda s: len(s) >= 3, 40, "three stored segments")
        stats = rec.recorder.snapshot()
    finally:
        final = rec.stop()
    assert stats.mode == "stream copy" and stats.codec == "h264", stats
    assert final.frames_dropped == 0 and final.reconnects == 0
    segs = rec.store.all()
    # Segments start on the camera's keyframes (one a second) and touch: no gap was recorded.
    assert rec.store.gaps() == []
    start, end = segs[0].start_us + 300_000, segs[2].end_us - 300_000
    info = cut_clip(segs, start, end, tmp_path / "clip.mp4")
    # The window starts between keyframes: the frames before the next keyframe are re-encoded,
    # the rest copied as the camera sent them.
    assert info.mode != "reencode" and info.copied_frames > info.reencoded_frames > 0
    qr, captured, unreadable = clip_stamps(tmp_path / "clip.mp4", info.first_us)
    assert len(qr) == info.frames
    assert all(start <= t < end for t in captured)
    sent_us = check_frames_match_sent(qr, unreadable, camera.sent())
    # The recording's capture time of each frame is its send time plus the delivery delay,
    # which is small and never negative (within the 1 ms rounding of the QR text).
    lags = [c - s for c, s in zip(captured, sent_us)]
    assert min(lags) > -2_000 and max(lags) < 1_000_000, (min(lags), max(lags))
    # Spacing follows the camera's: the clip spans as long as the camera took to send it,
    # give or take network jitter (the camera is paced by a busy machine, so not exactly 1/15 s).
    assert abs((captured[-1] - captured[0]) - (sent_us[-1] - sent_us[0])) < 200_000


@needs_gst
def test_a_camera_restart_leaves_a_gap_with_its_reason_and_recording_resumes(camera: RtspCamera, tmp_path: Path) -> None:
    rec = Recording(tmp_path, camera.url)
    restarted: RtspCamera | None = None
    try:
        rec.wait_segments(lambda s: len(s) >= 1, 30, "a first stored segment")
        rec.wait_state("recording", 5)
        camera.stop()
        stopped_at = time.time_ns() // 1000
        last_before = camera.sent()[-1]
        snap = rec.wait_state("reconnecting", 10)
        assert snap.last_error and "rtsp://127.0.0.1" in snap.last_error, snap
        before = len(rec.segments)
        restarted = RtspCamera(camera.sent_file, port=camera.port)
        assert restarted.url == camera.url
        rec.wait_segments(lambda s: len(s) >= before + 2, 40, "two segments after the camera came back")
        stats = rec.recorder.snapshot()
    finally:
        rec.stop()
        if restarted is not None:
            restarted.stop()
    assert stats.reconnects >= 1 and stats.camera_state == "recording"
    gaps = rec.store.gaps()
    assert len(gaps) == 1, gaps
    gap = gaps[0]
    assert gap.reason.startswith("camera unavailable (") and "rtsp://127.0.0.1" in gap.reason, gap.reason
    segs = rec.store.all()
    before_gap = [s for s in segs if s.end_us <= gap.start_us]
    after_gap = [s for s in segs if s.start_us >= gap.end_us]
    assert before_gap and len(after_gap) >= 2 and len(before_gap) + len(after_gap) == len(segs)
    # The gap covers the outage: it starts after the last frame stored before the stop and ends
    # at the first frame stored after the camera was back, which it sent after it restarted.
    assert gap.start_us <= stopped_at + 1_000_000
    assert gap.end_us == after_gap[0].start_us and gap.start_us == before_gap[-1].end_us
    # Both sides hold real frames from the camera, the second side only frames sent after the restart.
    sent = camera.sent()
    info = cut_clip(after_gap, after_gap[0].start_us, after_gap[-1].end_us, tmp_path / "after.mp4")
    qr, _, unreadable = clip_stamps(tmp_path / "after.mp4", info.first_us)
    sent_after = check_frames_match_sent(qr, unreadable, sent)
    assert sent_after[0] > last_before


@needs_gst
def test_a_camera_sending_several_slices_per_picture_is_stored_whole(tmp_path: Path) -> None:
    """Some cameras encode each picture as several slices (one per encoder thread): every stored
    packet must still be one whole picture, or the recording shows torn frames."""
    cam = RtspCamera(tmp_path / "sent.txt", slices=2)
    try:
        rec = Recording(tmp_path, cam.url)
        try:
            rec.wait_segments(lambda s: len(s) >= 2, 40, "two stored segments")
        finally:
            rec.stop()
    finally:
        cam.stop()
    segs = rec.store.all()
    info = cut_clip(segs, segs[0].start_us, segs[1].end_us, tmp_path / "clip.mp4")
    qr, _, unreadable = clip_stamps(tmp_path / "clip.mp4", info.first_us)
    check_frames_match_sent(qr, unreadable, cam.sent())
