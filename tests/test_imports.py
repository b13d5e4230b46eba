"""What each command loads: the resident's controls load no video library.

A resident pressing the kill switch on a Pi must not wait seconds for OpenCV,
PyAV and numpy to load; nor must trusting a key, reading the log or answering
a held request. Recording a camera that sends H.264 (stored as it is) needs
PyAV but neither OpenCV nor numpy. The agency's client and the pure protocol
modules stay free of them too.

Each check runs the real command in a fresh interpreter (``agent.cli.main``,
the console script's entry point) and lists ``sys.modules`` once the command
has finished, so imports made inside the command count as well as those made
to build the parser.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import pytest

from tests import protocol_signing as ps

VIDEO = {"cv2", "av", "numpy"}

POLICY = """
[policy]
program = "jackson-ms/camera-pilot-2026"
location = { lat = 32.29876, lon = -90.18481 }
timezone = "America/Chicago"
approval = "ask"

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2030-01-01T00:00:00Z
"""

# Runs one command as `doorbell-agent` would, then writes the exit code and the loaded modules to a file
# (stdout belongs to the command).
RUN_COMMAND = """
import json, sys
from agent.cli import main
out, argv = sys.argv[1], sys.argv[2:]
try:
    code = main(argv)
except SystemExit as exc:
    code = exc.code
with open(out, "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules)}, fh)
"""

# Imports every module of the named packages, then prints the loaded modules.
IMPORT_PACKAGES = """
import importlib, json, pkgutil, sys
for name in sys.argv[1:]:
    pkg = importlib.import_module(name)
    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{name}.{m.name}")
print(json.dumps(sorted(sys.modules)))
"""


def top_level(modules: list[str]) -> set[str]:
    return {m.partition(".")[0] for m in modules}


def run_command(tmp_path: Path, config: Path, *argv: str, timeout: float = 60) -> tuple[int, set[str], str]:
    """(exit code, top-level packages loaded, stderr) of one real command in a fresh interpreter."""
    code, modules, err = run_command_modules(tmp_path, config, *argv, timeout=timeout)
    return code, top_level(modules), err


def run_command_modules(tmp_path: Path, config: Path, *argv: str, timeout: float = 60) -> tuple[int, list[str], str]:
    """(exit code, every module loaded, stderr) of one real command in a fresh interpreter."""
    out = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    r = subprocess.run([sys.executable, "-c", RUN_COMMAND, str(out), "--config", str(config), *argv],
                       capture_output=True, text=True, timeout=timeout)
    assert out.exists(), f"{argv} did not finish: {r.stderr}"
    data = json.loads(out.read_text())
    return data["code"], data["modules"], r.stderr


def hold_request(config: Path) -> int:
    """A request held for the resident's answer, as the service would leave it; its id."""
    from agent.config import load_config
    from agent.state.approvals import ApprovalQueue

    now = datetime.now(UTC).replace(microsecond=0)
    start = datetime(2026, 11, 26, 20, 0, tzinfo=UTC)
    item = ApprovalQueue(load_config(config).paths.state_db).hold(
        raw=b"eyJhbGciOiJFZDI1NTE5In0.payload.sig", jti="request-jti-000001-abcdef", iss="jackson-pd",
        sub="Det. R. Alvarez", case="2026-001234", purpose="Package theft reported on Elm Street",
        granted_start=start, granted_end=start + timedelta(minutes=20),
        exp=int((now + timedelta(minutes=10)).timestamp()), now=now - timedelta(minutes=1),
    )
    return item.id


def agency_keys(tmp_path: Path) -> str:
    path = tmp_path / "agency.jwks.json"
    path.write_text(json.dumps(ps.vectors()["trust"]))
    return str(path)


def with_a_logged_request(tmp_path: Path, config: Path) -> list[str]:
    """A device key and one decision in the access log, as the service leaves them."""
    from agent.config import load_config
    from agent.state.accesslog import AccessLog
    from agent.state.devicekey import DeviceKey

    paths = load_config(config).paths
    key = DeviceKey.load_or_create(paths.device_key_file)
    now = datetime.now(UTC).replace(microsecond=0)
    with AccessLog(paths.state_db, device_key=key) as log:
        log.service_started(paths.data_dir)  # pins the key and signs at start-up, as the service does
        log.append(jti="req-0001-test-aaaaaaaa", iss="jackson-pd", sub="badge-4471", case="JPD-2026-000001",
                   purpose="Burglary reported on the 1200 block of N State St.",
                   area={"lat": 32.299839, "lon": -90.184, "radius_m": 300},
                   requested=(now - timedelta(hours=2), now - timedelta(hours=1)), reason="granted",
                   granted=(now - timedelta(minutes=90), now - timedelta(minutes=60)), kids=["jpd-2026a"], at=now)
        log.service_stopping()
    return []


def with_a_held_request(tmp_path: Path, config: Path) -> list[str]:
    hold_request(config)
    return []


def a_held_request_id(tmp_path: Path, config: Path) -> list[str]:
    return [str(hold_request(config))]


# (command, what to prepare first: returns extra arguments)
LIGHT_COMMANDS: list[tuple[list[str], Callable[[Path, Path], list[str]] | None]] = [
    (["killswitch", "status"], None),
    (["killswitch", "on"], None),
    (["killswitch", "off"], None),
    (["killswitch", "status", "--json"], None),
    (["log", "show"], with_a_logged_request),
    (["log", "verify"], with_a_logged_request),
    (["log", "checkpoint"], with_a_logged_request),
    (["log", "summary"], with_a_logged_request),
    (["log", "export", "-o", "-"], with_a_logged_request),
    (["trust", "add"], lambda tmp_path, config: [agency_keys(tmp_path)]),
    (["trust", "list"], None),
    (["pending"], with_a_held_request),
    (["approve"], a_held_request_id),
    (["decline"], a_held_request_id),
]


@pytest.mark.parametrize(("argv", "prepare"), LIGHT_COMMANDS, ids=[" ".join(c) for c, _ in LIGHT_COMMANDS])
def test_residents_controls_load_no_video_library(
    argv: list[str], prepare: Callable[[Path, Path], list[str]] | None,
    write_config: Callable[[str], Path], tmp_path: Path,
) -> None:
    from agent.cli import COMMANDS

    config = write_config(POLICY)
    extra = prepare(tmp_path, config) if prepare is not None else []
    code, modules, err = run_command_modules(tmp_path, config, *argv, *extra)
    assert code == 0, err  # the command really ran, so what it imports inside counts too
    loaded = top_level(modules)
    assert not loaded & VIDEO, f"doorbell-agent {' '.join(argv)} loaded {sorted(loaded & VIDEO)}"
    # Nor the other commands' modules (and what they import): only this command's is loaded.
    others = {m for m in modules if m in COMMANDS.values()} - {COMMANDS[argv[0]]}
    assert not others, f"doorbell-agent {' '.join(argv)} loaded {sorted(others)}"


def test_each_command_is_found_in_its_module() -> None:
    """COMMANDS (which module `main` imports for a command) agrees with what each module registers."""
    import argparse

    from agent.cli import COMMAND_MODULES, COMMANDS, build_parser

    registered = {}
    for module in COMMAND_MODULES:
        sub = next(a for a in build_parser((module,))._actions if isinstance(a, argparse._SubParsersAction))
        registered.update(dict.fromkeys(sub.choices, module))
    assert registered == COMMANDS
    full = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(full.choices) == set(COMMANDS)


@pytest.mark.parametrize(("argv", "module"), [
    (["killswitch", "on"], "agent.cli.killswitch"),
    (["--config", "/x/agent.toml", "status", "--json"], "agent.cli.run"),
    (["--config=/x/agent.toml", "approve", "3"], "agent.cli.approvals"),
    (["--conf", "/x/agent.toml", "run"], "agent.cli.run"),  # argparse accepts the abbreviation
    (["--config", "run", "log", "show"], "agent.cli.log"),  # "run" is the path here
    (["--help"], None),
    (["--version"], None),
    (["--config", "/x/agent.toml"], None),
    (["--verbose", "run"], None),  # not an option: argparse says so, with every command
    (["no-such-command"], None),
    ([], None),
])
def test_main_imports_only_the_command_it_runs(argv: list[str], module: str | None) -> None:
    from agent.cli import command_module

    assert command_module(argv) == module


def test_help_and_mistakes_still_see_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import COMMANDS, main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    with pytest.raises(SystemExit) as exc:
        main(["killswitc", "on"])
    assert exc.value.code == 2 and "invalid choice: 'killswitc'" in capsys.readouterr().err


def test_building_the_parser_loads_no_video_library() -> None:
    r = subprocess.run([sys.executable, "-c", "import json, sys, agent.cli; agent.cli.build_parser(); "
                        "print(json.dumps(sorted(sys.modules)))"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not top_level(json.loads(r.stdout)) & VIDEO


def import_packages(*names: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", IMPORT_PACKAGES, *names], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return top_level(json.loads(r.stdout))


def test_the_agency_client_loads_no_video_library() -> None:
    loaded = import_packages("agent.city")
    assert "agent" in loaded and not loaded & VIDEO


def test_the_protocol_is_pure() -> None:
    loaded = import_packages("agent.protocol")
    assert not loaded & (VIDEO | {"paho", "sqlite3"}), sorted(loaded & (VIDEO | {"paho", "sqlite3"}))


def write_h264(path: Path, seconds: float, width: int = 320, height: int = 240, fps: int = 15) -> None:
    """A camera's recording: H.264 without B-frames, a keyframe a second (stored as it is)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": f"keyint={fps}:bframes=0"}
        stream.codec_context.time_base = Fraction(1, fps)
        for i in range(int(seconds * fps)):
            img = np.full((height, width, 3), (i * 7) % 256, np.uint8)
            img[:, (i * 4) % width] = 255
            frame = av.VideoFrame.from_ndarray(img, format="bgr24")
            frame.pts = i
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)


@pytest.mark.slow
def test_recording_by_stream_copy_loads_neither_opencv_nor_numpy(write_config: Callable[[str], Path],
                                                                   tmp_path: Path) -> None:
    video = tmp_path / "camera.mp4"
    write_h264(video, 3.0)
    config = write_config(f"""
        [camera]
        source = "file"
        url = "{video}"
        width = 320
        height = 240
        fps = 15

        [buffer]
        segment_seconds = 1
        """)
    # `run` records the file in real time and stops by itself at its end.
    code, modules, err = run_command_modules(tmp_path, config, "run", timeout=120)
    assert code == 0, err
    loaded = top_level(modules)
    status = json.loads((tmp_path / "data" / "recorder-status.json").read_text())
    assert status["mode"] == "stream copy" and status["camera_state"] == "ended", status
    assert status["segments_written"] >= 2 and status["frames_dropped"] == 0, status
    assert len(list((tmp_path / "data" / "segments").rglob("*.mp4"))) == status["segments_written"]
    assert "av" in loaded  # it really recorded with PyAV ...
    assert not loaded & {"cv2", "numpy"}, f"stream copy loaded {sorted(loaded & {'cv2', 'numpy'})}"  # ... and only that
    # Recording only (no [policy], no [mqtt]): nothing of the sharing side or the other commands.
    assert not loaded & {"cryptography", "paho"}, sorted(loaded & {"cryptography", "paho"})
