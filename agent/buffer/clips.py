"""Exact-window clips cut from the rolling buffer.

A clip holds every frame whose capture time lies in ``[start_us, end_us)`` and
no other frame. Re-encoding a whole window would cost a Pi minutes per hour of
footage, so the cutter works keyframe group by keyframe group (segment format:
see :mod:`agent.buffer.segmentfile`):

- a group wholly inside the window is copied packet for packet;
- a group straddling a window edge is decoded and only its frames inside the
  window are re-encoded, starting with a fresh IDR;
- groups wholly outside are skipped without decoding.

Copied and re-encoded packets must decode as one stream in one MP4 track.
The re-encoder uses the recorder's own settings
(:func:`agent.buffer.segmentfile.open_encoder_stream`), so for the agent's own
footage its SPS/PPS are byte-identical to the segments' (x264 puts no
per-stream timing in them) and the clip is a plain ``avc1`` track with one
``avcC``: mode **splice**. When they differ - footage stream-copied from an
RTSP camera, the Pi 4's hardware encoder, a settings change inside the window
- the track is tagged ``avc3`` (ISO/IEC 14496-15: parameter sets may also be
in-band), its ``avcC`` holds the first segment's SPS/PPS, and each IDR after
which the active parameter sets change carries the new SPS/PPS in-band: mode
**inband**, still only the edge groups re-encoded. Only if a segment cannot
join at all (another frame size, no ``avcC``) is the whole window re-encoded:
mode **reencode**. The mode is chosen from the first segment and the cut
restarts in the more general mode if a later segment needs it.

Output timing: time base 1/1,000,000, a frame's pts is its capture time minus
the clip's first frame's capture time, so a recording gap stays a gap. The
first frame's absolute time is in the MP4 metadata: ``creation_time`` (whole
seconds, in ``mvhd``) and ``comment`` = ``first-frame-utc=<RFC 3339 with µs>``
so an auditor can map every frame back to wall-clock time.

The clip is streamed to a temporary file beside the destination and renamed
into place when complete, so a 12-hour clip never sits in memory and a
half-written clip never carries the final name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, Protocol, TypedDict, cast

import av

from agent.buffer.segmentfile import TIME_BASE, EncoderSettings, open_encoder_stream
from agent.fsutil import fsync_dir
from agent.timeutil import format_utc, from_us

if TYPE_CHECKING:
    from av.video.stream import VideoStream

Mode = Literal["splice", "inband", "reencode"]
Progress = Callable[[float], None]


class SegmentLike(Protocol):
    """What the cutter needs from an index record (``agent.buffer.segments.SegmentRecord``)."""

    @property
    def path(self) -> Path: ...
    @property
    def start_us(self) -> int: ...
    @property
    def end_us(self) -> int: ...


class NoFootageError(Exception):
    """The buffer holds no frame inside the asked window."""

    def __init__(self, start_us: int, end_us: int) -> None:
        super().__init__(f"no recorded frame lies in [{format_utc(from_us(start_us))}, {format_utc(from_us(end_us))})")
        self.start_us, self.end_us = start_us, end_us


class ClipError(Exception):
    """A segment could not be read or decoded; no clip was written."""


@dataclass(frozen=True)
class ClipInfo:
    frames: int
    first_us: int  # capture time of the first frame in the clip
    last_us: int  # capture time of the last frame in the clip
    bytes: int
    sha256: str
    width: int
    height: int
    granted_start_us: int
    granted_end_us: int
    copied_frames: int = 0
    reencoded_frames: int = 0
    mode: Mode = "splice"

    @property
    def duration_us(self) -> int:
        return self.granted_end_us - self.granted_start_us


# --- H.264 bitstream helpers -------------------------------------------------


def parse_avcc(extradata: bytes) -> tuple[int, list[bytes], list[bytes]]:
    """``avcC`` box payload -> (NAL length size, SPS list, PPS list)."""
    if len(extradata) < 7 or extradata[0] != 1:
        raise ValueError("not an avcC record")
    length_size = (extradata[4] & 3) + 1
    pos = 6
    sps: list[bytes] = []
    pps: list[bytes] = []
    for count, out in ((extradata[5] & 0x1F, sps), (None, pps)):
        if count is None:
            count = extradata[pos]
            pos += 1
        for _ in range(count):
            n = int.from_bytes(extradata[pos:pos + 2], "big")
            out.append(bytes(extradata[pos + 2:pos + 2 + n]))
            pos += 2 + n
    return length_size, sps, pps


def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex B byte stream (start codes removed)."""
    nals: list[bytes] = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        start = i + 3
        j = data.find(b"\x00\x00\x01", start)
        nal = data[start:] if j < 0 else data[start:j]
        nal = nal.rstrip(b"\x00")  # a NAL never ends in 0x00; these belong to the next start code
        if nal:
            nals.append(nal)
        i = j
    return nals


def annexb_to_length_prefixed(data: bytes, length_size: int = 4) -> bytes:
    return b"".join(len(n).to_bytes(length_size, "big") + n for n in split_annexb(data))


def _param_sets_annexb(extradata: bytes) -> tuple[list[bytes], list[bytes]]:
    nals = split_annexb(extradata)
    return [n for n in nals if n[0] & 0x1F == 7], [n for n in nals if n[0] & 0x1F == 8]


# --- reading segments ---------------------------------------------------------


@dataclass
class _Group:
    """One keyframe group: packets in decode order with their capture times."""

    packets: list[tuple[int, av.Packet]]

    @property
    def first_us(self) -> int:
        return self.packets[0][0]

    @property
    def last_us(self) -> int:
        return self.packets[-1][0]


def _open(seg: SegmentLike) -> tuple[av.container.InputContainer, VideoStream]:
    try:
        container = av.open(str(seg.path))
    except (OSError, av.error.FFmpegError) as exc:
        raise ClipError(f"cannot read segment {seg.path}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise ClipError(f"segment {seg.path} has no video stream")
    return container, container.streams.video[0]


def _time_base(stream: VideoStream) -> Fraction:
    tb = stream.time_base
    assert tb is not None  # set for every demuxed stream; only a stream being set up for writing lacks one
    return tb


def _capture_us(seg: SegmentLike, stream: VideoStream, pts: int) -> int:
    if stream.time_base == TIME_BASE:
        return seg.start_us + pts
    return seg.start_us + round(pts * _time_base(stream) / TIME_BASE)


def _groups(seg: SegmentLike, container: av.container.InputContainer, stream: VideoStream,
            end_us: int) -> Iterator[_Group]:
    """Keyframe groups of one segment, stopping at the first group starting at or after ``end_us``."""
    current: list[tuple[int, av.Packet]] = []
    for pkt in container.demux(stream):
        if pkt.size == 0 or pkt.pts is None:
            continue
        cap = _capture_us(seg, stream, pkt.pts)
        if pkt.is_keyframe and current:
            yield _Group(current)
            current = []
            if cap >= end_us:
                return
        if not current and not pkt.is_keyframe:
            raise ClipError(f"segment {seg.path} does not start with a keyframe")
        current.append((cap, pkt))
    if current:
        yield _Group(current)


def _frame_times(seg: SegmentLike) -> list[tuple[int, int]]:
    """(capture_us, duration_us) of every frame of a segment, from the index of the file (no decoding)."""
    container, stream = _open(seg)
    try:
        out = []
        for pkt in container.demux(stream):
            if pkt.size and pkt.pts is not None:
                dur = round((pkt.duration or 0) * _time_base(stream) / TIME_BASE)
                out.append((_capture_us(seg, stream, pkt.pts), dur))
        return out
    finally:
        container.close()


def _in_order(segments: Sequence[SegmentLike], start_us: int, end_us: int) -> list[SegmentLike]:
    return sorted((s for s in segments if s.end_us > start_us and s.start_us < end_us), key=lambda s: s.start_us)


def granted_window(segments: Sequence[SegmentLike], start_us: int, end_us: int) -> tuple[int, int] | None:
    """The smallest interval holding every recorded frame in ``[start_us, end_us)``.

    From the first such frame's capture time to the last one's plus its
    duration, clipped to ``end_us`` (a frame shown until after the window ends
    still lies inside it). ``None`` if no frame lies in the window. Only the
    two edge segments' sample tables are read; nothing is decoded.
    """
    segs = _in_order(segments, start_us, end_us)
    first = last = None
    for seg in segs:
        times = [t for t in _frame_times(seg) if start_us <= t[0] < end_us]
        if times:
            first = times[0][0]
            break
    if first is None:
        return None
    for seg in reversed(segs):
        times = [t for t in _frame_times(seg) if start_us <= t[0] < end_us]
        if times:
            last = times[-1]
            break
    assert last is not None
    dur = last[1] or max(1, seg.end_us - last[0])
    return first, min(end_us, last[0] + dur)


# --- writing ------------------------------------------------------------------


class _Writer:
    """The output MP4: holds back one packet so every sample gets its true duration."""

    def __init__(self, container: av.container.OutputContainer, stream: VideoStream, default_dur: int,
                 sample_entry_ps: tuple[list[bytes], list[bytes]]) -> None:
        self.container, self.stream, self.default_dur = container, stream, default_dur
        self.active_ps = sample_entry_ps  # the SPS/PPS a decoder holds at this point of the stream
        self.first_us: int | None = None
        self.last_us: int | None = None
        self.frames = 0
        self._held: av.Packet | None = None

    def start(self, first_us: int) -> None:
        self.first_us = first_us
        when = from_us(first_us)
        self.container.metadata["creation_time"] = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.container.metadata["comment"] = "first-frame-utc=" + format_utc(when)

    def put(self, capture_us: int, pkt: av.Packet) -> None:
        assert self.first_us is not None
        if self.last_us is not None and capture_us <= self.last_us:
            raise ClipError(f"footage out of order at {format_utc(from_us(capture_us))} (overlapping segments?)")
        rel = capture_us - self.first_us
        pkt.stream = self.stream
        pkt.time_base = TIME_BASE
        pkt.pts = pkt.dts = rel
        if self._held is not None:
            assert self._held.pts is not None  # put() set it
            self._held.duration = rel - self._held.pts
            self.container.mux(self._held)
        self._held = pkt
        self.last_us = capture_us
        self.frames += 1

    def finish(self, last_dur: int) -> None:
        if self._held is not None:
            self._held.duration = last_dur or self.default_dur
            self.container.mux(self._held)
            self._held = None


def _settings_for(stream: VideoStream, given: EncoderSettings | None) -> EncoderSettings:
    """The re-encoder's settings: frame size from the footage, rate and keyframe interval from
    the recorder's settings if the caller knows them, else inferred from the footage."""
    width, height = stream.codec_context.width, stream.codec_context.height  # what the camera really gave
    if given is not None:
        return EncoderSettings("libx264", width, height, given.fps, given.keyframe_interval_s)
    rate = stream.average_rate or stream.guessed_rate or Fraction(15)
    fps = float(round(rate)) if abs(rate - round(rate)) < Fraction(1, 100) else float(rate)
    return EncoderSettings("libx264", width, height, fps or 15.0)


class _Reencoder:
    """A stand-alone encoder configured exactly like the recorder's (same function, same options)."""

    def __init__(self, settings: EncoderSettings) -> None:
        self._scratch = av.open(io.BytesIO(), "w", format="mp4")  # global-header flag, as in a segment
        self.ctx = open_encoder_stream(self._scratch, settings).codec_context
        self.ctx.open()
        self.extradata = bytes(self.ctx.extradata or b"")
        self._need_idr = True

    def begin_run(self) -> None:
        """The next frame starts a new keyframe group (an IDR: decodable without what came before)."""
        self._need_idr = True

    def encode(self, frame: av.VideoFrame, rel_us: int) -> list[av.Packet]:
        frame.pts = rel_us
        frame.time_base = TIME_BASE
        frame.pict_type = av.video.frame.PictureType.I if self._need_idr else av.video.frame.PictureType.NONE
        self._need_idr = False
        return self.ctx.encode(frame)

    def close(self) -> None:
        self._scratch.close()


def _decode_group(seg: SegmentLike, extradata: bytes | None, group: _Group, codec: str) -> list[tuple[int, av.VideoFrame]]:
    """Decode a whole keyframe group; frames keyed by capture time."""
    # ``codec`` is a video stream's codec, so PyAV makes a VideoCodecContext (the stubs say so only for literal names).
    dec = cast(av.VideoCodecContext, av.CodecContext.create(codec, "r"))
    if extradata:
        dec.extradata = extradata
    by_pts = {pkt.pts: cap for cap, pkt in group.packets}
    frames: list[av.VideoFrame] = []
    try:
        for _, pkt in group.packets:
            frames.extend(dec.decode(pkt))
        frames.extend(dec.decode(None))
    except av.error.FFmpegError as exc:
        raise ClipError(f"segment {seg.path} is damaged near {format_utc(from_us(group.first_us))}: {exc}") from exc
    out = []
    for f in frames:
        if f.pts in by_pts:
            out.append((by_pts[f.pts], f))
    if len(out) != len(group.packets):
        raise ClipError(f"segment {seg.path}: decoded {len(out)} of {len(group.packets)} frames "
                        f"of the group at {format_utc(from_us(group.first_us))}")
    return out


class _Restart(Exception):
    """A later segment cannot join the stream as planned: the cut restarts in ``mode``."""

    def __init__(self, mode: Mode) -> None:
        super().__init__(mode)
        self.mode: Mode = mode


@dataclass(frozen=True)
class _Source:
    """What decides whether a segment's packets can be copied into the clip."""

    extradata: bytes
    width: int
    height: int
    length_size: int  # 0: no avcC (cannot copy)
    param_sets: tuple[list[bytes], list[bytes]]

    @classmethod
    def of(cls, stream: VideoStream) -> _Source:
        extra = bytes(stream.codec_context.extradata or b"")
        try:
            length_size, sps, pps = parse_avcc(extra)
        except (ValueError, IndexError):
            length_size, sps, pps = 0, [], []
        return cls(extra, stream.codec_context.width, stream.codec_context.height, length_size, (sps, pps))

    def can_copy_after(self, first: _Source) -> bool:
        return self.length_size == first.length_size != 0 and (self.width, self.height) == (first.width, first.height)


def _choose_mode(first_seg: SegmentLike, settings: EncoderSettings | None) -> tuple[Mode, EncoderSettings, _Source]:
    """From the first segment; later segments are checked as they come (see :class:`_Restart`)."""
    container, stream = _open(first_seg)
    try:
        if stream.codec_context.name != "h264":
            raise ClipError(f"segment {first_seg.path} is {stream.codec_context.name}, not H.264")
        first = _Source.of(stream)
        enc_settings = _settings_for(stream, settings)
    finally:
        container.close()
    if not first.length_size:
        return "reencode", enc_settings, first
    enc = _Reencoder(enc_settings)
    try:
        ours = _param_sets_annexb(enc.extradata)
    finally:
        enc.close()
    return ("splice" if ours == first.param_sets else "inband"), enc_settings, first


def cut_clip(segments: Sequence[SegmentLike], start_us: int, end_us: int, out: Path | BinaryIO, *,
             settings: EncoderSettings | None = None, progress: Progress | None = None,
             force_mode: Literal["inband", "reencode"] | None = None, tmp_dir: Path | None = None) -> ClipInfo:
    """Write one MP4 of every frame captured in ``[start_us, end_us)`` to ``out``.

    ``out`` is a path (written as ``.<name>.part`` beside it, then renamed; an
    existing file is replaced) or a binary file object. ``settings`` are the
    recorder's encoder settings, if known (they make splice mode possible for
    non-default settings). ``progress`` gets the fraction of the window done.
    ``force_mode`` exists for tests and benchmarks. For a file object, the MP4 is first made in a
    private temporary file in ``tmp_dir`` (default: the system's), since writing it needs seeking. Raises
    :class:`NoFootageError` if no frame lies in the window and
    :class:`ClipError` if footage cannot be read.
    """
    if end_us <= start_us:
        raise ValueError("end_us must be after start_us")
    segs = _in_order(segments, start_us, end_us)
    if not segs:
        raise NoFootageError(start_us, end_us)
    mode, enc_settings, first = _choose_mode(segs[0], settings)
    if force_mode == "reencode" or (force_mode == "inband" and mode == "splice"):
        mode = force_mode

    if isinstance(out, (str, Path)):
        dest = Path(out)
        tmp_path = dest.with_name(f".{dest.name}.part")
    else:
        dest = None
        fd, name = tempfile.mkstemp(suffix=".mp4.part", prefix=".clip-", dir=tmp_dir)
        os.close(fd)
        tmp_path = Path(name)
    try:
        while True:
            try:
                info = _write(segs, start_us, end_us, tmp_path, mode, enc_settings, first, progress)
                break
            except _Restart as restart:
                mode = restart.mode
        digest = hashlib.sha256()
        with open(tmp_path, "rb") as fh:
            if dest is None:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)  # type: ignore[union-attr]
            else:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
                os.fsync(fh.fileno())
            size = fh.tell()
        if dest is not None:
            os.replace(tmp_path, dest)
            fsync_dir(dest.parent)
    finally:
        tmp_path.unlink(missing_ok=True)
    return ClipInfo(bytes=size, sha256=digest.hexdigest(), **info)


def clip_bytes(segments: Sequence[SegmentLike], start_us: int, end_us: int, **kw: object) -> tuple[bytes, ClipInfo]:
    """Convenience for short windows: the clip in memory."""
    buf = io.BytesIO()
    info = cut_clip(segments, start_us, end_us, buf, **kw)  # type: ignore[arg-type]
    return buf.getvalue(), info


def _param_set_prefix(ps: tuple[list[bytes], list[bytes]], length_size: int) -> bytes:
    return b"".join(len(n).to_bytes(length_size, "big") + n for n in ps[0] + ps[1])


class _Written(TypedDict):
    """What :func:`_write` learnt; with the file's size and hash, a :class:`ClipInfo`."""

    frames: int
    first_us: int
    last_us: int
    width: int
    height: int
    granted_start_us: int
    granted_end_us: int
    copied_frames: int
    reencoded_frames: int
    mode: Mode


def _write(segs: Sequence[SegmentLike], start_us: int, end_us: int, path: Path, mode: Mode,
           settings: EncoderSettings, first: _Source, progress: Progress | None) -> _Written:
    container = av.open(str(path), "w", format="mp4")
    writer: _Writer | None = None
    reenc: _Reencoder | None = None
    enc_ps: tuple[list[bytes], list[bytes]] = ([], [])
    copied = reencoded = 0
    last_dur = 0
    span = max(1, min(end_us, segs[-1].end_us) - max(start_us, segs[0].start_us))
    try:
        for seg in segs:
            src_container, stream = _open(seg)
            try:
                source = _Source.of(stream)
                codec = stream.codec_context.name
                if mode == "splice" and source.extradata != first.extradata:
                    raise _Restart("inband" if source.can_copy_after(first) and codec == "h264" else "reencode")
                if mode == "inband" and not (source.can_copy_after(first) and codec == "h264"):
                    raise _Restart("reencode")
                if writer is None:
                    if mode == "reencode":
                        out_stream = open_encoder_stream(container, settings)
                    else:
                        out_stream = container.add_stream_from_template(stream)
                        out_stream.time_base = TIME_BASE
                        if mode == "inband":
                            out_stream.codec_tag = "avc3"  # parameter sets may change in-band
                        reenc = _Reencoder(settings)
                        enc_ps = _param_sets_annexb(reenc.extradata)
                    writer = _Writer(container, out_stream, settings.frame_us, first.param_sets)
                for group in _groups(seg, src_container, stream, end_us):
                    inside = [start_us <= cap < end_us for cap, _ in group.packets]
                    if not any(inside):
                        continue
                    if writer.first_us is None:
                        writer.start(group.packets[inside.index(True)][0])
                    if mode != "reencode" and all(inside):
                        for i, (cap, pkt) in enumerate(group.packets):
                            if i == 0 and writer.active_ps != source.param_sets:
                                pkt = _with_prefix(pkt, _param_set_prefix(source.param_sets, first.length_size))
                                writer.active_ps = source.param_sets
                            writer.put(cap, pkt)
                        copied += len(group.packets)
                    else:
                        frames = [(c, f) for c, f in _decode_group(seg, source.extradata or None, group, codec)
                                  if start_us <= c < end_us]
                        if mode == "reencode":
                            reencoded += _encode_frames(writer, frames, settings)
                        else:
                            assert reenc is not None
                            prefix = b""
                            if writer.active_ps != enc_ps:
                                prefix = _param_set_prefix(enc_ps, first.length_size)
                                writer.active_ps = enc_ps
                            reencoded += _reencode_run(reenc, writer, frames, first.length_size, prefix)
                    last_pkt = group.packets[max(i for i, ok in enumerate(inside) if ok)][1]
                    last_dur = round((last_pkt.duration or 0) * _time_base(stream) / TIME_BASE)
                    if progress is not None:
                        progress(min(1.0, (group.last_us - max(start_us, segs[0].start_us)) / span))
            finally:
                src_container.close()
        if writer is None or writer.first_us is None:
            raise NoFootageError(start_us, end_us)
        if mode == "reencode":
            for pkt in writer.stream.encode(None):
                container.mux(pkt)
        writer.finish(last_dur)
        assert writer.last_us is not None
        width, height = writer.stream.codec_context.width, writer.stream.codec_context.height
        frames_total = reencoded if mode == "reencode" else writer.frames
        last_us = writer.last_us
        first_us = writer.first_us
    finally:
        container.close()
        if reenc is not None:
            reenc.close()
    if progress is not None:
        progress(1.0)
    return _Written(frames=frames_total, first_us=first_us, last_us=last_us, width=width, height=height,
                    granted_start_us=first_us, granted_end_us=min(end_us, last_us + (last_dur or settings.frame_us)),
                    copied_frames=copied, reencoded_frames=reencoded, mode=mode)


def _with_prefix(pkt: av.Packet, prefix: bytes) -> av.Packet:
    out = av.Packet(prefix + bytes(pkt))
    out.is_keyframe = pkt.is_keyframe
    return out


def _reencode_run(reenc: _Reencoder, writer: _Writer, frames: list[tuple[int, av.VideoFrame]],
                  length_size: int, prefix: bytes) -> int:
    """Re-encode the in-window part of a straddling group, converted to the MP4's NAL framing.

    ``prefix`` (in-band SPS/PPS, or nothing) goes before the run's IDR. With
    ``tune=zerolatency`` x264 returns each frame's packet at once, so the run
    is complete before the next copied group is written.
    """
    assert writer.first_us is not None
    reenc.begin_run()
    for i, (cap, frame) in enumerate(frames):
        pkts = reenc.encode(frame, cap - writer.first_us)
        if len(pkts) != 1:
            raise ClipError("the re-encoder buffered frames; cannot splice")  # not x264 zerolatency
        data = annexb_to_length_prefixed(bytes(pkts[0]), length_size)
        pkt = av.Packet(prefix + data if i == 0 else data)
        pkt.is_keyframe = pkts[0].is_keyframe
        writer.put(cap, pkt)
    return len(frames)


def _encode_frames(writer: _Writer, frames: list[tuple[int, av.VideoFrame]], settings: EncoderSettings) -> int:
    """Reencode mode: the output stream's own encoder, its packets muxed as they come."""
    assert writer.first_us is not None
    stream = writer.stream
    for cap, frame in frames:
        if (frame.width, frame.height, frame.format.name) != (settings.width, settings.height, "yuv420p"):
            frame = frame.reformat(settings.width, settings.height, "yuv420p")
        frame.pts = cap - writer.first_us
        frame.time_base = TIME_BASE
        frame.pict_type = av.video.frame.PictureType.NONE
        for pkt in stream.encode(frame):
            writer.container.mux(pkt)
        writer.last_us = cap
    return len(frames)
