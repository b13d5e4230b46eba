"""A camera that draws its own clock.

Every frame shows moving content, its capture time as text, and a QR code
whose text is the capture time in RFC 3339 UTC with milliseconds. Tests read
the QR code back out of any decoded clip to prove which frames it holds, and
anyone auditing a delivery made from a synthetic camera can do the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import cv2
import numpy as np

from agent.buffer.capture import Frame
from agent.timeutil import format_utc, from_us


def _now_us() -> int:
    return time.time_ns() // 1000


class SyntheticSource:
    """Frames at ``fps``.

    ``realtime=True`` paces frames by the wall clock, like a camera.
    ``realtime=False`` stamps frames ``start_us + i / fps`` and returns them
    as fast as they can be drawn, so a test can record an hour in seconds.
    """

    kind: Literal["raw"] = "raw"
    stream_template = None

    def __init__(
        self,
        width: int = 1280,
        height: int = 720,
        fps: float = 15,
        *,
        realtime: bool = True,
        start_us: int | None = None,
        clock_us: Callable[[], int] = _now_us,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.width, self.height, self.fps = width, height, float(fps)
        self.realtime = realtime
        self._clock_us = clock_us
        self._sleep = sleep
        self._start_us = start_us
        self._index = 0
        params = cv2.QRCodeEncoder.Params()
        # Level M survives the blur of fast H.264 presets at small sizes.
        params.correction_level = cv2.QRCodeEncoder_CORRECT_LEVEL_M
        self._qr = cv2.QRCodeEncoder.create(params)
        self._background = _background(width, height)
        self._module_px = max(4, min(width, height) // 90)

    def open(self) -> None:
        if self._start_us is None:
            self._start_us = self._clock_us()
        self._index = 0

    def close(self) -> None:
        return None

    def describe(self) -> str:
        return f"synthetic test pattern {self.width}x{self.height} at {self.fps:g} fps"

    def read(self) -> Frame:
        assert self._start_us is not None, "open() first"
        due = self._start_us + round(self._index * 1_000_000 / self.fps)
        if self.realtime:
            wait = (due - self._clock_us()) / 1e6
            if wait > 0:
                self._sleep(wait)
            capture_us = self._clock_us() if wait < -1 else due
        else:
            capture_us = due
        self._index += 1
        return Frame(capture_us, self.draw(capture_us))

    def draw(self, capture_us: int) -> np.ndarray:
        """The picture for a capture time; pure, so tests can draw the expected frame."""
        img = np.roll(self._background, (capture_us // 20_000) % self.width, axis=1)
        h, w = self.height, self.width
        # A bar sweeping across once every two seconds: motion the encoder must track.
        x = int((capture_us % 2_000_000) / 2_000_000 * (w - w // 10))
        cv2.rectangle(img, (x, h // 2), (x + w // 10, h // 2 + h // 8), (40, 200, 255), -1)
        stamp = format_utc(from_us(capture_us), ms=True)
        qr = self._qr.encode(stamp)
        qr = cv2.resize(qr, None, fx=self._module_px, fy=self._module_px, interpolation=cv2.INTER_NEAREST)
        qr = cv2.copyMakeBorder(qr, *(4 * self._module_px,) * 4, cv2.BORDER_CONSTANT, value=255)
        qh, qw = qr.shape[:2]
        if qh <= h and qw <= w:
            img[:qh, :qw] = qr[:, :, None]
        scale = max(0.4, h / 720)
        cv2.putText(img, stamp, (max(4, qw + 8) if qw + 8 < w // 2 else 4, h - int(20 * scale)),
                    cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
        return img


def _background(width: int, height: int) -> np.ndarray:
    xs = np.linspace(0, 255, width, dtype=np.float32)
    ys = np.linspace(0, 255, height, dtype=np.float32)
    b = np.add.outer(ys * 0.3, xs * 0.7).astype(np.uint8)
    g = np.add.outer(ys * 0.6, xs * 0.2).astype(np.uint8)
    r = np.full((height, width), 60, np.uint8)
    return np.dstack([b, g, r])


def read_qr_time(image: np.ndarray, detector: cv2.QRCodeDetector | None = None) -> str | None:
    """The RFC 3339 text in a frame's QR code, or None if it cannot be read.

    OpenCV's classic detector is fast but misses about one frame in 300 after
    H.264 compression at small sizes; the ArUco-based detector reads those.
    """
    det = detector or cv2.QRCodeDetector()
    h, w = image.shape[:2]
    # The code sits in the top-left corner; decoding only that region is faster and surer.
    region = image[: min(h, max(h // 2, 160)), : min(w, max(w // 2, 160))]
    text, _, _ = det.detectAndDecode(region)
    if not text:
        text, _, _ = _fallback_detector().detectAndDecode(region)
    return text or None


_fallback: cv2.QRCodeDetectorAruco | None = None


def _fallback_detector() -> cv2.QRCodeDetectorAruco:
    global _fallback
    if _fallback is None:
        _fallback = cv2.QRCodeDetectorAruco()
    return _fallback
