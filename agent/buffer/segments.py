"""The rolling buffer's index: which finished segments exist, which times they hold.

The segment files (see :mod:`agent.buffer.segmentfile`) are the footage; this SQLite
index (WAL mode, so ``status`` and the clip cutter can read while the recorder
writes) is how the agent finds minutes without listing directories.

Invariant: every indexed segment has its file. The opposite may briefly be
untrue (a file on disk that is not indexed yet, or no longer indexed), and
:meth:`SegmentStore.reconcile` settles that at start-up:

- adding: the file is finished (fsynced, renamed) *before* its row is committed;
- evicting: the row is deleted and committed *before* the file is unlinked.

A crash between the two steps therefore leaves at worst an orphan file, which
``reconcile`` verifies and indexes (or removes) and retention then evicts again
if it is too old. It never leaves a row pointing at nothing.

Gaps (``gaps`` table) record why footage is missing: the camera disappeared,
or the recorder was not running. Spans are computed from the segments
themselves, so a hole is a hole even if its gap row was never written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import av

from agent.buffer.capture import EncodedPacket
from agent.buffer.segmentfile import PART_SUFFIX, TIME_BASE, SegmentFile, SegmentFileInfo
from agent.config import AgentConfig, BufferConfig
from agent.state.db import connect, transaction

log = logging.getLogger(__name__)

RECOVER_SUFFIX = ".recover"
_HOUR_DIR = re.compile(r"^\d{8}T\d{2}$")
_SEGMENT_NAME = re.compile(r"^(\d{1,19})\.mp4$")
# Adjacent segments whose end/start are this many frame durations apart still make one span.
SPAN_TOLERANCE_FRAMES = 1.5
# No segment is longer than this (segment_seconds <= 60, plus waiting for a keyframe when
# stream copying); it bounds the index range scanned when looking up a window.
MAX_SEGMENT_US = 10 * 60 * 1_000_000
# Segments holding any time in [start, end), given (end, start - MAX_SEGMENT_US, start), oldest first.
_OVERLAPPING = "WHERE start_us < ? AND start_us > ? AND end_us > ? ORDER BY start_us"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    id       INTEGER PRIMARY KEY,
    start_us INTEGER NOT NULL,
    end_us   INTEGER NOT NULL,
    frames   INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    sha256   TEXT    NOT NULL,
    path     TEXT    NOT NULL
);
-- One index only: every extra index is another page written per segment on an SD card.
CREATE INDEX IF NOT EXISTS segments_by_start ON segments (start_us);
CREATE TABLE IF NOT EXISTS gaps (
    id       INTEGER PRIMARY KEY,
    start_us INTEGER NOT NULL,
    end_us   INTEGER NOT NULL,
    reason   TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS gaps_by_start ON gaps (start_us);
"""


@dataclass(frozen=True)
class SegmentRecord:
    id: int
    path: Path  # absolute
    start_us: int
    end_us: int
    frames: int
    bytes: int
    sha256: str

    @property
    def frame_us(self) -> float:
        """Average frame duration, for deciding whether two segments touch."""
        return (self.end_us - self.start_us) / max(1, self.frames)


@dataclass(frozen=True)
class Gap:
    start_us: int
    end_us: int
    reason: str


@dataclass(frozen=True)
class BufferSummary:
    start_us: int | None  # oldest footage held
    end_us: int | None  # newest footage held
    recorded_us: int  # total length of the continuous spans (excludes holes)
    total_bytes: int
    segments: int
    spans: list[tuple[int, int]]
    gaps: list[Gap]


@dataclass(frozen=True)
class RetentionReport:
    evicted: int = 0
    bytes_freed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # "age" | "size" | "free space" -> count


@dataclass
class ReconcileReport:
    recovered_parts: list[Path] = field(default_factory=list)
    removed_parts: list[Path] = field(default_factory=list)
    indexed_orphans: list[Path] = field(default_factory=list)
    removed_orphans: list[Path] = field(default_factory=list)
    dropped_rows: list[Path] = field(default_factory=list)  # rows whose file was missing
    ignored: list[Path] = field(default_factory=list)  # files that are not segments; left alone

    @property
    def changed(self) -> bool:
        return any((self.recovered_parts, self.removed_parts, self.indexed_orphans,
                    self.removed_orphans, self.dropped_rows))

    def lines(self) -> list[str]:
        """Plain words for the log."""
        out: list[str] = []
        for label, items in (
            ("recovered an unfinished segment", self.recovered_parts),
            ("removed an unfinished segment that could not be recovered", self.removed_parts),
            ("indexed a finished segment the index did not know", self.indexed_orphans),
            ("removed a segment file that does not play", self.removed_orphans),
            ("forgot an index entry whose file is gone", self.dropped_rows),
            ("left alone a file that is not a segment", self.ignored),
        ):
            out.extend(f"{label}: {p}" for p in items)
        return out


# Free space footage never takes, whatever buffer.min_free_bytes says: the access log, the replay
# memory and the inbox must be able to record a decision on a disk the footage has filled.
STATE_RESERVE_BYTES = 4 * 1024 * 1024


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


class SegmentStore:
    """Index of finished segments plus the retention and start-up repair that keep it true.

    Thread-safe (one connection behind a lock): the recorder adds from its
    writer thread while a request handler in the same process reads.
    """

    def __init__(self, buffer_db: Path, segments_dir: Path, *, buffer: BufferConfig | None = None,
                 disk_free: Callable[[Path], int] = _disk_free, reserve_bytes: int = 0) -> None:
        self.buffer_db = Path(buffer_db)
        self.reserve_bytes = reserve_bytes  # free space retention keeps at least, whatever min_free_bytes says
        self.segments_dir = Path(segments_dir)
        self.buffer = buffer or BufferConfig()
        self._disk_free = disk_free
        self._disk_too_full_warned = False
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        self.buffer_db.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Small pages: each indexed segment rewrites two pages (table and index), and on an
        # SD card every byte written counts. NORMAL in WAL mode: a power cut may lose the last
        # commit but never corrupts the index; the file for a lost row is an orphan that
        # reconcile() indexes again.
        self._db = connect(self.buffer_db, synchronous="NORMAL", page_size=1024)
        self._db.executescript(_SCHEMA)

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> SegmentStore:
        return cls(cfg.paths.buffer_db, cfg.paths.segments_dir, buffer=cfg.buffer, reserve_bytes=STATE_RESERVE_BYTES)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- paths ---------------------------------------------------------------

    def new_segment_path(self, start_us: int) -> Path:
        """``segments/<UTC hour>/<start_us>.mp4``: small directories, names that sort by time."""
        hour = datetime.fromtimestamp(start_us // 1_000_000, tz=UTC).strftime("%Y%m%dT%H")
        return self.segments_dir / hour / f"{start_us}.mp4"

    def _relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.segments_dir.resolve()).as_posix()

    def _record(self, row: tuple) -> SegmentRecord:
        id_, start, end, frames, size, sha, rel = row
        return SegmentRecord(id_, self.segments_dir / rel, start, end, frames, size, sha)

    # -- writing -------------------------------------------------------------

    def add(self, info: SegmentFileInfo) -> SegmentRecord:
        """Index a finished segment (its file must already be renamed into place)."""
        rel = self._relative(info.path)
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO segments (start_us, end_us, frames, bytes, sha256, path) VALUES (?,?,?,?,?,?)",
                (info.start_us, info.end_us, info.frames, info.bytes, info.sha256, rel),
            )
            id_ = cur.lastrowid
        assert id_ is not None
        return SegmentRecord(id_, self.segments_dir / rel, info.start_us, info.end_us, info.frames,
                             info.bytes, info.sha256)

    def add_gap(self, start_us: int, end_us: int, reason: str) -> None:
        if end_us <= start_us:
            return
        with self._lock:
            self._db.execute("INSERT INTO gaps (start_us, end_us, reason) VALUES (?,?,?)", (start_us, end_us, reason))

    # -- reading -------------------------------------------------------------

    def overlapping(self, start_us: int, end_us: int) -> list[SegmentRecord]:
        """Segments holding any time in ``[start_us, end_us)``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, start_us, end_us, frames, bytes, sha256, path FROM segments " + _OVERLAPPING,
                (end_us, start_us - MAX_SEGMENT_US, start_us),
            ).fetchall()
        return [self._record(r) for r in rows]

    def all(self) -> list[SegmentRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, start_us, end_us, frames, bytes, sha256, path FROM segments ORDER BY start_us"
            ).fetchall()
        return [self._record(r) for r in rows]

    def latest_end_us(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MAX(end_us) FROM segments").fetchone()
        return row[0]

    def spans(self, start_us: int, end_us: int) -> list[tuple[int, int]]:
        """Continuous recorded stretches within ``[start_us, end_us)``.

        Segments touch when the next starts within 1.5 frame durations of the
        previous one's end (capture jitter, one dropped frame); a longer hole,
        such as a camera outage, splits the span.

        Reads the times alone, not whole records: every decision asks this (protocol step 20), and an
        hour's window holds 900 segments, whose records (a path each) cost some 10 ms to build.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT start_us, end_us, frames FROM segments " + _OVERLAPPING,
                (end_us, start_us - MAX_SEGMENT_US, start_us),
            ).fetchall()
        return _merge(rows, start_us, end_us)

    def gaps(self, start_us: int | None = None, end_us: int | None = None) -> list[Gap]:
        lo = start_us if start_us is not None else -(2**62)
        hi = end_us if end_us is not None else 2**62
        with self._lock:
            rows = self._db.execute(
                "SELECT start_us, end_us, reason FROM gaps WHERE start_us < ? AND end_us > ? ORDER BY start_us",
                (hi, lo),
            ).fetchall()
        return [Gap(*r) for r in rows]

    def summary(self) -> BufferSummary:
        with self._lock:
            first, last, total, count = self._db.execute(
                "SELECT MIN(start_us), MAX(end_us), COALESCE(SUM(bytes), 0), COUNT(*) FROM segments"
            ).fetchone()
        if count == 0:
            return BufferSummary(None, None, 0, 0, 0, [], self.gaps())
        spans = self.spans(first, last)
        return BufferSummary(first, last, sum(e - s for s, e in spans), total, count, spans, self.gaps(first, None))

    # -- retention -----------------------------------------------------------

    def enforce_retention(self, now_us: int, buffer: BufferConfig | None = None) -> RetentionReport:
        """Evict oldest segments until age, total size and free disk space are all within limits.

        Cheap when nothing is due: one indexed query and one ``statvfs``.
        """
        b = buffer or self.buffer
        oldest_kept = now_us - int(b.retention_hours * 3600 * 1_000_000)
        reasons: dict[str, int] = {}
        evicted = freed = 0
        with self._lock:
            total, newest_end = self._db.execute(
                "SELECT COALESCE(SUM(bytes), 0), MAX(end_us) FROM segments").fetchone()
        if newest_end is not None and self._disk_too_full_warned \
                and self._disk_free(self.segments_dir) >= max(b.min_free_bytes, self.reserve_bytes):
            self._disk_too_full_warned = False
            log.warning("free disk space is back above buffer.min_free_bytes; the buffer grows again")
        while True:
            with self._lock:
                row = self._db.execute(
                    "SELECT id, start_us, end_us, frames, bytes, sha256, path FROM segments ORDER BY start_us LIMIT 1"
                ).fetchone()
            if row is None:
                break
            rec = self._record(row)
            if rec.end_us <= oldest_kept:
                why = "age"
            elif total > b.max_bytes:
                why = "size"
            elif self._disk_free(self.segments_dir) < max(b.min_free_bytes, self.reserve_bytes):
                if rec.end_us >= newest_end:
                    # Only the newest segment is left and the disk is still too full: something
                    # else fills it. Deleting the footage just written would not help; keep it.
                    self._warn_disk_too_full(b)
                    break
                why = "free space"
            else:
                break
            self._evict(rec)
            total -= rec.bytes
            evicted += 1
            freed += rec.bytes
            reasons[why] = reasons.get(why, 0) + 1
        if evicted:
            with self._lock:
                first = self._db.execute("SELECT MIN(start_us) FROM segments").fetchone()[0]
                # Gaps before the oldest footage explain nothing any more.
                self._db.execute("DELETE FROM gaps WHERE end_us <= ?", (first if first is not None else now_us,))
        return RetentionReport(evicted, freed, reasons)

    @property
    def disk_too_full(self) -> bool:
        """True while only the newest segment is kept because free space is below buffer.min_free_bytes."""
        return self._disk_too_full_warned

    def free_bytes(self) -> int:
        return self._disk_free(self.segments_dir)

    def make_room(self, need_bytes: int) -> int:
        """Evict oldest segments, never the newest, until ``need_bytes`` are free; return the bytes freed.

        For a write that already failed because the disk is full (retention runs only after a segment
        is stored, and ``buffer.min_free_bytes`` may be too small for the next one). 0: nothing left
        that may go.
        """
        freed = 0
        while self._disk_free(self.segments_dir) < need_bytes:
            with self._lock:
                rows = self._db.execute("SELECT id, start_us, end_us, frames, bytes, sha256, path FROM segments "
                                        "ORDER BY start_us LIMIT 2").fetchall()
            if len(rows) < 2:
                break
            rec = self._record(rows[0])
            try:
                self._evict(rec)
            except sqlite3.OperationalError:
                # So full that SQLite cannot even note the deletion (its journal needs a page): the
                # file goes first this once. A crash right here leaves a row without a file, which
                # the start-up check forgets ("forgot an index entry whose file is gone").
                rec.path.unlink(missing_ok=True)
                self._evict(rec)
            freed += rec.bytes
        return freed

    def _warn_disk_too_full(self, b: BufferConfig) -> None:
        """Say it once per episode: a line per segment would bury every other log line."""
        if self._disk_too_full_warned:
            return
        self._disk_too_full_warned = True
        log.warning(
            "THE DISK IS TOO FULL TO KEEP A BUFFER: %d bytes free in %s, below buffer.min_free_bytes (%d; "
            "never less than the 4 MB kept for the access log and the replay memory), "
            "with only the newest segment left. Something other than footage fills the disk; free some "
            "space or lower buffer.min_free_bytes. Until then only the newest segment is kept.",
            self._disk_free(self.segments_dir), self.segments_dir, max(b.min_free_bytes, self.reserve_bytes))

    def _evict(self, rec: SegmentRecord) -> None:
        # Row first, then file: a crash in between leaves an orphan file (reconcile
        # re-indexes it and retention evicts it again), never a row without a file.
        with self._lock:
            self._db.execute("DELETE FROM segments WHERE id = ?", (rec.id,))
        rec.path.unlink(missing_ok=True)
        _remove_if_empty(rec.path.parent, self.segments_dir)

    # -- erasing everything (killswitch on --wipe) ----------------------------

    def wipe(self, now_us: int, *, recorder_active: bool) -> WipeReport:
        """Erase all footage held at ``now_us``: every indexed segment, then stray segment files.

        Safe while a recorder (in this process or another) keeps recording: like eviction, the rows
        go first, in one transaction, and only their files are unlinked afterwards, so the index
        never points at a missing file; a segment the recorder finishes during the wipe is added
        after it and kept. Files the index does not know are left alone while a recorder runs,
        unless they are older than any segment could be in the making (``2 * MAX_SEGMENT_US``):
        the newest one may be a finished segment whose row is just being added. Without a recorder,
        every segment file goes, unfinished ``.part`` files included. The gaps table then says why
        the footage is missing.
        """
        with self._lock, transaction(self._db) as db:
            rows = db.execute("SELECT id, start_us, bytes, path FROM segments WHERE start_us <= ?", (now_us,)).fetchall()
            db.execute("DELETE FROM segments WHERE start_us <= ?", (now_us,))
            db.execute("DELETE FROM gaps WHERE start_us <= ?", (now_us,))
            if rows:
                first = min(int(r[1]) for r in rows)
                db.execute("INSERT INTO gaps (start_us, end_us, reason) VALUES (?,?,?)",
                           (first, now_us, "erased by you (killswitch on --wipe)"))
        report = WipeReport(segments=len(rows), bytes=sum(int(r[2]) for r in rows))
        gone = {rel for _, _, _, rel in rows}
        for rel in gone:
            path = self.segments_dir / rel
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                report.problems.append(f"{path}: {exc.strerror or exc}")
        # Stray files: orphans a crash left behind (reconcile would index them again), and unfinished parts.
        cutoff = now_us - 2 * MAX_SEGMENT_US
        for path in list(self._walk()) if self.segments_dir.exists() else []:
            m = _SEGMENT_NAME.match(path.name)
            stray_mp4 = m is not None and self._relative(path) not in gone
            part = path.name.endswith(".mp4" + PART_SUFFIX) or path.name.endswith(".mp4" + RECOVER_SUFFIX)
            if not (stray_mp4 or part):
                continue
            start = int(path.name.split(".", 1)[0]) if path.name.split(".", 1)[0].isdigit() else now_us
            if recorder_active and (part or start >= cutoff):
                continue
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                report.problems.append(f"{path}: {exc.strerror or exc}")
                continue
            report.stray_files += 1
            report.bytes += size
        # An hour folder the recorder may be about to write into stays (it would fail to open its file).
        busy_from = datetime.fromtimestamp(cutoff // 1_000_000, tz=UTC).strftime("%Y%m%dT%H") if recorder_active else "~"
        for d in sorted(self.segments_dir.iterdir()) if self.segments_dir.exists() else []:
            if d.is_dir() and _HOUR_DIR.match(d.name) and d.name < busy_from:
                _remove_if_empty(d, self.segments_dir)
        return report

    # -- start-up repair -----------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Make the index and the disk agree. Call before recording starts, never during.

        - rows whose file is missing are deleted;
        - ``.part`` (and interrupted ``.recover``) files are remuxed up to their
          last packet that decodes, and indexed; if nothing can be read they are removed;
        - ``.mp4`` files the index does not know are decoded fully; if they play
          they are indexed, otherwise removed;
        - files that are not segments by name are left alone and reported.
        """
        report = ReconcileReport()
        with self._lock:
            rows = self._db.execute("SELECT id, path FROM segments").fetchall()
        known: set[str] = set()
        for id_, rel in rows:
            if (self.segments_dir / rel).is_file():
                known.add(rel)
            else:
                with self._lock:
                    self._db.execute("DELETE FROM segments WHERE id = ?", (id_,))
                report.dropped_rows.append(self.segments_dir / rel)
        for path in sorted(self._walk()):
            name = path.name
            if name.endswith(".mp4" + PART_SUFFIX) or name.endswith(".mp4" + RECOVER_SUFFIX):
                final = path.with_name(name.rsplit(".mp4", 1)[0] + ".mp4")
                if final.exists() and self._relative(final) in known:
                    path.unlink(missing_ok=True)  # the rename happened; this is a leftover copy
                    report.removed_parts.append(path)
                    continue
                recover = final.with_name(final.name + RECOVER_SUFFIX)
                if name.endswith(PART_SUFFIX) and recover.exists():
                    # A crash during an earlier recovery: the .recover is the original footage and
                    # this .part only a partial remux of it. Recover from the original (it comes
                    # later in this sorted walk); moving the .part over it would lose footage.
                    path.unlink(missing_ok=True)
                    report.removed_parts.append(path)
                    continue
                info = self._recover_part(path, final)
                if info is not None:
                    self.add(info)
                    known.add(self._relative(final))
                    report.recovered_parts.append(final)
                else:
                    report.removed_parts.append(path)
            elif _SEGMENT_NAME.match(name):
                if self._relative(path) in known:
                    continue
                info = _verify(path, int(_SEGMENT_NAME.match(name).group(1)))  # type: ignore[union-attr]
                if info is not None:
                    self.add(info)
                    known.add(self._relative(path))
                    report.indexed_orphans.append(path)
                else:
                    path.unlink(missing_ok=True)
                    report.removed_orphans.append(path)
            else:
                report.ignored.append(path)
        for d in sorted(self.segments_dir.iterdir()) if self.segments_dir.exists() else []:
            if d.is_dir() and _HOUR_DIR.match(d.name):
                _remove_if_empty(d, self.segments_dir)
        return report

    def _walk(self) -> Iterator[Path]:
        for d in self.segments_dir.iterdir():
            if d.is_dir() and _HOUR_DIR.match(d.name):
                yield from (p for p in d.iterdir() if p.is_file())
            elif d.is_file():
                yield d

    def _recover_part(self, part: Path, final: Path) -> SegmentFileInfo | None:
        """Remux an unfinished segment up to its last packet that decodes."""
        m = _SEGMENT_NAME.match(final.name)
        if m is None:
            part.unlink(missing_ok=True)
            return None
        start_us = int(m.group(1))
        source = part
        if part.name.endswith(PART_SUFFIX):
            # SegmentFile writes to <final>.part, so move the input out of its way first.
            source = part.with_name(final.name + RECOVER_SUFFIX)
            os.replace(part, source)
        info: SegmentFileInfo | None = None
        try:
            info = _remux(source, final, start_us)
        except (av.FFmpegError, OSError, ValueError) as exc:
            error: Exception = exc
            # A cut inside a box (the first bytes of the next fragment) makes the demuxer refuse the
            # whole file: drop the incomplete top-level box and read what came before it.
            whole = _complete_boxes_end(source)
            if whole is not None and 0 < whole < source.stat().st_size:
                os.truncate(source, whole)
                try:
                    info = _remux(source, final, start_us)
                except (av.FFmpegError, OSError, ValueError) as again:
                    error = again
            if info is None:
                log.info("cannot recover %s: %s", part, error)
        source.unlink(missing_ok=True)
        return info


@dataclass
class WipeReport:
    """What :meth:`SegmentStore.wipe` erased."""

    segments: int = 0
    bytes: int = 0
    stray_files: int = 0
    problems: list[str] = field(default_factory=list)


def _merge(rows: list[tuple[int, int, int]], start_us: int, end_us: int) -> list[tuple[int, int]]:
    """``(start_us, end_us, frames)`` of segments, oldest first, merged into spans (see :meth:`SegmentStore.spans`)."""
    spans: list[list[int]] = []
    prev_frame_us = 0.0
    for seg_start, seg_end, frames in rows:
        frame_us = (seg_end - seg_start) / max(1, frames)  # as SegmentRecord.frame_us
        tol = SPAN_TOLERANCE_FRAMES * max(frame_us, prev_frame_us)
        if spans and seg_start - spans[-1][1] <= tol:
            spans[-1][1] = max(spans[-1][1], seg_end)
        else:
            spans.append([seg_start, seg_end])
        prev_frame_us = frame_us
    out = []
    for s, e in spans:
        s, e = max(s, start_us), min(e, end_us)
        if e > s:
            out.append((s, e))
    return out


def _remove_if_empty(d: Path, root: Path) -> None:
    if d.resolve() == root.resolve():
        return
    try:
        d.rmdir()
    except OSError:
        pass


def _complete_boxes_end(path: Path) -> int | None:
    """Where the last complete top-level MP4 box of ``path`` ends, or None if it is not an MP4 file.

    A fragmented segment is a sequence of boxes (``ftyp``, ``moov``, then ``moof``/``mdat`` pairs):
    everything up to the end of the last whole box was written before the crash.
    """
    size = path.stat().st_size
    pos = 0
    with open(path, "rb") as fh:
        while pos + 8 <= size:
            fh.seek(pos)
            header = fh.read(16)
            length = int.from_bytes(header[:4], "big")
            if length == 1 and len(header) == 16:
                length = int.from_bytes(header[8:16], "big")
            if length < 8 or not header[4:8].isascii():
                return None if pos == 0 else pos
            if pos + length > size:
                break
            pos += length
    return pos


def _remux(source: Path, final: Path, start_us: int) -> SegmentFileInfo | None:
    """Copy every packet that decodes into a fresh segment at ``final``."""
    with av.open(str(source)) as inp:
        if not inp.streams.video:
            return None
        stream = inp.streams.video[0]
        # A video stream's codec, so PyAV makes a VideoCodecContext (the stubs say so only for literal names).
        decoder = cast(av.VideoCodecContext, av.CodecContext.create(stream.codec_context.name, "r"))
        if stream.codec_context.extradata:
            decoder.extradata = stream.codec_context.extradata
        tb = stream.time_base
        assert tb is not None  # set for every demuxed stream; only a stream being set up for writing lacks one
        seg: SegmentFile | None = None
        durations: list[int] = []
        try:
            for pkt in inp.demux(stream):
                if pkt.size == 0 or pkt.pts is None:
                    continue
                if pkt.is_corrupt:  # cut short by the crash: everything before it is whole
                    break
                try:
                    decoder.decode(pkt)
                except av.FFmpegError:
                    break
                rel_us = int(pkt.pts * tb * 1_000_000)
                if seg is None:
                    if not pkt.is_keyframe or rel_us != 0:
                        return None
                    seg = SegmentFile(final, template=stream, frame_us=_nominal_frame_us(stream))
                if pkt.duration:
                    durations.append(int(pkt.duration * tb * 1_000_000))
                seg.add_packet(EncodedPacket(start_us + rel_us, pkt, pkt.is_keyframe))
        except av.FFmpegError:
            pass  # truncated tail: keep what came before
        if seg is None:
            return None
        info = seg.finish()
    return info


def _nominal_frame_us(stream: av.video.stream.VideoStream) -> int:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return round(1_000_000 / float(rate)) if rate else 66_667


def _verify(path: Path, start_us: int) -> SegmentFileInfo | None:
    """Decode a whole segment; describe it if every packet plays, else None."""
    try:
        with av.open(str(path)) as inp:
            if not inp.streams.video:
                return None
            stream = inp.streams.video[0]
            tb = stream.time_base
            assert tb is not None  # set for every demuxed stream; only a stream being set up for writing lacks one
            frames = keyframes = 0
            last_rel = -1
            first = True
            for pkt in inp.demux(stream):
                if pkt.size == 0:
                    for _ in pkt.decode():
                        pass
                    continue
                if first and (not pkt.is_keyframe or pkt.pts != 0):
                    return None
                first = False
                for _ in pkt.decode():
                    pass
                frames += 1
                keyframes += int(pkt.is_keyframe)
                assert pkt.pts is not None  # every MP4 sample has a time
                last_rel = max(last_rel, int(pkt.pts * tb * 1_000_000))
            if frames == 0:
                return None
            frame_us = _nominal_frame_us(stream)
    except (av.FFmpegError, OSError):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        size = fh.tell()
    return SegmentFileInfo(path, start_us, start_us + last_rel + frame_us, frames, size, digest.hexdigest(), keyframes)


__all__ = [
    "BufferSummary", "Gap", "ReconcileReport", "RetentionReport", "SegmentRecord", "SegmentStore",
    "TIME_BASE",
]
