"""Kill switch: durable, atomic, cheap to read, and ENGAGED whenever its file is in doubt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.state.killswitch import KillSwitch, KillSwitchState, write_atomically

UTC = UTC
NOW = datetime(2026, 12, 3, 18, 0, 0, tzinfo=UTC)


def test_missing_file_is_off(tmp_path: Path) -> None:
    state = KillSwitch(tmp_path / "killswitch").state()
    assert state.engaged is False
    assert "never engaged" in state.reason


def test_engage_and_release_persist(tmp_path: Path) -> None:
    path = tmp_path / "data" / "killswitch"
    KillSwitch(path).engage(by="homeowner test", now=NOW)
    again = KillSwitch(path).state()  # a fresh reader, as another process would be
    assert again.engaged and again.by == "homeowner test" and again.since == NOW
    KillSwitch(path).release(by="homeowner test", now=NOW)
    assert KillSwitch(path).engaged is False
    assert json.loads(path.read_text()) == {"v": 1, "engaged": False, "since": "2026-12-03T18:00:00Z", "by": "homeowner test"}


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    ks = KillSwitch(tmp_path / "killswitch")
    for i in range(5):
        ks.set(i % 2 == 0, by="t", now=NOW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killswitch"]


def test_rename_is_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    """A reader racing a writer sees the old or the new state, never a half-written file."""
    path = tmp_path / "killswitch"
    ks = KillSwitch(path)
    ks.engage(by="x" * 150, now=NOW)
    script = (
        "import sys; from pathlib import Path; from agent.state.killswitch import KillSwitch\n"
        "ks = KillSwitch(Path(sys.argv[1])); bad = 0\n"
        "for _ in range(3000):\n"
        "    s = ks.state()\n"
        "    bad += s.since is None\n"
        "print(bad)\n"
    )
    reader = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    while reader.poll() is None:
        ks.set(True, by="y" * 150, now=NOW)
        ks.set(True, by="x" * 150, now=NOW)
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0
    assert out.strip() == "0"


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "not valid JSON"),
        (b"on\n", "not valid JSON"),
        (b'{"v": 1, "engaged": fal', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"v": 1, "engaged": "false", "since": "2026-12-03T18:00:00Z", "by": "me"}', "'engaged'"),
        (b'{"v": 1, "engaged": 0, "since": "2026-12-03T18:00:00Z", "by": "me"}', "'engaged'"),
        (b'{"v": 2, "engaged": false, "since": "2026-12-03T18:00:00Z", "by": "me"}', "version"),
        (b'{"v": 1, "engaged": false, "since": "yesterday", "by": "me"}', "'since'"),
        (b'{"v": 1, "engaged": false, "since": "2026-12-03T18:00:00Z", "by": ""}', "'by'"),
        (b'{"v": 1, "engaged": false, "since": "2026-12-03T18:00:00Z", "by": "me", "x": 1}', "members"),
        (b'{"v": 1, "engaged": false}', "members"),
        (b" " * 5000, "larger than"),
    ],
)
def test_unexpected_content_means_engaged(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "killswitch"
    path.write_bytes(content)
    state = KillSwitch(path).state()
    assert state.engaged is True
    assert words in state.reason and str(path) in state.reason


def test_a_directory_means_engaged(tmp_path: Path) -> None:
    path = tmp_path / "killswitch"
    path.mkdir()
    state = KillSwitch(path).state()
    assert state.engaged and "not a regular file" in state.reason


def test_a_fifo_means_engaged_and_does_not_hang(tmp_path: Path) -> None:
    """A FIFO in place of the file once hung both workers on open(); now it reads as engaged at once."""
    path = tmp_path / "killswitch"
    os.mkfifo(path)
    result: list[KillSwitchState] = []
    reader = threading.Thread(target=lambda: result.append(KillSwitch(path).state()), daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "reading the kill switch blocked on a FIFO"
    assert result[0].engaged and "not a regular file" in result[0].reason


def test_a_dangling_symlink_means_engaged(tmp_path: Path) -> None:
    """Once read as "off" (no file): a link to nowhere is not the resident's "never engaged"."""
    path = tmp_path / "killswitch"
    path.symlink_to(tmp_path / "nowhere")
    state = KillSwitch(path).state()
    assert state.engaged and "symbolic link" in state.reason


def test_a_symlink_to_an_off_file_means_engaged(tmp_path: Path) -> None:
    """The switch is never read through a link, even one to a well-formed "off" file someone else controls."""
    elsewhere = tmp_path / "elsewhere"
    KillSwitch(elsewhere).release(by="someone else", now=NOW)
    assert not KillSwitch(elsewhere).state().engaged
    path = tmp_path / "killswitch"
    path.symlink_to(elsewhere)
    assert KillSwitch(path).state().engaged


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_permission_denied_means_engaged(tmp_path: Path) -> None:
    path = tmp_path / "killswitch"
    KillSwitch(path).release(by="t", now=NOW)
    path.chmod(0)
    assert KillSwitch(path).state().engaged


def test_write_atomically_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomically(path, b"a" * 10000)
    write_atomically(path, b"b")
    assert path.read_bytes() == b"b"


# --- the homeowner's command ---------------------------------------------------


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cli_on_off_status(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    cfg = write_config("")
    r = run_cli(cfg, "killswitch", "status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["engaged"] is False

    r = run_cli(cfg, "killswitch", "on")
    assert r.returncode == 0, r.stderr
    assert "ON" in r.stdout and "nothing will be shared" in r.stdout
    assert KillSwitch(tmp_path / "data" / "killswitch").engaged

    r = run_cli(cfg, "killswitch", "status", "--json")
    st = json.loads(r.stdout)
    assert st["engaged"] is True and "command line" in st["by"]

    r = run_cli(cfg, "killswitch", "off")
    assert r.returncode == 0 and "off" in r.stdout
    assert not KillSwitch(tmp_path / "data" / "killswitch").engaged


def test_cli_status_reports_a_corrupt_file_as_on(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    cfg = write_config("")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "killswitch").write_text("garbage")
    r = run_cli(cfg, "killswitch", "status")
    assert r.returncode == 0
    assert "counts as ON" in r.stdout and "not valid JSON" in r.stdout
    r = run_cli(cfg, "killswitch", "off")  # the homeowner can always repair it
    assert r.returncode == 0
    assert not KillSwitch(tmp_path / "data" / "killswitch").engaged
