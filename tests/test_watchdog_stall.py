"""The systemd watchdog through a real stall: `doorbell-agent run` recording a real RTSP camera that freezes.

systemd restarts the service when ``WATCHDOG=1`` stops arriving, so the agent must send it only
while capture makes progress. Here the real ``run`` is started as systemd would start it (a
``NOTIFY_SOCKET`` datagram socket and ``WATCHDOG_USEC``), recording GStreamer's RTSP server
(tests/rtsp_server.py). The server is then frozen with SIGSTOP: its connection stays open but
nothing arrives, the way a hung camera behaves. The pings must stop while it is frozen, the
recorder must try to reopen the camera, and once the server is thawed recording and pings resume.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.fsutil import read_status
from tests.test_rtsp_camera import RtspCamera, needs_gst

pytestmark = [pytest.mark.slow, needs_gst]
ROOT = Path(__file__).resolve().parents[1]
WATCHDOG_S = 6.0  # systemd would ping-check every 6 s; the agent pings at half that while frames arrive


class NotifySocket:
    """What systemd listens on: one datagram per sd_notify message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[str]:
        """Every message that arrives within ``seconds`` (the socket is read with a timeout, never slept on)."""
        got: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            text = data.decode(errors="replace")
            self.messages.append((time.monotonic(), text))
            got.append(text)
        return got

    def wait_for(self, predicate: object, timeout: float) -> str | None:
        """The first message for which ``predicate(message)`` is true, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                text = self.sock.recv(4096).decode(errors="replace")
            except TimeoutError:
                return None
            self.messages.append((time.monotonic(), text))
            if predicate(text):  # type: ignore[operator]
                return text
        return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def camera(tmp_path: Path) -> Iterator[RtspCamera]:
    cam = RtspCamera(tmp_path / "sent.bin")
    try:
        yield cam
    finally:
        if cam.proc.poll() is None:
            os.kill(cam.proc.pid, signal.SIGCONT)
        cam.stop()


def test_a_frozen_camera_stops_the_watchdog_pings_until_frames_come_back(tmp_path: Path, camera: RtspCamera) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[paths]
data_dir = "{data}"

[camera]
source = "rtsp"
url = "{camera.url}"
width = {camera.width}
height = {camera.height}
fps = {camera.fps}
reconnect_max_s = 2

[web]
enabled = false
""")
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))}
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "run.log").open("wb")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        assert notify.wait_for(lambda m: m.startswith("READY=1"), 60), "the agent never said READY"
        assert notify.wait_for(lambda m: m == "WATCHDOG=1", WATCHDOG_S), "no watchdog ping while frames arrive"

        os.kill(camera.proc.pid, signal.SIGSTOP)  # the camera hangs: its connection stays open, nothing arrives
        frozen_at = time.monotonic()
        # Frames already on their way (socket buffers, the recorder's queue) are real progress made after the last
        # ping and may earn one more ping, one interval (WATCHDOG_S / 2) later; after that, silence.
        notify.collect(WATCHDOG_S + 1.0)
        quiet = notify.collect(2 * WATCHDOG_S)
        assert "WATCHDOG=1" not in quiet, ("the watchdog was fed while the camera was frozen: "
                                           f"{[(round(t - frozen_at, 2), m[:40]) for t, m in notify.messages]}")
        status = read_status(data / "recorder-status.json")
        assert status is not None and status.get("camera_state") != "recording", status

        os.kill(camera.proc.pid, signal.SIGCONT)  # the camera comes back (the recorder reconnects if it had given up)
        assert notify.wait_for(lambda m: m == "WATCHDOG=1", 60), "pings did not resume once frames came back"
        assert time.monotonic() - frozen_at > 2 * WATCHDOG_S
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            code = agent.wait()
        log.close()
        notify.close()
    text = (tmp_path / "run.log").read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
