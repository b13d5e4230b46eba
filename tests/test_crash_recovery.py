"""``kill -9`` a real ``doorbell-agent run`` at random moments; the buffer and the access log must stay true.

The agent records and shares (a real broker, the sharing service signing its start checkpoints into
the access log). It is killed during start-up (while it repairs the index, opens its databases, signs)
or while recording, at a random moment. After every kill and restart: the index matches the files on
disk, every indexed segment decodes fully with each frame at its indexed time, no ``.part`` is left, at
most the segment that was being written (plus what was queued for it) is lost, and the access log
verifies (each restart's checkpoint says the previous run ended uncleanly).

``DOORBELL_KILL_ROUNDS`` sets the number of kills (10 by default, about a minute; the issue's 50 with
``DOORBELL_KILL_ROUNDS=50``); ``CRASH_SEED`` the random moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.buffer.segments import SegmentStore
from agent.config import MqttConfig
from agent.protocol.jose import b64url_decode
from agent.state.accesslog import AccessLog
from agent.state.pin import pin_path, read_pin
from tests.broker import Broker
from tests.buffer_helpers import decoded_frames, now_us, stamp

ROOT = Path(__file__).resolve().parents[1]
SEGMENT_S = 1.0


ROUNDS = int(os.environ.get("DOORBELL_KILL_ROUNDS", "10"))


def write_config(tmp_path: Path, mqtt: MqttConfig | None = None) -> Path:
    cfg = tmp_path / "agent.toml"
    text = (
        f'[paths]\ndata_dir = "{tmp_path / "data"}"\n\n'
        "[camera]\nsource = \"synthetic\"\nwidth = 320\nheight = 240\nfps = 15\n\n"
        f"[buffer]\nsegment_seconds = {SEGMENT_S}\n"
    )
    if mqtt is not None:  # sharing on: the service opens the access log and signs a checkpoint at each start
        text += f"""
[policy]
program = "jackson-ms/camera-pilot-2026"
location = {{ lat = 32.29876, lon = -90.18481 }}
timezone = "America/Chicago"

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2030-01-01T00:00:00Z

[mqtt]
host = "{mqtt.host}"
port = {mqtt.port}
ca_file = "{mqtt.ca_file}"
cert_file = "{mqtt.cert_file}"
key_file = "{mqtt.key_file}"
username = "{mqtt.username}"
password = "{mqtt.password}"
root = "{mqtt.root}"
keepalive_s = 5
"""
    cfg.write_text(text)
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


def check_buffer(data: Path, decoded: set[tuple[Path, str]] | None = None) -> list:  # noqa: ANN201
    """Index equals disk, and every indexed segment plays; ``decoded`` (path, sha256) are not decoded again."""
    store = SegmentStore(data / "buffer.sqlite", data / "segments")
    try:
        recs = store.all()
    finally:
        store.close()
    assert {r.path for r in recs} == finished_files(data / "segments"), "index and disk disagree"
    assert not list((data / "segments").rglob("*.part"))
    for r in recs:
        if decoded is not None:
            if (r.path, r.sha256) in decoded:
                continue
            decoded.add((r.path, r.sha256))
        frames = decoded_frames(r.path, r.start_us)
        assert len(frames) == r.frames, f"{r.path} does not decode fully"
        qrs = [qr for _, qr in frames]
        assert qrs == [stamp(us) for us, _ in frames], f"{r.path} frames are not at their indexed times"
    return recs


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_at_most_the_open_segment(tmp_path: Path, broker: Broker) -> None:
    rng = random.Random(os.environ.get("CRASH_SEED", "doorbell"))
    cfg = write_config(tmp_path, broker.mqtt_config("agent"))
    data = tmp_path / "data"
    segments = data / "segments"
    log = tmp_path / "agent.log"
    kept: dict[Path, tuple[int, int]] = {}
    decoded: set[tuple[Path, str]] = set()
    for round_ in range(ROUNDS):
        before = finished_files(segments)
        proc = start_agent(cfg, log)
        try:
            killed_early = rng.random() < 0.25
            if killed_early:  # during start-up: index repair, databases opened, the start checkpoint signed
                t_end = time.monotonic() + rng.uniform(0.2, 2.0)
                wait_for(lambda t_end=t_end, proc=proc: time.monotonic() >= t_end or proc.poll() is not None, 10,
                         "the random moment")
            else:  # while recording: after this run finished a segment of its own
                wait_for(lambda before=before: len(finished_files(segments) - before) >= 1, 30,
                         "the first segment of this run")
                t_end = time.monotonic() + rng.uniform(0.0, 2.5)
                wait_for(lambda t_end=t_end, proc=proc: time.monotonic() >= t_end or proc.poll() is not None, 10,
                         "the random moment")
            assert proc.poll() is None, "the agent exited by itself: " + log.read_text()[-2000:]
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
        recs = check_buffer(data, decoded)
        # Nothing that was finished before is lost...
        now_held = {r.path: (r.start_us, r.end_us) for r in recs}
        for path, span in kept.items():
            assert now_held.get(path) == span, f"round {round_}: {path} was lost or changed"
        kept = now_held
        # ...and at most the open segment (plus up to 2 s queued for it) is missing at the end.
        if not killed_early:  # (a kill during start-up has no open segment to lose)
            newest = max(r.end_us for r in recs)
            assert killed_at - newest <= (SEGMENT_S + 2.0 + 1.0) * 1_000_000, f"round {round_}: lost too much"
        # The access log, if this run got as far as opening it, verifies against the pinned key.
        pinned = read_pin(pin_path(data))
        if pinned is not None:
            with AccessLog(data / "state.sqlite") as alog:
                result = alog.verify(pinned)
            assert result.ok, (round_, result.problems)
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
    recs = check_buffer(data, decoded)
    assert set(kept) <= {r.path for r in recs}
    # Each kill while recording left a hole, and the index says why.
    store = SegmentStore(data / "buffer.sqlite", segments)
    reasons = [g.reason for g in store.gaps()]
    store.close()
    assert reasons.count("recorder was not running") >= 1
    text = log.read_text()
    assert "buffer check:" in text and "stopping: finishing the segment being written" in text
    assert "NOT sharing" not in text  # no kill ever made the agent take its own state for lost or damaged
    # `log verify` as the resident runs it, after all the kills: intact, and the unclean stops are on the record.
    out = subprocess.run([sys.executable, "-m", "agent", "--config", str(cfg), "log", "verify"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "intact" in out.stdout
    with AccessLog(data / "state.sqlite") as alog:
        starts = [json.loads(b64url_decode(cp.jws.split(".")[1], "payload")) for cp in alog.checkpoints()]
    afters = [c.get("after") for c in starts if c.get("reason") == "start"]
    assert afters[0] == "first" and afters.count("unclean") >= 1, afters
