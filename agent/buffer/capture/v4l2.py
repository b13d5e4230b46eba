"""USB (UVC) webcams through OpenCV's V4L2 backend.

MJPEG is requested where the camera offers it: over USB 2 most webcams can
only send 720p at a useful frame rate as MJPEG, raw YUYV tops out at a few
frames per second. The size and rate are requests; the camera answers with
what it can do, and ``width``/``height``/``fps`` report what it chose.

Capture time is the kernel's per-frame buffer timestamp, which OpenCV's
backend returns as ``CAP_PROP_POS_MSEC`` (``timestamp.tv_sec * 1000 +
tv_usec / 1000`` of the dequeued buffer; 0 before the first frame).
uvcvideo stamps on CLOCK_MONOTONIC (its default ``clock`` parameter) at the
start of the frame (``V4L2_BUF_FLAG_TSTAMP_SRC_SOE``), so it is not late by the
USB transfer nor by frames queued in the driver (not yet confirmed on a real
webcam: see hardware/README.md). It is turned into wall-clock time by reading
both clocks at once. A timestamp outside a sanity window — later than the
moment ``grab()`` returned, or more than :data:`KERNEL_STAMP_WINDOW_US`
before it (a driver on another clock, or none) — falls back to the wall clock
after ``grab()``, and ``fallback_stamps`` counts those.

Webcams as they are (OpenCV's V4L2 backend, as read in ``cap_v4l.cpp``):
an MJPEG frame that does not decode comes back from ``retrieve()`` as
``(True, None)``; it is skipped and counted, and only
:data:`MAX_BAD_FRAMES` in a row count as the camera failing.
``CAP_PROP_FPS`` is −1 when the driver cannot say (``VIDIOC_G_PARM``
fails), and is then taken as the configured rate. If the camera runs faster
than configured, frames are dropped to the configured rate.

OpenCV sits behind :class:`Capture`, a four-method protocol, so tests drive
this source with a scripted capture object: this machine has no camera.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np

from agent.buffer.capture import Frame, SourceUnavailable, stamp_forward

log = logging.getLogger(__name__)

MAX_BAD_FRAMES = 5
"""Undecodable frames in a row before the camera counts as failing (one is a USB hiccup)."""
KERNEL_STAMP_WINDOW_US = 1_000_000
"""A kernel timestamp more than this before grab() returned is not believed."""


def _now_us() -> int:
    return time.time_ns() // 1000


def _mono_to_wall_offset_us() -> int:
    a = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    wall = time.time_ns()
    b = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    return (wall - (a + b) // 2) // 1000


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` this source uses."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's names
    def set(self, prop: int, value: float) -> bool: ...
    def get(self, prop: int) -> float: ...
    def grab(self) -> bool: ...
    def retrieve(self) -> tuple[bool, np.ndarray | None]: ...
    def release(self) -> None: ...


def open_cv_capture(device: str) -> Capture:
    """The real thing: OpenCV's V4L2 backend on a device path or index."""
    target: str | int = int(device) if device.isdigit() else device
    return cv2.VideoCapture(target, cv2.CAP_V4L2)


def explain_missing(device: str) -> str:
    """Why a device did not open, as far as the file system can tell."""
    if device.isdigit():
        device = f"/dev/video{device}"
    path = Path(device)
    if not path.exists():
        return (f"no camera at {device}: is the webcam plugged in? "
                f"`ls /dev/video*` lists the cameras the system sees; set camera.device to one of them")
    if not os.access(path, os.R_OK | os.W_OK):
        return (f"permission denied on {device}: the agent's user must be in the group `video` "
                f"(sudo usermod -aG video <user>, then restart the agent)")
    return (f"{device} exists but did not open as a camera: another program may be using it "
            f"(`fuser {device}` shows which), or it is not a capture device (webcams often add a "
            f"second metadata-only node; try the other /dev/video number)")


class V4L2Source:
    """A UVC webcam; yields BGR frames stamped with the wall clock."""

    kind: Literal["raw"] = "raw"
    stream_template = None

    def __init__(
        self,
        device: str = "/dev/video0",
        width: int = 1280,
        height: int = 720,
        fps: float = 15,
        *,
        open_capture: Callable[[str], Capture] = open_cv_capture,
        clock_us: Callable[[], int] = _now_us,
        mono_to_wall_us: Callable[[], int] | None = None,
    ) -> None:
        self.device = device
        self.requested = (width, height, float(fps))
        self.width, self.height, self.fps = width, height, float(fps)
        self.fourcc = ""
        self.camera_fps: float | None = None  # what the driver says it runs at, if it says
        self._open_capture = open_capture
        self._clock_us = clock_us
        self._mono_to_wall_us = mono_to_wall_us
        self._cap: Capture | None = None
        self.bad_frames = 0  # undecodable frames skipped, ever
        self.rate_dropped = 0  # frames dropped because the camera ran faster than configured
        self.fallback_stamps = 0  # frames stamped by the wall clock: no believable kernel timestamp
        self._bad_in_a_row = 0
        self._next_due_us: float | None = None
        self._last_us: int | None = None

    def open(self) -> None:
        self.close()
        try:
            cap = self._open_capture(self.device)
        except Exception as exc:  # noqa: BLE001 - whatever OpenCV raises, the camera is not usable
            raise SourceUnavailable(f"{explain_missing(self.device)} ({exc})") from None
        if not cap.isOpened():
            cap.release()
            raise SourceUnavailable(explain_missing(self.device))
        width, height, fps = self.requested
        # FOURCC first: the sizes and rates on offer depend on the pixel format.
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*"MJPG"))
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        cap.set(cv2.CAP_PROP_FPS, fps)
        self.fourcc = _fourcc_text(cap.get(cv2.CAP_PROP_FOURCC))
        if self.fourcc and self.fourcc != "MJPG":
            log.warning("camera %s was asked for MJPG but gave %s: at %dx%d over USB 2 that may mean a few "
                        "frames per second", self.device, self.fourcc, width, height)
        self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) or width
        self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) or height
        granted = float(cap.get(cv2.CAP_PROP_FPS))
        # -1: the driver could not say (VIDIOC_G_PARM failed); 0: not set. Never pass either on.
        # A camera faster than configured is thinned to the configured rate (read()), so the rate
        # passed on is what the recorder will get.
        self.camera_fps = granted if granted > 0 else None
        self.fps = min(granted, fps) if granted > 0 else fps
        self._cap = cap
        self._bad_in_a_row = 0
        self._next_due_us = None
        self._last_us = None

    def read(self) -> Frame:
        while True:
            frame = self._read_one()
            if frame is not None:
                return frame

    def _read_one(self) -> Frame | None:
        """One frame from the camera, or None for a frame skipped (undecodable, or over the rate)."""
        cap = self._cap
        if cap is None:
            raise SourceUnavailable(f"camera {self.device} is not open")
        if not cap.grab():
            self.close()
            raise SourceUnavailable(f"camera {self.device} stopped sending frames (unplugged, or its USB port lost power?)")
        capture_us = self._stamp(cap)
        ok, image = cap.retrieve()
        if not ok or image is None:
            self.bad_frames += 1
            self._bad_in_a_row += 1
            if self._bad_in_a_row >= MAX_BAD_FRAMES:
                self.close()
                raise SourceUnavailable(
                    f"camera {self.device} sent {self._bad_in_a_row} frames in a row that could not be decoded")
            return None
        self._bad_in_a_row = 0
        # A camera running faster than configured (many ignore the rate asked for): keep one frame
        # per configured period. A quarter period of slack, so a camera at the right rate loses none.
        period_us = 1_000_000 / self.requested[2]
        if self._next_due_us is not None and capture_us < self._next_due_us - period_us / 4:
            self.rate_dropped += 1
            return None
        if self._next_due_us is None or capture_us > self._next_due_us + period_us:
            self._next_due_us = capture_us + period_us
        else:
            self._next_due_us += period_us
        image = _as_bgr(image)
        h, w = image.shape[:2]
        if (w, h) != (self.width, self.height):
            # The driver changed its mind (or lied in get()): report what really arrives.
            self.width, self.height = w, h
        self._last_us = capture_us = stamp_forward(self._last_us, capture_us)
        return Frame(capture_us, image)

    def _stamp(self, cap: Capture) -> int:
        """The frame's kernel timestamp as wall-clock µs; the wall clock now if it is not believable."""
        now_us = self._clock_us()
        try:
            kernel_ms = float(cap.get(cv2.CAP_PROP_POS_MSEC))
        except Exception:  # noqa: BLE001 - a backend without the property
            kernel_ms = 0.0
        if kernel_ms > 0:
            offset_us = (self._mono_to_wall_us or _mono_to_wall_offset_us)()
            at = int(kernel_ms * 1000) + offset_us
            if now_us - KERNEL_STAMP_WINDOW_US <= at <= now_us:
                return at
        self.fallback_stamps += 1
        return now_us

    def close(self) -> None:
        if self._cap is not None:
            try:
                self._cap.release()
            finally:
                self._cap = None

    def describe(self) -> str:
        fmt = f" {self.fourcc}" if self.fourcc else ""
        faster = f" (camera runs at {self.camera_fps:g})" if self.camera_fps and self.camera_fps > self.fps else ""
        return f"USB camera {self.device} {self.width}x{self.height}{fmt} at {self.fps:g} fps{faster}"


def _fourcc_text(value: float) -> str:
    code = int(value)
    text = "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4))
    return text if text.isprintable() and text.strip() else ""


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image
