"""Damaged and lost databases: found at start-up, named to the resident, and never replaced by an empty one.

Each database under ``data_dir`` is filled the way a running agent fills it (access log with a start
checkpoint and decisions, replay memory, approvals, inbox, a buffer index over real H.264 segments), then
damaged the ways an SD card or a person does it: cut to half its length, its header overwritten, a 4 KiB
block in the middle overwritten with noise or with zeros, emptied, deleted. Then the resident's commands
and ``run`` are used on it.

What must hold (agent/state/integrity.py, agent/state/db.py):

- state.sqlite or inbox.sqlite damaged: ``run`` keeps recording and does NOT share, and its log says which
  file and what to do; ``status`` and ``log verify`` stop with that sentence, not a traceback; the sharing
  service itself refuses to start on it; the file is left exactly as it was (evidence, for a restore).
- state.sqlite missing or emptied after the agent has run (its device key is pinned): the same refusal,
  saying the log and the memory of requests are gone. An agent that never ran starts a new one.
- buffer.sqlite damaged: set aside (kept), rebuilt from the footage files, recording goes on.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.buffer.segments import SegmentStore
from agent.cli import main
from agent.config import AgentConfig, load_config
from agent.state import db
from agent.state.accesslog import AccessLog
from agent.state.approvals import ApprovalQueue
from agent.state.db import StateCorrupt, connect
from agent.state.devicekey import DeviceKey
from agent.state.inbox import Inbox, InboxMessage
from agent.state.integrity import StateLost, check_data_dir
from agent.state.pin import pin_path
from agent.state.replay import ReplayMemory
from agent.timeutil import to_us
from tests.buffer_helpers import FPS, write_segment

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[camera]
source = "synthetic"
width = 320
height = 240
fps = 15

[buffer]
segment_seconds = 1

[policy]
program = "jackson-ms/camera-pilot-2026"
location = { lat = 32.29876, lon = -90.18481 }
timezone = "America/Chicago"

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2030-01-01T00:00:00Z
"""


def populate(cfg: AgentConfig) -> None:
    """The data_dir of an agent that has run: a pinned key, a signed log, replay memory, approvals, inbox, footage."""
    data = cfg.paths.data_dir
    key = DeviceKey.load_or_create(cfg.paths.device_key_file)
    now = datetime.now(UTC).replace(microsecond=0)
    with AccessLog(cfg.paths.state_db, device_key=key, checkpoint_every=25) as alog:
        alog.service_started(data, rules={"program": "p"})
        for i in range(300):  # enough rows that the file has many pages, so a damaged middle block hits data
            alog.append(jti=f"req-{i:06d}-aaaaaaaaaaaa", iss="jackson-pd", sub="badge-4471", case="JPD-1",
                        purpose="Burglary reported on this block. " * 3, area={"lat": 32.3, "lon": -90.18, "radius_m": 300},
                        requested=(now - timedelta(minutes=10), now - timedelta(minutes=5)), reason="expired",
                        kids=["jpd-2026a"], at=now)  # fmt: skip
    with ReplayMemory(cfg.paths.state_db) as replay:
        for i in range(300):
            replay.remember(f"req-{i:06d}-bbbbbbbbbbbb", f"{i:064x}", now + timedelta(minutes=10), now=now)
    ApprovalQueue(cfg.paths.state_db).pending(now)  # its tables exist, as in a running agent
    with Inbox(data / "inbox.sqlite") as inbox:
        inbox.commit([InboxMessage("x/v1/requests/9vk1", os.urandom(900), to_us(now)) for _ in range(60)])
    store = SegmentStore.from_config(cfg)
    start = to_us(now) - 20_000_000
    for i in range(4):
        store.add(write_segment(store.new_segment_path(start + i * 1_000_000), start + i * 1_000_000, FPS))
    store.close()


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def damage(path: Path, how: str) -> None:
    """Damage ``path`` as storage or people do. Deterministic (seeded), so a failure can be reproduced."""
    db._checked.clear()  # what follows runs as after a restart: ``connect`` checks a file once per process
    size = path.stat().st_size
    rng = random.Random(f"{path.name}-{how}")
    if how == "half":
        os.truncate(path, size // 2)
    elif how == "header":
        _overwrite(path, 0, rng.randbytes(100))
    elif how == "noise-block":  # a failing SD card: one 4 KiB block of noise in the middle of the file
        _overwrite(path, (size // 2) // 4096 * 4096, rng.randbytes(4096))
    elif how == "zero-block":  # a block the card lost: zeros
        _overwrite(path, (size // 2) // 4096 * 4096, bytes(4096))
    elif how == "empty":
        os.truncate(path, 0)
    elif how == "deleted":
        path.unlink()
    else:
        raise ValueError(how)


DAMAGE = ["half", "header", "noise-block", "zero-block"]


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One agent's data_dir, filled once; each test damages its own copy."""
    base = tmp_path_factory.mktemp("populated")
    (base / "agent.toml").write_text(f'[paths]\ndata_dir = "{base / "data"}"\n' + CONFIG)
    populate(load_config(base / "agent.toml"))
    return base / "data"


@pytest.fixture
def cfg(write_config: Callable[[str], Path], populated: Path) -> AgentConfig:
    c = load_config(write_config(CONFIG))
    shutil.copytree(populated, c.paths.data_dir)
    return c


def cli(capsys: pytest.CaptureFixture[str], cfg: AgentConfig, *argv: str) -> tuple[int, str, str]:
    code = main(["--config", str(cfg.paths.data_dir.parent / "agent.toml"), *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_state_database_stops_sharing_and_is_named(cfg: AgentConfig, how: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    state = cfg.paths.state_db
    damage(state, how)
    before = state.read_bytes()
    checked = check_data_dir(cfg.paths.data_dir)
    assert set(checked.refused) == {"state.sqlite"}
    assert str(state) in checked.why and "damaged" in checked.why and "restore" in checked.why
    # The service itself will not open it either (defence in depth for any other way of starting it).
    with pytest.raises(StateCorrupt, match="state.sqlite is damaged"):
        AccessLog(state, device_key=DeviceKey.load(cfg.paths.device_key_file))
    with pytest.raises(StateCorrupt):
        ReplayMemory(state)
    # The resident's commands say so in words: `log verify` fails; `status` reports it and goes on with the rest
    # (tests/test_damaged_state_views.py has what each view says when sharing is configured).
    code, out, err = cli(capsys, cfg, "log", "verify")
    assert code != 0, out
    assert "state.sqlite is damaged" in err and "Traceback" not in err + out, err
    code, out, err = cli(capsys, cfg, "status")
    assert code == 0 and "state.sqlite is damaged" in out and "Traceback" not in err + out, (out, err)
    assert state.read_bytes() == before  # nothing "repaired" it into an empty log


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_inbox_stops_sharing(cfg: AgentConfig, how: str) -> None:
    damage(cfg.paths.data_dir / "inbox.sqlite", how)
    checked = check_data_dir(cfg.paths.data_dir)
    assert set(checked.refused) == {"inbox.sqlite"} and "inbox.sqlite is damaged" in checked.why
    with pytest.raises(StateCorrupt):
        Inbox(cfg.paths.data_dir / "inbox.sqlite")


@pytest.mark.parametrize("how", ["deleted", "empty"])
def test_a_lost_state_database_after_the_agent_ran_stops_sharing(cfg: AgentConfig, how: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    damage(cfg.paths.state_db, how)
    for suffix in ("-wal", "-shm"):
        cfg.paths.state_db.with_name(cfg.paths.state_db.name + suffix).unlink(missing_ok=True)
    checked = check_data_dir(cfg.paths.data_dir)
    assert "state.sqlite" in checked.refused
    assert "has run before" in checked.why and str(pin_path(cfg.paths.data_dir)) in checked.why
    # The service, started some other way, refuses too: it will not sign a fresh log as if nothing happened.
    with AccessLog(cfg.paths.state_db, device_key=DeviceKey.load(cfg.paths.device_key_file)) as alog:
        with pytest.raises(StateLost, match="has run before"):
            alog.service_started(cfg.paths.data_dir)
        assert alog.checkpoints() == []


def test_a_log_emptied_by_hand_is_lost_state(cfg: AgentConfig) -> None:
    """Tables still there, rows deleted (or a fresh file copied over): no checkpoint, so no fresh start."""
    conn = connect(cfg.paths.state_db)
    conn.executescript("DROP TRIGGER IF EXISTS access_log_no_delete; DELETE FROM access_log_checkpoints;")
    conn.close()
    assert "holds no signed checkpoint" in check_data_dir(cfg.paths.data_dir).why


def test_a_new_agent_starts_a_new_log(write_config: Callable[[str], Path]) -> None:
    cfg = load_config(write_config(CONFIG))
    assert check_data_dir(cfg.paths.data_dir).refused == {}
    with AccessLog(cfg.paths.state_db, device_key=DeviceKey.load_or_create(cfg.paths.device_key_file)) as alog:
        assert alog.service_started(cfg.paths.data_dir).reason == "start"
    assert check_data_dir(cfg.paths.data_dir).refused == {}  # and after that first start, all is well


def test_moving_the_pin_aside_is_the_resident_s_way_to_start_over(cfg: AgentConfig) -> None:
    cfg.paths.state_db.unlink()
    assert check_data_dir(cfg.paths.data_dir).refused
    pin_path(cfg.paths.data_dir).rename(cfg.paths.data_dir / "device-key.thumbprint.old")
    assert check_data_dir(cfg.paths.data_dir).refused == {}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_buffer_index_is_set_aside_and_rebuilt(cfg: AgentConfig, how: str) -> None:
    store = SegmentStore.from_config(cfg)
    indexed = [(r.start_us, r.end_us, r.sha256) for r in store.all()]
    store.close()
    damage(cfg.paths.buffer_db, how)
    checked = check_data_dir(cfg.paths.data_dir)
    assert checked.refused == {}  # the buffer index is not evidence: sharing is not stopped for it
    assert len(checked.set_aside) == 1 and checked.set_aside[0].exists() and not cfg.paths.buffer_db.exists()
    store = SegmentStore.from_config(cfg)
    try:
        store.reconcile()  # what `run` does next, before recording
        assert [(r.start_us, r.end_us, r.sha256) for r in store.all()] == indexed
    finally:
        store.close()


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["state-damaged", "state-deleted", "buffer-damaged"])
def test_run_keeps_recording_and_says_why_it_does_not_share(cfg: AgentConfig, broker, what: str) -> None:  # noqa: ANN001
    """The real ``run`` in a subprocess, with a real broker configured: recording goes on, sharing does not."""
    mqtt = broker.mqtt_config("agent")
    toml = cfg.paths.data_dir.parent / "agent.toml"
    toml.write_text(toml.read_text() + f"""
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
""")
    if what == "state-damaged":
        damage(cfg.paths.state_db, "noise-block")
    elif what == "state-deleted":
        damage(cfg.paths.state_db, "deleted")
    else:
        damage(cfg.paths.buffer_db, "header")
    before = cfg.paths.state_db.read_bytes() if cfg.paths.state_db.exists() else None
    segments = cfg.paths.segments_dir
    had = len(list(segments.rglob("*.mp4")))
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(toml), "run"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: len(list(segments.rglob("*.mp4"))) >= had + 2, 60, "two new segments")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    if what == "buffer-damaged":
        assert "buffer index was damaged" in stderr and "rebuilding" in stderr
        assert "NOT sharing" not in stderr
        store = SegmentStore.from_config(cfg)
        assert len(store.all()) == len(list(segments.rglob("*.mp4")))
        store.close()
    else:
        assert "recording only, NOT sharing" in stderr
        assert ("state.sqlite is damaged" if what == "state-damaged" else "has run before") in stderr
        assert "listening for requests" not in stderr  # the sharing service never started
        after = cfg.paths.state_db.read_bytes() if cfg.paths.state_db.exists() else None
        assert after == before  # left as found, for a restore
