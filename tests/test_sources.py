"""Camera sources: files and RTSP through PyAV, USB webcams through a scripted OpenCV capture,
the Pi camera's pure parts, and the factory that picks one."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from agent.buffer.capture import EncodedPacket, Frame, Source, SourceEnded, SourceUnavailable
from agent.buffer.capture.factory import make_source
from agent.buffer.capture.picamera2 import (
    EncodedFrameSink,
    Picamera2Source,
    WallClock,
    parse_pi_model,
    picamera2_available,
    sensor_to_wall_us,
)
from agent.buffer.capture.stream import (
    StreamClock,
    StreamSource,
    parse_creation_time,
    redact_url,
)
from agent.buffer.capture.synthetic import SyntheticSource
from agent.buffer.capture.v4l2 import V4L2Source
from agent.buffer.segmentfile import SegmentFile
from agent.config import CameraConfig
from agent.errors import UserError
from agent.timeutil import parse_utc_z, to_us

W, H = 320, 240
START_US = 1_750_000_000_000_000


def _pictures(n: int) -> list[np.ndarray]:
    """Distinct, codec-friendly frames: the synthetic camera's pattern."""
    cam = SyntheticSource(W, H, 10, realtime=False, start_us=START_US)
    cam.open()
    return [cam.read().image for _ in range(n)]


def make_video(path: Path, pts_ms: list[int], *, codec: str = "libx264", bframes: int = 0,
               creation_time: str | None = None) -> list[np.ndarray]:
    """A real video file whose frame i has pts ``pts_ms[i]`` milliseconds; returns the pictures."""
    pictures = _pictures(len(pts_ms))
    with av.open(str(path), "w", format="mp4") as out:
        if creation_time:
            out.metadata["creation_time"] = creation_time
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "x264-params": f"bframes={bframes}:keyint=5:scenecut=0"}
        for pts, img in zip(pts_ms, pictures, strict=True):
            vf = av.VideoFrame.from_ndarray(img, format="bgr24")
            vf.pts, vf.time_base = pts, Fraction(1, 1000)
            for pkt in stream.encode(vf):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    return pictures


def decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def read_until_end(source: StreamSource) -> list[Frame | EncodedPacket]:
    items: list[Frame | EncodedPacket] = []
    with pytest.raises(SourceEnded):
        for _ in range(10_000):
            items.append(source.read())
    return items


# -- files ---------------------------------------------------------------------


@pytest.fixture
def irregular_mp4(tmp_path: Path) -> tuple[Path, list[int]]:
    # Jittery frame spacing, as a real camera produces: capture times must follow the pts, not a nominal rate.
    pts_ms = [0, 100, 230, 300, 400, 520, 600, 700, 810, 900, 1000, 1150]
    path = tmp_path / "door.mp4"
    make_video(path, pts_ms)
    return path, pts_ms


def test_file_is_stored_packet_for_packet(irregular_mp4: tuple[Path, list[int]], tmp_path: Path) -> None:
    path, pts_ms = irregular_mp4
    source = StreamSource(str(path), live=False, realtime=False, start_at=START_US)
    source.open()
    assert source.kind == "encoded" and (source.width, source.height) == (W, H)
    items = read_until_end(source)
    assert all(isinstance(i, EncodedPacket) for i in items)
    assert len(items) == len(pts_ms)
    assert items[0].keyframe
    # Capture times: the chosen start plus the real pts spacing, strictly increasing.
    assert [i.capture_us - START_US for i in items] == [ms * 1000 for ms in pts_ms]

    seg = SegmentFile(tmp_path / "segments" / "a.mp4", template=source.stream_template, frame_us=100_000)
    for item in items:
        seg.add_packet(item)  # type: ignore[arg-type]
    info = seg.finish()
    source.close()
    assert info is not None and info.frames == len(pts_ms) and info.start_us == START_US

    original, stored = decode_all(path), decode_all(info.path)
    assert len(stored) == len(original) == len(pts_ms)
    for a, b in zip(original, stored, strict=True):
        assert np.array_equal(a, b), "a stream copy must decode to the very same pictures"
    with av.open(str(info.path)) as c:
        times = [f.pts for f in c.decode(video=0)]
        tb = c.streams.video[0].time_base
    assert [round(t * tb * 1000) for t in times] == pts_ms


def test_end_of_file_keeps_saying_ended(irregular_mp4: tuple[Path, list[int]]) -> None:
    source = StreamSource(str(irregular_mp4[0]), live=False, realtime=False)
    source.open()
    read_until_end(source)
    with pytest.raises(SourceEnded):
        source.read()
    source.close()


def test_file_start_time_from_its_creation_tag(tmp_path: Path) -> None:
    path = tmp_path / "tagged.mp4"
    make_video(path, [0, 100, 200], creation_time="2025-06-01T08:30:00.000000Z")
    source = StreamSource(str(path), live=False, realtime=False, start_at="creation_time")
    source.open()
    first = source.read()
    assert first.capture_us == to_us(parse_utc_z("2025-06-01T08:30:00Z"))
    source.close()


def test_creation_time_parsing() -> None:
    assert parse_creation_time("2025-06-01T08:30:00.000000Z") == to_us(parse_utc_z("2025-06-01T08:30:00Z"))
    assert parse_creation_time("1970-01-01T00:00:00.000000Z") is None  # an unset tag, not a real date
    assert parse_creation_time("yesterday") is None
    assert parse_creation_time(None) is None


def test_realtime_file_is_paced_by_its_pts(irregular_mp4: tuple[Path, list[int]]) -> None:
    now = [START_US]
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        now[0] += round(s * 1e6)

    source = StreamSource(str(irregular_mp4[0]), live=False, realtime=True, start_at="now",
                          clock_us=lambda: now[0], sleep=sleep)
    source.open()
    items = read_until_end(source)
    assert items[0].capture_us == START_US
    assert sum(waits) == pytest.approx(1.15, abs=1e-6)  # the last pts: the file took as long as it lasts
    assert now[0] == START_US + 1_150_000


def test_masked_h264_file_is_decoded_so_pixels_can_be_blacked_out(irregular_mp4: tuple[Path, list[int]]) -> None:
    path, pts_ms = irregular_mp4
    source = StreamSource(str(path), live=False, raw=True, realtime=False, start_at=START_US)
    source.open()
    assert source.kind == "raw" and source.stream_template is None
    frames = read_until_end(source)
    assert all(isinstance(f, Frame) for f in frames)
    assert [f.capture_us - START_US for f in frames] == [ms * 1000 for ms in pts_ms]
    for f, expected in zip(frames, decode_all(path), strict=True):
        assert f.image.shape == (H, W, 3) and np.array_equal(f.image, expected)
    assert "privacy mask" in source.describe()


def test_non_h264_file_is_decoded_to_raw_frames(tmp_path: Path) -> None:
    path = tmp_path / "old-camera.mp4"
    pictures = make_video(path, [0, 100, 200, 300], codec="mpeg4")
    source = StreamSource(str(path), live=False, realtime=False)
    source.open()
    assert source.kind == "raw" and "mpeg4 is not H.264" in source.describe()
    frames = read_until_end(source)
    assert len(frames) == 4
    for f, pic in zip(frames, pictures, strict=True):
        assert np.abs(f.image.astype(int) - pic.astype(int)).mean() < 12  # lossy, but the same picture


def test_h264_with_b_frames_is_decoded(tmp_path: Path) -> None:
    path = tmp_path / "bframes.mp4"
    make_video(path, [i * 100 for i in range(10)], bframes=2)
    source = StreamSource(str(path), live=False, realtime=False, start_at=START_US)
    source.open()
    assert source.kind == "raw"
    frames = read_until_end(source)
    times = [f.capture_us for f in frames]
    assert times == sorted(times) and len(times) == 10


def test_missing_file_is_unavailable_with_the_path(tmp_path: Path) -> None:
    source = StreamSource(str(tmp_path / "nope.mp4"), live=False)
    with pytest.raises(SourceUnavailable, match="nope.mp4 does not exist"):
        source.open()


# -- RTSP ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rtsp_nothing_listening_is_unavailable_quickly_without_the_password() -> None:
    url = f"rtsp://admin:hunter2@127.0.0.1:{_free_port()}/stream1"
    source = StreamSource(url, live=True, timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailable) as err:
        source.open()
    assert time.monotonic() - t0 < 1.5
    message = str(err.value)
    assert "connection refused" in message and "127.0.0.1" in message
    assert "hunter2" not in message and "hunter2" not in source.describe()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts and then says nothing: a camera that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(5)
    conns: list[socket.socket] = []

    def accept() -> None:
        try:
            conns.append(server.accept()[0])
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield server.getsockname()[1]
    server.close()
    t.join(timeout=5)
    for c in conns:
        c.close()


def test_rtsp_camera_that_hangs_is_unavailable_after_the_timeout(silent_server: int) -> None:
    source = StreamSource(f"rtsp://127.0.0.1:{silent_server}/live", live=True, timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailable) as err:
        source.open()
    assert time.monotonic() - t0 < 4
    assert "no RTSP answer from rtsp://127.0.0.1" in str(err.value)


def test_redact_url() -> None:
    assert redact_url("rtsp://admin:s3cret@10.0.0.5:554/h264") == "rtsp://admin:********@10.0.0.5:554/h264"
    assert redact_url("rtsp://10.0.0.5/h264") == "rtsp://10.0.0.5/h264"


def test_stream_clock_follows_pts_from_the_first_arrival() -> None:
    clock = StreamClock(max_lag_us=2_000_000)
    arrival0 = START_US
    assert clock.capture_us(90_000_000, arrival0) == arrival0
    # Packets arrive a little late (network jitter); capture times follow the camera's pts spacing.
    assert clock.capture_us(90_066_000, arrival0 + 80_000) == arrival0 + 66_000
    assert clock.capture_us(90_133_000, arrival0 + 140_000) == arrival0 + 133_000
    assert clock.reanchors == 0


def test_stream_clock_never_places_a_frame_in_the_future() -> None:
    clock = StreamClock()
    clock.capture_us(0, START_US + 300_000)  # the first packet was held up
    # The next one, 100 ms later by the camera, arrives only 50 ms later: the anchor was late.
    t = clock.capture_us(100_000, START_US + 350_000)
    assert t == START_US + 350_000 and clock.reanchors == 1
    assert clock.capture_us(200_000, START_US + 460_000) == START_US + 450_000


def test_stream_clock_reanchors_on_drift_and_camera_restart() -> None:
    clock = StreamClock(max_lag_us=2_000_000)
    clock.capture_us(0, START_US)
    # The camera's clock runs slow: after a while its pts lag our clock by more than max_lag.
    assert clock.capture_us(10_000_000, START_US + 12_500_000) == START_US + 12_500_000
    # The camera restarts its timestamps from zero.
    assert clock.capture_us(0, START_US + 12_600_000) == START_US + 12_600_000
    assert clock.reanchors == 2
    # Missing pts: the arrival time, still strictly increasing.
    assert clock.capture_us(None, START_US + 12_600_000) == START_US + 12_600_001


# -- USB webcams -------------------------------------------------------------------


class ScriptedCapture:
    """Stands in for cv2.VideoCapture on OpenCV's V4L2 backend (modules/videoio/src/cap_v4l.cpp):
    this machine has no camera.

    As the backend does: ``retrieve()`` after a good ``grab()`` returns ``(True, None)`` when the
    MJPEG frame does not decode (``convertToRgb`` leaves the Mat empty, retrieveFrame still returns
    true); ``get(CAP_PROP_FOURCC)`` is the format the driver granted, not the one asked for;
    ``get(CAP_PROP_FPS)`` is the driver's rate, or -1 when ``VIDIOC_G_PARM`` fails;
    ``get(CAP_PROP_POS_MSEC)`` is the last dequeued buffer's timestamp in ms (0 before the first).
    """

    def __init__(self, frames: list[np.ndarray | None], *, opened: bool = True,
                 offers: tuple[int, int] = (W, H), events: list[str] | None = None,
                 fourcc: str = "MJPG", fps: float | None = None,
                 stamps_ms: list[float] | None = None) -> None:
        self.frames = list(frames)
        self.opened = opened
        self.props: dict[int, float] = {}
        self.offers = offers
        self.events = events if events is not None else []
        self.released = False
        self.granted_fourcc = fourcc
        self.granted_fps = fps
        self.stamps_ms = list(stamps_ms) if stamps_ms is not None else None
        self.pos_ms = 0.0

    def isOpened(self) -> bool:  # noqa: N802
        return self.opened

    def set(self, prop: int, value: float) -> bool:
        self.props[prop] = value
        return True

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_FRAME_WIDTH:
            return self.offers[0]
        if prop == cv2.CAP_PROP_FRAME_HEIGHT:
            return self.offers[1]
        if prop == cv2.CAP_PROP_FOURCC:
            return float(cv2.VideoWriter.fourcc(*self.granted_fourcc))
        if prop == cv2.CAP_PROP_FPS:
            return self.granted_fps if self.granted_fps is not None else self.props.get(prop, 30.0)
        if prop == cv2.CAP_PROP_POS_MSEC:
            return self.pos_ms
        return self.props.get(prop, 0.0)

    def grab(self) -> bool:
        self.events.append("grab")
        if not self.frames:
            return False
        if self.stamps_ms:
            self.pos_ms = self.stamps_ms.pop(0)
        return True

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        self.events.append("retrieve")
        return True, self.frames.pop(0)

    def release(self) -> None:
        self.released = True


def test_v4l2_asks_for_mjpeg_and_stamps_right_after_grab() -> None:
    events: list[str] = []
    pics = _pictures(3)
    cap = ScriptedCapture(list(pics), offers=(W, H), events=events)
    ticks = iter(range(START_US, START_US + 10_000_000, 66_000))

    def clock() -> int:
        events.append("clock")
        return next(ticks)

    source = V4L2Source("/dev/video0", 1280, 720, 15, open_capture=lambda dev: cap, clock_us=clock)
    source.open()
    assert cap.props[cv2.CAP_PROP_FOURCC] == cv2.VideoWriter_fourcc(*"MJPG")
    assert (cap.props[cv2.CAP_PROP_FRAME_WIDTH], cap.props[cv2.CAP_PROP_FRAME_HEIGHT]) == (1280, 720)
    assert cap.props[cv2.CAP_PROP_FPS] == 15
    # The camera could only do 320x240: the source says so, so masks and encoders use the real size.
    assert (source.width, source.height) == (W, H)
    assert "MJPG" in source.describe()
    frames = [source.read() for _ in range(3)]
    assert events[:3] == ["grab", "clock", "retrieve"]
    assert [f.capture_us for f in frames] == [START_US, START_US + 66_000, START_US + 132_000]
    assert all(np.array_equal(f.image, p) for f, p in zip(frames, pics, strict=True))
    with pytest.raises(SourceUnavailable, match="stopped sending frames"):
        source.read()
    assert cap.released


def test_v4l2_grey_frames_become_bgr() -> None:
    cap = ScriptedCapture([np.full((H, W), 77, np.uint8)])
    source = V4L2Source("/dev/video0", W, H, 15, open_capture=lambda dev: cap)
    source.open()
    frame = source.read()
    assert frame.image.shape == (H, W, 3) and (frame.image == 77).all()


def test_v4l2_undecodable_frames_in_a_row_make_the_camera_unavailable() -> None:
    from agent.buffer.capture.v4l2 import MAX_BAD_FRAMES

    source = V4L2Source("/dev/video0", W, H, 15,
                        open_capture=lambda dev: ScriptedCapture([None] * (MAX_BAD_FRAMES + 1)))
    source.open()
    with pytest.raises(SourceUnavailable, match="could not be decoded"):
        source.read()


def test_v4l2_device_that_exists_but_will_not_open_names_the_likely_causes(tmp_path: Path) -> None:
    node = tmp_path / "video7"
    node.write_bytes(b"")
    source = V4L2Source(str(node), open_capture=lambda dev: ScriptedCapture([], opened=False))
    with pytest.raises(SourceUnavailable, match="another program may be using it"):
        source.open()


def test_v4l2_real_opencv_on_a_missing_device() -> None:
    source = V4L2Source("/dev/video97", W, H, 15)
    with pytest.raises(SourceUnavailable) as err:
        source.open()
    assert "no camera at /dev/video97" in str(err.value) and "plugged in" in str(err.value)


# -- Pi camera (pure parts) --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "generation", "encoder"),
    [
        ("Raspberry Pi 4 Model B Rev 1.5\x00", 4, True),
        ("Raspberry Pi 5 Model B Rev 1.0\x00", 5, False),
        ("Raspberry Pi Compute Module 4 Rev 1.0\x00", 4, True),
        ("Raspberry Pi Compute Module 5 Rev 1.0\x00", 5, False),
        ("Raspberry Pi 500 Rev 1.0\x00", 5, False),
        ("Raspberry Pi 400 Rev 1.0\x00", 4, True),
        ("Raspberry Pi 3 Model B Plus Rev 1.3\x00", 3, True),
        ("Raspberry Pi Zero 2 W Rev 1.0\x00", 3, True),
        ("Raspberry Pi Zero W Rev 1.1\x00", 1, True),
    ],
)
def test_pi_model_detection(text: str, generation: int, encoder: bool) -> None:
    model = parse_pi_model(text)
    assert model is not None
    assert model.name == text.rstrip("\x00")
    assert (model.generation, model.has_h264_encoder) == (generation, encoder)


def test_not_a_pi() -> None:
    assert parse_pi_model("Pine64 RockPro64 v2.1\x00") is None
    assert parse_pi_model("") is None


def test_sensor_timestamps_become_wall_clock_microseconds() -> None:
    # Booted 1000 s ago: monotonic reads 1000 s while the wall clock reads START.
    mono_ns, wall_ns = 1_000 * 10**9, START_US * 1000
    assert sensor_to_wall_us(mono_ns, mono_ns, wall_ns) == START_US
    assert sensor_to_wall_us(mono_ns - 33_333_333, mono_ns, wall_ns) == START_US - 33_334  # floor, not round
    assert sensor_to_wall_us(mono_ns + 1_500_000, mono_ns, wall_ns) == START_US + 1_500


def test_wall_clock_follows_an_ntp_step_on_the_very_next_frame() -> None:
    # Boot: the Pi 4 has no battery clock, so the wall clock starts an hour behind; NTP then steps it
    # forward between two frames 66 ms apart. The frame after the step must carry it (it used to
    # keep the stale offset for up to a minute, stamping frames an hour off).
    step_ns = 3600 * 10**9
    samples = iter([(10 * 10**9, START_US * 1000 - step_ns), (10_066_000_000, (START_US + 66_000) * 1000)])
    clock = WallClock(sample=lambda: next(samples))
    assert clock.to_wall_us(10 * 10**9) == START_US - step_ns // 1000
    assert clock.to_wall_us(10_066_000_000) == START_US + 66_000

def _annexb_access_units(pictures: list[np.ndarray]) -> list[tuple[bytes, bool]]:
    """What the Pi's hardware encoder hands picamera2: Annex-B access units with in-band SPS/PPS."""
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = W, H, "yuv420p"
    ctx.time_base = Fraction(1, 10)
    ctx.options = {"preset": "ultrafast", "x264-params": "bframes=0:keyint=5:scenecut=0:repeat-headers=1"}
    units: list[tuple[bytes, bool]] = []
    for i, img in enumerate(pictures):
        vf = av.VideoFrame.from_ndarray(img, format="bgr24")
        vf.pts = i
        units += [(bytes(p), p.is_keyframe) for p in ctx.encode(vf)]
    units += [(bytes(p), p.is_keyframe) for p in ctx.encode(None)]
    return units


def test_pi_encoder_output_is_stored_and_decodes_to_the_same_pictures(tmp_path: Path) -> None:
    pictures = _pictures(12)
    units = _annexb_access_units(pictures)
    first_sensor_us = 5_000_000_000  # 5000 s after boot
    mono_ns, wall_ns = first_sensor_us * 1000, START_US * 1000
    sink = EncodedFrameSink(lambda ns: sensor_to_wall_us(ns, mono_ns, wall_ns), lambda: first_sensor_us)
    # picamera2 passes timestamps relative to the first frame, in µs (Encoder._timestamp).
    for i, (data, key) in enumerate(units):
        sink.outputframe(data, key, i * 66_667)
    assert sink.template is not None and sink.template.codec_context.width == W
    packets = [sink.get(timeout=1) for _ in units]
    assert [p.capture_us - START_US for p in packets] == [i * 66_667 for i in range(len(units))]
    seg = SegmentFile(tmp_path / "pi.mp4", template=sink.template, frame_us=66_667)
    for p in packets:
        seg.add_packet(p)
    info = seg.finish()
    sink.close()
    assert info is not None and info.keyframes == 3
    stored = decode_all(info.path)
    assert len(stored) == 12
    for got, pic in zip(stored, pictures, strict=True):
        assert np.abs(got.astype(int) - pic.astype(int)).mean() < 8


def test_pi_sink_waits_for_a_keyframe_and_drops_to_the_next_one_when_full() -> None:
    units = _annexb_access_units(_pictures(11))  # keyframes at 0, 5, 10
    sink = EncodedFrameSink(lambda ns: ns // 1000, lambda: 0, maxsize=3)
    sink.outputframe(units[1][0], False, 1)  # joined mid-GOP: useless without its keyframe
    assert sink.dropped == 1 and sink.template is None
    for i, (data, key) in enumerate(units):
        sink.outputframe(data, key, i)
    got = []
    while True:
        try:
            got.append(sink.get(timeout=0.01))
        except SourceUnavailable:
            break
    # 0, 1, 2 fit; 3 overflows so 4 is dropped too; 5 is a keyframe but the queue is still full.
    assert [p.capture_us for p in got] == [0, 1, 2]
    assert sink.dropped == 1 + 8
    # Room again: a P-frame still waits for a keyframe, the next keyframe gets through.
    sink.outputframe(units[4][0], False, 11)
    sink.outputframe(units[10][0], True, 12)
    assert sink.get(timeout=0.01).capture_us == 12


def test_pi_source_picks_its_mode_from_the_encoder_not_the_board_name() -> None:
    pi4 = parse_pi_model("Raspberry Pi 4 Model B Rev 1.5")
    pi5 = parse_pi_model("Raspberry Pi 5 Model B Rev 1.0")
    assert Picamera2Source(model=pi4, hardware_encoder=True).kind == "encoded"
    assert Picamera2Source(model=pi4, hardware_encoder=True, raw=True).kind == "raw"  # a mask needs the pixels
    # A Pi 4 whose codec driver is not loaded (no /dev/video11) cannot use the encoder whatever its name.
    assert Picamera2Source(model=pi4, hardware_encoder=False).kind == "raw"
    assert Picamera2Source(model=pi5, hardware_encoder=False).kind == "raw"


def test_hardware_encoder_is_found_by_its_device_node(tmp_path: Path) -> None:
    from agent.buffer.capture.picamera2 import hardware_encoder_available

    assert not hardware_encoder_available(tmp_path / "video11")
    (tmp_path / "video11").write_bytes(b"")
    assert hardware_encoder_available(tmp_path / "video11")  # picamera2 absent here: the node decides


# -- factory -----------------------------------------------------------------------


def test_factory_picks_the_configured_camera(irregular_mp4: tuple[Path, list[int]]) -> None:
    assert isinstance(make_source(CameraConfig(source="synthetic", width=W, height=H)), SyntheticSource)
    usb = make_source(CameraConfig(source="v4l2", device="/dev/video2", width=W, height=H, fps=10))
    assert isinstance(usb, V4L2Source) and usb.device == "/dev/video2" and usb.fps == 10
    f = make_source(CameraConfig(source="file", url=str(irregular_mp4[0])), realtime=False)
    assert isinstance(f, StreamSource) and not f.live and not f.realtime and not f.want_raw
    cam = make_source(CameraConfig(source="rtsp", url="rtsp://10.0.0.5/h264"), realtime=False)
    assert isinstance(cam, StreamSource) and cam.live and cam.realtime  # a live camera is always real time
    pi = Picamera2Source(model=parse_pi_model("Raspberry Pi 5 Model B Rev 1.0"), hardware_encoder=False)
    assert all(isinstance(s, Source) for s in (usb, f, cam, pi)), "every camera speaks the Source interface"


def test_factory_asks_for_raw_frames_when_a_mask_is_set(irregular_mp4: tuple[Path, list[int]]) -> None:
    masked = CameraConfig(source="file", url=str(irregular_mp4[0]), masks=[[[0, 0], [10, 0], [10, 10]]])
    source = make_source(masked, realtime=False)
    source.open()
    assert source.kind == "raw" and isinstance(source.read(), Frame)
    source.close()


def test_a_non_rtsp_url_for_an_rtsp_camera_is_refused_by_the_configuration() -> None:
    from pydantic import ValidationError  # config check catches it too, not only run (tests/test_config.py)

    with pytest.raises(ValidationError, match="must start with rtsp://"):
        make_source(CameraConfig(source="rtsp", url="http://user:pw@10.0.0.5/video"))


@pytest.mark.skipif(picamera2_available(), reason="picamera2 is installed on this machine")
def test_factory_says_how_to_install_picamera2() -> None:
    with pytest.raises(UserError) as err:
        make_source(CameraConfig(source="picamera2"))
    assert "sudo apt install python3-picamera2" in str(err.value)


# -- regressions from the video-pipeline review ----------------------------------


def test_a_25_fps_file_is_stored_with_its_real_frame_duration(tmp_path: Path) -> None:
    """A 1/12800 time base (FFmpeg's choice for 25 fps MP4): the last frame lasts 40 ms, not 512 µs."""
    from agent.buffer.recorder import Recorder
    from agent.buffer.segments import SegmentStore
    from agent.config import BufferConfig

    path = tmp_path / "door25.mp4"
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": "bframes=0:keyint=25:scenecut=0"}
        for i, img in enumerate(_pictures(50)):
            vf = av.VideoFrame.from_ndarray(img, format="bgr24")
            vf.pts, vf.time_base = i, Fraction(1, 25)
            for pkt in stream.encode(vf):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    t0 = time.time_ns() // 1000 - 60_000_000  # recent: older footage would be evicted by age at once
    source = StreamSource(str(path), live=False, realtime=False, start_at=t0)
    source.open()
    assert source._stream.time_base == Fraction(1, 12800)  # the case under test
    source.close()

    store = SegmentStore(tmp_path / "buffer.sqlite", tmp_path / "segments")
    camera = CameraConfig(source="file", url=str(path), width=W, height=H, fps=15)  # the config's rate is not the file's
    stats = Recorder(source, store, camera, BufferConfig(segment_seconds=1)).run()
    assert stats.mode == "stream copy" and stats.frames_recorded == 50
    segs = store.all()
    assert len(segs) == 2
    for seg in segs:
        with av.open(str(seg.path)) as c:
            st = c.streams.video[0]
            pkts = [p for p in c.demux(st) if p.size]
        last_us = seg.start_us + round(pkts[-1].pts * st.time_base * 1_000_000)
        assert round(pkts[-1].duration * st.time_base * 1_000_000) == 40_000
        assert seg.end_us == last_us + 40_000  # the file's rate, read after open, not camera.fps
    # The two segments touch: one continuous span, no gap.
    assert store.spans(t0, t0 + 10_000_000) == [(t0, t0 + 2_000_000)]
    assert store.gaps() == []


def test_stream_clock_passes_a_backward_wall_clock_step_through_for_the_recorder_to_drop() -> None:
    clock = StreamClock()
    last = clock.capture_us(0, START_US)
    for i in range(1, 5):
        last = clock.capture_us(i * 40_000, START_US + i * 40_000)
    # NTP steps our clock back 3 s: the next frames' true (earlier) times come out, not
    # last + 1, last + 2, ... (which would store three seconds of frames a microsecond apart).
    stepped = [clock.capture_us(i * 40_000, START_US - 3_000_000 + i * 40_000) for i in range(5, 10)]
    assert stepped == [START_US - 3_000_000 + i * 40_000 for i in range(5, 10)]
    assert all(t < last for t in stepped)
    # A small step back (re-anchoring on jitter) is still nudged to keep times strictly increasing.
    clock2 = StreamClock()
    clock2.capture_us(0, START_US)
    clock2.capture_us(None, START_US + 100_000)
    assert clock2.capture_us(None, START_US + 60_000) == START_US + 100_001
