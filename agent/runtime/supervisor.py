"""``doorbell-agent run`` (record, and later serve requests) and ``doorbell-agent status``.

``run`` starts a list of components, each a function ``(cfg) -> Component``
returning something with ``stop()`` and ``wait(timeout)``. Recording is the
first; the network side is appended to :data:`COMPONENTS` (or passed to
:func:`run_components`) without touching the recorder.

Only one recorder may write a buffer: ``run`` holds an exclusive lock on
``<data_dir>/recorder.lock`` for as long as it records. ``status`` tests that
lock to tell "running" from "not running" without trusting a pid that may have
been reused, and also checks the status file's age.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.buffer.capture import Source
from agent.cli.common import add_json_flag, config_from, print_json
from agent.config import AgentConfig, CameraConfig
from agent.errors import UserError
from agent.buffer.recorder import Mask, Recorder, ScaledMask, now_us, read_status
from agent.buffer.segments import SegmentStore
from agent.timeutil import format_local, format_utc, from_us

log = logging.getLogger("agent.run")

LOCK_NAME = "recorder.lock"
# A status file older than this (or three status intervals, if longer) is stale.
STALE_AFTER_S = 15.0


class Component(Protocol):
    name: str

    def stop(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool:
        """True once the component has finished."""


# -- the recording component ------------------------------------------------------


def lock_path(cfg: AgentConfig) -> Path:
    return cfg.paths.data_dir / LOCK_NAME


def _take_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + 2.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            # `status` takes the lock for an instant to test it; anything longer is another recorder.
            if time.monotonic() > deadline:
                os.close(fd)
                raise UserError(
                    f"another doorbell-agent is already recording into {path.parent} "
                    "(stop it first, e.g. 'systemctl stop doorbell-agent'); two recorders must not share one buffer"
                ) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def recorder_running(cfg: AgentConfig) -> bool:
    """True if some process holds the recorder lock right now."""
    path = lock_path(cfg)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we may have taken
    return False


def make_camera(camera: CameraConfig) -> Source:
    """The configured camera (the capture factory picks raw frames whenever a mask is set)."""
    from agent.buffer.capture.factory import make_source

    return make_source(camera)


def make_mask(camera: CameraConfig) -> Mask | None:
    """The privacy mask, sized to whatever frames the camera really delivers."""
    if not camera.masks:
        return None
    from agent.buffer.masks import PrivacyMask

    PrivacyMask(camera.masks, camera.width, camera.height)  # check the polygons now, not at the first frame
    return ScaledMask(camera.masks, (camera.width, camera.height))


@dataclass
class RecordingHandle:
    """A running recorder; ``stop()`` finishes the segment being written."""

    recorder: Recorder
    store: SegmentStore
    lock_fd: int
    name: str = "recorder"

    def stop(self) -> None:
        self.recorder.stop()

    def wait(self, timeout: float | None = None) -> bool:
        done = self.recorder.wait(timeout)
        if done and self.lock_fd >= 0:
            self.store.close()
            os.close(self.lock_fd)
            self.lock_fd = -1
        return done


def start_recording(cfg: AgentConfig, *, source: Source | None = None) -> RecordingHandle:
    """Lock the buffer, repair its index, start recording in background threads."""
    fd = _take_lock(lock_path(cfg))
    try:
        store = SegmentStore.from_config(cfg)
        report = store.reconcile()
        for line in report.lines():
            log.info("buffer check: %s", line)
        if not report.changed:
            log.info("buffer check: index and files agree")
        cam = source or make_camera(cfg.camera)
        mask = make_mask(cfg.camera)
        rec = Recorder(cam, store, cfg.camera, cfg.buffer, status_file=cfg.paths.status_file, mask=mask)
        log.info("camera: %s%s", cam.describe(), f", {len(cfg.camera.masks)} privacy mask(s)" if mask else "")
        log.info("footage goes to %s, kept %g hours or up to %s, whichever is less",
                 cfg.paths.segments_dir, cfg.buffer.retention_hours, human_bytes(cfg.buffer.max_bytes))
        rec.start()
    except BaseException:
        os.close(fd)
        raise
    return RecordingHandle(rec, store, fd)


COMPONENTS: list[Callable[[AgentConfig], Component]] = [start_recording]


def run_components(cfg: AgentConfig, starters: Sequence[Callable[[AgentConfig], Component]],
                   stop: threading.Event | None = None) -> int:
    """Start every component; run until SIGTERM/SIGINT (or ``stop``) or one of them finishes; stop all."""
    stop = stop or threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, _frame: stop.set())
    handles: list[Component] = []
    try:
        for start in starters:
            handles.append(start(cfg))
        while not stop.wait(0.5):
            if any(h.wait(0) for h in handles):
                finished = [h.name for h in handles if h.wait(0)]
                log.warning("stopping because %s finished", ", ".join(finished))
                break
        log.info("stopping: finishing the segment being written")
    finally:
        for h in handles:
            h.stop()
        for h in handles:
            while not h.wait(1.0):
                log.info("waiting for %s to stop", h.name)
        for sig, old in previous.items():
            signal.signal(sig, old)
    errors = [h for h in handles if isinstance(h, RecordingHandle) and h.recorder.error is not None]
    for h in errors:
        log.error("recording stopped by an error: %s", h.recorder.error)
    return 1 if errors else 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    _log_to_stderr()
    log.info("doorbell-agent starting (pid %d)", os.getpid())
    starters = list(COMPONENTS)
    if cfg.policy is not None and cfg.mqtt is not None:
        from agent.sharing.service import start_service

        starters.append(start_service)
    else:
        log.info("no [policy] and [mqtt] in the configuration: recording only, footage never leaves this device")
    code = run_components(cfg, starters)
    log.info("stopped")
    return code


def _log_to_stderr() -> None:
    root = logging.getLogger("agent")
    if not any(getattr(h, "_doorbell", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler._doorbell = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if os.environ.get("DOORBELL_AGENT_DEBUG") else logging.INFO)


# -- status ------------------------------------------------------------------------


def gather_status(cfg: AgentConfig, now: int | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (the ``--json`` form)."""
    now = now if now is not None else now_us()
    running = recorder_running(cfg)
    st = read_status(cfg.paths.status_file)
    rec: dict[str, Any] = {"running": running, "stale": False, "status": st}
    if st is not None:
        age_s = (now - int(st.get("updated_us", 0))) / 1e6
        limit = max(STALE_AFTER_S, 3 * float(st.get("status_interval_s", 5.0)))
        rec["status_age_s"] = round(age_s, 1)
        rec["stale"] = running and age_s > limit
    buf: dict[str, Any] = {"segments": 0, "bytes": 0, "recorded_s": 0.0, "start": None, "end": None, "gaps": []}
    if cfg.paths.buffer_db.exists():
        store = SegmentStore(cfg.paths.buffer_db, cfg.paths.segments_dir, buffer=cfg.buffer)
        try:
            s = store.summary()
        finally:
            store.close()
        buf.update(
            segments=s.segments,
            bytes=s.total_bytes,
            recorded_s=round(s.recorded_us / 1e6, 3),
            start=format_utc(from_us(s.start_us), ms=True) if s.start_us is not None else None,
            end=format_utc(from_us(s.end_us), ms=True) if s.end_us is not None else None,
            gaps=[{"start": format_utc(from_us(g.start_us), ms=True), "end": format_utc(from_us(g.end_us), ms=True),
                   "seconds": round((g.end_us - g.start_us) / 1e6, 3), "reason": g.reason} for g in s.gaps],
        )
    from agent.sharing.service import sharing_status

    return {"recorder": rec, "buffer": buf, "sharing": sharing_status(cfg)}


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    data = gather_status(cfg)
    if args.json:
        print_json(data)
    else:
        print("\n".join(status_lines(data)))
    return 0


def status_lines(data: dict[str, Any]) -> list[str]:
    rec, buf, st = data["recorder"], data["buffer"], data["recorder"]["status"]
    out: list[str] = []
    if not rec["running"]:
        when = f" (last seen {_local_us(st['updated_us'])})" if st and st.get("updated_us") else ""
        out.append(f"Recorder: NOT RUNNING{when}. Start it with 'doorbell-agent run' "
                   "(or 'systemctl start doorbell-agent').")
    elif st is None:
        out.append("Recorder: running, but it has not reported its counters yet.")
    elif rec["stale"]:
        out.append(f"Recorder: running, but its status is STALE (last update {rec['status_age_s']:.0f} s ago "
                   f"at {_local_us(st['updated_us'])}); it may be stuck. Check its log.")
    else:
        out.append(f"Recorder: running (pid {st['pid']}), camera {st['camera_state']}.")
    if st:
        out.append(f"  Camera: {st['camera']}" + (f" ({st['mode']}, {st['codec']})" if st.get("mode") else ""))
        captured, dropped = st["frames_captured"], st["frames_dropped"]
        pct = 100.0 * dropped / captured if captured else 0.0
        out.append(f"  Frame rate: {st['fps']:.1f} fps; frames captured {captured}, dropped {dropped} ({pct:.2f}%); "
                   f"reconnects {st['reconnects']}")
        if st.get("last_error"):
            out.append(f"  Last problem: {st['last_error']} at {_local_us(st['last_error_us'])}")
    if buf["segments"] == 0:
        out.append("Footage: none stored yet.")
    else:
        out.append(f"Footage: {_local_z(buf['start'])} to {_local_z(buf['end'])}, "
                   f"{human_duration(buf['recorded_s'])} recorded, {buf['segments']} segments, {human_bytes(buf['bytes'])}.")
    if buf["gaps"]:
        out.append(f"Gaps ({len(buf['gaps'])}):")
        for g in buf["gaps"]:
            out.append(f"  {_local_z(g['start'])} to {_local_z(g['end'])} ({human_duration(g['seconds'])}): {g['reason']}")
    if "sharing" in data:
        from agent.sharing.service import sharing_lines

        out.extend(sharing_lines(data["sharing"]))
    return out


def _local_us(us: int) -> str:
    return format_local(from_us(int(us)))


def _local_z(text: str) -> str:
    from agent.timeutil import parse_utc_z

    return format_local(parse_utc_z(text))


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} TB"


def human_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m} min" if h else f"{m} min {sec} s"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="record the camera into the rolling buffer until stopped",
                       description="Record the camera into the rolling buffer until stopped (Ctrl-C or SIGTERM).")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="show what the recorder is doing and how much footage is held",
                       description="Show whether the recorder is running, its frame rate and dropped frames, "
                       "how much footage is held and any gaps.")
    add_json_flag(p)
    p.set_defaults(func=cmd_status)
