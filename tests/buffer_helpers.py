"""Helpers for the rolling-buffer tests: finite synthetic cameras, real segments, reading them back."""

from __future__ import annotations

import time
from pathlib import Path

import av
import cv2
import numpy as np

from agent.buffer.capture import Frame, SourceEnded, SourceUnavailable
from agent.buffer.capture.synthetic import SyntheticSource, read_qr_time
from agent.buffer.segmentfile import EncoderSettings, SegmentFile, SegmentFileInfo
from agent.timeutil import format_utc, from_us

W, H, FPS = 320, 240, 15
FRAME_US = round(1_000_000 / FPS)


def now_us() -> int:
    return time.time_ns() // 1000


def stamp(us: int) -> str:
    """What the synthetic camera writes into its QR code for a capture time."""
    return format_utc(from_us(us), ms=True)


class FiniteSynthetic(SyntheticSource):
    """A synthetic camera that ends after ``frames`` frames and remembers what it produced."""

    def __init__(self, frames: int, *, start_us: int, realtime: bool = False, live: bool | None = None) -> None:
        super().__init__(W, H, FPS, realtime=realtime, start_us=start_us)
        self.limit = frames
        self.produced: list[int] = []
        if live is not None:
            self.live = live

    def read(self) -> Frame:
        if len(self.produced) >= self.limit:
            raise SourceEnded("done")
        f = super().read()
        self.produced.append(f.capture_us)
        return f


class FlakySynthetic(FiniteSynthetic):
    """Disappears after ``fail_after`` frames, refuses ``failed_opens`` reopen attempts,
    then comes back ``outage_us`` later in capture time (as a real outage would)."""

    def __init__(self, frames: int, *, start_us: int, fail_after: int, failed_opens: int, outage_us: int) -> None:
        super().__init__(frames, start_us=start_us)
        self.fail_after, self.failed_opens, self.outage_us = fail_after, failed_opens, outage_us
        self.open_times: list[float] = []
        self._failed = False
        self._offset = 0

    def open(self) -> None:
        self.open_times.append(time.monotonic())
        if self._failed:
            if self.failed_opens > 0:
                self.failed_opens -= 1
                raise SourceUnavailable("no such device")
        index = self._index
        super().open()
        self._index = index  # keep counting frames across the outage

    def read(self) -> Frame:
        if len(self.produced) == self.fail_after and not self._failed:
            self._failed = True
            self._start_us = (self._start_us or 0) + self.outage_us
            raise SourceUnavailable("camera unplugged")
        return super().read()


def write_segment(path: Path, start_us: int, frames: int) -> SegmentFileInfo:
    """A real finished segment of the synthetic camera starting at ``start_us``."""
    src = SyntheticSource(W, H, FPS, realtime=False, start_us=start_us)
    src.open()
    seg = SegmentFile(path, settings=EncoderSettings("libx264", W, H, FPS))
    for _ in range(frames):
        seg.add_frame(src.read())
    info = seg.finish()
    assert info is not None
    return info


_PAINTER = SyntheticSource(W, H, FPS, realtime=False, start_us=0)


def identify(image: np.ndarray, us: int, det: cv2.QRCodeDetector) -> str | None:
    """The capture time a decoded synthetic frame shows: its QR code, or, for the few frames
    whose QR code does not survive compression at 320x240, the capture time whose drawing
    (the source's pure ``draw``) it matches clearly better than its neighbours'."""
    text = read_qr_time(image, det)
    if text is not None or image.shape[:2] != (H, W):
        return text
    quad = (slice(0, H // 2), slice(0, W // 2))  # the top-left quarter: never masked in these tests
    errors = {t: float(np.abs(image[quad].astype(np.int16) - _PAINTER.draw(t)[quad].astype(np.int16)).mean())
              for t in (us - FRAME_US, us, us + FRAME_US)}
    best = min(errors, key=errors.__getitem__)
    if best == us and errors[us] < 6 and all(errors[t] > errors[us] * 1.5 for t in errors if t != us):
        return stamp(us)
    return None


def decoded_frames(path: Path, start_us: int) -> list[tuple[int, str | None]]:
    """Every frame of a segment: (capture time from start_us + pts, the capture time its picture shows)."""
    det = cv2.QRCodeDetector()
    out = []
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        for frame in c.decode(stream):
            us = start_us + int(frame.pts * stream.time_base * 1_000_000)
            out.append((us, identify(frame.to_ndarray(format="bgr24"), us, det)))
    return out


def packet_count(path: Path) -> tuple[int, bool]:
    """Number of packets, and whether the first is a keyframe."""
    with av.open(str(path)) as c:
        pkts = [p for p in c.demux(c.streams.video[0]) if p.size]
    return len(pkts), bool(pkts and pkts[0].is_keyframe)
