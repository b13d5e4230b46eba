"""USB (UVC) webcams through OpenCV's V4L2 backend.

MJPEG is requested where the camera offers it: over USB 2 most webcams can
only send 720p at a useful frame rate as MJPEG, raw YUYV tops out at a few
frames per second. The size and rate are requests; the camera answers with
what it can do, and ``width``/``height``/``fps`` report what it chose.

Capture time is the wall clock right after ``grab()`` returns. That is late
by the camera's exposure and USB transfer (tens of ms) and by any frames
queued in the driver if the recorder falls behind. The kernel's buffer
timestamp (CLOCK_MONOTONIC, via ``CAP_PROP_POS_MSEC``) would be closer to the
sensor; it is not used yet because some UVC drivers report it unreliably.

OpenCV sits behind :class:`Capture`, a four-method protocol, so tests drive
this source with a scripted capture object: this machine has no camera.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np

from agent.buffer.capture import Frame, SourceUnavailable


def _now_us() -> int:
    return time.time_ns() // 1000


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
    ) -> None:
        self.device = device
        self.requested = (width, height, float(fps))
        self.width, self.height, self.fps = width, height, float(fps)
        self.fourcc = ""
        self._open_capture = open_capture
        self._clock_us = clock_us
        self._cap: Capture | None = None

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
        self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) or width
        self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) or height
        self.fps = float(cap.get(cv2.CAP_PROP_FPS)) or fps
        self._cap = cap

    def read(self) -> Frame:
        cap = self._cap
        if cap is None:
            raise SourceUnavailable(f"camera {self.device} is not open")
        if not cap.grab():
            self.close()
            raise SourceUnavailable(f"camera {self.device} stopped sending frames (unplugged, or its USB port lost power?)")
        capture_us = self._clock_us()
        ok, image = cap.retrieve()
        if not ok or image is None:
            self.close()
            raise SourceUnavailable(f"camera {self.device} sent a frame that could not be decoded")
        image = _as_bgr(image)
        h, w = image.shape[:2]
        if (w, h) != (self.width, self.height):
            # The driver changed its mind (or lied in get()): report what really arrives.
            self.width, self.height = w, h
        return Frame(capture_us, image)

    def close(self) -> None:
        if self._cap is not None:
            try:
                self._cap.release()
            finally:
                self._cap = None

    def describe(self) -> str:
        fmt = f" {self.fourcc}" if self.fourcc else ""
        return f"USB camera {self.device} {self.width}x{self.height}{fmt} at {self.fps:g} fps"


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
