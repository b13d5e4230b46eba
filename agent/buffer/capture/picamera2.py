"""The Raspberry Pi Camera Module, through picamera2 (libcamera).

Two modes, chosen by the board:

- **Pi 4 and earlier** have a hardware H.264 encoder. picamera2's
  ``H264Encoder`` feeds it straight from the camera's DMA buffers, and an
  :class:`EncodedFrameSink` (a picamera2 ``Output``) turns each encoded frame
  into an :class:`EncodedPacket`. The CPU never touches a pixel.
- **Pi 5** has no H.264 encoder, so frames are captured raw
  (``capture_request`` / ``make_array``) and the recorder encodes them with
  libx264. Raw mode is also used on any Pi when a privacy mask is set: masked
  pixels must be blacked out before anything is encoded.

Colour order: picamera2 names formats after libcamera/DRM, which name them
by the little-endian 32-bit word, so ``"RGB888"`` is laid out in memory as
B, G, R — exactly OpenCV's BGR. We ask for ``RGB888`` and get BGR arrays.

Capture time: libcamera's ``SensorTimestamp`` is the start of exposure in
nanoseconds on the kernel's monotonic clock (the V4L2 buffer timestamp;
on a Pi, which does not suspend, the same as time since boot). It is turned
into wall-clock microseconds by :func:`sensor_to_wall_us` with an offset
between the two clocks sampled when the camera starts and refreshed every
minute (so an NTP step after boot is followed). picamera2's encoders pass
each frame's timestamp *relative to the first frame* (``Encoder._timestamp``:
``SensorTimestamp // 1000 - firsttimestamp``), so the sink adds
``encoder.firsttimestamp`` back.

How this was checked: there is no Pi here and picamera2 cannot be installed
on this host. The pure parts (board detection, clock conversion, the sink
that turns Annex-B access units into packets and a stream template) are
tested with real H.264 from libx264. The code that calls picamera2
(:meth:`Picamera2Source._start_camera` and :meth:`_read_raw`, marked
UNTESTED HERE) was written against picamera2's source on GitHub
(raspberrypi/picamera2: ``encoders/encoder.py`` at commit bf814e5b — the
recent API with ``outputframe(frame, keyframe, timestamp, packet, audio)`` —
``encoders/h264_encoder.py`` at c2f8ab5c, ``encoders/v4l2_encoder.py`` at
042bb7ca, ``outputs/output.py`` at ee44f64a; the package version of those
commits was not pinned down) and must be tried on a Pi before it is relied on.
"""

from __future__ import annotations

import io
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import av

from agent.buffer.capture import EncodedPacket, Frame, SourceUnavailable, stamp_forward

if TYPE_CHECKING:
    from av.video.stream import VideoStream

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
CLOCK_RESYNC_NS = 60 * 1_000_000_000


# -- pure parts ---------------------------------------------------------------


@dataclass(frozen=True)
class PiModel:
    name: str
    generation: int | None  # 1..5; None when the text names a Pi we do not recognise
    has_h264_encoder: bool


def parse_pi_model(text: str) -> PiModel | None:
    """The board, from ``/proc/device-tree/model``'s text; None if it is not a Raspberry Pi.

    The Pi 5 family (Pi 5, Compute Module 5, Pi 500) dropped the H.264 encoder;
    every earlier board has one.
    """
    name = text.replace("\x00", "").strip()
    if not name.startswith("Raspberry Pi"):
        return None
    rest = name[len("Raspberry Pi"):]
    generation: int | None
    if m := re.match(r"\s+(?:Compute Module\s+)?(\d)\b", rest):
        generation = int(m.group(1))
    elif re.match(r"\s+(\d)00\b", rest):  # Pi 400, Pi 500: keyboards built on the Pi 4 / Pi 5
        generation = int(re.match(r"\s+(\d)00\b", rest).group(1))  # type: ignore[union-attr]
    elif re.match(r"\s+Zero 2\b", rest):
        generation = 3  # BCM2710, the Pi 3's chip
    elif re.match(r"\s+(?:Zero|Model|Compute Module\s*(?:Rev|$))", rest):
        generation = 1
    else:
        generation = None
    has_encoder = generation is not None and generation <= 4
    return PiModel(name, generation, has_encoder)


def read_pi_model(path: Path = DEVICE_TREE_MODEL) -> PiModel | None:
    try:
        return parse_pi_model(path.read_bytes().decode("utf-8", "replace"))
    except OSError:
        return None


def sensor_to_wall_us(sensor_ns: int, mono_ns: int, wall_ns: int) -> int:
    """A monotonic-clock timestamp as wall-clock µs, given one simultaneous reading of both clocks."""
    return (sensor_ns + (wall_ns - mono_ns)) // 1000


def sample_clock_offset() -> tuple[int, int]:
    """(monotonic ns, wall ns) read as close together as Python allows: wall between two monotonic reads."""
    a = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    wall = time.time_ns()
    b = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    return (a + b) // 2, wall


class WallClock:
    """Converts sensor timestamps, refreshing the clock offset once a minute."""

    def __init__(self, sample: Callable[[], tuple[int, int]] = sample_clock_offset) -> None:
        self._sample = sample
        self._mono_ns, self._wall_ns = sample()

    def to_wall_us(self, sensor_ns: int) -> int:
        if sensor_ns - self._mono_ns > CLOCK_RESYNC_NS:
            self._mono_ns, self._wall_ns = self._sample()
        return sensor_to_wall_us(sensor_ns, self._mono_ns, self._wall_ns)


def template_from_annexb(access_unit: bytes) -> tuple[Any, VideoStream]:
    """A stream to copy codec parameters from, made by probing one Annex-B keyframe (with SPS/PPS).

    Returns the container too: the stream is only valid while it stays open.
    """
    container = av.open(io.BytesIO(access_unit), format="h264")
    if not container.streams.video:
        container.close()
        raise SourceUnavailable("the camera's first H.264 keyframe could not be parsed")
    return container, container.streams.video[0]


class EncodedFrameSink:
    """What picamera2's encoder thread calls for every encoded frame; ``read()`` side is the recorder.

    Bounded: if the recorder stalls, packets are dropped up to the next
    keyframe (a decoder cannot start mid-GOP), and ``dropped`` counts them.
    """

    def __init__(self, to_wall_us: Callable[[int], int], first_sensor_us: Callable[[], int | None],
                 maxsize: int = 120) -> None:
        self._to_wall_us = to_wall_us
        self._first_sensor_us = first_sensor_us
        self._queue: queue.Queue[EncodedPacket] = queue.Queue(maxsize)
        self._need_keyframe = True
        self.template: VideoStream | None = None
        self._template_container: Any = None
        self.template_ready = threading.Event()
        self.dropped = 0
        self.error: str | None = None
        self._last_us: int | None = None

    def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None,
                    packet: Any = None, audio: bool = False) -> None:
        if audio or frame is None:
            return
        data = bytes(frame)
        if self._need_keyframe and not keyframe:
            self.dropped += 1
            return
        if self.template is None:
            try:
                self._template_container, self.template = template_from_annexb(data)
            except Exception as exc:  # noqa: BLE001 - reported to read(), never raised into picamera2's thread
                self.error = f"the camera's H.264 stream could not be parsed: {exc}"
                self.template_ready.set()
                return
            self.template_ready.set()
        first = self._first_sensor_us()
        if timestamp is None or first is None:
            capture_us = time.time_ns() // 1000
        else:
            capture_us = self._to_wall_us((first + timestamp) * 1000)
        # Small jitter is smoothed; a real step back passes through for the recorder to drop.
        self._last_us = capture_us = stamp_forward(self._last_us, capture_us)
        try:
            pkt = av.Packet(data)
            pkt.is_keyframe = bool(keyframe)  # the MP4 muxer marks sync samples from this flag
            self._queue.put_nowait(EncodedPacket(capture_us, pkt, bool(keyframe)))
            self._need_keyframe = False
        except queue.Full:
            self.dropped += 1
            self._need_keyframe = True

    def get(self, timeout: float) -> EncodedPacket:
        if self.error:
            raise SourceUnavailable(self.error)
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise SourceUnavailable(f"the Pi camera sent nothing for {timeout:g} s") from None

    def close(self) -> None:
        if self._template_container is not None:
            self._template_container.close()
            self._template_container = None


def _output_class() -> type:
    """picamera2's encoders only accept subclasses of its Output, so the sink is mixed in lazily."""
    from picamera2.outputs import Output

    class _SinkOutput(Output):
        def __init__(self, sink: EncodedFrameSink) -> None:
            super().__init__()
            self.sink = sink

        def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None,
                        packet: Any = None, audio: bool = False) -> None:
            if self.recording:
                self.sink.outputframe(frame, keyframe, timestamp, packet, audio)

    return _SinkOutput


def picamera2_available() -> bool:
    try:
        import picamera2  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or libcamera missing underneath it
        return False
    return True


# -- the camera (UNTESTED HERE: needs a Pi) -------------------------------------


class Picamera2Source:
    """A Pi camera; ``encoded`` on boards with a hardware H.264 encoder unless ``raw``."""

    def __init__(self, width: int = 1280, height: int = 720, fps: float = 15, *,
                 keyframe_interval_s: float = 1.0, raw: bool = False,
                 model: PiModel | None = None, read_timeout_s: float = 5.0) -> None:
        self.width, self.height, self.fps = width, height, float(fps)
        self.keyframe_interval_s = keyframe_interval_s
        self.model = model if model is not None else read_pi_model()
        self.kind: Literal["raw", "encoded"] = (
            "encoded" if (self.model is not None and self.model.has_h264_encoder and not raw) else "raw"
        )
        self.read_timeout_s = read_timeout_s
        self._cam: Any = None
        self._encoder: Any = None
        self._sink: EncodedFrameSink | None = None
        self._clock = WallClock()

    @property
    def stream_template(self) -> VideoStream | None:
        return self._sink.template if (self.kind == "encoded" and self._sink is not None) else None

    def describe(self) -> str:
        board = self.model.name if self.model else "unknown board"
        mode = "hardware H.264" if self.kind == "encoded" else "raw frames, encoded in software"
        return f"Pi camera on {board} {self.width}x{self.height} at {self.fps:g} fps, {mode}"

    def open(self) -> None:
        self.close()
        self._clock = WallClock()
        try:
            self._start_camera()
        except SourceUnavailable:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - libcamera's errors are many and undocumented
            self.close()
            raise SourceUnavailable(
                f"the Pi camera did not start ({exc}); check the ribbon cable and run "
                "`rpicam-hello --list-cameras`; only one program can use the camera at a time"
            ) from None
        if self.kind == "encoded":
            assert self._sink is not None
            # The stream template comes from the first keyframe, so wait for it here:
            # the recorder reads stream_template right after open().
            if not self._sink.template_ready.wait(self.read_timeout_s) or self._sink.template is None:
                error = self._sink.error or f"the Pi camera sent no keyframe within {self.read_timeout_s:g} s"
                self.close()
                raise SourceUnavailable(error)

    def read(self) -> Frame | EncodedPacket:
        if self._cam is None:
            raise SourceUnavailable("the Pi camera is not open")
        if self.kind == "encoded":
            assert self._sink is not None
            return self._sink.get(self.read_timeout_s)
        return self._read_raw()

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                if self._encoder is not None:
                    cam.stop_recording()
                else:
                    cam.stop()
            except Exception:  # noqa: BLE001 - stopping a failed camera may fail too
                pass
            try:
                cam.close()
            except Exception:  # noqa: BLE001
                pass
        self._encoder = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    # UNTESTED HERE ----------------------------------------------------------------

    def _start_camera(self) -> None:
        from picamera2 import Picamera2

        try:
            cam = Picamera2()
        except (IndexError, RuntimeError) as exc:
            raise SourceUnavailable(
                f"no Pi camera found ({exc}): check the ribbon cable is seated both ends, "
                "then `rpicam-hello --list-cameras`"
            ) from None
        self._cam = cam
        controls = {"FrameRate": self.fps}
        if self.kind == "encoded":
            from picamera2.encoders import H264Encoder

            cam.configure(cam.create_video_configuration(
                main={"size": (self.width, self.height), "format": "YUV420"}, controls=controls))
            encoder = H264Encoder(repeat=True, iperiod=max(1, round(self.fps * self.keyframe_interval_s)))
            sink = EncodedFrameSink(self._clock.to_wall_us, lambda: encoder.firsttimestamp)
            self._sink = sink
            self._encoder = encoder
            cam.start_recording(encoder, _output_class()(sink))
        else:
            cam.configure(cam.create_video_configuration(
                main={"size": (self.width, self.height), "format": "RGB888"}, controls=controls, buffer_count=4))
            cam.start()

    def _read_raw(self) -> Frame:
        import numpy as np  # raw mode only: the hardware-encoded mode never needs it

        request = self._cam.capture_request()
        try:
            image = request.make_array("main")
            metadata = request.get_metadata()
        finally:
            request.release()
        sensor_ns = metadata.get("SensorTimestamp")
        capture_us = self._clock.to_wall_us(int(sensor_ns)) if sensor_ns else time.time_ns() // 1000
        image = np.ascontiguousarray(image[: self.height, : self.width, :3])
        return Frame(capture_us, image)
