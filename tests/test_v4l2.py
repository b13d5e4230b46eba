"""USB webcams as they are, through a stand-in that answers as OpenCV's V4L2 backend does.

The stand-in is tests/test_sources.py's ScriptedCapture; what it copies from cap_v4l.cpp is
written there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from agent.buffer.capture import SourceUnavailable
from agent.buffer.capture import v4l2 as v4l2_module
from agent.buffer.capture.v4l2 import KERNEL_STAMP_WINDOW_US, MAX_BAD_FRAMES, V4L2Source
from tests.test_sources import START_US, ScriptedCapture

W, H = 64, 48
BOOT_US = START_US - 1_000_000_000  # CLOCK_MONOTONIC 0 on the wall clock


@pytest.fixture(autouse=True)
def _boot_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """CLOCK_MONOTONIC to wall clock: a fixed offset, so stamps are exact."""
    monkeypatch.setattr(v4l2_module, "_mono_to_wall_offset_us", lambda: BOOT_US, raising=False)
    yield


def pics(n: int) -> list[np.ndarray | None]:
    return [np.full((H, W, 3), i, np.uint8) for i in range(n)]


def source(cap: ScriptedCapture, fps: float = 15, clock: list[int] | None = None) -> V4L2Source:
    ticks = iter(clock) if clock is not None else None

    def clock_us() -> int:
        return next(ticks) if ticks is not None else START_US

    return V4L2Source("/dev/video0", W, H, fps, open_capture=lambda dev: cap, clock_us=clock_us)


def test_one_undecodable_mjpeg_frame_is_skipped_and_counted() -> None:
    frames = pics(4)
    frames[1] = None  # retrieve() gives (True, None), as OpenCV does for a corrupt JPEG
    cap = ScriptedCapture(frames)
    src = source(cap, clock=[START_US + i * 66_667 for i in range(4)])
    src.open()
    got = [src.read(), src.read(), src.read()]
    assert [int(f.image[0, 0, 0]) for f in got] == [0, 2, 3]
    assert src.bad_frames == 1 and not cap.released  # no reconnect, no gap


def test_only_several_bad_frames_in_a_row_reconnect() -> None:
    cap = ScriptedCapture([None] * (MAX_BAD_FRAMES - 1) + pics(1) + [None] * MAX_BAD_FRAMES)
    src = source(cap, clock=[START_US + i * 66_667 for i in range(2 * MAX_BAD_FRAMES)])
    src.open()
    assert int(src.read().image[0, 0, 0]) == 0  # four bad ones, then a good one: the count starts again
    with pytest.raises(SourceUnavailable, match=f"{MAX_BAD_FRAMES} frames in a row"):
        src.read()
    assert cap.released


def test_unknown_frame_rate_is_not_passed_on_as_minus_one() -> None:
    src = source(ScriptedCapture(pics(1), fps=-1.0))
    src.open()
    assert src.fps == 15 and "15 fps" in src.describe()


def test_a_camera_that_will_not_do_mjpeg_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    src = source(ScriptedCapture(pics(1), fourcc="YUYV"))
    with caplog.at_level(logging.WARNING):
        src.open()
    assert src.fourcc == "YUYV" and "YUYV" in src.describe()
    assert any("asked for MJPG but gave YUYV" in r.getMessage() for r in caplog.records)


def test_a_camera_faster_than_configured_is_thinned_to_the_configured_rate() -> None:
    # Asked for 15 fps, the camera runs at 30: every other frame goes.
    n = 30
    stamps = [1_000_000 + i * 33.333 for i in range(n)]  # kernel ms (CLOCK_MONOTONIC)
    cap = ScriptedCapture(pics(n), fps=30.0, stamps_ms=stamps)
    src = source(cap, fps=15, clock=[BOOT_US + int(s * 1000) + 5_000 for s in stamps])
    src.open()
    assert src.fps == 15 and "camera runs at 30" in src.describe()  # the rate the recorder will get
    kept = []
    while True:
        try:
            kept.append(src.read())
        except SourceUnavailable:
            break
    assert len(kept) == n // 2 and src.rate_dropped == n // 2
    gaps = np.diff([f.capture_us for f in kept])
    assert gaps.min() > 60_000 and gaps.max() < 70_000


def test_frames_carry_the_kernel_timestamp_not_the_time_grab_returned() -> None:
    # The frame was dequeued 80 ms after the driver stamped it (transfer + a frame queued in the driver).
    kernel_ms = [2_000_000.0, 2_000_066.667]
    cap = ScriptedCapture(pics(2), stamps_ms=kernel_ms)
    src = source(cap, clock=[BOOT_US + int(k * 1000) + 80_000 for k in kernel_ms])
    src.open()
    a, b = src.read(), src.read()
    assert a.capture_us == BOOT_US + 2_000_000_000
    assert b.capture_us == BOOT_US + 2_000_066_667
    assert src.fallback_stamps == 0


@pytest.mark.parametrize("kernel_ms", [
    0.0,  # OpenCV's answer before the first frame, or a driver without timestamps
    2_000_000.0 + 5_000.0,  # in the future: not CLOCK_MONOTONIC
    2_000_000.0 - KERNEL_STAMP_WINDOW_US / 1000 - 1,  # too far back to be this frame
])
def test_an_unbelievable_kernel_timestamp_falls_back_to_the_wall_clock(kernel_ms: float) -> None:
    now = BOOT_US + 2_000_000_000
    cap = ScriptedCapture(pics(1), stamps_ms=[kernel_ms])
    src = source(cap, clock=[now])
    src.open()
    assert src.read().capture_us == now and src.fallback_stamps == 1


def test_stand_in_matches_opencv_on_what_it_reports() -> None:
    cap = ScriptedCapture(pics(1), fourcc="YUYV", fps=-1.0)
    assert cap.get(cv2.CAP_PROP_POS_MSEC) == 0.0  # before the first grab, as FirstCapture
    cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*"MJPG"))
    assert cap.get(cv2.CAP_PROP_FOURCC) == cv2.VideoWriter.fourcc(*"YUYV")
    assert cap.get(cv2.CAP_PROP_FPS) == -1.0
