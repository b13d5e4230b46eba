"""Camera sources behind one small interface.

A source yields either raw frames (synthetic, USB webcams, the Pi camera in
software mode), which the recorder masks and encodes, or already-encoded
H.264 packets (RTSP doorbells, recorded files), which are stored as they are
when no privacy mask is set. Every item carries its capture time in
microseconds since the epoch (UTC): that time is what a request's window is
matched against, so sources must stamp it as close to the sensor as they can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import av
    import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One raw picture, BGR (OpenCV's order), ``height x width x 3`` uint8."""

    capture_us: int
    image: np.ndarray


@dataclass(frozen=True, slots=True)
class EncodedPacket:
    """One H.264 access unit from a source that encodes itself."""

    capture_us: int
    packet: av.Packet
    keyframe: bool


MAX_NUDGE_US = 250_000
"""Capture-time jitter up to this much backwards is smoothed; a larger step back is a clock change."""


def stamp_forward(last_us: int | None, t: int) -> int:
    """Keep capture times strictly increasing (a segment's pts must be) across small jitter.

    A larger step back is the wall clock being corrected (NTP): nudging would stamp every frame
    1 µs apart until the clock catches up, so the true, earlier time is returned and the recorder
    drops those frames, as it does for any source whose clock steps back.
    """
    if last_us is not None and t <= last_us and last_us - t <= MAX_NUDGE_US:
        return last_us + 1
    return t


class SourceUnavailable(Exception):
    """The camera is gone for now (unplugged, network drop); the recorder reopens it with backoff."""


class SourceEnded(Exception):
    """A finite source (a file) has no more frames."""


@runtime_checkable
class Source(Protocol):
    width: int
    height: int
    fps: float

    @property
    def kind(self) -> Literal["raw", "encoded"]:
        """``raw`` frames or ``encoded`` packets. Read-only here, so a source that only ever gives
        raw frames may declare ``kind: Literal["raw"]``."""

    def open(self) -> None:
        """Connect to the camera; raise :class:`SourceUnavailable` if it is not there."""

    def read(self) -> Frame | EncodedPacket:
        """Block until the next frame; raise SourceUnavailable or SourceEnded."""

    def close(self) -> None: ...

    def describe(self) -> str:
        """A few words for ``status``: which camera, which mode."""

    @property
    def stream_template(self) -> av.video.stream.VideoStream | None:
        """For ``encoded`` sources, the input stream to copy codec parameters from."""
