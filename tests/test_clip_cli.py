"""``doorbell-agent clip`` as a homeowner runs it: local times in, a playable file and plain words out."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from tests.clipfixtures import BASE_US, Buffer, decode_clip, record_buffer, shows_time, stamp

# 2026-11-20 14:00:00Z is 08:00:00 in Chicago (CST, UTC-6).
TZ = "America/Chicago"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Buffer, Path]:
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    buf = record_buffer(data, seconds=40, gap_s=(20.0, 24.0))
    cfg = root / "agent.toml"
    cfg.write_text(f'[paths]\ndata_dir = "{data}"\n\n[camera]\nsource = "synthetic"\nwidth = 320\nheight = 240\nfps = 15\n')
    return buf, cfg


def clip(cfg: Path, *args: str, tz: str = TZ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TZ": tz, "DOORBELL_AGENT_CONFIG": str(cfg)}
    env.pop("DOORBELL_AGENT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "agent", "clip", *args], capture_output=True, text=True,
                          env=env, timeout=120)


POLICY = """
[policy]
program = "jackson-ms/camera-pilot-2026"
location = { lat = 32.29876, lon = -90.18481 }
timezone = "America/Chicago"

[policy.consent]
start = 2026-11-01T00:00:00Z
end = 2027-01-04T00:00:00Z
"""


def assert_shows_exactly(buf: Buffer, out: Path, start_us: int, end_us: int) -> None:
    """The clip's frames show (in their QR clocks) exactly the capture times recorded in the window."""
    expected = buf.inside(start_us, end_us)
    decoded = decode_clip(out)
    assert len(decoded.qr) == len(expected)
    for i, (shown, t) in enumerate(zip(decoded.qr, expected)):
        if shown is None:
            assert shows_time(decoded.unreadable[i], t, 1_000_000 // 15, 320, 240), f"frame {i} is not {stamp(t)}"
        else:
            assert shown == stamp(t), f"frame {i} shows {shown}, expected {stamp(t)}"


def frame_count(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for p in c.demux(c.streams.video[0]) if p.size)


def test_happy_path_local_times(setup: tuple[Buffer, Path], tmp_path: Path) -> None:
    buf, cfg = setup
    out = tmp_path / "porch.mp4"
    r = clip(cfg, "--from", "2026-11-20 08:00:02", "--to", "2026-11-20 08:00:07", "-o", str(out))
    assert r.returncode == 0, r.stderr
    expected = buf.inside(BASE_US + 2_000_000, BASE_US + 7_000_000)
    assert frame_count(out) == len(expected) == 75
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"{len(expected)} frames" in r.stdout and "5.0 s" in r.stdout
    assert "from 2026-11-20 08:00:02 CST to 2026-11-20 08:00:07 CST" in r.stdout
    assert digest in r.stdout
    assert subprocess.run(["ffmpeg", "-v", "error", "-i", str(out), "-f", "null", "-"],
                          capture_output=True, text=True, timeout=60).stderr == ""


def test_json_with_rfc3339_and_gap(setup: tuple[Buffer, Path], tmp_path: Path) -> None:
    buf, cfg = setup
    out = tmp_path / "gap.mp4"
    r = clip(cfg, "--from", "2026-11-20T14:00:18Z", "--to", "2026-11-20T08:00:26-06:00", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    expected = buf.inside(BASE_US + 18_000_000, BASE_US + 26_000_000)
    assert info["frames"] == frame_count(out) == len(expected)
    assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and info["bytes"] == out.stat().st_size
    assert info["start"] == "2026-11-20T14:00:18Z" and info["end"] == "2026-11-20T14:00:26Z"
    assert (info["width"], info["height"]) == (320, 240)


def test_to_must_be_after_from(setup: tuple[Buffer, Path], tmp_path: Path) -> None:
    _, cfg = setup
    r = clip(cfg, "--from", "2026-11-20 08:00:07", "--to", "2026-11-20 08:00:02", "-o", str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "--to" in r.stderr and "after --from" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.mp4").exists()


def test_bad_time_names_the_field(setup: tuple[Buffer, Path], tmp_path: Path) -> None:
    _, cfg = setup
    r = clip(cfg, "--from", "yesterday-ish", "--to", "2026-11-20 08:00:02", "-o", str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "--from 'yesterday-ish' is not a time" in r.stderr


def test_no_footage_says_what_is_held(setup: tuple[Buffer, Path], tmp_path: Path) -> None:
    _, cfg = setup
    r = clip(cfg, "--from", "2026-11-20 08:00:20.5", "--to", "2026-11-20 08:00:23.5", "-o", str(tmp_path / "x.mp4"))
    assert r.returncode == 2, r.stderr
    assert "no footage was recorded between 2026-11-20 08:00:20 CST and 2026-11-20 08:00:23 CST" in r.stderr
    # Two stretches around the camera outage, in local time.
    assert "from 2026-11-20 08:00:00 CST to 2026-11-20 08:00:20 CST; 2026-11-20 08:00:24 CST to 2026-11-20 08:00:40 CST" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_folder_missing(setup: tuple[Buffer, Path], tmp_path: Path) -> None:
    _, cfg = setup
    r = clip(cfg, "--from", "2026-11-20 08:00:02", "--to", "2026-11-20 08:00:03", "-o", str(tmp_path / "nope" / "x.mp4"))
    assert r.returncode == 2 and f"the folder {tmp_path / 'nope'} does not exist" in r.stderr


def test_existing_output_needs_force(setup: tuple[Buffer, Path], tmp_path: Path) -> None:
    _, cfg = setup
    out = tmp_path / "x.mp4"
    out.write_bytes(b"my holiday video")
    r = clip(cfg, "--from", "2026-11-20 08:00:02", "--to", "2026-11-20 08:00:03", "-o", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"my holiday video"
    r = clip(cfg, "--from", "2026-11-20 08:00:02", "--to", "2026-11-20 08:00:03", "-o", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert frame_count(out) == 15


def test_times_are_in_the_policy_time_zone_not_the_systems(setup: tuple[Buffer, Path], tmp_path: Path) -> None:
    """A Pi left on UTC, a resident in Chicago: '08:00:02' means 08:00:02 in Chicago (14:00:02Z)."""
    buf, cfg = setup
    chicago = tmp_path / "agent.toml"
    chicago.write_text(cfg.read_text() + POLICY)
    out = tmp_path / "porch.mp4"
    r = clip(chicago, "--from", "2026-11-20 08:00:02", "--to", "2026-11-20 08:00:05", "-o", str(out), tz="UTC")
    assert r.returncode == 0, r.stderr
    assert_shows_exactly(buf, out, BASE_US + 2_000_000, BASE_US + 5_000_000)
    assert "from 2026-11-20 08:00:02 CST to 2026-11-20 08:00:05 CST" in r.stdout
    # Errors speak the same zone.
    r = clip(chicago, "--from", "2026-11-20 08:00:20.5", "--to", "2026-11-20 08:00:23.5", "-o", str(tmp_path / "x.mp4"),
             tz="UTC")
    assert r.returncode == 2 and "between 2026-11-20 08:00:20 CST and 2026-11-20 08:00:23 CST" in r.stderr, r.stderr
    r = clip(chicago, "--from", "2026-11-20 08:00:07", "--to", "2026-11-20 08:00:02", "-o", str(tmp_path / "x.mp4"),
             tz="UTC")
    assert r.returncode == 2 and "--to (2026-11-20 08:00:02 CST) must be after --from (2026-11-20 08:00:07 CST)" in r.stderr


def test_output_to_standard_output(setup: tuple[Buffer, Path], tmp_path: Path) -> None:
    """`-o -` (what the installed command uses to write FILE as the resident): the same MP4 bytes on
    standard output, the summary on standard error, no temporary file left in the data folder."""
    buf, cfg = setup
    window = ("--from", "2026-11-20 08:00:02", "--to", "2026-11-20 08:00:07")
    out = tmp_path / "file.mp4"
    assert clip(cfg, *window, "-o", str(out)).returncode == 0
    env = {**os.environ, "TZ": TZ, "DOORBELL_AGENT_CONFIG": str(cfg)}
    streamed = tmp_path / "streamed.mp4"
    with streamed.open("wb") as sink:
        r = subprocess.run([sys.executable, "-m", "agent", "clip", *window, "-o", "-", "--output-name", "/home/alice/porch.mp4"],
                           stdout=sink, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert streamed.read_bytes() == out.read_bytes()
    assert_shows_exactly(buf, streamed, BASE_US + 2_000_000, BASE_US + 7_000_000)
    assert "Wrote /home/alice/porch.mp4: 75 frames" in r.stderr
    assert not [p for p in buf.data_dir.iterdir() if p.name.startswith(".clip-")]
    with streamed.open("wb") as sink:
        r = subprocess.run([sys.executable, "-m", "agent", "clip", *window, "-o", "-", "--json"],
                           stdout=sink, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert r.returncode == 0 and streamed.read_bytes() == out.read_bytes()
    info = json.loads(r.stderr)
    assert info["path"] == "-" and info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
