"""The recorder with real video: every frame exactly once, rollover, masks, outages, drops, stop."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import av
import numpy as np

from agent.buffer.capture import EncodedPacket, Frame, SourceEnded, SourceUnavailable
from agent.buffer.recorder import Recorder, ScaledMask
from agent.buffer.segments import SegmentStore
from agent.config import BufferConfig, CameraConfig
from agent.fsutil import read_status, write_json_atomic
from tests.buffer_helpers import (
    FPS,
    FRAME_US,
    FiniteSynthetic,
    FlakySynthetic,
    H,
    W,
    decoded_frames,
    now_us,
    packet_count,
    stamp,
    write_segment,
)

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
    """Unplug the camera mid-recording: no frame is lost, the outage is a recorded gap, the
    recorder backs off between reopen attempts and counts exactly one reconnect."""
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
    # One reconnect, however many reopen attempts it took; the last error is the last refused reopen.
    assert stats.reconnects == 1
    assert stats.last_error == "camera unavailable: no such device"
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


# -- regressions from the video-pipeline review ----------------------------------


def _poll(condition, timeout: float = 10.0) -> bool:  # noqa: ANN001
    """Wait for a condition another thread makes true (no event to await for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_an_unwritable_status_file_neither_stops_the_status_nor_hangs_shutdown(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    store = make_store(tmp_path)
    blocker = tmp_path / "run"
    blocker.write_text("a file where the status directory should be")  # every status write fails
    status = blocker / "status.json"
    src = FiniteSynthetic(10_000, start_us=None, realtime=True)  # type: ignore[arg-type]
    rec = Recorder(src, store, CAMERA, BufferConfig(segment_seconds=1), status_file=status,
                   status_interval_s=0.02)
    caplog.set_level("WARNING", logger="agent.buffer.recorder")
    rec.start()
    try:
        said = lambda: any("cannot write the status file" in r.getMessage() for r in caplog.records)  # noqa: E731
        assert _poll(lambda: rec.stats.frames_recorded > 5 and said())
        blocker.unlink()  # the disk is writable again: the status thread is still there to notice
        assert _poll(lambda: read_status(status) is not None), "the status thread died at its first failed write"
        for p in blocker.iterdir():
            p.unlink()
        blocker.rmdir()
        blocker.write_text("unwritable again for the final write")
    finally:
        rec.stop()
    # The final status write in the writer's cleanup fails; the recorder still finishes.
    assert rec.wait(15), "wait() never returned: the writer's final status write raised"
    assert rec.error is None and rec.stats.camera_state == "stopped"
    assert [us for us, _ in all_frames(store)] == src.produced
    assert sum("cannot write the status file" in r.getMessage() for r in caplog.records) == 2  # once per episode


def test_status_writes_from_two_threads_never_collide(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        start.wait()
        try:
            for i in range(300):
                write_json_atomic(path, {"writer": n, "i": i})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert json.loads(path.read_text())["i"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp files left behind


class SteppedBackCamera(FiniteSynthetic):
    """A wall-clock camera whose clock is stepped back ``step_us`` (NTP) before frame ``at``."""

    def __init__(self, frames: int, *, start_us: int, at: int, step_us: int) -> None:
        super().__init__(frames, start_us=start_us)
        self.at, self.step_us = at, step_us

    def read(self):  # noqa: ANN201
        if len(self.produced) == self.at:
            self._start_us -= self.step_us
        return super().read()


def test_a_backward_clock_step_drops_frames_until_the_clock_catches_up(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    from agent.buffer.clips import clip_bytes

    store = make_store(tmp_path)
    t0 = now_us() - 60_000_000
    src = SteppedBackCamera(150, start_us=t0, at=60, step_us=3_000_000)
    with caplog.at_level("WARNING", logger="agent.buffer.recorder"):
        stats = Recorder(src, store, CAMERA, BufferConfig(segment_seconds=2)).run()  # used to raise from the muxer
    # What should be kept: each frame stamped after every frame before it.
    kept, newest = [], -1
    for us in src.produced:
        if us > newest:
            kept.append(us)
            newest = us
    assert len(kept) < 150
    assert stats.frames_recorded == len(kept) and stats.frames_dropped == 150 - len(kept)
    frames = all_frames(store)
    assert [us for us, _ in frames] == kept
    assert [qr for _, qr in frames] == [stamp(us) for us, _ in frames]
    segs = store.all()
    assert all(a.end_us <= b.start_us for a, b in itertools.pairwise(segs)), "segments overlap in time"
    step = f"clock went back by {(src.produced[59] - src.produced[60]) / 1e6:.3f} s"
    assert any(step in r.getMessage() for r in caplog.records)
    assert not list(store.segments_dir.rglob("*.part"))
    # A clip across the step cuts (overlapping segments would make it fail as out of order).
    _, info = clip_bytes(segs, t0, kept[-1] + FRAME_US)
    assert info.frames == len(kept)


def test_a_writer_error_finishes_the_open_segment_instead_of_leaking_it(tmp_path: Path) -> None:
    store = make_store(tmp_path)

    class BrokenFrameCamera(FiniteSynthetic):
        def read(self):  # noqa: ANN201
            f = super().read()
            if len(self.produced) == 21:
                return Frame(f.capture_us, f.image[:, :, 0])  # one grey plane: the encoder step fails
            return f

    src = BrokenFrameCamera(40, start_us=now_us() - 60_000_000)
    rec = Recorder(src, store, CAMERA, BufferConfig(segment_seconds=10))
    rec.start()
    assert rec.wait(15)
    assert rec.error is not None
    assert not list(store.segments_dir.rglob("*.part")), "the open segment was left unfinished"
    [seg] = store.all()
    assert seg.frames == 20 and [us for us, _ in all_frames(store)] == src.produced[:20]


class FlappingCamera(FiniteSynthetic):
    """Opens fine, then fails at the first read, ``flaps`` times; then works."""

    def __init__(self, frames: int, *, start_us: int, flaps: int) -> None:
        super().__init__(frames, start_us=start_us)
        self.flaps = flaps
        self.open_times: list[float] = []

    def open(self) -> None:
        self.open_times.append(time.monotonic())
        super().open()

    def read(self):  # noqa: ANN201
        if self.flaps > 0:
            self.flaps -= 1
            raise SourceUnavailable("stream dropped")
        return super().read()


def test_backoff_grows_for_a_camera_that_opens_and_fails_at_once(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    src = FlappingCamera(10, start_us=now_us() - 60_000_000, flaps=5)
    camera = CameraConfig(source="synthetic", width=W, height=H, fps=FPS, reconnect_max_s=0.16)
    stats = Recorder(src, store, camera, BufferConfig(), initial_backoff_s=0.02).run()
    assert stats.frames_recorded == 10
    waits = np.diff(src.open_times)
    assert len(waits) == 5
    # 0.02, 0.04, 0.08, 0.16, 0.16 s: it used to retry every 0.02 s forever.
    assert all(w >= expected * 0.95 for w, expected in zip(waits, [0.02, 0.04, 0.08, 0.16, 0.16]))


class DimWebcam(FiniteSynthetic):
    """Says 30 fps, delivers 10 fps (a webcam in low light lengthens its exposure)."""

    def __init__(self, frames: int, *, start_us: int) -> None:
        super().__init__(frames, start_us=start_us)
        self.fps = 30.0

    def read(self) -> Frame:
        if len(self.produced) >= self.limit:
            raise SourceEnded("done")
        us = self._start_us + len(self.produced) * 100_000
        self.produced.append(us)
        return Frame(us, self.draw(us))


def test_a_camera_slower_than_it_says_gets_no_gap_at_every_segment_boundary(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    t0 = now_us() - 60_000_000
    src = DimWebcam(50, start_us=t0)
    camera = CameraConfig(source="synthetic", width=W, height=H, fps=30)
    stats = Recorder(src, store, camera, BufferConfig(segment_seconds=1)).run()
    assert stats.segments_written == 5 and stats.frames_recorded == 50
    assert store.gaps() == []
    assert len(store.spans(t0, t0 + 60_000_000)) == 1
