"""Upgrading stored data in place (agent/state/migrate.py, ``doorbell-agent migrate``, ``run`` at start-up).

Real SQLite files as the agent writes them: a replay memory and a buffer index made by this code are the
format-0 files of every installation from before format versions (nothing in them but their tables).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.buffer.segments import SegmentStore
from agent.state import migrate
from agent.state.db import add_column
from agent.state.replay import ReplayMemory
from tests.clipfixtures import record_buffer

NOW = datetime(2026, 11, 20, 14, 0, tzinfo=UTC)


def version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def set_version(path: Path, v: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {v}")
    conn.close()


def dump(path: Path) -> tuple[int, list[str]]:
    """A database's format and every statement that would rebuild it: equal means nothing changed."""
    with sqlite3.connect(path) as conn:
        return version(path), list(conn.iterdump())


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOORBELL_AGENT_CONFIG": str(cfg)}
    env.pop("DOORBELL_AGENT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def old_data(tmp_path: Path) -> tuple[Path, Path]:
    """A data folder as 0.1.0 left it: state.sqlite (replay memory) and buffer.sqlite (8 s indexed), format 0."""
    data = tmp_path / "data"
    with ReplayMemory(data / "state.sqlite") as replay:
        for i in range(3):
            replay.remember(f"jti-{i}", f"{i:064x}", NOW + timedelta(days=1), now=NOW)
    record_buffer(data, seconds=8, gap_s=None)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[paths]\ndata_dir = "{data}"\n\n[camera]\nsource = "synthetic"\nwidth = 320\nheight = 240\nfps = 15\n')
    assert version(data / "state.sqlite") == version(data / "buffer.sqlite") == 0
    return data, cfg


def segments_rows(data: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(data / "buffer.sqlite") as conn:
        return conn.execute("SELECT * FROM segments ORDER BY id").fetchall()


def test_old_format_is_upgraded_in_place_and_again_changes_nothing(old_data: tuple[Path, Path]) -> None:
    data, cfg = old_data
    rows = segments_rows(data)
    assert len(rows) == 2
    r = cli(cfg, "migrate")
    assert r.returncode == 0, r.stderr
    assert "state.sqlite: upgraded from format 0 to 1" in r.stdout
    assert "buffer.sqlite: upgraded from format 0 to 1" in r.stdout
    assert "inbox.sqlite: not made yet" in r.stdout and not (data / "inbox.sqlite").exists()
    assert version(data / "state.sqlite") == migrate.latest("state.sqlite") == 1
    assert version(data / "buffer.sqlite") == migrate.latest("buffer.sqlite") == 1
    # The data is intact and the agent's own code still reads it.
    assert segments_rows(data) == rows
    with ReplayMemory(data / "state.sqlite") as replay:
        assert [replay.seen(f"jti-{i}") for i in range(3)] == [f"{i:064x}" for i in range(3)]
    store = SegmentStore(data / "buffer.sqlite", data / "segments")
    try:
        assert [s.frames for s in store.overlapping(0, 2**62)] == [60, 60]
    finally:
        store.close()
    again = cli(cfg, "migrate", "--json")
    assert again.returncode == 0, again.stderr
    report = {d["file"]: (d["before"], d["after"]) for d in json.loads(again.stdout)["databases"]}
    assert report == {"state.sqlite": (1, 1), "buffer.sqlite": (1, 1), "inbox.sqlite": (None, None)}


def test_newer_format_is_refused_and_the_agent_does_not_start(old_data: tuple[Path, Path]) -> None:
    """A downgrade: state.sqlite from a future version. Nothing is changed, `run` stops before anything starts."""
    data, cfg = old_data
    set_version(data / "state.sqlite", 7)
    before = {p.name: dump(p) for p in data.glob("*.sqlite")}
    r = cli(cfg, "migrate")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{data / 'state.sqlite'} is in format 7, written by a newer doorbell-agent" in r.stderr
    assert "knows formats up to 1" in r.stderr and "neither records nor shares" in r.stderr
    assert "Traceback" not in r.stderr
    # All or nothing: buffer.sqlite, which this version could upgrade, is left as it was too.
    assert version(data / "buffer.sqlite") == 0 and version(data / "state.sqlite") == 7
    run = cli(cfg, "run")
    assert run.returncode == 2 and "written by a newer doorbell-agent" in run.stderr, run.stderr
    assert not (data / "recorder-status.json").exists()  # the recorder never started
    assert {p.name: dump(p) for p in data.glob("*.sqlite")} == before


def test_run_upgrades_an_old_format_before_it_starts(old_data: tuple[Path, Path]) -> None:
    """Upgrading without install.sh (a restart after pip install): `run` upgrades first."""
    data, _ = old_data
    from agent.config import load_config
    from agent.runtime import supervisor

    calls: list[int] = []
    cfg = load_config(old_data[1])

    def started(*_: object) -> int:  # in place of the components: the format they would find
        calls.append(version(data / "state.sqlite"))
        return 0

    real = supervisor.run_components
    try:
        supervisor.run_components = started  # type: ignore[assignment]
        assert supervisor.run_agent(cfg) == 0
    finally:
        supervisor.run_components = real
    assert calls == [1]


@pytest.fixture
def owner_with_a_new_column() -> Iterator[str]:
    """A schema owner that registers a step, as agent/state/approvals.py would for a new column."""
    module = types.ModuleType("fake_approvals_owner")
    module.MIGRATIONS = [(2, add_column("pending_approvals", "decided_by", "TEXT"))]  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield module.__name__
    del sys.modules[module.__name__]


def _approvals_v0(path: Path) -> None:
    from agent.state.approvals import _SCHEMA
    from agent.state.db import connect, create_schema, transaction

    conn = connect(path)
    with transaction(conn):
        create_schema(conn, _SCHEMA)
    conn.execute("INSERT INTO pending_approvals (jti, iss, sub, case_ref, purpose, granted_start, granted_end, exp, raw, "
                 "held_at, state) VALUES ('v-jti', 'iss', 'sub', 'case', 'purpose', 1, 2, 3, x'00', 4, 'awaiting_resident')")
    conn.close()


def test_a_registered_step_adds_a_column_keeps_rows_and_is_idempotent(tmp_path: Path, owner_with_a_new_column: str) -> None:
    owners = {"state.sqlite": ("agent.state.approvals", owner_with_a_new_column)}
    _approvals_v0(tmp_path / "state.sqlite")
    done = migrate.migrate_data_dir(tmp_path, owners)
    assert [(u.before, u.after) for u in done] == [(0, 2)]
    with sqlite3.connect(tmp_path / "state.sqlite") as conn:
        row = conn.execute("SELECT jti, decided_by FROM pending_approvals").fetchone()
    assert row == ("v-jti", None)
    assert [(u.before, u.after) for u in migrate.migrate_data_dir(tmp_path, owners)] == [(2, 2)]
    # A file new code created with the column already in place (still format 0) upgrades without error.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    conn = sqlite3.connect(fresh / "state.sqlite")
    conn.execute("CREATE TABLE pending_approvals (id INTEGER PRIMARY KEY, jti TEXT, decided_by TEXT)")
    conn.close()
    assert [(u.before, u.after) for u in migrate.migrate_data_dir(fresh, owners)] == [(0, 2)]


def test_a_failing_step_changes_nothing(tmp_path: Path) -> None:
    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE pending_approvals ADD COLUMN half TEXT")
        raise sqlite3.OperationalError("disk I/O error")

    module = types.ModuleType("fake_failing_owner")
    module.MIGRATIONS = [(2, half_then_fail)]  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        _approvals_v0(tmp_path / "state.sqlite")
        with pytest.raises(migrate.UserError, match="failed and changed nothing"):
            migrate.migrate_data_dir(tmp_path, {"state.sqlite": ("agent.state.approvals", module.__name__)})
    finally:
        del sys.modules[module.__name__]
    assert version(tmp_path / "state.sqlite") == 0
    with sqlite3.connect(tmp_path / "state.sqlite") as conn:
        assert "half" not in [r[1] for r in conn.execute("PRAGMA table_info(pending_approvals)")]


def test_steps_must_be_numbered_without_gaps_or_clashes() -> None:
    for steps in ([(3, "")], [(2, ""), (2, "")]):
        module = types.ModuleType("fake_bad_owner")
        module.MIGRATIONS = steps  # type: ignore[attr-defined]
        sys.modules[module.__name__] = module
        try:
            with pytest.raises(RuntimeError, match="numbered 1, 2, 3"):
                migrate.steps_for("state.sqlite", (module.__name__,))
        finally:
            del sys.modules[module.__name__]
    for name in migrate.OWNERS:
        assert migrate.latest(name) >= 1
