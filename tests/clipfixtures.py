"""A small real rolling buffer for the clip tests: synthetic QR-clock video, real H.264, real index."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from agent.buffer.capture.synthetic import SyntheticSource, read_qr_time
from agent.buffer.segmentfile import TIME_BASE, EncoderSettings, SegmentFile
from agent.buffer.segments import SegmentRecord, SegmentStore
from agent.timeutil import format_utc, from_us

BASE_US = 1_795_183_200_000_000  # 2026-11-20T14:00:00Z
FPS = 15
SEGMENT_S = 4.0


@dataclass
class Buffer:
    data_dir: Path
    settings: EncoderSettings
    records: list[SegmentRecord]
    frames: list[int]  # capture time of every recorded frame, in order
    keyframes: list[int]  # capture times of the frames stored as keyframes
    gap: tuple[int, int]  # [first missing frame, last missing frame + 1 µs); (0, 0) if none

    def inside(self, start_us: int, end_us: int) -> list[int]:
        return [t for t in self.frames if start_us <= t < end_us]


def record_buffer(data_dir: Path, seconds: float = 60, gap_s: tuple[float, float] | None = (30.0, 33.4),
                  width: int = 320, height: int = 240, odd_segment: int | None = None) -> Buffer:
    """Record ``seconds`` of video into 4-second segments, leaving out ``gap_s`` (a camera outage).

    Segment number ``odd_segment`` is encoded with other settings (told 60 fps, so x264
    signals another level): its SPS differs from its neighbours', as after a settings change.
    """
    settings = EncoderSettings("libx264", width, height, FPS)
    odd = EncoderSettings("libx264", width, height, 60)
    store = SegmentStore(data_dir / "buffer.sqlite", data_dir / "segments")
    src = SyntheticSource(width, height, FPS, realtime=False, start_us=BASE_US)
    src.open()
    frames: list[int] = []
    records: list[SegmentRecord] = []
    seg: SegmentFile | None = None
    gap = (BASE_US + int(gap_s[0] * 1e6), BASE_US + int(gap_s[1] * 1e6)) if gap_s else (0, 0)
    gap_frames: list[int] = []
    for _ in range(int(seconds * FPS)):
        frame = src.read()
        t = frame.capture_us
        if gap[0] <= t < gap[1]:
            gap_frames.append(t)
            if seg is not None:
                records.append(_finish(store, seg))
                seg = None
            continue
        if seg is not None and seg.start_us is not None and t - seg.start_us >= SEGMENT_S * 1e6:
            records.append(_finish(store, seg))
            seg = None
        if seg is None:
            seg = SegmentFile(store.new_segment_path(t), settings=odd if len(records) == odd_segment else settings)
        seg.add_frame(frame)
        frames.append(t)
    if seg is not None:
        records.append(_finish(store, seg))
    store.close()
    keyframes = []
    for rec in records:
        with av.open(str(rec.path)) as c:
            st = c.streams.video[0]
            keyframes += [rec.start_us + p.pts for p in c.demux(st) if p.size and p.is_keyframe]
    held_out = (gap_frames[0], gap_frames[-1] + 1) if gap_frames else (0, 0)
    return Buffer(data_dir, settings, records, frames, keyframes, held_out)


def _finish(store: SegmentStore, seg: SegmentFile) -> SegmentRecord:
    info = seg.finish()
    assert info is not None
    return store.add(info)


@dataclass
class Decoded:
    pts_us: list[int]  # presentation times in microseconds from the clip's start
    qr: list[str | None]  # the capture time each frame shows (None: the code did not read)
    unreadable: dict[int, np.ndarray]  # index -> picture, for frames whose code did not read
    width: int
    height: int
    metadata: dict[str, str]


# Reading a QR code costs ~10 ms; copied frames decode to identical pictures in every clip,
# so each distinct picture is read once per test session.
_QR_CACHE: dict[bytes, str | None] = {}
_DETECTOR = cv2.QRCodeDetector()


def decode_clip(path: Path) -> Decoded:
    """Decode every frame of a clip and read the clock it shows."""
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        tb = st.time_base
        pts: list[int] = []
        qr: list[str | None] = []
        unreadable: dict[int, np.ndarray] = {}
        for f in c.decode(st):
            pts.append(round(f.pts * tb * 1_000_000))
            img = f.to_ndarray(format="bgr24")
            key = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
            if key not in _QR_CACHE:
                _QR_CACHE[key] = read_qr_time(img, _DETECTOR)
            qr.append(_QR_CACHE[key])
            if qr[-1] is None:
                unreadable[len(qr) - 1] = img
        return Decoded(pts, qr, unreadable, st.codec_context.width, st.codec_context.height, dict(c.metadata))


def shows_time(img: np.ndarray, t_us: int, frame_us: int, width: int, height: int) -> bool:
    """For a frame whose code does not read: is it the picture drawn for ``t_us`` rather than a neighbour's?"""
    src = SyntheticSource(width, height, FPS, realtime=False)
    err = {dt: float(np.mean((img.astype(np.float32) - src.draw(t_us + dt).astype(np.float32)) ** 2))
           for dt in (-frame_us, 0, frame_us)}
    return min(err, key=err.__getitem__) == 0


def stamp(t_us: int) -> str:
    return format_utc(from_us(t_us), ms=True)


def record_foreign_buffer(data_dir: Path, seconds: float = 12, width: int = 320, height: int = 240) -> Buffer:
    """Footage as an RTSP doorbell gives it: encoded by the camera (here x264 with other options:
    High profile, CABAC, 3 reference frames), stored by stream copy, 4-second segments."""
    from agent.buffer.capture import EncodedPacket

    src = SyntheticSource(width, height, FPS, realtime=False, start_us=BASE_US)
    src.open()
    data_dir.mkdir(parents=True, exist_ok=True)
    cam_file = data_dir.parent / f"{data_dir.name}-camera.mp4"
    with av.open(str(cam_file), "w", format="mp4") as c:
        st = c.add_stream("libx264", rate=FPS)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.time_base = st.codec_context.time_base = TIME_BASE
        st.options = {"preset": "veryfast", "profile": "high",
                      "x264-params": "keyint=15:min-keyint=15:scenecut=0:bframes=0:ref=3"}
        for _ in range(int(seconds * FPS)):
            frame = src.read()
            vf = av.VideoFrame.from_ndarray(cv2.cvtColor(frame.image, cv2.COLOR_BGR2YUV_I420), format="yuv420p")
            vf.pts, vf.time_base = frame.capture_us - BASE_US, TIME_BASE
            c.mux(st.encode(vf))
        c.mux(st.encode(None))
    store = SegmentStore(data_dir / "buffer.sqlite", data_dir / "segments")
    records: list[SegmentRecord] = []
    frames: list[int] = []
    keyframes: list[int] = []
    with av.open(str(cam_file)) as c:
        st = c.streams.video[0]
        seg: SegmentFile | None = None
        for pkt in c.demux(st):
            if not pkt.size:
                continue
            cap = BASE_US + pkt.pts
            if pkt.is_keyframe and seg is not None and seg.start_us is not None and cap - seg.start_us >= SEGMENT_S * 1e6:
                records.append(_finish(store, seg))
                seg = None
            if seg is None:
                seg = SegmentFile(store.new_segment_path(cap), template=st, frame_us=round(1e6 / FPS))
            seg.add_packet(EncodedPacket(cap, pkt, pkt.is_keyframe))
            frames.append(cap)
            if pkt.is_keyframe:
                keyframes.append(cap)
        if seg is not None:
            records.append(_finish(store, seg))
    store.close()
    settings = EncoderSettings("libx264", width, height, FPS)
    return Buffer(data_dir, settings, records, frames, keyframes, (0, 0))
