"""One segment of the rolling buffer: a short MP4 written safely.

File format (the contract between the recorder, the index and the clip cutter):

- One H.264 video stream, time base 1/1,000,000, no B-frames, starting with a
  keyframe. A packet's pts is its frame's capture time minus the segment's
  ``start_us`` (the first frame's capture time), in microseconds. So the
  capture time of any frame is ``start_us + pts``: exact, and independent of
  frame-rate jitter.
- Fragmented MP4 (a fragment per keyframe group), written as ``<name>.mp4.part``,
  then fsynced, renamed to ``<name>.mp4`` and the directory fsynced. A ``.part``
  file is by definition unfinished; its whole fragments can still be recovered.
- Nothing rewrites a finished segment (SD cards wear with every write).

Raw frames are encoded here, one encoder per segment: every segment then
starts with an IDR and carries its own parameter sets, so any segment plays
alone and a clip can copy whole segments' packets without re-encoding.
Already-encoded packets (RTSP, files) are copied with their source's codec
parameters.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import av

from agent.buffer.capture import EncodedPacket, Frame
from agent.fsutil import fsync_dir

if TYPE_CHECKING:
    import numpy as np
    from av.video.stream import VideoStream
    from numpy.typing import NDArray

TIME_BASE = Fraction(1, 1_000_000)
PART_SUFFIX = ".part"
# ``delay_moov``: write the header at the first packet, not before it. An encoder that puts
# its parameter sets in-band instead of in global extradata (a hardware encoder may) has
# none to give before then, and with ``empty_moov`` alone the segment could not be written.
FRAGMENTED = "frag_keyframe+empty_moov+delay_moov+default_base_moof"


@dataclass(frozen=True)
class EncoderSettings:
    codec: Literal["libx264", "h264_v4l2m2m"]
    width: int
    height: int
    fps: float
    keyframe_interval_s: float = 1.0

    @property
    def frame_us(self) -> int:
        return round(1_000_000 / self.fps)


def pick_codec(requested: str) -> Literal["libx264", "h264_v4l2m2m"]:
    """``auto``: the Pi 4's hardware encoder where its device node exists, else libx264.

    The Pi 5 has no hardware H.264 encoder, so it takes libx264 like any PC.
    """
    if requested == "libx264" or requested == "h264_v4l2m2m":
        return requested  # type: ignore[return-value]
    if Path("/dev/video11").exists() and "h264_v4l2m2m" in av.codecs_available:
        return "h264_v4l2m2m"
    return "libx264"


@dataclass(frozen=True)
class SegmentFileInfo:
    path: Path
    start_us: int
    end_us: int
    frames: int
    bytes: int
    sha256: str
    keyframes: int


def open_encoder_stream(container: av.container.OutputContainer, s: EncoderSettings) -> VideoStream:
    """Add an H.264 encoding stream to ``container`` with the buffer's settings."""
    stream = container.add_stream(s.codec, rate=Fraction(s.fps).limit_denominator(1001))
    stream.width, stream.height, stream.pix_fmt = s.width, s.height, "yuv420p"
    stream.time_base = TIME_BASE
    stream.codec_context.time_base = TIME_BASE
    gop = max(1, int(s.fps * s.keyframe_interval_s))
    stream.codec_context.gop_size = gop
    if s.codec == "libx264":
        stream.options = {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "x264-params": f"keyint={gop}:min-keyint=1:scenecut=0:bframes=0",
        }
    else:
        stream.codec_context.bit_rate = 4_000_000
    return stream


class SegmentFile:
    """Writes one segment; ``finish()`` makes it durable and visible, ``abort()`` removes it."""

    def __init__(self, final_path: Path, *, settings: EncoderSettings | None = None,
                 template: VideoStream | None = None, frame_us: int | None = None) -> None:
        if (settings is None) == (template is None):
            raise ValueError("give encoder settings (raw frames) or a template stream (stream copy)")
        self.final_path = final_path
        self.part_path = final_path.with_name(final_path.name + PART_SUFFIX)
        final_path.parent.mkdir(parents=True, exist_ok=True)
        # Fragmented MP4: each keyframe group is on disk as soon as the next one starts, so a
        # segment cut short by a power cut can be recovered up to its last whole group.
        self._container = av.open(str(self.part_path), "w", format="mp4", options={"movflags": FRAGMENTED})
        if settings is not None:
            self._stream = open_encoder_stream(self._container, settings)
            self._frame_us = settings.frame_us
            self._keyframe_us = int(settings.keyframe_interval_s * 1_000_000)
        else:
            assert template is not None
            self._stream = self._container.add_stream_from_template(template)
            self._stream.time_base = TIME_BASE
            self._frame_us = frame_us or 66_667
            self._keyframe_us = 0
        self.start_us: int | None = None
        self.last_us: int | None = None
        self.frames = 0
        self.keyframes = 0
        self._last_key_us: int | None = None

    @property
    def duration_us(self) -> int:
        if self.start_us is None or self.last_us is None:
            return 0
        return self.last_us - self.start_us + self._frame_us

    def add_frame(self, frame: Frame) -> None:
        """Encode one raw frame (already masked)."""
        import cv2  # only raw frames need it: a stream-copying recorder never loads OpenCV

        if self.start_us is None:
            self.start_us = frame.capture_us
        # OpenCV's stubs type any result as "some numeric array"; a uint8 BGR frame converts to uint8 I420.
        yuv = cast("NDArray[np.uint8]", cv2.cvtColor(frame.image, cv2.COLOR_BGR2YUV_I420))
        vf = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        vf.pts = frame.capture_us - self.start_us
        vf.time_base = TIME_BASE
        # Keyframes at least every keyframe_interval_s of capture time, whatever the frame rate does.
        if self._last_key_us is None or frame.capture_us - self._last_key_us >= self._keyframe_us - self._frame_us // 2:
            vf.pict_type = av.video.frame.PictureType.I
            self._last_key_us = frame.capture_us
        for pkt in self._stream.encode(vf):
            self._mux(pkt)
        self.last_us = frame.capture_us

    def add_packet(self, item: EncodedPacket) -> None:
        """Store one already-encoded packet as it is (stream copy)."""
        if self.start_us is None:
            if not item.keyframe:
                raise ValueError("a segment must start with a keyframe")
            self.start_us = item.capture_us
        pkt = item.packet
        # Setting time_base retags the packet's numbers without rescaling them, so the
        # duration (the last frame's length in the file) is converted by hand first.
        dur_us = _duration_us(pkt)
        pkt.stream = self._stream
        pkt.time_base = TIME_BASE
        pkt.pts = pkt.dts = item.capture_us - self.start_us
        pkt.duration = dur_us or 0
        self._mux(pkt)
        self.last_us = item.capture_us

    def _mux(self, pkt: av.Packet) -> None:
        if pkt.is_keyframe:
            self.keyframes += 1
        self.frames += 1
        self._container.mux(pkt)

    def finish(self) -> SegmentFileInfo | None:
        """Flush, sync, rename. Returns None (and leaves no file) if no frame was written."""
        if self._keyframe_us:  # encoder path: drain it
            for pkt in self._stream.encode(None):
                self._mux(pkt)
        self._container.close()
        if self.frames == 0 or self.start_us is None or self.last_us is None:
            self.part_path.unlink(missing_ok=True)
            return None
        digest = hashlib.sha256()
        with open(self.part_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
            os.fsync(fh.fileno())
            size = fh.tell()
        os.replace(self.part_path, self.final_path)
        fsync_dir(self.final_path.parent)
        return SegmentFileInfo(self.final_path, self.start_us, self.last_us + self._frame_us,
                               self.frames, size, digest.hexdigest(), self.keyframes)

    def abort(self) -> None:
        """Throw the segment away (after an error); never raises, so it is safe in cleanup."""
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away
            pass
        self.part_path.unlink(missing_ok=True)


def _duration_us(pkt: av.Packet) -> int | None:
    """The packet's duration in µs, or None if it has none (or no time base to read it in)."""
    tb = pkt.time_base
    if not pkt.duration or tb is None:
        return None
    # Integer arithmetic: this runs for every packet of a stream-copied camera.
    num = pkt.duration * tb.numerator * 1_000_000
    return (2 * num + tb.denominator) // (2 * tb.denominator) or None


def nal_length_size(extradata: bytes | None) -> int | None:
    """Bytes of each NAL unit's length prefix in a stream whose extradata is ``extradata``
    (an ``avcC`` record: MP4, MKV), or None for Annex B streams (start codes: RTSP, raw .h264)."""
    if extradata and len(extradata) >= 5 and extradata[0] == 1:
        return (extradata[4] & 3) + 1
    return None


def h264_packet_problem(data: bytes, length_size: int | None) -> str | None:
    """Why ``data`` cannot be one H.264 access unit, or None if its NAL units are well formed.

    Stream copy does not decode, so this is the only look the recorder takes at a camera's
    packets: the framing of each NAL unit (start codes or length prefixes that tile the
    packet exactly), its forbidden bit and its type. It catches garbage and packets cut
    short at the framing level, the ones that make a decoder refuse a segment outright.
    Damage inside a picture's slice data is not visible without decoding; a decoder conceals
    it until the next keyframe, so such a segment still plays.
    """
    units: list[bytes] = []
    if length_size is None:
        # Bytes before the first start code are skipped by decoders (and by the MP4 muxer, which
        # rewrites start codes as length prefixes), so only a packet without any is refused.
        if b"\x00\x00\x01" not in data:
            return "no start code"
        units = [u.rstrip(b"\x00") for u in data.split(b"\x00\x00\x01")[1:]]
    else:
        at = 0
        while at < len(data):
            if at + length_size > len(data):
                return "a NAL unit length is cut off"
            size = int.from_bytes(data[at:at + length_size], "big")
            at += length_size
            if size == 0 or at + size > len(data):
                return "a NAL unit is longer than the packet"
            units.append(data[at:at + size])
            at += size
    if not units:
        return "no NAL unit"
    for unit in units:
        if not unit:
            return "an empty NAL unit"
        nal_type = unit[0] & 0x1F
        if unit[0] & 0x80 or nal_type == 0 or nal_type >= 24:
            return f"a NAL unit header that is not H.264 (0x{unit[0]:02x})"
    return None
