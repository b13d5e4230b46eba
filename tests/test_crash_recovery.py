"""``kill -9`` a real recording process at random moments; the buffer must stay true.

After every kill and restart: the index matches the files on disk, every
indexed segment decodes fully, no ``.part`` is left, and at most the segment
that was being written (plus what was queued for it) is lost.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.buffer.segments import SegmentStore
from tests.buffer_helpers import decoded_frames, now_us, stamp

ROOT = Path(__file__).resolve().parents[1]
SEGMENT_S = 1.0


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[paths]\ndata_dir = "{tmp_path / "data"}"\n\n'
        "[camera]\nsource = \"synthetic\"\nwidth = 320\nheight = 240\nfps = 15\n\n"
        f"[buffer]\nsegment_seconds = {SEGMENT_S}\n"
    )
    return cfg


def start_agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def finished_files(segments: Path) -> set[Path]:
    return set(segments.rglob("*.mp4")) if segments.exists() else set()


def check_buffer(data: Path) -> list:  # noqa: ANN201
    store = SegmentStore(data / "buffer.sqlite", data / "segments")
    try:
        recs = store.all()
    finally:
        store.close()
    assert {r.path for r in recs} == finished_files(data / "segments"), "index and disk disagree"
    assert not list((data / "segments").rglob("*.part"))
    for r in recs:
        frames = decoded_frames(r.path, r.start_us)
        assert len(frames) == r.frames, f"{r.path} does not decode fully"
        qrs = [qr for _, qr in frames]
        assert qrs == [stamp(us) for us, _ in frames], f"{r.path} frames are not at their indexed times"
    return recs


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_at_most_the_open_segment(tmp_path: Path) -> None:
    rng = random.Random(os.environ.get("CRASH_SEED", "doorbell"))
    cfg = write_config(tmp_path)
    data = tmp_path / "data"
    segments = data / "segments"
    log = tmp_path / "agent.log"
    kept: dict[Path, tuple[int, int]] = {}
    for round_ in range(4):
        before = finished_files(segments)
        proc = start_agent(cfg, log)
        try:
            # Wait for this run to finish a segment of its own, then kill it at a random moment.
            wait_for(lambda before=before: len(finished_files(segments) - before) >= 1, 30, "the first segment of this run")
            target = rng.uniform(0.0, 2.5)
            t_end = time.monotonic() + target
            wait_for(lambda t_end=t_end, proc=proc: time.monotonic() >= t_end or proc.poll() is not None, 10, "the random moment")
            assert proc.poll() is None, "the recorder exited by itself"
            killed_at = now_us()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # What a restart does first: reconcile. Do it here and check the result.
        store = SegmentStore(data / "buffer.sqlite", segments)
        report = store.reconcile()
        store.close()
        assert not report.dropped_rows, "an indexed segment lost its file"
        recs = check_buffer(data)
        # Nothing that was finished before is lost...
        now_held = {r.path: (r.start_us, r.end_us) for r in recs}
        for path, span in kept.items():
            assert now_held.get(path) == span, f"round {round_}: {path} was lost or changed"
        kept = now_held
        # ...and at most the open segment (plus up to 2 s queued for it) is missing at the end.
        newest = max(r.end_us for r in recs)
        assert killed_at - newest <= (SEGMENT_S + 2.0 + 1.0) * 1_000_000, f"round {round_}: lost too much"
    # A last clean run after all that: it starts, records, and stops on SIGTERM with everything kept.
    before = finished_files(segments)
    proc = start_agent(cfg, log)
    try:
        wait_for(lambda: len(finished_files(segments) - before) >= 1, 30, "a segment after the crashes")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    recs = check_buffer(data)
    assert set(kept) <= {r.path for r in recs}
    # Each restart left a hole, and the index says why.
    store = SegmentStore(data / "buffer.sqlite", segments)
    reasons = [g.reason for g in store.gaps()]
    store.close()
    assert reasons.count("recorder was not running") >= 4
    text = log.read_text()
    assert "buffer check:" in text and "stopping: finishing the segment being written" in text
