"""The segment index against real segment files and a real SQLite database."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import av
import pytest

from agent.buffer.capture.synthetic import SyntheticSource
from agent.buffer.segmentfile import (
    FRAGMENTED,
    EncoderSettings,
    SegmentFile,
    open_encoder_stream,
)
from agent.buffer.segments import SegmentStore
from agent.config import BufferConfig
from agent.timeutil import to_us
from tests.buffer_helpers import (
    FPS,
    FRAME_US,
    H,
    W,
    decoded_frames,
    now_us,
    stamp,
    write_segment,
)

HOUR_US = 3600 * 1_000_000
GLOBAL_HEADER = 1 << 22  # AV_CODEC_FLAG_GLOBAL_HEADER: parameter sets in extradata, not in-band


@pytest.fixture
def store(tmp_path: Path) -> SegmentStore:
    s = SegmentStore(tmp_path / "buffer.sqlite", tmp_path / "segments")
    yield s
    s.close()


def add(store: SegmentStore, start_us: int, frames: int = 30):
    return store.add(write_segment(store.new_segment_path(start_us), start_us, frames))


def disk_segments(store: SegmentStore) -> set[Path]:
    return {p for p in store.segments_dir.rglob("*") if p.is_file()}


def test_new_segment_path_is_hourly_and_named_by_start(store: SegmentStore) -> None:
    start = to_us(datetime(2026, 12, 3, 16, 30, 45, 123456, tzinfo=UTC))
    assert store.new_segment_path(start) == store.segments_dir / "20261203T16" / f"{start}.mp4"


def test_added_segments_are_found_by_time_with_absolute_paths(store: SegmentStore) -> None:
    t0 = now_us() - 60_000_000
    recs = [add(store, t0 + i * 2_000_000) for i in range(3)]  # 30 frames at 15 fps = 2 s each
    found = store.overlapping(t0 + 2_500_000, t0 + 4_500_000)
    assert [r.start_us for r in found] == [t0 + 2_000_000, t0 + 4_000_000]
    assert all(r.path.is_absolute() and r.path.is_file() for r in found)
    assert found[0].frames == 30 and found[0].end_us == t0 + 4_000_000 and found[0].sha256 == recs[1].sha256
    # The index stores paths relative to segments_dir, so the data directory can move.
    with sqlite3.connect(store.buffer_db) as db:
        assert all(not Path(p).is_absolute() for (p,) in db.execute("SELECT path FROM segments"))
    # A window touching only the end boundary holds nothing from that segment.
    assert store.overlapping(t0 + 6_000_000, t0 + 7_000_000) == []


def test_spans_merge_touching_segments_and_keep_holes(store: SegmentStore) -> None:
    t0 = now_us() - 120_000_000
    add(store, t0)
    add(store, t0 + 2_000_000 + FRAME_US)  # one frame missing between them: still continuous
    second_end = t0 + 4_000_000 + FRAME_US
    later = second_end + 10_000_000  # a 10 s hole
    add(store, later)
    store.add_gap(second_end, later, "camera unavailable (camera unplugged)")
    assert store.spans(t0 - 5_000_000, later + 60_000_000) == [(t0, second_end), (later, later + 2_000_000)]
    # Intersected with the asked interval.
    assert store.spans(t0 + 1_000_000, later + 1_000_000) == [(t0 + 1_000_000, second_end), (later, later + 1_000_000)]
    assert store.spans(second_end + 1, later - 1) == []
    s = store.summary()
    assert (s.start_us, s.end_us, s.segments) == (t0, later + 2_000_000, 3)
    assert s.recorded_us == (second_end - t0) + 2_000_000
    assert s.total_bytes == sum(p.stat().st_size for p in disk_segments(store))
    assert [(g.start_us, g.end_us, g.reason) for g in s.gaps] == [(second_end, later, "camera unavailable (camera unplugged)")]


def test_retention_by_age_removes_rows_and_files_oldest_first(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path / "b.sqlite", tmp_path / "segments", buffer=BufferConfig(retention_hours=1))
    now = now_us()
    old = [add(store, now - 3 * HOUR_US + i * 2_000_000) for i in range(2)]
    keep = add(store, now - HOUR_US + 60_000_000)
    store.add_gap(old[1].end_us, keep.start_us, "recorder was not running")
    assert store.enforce_retention(now - 4 * HOUR_US).evicted == 0  # nothing is old yet at that time
    report = store.enforce_retention(now)
    assert report.evicted == 2 and report.reasons == {"age": 2}
    assert report.bytes_freed == sum(r.bytes for r in old)
    assert [r.id for r in store.all()] == [keep.id]
    assert disk_segments(store) == {keep.path}
    assert not old[0].path.parent.exists() or old[0].path.parent == keep.path.parent
    # The gap before the oldest footage explains nothing any more.
    assert store.summary().gaps == []
    # Time moves on: the last one goes too.
    assert store.enforce_retention(now + HOUR_US).evicted == 1 and disk_segments(store) == set()


def test_retention_by_total_bytes(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path / "b.sqlite", tmp_path / "segments")
    t0 = now_us() - 60_000_000
    recs = [add(store, t0 + i * 2_000_000) for i in range(5)]
    # Room for about three segments (validation keeps real configs above 16 MB; the logic is the same).
    limit = sum(r.bytes for r in recs[2:]) + 10
    small = BufferConfig.model_construct(segment_seconds=4, retention_hours=72, max_bytes=limit, min_free_bytes=0)
    report = store.enforce_retention(now_us(), small)
    assert report.reasons == {"size": 2}
    assert [r.start_us for r in store.all()] == [r.start_us for r in recs[2:]]
    assert sum(r.bytes for r in store.all()) <= limit
    assert disk_segments(store) == {r.path for r in recs[2:]}


def test_retention_keeps_free_space(tmp_path: Path) -> None:
    segdir = tmp_path / "segments"
    capacity = {"free": 0}

    def disk_free(_path: Path) -> int:  # a small disk: free space falls as segment files are written
        return capacity["free"] - sum(p.stat().st_size for p in segdir.rglob("*") if p.is_file())

    store = SegmentStore(tmp_path / "b.sqlite", segdir, disk_free=disk_free)
    t0 = now_us() - 60_000_000
    recs = [add(store, t0 + i * 2_000_000) for i in range(4)]
    used = sum(r.bytes for r in recs)
    guard = BufferConfig.model_construct(segment_seconds=4, retention_hours=72, max_bytes=10**12,
                                         min_free_bytes=100_000)
    capacity["free"] = used + 100_000  # exactly at the guard: nothing to do
    assert store.enforce_retention(now_us(), guard).evicted == 0
    capacity["free"] = used + 100_000 - recs[0].bytes - 1  # one byte short of room for the oldest
    report = store.enforce_retention(now_us(), guard)
    assert report.reasons == {"free space": 2}
    assert disk_free(segdir) >= 100_000
    assert [r.id for r in store.all()] == [r.id for r in recs[2:]] and disk_segments(store) == {r.path for r in recs[2:]}


def test_reconcile_drops_rows_whose_file_is_missing(store: SegmentStore) -> None:
    t0 = now_us() - 60_000_000
    a, b = add(store, t0), add(store, t0 + 2_000_000)
    b.path.unlink()
    report = store.reconcile()
    assert report.dropped_rows == [b.path] and not report.removed_orphans
    assert [r.id for r in store.all()] == [a.id]


def test_reconcile_indexes_an_orphan_that_plays_and_removes_one_that_does_not(store: SegmentStore) -> None:
    t0 = now_us() - 60_000_000
    good = write_segment(store.new_segment_path(t0), t0, 30)  # finished but never indexed (crash before add)
    bad_start = t0 + 2_000_000
    bad = write_segment(store.new_segment_path(bad_start), bad_start, 30)
    with open(bad.path, "r+b") as fh:  # a damaged file: its last fragment is cut off
        # Inside the last fragment's media data: cutting at half could land exactly on a
        # fragment boundary (about 1 run in 40), leaving a shorter file that plays.
        fh.truncate(bad.bytes - 100)
    stray = store.segments_dir / "notes.txt"
    stray.write_text("not a segment")
    report = store.reconcile()
    assert report.indexed_orphans == [good.path]
    assert report.removed_orphans == [bad.path] and not bad.path.exists()
    assert report.ignored == [stray] and stray.exists()
    [rec] = store.all()
    assert (rec.start_us, rec.end_us, rec.frames, rec.bytes, rec.sha256) == (
        good.start_us, good.end_us, good.frames, good.bytes, good.sha256)
    assert store.reconcile().changed is False  # a second pass finds nothing to do


def test_reconcile_removes_a_part_with_nothing_recoverable(store: SegmentStore) -> None:
    t0 = now_us() - 60_000_000
    info = write_segment(store.new_segment_path(t0), t0, 30)
    part = info.path.with_name(info.path.name + ".part")
    data = info.path.read_bytes()
    info.path.unlink()
    part.write_bytes(data[:600])  # killed before the first keyframe group was complete
    report = store.reconcile()
    assert report.removed_parts == [part] and not part.exists()
    assert store.all() == [] and disk_segments(store) == set()


def test_reconcile_recovers_a_fragmented_part_up_to_its_last_complete_packet(store: SegmentStore) -> None:
    """A .part whose packets can be read (a fragmented MP4) is kept up to the cut."""
    t0 = now_us() - 60_000_000
    final = store.new_segment_path(t0)
    final.parent.mkdir(parents=True)
    part = final.with_name(final.name + ".part")
    src = SyntheticSource(W, H, FPS, realtime=False, start_us=t0)
    src.open()
    with av.open(str(part), "w", format="mp4",
                 options={"movflags": "frag_keyframe+empty_moov+default_base_moof"}) as c:
        stream = open_encoder_stream(c, EncoderSettings("libx264", W, H, FPS))
        for _ in range(60):
            f = src.read()
            vf = av.VideoFrame.from_ndarray(f.image, format="bgr24").reformat(format="yuv420p")
            vf.pts = f.capture_us - t0
            for pkt in stream.encode(vf):
                c.mux(pkt)
        for pkt in stream.encode(None):
            c.mux(pkt)
    size = part.stat().st_size
    with open(part, "r+b") as fh:
        fh.truncate(size * 3 // 4)  # the crash cut the last fragment
    report = store.reconcile()
    assert report.recovered_parts == [final] and not part.exists()
    [rec] = store.all()
    frames = decoded_frames(rec.path, rec.start_us)
    assert 15 <= len(frames) < 60 and rec.frames == len(frames)
    # Every recovered frame is the right picture at the right time.
    assert [qr for _, qr in frames] == [stamp(us) for us, _ in frames]
    assert [us for us, _ in frames] == [t0 + round(i * 1_000_000 / FPS) for i in range(len(frames))]
    assert rec.end_us == frames[-1][0] + FRAME_US


# -- regressions from the video-pipeline review ----------------------------------


def write_fragmented(path: Path, t0: int, frames: int, *, global_header: bool = True) -> None:
    """A fragmented segment as the recorder writes it, cut short by nothing (yet)."""
    src = SyntheticSource(W, H, FPS, realtime=False, start_us=t0)
    src.open()
    with av.open(str(path), "w", format="mp4", options={"movflags": FRAGMENTED}) as c:
        stream = open_encoder_stream(c, EncoderSettings("libx264", W, H, FPS))
        if not global_header:
            stream.codec_context.flags &= ~GLOBAL_HEADER
        for _ in range(frames):
            f = src.read()
            vf = av.VideoFrame.from_ndarray(f.image, format="bgr24").reformat(format="yuv420p")
            vf.pts = f.capture_us - t0
            for pkt in stream.encode(vf):
                c.mux(pkt)
        for pkt in stream.encode(None):
            c.mux(pkt)


def test_reconcile_after_a_crash_during_recovery_recovers_from_the_original(store: SegmentStore) -> None:
    """Power cut while remuxing: the original is X.mp4.recover, a partial remux is X.mp4.part."""
    t0 = now_us() - 60_000_000
    final = store.new_segment_path(t0)
    final.parent.mkdir(parents=True)
    recover = final.with_name(final.name + ".recover")
    part = final.with_name(final.name + ".part")
    write_fragmented(recover, t0, 60)
    data = recover.read_bytes()
    part.write_bytes(data[: len(data) * 3 // 4])  # the remux was cut short
    report = store.reconcile()  # used to raise FileNotFoundError after overwriting the original
    assert report.recovered_parts == [final] and part in report.removed_parts
    assert not part.exists() and not recover.exists()
    [rec] = store.all()
    frames = decoded_frames(rec.path, rec.start_us)
    assert len(frames) == 60 == rec.frames  # all of the original, not the partial copy
    assert [us for us, _ in frames] == [t0 + round(i * 1_000_000 / FPS) for i in range(60)]
    assert store.reconcile().changed is False


def test_free_space_rule_never_evicts_the_newest_segment_and_says_so_once(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    # The disk is full of something else: free space stays under the guard whatever is evicted.
    store = SegmentStore(tmp_path / "b.sqlite", tmp_path / "segments", disk_free=lambda _p: 1_000)
    t0 = now_us() - 60_000_000
    recs = [add(store, t0 + i * 2_000_000) for i in range(3)]
    guard = BufferConfig.model_construct(segment_seconds=2, retention_hours=72, max_bytes=10**12,
                                         min_free_bytes=100_000)
    with caplog.at_level("WARNING", logger="agent.buffer.segments"):
        report = store.enforce_retention(now_us(), guard)
        assert report.reasons == {"free space": 2}
        assert [r.id for r in store.all()] == [recs[-1].id] and disk_segments(store) == {recs[-1].path}
        newest = add(store, t0 + 6_000_000)  # the next segment closes: the one before it goes, not this one
        assert store.enforce_retention(now_us(), guard).evicted == 1
        assert [r.id for r in store.all()] == [newest.id]
    loud = [r for r in caplog.records if "TOO FULL" in r.getMessage()]
    assert len(loud) == 1 and "min_free_bytes" in loud[0].getMessage()


def test_a_segment_from_an_encoder_without_global_header_is_written_and_recoverable(tmp_path: Path) -> None:
    """Parameter sets in-band only (as a hardware encoder may give them): the header must wait for them."""
    store = SegmentStore(tmp_path / "buffer.sqlite", tmp_path / "segments")
    t0 = now_us() - 60_000_000
    src = SyntheticSource(W, H, FPS, realtime=False, start_us=t0)
    src.open()
    seg = SegmentFile(store.new_segment_path(t0), settings=EncoderSettings("libx264", W, H, FPS))
    seg._stream.codec_context.flags &= ~GLOBAL_HEADER  # before the encoder opens at the first frame
    for _ in range(30):
        seg.add_frame(src.read())
    info = seg.finish()  # used to fail: the header was written before any parameter set existed
    assert info is not None and info.frames == 30
    frames = decoded_frames(info.path, info.start_us)
    assert [us for us, _ in frames] == [t0 + round(i * 1_000_000 / FPS) for i in range(30)]
    assert [qr for _, qr in frames] == [stamp(us) for us, _ in frames]
    # A power cut mid-segment: the .part is recovered like any other.
    t1 = t0 + 10_000_000
    final = store.new_segment_path(t1)
    part = final.with_name(final.name + ".part")
    write_fragmented(part, t1, 60, global_header=False)
    with open(part, "r+b") as fh:
        fh.truncate(part.stat().st_size * 3 // 4)
    report = store.reconcile()
    assert report.recovered_parts == [final]
    rec = store.overlapping(t1, t1 + 5_000_000)[0]
    recovered = decoded_frames(rec.path, rec.start_us)
    assert 15 <= len(recovered) < 60
    assert [us for us, _ in recovered] == [t1 + round(i * 1_000_000 / FPS) for i in range(len(recovered))]


def _top_level_boxes(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of each top-level MP4 box, read independently of the code under test."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        out.append((pos, kind))
        if size < 8:
            break
        pos += size
    return out


@pytest.mark.parametrize("into_moof", [4, 12, 40])
def test_a_power_cut_inside_the_next_fragments_moof_keeps_the_fragments_before_it(
    store: SegmentStore, into_moof: int
) -> None:
    """Once 1 reconcile in 15 lost a whole segment: a cut a few bytes into a ``moof`` box made the
    demuxer refuse the file before the loop that tolerates a cut ever ran (a cut in the box header or the
    first bytes of its body)."""
    t0 = now_us() - 60_000_000
    final = store.new_segment_path(t0)
    final.parent.mkdir(parents=True)
    part = final.with_name(final.name + ".part")
    write_fragmented(part, t0, 60)
    data = part.read_bytes()
    moofs = [off for off, kind in _top_level_boxes(data) if kind == b"moof"]
    assert len(moofs) >= 3, "the segment should hold several fragments"
    cut = moofs[-1] + into_moof
    part.write_bytes(data[:cut])
    report = store.reconcile()
    assert report.recovered_parts == [final] and not part.exists()
    [rec] = store.all()
    frames = decoded_frames(rec.path, rec.start_us)
    assert 15 <= len(frames) < 60 and rec.frames == len(frames)
    assert [qr for _, qr in frames] == [stamp(us) for us, _ in frames]
