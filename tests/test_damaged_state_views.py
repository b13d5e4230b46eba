"""Damaged or lost state, as the resident sees it: ``status``, ``status --json``, the local page, the light
(the homeowner watcher) and ``doctor`` all say "not sharing" with the reason and the fix, and none of them
crashes or changes the damaged file.

``run`` refuses to share on damaged or lost state (agent/state/integrity.py, tests/test_corrupt_state.py);
before this, only the journal and ``log verify`` said so, and ``status`` went on saying "allowed". Each view is
also run on intact state, where it must say sharing is possible: the same check cannot pass by always refusing.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.cli.doctor import check_state
from agent.config import AgentConfig, load_config
from agent.fsutil import write_json_atomic
from agent.homeowner.events import Watcher
from agent.protocol.trust import TrustStore
from agent.runtime.status import sharing_status
from agent.runtime.supervisor import _take_lock, lock_path
from agent.state import db
from agent.state.accesslog import AccessLog
from agent.state.devicekey import DeviceKey
from agent.state.truststore import save_trust_store
from agent.timeutil import to_us
from agent.web import create_app
from tests import protocol_signing as ps

CONFIG = """
[policy]
program = "jackson-ms/camera-pilot-2026"
location = { lat = 32.29876, lon = -90.18481 }
timezone = "America/Chicago"

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2099-01-01T00:00:00Z

[mqtt]
host = "localhost"

[clock]
assume_synced = true
"""

STATES = ["intact", "damaged", "lost"]


@pytest.fixture
def cfg(write_config: Callable[[str], Path]) -> AgentConfig:
    """An agent that has run (pinned key, signed start checkpoint) with everything else in order for sharing."""
    cfg = load_config(write_config(CONFIG))
    save_trust_store(TrustStore.from_jwks({"keys": ps.vectors()["trust"]["keys"][:1]}), cfg.paths.trust_file)
    key = DeviceKey.load_or_create(cfg.paths.device_key_file)
    with AccessLog(cfg.paths.state_db, device_key=key) as alog:
        alog.service_started(cfg.paths.data_dir, rules={"program": "p"})
    return cfg


def make(cfg: AgentConfig, state: str) -> bytes | None:
    """Leave state.sqlite intact, damage its header (as a failing SD card does), or delete it; its bytes after."""
    db._checked.clear()  # as after a restart: connect() checks a file once per process
    path = cfg.paths.state_db
    if state == "damaged":
        with path.open("r+b") as f:
            f.write(random.Random(7).randbytes(100))
    elif state == "lost":
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    return path.read_bytes() if path.exists() else None


def words_for(state: str) -> str:
    return {"damaged": "state.sqlite is damaged", "lost": "state.sqlite is missing"}[state]


def unchanged(cfg: AgentConfig, before: bytes | None, state: str) -> None:
    """The views only look: the damaged file is as it was (evidence, for a restore), a lost one is not made
    again, nothing was set aside. (An intact log may be checkpointed by a reader: SQLite's own doing.)"""
    if state == "intact":
        return
    path = cfg.paths.state_db
    assert (path.read_bytes() if path.exists() else None) == before
    assert not list(cfg.paths.data_dir.glob("*.damaged*"))


@pytest.mark.parametrize("state", STATES)
def test_status_says_not_sharing_and_why(cfg: AgentConfig, state: str) -> None:
    before = make(cfg, state)
    cmd = [sys.executable, "-m", "agent", "--config", str(cfg.paths.data_dir.parent / "agent.toml"), "status"]  # write_config's
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    data = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and data.returncode == 0, text.stderr + data.stderr
    assert "Traceback" not in text.stdout + text.stderr + data.stderr
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("Sharing:"))
    sharing = json.loads(data.stdout)["sharing"]
    if state == "intact":
        assert line.startswith("Sharing: allowed"), line
        assert sharing["not_sharing"] is None and sharing["state"] == {"ok": True, "refused": {}}
    else:
        assert line.startswith("Sharing: BLOCKED, nothing will be shared because "), line
        assert words_for(state) in line and "Back up and restore" in line, line  # why, and what to do
        assert words_for(state) in sharing["not_sharing"] and set(sharing["state"]["refused"]) == {"state.sqlite"}
    unchanged(cfg, before, state)


@pytest.mark.parametrize("state", STATES)
def test_the_local_page_says_not_sharing_and_why(cfg: AgentConfig, state: str) -> None:
    before = make(cfg, state)
    page = create_app(cfg).test_client()
    page.environ_base["REMOTE_ADDR"] = "127.0.0.1"  # no password set: loopback only
    r = page.get("/")
    body = r.get_data(as_text=True)
    assert r.status_code == 200, body[:2000]
    assert "Traceback" not in body
    if state == "intact":
        assert "Allowed for signed requests" in body, body
    else:
        assert words_for(state) in body and "Back up and restore" in body, body
        assert "Allowed for signed requests" not in body
    if state == "damaged":  # the other pages that read the log: the sentence, never a 500
        for path in ("/log", "/shared/1", "/shared/1.mp4"):
            r = page.get(path)
            assert r.status_code in (400, 503) and words_for(state) in r.get_data(as_text=True), (path, r.status_code)
    unchanged(cfg, before, state)


@pytest.mark.parametrize("state", STATES)
def test_the_light_and_home_assistant_say_sharing_is_not_possible(cfg: AgentConfig, state: str) -> None:
    before = make(cfg, state)
    watcher = Watcher(cfg)
    watcher.poll(initial=True)  # what its thread does every second
    st = watcher.state
    assert st is not None
    if state == "intact":
        assert st.sharing_possible and st.why_not is None, st
    else:
        assert not st.sharing_possible and st.why_not is not None and words_for(state) in st.why_not, st
    watcher.stop()
    assert watcher.wait(5)
    unchanged(cfg, before, state)


@pytest.mark.parametrize("state", STATES)
def test_doctor_fails_with_the_fix(cfg: AgentConfig, state: str) -> None:
    before = make(cfg, state)
    (check,) = check_state(cfg, datetime.now(UTC))
    if state == "intact":
        assert check.status == "ok", check
    else:
        assert check.status == "fail" and words_for(state) in check.message and check.message.startswith("NOT SHARING")
        assert check.fix is not None and "restore" in check.fix and "restart" in check.fix
    unchanged(cfg, before, state)


def test_a_damaged_inbox_is_reported_too(cfg: AgentConfig) -> None:
    inbox = cfg.paths.data_dir / "inbox.sqlite"
    inbox.write_bytes(random.Random(3).randbytes(8192))
    s = sharing_status(cfg)
    assert set(s["state"]["refused"]) == {"inbox.sqlite"} and "inbox.sqlite is damaged" in s["not_sharing"]


def test_run_up_without_its_request_listener_says_so(cfg: AgentConfig) -> None:
    """``run`` holds the recorder lock, but the sharing service is not running (or stopped reporting)."""
    assert sharing_status(cfg)["not_sharing"] is None  # nothing runs: `status` says so on its own line
    fd = _take_lock(lock_path(cfg))  # as `run` does while it is up
    try:
        s = sharing_status(cfg)
        assert s["run_running"] and "request listener is not" in s["not_sharing"]
        assert "journalctl -u doorbell-agent" in s["not_sharing"]
        watcher = Watcher(cfg)
        watcher.poll(initial=True)
        assert watcher.state is not None and not watcher.state.sharing_possible
        now = datetime.now(UTC)
        status = {"pid": os.getpid(), "updated_us": to_us(now), "status_interval_s": 5.0, "stopped": False,
                  "transport": {"ready": True, "state": "connected", "broker": "localhost:8883"}, "pending_deliveries": 0}
        write_json_atomic(cfg.paths.service_status_file, status)
        assert sharing_status(cfg, now)["not_sharing"] is None  # the listener reports: nothing stands in the way
        write_json_atomic(cfg.paths.service_status_file, {**status, "stopped": True})
        assert "request listener is not" in sharing_status(cfg, now)["not_sharing"]
    finally:
        os.close(fd)
