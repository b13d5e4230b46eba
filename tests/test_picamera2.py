"""The Pi camera source against a picamera2 stand-in that blocks as the real library does.

See tests/picamera2_standin.py for what is copied from picamera2 0.3.36. Every test that could hang
on a broken source runs the call in a daemon thread and fails if it does not return in time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.buffer.capture import Frame, SourceUnavailable
from agent.buffer.capture.picamera2 import Picamera2Source, parse_pi_model
from tests import picamera2_standin as standin

PI5 = parse_pi_model("Raspberry Pi 5 Model B Rev 1.0")
PI4 = parse_pi_model("Raspberry Pi 4 Model B Rev 1.5")
W, H = 320, 240


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[standin.Picamera2]]:
    standin.install(monkeypatch)
    yield standin.Picamera2
    for cam in standin.Picamera2.instances:
        cam.shut_down_for_test()


def within(seconds: float, fn: Callable[[], Any]) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread: (finished in time, its result or exception)."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return (not t.is_alive(), box[0] if box else None)


def raw_source(**kw: Any) -> Picamera2Source:
    # A Pi 5 and no /dev/video11 on this machine: raw mode, as on a real Pi 5.
    return Picamera2Source(W, H, 30, model=PI5, read_timeout_s=0.5, **kw)


def test_stalled_camera_times_out_instead_of_hanging(fake: type[standin.Picamera2]) -> None:
    source = raw_source()
    source.open()
    assert isinstance(source.read(), Frame)
    cam = fake.instances[-1]
    cam.stalled = True  # the ribbon cable works loose: no more requests complete
    time.sleep(0.1)
    cam.completed_requests.clear()
    t0 = time.monotonic()
    done, result = within(3.0, source.read)
    assert done, "read() waited for ever on a stalled camera (capture_request without a timeout)"
    assert isinstance(result, SourceUnavailable) and "sent nothing" in str(result)
    assert time.monotonic() - t0 < 2.0
    # The timed-out job was cancelled, not left queued ahead of the next one (or of stop()).
    assert cam._job_list == []
    done, _ = within(3.0, source.close)
    assert done, "close() queued behind the stuck capture"
    assert not cam.started and not cam.is_open


def test_close_while_a_capture_is_waiting_does_not_queue_behind_it(fake: type[standin.Picamera2]) -> None:
    # Shutdown (systemd stop) arrives while the capture thread is waiting on a stalled camera.
    source = Picamera2Source(W, H, 30, model=PI5, read_timeout_s=30.0)
    source.open()
    cam = fake.instances[-1]
    cam.stalled = True
    time.sleep(0.1)
    cam.completed_requests.clear()
    within(0.3, source.read)  # left waiting
    done, _ = within(3.0, source.close)
    assert done, "close() waited behind the capture job for ever"
    assert not cam.started and not cam.is_open


def test_libcamera_error_in_a_capture_becomes_camera_unavailable(fake: type[standin.Picamera2]) -> None:
    source = raw_source()
    source.open()
    fake.fail_with = RuntimeError("Failed to queue buffer")
    done, result = within(3.0, source.read)
    assert done and isinstance(result, SourceUnavailable) and "Failed to queue buffer" in str(result)
    source.close()


def test_raw_frames_are_stamped_at_the_start_of_exposure(fake: type[standin.Picamera2]) -> None:
    source = raw_source()
    source.open()
    cam = fake.instances[-1]
    frames = [source.read() for _ in range(5)]
    source.close()
    truth = sorted(cam.wall_at_readout_us.values())
    for f in frames:
        assert isinstance(f, Frame) and f.image.shape == (H, W, 3)
        # The frame's readout began at one of the stand-in's wall readings; exposure 20 ms before that.
        best = min(truth, key=lambda t: abs(t - standin.EXPOSURE_US - f.capture_us))
        assert abs(best - standin.EXPOSURE_US - f.capture_us) < 2_000


def test_frame_wall_clock_is_used_when_libcamera_gives_it(fake: type[standin.Picamera2]) -> None:
    from agent.buffer.capture.picamera2 import WallClock, exposure_start_us

    clock = WallClock(sample=lambda: (0, 1_000_000_000_000))  # a stale offset: 1000 s since the epoch
    md = {"SensorTimestamp": 5_000_000_000, "ExposureTime": 10_000, "FrameWallClock": 1_005_000_123_000}
    assert exposure_start_us(md, clock) == 1_005_000_123 - 10_000
    # A FrameWallClock far from the clocks (wrong unit, garbage) is not trusted.
    md["FrameWallClock"] = 42
    assert exposure_start_us(md, clock) == 1_005_000_000 - 10_000
    assert exposure_start_us({}, clock) is None


def test_hardware_encoder_keyframes_are_never_further_apart_than_configured(
        fake: type[standin.Picamera2]) -> None:
    from agent.buffer.capture.picamera2 import h264_bitrate, keyframe_period

    assert keyframe_period(15, 0.5) == 7  # 7.5 frames: round down, as the software path does
    assert keyframe_period(30, 0.1) == 3
    assert keyframe_period(15, 1.0) == 15
    source = Picamera2Source(W, H, 15, keyframe_interval_s=0.5, model=PI4, read_timeout_s=0.2,
                             hardware_encoder=True)
    with pytest.raises(SourceUnavailable, match="no keyframe"):
        source.open()  # the stand-in's encoder produces nothing; we look at what it was asked for
    cam = fake.instances[-1]
    assert cam.encoder is None and not cam.started  # stopped and closed after the failed open
    assert cam.last_encoder.iperiod == 7  # was round(7.5) == 8: keyframes 0.53 s apart
    assert cam.last_encoder.bitrate == h264_bitrate(W, H, 15)
    assert h264_bitrate(1280, 720, 15) == 1_333_333  # picamera2's medium quality at 15 fps, not 30
    assert h264_bitrate(1920, 1080, 60) == 10_000_000 and h264_bitrate(160, 120, 1) == 500_000


def test_encoded_frames_take_exposure_start_from_the_request_metadata(fake: type[standin.Picamera2]) -> None:
    source = Picamera2Source(W, H, 15, model=PI4, hardware_encoder=True)
    req = standin.CompletedRequest(standin.np.zeros((2, 2, 3), standin.np.uint8),
                                   {"SensorTimestamp": time.monotonic_ns(), "ExposureTime": 30_000})
    sensor_ns = req.get_metadata()["SensorTimestamp"]
    source._remember_metadata(req)
    now_us = time.time_ns() // 1000
    assert abs(source._encoded_wall_us(sensor_ns) - (now_us - 30_000)) < 5_000
    # Without metadata (a frame the callback missed): the sensor time as it is.
    assert abs(source._encoded_wall_us(sensor_ns) - now_us) < 5_000


def test_factory_shows_the_real_import_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    from agent.buffer.capture import factory
    from agent.config import CameraConfig
    from agent.errors import UserError

    real_import = builtins.__import__

    def broken(name: str, *a: Any, **k: Any) -> Any:
        if name == "picamera2":
            raise ValueError("numpy.dtype size changed, may indicate binary incompatibility. "
                             "Expected 96 from C header, got 88 from PyObject")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(UserError) as err:
        factory.make_source(CameraConfig(source="picamera2"))
    text = str(err.value)
    assert "dtype size changed" in text and "not installed" not in text and "install.sh" in text


def test_recorder_survives_a_stalled_pi_camera(fake: type[standin.Picamera2], tmp_path: Path) -> None:
    """Raw mode on a Pi 5: the camera stalls mid-recording. The recorder must say so, leave a gap,
    reopen the camera, and still shut down promptly (it used to say "recording" for ever)."""
    from agent.buffer.recorder import Recorder
    from agent.buffer.segments import SegmentStore
    from agent.config import BufferConfig, CameraConfig

    store = SegmentStore(tmp_path / "buffer.sqlite", tmp_path / "segments")
    camera = CameraConfig(source="picamera2", width=W, height=H, fps=30, reconnect_max_s=0.2)
    source = raw_source()
    rec = Recorder(source, store, camera, BufferConfig(segment_seconds=1), initial_backoff_s=0.05)
    rec.start()
    try:
        deadline = time.monotonic() + 10
        while rec.stats.frames_captured < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rec.stats.camera_state == "recording"
        first = fake.instances[-1]
        first.stalled = True
        deadline = time.monotonic() + 5
        while rec.stats.camera_state == "recording" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rec.stats.camera_state == "reconnecting", "a stalled camera was still shown as recording"
        assert rec.stats.last_error and "camera unavailable" in rec.stats.last_error
        assert not first.is_open  # closed, not left with a queued stop()
        deadline = time.monotonic() + 5
        while rec.stats.reconnects < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rec.stats.reconnects >= 1 and fake.instances[-1] is not first
    finally:
        t0 = time.monotonic()
        rec.stop()
        assert rec.wait(5), "shutdown waited on the camera"
    assert time.monotonic() - t0 < 3


def test_pi_pinning_is_the_same_in_the_extra_and_the_installer_constraints() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["pi"]
    lines = (root / "hardware" / "pi-constraints.txt").read_text().splitlines()
    constraints = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert constraints and all(c in extra for c in constraints)
    assert any(c.startswith("numpy") and "<2" in c for c in constraints)
    assert 'PIP_CONSTRAINT="$here/hardware/pi-constraints.txt"' in (root / "install.sh").read_text()


def test_yuv_mask_blacks_out_exactly_the_polygons_in_picamera2s_yuv420_layout() -> None:
    """The Pi 4 hardware path: the mask is applied to the (h * 3/2, stride) I420 buffer in place."""
    import cv2
    import numpy as np

    from agent.buffer.capture.picamera2 import YuvMask
    from agent.buffer.masks import PrivacyMask

    w, h, stride = 64, 48, 96  # stride padded past the width, as the ISP does
    rng = np.random.default_rng(7)
    bgr = rng.integers(40, 220, (h, w, 3), dtype=np.uint8)
    i420 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420).reshape(-1)  # Y, then U, then V, tight
    buf = np.full((h * 3 // 2, stride), 77, np.uint8)  # padding bytes: 77, never to be touched
    flat = buf.reshape(-1)
    flat[: h * stride].reshape(h, stride)[:, :w] = i420[: w * h].reshape(h, w)
    cs = stride // 2
    for plane in range(2):
        src = i420[w * h + plane * (w // 2) * (h // 2):][: (w // 2) * (h // 2)].reshape(h // 2, w // 2)
        dst = flat[h * stride + plane * cs * (h // 2):][: cs * (h // 2)].reshape(h // 2, cs)
        dst[:, : w // 2] = src
    before = buf.copy()
    polygons = [[(10, 8), (40, 8), (40, 30), (10, 30)]]
    YuvMask(polygons, w, h).apply(buf)

    y = buf.reshape(-1)[: h * stride].reshape(h, stride)
    inside = np.zeros((h, w), np.uint8)
    cv2.fillPoly(inside, PrivacyMask(polygons, w, h).polygons, 1)
    assert (y[:, :w][inside == 1] == 16).all()
    assert (y[:, :w][inside == 0] == before.reshape(-1)[: h * stride].reshape(h, stride)[:, :w][inside == 0]).all()
    assert (y[:, w:] == 77).all()  # the stride padding is left alone
    # Back to BGR: the masked rectangle is black, the rest is the picture.
    tight = np.concatenate([
        y[:, :w].reshape(-1),
        *(flat[h * stride + p * cs * (h // 2):][: cs * (h // 2)].reshape(h // 2, cs)[:, : w // 2].reshape(-1)
          for p in range(2)),
    ]).reshape(h * 3 // 2, w)
    out = cv2.cvtColor(tight, cv2.COLOR_YUV2BGR_I420)
    assert out[10:28, 12:38].max() <= 2
    unmasked = cv2.cvtColor(i420.reshape(h * 3 // 2, w), cv2.COLOR_YUV2BGR_I420)
    assert (out[32:, :] == unmasked[32:, :]).all() and (out[:, 42:] == unmasked[:, 42:]).all()

    with pytest.raises(ValueError):
        YuvMask(polygons, w, h).apply(buf[:, ::2])  # a strided view cannot be masked in place


def test_a_frame_whose_mask_failed_is_never_stored(fake: type[standin.Picamera2]) -> None:
    from agent.buffer.capture.picamera2 import EncodedFrameSink

    source = Picamera2Source(W, H, 15, model=PI4, hardware_encoder=True, raw=True,
                             masks=[[(0, 0), (10, 0), (10, 10)]], mask_in_encoder=True)
    assert source.kind == "encoded" and source.masks_applied
    source._unsafe_frames.add(1_000_033)
    sink = EncodedFrameSink(lambda ns: ns // 1000, lambda: 1_000_000, unsafe=source._unsafe_frame)
    sink.outputframe(b"\x00\x00\x00\x01\x65", True, 33)  # the mask failed on this one (±1 µs tolerated)
    sink.outputframe(b"\x00\x00\x00\x01\x41", False, 66)  # refers to it: dropped up to the next keyframe
    assert sink.dropped == 2
    # By default a mask still means raw frames, masked by the recorder.
    assert Picamera2Source(W, H, 15, model=PI4, hardware_encoder=True, raw=True,
                           masks=[[(0, 0), (10, 0), (10, 10)]]).kind == "raw"


def test_factory_refuses_a_picamera2_without_capture_timeouts(fake: type[standin.Picamera2],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.buffer.capture import factory
    from agent.buffer.capture import picamera2 as pc
    from agent.config import CameraConfig
    from agent.errors import UserError

    monkeypatch.setattr(pc, "picamera2_version", lambda: (0, 3, 19))
    with pytest.raises(UserError, match=r"0\.3\.19 is too old.*0\.3\.20"):
        factory.make_source(CameraConfig(source="picamera2"))
    monkeypatch.setattr(pc, "picamera2_version", lambda: (0, 3, 36))
    assert isinstance(factory.make_source(CameraConfig(source="picamera2")), Picamera2Source)
    assert pc.parse_version("0.3.36+rpt20250101") == (0, 3, 36)
