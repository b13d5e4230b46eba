"""The Raspberry Pi Camera Module, through picamera2 (libcamera).

Two modes, chosen by what the board has (not by its name):

- **A hardware H.264 encoder** (the VideoCore's ``/dev/video11``, Pi 4 and
  earlier; ``picamera2.platform`` says ``VC4``). picamera2's
  ``H264Encoder`` feeds it straight from the camera's DMA buffers, and an
  :class:`EncodedFrameSink` (a picamera2 ``Output``) turns each encoded frame
  into an :class:`EncodedPacket`. The CPU never touches a pixel.
- **No encoder node** (Pi 5, platform ``PISP``): frames are captured raw
  (``capture_request`` / ``make_array``) and the recorder encodes them with
  libx264. Raw mode is also used on any Pi when a privacy mask is set: masked
  pixels must be blacked out before anything is encoded. (``mask_in_encoder``
  instead blacks them out in the YUV buffer in ``post_callback``, before the
  hardware encoder reads it — :class:`YuvMask`; off until checked on a Pi 4.)

Colour order: picamera2 names formats after libcamera/DRM, which name them
by the little-endian 32-bit word, so ``"RGB888"`` is laid out in memory as
B, G, R — exactly OpenCV's BGR. We ask for ``RGB888`` and get BGR arrays.

Capture time: libcamera's ``SensorTimestamp`` is in nanoseconds on the
kernel's monotonic clock (the V4L2 buffer timestamp; on a Pi, which does not
suspend, the same as time since boot), taken at the start of the frame's
readout; the start of exposure is ``SensorTimestamp - ExposureTime`` (µs), as
picamera2's own ``wait_for_timestamp_`` computes it. Where libcamera gives a
per-frame ``FrameWallClock`` (ns since the epoch, the same moment as
``SensorTimestamp``; recent versions of Raspberry Pi's libcamera) that is used, within
a sanity window; otherwise the monotonic/wall offset is re-read for every
frame (about a microsecond), so an NTP step at boot (a Pi 4 has no battery
clock) moves the very next frame, not one up to a minute later. picamera2's encoders pass
each frame's timestamp *relative to the first frame* (``Encoder._timestamp``:
``int(SensorTimestamp / 1000) - firsttimestamp``), so the sink adds
``encoder.firsttimestamp`` back, and finds the frame's ``ExposureTime`` and
``FrameWallClock`` from the metadata our ``post_callback`` kept for it.

A stalled camera: raw mode calls ``capture_request(wait=read_timeout_s)``
(picamera2 0.3.20 and later; the factory checks the version). On a timeout
or any error, ``cancel_all_and_flush()`` drops the queued job, because
picamera2 runs its jobs in order and ``stop()`` is itself a job: left queued,
the timed-out capture would hold ``stop()`` (and ``close()``) for ever.
``close()`` cancels first, then stops, and never waits more than
``close_timeout_s``.

How this was checked: there is no Pi here and picamera2 cannot be installed
on this host. The code was written against picamera2 0.3.36's source
(raspberrypi/picamera2 at 3e6dff09: ``picamera2.py``'s ``capture_request``,
``dispatch_functions``, ``process_requests``, ``cancel_all_and_flush``,
``stop``; ``job.py``; ``request.py``'s YUV420 layout; ``encoders/encoder.py``'s
``_timestamp``) and is tested against a stand-in that copies its job queue
and blocking (tests/picamera2_standin.py). hardware/README.md lists what
still has to be confirmed on a Pi.
"""

from __future__ import annotations

import io
import logging
import math
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

log = logging.getLogger(__name__)

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
HARDWARE_ENCODER_NODE = Path("/dev/video11")  # bcm2835-codec's H.264 encoder (VideoCore IV/VI)
MIN_PICAMERA2 = (0, 3, 20)
"""``capture_request(wait=<seconds>)`` with a usable timeout and recovery from a stalled camera."""
WALL_CLOCK_SANITY_US = 5_000_000
"""A per-frame wall clock further than this from the re-read clocks is not trusted."""


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
    """Converts sensor timestamps to wall-clock µs, re-reading both clocks for every frame.

    Sampling the offset once a minute left frames off by a whole NTP step for up to 60 s after
    the clock was set at boot; one ``clock_gettime`` pair costs about a microsecond.
    """

    def __init__(self, sample: Callable[[], tuple[int, int]] = sample_clock_offset) -> None:
        self._sample = sample

    def to_wall_us(self, sensor_ns: int) -> int:
        mono_ns, wall_ns = self._sample()
        return sensor_to_wall_us(sensor_ns, mono_ns, wall_ns)


def exposure_start_us(metadata: dict[str, Any], clock: WallClock) -> int | None:
    """Wall-clock µs at which the frame's exposure began, from a request's metadata; None if unknown.

    ``FrameWallClock`` (when libcamera gives it) and ``SensorTimestamp`` mark the same moment, the
    start of readout; exposure began ``ExposureTime`` µs before it.
    """
    sensor_ns = metadata.get("SensorTimestamp")
    if not sensor_ns:
        return None
    exposure_us = int(metadata.get("ExposureTime") or 0)
    by_offset = clock.to_wall_us(int(sensor_ns))
    frame_wall_ns = metadata.get("FrameWallClock")
    at = by_offset
    if frame_wall_ns and abs(int(frame_wall_ns) // 1000 - by_offset) <= WALL_CLOCK_SANITY_US:
        at = int(frame_wall_ns) // 1000
    return at - exposure_us


def keyframe_period(fps: float, keyframe_interval_s: float) -> int:
    """Frames between keyframes: rounded down, so keyframes are never further apart than configured.

    Same as the software path (``int(fps * interval)``); the epsilon keeps 0.1 * 30 from flooring to 2.
    """
    return max(1, math.floor(fps * keyframe_interval_s + 1e-9))


def h264_bitrate(width: int, height: int, fps: float) -> int:
    """The hardware encoder's bitrate from the configured size *and rate*.

    picamera2's "medium quality" (6 Mbit/s at 1080p30, scaled by pixels per second;
    ``H264Encoder._setup``), but computed with the configured frame rate: left to itself picamera2
    takes the sensor's fastest rate, capped at 30 fps (``start_encoder``), and gave about
    2.7 Mbit/s at 720p15, twice the intended rate. 1.33 Mbit/s at
    720p15; kept between 0.5 and 10 Mbit/s.
    """
    return int(min(10_000_000, max(500_000, 6_000_000 * width * height * fps / (1920 * 1080 * 30))))


def hardware_encoder_available(node: Path = HARDWARE_ENCODER_NODE) -> bool:
    """Whether this board has the VideoCore's H.264 encoder: its device node, and picamera2's platform.

    Decided by what exists rather than by the board's name: a Pi 5 has no ``/dev/video11``, and a
    kernel without the codec driver loaded has none either.
    """
    if not node.exists():
        return False
    try:
        from picamera2.platform import Platform, get_platform
    except Exception:  # noqa: BLE001 - no picamera2 here: the node alone decides
        return True
    return bool(get_platform() == Platform.VC4)


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
                 maxsize: int = 120, unsafe: Callable[[int], bool] | None = None) -> None:
        self._to_wall_us = to_wall_us
        self._unsafe = unsafe  # sensor µs -> True if the frame must not be stored (its mask failed)
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
        first = self._first_sensor_us()
        if self._unsafe is not None and timestamp is not None and first is not None and self._unsafe(first + timestamp):
            # Its privacy mask could not be applied: drop it, and everything up to the next keyframe
            # (which no longer refers to it).
            self.dropped += 1
            self._need_keyframe = True
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


class YuvMask:
    """Privacy-mask polygons blacked out in place in a YUV420 (I420) buffer, as picamera2 maps one.

    For the hardware-encoded path: run from picamera2's ``post_callback`` on
    ``MappedArray(request, "main").array`` — shape ``(height * 3 // 2, stride)``, the Y plane
    (``height`` rows of ``stride`` bytes) then U and V (``height / 2`` rows of ``stride / 2``
    bytes each), which is how picamera2's ``_make_array_shared`` lays out ``YUV420`` — before the
    encoder reads the buffer. Y is set to 16 and U, V to 128 (black, limited range); a chroma
    sample is neutral if any of its four pixels is masked. Only each polygon's bounding box is
    touched (``np.copyto`` with a precomputed ``where``), through views into the buffer.
    """

    def __init__(self, polygons: list[list[tuple[int, int]]], width: int, height: int) -> None:
        import cv2
        import numpy as np

        from agent.buffer.masks import PrivacyMask

        if width % 2 or height % 2:
            raise ValueError("YUV420 needs an even width and height")
        pm = PrivacyMask(polygons, width, height)
        masked = np.zeros((height, width), np.uint8)
        if pm.polygons:
            cv2.fillPoly(masked, pm.polygons, 1)
        self.width, self.height = width, height
        luma = masked.astype(bool)
        chroma: Any = luma.reshape(height // 2, 2, width // 2, 2).any(axis=(1, 3))
        # (luma rows, luma cols, luma where, chroma rows, chroma cols, chroma where) per polygon's box,
        # the box widened to even edges so the chroma box covers it exactly.
        self._boxes: list[tuple[slice, slice, Any, slice, slice, Any]] = []
        for pts in pm.polygons:
            x, y, w, h = cv2.boundingRect(pts)
            x0, y0 = max(0, x) // 2 * 2, max(0, y) // 2 * 2
            x1, y1 = min(width, -(-(x + w) // 2) * 2), min(height, -(-(y + h) // 2) * 2)
            if x1 <= x0 or y1 <= y0:
                continue
            ly, lx, cy, cx = slice(y0, y1), slice(x0, x1), slice(y0 // 2, y1 // 2), slice(x0 // 2, x1 // 2)
            self._boxes.append((ly, lx, luma[ly, lx].copy(), cy, cx, chroma[cy, cx].copy()))

    def apply(self, buffer: Any) -> None:
        import numpy as np

        rows, stride = buffer.shape
        h, w = self.height, self.width
        if rows != h * 3 // 2 or stride < w or stride % 2 or not buffer.flags.c_contiguous:
            raise ValueError(f"not a {w}x{h} YUV420 buffer: shape {buffer.shape}")
        flat = buffer.reshape(-1)
        if not np.shares_memory(flat, buffer):  # a copy would leave the real buffer unmasked
            raise ValueError("the YUV420 buffer could not be masked in place")
        cs, ch = stride // 2, h // 2
        y_plane = flat[: h * stride].reshape(h, stride)
        u_plane = flat[h * stride: h * stride + cs * ch].reshape(ch, cs)
        v_plane = flat[h * stride + cs * ch: h * stride + 2 * cs * ch].reshape(ch, cs)
        for ly, lx, lwhere, cy, cx, cwhere in self._boxes:
            np.copyto(y_plane[ly, lx], 16, where=lwhere)
            np.copyto(u_plane[cy, cx], 128, where=cwhere)
            np.copyto(v_plane[cy, cx], 128, where=cwhere)


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


def picamera2_import_error() -> str | None:
    """None if picamera2 loads; otherwise the real error, e.g. numpy's "dtype size changed"."""
    try:
        import picamera2  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or libcamera/simplejpeg failing underneath it
        return f"{type(exc).__name__}: {exc}"
    return None


def picamera2_available() -> bool:
    return picamera2_import_error() is None


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3])


def picamera2_version() -> tuple[int, ...] | None:
    """The installed picamera2's version, from its package metadata (apt's package has it too)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return parse_version(version("picamera2"))
    except PackageNotFoundError:
        return None


# -- the camera ------------------------------------------------------------------------
# Tested here against a stand-in with picamera2's signatures and blocking (tests/test_picamera2.py);
# not yet run on a Pi (see hardware/README.md).


class Picamera2Source:
    """A Pi camera; ``encoded`` where the hardware H.264 encoder exists, unless ``raw``."""

    def __init__(self, width: int = 1280, height: int = 720, fps: float = 15, *,
                 keyframe_interval_s: float = 1.0, raw: bool = False,
                 model: PiModel | None = None, hardware_encoder: bool | None = None,
                 read_timeout_s: float = 5.0, close_timeout_s: float = 5.0,
                 camera_factory: Callable[[], Any] | None = None,
                 clock: WallClock | None = None,
                 masks: list[list[tuple[int, int]]] | None = None, mask_in_encoder: bool = False) -> None:
        self.width, self.height, self.fps = width, height, float(fps)
        self.keyframe_interval_s = keyframe_interval_s
        self.model = model if model is not None else read_pi_model()
        if hardware_encoder is None:
            hardware_encoder = hardware_encoder_available()
        # With a privacy mask, ``mask_in_encoder`` keeps the hardware encoder and blacks the mask out
        # in the YUV buffer before the encoder reads it (YuvMask); off by default until checked on a
        # Pi 4 with hardware/pi-check (without it, a mask means raw frames masked by the recorder).
        self.masks = list(masks or [])
        self.masks_applied = bool(hardware_encoder and raw and self.masks and mask_in_encoder)
        self.kind: Literal["raw", "encoded"] = (
            "encoded" if (hardware_encoder and (not raw or self.masks_applied)) else "raw"
        )
        self._yuv_mask: YuvMask | None = None
        self._unsafe_frames: set[int] = set()
        self.mask_failures = 0
        self.read_timeout_s = read_timeout_s
        self.close_timeout_s = close_timeout_s
        self._camera_factory = camera_factory
        self._cam: Any = None
        self._encoder: Any = None
        self._sink: EncodedFrameSink | None = None
        self._clock = clock or WallClock()
        self._recent: dict[int, dict[str, Any]] = {}  # sensor µs -> metadata, for the encoded path
        self.timeouts = 0

    @property
    def stream_template(self) -> VideoStream | None:
        return self._sink.template if (self.kind == "encoded" and self._sink is not None) else None

    def describe(self) -> str:
        board = self.model.name if self.model else "unknown board"
        mode = "hardware H.264" if self.kind == "encoded" else "raw frames, encoded in software"
        return f"Pi camera on {board} {self.width}x{self.height} at {self.fps:g} fps, {mode}"

    def open(self) -> None:
        self.close()
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
        """Stop and release the camera, never waiting more than ``close_timeout_s``.

        picamera2's ``stop()`` is a job queued behind any capture still waiting for a frame, so
        pending jobs are cancelled first (``cancel_all_and_flush``); and the whole shutdown runs
        in a helper thread, so a camera that hangs inside libcamera cannot hold the recorder (or
        systemd's stop) hostage.
        """
        cam, self._cam = self._cam, None
        encoder, self._encoder = self._encoder, None
        if cam is not None:
            done = threading.Event()

            def shut_down() -> None:
                for step in ("cancel_all_and_flush", "stop_recording" if encoder is not None else "stop", "close"):
                    try:
                        getattr(cam, step)()
                    except Exception:  # noqa: BLE001 - stopping a failed camera may fail too
                        pass
                done.set()

            threading.Thread(target=shut_down, name="picamera2-close", daemon=True).start()
            if not done.wait(self.close_timeout_s):
                log.warning("the Pi camera did not stop within %g s; leaving it behind", self.close_timeout_s)
        self._recent.clear()
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _new_camera(self) -> Any:
        if self._camera_factory is not None:
            return self._camera_factory()
        from picamera2 import Picamera2

        return Picamera2()

    def _start_camera(self) -> None:
        try:
            cam = self._new_camera()
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
            encoder = H264Encoder(bitrate=h264_bitrate(self.width, self.height, self.fps), repeat=True,
                                  iperiod=keyframe_period(self.fps, self.keyframe_interval_s))
            if self.masks_applied:
                self._yuv_mask = YuvMask(self.masks, self.width, self.height)
            sink = EncodedFrameSink(self._encoded_wall_us, lambda: encoder.firsttimestamp,
                                    unsafe=self._unsafe_frame)
            self._sink = sink
            self._encoder = encoder
            cam.post_callback = self._post_callback
            cam.start_recording(encoder, _output_class()(sink))
        else:
            cam.configure(cam.create_video_configuration(
                main={"size": (self.width, self.height), "format": "RGB888"}, controls=controls, buffer_count=4))
            cam.start()

    def _post_callback(self, request: Any) -> None:
        """picamera2's ``post_callback``: runs in its event loop just before the encoder gets the frame."""
        sensor_us = self._remember_metadata(request)
        if self._yuv_mask is None:
            return
        try:
            from picamera2 import MappedArray

            with MappedArray(request, "main") as mapped:
                self._yuv_mask.apply(mapped.array)
        except Exception as exc:  # noqa: BLE001 - never raise into picamera2's thread
            self.mask_failures += 1
            if sensor_us is not None:
                self._unsafe_frames.add(sensor_us)
            else:
                self._sink_error(f"the privacy mask could not be applied: {exc}")
            log.error("privacy mask not applied to a frame (%s); it is dropped", exc)

    def _sink_error(self, error: str) -> None:
        if self._sink is not None:
            self._sink.error = error

    # picamera2's encoder computes a frame's µs as ``int(SensorTimestamp / 1000)`` (a float division,
    # which can be 1 µs off after a long uptime), so lookups by it accept ±1 µs.

    def _unsafe_frame(self, sensor_us: int) -> bool:
        for us in (sensor_us, sensor_us - 1, sensor_us + 1):
            if us in self._unsafe_frames:
                self._unsafe_frames.discard(us)
                return True
        return False

    def _remember_metadata(self, request: Any) -> int | None:
        try:
            md = request.get_metadata()
            sensor_us = int(md["SensorTimestamp"]) // 1000
            self._recent[sensor_us] = md
            while len(self._recent) > 64:
                self._recent.pop(next(iter(self._recent)))
            return sensor_us
        except Exception:  # noqa: BLE001 - never raise into picamera2's thread
            return None

    def _encoded_wall_us(self, sensor_ns: int) -> int:
        us = sensor_ns // 1000
        md = self._recent.pop(us, None) or self._recent.pop(us - 1, None) or self._recent.pop(us + 1, None)
        at = exposure_start_us(md, self._clock) if md else None
        return at if at is not None else self._clock.to_wall_us(sensor_ns)

    def _read_raw(self) -> Frame:
        import numpy as np  # raw mode only: the hardware-encoded mode never needs it

        cam = self._cam
        try:
            # wait=<seconds>: without it picamera2 waits for ever on a stalled camera.
            request = cam.capture_request(wait=self.read_timeout_s)
        except Exception as exc:  # noqa: BLE001 - TimeoutError, CancelledError, libcamera errors
            self.timeouts += 1
            try:
                cam.cancel_all_and_flush()  # or the timed-out job stays queued ahead of stop()
            except Exception:  # noqa: BLE001
                pass
            if isinstance(exc, TimeoutError):
                raise SourceUnavailable(f"the Pi camera sent nothing for {self.read_timeout_s:g} s") from None
            raise SourceUnavailable(f"the Pi camera failed: {type(exc).__name__}: {exc}") from None
        try:
            image = request.make_array("main")
            metadata = request.get_metadata()
        except Exception as exc:  # noqa: BLE001
            raise SourceUnavailable(f"the Pi camera's frame could not be read: {exc}") from None
        finally:
            try:
                request.release()
            except Exception:  # noqa: BLE001
                pass
        capture_us = exposure_start_us(metadata, self._clock)
        if capture_us is None:
            capture_us = time.time_ns() // 1000
        image = np.ascontiguousarray(image[: self.height, : self.width, :3])
        return Frame(capture_us, image)
