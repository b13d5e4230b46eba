"""``doorbell-agent clip``: save the exact minutes you ask for from the rolling buffer to an MP4."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from agent.cli.common import add_json_flag, config_from, print_json
from agent.errors import UserError
from agent.timeutil import format_local, format_utc, from_us, local_zone, parse_user_time, to_us

PROGRESS_AFTER_S = 2.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "clip",
        help="save the footage between two times to an MP4 file",
        description="Save every frame recorded from --from up to (not including) --to to one MP4 file. "
        "Times are local ('2026-12-03 10:30', or '10:30' for today) or RFC 3339.",
    )
    p.add_argument("--from", dest="start", required=True, metavar="TIME", help="first moment to include")
    p.add_argument("--to", dest="end", required=True, metavar="TIME", help="moment to stop (not included)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="MP4 file to write, or - for standard output (the summary then goes to standard error)")
    # For the installed command, which writes FILE as the person typing it from `-o -`: the name to report.
    p.add_argument("--output-name", help=argparse.SUPPRESS)
    p.add_argument("--force", action="store_true", help="replace FILE if it already exists")
    add_json_flag(p)
    p.set_defaults(func=_clip)


class _Progress:
    """A percentage line on stderr, only once the cut has taken a noticeable time."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.started = time.monotonic()
        self.shown = -1
        self.quiet = quiet  # --json: a script reads standard error only if something goes wrong

    def __call__(self, fraction: float) -> None:
        if self.quiet or time.monotonic() - self.started < PROGRESS_AFTER_S:
            return
        pct = int(fraction * 100)
        if pct != self.shown and sys.stderr.isatty() or pct >= self.shown + 10:
            self.shown = pct
            end = "\r" if sys.stderr.isatty() else "\n"
            print(f"cutting clip: {pct}%", end=end, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.shown >= 0 and sys.stderr.isatty():
            print(file=sys.stderr)


def _describe_held(spans: list[tuple[int, int]]) -> str:
    if not spans:
        return "The buffer holds no footage at all yet (is the recorder running?)."
    parts = [f"{format_local(from_us(s))} to {format_local(from_us(e))}" for s, e in spans[-5:]]
    more = f" (and {len(spans) - 5} earlier stretches)" if len(spans) > 5 else ""
    return "The buffer holds footage from " + "; ".join(parts) + more + "."


def _clip(args: argparse.Namespace) -> int:
    from agent.buffer.clips import ClipError, NoFootageError, cut_clip
    from agent.buffer.segmentfile import EncoderSettings
    from agent.buffer.segments import SegmentStore

    # The configuration first: it sets the resident's time zone (policy.timezone), in which the times
    # typed here are meant and every time printed below is shown, whatever zone this process runs in.
    cfg = config_from(args)
    start: datetime = parse_user_time(args.start, field="--from", tz=local_zone())
    end: datetime = parse_user_time(args.end, field="--to", tz=local_zone())
    if end <= start:
        raise UserError(f"--to ({format_local(end)}) must be after --from ({format_local(start)})")
    to_stdout = args.output == "-"
    out: Path | BinaryIO
    if to_stdout:
        if sys.stdout.isatty():
            raise UserError("-o - writes the video to standard output, which is a terminal here; "
                            "redirect it to a file (-o - > clip.mp4) or give a file name (-o clip.mp4)")
        out = sys.stdout.buffer
        name = args.output_name or "standard output"
    else:
        out = Path(args.output).expanduser()
        name = str(out)
        try:
            if not out.parent.is_dir():
                raise UserError(f"-o {args.output}: the folder {out.parent} does not exist; create it or pick another file")
            if out.is_dir():
                raise UserError(f"-o {args.output} is a folder; give a file name such as {out / 'clip.mp4'}")
            if out.exists() and not args.force:
                raise UserError(f"-o {args.output} already exists; pick another name or add --force to replace it")
        except PermissionError as exc:  # e.g. someone's home, seen from the agent's user
            raise UserError(f"-o {args.output}: cannot write there ({exc.strerror}); pick a folder this user may write to "
                            "(the installed doorbell-agent command writes the file as you)") from None
    say = sys.stderr if to_stdout else sys.stdout  # with -o -, standard output is the video

    if not cfg.paths.buffer_db.exists():
        raise UserError(f"there is no footage buffer at {cfg.paths.buffer_db} yet; "
                        "start the recorder (doorbell-agent record) first")
    store = SegmentStore(cfg.paths.buffer_db, cfg.paths.segments_dir, buffer=cfg.buffer)
    try:
        start_us, end_us = to_us(start), to_us(end)
        segments = store.overlapping(start_us, end_us)
        held = store.summary().spans
        settings = None
        if cfg.camera.source not in ("rtsp", "file") or cfg.camera.masks:
            settings = EncoderSettings("libx264", cfg.camera.width, cfg.camera.height, cfg.camera.fps,
                                       cfg.camera.keyframe_interval_s)
        progress = _Progress(quiet=args.json)
        try:
            # Standard output cannot seek, and an MP4 whose index comes first (so players start at once)
            # is written by seeking: the clip is made in a private file in the agent's own data folder
            # (not /tmp, which may be RAM), then copied out. Same bytes as with a file name.
            info = cut_clip(segments, start_us, end_us, out, settings=settings, progress=progress,
                            tmp_dir=cfg.paths.data_dir)
        except NoFootageError:
            raise UserError(f"no footage was recorded between {format_local(start)} and {format_local(end)}. "
                            + _describe_held(held)) from None
        except ClipError as exc:
            raise UserError(f"could not cut the clip: {exc}. No file was written.") from None
        except PermissionError as exc:
            raise UserError(f"-o {args.output}: cannot write there ({exc.strerror}); pick a folder you may write to") from None
        finally:
            progress.done()
    finally:
        store.close()

    first, last = from_us(info.granted_start_us), from_us(info.granted_end_us)
    if args.json:
        sys.stdout.flush()
        with contextlib.redirect_stdout(say):  # with -o -, standard output holds the video
            print_json({
                "path": (args.output_name or "-") if to_stdout else str(Path(name).resolve()),
                "frames": info.frames, "bytes": info.bytes, "sha256": info.sha256,
                "width": info.width, "height": info.height,
                "start": format_utc(first), "end": format_utc(last),
                "first_frame": format_utc(from_us(info.first_us)), "last_frame": format_utc(from_us(info.last_us)),
                "duration_s": info.duration_us / 1e6,
                "copied_frames": info.copied_frames, "reencoded_frames": info.reencoded_frames, "mode": info.mode,
            })
        return 0
    print(f"Wrote {name}: {info.frames} frames, {_duration(info.duration_us)} of video, {info.width}x{info.height}.",
          file=say)
    print(f"  from {format_local(first)} to {format_local(last)}", file=say)
    if info.granted_start_us - start_us >= 1_000_000 or end_us - info.granted_end_us >= 1_000_000:
        print(f"  (you asked for {format_local(start)} to {format_local(end)}; the buffer holds only this part)", file=say)
    gaps = [(s, e) for s, e in held if s < end_us and e > start_us]
    if len(gaps) > 1:
        print(f"  the recording has {len(gaps) - 1} gap(s) in this window; the clip keeps them as gaps", file=say)
    print(f"  size {_size(info.bytes)}, sha256 {info.sha256}", file=say)
    return 0


def _duration(us: int) -> str:
    s = us / 1e6
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h} h {m:02d} min {sec:02d} s"
    if m:
        return f"{m} min {sec:02d} s"
    return f"{s:.1f} s"


def _size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} bytes"
