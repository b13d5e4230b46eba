"""The capture loop: camera -> privacy mask -> segment files -> index -> retention.

Two threads, so nothing slows the camera down:

- the *capture* thread only reads the source and puts items on a bounded
  queue. If the writer falls behind on a live camera, the queue fills and new
  frames are dropped and counted (a camera does not wait). A finite source (a
  file, a non-realtime test pattern) waits instead: nothing is dropped.
  Encoded packets cannot be dropped singly (the next frames refer to them),
  so after a drop the capture thread skips to the next keyframe.
- the *writer* thread masks, encodes or copies, rolls segments over at the
  first frame (or, for copied streams, keyframe) after ``segment_seconds``,
  indexes each finished segment and runs retention between segments.

Masked pixels are never stored: raw frames are masked before encoding, and an
already-encoded camera with a mask is decoded, masked and re-encoded.

Capture times only move forward in the buffer. If the wall clock steps back (an
NTP correction; a Pi without a real-time clock booting behind its last footage),
frames stamped at or before the newest stored frame are dropped, counted and
logged with the size of the step, until the clock passes it again. Storing them
would overlap earlier segments (a clip over them would be out of order), and
shifting their times would claim footage was taken when it was not. No gap row
is written for a backward step: nothing is missing from the timeline.

Broken video from the camera (tests/test_malformed_video.py): copied packets are not decoded,
so each gets a cheap look at its NAL framing (segmentfile.h264_packet_problem). A packet that
fails it would make a decoder refuse the whole segment: it is dropped with the packets up to the
next keyframe (they refer to it), counted in ``frames_dropped``, logged once per run, and the hole
becomes a gap whose reason starts "damaged video from the camera". Damage inside a picture's
slice data (cut-short NAL units, a scrambled SPS) cannot be seen without decoding: those frames are
stored as sent, the decoder conceals the damage until the next keyframe, and nothing is missing
from the timeline. A decoding source (a mask, a non-H.264 camera) skips what its decoder refuses;
the hole is a "frames missing" gap.

On an error the writer finishes the segment it has open (or removes it if even
that fails) before it stops, so no container or file descriptor is leaked.

The live counters go to ``paths.status_file`` (JSON, replaced atomically) every
few seconds for ``doorbell-agent status``, which may run in another process.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import av

from agent.buffer.capture import EncodedPacket, Frame, Source, SourceEnded, SourceUnavailable
from agent.buffer.segmentfile import EncoderSettings, SegmentFile, h264_packet_problem, nal_length_size, pick_codec
from agent.buffer.segments import SegmentStore
from agent.config import BufferConfig, CameraConfig
from agent.fsutil import is_disk_full, write_json_atomic

log = logging.getLogger(__name__)

# Every write of the status file costs a page on the SD card; 5 s is fresh enough for `status`.
STATUS_INTERVAL_S = 5.0
STATUS_VERSION = 1
# Per-segment timings kept for benchmarks: the newest this many, so a recorder running for
# months holds a fixed amount (at 4 s segments, about the last hour and a bit).
FIGURES_KEPT = 1024


def now_us() -> int:
    return time.time_ns() // 1000


class Mask(Protocol):
    def apply(self, image: Any) -> Any: ...


class ScaledMask:
    """A :class:`agent.buffer.masks.PrivacyMask` rebuilt for the frame size actually delivered.

    The resident draws polygons on the configured size; a camera may deliver
    another (a webcam that cannot do it). The mask follows the frames.
    """

    def __init__(self, polygons: list[list[tuple[int, int]]], drawn_for: tuple[int, int]) -> None:
        self.polygons, self.drawn_for = polygons, drawn_for
        self._mask: Any = None

    def apply(self, image: Any) -> Any:
        from agent.buffer.masks import PrivacyMask

        h, w = image.shape[:2]
        if self._mask is None or (self._mask.width, self._mask.height) != (w, h):
            self._mask = PrivacyMask(self.polygons, w, h, drawn_for=self.drawn_for)
        return self._mask.apply(image)


@dataclass
class RecorderStats:
    """What ``status`` shows; also returned to tests and benchmarks."""

    pid: int = field(default_factory=os.getpid)
    started_us: int = 0
    updated_us: int = 0
    camera: str = ""
    camera_state: str = "starting"  # starting | recording | reconnecting | ended | stopped
    mode: str = ""  # encode | stream copy | decode, mask and re-encode
    codec: str = ""
    frames_captured: int = 0
    frames_dropped: int = 0
    frames_recorded: int = 0
    segments_written: int = 0
    reconnects: int = 0
    fps: float = 0.0
    last_error: str | None = None
    last_error_us: int | None = None
    current_segment_start_us: int | None = None
    disk_full: str | None = None  # set while the disk is too full to keep recording normally; says what happens
    status_interval_s: float = STATUS_INTERVAL_S
    version: int = STATUS_VERSION

    @property
    def drop_rate(self) -> float:
        return self.frames_dropped / self.frames_captured if self.frames_captured else 0.0


@dataclass(frozen=True)
class _Disconnected:
    at_us: int
    error: str
    # Set by the writer once it has finished the segment: only then may the capture
    # thread close the source, whose stream the segment may be copying parameters from.
    done: threading.Event = field(default_factory=threading.Event, compare=False)


@dataclass(frozen=True)
class _Reconnected:
    pass


@dataclass(frozen=True)
class _End:
    reason: str  # "ended" | "stopped"


_Item = Frame | EncodedPacket | _Disconnected | _Reconnected | _End


class Recorder:
    """Records one source into the store until :meth:`stop` or the source ends."""

    def __init__(
        self,
        source: Source,
        store: SegmentStore,
        camera: CameraConfig,
        buffer: BufferConfig,
        *,
        status_file: Path | None = None,
        mask: Mask | None = None,
        clock_us: Callable[[], int] = now_us,
        live: bool | None = None,
        queue_frames: int | None = None,
        initial_backoff_s: float = 0.5,
        status_interval_s: float = STATUS_INTERVAL_S,
        on_segment: Callable[[Any], None] | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.camera = camera
        self.buffer = buffer
        self.status_file = status_file
        self.mask = mask
        self.clock_us = clock_us
        self.live = live if live is not None else bool(getattr(source, "live", getattr(source, "realtime", True)))
        fps = float(getattr(source, "fps", camera.fps) or camera.fps)
        # Two seconds of frames absorb a segment finalize or retention pass comfortably.
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_frames or max(8, int(fps * 2)))
        self.initial_backoff_s = initial_backoff_s
        self.status_interval_s = status_interval_s
        self.on_segment = on_segment
        self.stats = RecorderStats(status_interval_s=status_interval_s)
        # Seconds to finish (flush, fsync, hash, rename, index) and to run retention after each of the
        # newest FIGURES_KEPT segments.
        self.finalize_latencies_s: deque[float] = deque(maxlen=FIGURES_KEPT)
        self.retention_s: deque[float] = deque(maxlen=FIGURES_KEPT)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._arrivals: deque[int] = deque(maxlen=64)
        self._capture_thread: threading.Thread | None = None
        self._writer_thread: threading.Thread | None = None
        self._status_thread: threading.Thread | None = None
        self._done = threading.Event()
        self._status_failing = False
        self.error: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self.stats.started_us = self.clock_us()
        self.stats.camera = self.source.describe()
        self._capture_thread = threading.Thread(target=self._capture_loop, name="capture", daemon=True)
        self._writer_thread = threading.Thread(target=self._writer_main, name="segment-writer", daemon=True)
        self._status_thread = threading.Thread(target=self._status_loop, name="status", daemon=True)
        self._capture_thread.start()
        self._writer_thread.start()
        self._status_thread.start()

    def stop(self) -> None:
        """Ask both threads to stop; the segment being written is finished, not lost."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the recorder has finished (stopped, or the source ended)."""
        return self._done.wait(timeout)

    def run(self) -> RecorderStats:
        """Start, block until finished, return the final counters."""
        self.start()
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self.stats

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- capture thread ------------------------------------------------------

    def _capture_loop(self) -> None:
        backoff = self.initial_backoff_s
        opened = False
        disconnected = False
        skip_to_key = False
        try:
            while not self._stop.is_set():
                if not opened:
                    try:
                        self.source.open()
                    except SourceUnavailable as exc:
                        self._note_error(f"camera unavailable: {exc}")
                        if not disconnected:
                            disconnected = True
                            self._put_control(_Disconnected(self.clock_us(), str(exc)))
                        self._set_state("reconnecting")
                        log.warning("camera not available (%s); trying again in %.1f s", exc, backoff)
                        if self._stop.wait(backoff):
                            break
                        backoff = min(backoff * 2, self.camera.reconnect_max_s)
                        continue
                    opened = True
                    if disconnected:
                        with self._lock:
                            self.stats.reconnects += 1
                        log.warning("camera is back: %s", self.source.describe())
                        self._put_control(_Reconnected())
                        disconnected = False
                    self._set_state("recording")
                try:
                    item = self.source.read()
                except SourceUnavailable as exc:
                    self._note_error(f"camera unavailable: {exc}")
                    log.warning("camera disappeared (%s); reconnecting", exc)
                    marker = _Disconnected(self.clock_us(), str(exc))
                    self._put_control(marker)
                    while not marker.done.wait(0.5) and not self._stop.is_set():
                        pass
                    _close_quietly(self.source)
                    opened = False
                    disconnected = True
                    self._set_state("reconnecting")
                    # No reset here: a camera that opens and fails at once must back off too;
                    # only a good read (below) proves it is back.
                    if self._stop.wait(backoff):
                        break
                    backoff = min(backoff * 2, self.camera.reconnect_max_s)
                    continue
                except SourceEnded as exc:
                    if self.stats.frames_captured == 0:
                        # An empty file, or one with nothing decodable in it: say so, not just "ended".
                        self._note_error(f"no video frames in it ({exc})")
                        log.warning("the camera's video ended before a single frame could be read (%s)", exc)
                    else:
                        log.info("the video has ended (%s)", exc)
                    self._put_control(_End("ended"))
                    return
                backoff = self.initial_backoff_s
                with self._lock:
                    self.stats.frames_captured += 1
                    self._arrivals.append(self.clock_us())
                if isinstance(item, EncodedPacket) and skip_to_key:
                    if not item.keyframe:
                        self._count_drop()
                        continue
                    skip_to_key = False
                if self.live:
                    try:
                        self._queue.put_nowait(item)
                    except queue.Full:
                        self._count_drop()
                        skip_to_key = isinstance(item, EncodedPacket)
                else:
                    self._put_control(item)
            self._put_control(_End("stopped"))
        except BaseException as exc:  # noqa: BLE001 - reported by the writer, never silent
            self.error = exc
            self._note_error(f"capture failed: {type(exc).__name__}: {exc}")
            self._put_control(_End("stopped"))
        # The writer closes the source once it has written everything (see _writer_main).

    def _put_control(self, item: _Item) -> None:
        """Put an item that must not be dropped, waiting for room (but not forever if stopping)."""
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._stop.is_set() and not isinstance(item, _End):
                    return

    def _count_drop(self) -> None:
        with self._lock:
            self.stats.frames_dropped += 1

    def _note_error(self, text: str) -> None:
        with self._lock:
            self.stats.last_error = text
            self.stats.last_error_us = self.clock_us()

    def _set_state(self, state: str) -> None:
        with self._lock:
            self.stats.camera_state = state

    # -- writer thread -------------------------------------------------------

    def _writer_main(self) -> None:
        writer: _SegmentWriter | None = None
        try:
            writer = _SegmentWriter(self)
            writer.run()
        except BaseException as exc:  # noqa: BLE001
            log.exception("recording stopped by an error")
            if writer is not None:
                writer.salvage()
            self.error = self.error or exc
            self._note_error(f"recording failed: {type(exc).__name__}: {exc}")
            self._stop.set()
            # Unblock the capture thread if it waits on a full queue.
            while self._capture_thread is not None and self._capture_thread.is_alive():
                try:
                    self._queue.get(timeout=0.2)
                except queue.Empty:
                    pass
        finally:
            try:
                if self._capture_thread is not None:
                    self._capture_thread.join(timeout=10)
                _close_quietly(self.source)
                if self.stats.camera_state not in ("ended",):
                    self._set_state("stopped")
                self.write_status()
            finally:
                # Whatever failed above, wait() and run() must return.
                self._done.set()

    # -- status --------------------------------------------------------------

    def _status_loop(self) -> None:
        while not self._done.wait(self.status_interval_s):
            try:
                self.write_status()
            except Exception:  # noqa: BLE001 - the status file is a convenience; recording goes on
                log.exception("could not write the status file")

    def snapshot(self) -> RecorderStats:
        with self._lock:
            arrivals = list(self._arrivals)
            s = RecorderStats(**asdict(self.stats))
        now = self.clock_us()
        recent = [t for t in arrivals if now - t <= 5_000_000]
        if len(recent) >= 2 and recent[-1] > recent[0]:
            s.fps = round((len(recent) - 1) * 1_000_000 / (recent[-1] - recent[0]), 2)
        else:
            s.fps = 0.0
        s.updated_us = now
        return s

    def write_status(self) -> None:
        """Best effort: a full or read-only disk must not stop the recorder (or its shutdown)."""
        if self.status_file is None:
            return
        s = self.snapshot()
        data = asdict(s)
        data["drop_rate"] = round(s.drop_rate, 6)
        try:
            write_json_atomic(self.status_file, data)
        except OSError as exc:
            with self._lock:
                first, self._status_failing = not self._status_failing, True
            if first:
                log.warning("cannot write the status file %s (%s); `status` will show old figures until "
                            "it can be written again", self.status_file, exc)
            return
        with self._lock:
            recovered, self._status_failing = self._status_failing, False
        if recovered:
            log.warning("the status file %s can be written again", self.status_file)


class _SegmentWriter:
    """The writer thread's state: the open segment and what to do at each item."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.seg: SegmentFile | None = None
        self.segment_us = int(rec.buffer.segment_seconds * 1_000_000)
        # Real spacing of frames in the newest closed segment: a webcam at 10 fps in low light
        # that calls itself 30 fps must not get a "frames missing" gap at every boundary.
        self.spacing_us: float | None = None
        # Time of the end of the newest footage, and why the next hole (if any) happened.
        self.last_end_us: int | None = rec.store.latest_end_us()
        # Capture time of the newest stored frame. Frames not after it are dropped (see add_frame);
        # at start the end of the newest indexed segment stands in for it.
        self.last_frame_us: int | None = self.last_end_us - 1 if self.last_end_us is not None else None
        self._behind_since: int | None = None  # capture time of the first frame of a backward clock step
        self._seg_frames = 0
        self._last_bytes: int | None = None  # size of the newest segment stored: the room the next one needs
        self.gap_reason = "recorder was not running"
        self.disconnected_at: int | None = None
        self.decoder: av.VideoCodecContext | None = None
        # NAL framing of the copied stream: None until known, then (length prefix size or None for Annex B,).
        self._framing: tuple[int | None] | None = None
        self._damaged = 0  # packets dropped as damaged since the last good keyframe
        self.codec = pick_codec(rec.camera.encoder)
        self._settings: EncoderSettings | None = None

    @property
    def fps(self) -> float:
        """Nominal rate. Read when needed, not at start: a stream's rate is known only once the
        capture thread has opened it (StreamSource.fps is 0 before)."""
        return float(getattr(self.rec.source, "fps", 0) or self.rec.camera.fps)

    @property
    def frame_us(self) -> int:
        return round(1_000_000 / self.fps)

    def gap_tolerance_us(self) -> float:
        """Holes up to this long are jitter or a dropped frame, not a gap worth a row."""
        return 1.5 * max(self.frame_us, self.spacing_us or 0)

    def accept(self, capture_us: int) -> bool:
        """False for a frame not after the newest stored one: the wall clock stepped back.

        Such frames are dropped (and counted) until the clock passes the newest stored frame
        again. Storing them would make segments overlap in time, and a clip over them would
        be out of order; shifting their times would put footage at times it was not taken.
        """
        last = self.last_frame_us
        if last is None or capture_us > last:
            if self._behind_since is not None:
                log.warning("the clock has caught up with the newest recorded frame; recording again")
                self._behind_since = None
            return True
        if self._behind_since is None:
            self._behind_since = capture_us
            log.warning("the clock went back by %.3f s (a frame stamped %d after one stamped %d); frames are "
                        "dropped until it passes the newest recorded frame again",
                        (last - capture_us) / 1e6, capture_us, last)
            self.rec._note_error(f"clock went back by {(last - capture_us) / 1e6:.3f} s; frames dropped")
        with self.rec._lock:
            self.rec.stats.frames_dropped += 1
        return False

    def salvage(self) -> None:
        """After an error: keep the open segment if it can be finished, else remove it. Never raises."""
        seg, self.seg = self.seg, None
        if seg is None:
            return
        try:
            info = seg.finish()
            if info is not None:
                self.rec.store.add(info)
        except Exception:  # noqa: BLE001 - already failing; do not hide the first error
            log.warning("could not finish the open segment after the error; removing it", exc_info=True)
            seg.abort()

    def run(self) -> None:
        rec = self.rec
        q = rec._queue
        while True:
            item = q.get()
            if isinstance(item, _End):
                try:
                    self.close_segment()
                except Exception as exc:
                    if not is_disk_full(exc):
                        raise
                    self.disk_full(exc)
                if item.reason == "ended":
                    rec._set_state("ended")
                if self.disconnected_at is not None and self.last_end_us is not None:
                    rec.store.add_gap(self.last_end_us, rec.clock_us(), self.gap_reason)
                return
            if isinstance(item, _Disconnected):
                self.close_segment()
                item.done.set()
                self.gap_reason = f"camera unavailable ({item.error})"
                self.disconnected_at = item.at_us
                if self.last_end_us is None:
                    self.last_end_us = item.at_us
                continue
            if isinstance(item, _Reconnected):
                self.decoder = None  # a new stream may have new parameters
                self._framing = None
                continue
            try:
                self.store_item(item)
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                self.disk_full(exc)

    def store_item(self, item: EncodedPacket | Frame) -> None:
        rec = self.rec
        if isinstance(item, EncodedPacket):
            # A source that blacked the mask out before its own encoder (the Pi camera's
            # YUV buffer) says so: its packets are stored as they are.
            if rec.mask is None or getattr(rec.source, "masks_applied", False):
                self.add_packet(item)
            else:
                for frame in self.decode(item):
                    self.add_frame(frame)
        else:
            self.add_frame(item)

    # raw frames (and decoded-for-masking frames)

    def add_frame(self, frame: Frame) -> None:
        rec = self.rec
        if not self.accept(frame.capture_us):
            return
        if self.seg is not None and self.seg.start_us is not None and frame.capture_us - self.seg.start_us >= self.segment_us:
            self.close_segment()
        if self.seg is None:
            self.open_segment(frame.capture_us, settings=self.settings(frame))
        image = rec.mask.apply(frame.image) if rec.mask is not None else frame.image
        assert self.seg is not None
        self.seg.add_frame(Frame(frame.capture_us, image) if image is not frame.image else frame)
        self.stored(frame.capture_us)

    def settings(self, frame: Frame) -> EncoderSettings:
        h, w = frame.image.shape[:2]
        s = self._settings
        if s is None or (s.width, s.height) != (w, h):
            fps = self.fps
            s = self._settings = EncoderSettings(self.codec, w, h, fps, self.rec.camera.keyframe_interval_s)
            mode = "encode" if self.rec.source.kind == "raw" else "decode, mask and re-encode"
            with self.rec._lock:
                self.rec.stats.mode, self.rec.stats.codec = mode, self.codec
        return s

    # encoded packets, stored as they are

    def add_packet(self, item: EncodedPacket) -> None:
        rec = self.rec
        if self.damaged(item):
            return
        if not self.accept(item.capture_us):
            # The packets after this one may refer to it: end the segment here and start the
            # next at a keyframe (the check below drops the rest of this group).
            self.close_segment()
            return
        if self.seg is not None and item.keyframe and self.seg.start_us is not None \
                and item.capture_us - self.seg.start_us >= self.segment_us:
            self.close_segment()
        if self.seg is None:
            if not item.keyframe:
                with rec._lock:
                    rec.stats.frames_dropped += 1  # cannot start a segment mid-GOP
                return
            template = rec.source.stream_template
            if template is None:
                raise RuntimeError(f"{rec.source.describe()} gives encoded packets but no stream template")
            with rec._lock:
                rec.stats.mode, rec.stats.codec = "stream copy", template.codec_context.name
            self.open_segment(item.capture_us, template=template)
        assert self.seg is not None
        self.seg.add_packet(item)
        self.stored(item.capture_us)

    def damaged(self, item: EncodedPacket) -> bool:
        """True (and the packet dropped) if it is not well-formed H.264 (see h264_packet_problem).

        Stored, such a packet would make the segment unplayable: the segment ends at the frame
        before it, the packets up to the next good keyframe are dropped (they refer to it), and
        the hole becomes a gap saying why. Counted as dropped frames; logged once per run.
        """
        template = self.rec.source.stream_template
        if template is None or template.codec_context.name != "h264":
            return False
        if self._framing is None:
            self._framing = (nal_length_size(template.codec_context.extradata),)
        problem = h264_packet_problem(bytes(item.packet), self._framing[0])
        if problem is None:
            return False
        with self.rec._lock:
            self.rec.stats.frames_dropped += 1
        if not self._damaged:
            log.warning("damaged video from the camera (%s): skipping to its next good keyframe", problem)
            self.rec._note_error(f"damaged video from the camera ({problem}); skipped to the next keyframe")
        self._damaged += 1
        self.close_segment()
        self.gap_reason = f"damaged video from the camera ({problem})"
        return True

    def decode(self, item: EncodedPacket) -> list[Frame]:
        if self.decoder is None:
            template = self.rec.source.stream_template
            name = template.codec_context.name if template is not None else "h264"
            # A video stream's codec, so PyAV makes a VideoCodecContext (the stubs say so only for literal names).
            self.decoder = cast(av.VideoCodecContext, av.CodecContext.create(name, "r"))
            if template is not None and template.codec_context.extradata:
                self.decoder.extradata = template.codec_context.extradata
        pkt = item.packet
        pkt.pts = pkt.dts = item.capture_us  # carried through to the decoded frame
        out = []
        try:
            frames = self.decoder.decode(pkt)
        except av.FFmpegError as exc:
            self.rec._note_error(f"could not decode a camera packet: {exc}")
            with self.rec._lock:
                self.rec.stats.frames_dropped += 1
            return []
        for vf in frames:
            cap = vf.pts if vf.pts is not None else item.capture_us
            out.append(Frame(int(cap), vf.to_ndarray(format="bgr24")))
        return out

    # segments

    def open_segment(self, start_us: int, **kw: Any) -> None:
        rec = self.rec
        if self.last_end_us is not None and start_us - self.last_end_us > self.gap_tolerance_us():
            rec.store.add_gap(self.last_end_us, start_us, self.gap_reason)
        self.disconnected_at = None
        self.gap_reason = "frames missing"
        if self._damaged:
            log.warning("recording again after %d damaged packet(s) from the camera", self._damaged)
            self._damaged = 0
        path = rec.store.new_segment_path(start_us)
        self.seg = SegmentFile(path, frame_us=self.frame_us, **kw) if "template" in kw else SegmentFile(path, **kw)
        self._seg_frames = 0
        with rec._lock:
            rec.stats.current_segment_start_us = start_us

    def close_segment(self) -> None:
        rec = self.rec
        seg, self.seg = self.seg, None
        if seg is None:
            return
        if self._seg_frames > 1 and seg.start_us is not None and seg.last_us is not None:
            self.spacing_us = (seg.last_us - seg.start_us) / (self._seg_frames - 1)
        t0 = time.perf_counter()
        try:
            info = seg.finish()
        except BaseException:
            seg.abort()  # do not leak the container and its file descriptor
            raise
        if info is None:
            return
        try:
            record = rec.store.add(info)
        except Exception as exc:
            if is_disk_full(exc):  # not indexed: the file would be an orphan taking the space needed
                info.path.unlink(missing_ok=True)
            raise
        self._last_bytes = info.bytes
        rec.finalize_latencies_s.append(time.perf_counter() - t0)
        self.last_end_us = info.end_us
        with rec._lock:
            rec.stats.segments_written += 1
            rec.stats.current_segment_start_us = None
        if rec.on_segment is not None:
            rec.on_segment(record)
        t1 = time.perf_counter()
        report = rec.store.enforce_retention(rec.clock_us())
        rec.retention_s.append(time.perf_counter() - t1)
        if report.evicted:
            log.info("retention: removed %d old segment(s), %d bytes (%s)", report.evicted, report.bytes_freed,
                     ", ".join(f"{k}: {v}" for k, v in report.reasons.items()))
        too_full = ("THE DISK IS TOO FULL TO KEEP A BUFFER: only the newest segment is kept (free space is below "
                    "buffer.min_free_bytes)" if rec.store.disk_too_full else None)
        with rec._lock:
            was = rec.stats.disk_full
        # After a full disk, "room again" only with room for a few more segments: not at every segment.
        if too_full is None and was is not None and not was.startswith("THE DISK IS TOO FULL") \
                and rec.store.free_bytes() < 4 * info.bytes:
            return
        with rec._lock:
            rec.stats.disk_full = too_full
        if was is not None and too_full is None:
            log.warning("the disk has room again; recording normally")

    def disk_full(self, exc: BaseException) -> None:
        """A write failed because the disk is full: drop the open segment, evict the oldest, go on.

        Retention runs after each segment and keeps buffer.min_free_bytes free, but a disk can fill
        faster (another program, a too-small min_free_bytes). Stopping the recorder would lose
        everything from now on; the frames of the open segment are lost instead (a gap says why),
        and the oldest footage makes room. The newest stored segment is never evicted.
        """
        rec = self.rec
        seg, self.seg = self.seg, None
        if seg is not None:
            seg.abort()
        with rec._lock:
            rec.stats.frames_dropped += max(self._seg_frames, 1)
            rec.stats.current_segment_start_us = None
            first = rec.stats.disk_full is None
        self._seg_frames = 0
        self.gap_reason = "the disk was full"
        need = max(self.rec.buffer.min_free_bytes, rec.store.reserve_bytes) + 2 * (self._last_bytes or 1024 * 1024)
        try:
            freed = rec.store.make_room(need)
        except Exception:  # noqa: BLE001 - the index itself cannot be written; try again at the next frame
            log.debug("could not evict to make room", exc_info=True)
            freed = 0
        text = ("THE DISK IS FULL: the oldest footage is removed to keep recording" if freed else
                "THE DISK IS FULL and no older footage is left to remove: frames are dropped until space is freed")
        with rec._lock:
            changed, rec.stats.disk_full = rec.stats.disk_full != text, text
        if first or changed:
            log.warning("%s (%s); free some space on %s", text, exc, rec.store.segments_dir)
            rec._note_error(text)

    def stored(self, capture_us: int) -> None:
        self.last_frame_us = capture_us
        self._seg_frames += 1
        with self.rec._lock:
            self.rec.stats.frames_recorded += 1


def _close_quietly(source: Source) -> None:
    try:
        source.close()
    except Exception:  # noqa: BLE001 - the camera is already gone
        log.debug("closing the source failed", exc_info=True)
