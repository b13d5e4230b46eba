"""Broken H.264 from a camera or a file: the recorder records a gap (or the damaged frames as sent) and goes on.

Real broken video, fed to the real recorder through the real stream source:
a valid recording of the synthetic camera (every picture shows its capture time
as a QR code) is written as raw H.264 (Annex B, as an RTSP camera's stream is
framed) and as Matroska (length-prefixed NAL units, as MP4 and MKV files are),
then damaged: NAL units cut short, random bytes spliced between pictures or
before the first keyframe, a corrupt SPS, an SPS for another resolution, a real
resolution change, packets replaced by random bytes, packets missing, a file cut
off mid-packet, an empty file, a file that is not video.

The contract checked here (module docstring of agent/buffer/recorder.py):

- nothing raises out of the recorder; a file that ends finishes cleanly
  (``camera_state == "ended"``), a file that cannot be opened is retried like
  an unplugged camera, with the reason in the status;
- every indexed segment decodes with PyAV, frame for frame;
- stream copy does not decode: a packet whose NAL framing is broken (it would
  make a decoder refuse the segment) is dropped with the packets up to the next
  keyframe, counted in ``frames_dropped``, and the hole is a gap whose reason says
  "damaged video"; damage inside a picture's slice data cannot be seen without
  decoding, so those frames are stored as the camera sent them (the decoder
  conceals the damage until the next keyframe) and nothing is missing from the
  timeline;
- frames after the bad part are recorded and show the right capture times;
- the log says what happened in words, never with a traceback.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import pytest

from agent.buffer.capture.stream import StreamSource
from agent.buffer.capture.synthetic import SyntheticSource, read_qr_time
from agent.buffer.recorder import Recorder, RecorderStats, ScaledMask
from agent.buffer.segmentfile import h264_packet_problem, nal_length_size
from agent.buffer.segments import Gap, SegmentRecord, SegmentStore
from agent.config import BufferConfig, CameraConfig
from tests.buffer_helpers import now_us, stamp

W, H, FPS = 320, 240, 15
FRAMES = 90  # six seconds, a keyframe every second (frames 0, 15, 30, ...)
KEYINT = 15
FRAME_US = 1_000_000 / FPS
BASE_US = 1_795_183_200_000_000  # what the pictures show: 2026-11-20T14:00:00Z + i / 15 s


# -- making real H.264, then breaking it ----------------------------------------------------


def encode(path: Path, frames: int, fmt: str, *, width: int = W, height: int = H, first: int = 0) -> None:
    """The synthetic camera's frames ``first`` .. ``first + frames - 1`` as H.264 in ``fmt``.

    x264 as a doorbell sets it up: no B-frames, a keyframe every second, SPS/PPS before each keyframe.
    """
    src = SyntheticSource(width, height, FPS, realtime=False, start_us=BASE_US)
    src.open()
    for _ in range(first):
        src.read()
    with av.open(str(path), "w", format=fmt) as out:
        st = out.add_stream("libx264", rate=FPS)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.options = {"preset": "ultrafast", "tune": "zerolatency",
                      "x264-params": f"keyint={KEYINT}:min-keyint={KEYINT}:scenecut=0:bframes=0:repeat-headers=1"}
        for i in range(frames):
            vf = av.VideoFrame.from_ndarray(src.read().image, format="bgr24")
            vf.pts, vf.time_base = i, Fraction(1, FPS)
            out.mux(st.encode(vf))
        out.mux(st.encode(None))


@dataclass(frozen=True)
class Nal:
    at: int  # where its start code begins
    body: int  # where its header byte is
    end: int
    type: int


def nal_units(data: bytes) -> list[Nal]:
    starts = []
    i = 0
    while (j := data.find(b"\x00\x00\x01", i)) >= 0:
        starts.append((j - 1 if j and data[j - 1] == 0 else j, j + 3))
        i = j + 3
    return [Nal(a, b, starts[n + 1][0] if n + 1 < len(starts) else len(data), data[b] & 0x1F)
            for n, (a, b) in enumerate(starts)]


def access_units(data: bytes) -> list[bytes]:
    """One picture's bytes each: a new one starts at an SPS/PPS/SEI/AUD after a slice, or at a slice
    whose first_mb_in_slice is 0 (its first bit is 1)."""
    out: list[bytes] = []
    start, seen_slice = 0, False
    for nal in nal_units(data):
        first_slice = nal.type in (1, 5) and data[nal.body + 1] & 0x80
        if seen_slice and (nal.type in (6, 7, 8, 9) or first_slice):
            out.append(data[start:nal.at])
            start, seen_slice = nal.at, False
        seen_slice = seen_slice or nal.type in (1, 5)
    out.append(data[start:])
    return out


@dataclass
class Videos:
    folder: Path
    good_h264: bytes
    units: list[bytes]  # the pictures of good_h264
    big_h264: bytes  # frames 90..134 at 640x480

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Videos:
    folder = tmp_path_factory.mktemp("malformed")
    encode(folder / "good.h264", FRAMES, "h264")
    encode(folder / "good.mkv", FRAMES, "matroska")
    encode(folder / "big.h264", 45, "h264", width=640, height=480, first=FRAMES)
    good = (folder / "good.h264").read_bytes()
    units = access_units(good)
    assert len(units) == FRAMES and b"".join(units) == good
    return Videos(folder, good, units, (folder / "big.h264").read_bytes())


def remux_mkv(videos: Videos, name: str, change: dict[int, bytes | None]) -> Path:
    """good.mkv with packet i's payload replaced by ``change[i]`` (None: left out), timestamps kept."""
    path = videos.folder / name
    with av.open(str(videos.folder / "good.mkv")) as inp, av.open(str(path), "w", format="matroska") as out:
        ist = inp.streams.video[0]
        ost = out.add_stream_from_template(ist)
        for i, pkt in enumerate(p for p in inp.demux(ist) if p.size):
            out_pkt: av.Packet = pkt
            if i in change:
                data = change[i]
                if data is None:
                    continue
                out_pkt = av.Packet(data)
                out_pkt.pts, out_pkt.dts, out_pkt.time_base = pkt.pts, pkt.dts, pkt.time_base
            out_pkt.stream = ost
            out.mux(out_pkt)
    return path


# -- recording them -------------------------------------------------------------------------


@dataclass
class Result:
    t0: int
    stats: RecorderStats
    segments: list[SegmentRecord]
    gaps: list[Gap]
    shown: list[tuple[int, int, str | None]]  # every stored frame: (frame index by capture time, capture µs, QR text)
    log: str

    def index_of(self, capture_us: int) -> int:
        return round((capture_us - self.t0) / FRAME_US)


def record(path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, *, masked: bool = False) -> Result:
    """Record ``path`` as a file camera to the end, then decode every indexed segment."""
    t0 = now_us() - 60_000_000  # recent: older footage would be evicted by age at once
    store = SegmentStore(tmp_path / "buffer.sqlite", tmp_path / "segments")
    camera = CameraConfig(source="file", url=str(path), width=W, height=H, fps=FPS)
    source = StreamSource(str(path), live=False, raw=masked, realtime=False, start_at=t0)
    mask = ScaledMask([[(0, 0), (8, 0), (8, 8)]], (W, H)) if masked else None
    with caplog.at_level(logging.INFO, logger="agent.buffer"):
        rec = Recorder(source, store, camera, BufferConfig(segment_seconds=2), mask=mask, live=False,
                       initial_backoff_s=0.1)
        rec.start()
        finished = rec.wait(60)
        if not finished:
            rec.stop()
            assert rec.wait(15), "the recorder did not even stop when asked"
    assert finished, f"the recorder hung on {path.name}: {rec.snapshot()}"
    assert rec.error is None, f"the recorder failed on {path.name}: {rec.error!r}"
    stats = rec.stats
    assert stats.camera_state == "ended", stats
    segments = store.all()
    shown: list[tuple[int, int, str | None]] = []
    det = cv2.QRCodeDetector()
    for seg in segments:
        with av.open(str(seg.path)) as c:  # raises if a segment is unplayable
            st = c.streams.video[0]
            tb = st.time_base
            assert tb is not None
            frames = [(seg.start_us + round((f.pts or 0) * tb * 1_000_000), f.to_ndarray(format="bgr24"))
                      for f in c.decode(st)]
        assert len(frames) == seg.frames, f"{seg.path.name}: {len(frames)} decoded of {seg.frames} indexed"
        for us, img in frames:
            shown.append((round((us - t0) / FRAME_US), us, read_qr_time(img, det)))
    result = Result(t0, stats, segments, store.gaps(), shown, caplog.text)
    store.close()
    assert "Traceback" not in result.log and not any(r.exc_info for r in caplog.records), result.log
    return result


def assert_right_times(result: Result, indexes: range, *, picture_first: int = 0) -> None:
    """Frames ``indexes`` are stored, each showing the time it was taken (all but one or two QR codes read)."""
    by_index = {i: text for i, _, text in result.shown}
    missing = [i for i in indexes if i not in by_index]
    assert not missing, f"frames {missing} were not recorded"
    read = {i: by_index[i] for i in indexes if by_index[i] is not None}
    assert len(read) >= len(indexes) - 2, f"only {len(read)} of {len(indexes)} QR codes read"
    for i, text in read.items():
        assert text == stamp(BASE_US + round((i + picture_first) * FRAME_US)), (i, text)


def assert_no_overlap(result: Result) -> None:
    """Segments follow each other in time (1 µs of rounding allowed where a raw stream's
    frame duration is 66,666 µs and the nominal one 66,667 µs)."""
    for a, b in zip(result.segments, result.segments[1:]):
        assert b.start_us >= a.end_us - 1, (a, b)


# -- the packet check itself ------------------------------------------------------------------


def test_the_framing_check_accepts_every_picture_of_a_real_stream_and_refuses_garbage(videos: Videos) -> None:
    for unit in videos.units:
        assert h264_packet_problem(unit, None) is None
    with av.open(str(videos.folder / "good.mkv")) as c:
        st = c.streams.video[0]
        size = nal_length_size(st.codec_context.extradata)
        assert size == 4
        for pkt in c.demux(st):
            if pkt.size:
                assert h264_packet_problem(bytes(pkt), size) is None
    rnd = random.Random(1)
    refused = sum(h264_packet_problem(rnd.randbytes(rnd.randint(1, 4000)), 4) is not None for _ in range(500))
    assert refused == 500
    assert h264_packet_problem(b"", 4) == "no NAL unit"
    assert h264_packet_problem(b"\x00\x00\x00\x01\xe5\x00", None) is not None  # forbidden bit set
    assert h264_packet_problem(b"junk", None) == "no start code"


# -- files: Annex B (as an RTSP camera frames its stream) -------------------------------------


def test_a_good_raw_h264_file_is_recorded_whole(videos: Videos, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A raw .h264 file has no timestamps: each frame must follow the one before by its duration
    (the bug this found: every frame got the first one's time and all but one were dropped)."""
    r = record(videos.folder / "good.h264", tmp_path, caplog)
    assert r.stats.frames_recorded == FRAMES and r.stats.frames_dropped == 0 and r.gaps == []
    assert_right_times(r, range(FRAMES))
    assert_no_overlap(r)


def test_nal_units_cut_short_mid_stream_are_stored_as_sent_and_recording_goes_on(
        videos: Videos, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    units = [u[:max(8, len(u) * 2 // 5)] if 20 <= i < 25 else u for i, u in enumerate(videos.units)]
    r = record(videos.write("truncated.h264", b"".join(units)), tmp_path, caplog)
    # Damage inside slice data cannot be seen without decoding: stored, concealed by the decoder.
    assert r.stats.frames_recorded == FRAMES and r.gaps == []
    assert_right_times(r, range(20))
    assert_right_times(r, range(30, FRAMES))  # from the next keyframe on, pictures are whole again


def test_random_bytes_between_pictures(videos: Videos, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rnd = random.Random(2)
    data = b"".join((rnd.randbytes(8000) if i == 40 else b"") + u for i, u in enumerate(videos.units))
    r = record(videos.write("garbage_between.h264", data), tmp_path, caplog)
    assert r.stats.frames_recorded >= FRAMES - KEYINT
    assert_right_times(r, range(40))
    assert_right_times(r, range(45, FRAMES))


def test_random_bytes_before_the_first_keyframe(videos: Videos, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = random.Random(3).randbytes(5000) + videos.good_h264
    r = record(videos.write("garbage_first.h264", data), tmp_path, caplog)
    assert_right_times(r, range(FRAMES))


def test_a_corrupt_sps_mid_stream(videos: Videos, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    unit = bytearray(videos.units[45])
    sps = nal_units(bytes(unit))[0]
    assert sps.type == 7
    for j in range(sps.body + 1, sps.end):  # profile, level, sizes: all bits scrambled
        unit[j] ^= 0x5A
    units = list(videos.units)
    units[45] = bytes(unit)
    r = record(videos.write("corrupt_sps.h264", b"".join(units)), tmp_path, caplog)
    assert_right_times(r, range(45))
    assert_right_times(r, range(60, FRAMES))


def test_an_sps_for_another_resolution_before_a_keyframe(videos: Videos, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    big = videos.big_h264
    foreign = b"".join(big[n.at:n.end] for n in nal_units(access_units(big)[0]) if n.type in (7, 8))
    own = videos.units[45]
    units = list(videos.units)
    units[45] = foreign + b"".join(own[n.at:n.end] for n in nal_units(own) if n.type not in (7, 8))
    r = record(videos.write("foreign_sps.h264", b"".join(units)), tmp_path, caplog)
    assert_right_times(r, range(45))
    assert_right_times(r, range(60, FRAMES))


@pytest.mark.parametrize("masked", [False, True], ids=["stream copy", "masked"])
def test_a_resolution_change_mid_stream(masked: bool, videos: Videos, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """The camera's settings changed: 320x240, then 640x480 with its own SPS. Both are recorded
    and show the right times (stream copy keeps the in-band SPS, which the decoder follows; a masked
    camera's frames are decoded and re-encoded at their new size)."""
    r = record(videos.write("res_change.h264", videos.good_h264 + videos.big_h264), tmp_path, caplog, masked=masked)
    assert r.stats.frames_recorded == FRAMES + 45 and r.gaps == []
    assert_right_times(r, range(FRAMES))
    by_index = {i: text for i, _, text in r.shown}
    read = [i for i in range(FRAMES, FRAMES + 45) if by_index.get(i) is not None]
    assert len(read) >= 43
    assert all(by_index[i] == stamp(BASE_US + round(i * FRAME_US)) for i in read)


def test_a_file_cut_off_mid_packet_finishes_cleanly(videos: Videos, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    data = b"".join(videos.units[:70]) + videos.units[70][:len(videos.units[70]) // 2]
    r = record(videos.write("cut.h264", data), tmp_path, caplog)
    assert_right_times(r, range(70))
    assert max(i for i, _, _ in r.shown) <= 70
    assert "the video has ended" in r.log


def test_an_empty_file_ends_and_says_so(videos: Videos, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    r = record(videos.write("empty.h264", b""), tmp_path, caplog)
    assert r.segments == [] and r.stats.frames_recorded == 0
    assert r.stats.last_error is not None and "no video frames" in r.stats.last_error
    assert "before a single frame could be read" in r.log


def test_a_file_that_is_not_video_is_retried_and_the_status_says_why(videos: Videos, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Like a camera that is not there: retried with backoff (the file may be replaced), never a crash."""
    path = videos.write("notes.mp4", b"This is a shopping list, not a video.\n" * 200)
    store = SegmentStore(tmp_path / "buffer.sqlite", tmp_path / "segments")
    camera = CameraConfig(source="file", url=str(path), width=W, height=H, fps=FPS)
    rec = Recorder(StreamSource(str(path), live=False, realtime=False), store, camera, BufferConfig(),
                   live=False, initial_backoff_s=0.05)
    with caplog.at_level(logging.WARNING, logger="agent.buffer"):
        rec.start()
        try:
            assert not rec.wait(1.0), f"the recorder stopped: {rec.error!r}"
            snap = rec.snapshot()
        finally:
            rec.stop()
            assert rec.wait(15)
    assert rec.error is None
    assert snap.camera_state == "reconnecting"
    assert snap.last_error is not None and "is not a video file that can be read" in snap.last_error
    assert "notes.mp4" in snap.last_error
    assert store.all() == [] and "Traceback" not in caplog.text
    store.close()


# -- files: length-prefixed packets (MKV, MP4), with their own timestamps ----------------------


def test_packets_of_random_bytes_become_a_gap_saying_damaged_video(videos: Videos, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Stored as they are, these packets made the segment unplayable (avcodec_send_packet refused it):
    the bug this found. Now the segment ends before them, and the hole up to the next keyframe is a gap."""
    rnd = random.Random(4)
    path = remux_mkv(videos, "garbage_packets.mkv", {i: rnd.randbytes(700) for i in range(40, 44)})
    r = record(path, tmp_path, caplog)
    assert r.stats.frames_dropped == 5  # the four damaged packets and the one after them, up to keyframe 45
    assert r.stats.frames_recorded == FRAMES - 5
    assert len(r.gaps) == 1, r.gaps
    gap = r.gaps[0]
    assert gap.reason.startswith("damaged video from the camera ("), gap.reason
    assert r.index_of(gap.start_us) == 40 and r.index_of(gap.end_us) == 45
    assert_right_times(r, range(40))
    assert_right_times(r, range(45, FRAMES))
    assert r.stats.last_error is not None and "damaged video" in r.stats.last_error
    assert r.log.count("damaged video from the camera") == 1  # once per run of bad packets, not per packet
    assert "recording again after 4 damaged packet(s)" in r.log


def test_a_damaged_keyframe_drops_its_whole_group(videos: Videos, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = remux_mkv(videos, "garbage_keyframe.mkv", {30: random.Random(5).randbytes(3000)})
    r = record(path, tmp_path, caplog)
    assert r.stats.frames_dropped == KEYINT
    assert [(r.index_of(g.start_us), r.index_of(g.end_us)) for g in r.gaps] == [(30, 45)]
    assert_right_times(r, range(30))
    assert_right_times(r, range(45, FRAMES))


def test_missing_packets_become_a_frames_missing_gap(videos: Videos, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = remux_mkv(videos, "missing.mkv", dict.fromkeys(range(40, 60)))
    r = record(path, tmp_path, caplog)
    assert [(r.index_of(g.start_us), r.index_of(g.end_us), g.reason) for g in r.gaps] == [(40, 60, "frames missing")]
    assert_right_times(r, range(40))
    assert_right_times(r, range(60, FRAMES))


@pytest.mark.parametrize("which", ["garbage packets", "truncated NAL units"])
def test_a_masked_camera_decodes_past_the_damage(which: str, videos: Videos, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """With a privacy mask the source decodes: the decoder's errors are skipped, not raised."""
    if which == "garbage packets":
        rnd = random.Random(6)
        path = remux_mkv(videos, "garbage_masked.mkv", {i: rnd.randbytes(700) for i in range(40, 44)})
    else:
        units = [u[:max(8, len(u) * 2 // 5)] if 20 <= i < 25 else u for i, u in enumerate(videos.units)]
        path = videos.write("truncated_masked.h264", b"".join(units))
    r = record(path, tmp_path, caplog, masked=True)
    assert r.stats.mode == "encode"  # decoded by the source, masked, encoded by the recorder
    assert_right_times(r, range(20))
    assert_right_times(r, range(60, FRAMES))
    assert_no_overlap(r)


# -- RTSP: a camera that changes its resolution while the recorder watches -------------------


def test_an_rtsp_camera_changing_resolution_mid_stream_is_recorded_on_both_sides(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A real RTSP server (tests/rtsp_server.py) switches from 320x240 to 640x480 after 45 frames:
    x264 restarts with a new SPS and a keyframe. Stream copy keeps the in-band SPS; every segment
    decodes, and the frames on both sides are the ones the camera sent, none lost or repeated."""
    from tests.test_rtsp_camera import _MISSING, Recording, RtspCamera

    if _MISSING is not None:
        pytest.skip(_MISSING)
    monkeypatch.setenv("RTSP_SERVER_SWITCH", "640x480@45")
    cam = RtspCamera(tmp_path / "sent.txt")
    try:
        with caplog.at_level(logging.INFO, logger="agent.buffer"):
            rec = Recording(tmp_path, cam.url)
            try:
                # 45 frames are three seconds: five 2-second segments reach well past the switch.
                rec.wait_segments(lambda s: len(s) >= 5, 60, "five stored segments")
            finally:
                stats = rec.stop()
    finally:
        cam.stop()
    assert rec.recorder.error is None and stats.camera_state == "stopped", stats
    sent = cam.sent()
    index = {stamp(t): k for k, t in enumerate(sent)}
    det = cv2.QRCodeDetector()
    shown: list[tuple[int, tuple[int, int]]] = []  # (index in sent, picture size) of every readable frame
    decoded = 0
    for seg in rec.store.all():
        with av.open(str(seg.path)) as c:
            frames = list(c.decode(c.streams.video[0]))
        assert len(frames) == seg.frames, seg
        decoded += len(frames)
        for f in frames:
            img = f.to_ndarray(format="bgr24")
            # The code reads best at the size it was drawn.
            text = read_qr_time(img if img.shape[:2] == (H, W) else cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA), det)
            if text is not None:
                assert text in index, f"a frame shows {text}, which the camera never sent"
                shown.append((index[text], (f.width, f.height)))
    assert len(shown) >= decoded - 4, f"only {len(shown)} of {decoded} QR codes read"
    sizes = [size for _, size in shown]
    assert (320, 240) in sizes and (640, 480) in sizes, set(sizes)
    first_big = sizes.index((640, 480))
    assert all(s == (320, 240) for s in sizes[:first_big]) and all(s == (640, 480) for s in sizes[first_big:])
    # One unbroken run of what the camera sent, across the switch (a missed QR read skips one number).
    steps = [b - a for (a, _), (b, _) in zip(shown, shown[1:])]
    assert all(1 <= s <= 2 for s in steps), [(i, s) for i, s in enumerate(steps) if not 1 <= s <= 2]
    assert rec.store.gaps() == [] and stats.frames_dropped == 0
    assert "Traceback" not in caplog.text
