"""The systemd unit: hardened (``systemd-analyze security`` 2.0 or lower), valid (``systemd-analyze verify``),
and still allowing what the agent needs (adjtimex, camera and GPIO nodes, IPv4/IPv6/Unix sockets).

``systemd-analyze`` works on unit files without a running systemd; ``./install.sh --dev`` installs it
(Debian package ``systemd``), so these tests never skip for want of it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "doorbell-agent.service"
AGENT = "/opt/doorbell-agent/bin/doorbell-agent"
MAX_EXPOSURE = 2.0


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: run ./install.sh --dev (it installs Debian's systemd package)"
    return exe


def _settings() -> list[tuple[str, str]]:
    out = []
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key, value))
    return out


def _values(key: str) -> list[str]:
    return [v for k, v in _settings() if k == key]


def test_security_exposure_is_two_or_lower() -> None:
    proc = subprocess.run([_analyze(), "security", "--offline=yes", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    text = proc.stdout + proc.stderr
    m = re.search(r"Overall exposure level for doorbell-agent\.service: (\d+\.\d)", text)
    assert m, text
    assert float(m.group(1)) <= MAX_EXPOSURE, text


def test_verify_is_clean(tmp_path: Path) -> None:
    # verify insists the ExecStart binaries exist: point them at a stand-in, change nothing else.
    stub = tmp_path / "doorbell-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "doorbell-agent.service"
    unit.write_text(UNIT.read_text().replace(AGENT, str(stub)))
    proc = subprocess.run([_analyze(), "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


def test_notify_and_watchdog() -> None:
    assert _values("Type") == ["notify"]
    assert _values("NotifyAccess") == ["main"]
    assert _values("WatchdogSec") and _values("WatchdogSec")[0] not in ("0", "infinity")
    assert _values("Restart") == ["on-failure"]  # a watchdog timeout counts as a failure


def test_keeps_what_the_agent_needs() -> None:
    # ProtectClock filters adjtimex(2), the clock check's only way to read the NTP state.
    assert not _values("ProtectClock")
    filters = _values("SystemCallFilter")
    assert filters[-1] == "adjtimex", "adjtimex must be allowed after every deny list that would remove it"
    families = set(" ".join(_values("RestrictAddressFamilies")).split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    devices = " ".join(_values("DeviceAllow"))
    for group in ("char-video4linux", "char-gpiochip", "char-media"):
        assert group in devices
    assert _values("PrivateDevices") in ([], ["no"])
    assert "video" in _values("SupplementaryGroups")


def test_files_and_memory() -> None:
    assert _values("UMask") == ["0077"]
    assert "PYTHONNOUSERSITE=1" in _values("Environment")
    assert _values("StateDirectory") == ["doorbell-agent"]
    assert _values("MemoryMax") and _values("MemoryMax")[0].endswith("M")
    assert _values("ExecStartPre") == [f"{AGENT} config check"]
    assert _values("ExecStart") == [f"{AGENT} run"]


@pytest.mark.parametrize("key", ["NoNewPrivileges", "ProtectKernelTunables", "ProtectKernelModules",
                                 "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality"])
def test_hardening_switches(key: str) -> None:
    assert _values(key) == ["yes"]
    assert _values("CapabilityBoundingSet") == [""]


# -- sd_notify: READY once it works, WATCHDOG only while frames arrive ---------------------------------

class _Stats:
    frames_captured = 0


class _Recorder:
    def __init__(self) -> None:
        self.stats = _Stats()


class _RecordingHandle:
    name = "recorder"

    def __init__(self) -> None:
        self.recorder = _Recorder()


class _Transport:
    ready = False
    last_error: str | None = "connection refused"


class _Trust:
    def __init__(self) -> None:
        self.error: str | None = None
        self.loads = 0

    def get(self) -> None:
        self.loads += 1


class _Service:
    name = "sharing"

    def __init__(self) -> None:
        self.transport = _Transport()
        self.trust = _Trust()


def _notifier(now: list[float], sent: list[str], usec: int = 20_000_000, grace: float = 60.0):  # type: ignore[no-untyped-def]
    from agent.runtime.sdnotify import ServiceNotifier

    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": str(usec)}
    return ServiceNotifier(env, clock=lambda: now[0], send=lambda m: sent.append(m) or True, broker_grace_s=grace)


def test_ready_waits_for_frames_then_watchdog_needs_progress() -> None:
    now, sent = [0.0], []
    n = _notifier(now, sent)
    rec = _RecordingHandle()
    n.poll([rec])
    assert sent == []  # no frame yet: neither READY nor a ping
    rec.recorder.stats.frames_captured = 5
    n.poll([rec])
    assert sent[0].startswith("READY=1\nSTATUS=recording only") and sent[1:] == ["WATCHDOG=1"]
    now[0] = 11.0  # past half the 20 s watchdog, frames still arriving: ping
    rec.recorder.stats.frames_captured = 150
    n.poll([rec])
    assert sent[-1] == "WATCHDOG=1" and sent.count("WATCHDOG=1") == 2
    for t in (22.0, 33.0, 44.0):  # the camera stalled: no more pings, systemd restarts the service
        now[0] = t
        n.poll([rec])
    assert sent.count("WATCHDOG=1") == 2
    now[0] = 55.0
    rec.recorder.stats.frames_captured = 160
    n.poll([rec])
    assert sent.count("WATCHDOG=1") == 3


def test_ready_waits_for_broker_and_trust_store_within_grace() -> None:
    now, sent = [0.0], []
    n = _notifier(now, sent, grace=60.0)
    rec, svc = _RecordingHandle(), _Service()
    rec.recorder.stats.frames_captured = 1
    n.poll([rec, svc])
    assert svc.trust.loads == 1  # the trust store is read before READY
    assert not any(m.startswith("READY") for m in sent)
    svc.transport.ready = True
    n.poll([rec, svc])
    assert svc.trust.loads == 1  # once
    ready = [m for m in sent if m.startswith("READY")]
    assert ready == ["READY=1\nSTATUS=recording and serving requests"]


def test_unreachable_broker_does_not_hold_recording_hostage() -> None:
    now, sent = [0.0], []
    n = _notifier(now, sent, grace=60.0)
    rec, svc = _RecordingHandle(), _Service()
    rec.recorder.stats.frames_captured = 1
    n.poll([rec, svc])
    now[0] = 61.0
    n.poll([rec, svc])
    ready = [m for m in sent if m.startswith("READY")]
    assert len(ready) == 1 and "broker not connected yet (connection refused)" in ready[0]


def test_no_systemd_no_messages() -> None:
    from agent.runtime.sdnotify import ServiceNotifier, notify, watchdog_interval

    assert not notify("READY=1", {})
    assert not ServiceNotifier({}).enabled
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, pid=2) is None


def test_notify_sends_a_datagram(tmp_path: Path) -> None:
    import socket

    from agent.runtime.sdnotify import notify

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        assert notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert srv.recv(100) == b"READY=1"


def test_run_components_notifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's own loop sends READY, WATCHDOG and STOPPING over a real socket."""
    import socket
    import threading

    from agent.config import AgentConfig
    from agent.runtime.supervisor import run_components

    path = tmp_path / "notify"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    stop = threading.Event()

    class Handle(_RecordingHandle):
        def stop(self) -> None:
            pass

        def wait(self, timeout: float | None = None) -> bool:
            return stop.is_set()

    handle = Handle()
    handle.recorder.stats.frames_captured = 1
    got: list[str] = []

    def feed() -> None:
        while "WATCHDOG=1" not in got:
            got.append(srv.recv(200).decode())
            handle.recorder.stats.frames_captured += 10
        stop.set()

    t = threading.Thread(target=feed)
    t.start()
    try:
        assert run_components(AgentConfig(), [lambda cfg: handle], stop=stop) == 0  # type: ignore[arg-type,return-value]
    finally:
        stop.set()
        t.join(10)
    got.append(srv.recv(200).decode())
    srv.close()
    assert got[0].startswith("READY=1\n") and "WATCHDOG=1" in got and got[-1] == "STOPPING=1", got
