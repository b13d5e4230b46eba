"""A full disk under a real ``doorbell-agent run``: recording evicts and goes on, sharing keeps deciding.

The data folder is a small tmpfs (``mount -t tmpfs -o size=40m``; skipped, saying why, where mounting
is not permitted). The agent records a synthetic camera (real H.264) and shares (a real TLS broker, a
trusted agency key). Two ways the disk fills:

- the footage itself: ``buffer.max_bytes`` is larger than the filesystem and ``buffer.min_free_bytes``
  small, so the disk runs full before any limit of the buffer's own is reached;
- something else: a big file written next to the data leaves less free space than
  ``buffer.min_free_bytes``, so the buffer cannot be kept ("THE DISK IS TOO FULL TO KEEP A BUFFER").

In both, what a resident checks: segments keep coming and the newest is never deleted; a signed request
is decided and on the access log while the disk is full; when the log cannot be written at all the
request is not granted (fail closed) and the agent's log says why; the process is alive throughout and
exits 0 on SIGTERM; ``doorbell-agent status`` says the disk is full; ``log verify`` passes afterwards.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.buffer.segments import SegmentStore
from agent.city import build_request, keygen, load_signing_key
from agent.city.keys import SigningKey
from agent.city.mqtt import BrokerSettings, MqttSession
from agent.city.requests import request_topics
from agent.config import load_config
from agent.protocol.trust import TrustStore
from agent.state.truststore import save_trust_store
from tests.broker import Broker

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
HOME = (32.29876, -90.18481)
PROGRAM = "jackson-ms/camera-pilot-2026"
DISK_MB = 40
MiB = 1024 * 1024


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs, unmounted afterwards whatever happens."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def fill(path: Path, leave: int) -> None:
    """Write ``path`` until only ``leave`` bytes are free on its filesystem."""
    size = free_bytes(path.parent) - leave
    with open(path, "wb") as f:
        while size > 0:
            n = min(size, MiB)
            f.write(b"\0" * n)
            size -= n
        f.flush()
        os.fsync(f.fileno())


class Setup:
    """The agent's configuration on the small disk, its trusted agency and the agency's session."""

    def __init__(self, tmp_path: Path, disk: Path, broker: Broker, *, min_free_bytes: int) -> None:
        self.data = disk / "data"
        self.log = tmp_path / "agent.log"
        self.broker = broker
        mqtt = broker.mqtt_config("agent", precision=4, client_id=f"agent-disk-{tmp_path.name[-8:]}")
        self.cfg = tmp_path / "agent.toml"
        self.cfg.write_text(f"""
[paths]
data_dir = "{self.data}"

[camera]
source = "synthetic"
width = 640
height = 480
fps = 30

[buffer]
segment_seconds = 1
max_bytes = {4 * DISK_MB * MiB}
min_free_bytes = {min_free_bytes}

[clock]
assume_synced = true  # this machine's clock is right but not reported synchronized

[policy]
program = "{PROGRAM}"
location = {{ lat = {HOME[0]}, lon = {HOME[1]} }}
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
client_id = "{mqtt.client_id}"
keepalive_s = 5
""")
        keys = keygen(iss="jackson-pd", kid="jpd-test", out_dir=tmp_path / "city")
        self.data.mkdir(parents=True)
        save_trust_store(TrustStore.from_jwks(keys.public_jwks), load_config(self.cfg).paths.trust_file)
        self.requester: SigningKey = load_signing_key(keys.private_path)
        cred = broker.credentials["agency"]
        settings = BrokerSettings(host=broker.host, port=broker.port, ca_file=broker.ca_file,
                                  cert_file=cred.cert_file, key_file=cred.key_file,
                                  username=cred.username, password=cred.password)
        self.session = MqttSession(settings, client_id=f"city-disk-{tmp_path.name[-8:]}", clean_start=True,
                                   session_expiry_s=300)
        self.session.connect()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(self.cfg), "run"], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.session.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def segments(self) -> list[Path]:
        return sorted((self.data / "segments").rglob("*.mp4"))

    def request(self, jti: str) -> None:
        """A signed request for the 5 s before the newest stored segment (never evicted) and its start."""
        now = datetime.now(UTC).replace(microsecond=0)
        conn = sqlite3.connect(f"file:{self.data / 'buffer.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            start_us = int(conn.execute("SELECT MAX(start_us) FROM segments").fetchone()[0])
        finally:
            conn.close()
        start = datetime.fromtimestamp(start_us / 1e6, UTC)
        built = build_request(requester=self.requester, oversight=None, program=PROGRAM, officer="badge-4471",
                              case="JPD-2026-001234", purpose="Burglary reported on this block.", basis="consent",
                              lat=HOME[0] + 0.001, lon=HOME[1] + 0.001, radius_m=300,
                              window_start=start - timedelta(seconds=5), window_end=start + timedelta(seconds=0.9),
                              now=now, jti=jti)
        for topic in request_topics(self.broker.root, *HOME, 300):
            self.session.publish(topic, built.message, expiry_s=600)

    def log_entries(self, jti: str) -> list[tuple[str, str]]:
        """(type, outcome) of every access-log entry about ``jti``, read-only."""
        db = self.data / "state.sqlite"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return [(str(t), str(o)) for t, o in
                    conn.execute("SELECT type, outcome FROM access_log WHERE jti = ? ORDER BY seq", (jti,))]
        finally:
            conn.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", "--config", str(self.cfg), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)


def newest_segment_keeps_coming(s: Setup, seconds: float) -> list[Path]:
    """Watch ``seconds``: new segments appear, and the newest file present is never one that vanished."""
    seen: list[Path] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        segs = s.segments()
        if segs and (not seen or segs[-1] != seen[-1]):
            seen.append(segs[-1])
        assert s.alive(), "the agent died: " + s.log_text()[-3000:]
        time.sleep(0.1)
    assert len(seen) >= 3, f"recording stopped: only {len(seen)} new segment(s) in {seconds} s"
    return seen


@pytest.fixture
def setup_factory(tmp_path: Path, disk: Path, broker: Broker) -> Iterator[Callable[..., Setup]]:
    made: list[Setup] = []

    def make(**kw: int) -> Setup:
        s = Setup(tmp_path, disk, broker, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_footage_fills_the_disk_recording_evicts_and_sharing_goes_on(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory(min_free_bytes=0)  # no free-space limit of its own: the footage runs the disk full
    fill(s.data.parent / "other-things", leave=8 * MiB)
    t0 = time.monotonic()
    s.start()
    wait_for(lambda: "free space: " in s.log_text() or not s.alive(), 120, "eviction for free space")
    print(f"disk full {time.monotonic() - t0:.1f} s after the start; free {free_bytes(s.data)} bytes")
    assert s.alive(), s.log_text()[-3000:]
    seen = newest_segment_keeps_coming(s, 6)
    print(f"{len(seen)} new segments in 6 s on the full disk")
    # The footage never takes the room the access log needs: the request is granted and logged.
    s.request("disk-full-request-1")
    wait_for(lambda: s.log_entries("disk-full-request-1") or not s.alive(), 30, "the request on the access log")
    assert ("decision", "granted") in s.log_entries("disk-full-request-1"), s.log_entries("disk-full-request-1")
    # ...and its clip (written to the outbox on the same disk) is delivered.
    wait_for(lambda: closing(s, "disk-full-request-1") or not s.alive(), 60, "the delivery to end")
    assert closing(s, "disk-full-request-1") == ["delivered"], s.log_entries("disk-full-request-1")
    newest_segment_keeps_coming(s, 3)
    assert s.stop() == 0, s.log_text()[-3000:]
    finish(s)


def test_something_else_fills_the_disk(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory(min_free_bytes=6 * MiB)
    s.start()
    wait_for(lambda: len(s.segments()) >= 5 or not s.alive(), 60, "some footage")
    t0 = time.monotonic()
    fill(s.data.parent / "big-download", leave=2 * MiB)  # something else takes the disk
    wait_for(lambda: "THE DISK IS TOO FULL TO KEEP A BUFFER" in s.log_text() or not s.alive(), 30, "the warning")
    print(f"warned {time.monotonic() - t0:.1f} s after the disk was filled")
    seen = newest_segment_keeps_coming(s, 6)
    assert len(s.segments()) <= 2, "older footage was not removed"
    print(f"{len(seen)} new segments in 6 s; {len(s.segments())} held")
    out = s.cli("status")
    assert "THE DISK IS TOO FULL TO KEEP A BUFFER" in out.stdout, out.stdout + out.stderr
    # Still room for the access log: decided and logged. (Granted, or no_footage when the one segment held
    # was replaced by the next between the publish and the decision: only the newest is kept.)
    s.request("disk-full-request-2")
    wait_for(lambda: s.log_entries("disk-full-request-2") or not s.alive(), 30, "the request on the access log")
    decided = s.log_entries("disk-full-request-2")
    assert decided[0] in (("decision", "granted"), ("decision", "no_footage")), decided

    # Now nothing at all can be written: a writer takes every byte that comes free.
    stop = threading.Event()
    taker = threading.Thread(target=take_every_byte, args=(s.data.parent / "greedy", stop), daemon=True)
    taker.start()
    try:
        wait_for(lambda: free_bytes(s.data) == 0, 10, "the disk to be completely full")
        time.sleep(1.0)  # the recorder's next segment runs into it too
        s.request("disk-full-request-3")
        # The inbox cannot store it, so it is not acknowledged: the broker keeps it, nothing is decided.
        wait_for(lambda: "inbox.sqlite (database or disk is full); retrying" in s.log_text() or not s.alive(), 30,
                 "the agent saying why it does not take the request")
        time.sleep(2.0)  # (a decision would have been logged within this time: see request 2)
        assert s.alive(), s.log_text()[-3000:]
        assert s.log_entries("disk-full-request-3") == [], "a request was decided without room to log it"
        out = s.cli("status")
        assert "THE DISK IS" in out.stdout, out.stdout + out.stderr
    finally:
        stop.set()
        taker.join(10)
    (s.data.parent / "greedy").unlink()
    (s.data.parent / "big-download").unlink()
    # Room again: the request the broker kept is taken and decided; recording goes back to normal.
    wait_for(lambda: s.log_entries("disk-full-request-3") or not s.alive(), 30, "request 3 decided after all")
    wait_for(lambda: "the disk has room again" in s.log_text() or not s.alive(), 30, "recording normally again")
    newest_segment_keeps_coming(s, 4)
    assert s.stop() == 0, s.log_text()[-3000:]
    finish(s)


def closing(s: Setup, jti: str) -> list[str]:
    return [o for _, o in s.log_entries(jti) if o in ("delivered", "delivery_failed", "delivery_refused")]


def take_every_byte(path: Path, stop: threading.Event) -> None:
    """Keep the filesystem at 0 bytes free until ``stop``."""
    with open(path, "wb", buffering=0) as f:
        while not stop.is_set():
            try:
                f.write(b"\0" * 4096)
            except OSError:
                time.sleep(0.01)


def finish(s: Setup) -> None:
    """After the SIGTERM: no traceback, the access log verifies, the index matches the files."""
    text = s.log_text()
    assert "Traceback" not in text, text
    out = s.cli("log", "verify")
    assert out.returncode == 0 and "intact" in out.stdout, out.stdout + out.stderr
    check_index_matches_disk(s)


def check_index_matches_disk(s: Setup) -> None:
    store = SegmentStore(s.data / "buffer.sqlite", s.data / "segments")
    try:
        held = {r.path for r in store.all()}
    finally:
        store.close()
    assert held == set(s.segments()), "the index and the files on disk disagree"
    assert not list((s.data / "segments").rglob("*.part"))
