"""RTSP doorbells and recorded files, read with PyAV (FFmpeg).

Choices, and why:

- **H.264 is stored as it is** (kind ``encoded``): the camera already spent
  its own silicon on encoding, and a Pi re-encoding 720p wastes power and
  quality. ``stream_template`` is the input stream, so a segment copies the
  camera's codec parameters.
- **Anything else is decoded** (kind ``raw``): H.265, MJPEG or MPEG-4 cameras
  still work; their frames are re-encoded to H.264 by the recorder like a
  webcam's. (H.265 decoding in software is heavy on a Pi 4: prefer H.264 in
  the camera's settings.) H.264 with B-frames is decoded too, because a
  segment's packets carry capture times as both pts and dts, which only works
  without frame reordering.
- **With a privacy mask the source decodes** (``raw=True``): masked pixels
  must never reach storage, and the only way to black out part of an encoded
  picture is to decode, mask and re-encode it. ``make_source`` sets this
  whenever ``camera.masks`` is not empty, so a recorder cannot forget it.
- **Capture time for RTSP** is the wall clock when the first packet arrived
  plus the stream's own pts distance from that packet (:class:`StreamClock`).
  The estimate is late by the network and camera latency of that first
  packet; it re-anchors when it would place a frame in the future (a later
  packet arrived faster, so the old anchor was too late) or more than
  ``max_lag`` behind (the camera's clock drifts from ours, or the camera
  restarted its timestamps). RTCP sender reports, which map RTP time to the
  camera's NTP wall clock, would be better when the camera's clock is synced;
  FFmpeg exposes them only as ``start_time_realtime``, not per packet, so this
  is left for later.
- **Capture time for files** is a chosen start time (``now`` by default, or
  the file's ``creation_time`` tag) plus the packet's pts distance from the
  first packet (a raw ``.h264`` file has no pts: each frame follows the one before by its
  duration). ``realtime=True`` paces the file like a live camera;
  ``realtime=False`` reads as fast as possible (tests, importing footage).
- End of stream: a file raises :class:`SourceEnded`; an RTSP stream that ends
  or drops raises :class:`SourceUnavailable`, and the recorder reconnects.

Addresses in messages and ``describe()`` never show a password.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import av

from agent.buffer.capture import EncodedPacket, Frame, SourceEnded, SourceUnavailable, stamp_forward
from agent.display import redact_url
from agent.timeutil import to_us

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream

StartAt = int | Literal["now", "creation_time"]


def _now_us() -> int:
    return time.time_ns() // 1000


class StreamClock:
    """Maps a live stream's timestamps (µs, any origin) to wall-clock capture times (µs).

    Pure arithmetic over (pts, arrival time) pairs so it can be tested without a camera.
    """

    def __init__(self, max_lag_us: int = 2_000_000) -> None:
        self.max_lag_us = max_lag_us
        self._anchor: tuple[int, int] | None = None  # (pts_us, wall_us)
        self._last_pts: int | None = None
        self._last_us: int | None = None
        self.reanchors = 0

    def capture_us(self, pts_us: int | None, arrival_us: int) -> int:
        if pts_us is None:
            t = arrival_us
        else:
            if self._anchor is None or (self._last_pts is not None and pts_us < self._last_pts - self.max_lag_us):
                self._reanchor(pts_us, arrival_us, count=self._anchor is not None)
            assert self._anchor is not None
            t = self._anchor[1] + (pts_us - self._anchor[0])
            if t > arrival_us or arrival_us - t > self.max_lag_us:
                self._reanchor(pts_us, arrival_us)
                t = arrival_us
            self._last_pts = pts_us
        self._last_us = t = stamp_forward(self._last_us, t)
        return t

    def _reanchor(self, pts_us: int, wall_us: int, *, count: bool = True) -> None:
        self._anchor = (pts_us, wall_us)
        if count:
            self.reanchors += 1


class StreamSource:
    """An RTSP camera (``kind_of_url='rtsp'``) or a video file (``'file'``).

    ``kind``, ``width``, ``height`` and ``fps`` are final after :meth:`open`:
    whether the stream is stored as is depends on its codec, which only the
    stream itself can say.
    """

    def __init__(
        self,
        url: str,
        *,
        live: bool,
        raw: bool = False,
        realtime: bool = True,
        start_at: StartAt = "now",
        timeout_s: float = 5.0,
        clock_us: Callable[[], int] = _now_us,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self.live = live
        self.want_raw = raw
        self.realtime = realtime
        self.start_at = start_at
        self.timeout_s = timeout_s
        self._clock_us = clock_us
        self._sleep = sleep
        self.kind: Literal["raw", "encoded"] = "raw" if raw else "encoded"
        self.width = 0
        self.height = 0
        self.fps = 0.0
        self.codec = ""
        self.decode_reason = ""
        self._container: InputContainer | None = None
        self._stream: VideoStream | None = None
        self._packets: Iterator[av.Packet] | None = None
        self._pending: deque[Frame] = deque()
        self._stream_clock = StreamClock()
        self._first_pts_us: int | None = None
        self._next_pts_us: int | None = None
        self._file_start_us = 0
        self._opened_wall_us = 0
        self._flushed = False

    # -- Source interface --------------------------------------------------

    @property
    def stream_template(self) -> VideoStream | None:
        return self._stream if self.kind == "encoded" else None

    def describe(self) -> str:
        what = "RTSP camera" if self.live else "video file"
        mode = "stored as sent" if self.kind == "encoded" else f"decoded and re-encoded{f' ({self.decode_reason})' if self.decode_reason else ''}"
        size = f" {self.width}x{self.height}" if self.width else ""
        codec = f" {self.codec}" if self.codec else ""
        return f"{what} {redact_url(self.url)}{size}{codec}, {mode}"

    def open(self) -> None:
        self.close()
        where = redact_url(self.url)
        if not self.live and not Path(self.url).exists() and "://" not in self.url:
            raise SourceUnavailable(f"video file {self.url} does not exist; check camera.url")
        options = {"rtsp_transport": "tcp", "timeout": str(int(self.timeout_s * 1_000_000))} if self.live else {}
        try:
            container = av.open(self.url, options=options, timeout=(self.timeout_s, self.timeout_s))
        except Exception as exc:  # noqa: BLE001 - every way a camera can be missing is "unavailable"
            raise SourceUnavailable(_explain_open_error(exc, where, self.live, self.timeout_s)) from None
        videos = container.streams.video
        if not videos:
            container.close()
            raise SourceUnavailable(f"{where} has no video stream")
        stream = videos[0]
        ctx = stream.codec_context
        self.codec = ctx.name
        self.width, self.height = ctx.width, ctx.height
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if container.format.name in ("h264", "hevc") and stream.guessed_rate:
            # A raw elementary stream has no container rate: FFmpeg's average_rate is its 25 fps
            # default, while guessed_rate comes from the stream's own timing (VUI) when it has any.
            rate = stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        if self.want_raw:
            self.kind, self.decode_reason = "raw", "privacy mask"
        elif ctx.name != "h264":
            self.kind, self.decode_reason = "raw", f"{ctx.name} is not H.264"
        elif ctx.has_b_frames:
            self.kind, self.decode_reason = "raw", "H.264 with B-frames"
        else:
            self.kind, self.decode_reason = "encoded", ""
        if self.kind == "raw":
            ctx.thread_type = "AUTO"
        self._container, self._stream = container, stream
        self._packets = container.demux(stream)
        self._pending.clear()
        self._stream_clock = StreamClock()
        self._first_pts_us = None
        self._next_pts_us = None
        self._flushed = False
        self._opened_wall_us = self._clock_us()
        self._file_start_us = self._resolve_start(container)

    def read(self) -> Frame | EncodedPacket:
        if self._container is None or self._packets is None or self._stream is None:
            raise SourceUnavailable("the stream is not open")
        if self.kind == "raw":
            return self._read_frame()
        while True:
            pkt = self._next_packet()
            if pkt.size == 0:
                continue
            pts_us = self._pts_us(pkt.pts if pkt.pts is not None else pkt.dts)
            capture_us = self._capture_us(pts_us, self._pts_us(pkt.duration or None))
            return EncodedPacket(capture_us, pkt, bool(pkt.is_keyframe))

    def close(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - closing a dead connection may fail; it is gone either way
                pass
        self._container = None
        self._packets = None

    # -- internals ---------------------------------------------------------

    def _read_frame(self) -> Frame:
        assert self._stream is not None
        while not self._pending:
            if self._flushed:
                self._end()
            try:
                pkt = self._next_packet()
            except (SourceEnded, SourceUnavailable):
                # Drain the decoder's last frames before reporting the end.
                self._flushed = True
                self._decode(None)
                if not self._pending:
                    raise
                break
            if pkt.size == 0:
                continue
            self._decode(pkt)
        return self._pending.popleft()

    def _decode(self, pkt: av.Packet | None) -> None:
        assert self._stream is not None
        try:
            frames = self._stream.codec_context.decode(pkt)
        except av.error.FFmpegError:
            return  # a corrupt packet (packet loss on RTSP): skip it, the next keyframe recovers
        for vf in frames:
            pts = vf.pts if vf.pts is not None else (pkt.pts if pkt is not None else None)
            capture_us = self._capture_us(self._pts_us(pts))
            image = vf.to_ndarray(format="bgr24")
            if (vf.width, vf.height) != (self.width, self.height):
                self.width, self.height = vf.width, vf.height
            self._pending.append(Frame(capture_us, image))

    def _next_packet(self) -> av.Packet:
        assert self._packets is not None
        try:
            return next(self._packets)
        except StopIteration:
            self._end()
        except av.error.EOFError:
            self._end()
        except Exception as exc:  # noqa: BLE001 - a dropped network is reported, never raised through
            raise SourceUnavailable(f"{redact_url(self.url)} stopped sending video: {_plain(exc)}") from None
        raise AssertionError("unreachable")

    def _end(self) -> None:
        if self.live:
            raise SourceUnavailable(f"{redact_url(self.url)} ended the stream")
        raise SourceEnded(f"end of {redact_url(self.url)}")

    def _pts_us(self, pts: int | None) -> int | None:
        if pts is None:
            return None
        assert self._stream is not None
        tb = self._stream.time_base or Fraction(1, 90_000)
        return pts * tb.numerator * 1_000_000 // tb.denominator

    def _capture_us(self, pts_us: int | None, duration_us: int | None = None) -> int:
        if self.live:
            return self._stream_clock.capture_us(pts_us, self._clock_us())
        if pts_us is None:
            # A raw H.264 file (Annex B) carries no timestamps: each frame follows the one before
            # by its duration (or one frame at the stream's rate). Giving them all the first time
            # would make the recorder drop every frame after the first as a clock step back.
            pts_us = self._next_pts_us if self._next_pts_us is not None else 0
        self._next_pts_us = pts_us + (duration_us or (round(1_000_000 / self.fps) if self.fps else 40_000))
        if self._first_pts_us is None:
            self._first_pts_us = pts_us
        offset = pts_us - self._first_pts_us
        if self.realtime:
            wait = (self._opened_wall_us + offset - self._clock_us()) / 1e6
            if wait > 0:
                self._sleep(wait)
        return self._file_start_us + offset

    def _resolve_start(self, container: InputContainer) -> int:
        if isinstance(self.start_at, int):
            return self.start_at
        if self.start_at == "creation_time":
            tag = container.metadata.get("creation_time") or (
                self._stream.metadata.get("creation_time") if self._stream is not None else None
            )
            parsed = parse_creation_time(tag)
            if parsed is not None:
                return parsed
        return self._opened_wall_us


def parse_creation_time(tag: str | None) -> int | None:
    """An MP4 ``creation_time`` tag as µs since the epoch; None if absent or obviously unset (before 2000)."""
    if not tag:
        return None
    try:
        when = datetime.fromisoformat(tag.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when.year < 2000:
        return None
    return to_us(when)


def _plain(exc: BaseException) -> str:
    msg = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(msg)


def _explain_open_error(exc: BaseException, where: str, live: bool, timeout_s: float) -> str:
    """One sentence a homeowner can act on, without the password."""
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing answers at {where} (connection refused): is the camera on, and are the address and port right?"
    if isinstance(exc, TimeoutError) or isinstance(exc, av.error.ExitError):
        return f"no answer from {where} within {timeout_s:g} s: is the camera on the network?"
    if live and isinstance(exc, av.error.InvalidDataError):
        return (f"no RTSP answer from {where} within {timeout_s:g} s, or what answers there is not an "
                f"RTSP camera: check the address and port in camera.url")
    if isinstance(exc, av.error.InvalidDataError):
        return f"{where} is not a video file that can be read (damaged, or not video at all); check camera.url"
    if isinstance(exc, FileNotFoundError):
        what = "no stream at that path on the camera" if live else "the file does not exist"
        return f"{where}: {what}; check camera.url"
    if isinstance(exc, PermissionError):
        return f"{where}: permission denied; check the file's permissions"
    text = _plain(exc)
    if "401" in text or "Unauthorized" in text:
        return f"{where} refused the user name or password; put them in camera.url as rtsp://user:password@host/…"
    if "404" in text or "Not Found" in text:
        return f"{where}: the camera has no stream at that path; check the path in camera.url"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot reach {where}: {text}"
    return f"cannot open {where}: {text}"
