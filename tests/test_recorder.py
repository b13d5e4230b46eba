"""The recorder with real video: every frame exactly once, rollover, masks, outages, drops, stop."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import av
import numpy as np

from agent.capture import EncodedPacket, SourceEnded
from agent.config import BufferConfig, CameraConfig
from agent.recorder import Recorder, ScaledMask, read_status
from agent.segments import SegmentStore
from tests.buffer_helpers import (FPS, FRAME_US, H, W, FiniteSynthetic, FlakySynthetic, decoded_frames, now_us,
                                  packet_count, stamp, write_segment)

CAMERA = CameraConfig(source="synthetic", width=W, height=H, fps=FPS)


def make_store(tmp_path: Path) -> SegmentStore:
    return SegmentStore(tmp_path / "buffer.sqlite", tmp_path / "segments")


def all_frames(store: SegmentStore) -> list[tuple[int, str | None]]:
    out = []
    for rec in store.all():
        out.extend(decoded_frames(rec.path, rec.start_us))
    return out


def test_every_frame_is_recorded_exactly_once_across_segments(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    t0 = now_us() - 60_000_000
    src = FiniteSynthetic(150, start_us=t0)  # 10 s of video
    rec = Recorder(src, store, CAMERA, BufferConfig(segment_seconds=2), status_file=tmp_path / "status.json")
    stats = rec.run()
    assert stats.frames_captured == stats.frames_recorded == 150 and stats.frames_dropped == 0
    segs = store.all()
    # Rollover at the first frame after 2 s: five segments of 30 frames, each starting with a keyframe.
    assert [s.frames for s in segs] == [30] * 5
    assert [s.start_us for s in segs] == [src.produced[i] for i in range(0, 150, 30)]
    for s in segs:
        assert s.end_us - s.start_us <= 2_000_000 + FRAME_US
        assert packet_count(s.path) == (30, True)
    frames = all_frames(store)
    # The picture of each frame (its QR code) is the capture time the index says it has...
    assert [qr for _, qr in frames] == [stamp(us) for us, _ in frames]
    # ...and together they are exactly the frames the camera produced, once each, in order.
    assert [us for us, _ in frames] == src.produced
    assert store.spans(t0, t0 + 20_000_000) == [(t0, src.produced[-1] + FRAME_US)]
    status = read_status(tmp_path / "status.json")
    assert status is not None and status["frames_recorded"] == 150 and status["segments_written"] == 5
    assert status["camera_state"] == "ended" and status["mode"] == "encode"


def test_privacy_mask_pixels_are_never_stored(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    box = [[200, 120], [320, 120], [320, 240], [200, 240]]  # bottom-right corner
    camera = CameraConfig(source="synthetic", width=W, height=H, fps=FPS, masks=[box])
    src = FiniteSynthetic(20, start_us=now_us() - 10_000_000)
    Recorder(src, store, camera, BufferConfig(), mask=ScaledMask(camera.masks, (W, H))).run()
    [seg] = store.all()
    with av.open(str(seg.path)) as c:
        images = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    assert len(images) == 20
    for img in images:
        assert img[124:236, 204:316].max() <= 24  # black, allowing for compression at the edge
        assert img[:120, :200].mean() > 60  # the rest of the picture is still there
    # The QR code (top-left, outside the mask) still reads.
    frames = decoded_frames(seg.path, seg.start_us)
    assert [qr for _, qr in frames] == [stamp(us) for us in src.produced]


def test_camera_outage_reconnects_with_backoff_and_records_the_gap(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    t0 = now_us() - 60_000_000
    outage = 5_000_000
    src = FlakySynthetic(90, start_us=t0, fail_after=40, failed_opens=3, outage_us=outage)
    camera = CameraConfig(source="synthetic", width=W, height=H, fps=FPS, reconnect_max_s=0.2)
    rec = Recorder(src, store, camera, BufferConfig(segment_seconds=2), status_file=tmp_path / "status.json",
                   initial_backoff_s=0.05)
    stats = rec.run()
    # Frames before the outage were finished into a segment, not lost; all 90 are stored once.
    frames = all_frames(store)
    assert [us for us, _ in frames] == src.produced and len(frames) == 90
    assert [qr for _, qr in frames] == [stamp(us) for us, _ in frames]
    before_end = src.produced[39] + FRAME_US
    after_start = src.produced[40]
    assert after_start - before_end == outage
    assert store.spans(t0, t0 + 60_000_000) == [(t0, before_end), (after_start, src.produced[-1] + FRAME_US)]
    [gap] = store.gaps()
    assert (gap.start_us, gap.end_us) == (before_end, after_start) and "camera unavailable" in gap.reason
    # Reopened with exponential backoff: 0.05, 0.1, 0.2 (capped), 0.2 s between attempts.
    waits = np.diff(src.open_times[1:])
    assert len(src.open_times) == 1 + 4
    assert all(w >= expected * 0.95 for w, expected in zip(waits, [0.1, 0.2, 0.2]))
    assert stats.reconnects == 1 and "camera unplugged" in (stats.last_error or "") or "no such device" in (stats.last_error or "")
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["reconnects"] == 1 and status["last_error"].startswith("camera unavailable")


def test_a_live_camera_is_never_waited_for_frames_are_dropped_and_counted(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    all_read = threading.Event()

    class Camera(FiniteSynthetic):
        def read(self):  # noqa: ANN202
            f = super().read()
            if len(self.produced) == self.limit:
                all_read.set()
            return f

    src = Camera(300, start_us=now_us() - 60_000_000, live=True)
    # The writer stalls after its first segment (a slow SD card) until the camera has sent
    # every frame: a live camera must not be held up, so frames beyond the queue are dropped.
    stats = Recorder(src, store, CAMERA, BufferConfig(segment_seconds=1), queue_frames=4,
                     on_segment=lambda _r: all_read.wait(20)).run()
    assert stats.frames_dropped > 0
    assert stats.frames_captured == 300 == stats.frames_recorded + stats.frames_dropped
    recorded = [us for us, _ in all_frames(store)]
    assert len(recorded) == stats.frames_recorded
    assert set(recorded) <= set(src.produced) and recorded == sorted(recorded)


def test_stop_finishes_the_segment_being_written(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    src = FiniteSynthetic(10_000, start_us=None, realtime=True)  # type: ignore[arg-type]
    first_segment = threading.Event()
    rec = Recorder(src, store, CAMERA, BufferConfig(segment_seconds=1), on_segment=lambda _r: first_segment.set())
    rec.start()
    assert first_segment.wait(10)
    rec.stop()
    assert rec.wait(10)
    assert not list(store.segments_dir.rglob("*.part"))
    frames = all_frames(store)
    assert [us for us, _ in frames] == src.produced  # the last partial second is kept too
    assert rec.stats.camera_state == "stopped"


class FileH264Source:
    """A minimal encoded source (demuxes an MP4), standing in for a camera that encodes itself."""

    kind = "encoded"
    live = False

    def __init__(self, path: Path, start_us: int) -> None:
        self.path, self.start_us = path, start_us
        self.width, self.height, self.fps = W, H, float(FPS)
        self.sent: list[tuple[int, bytes]] = []

    def open(self) -> None:
        self._c = av.open(str(self.path))
        self._stream = self._c.streams.video[0]
        self._packets = (p for p in self._c.demux(self._stream) if p.size)

    @property
    def stream_template(self):  # noqa: ANN201
        return self._stream

    def read(self) -> EncodedPacket:
        try:
            p = next(self._packets)
        except StopIteration:
            raise SourceEnded("end of file") from None
        us = self.start_us + int(p.pts * self._stream.time_base * 1_000_000)
        self.sent.append((us, bytes(p)))
        return EncodedPacket(us, p, p.is_keyframe)

    def close(self) -> None:
        self._c.close()

    def describe(self) -> str:
        return f"file {self.path.name}"


def test_encoded_camera_is_stream_copied_and_split_at_keyframes(tmp_path: Path) -> None:
    t0 = now_us() - 60_000_000
    original = write_segment(tmp_path / "camera.mp4", t0, 75)  # 5 s with a keyframe every second
    store = make_store(tmp_path)
    src = FileH264Source(original.path, t0)
    stats = Recorder(src, store, CAMERA, BufferConfig(segment_seconds=2)).run()
    assert stats.mode == "stream copy" and stats.frames_recorded == 75
    segs = store.all()
    assert [s.frames for s in segs] == [30, 30, 15]  # cut at the first keyframe after 2 s
    stored: list[tuple[int, bytes]] = []
    for s in segs:
        with av.open(str(s.path)) as c:
            st = c.streams.video[0]
            pkts = [p for p in c.demux(st) if p.size]
            assert pkts[0].is_keyframe
            stored.extend((s.start_us + int(p.pts * st.time_base * 1_000_000), bytes(p)) for p in pkts)
    assert stored == src.sent  # the camera's bytes, unchanged, at their capture times
    frames = all_frames(store)
    assert [qr for _, qr in frames] == [stamp(us) for us, _ in frames] and len(frames) == 75


def test_encoded_camera_with_a_mask_is_decoded_masked_and_reencoded(tmp_path: Path) -> None:
    t0 = now_us() - 60_000_000
    original = write_segment(tmp_path / "camera.mp4", t0, 30)
    store = make_store(tmp_path)
    box = [[160, 0], [320, 0], [320, 240], [160, 240]]  # the right half
    camera = CameraConfig(source="file", url=str(original.path), width=W, height=H, fps=FPS, masks=[box])
    src = FileH264Source(original.path, t0)
    stats = Recorder(src, store, camera, BufferConfig(), mask=ScaledMask(camera.masks, (W, H))).run()
    assert stats.mode == "decode, mask and re-encode" and stats.frames_recorded == 30
    frames = all_frames(store)
    assert [us for us, _ in frames] == [us for us, _ in src.sent]
    assert [qr for _, qr in frames] == [stamp(us) for us, _ in frames]
    [seg] = store.all()
    with av.open(str(seg.path)) as c:
        for f in c.decode(video=0):
            img = f.to_ndarray(format="bgr24")
            assert img[:, 164:].max() <= 24 and img[:, :150].mean() > 60
