"""The ``run`` process: start the recorder and the sharing service, stop them together.

:func:`run_agent` starts a list of components, each a function
``(cfg) -> Component`` returning something with ``stop()`` and
``wait(timeout)``. Recording is the first; the network side is appended when
the configuration has ``[policy]`` and ``[mqtt]``. Other components are added
to :data:`COMPONENTS` (or passed to :func:`run_components`) without touching
the recorder.

Only one recorder may write a buffer: ``run`` holds an exclusive lock on
``<data_dir>/recorder.lock`` for as long as it records. ``status`` tests that
lock (:func:`recorder_running`) to tell "running" from "not running" without
trusting a pid that may have been reused, and also checks the status file's age.

Importing this module loads no video library: the recorder, the camera and the
mask are imported when recording starts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import AgentConfig, CameraConfig
from agent.errors import UserError
from agent.runtime.sdnotify import ServiceNotifier
from agent.runtime.status import human_bytes

if TYPE_CHECKING:
    from agent.buffer.capture import Source
    from agent.buffer.recorder import Mask, Recorder
    from agent.buffer.segments import SegmentStore

log = logging.getLogger("agent.run")

LOCK_NAME = "recorder.lock"


class Component(Protocol):
    name: str

    def stop(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool:
        """True once the component has finished."""


# -- the recorder lock -------------------------------------------------------------


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


# -- the recording component ------------------------------------------------------


def make_camera(camera: CameraConfig) -> Source:
    """The configured camera (the capture factory picks raw frames whenever a mask is set)."""
    from agent.buffer.capture.factory import make_source

    return make_source(camera)


def make_mask(camera: CameraConfig) -> Mask | None:
    """The privacy mask, sized to whatever frames the camera really delivers."""
    if not camera.masks:
        return None
    from agent.buffer.masks import PrivacyMask
    from agent.buffer.recorder import ScaledMask

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
    from agent.buffer.recorder import Recorder
    from agent.buffer.segments import SegmentStore

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


def components_for(cfg: AgentConfig, *, refuse_sharing: str | None = None) -> list[Callable[[AgentConfig], Component]]:
    """What ``run`` starts: :data:`COMPONENTS`, and the sharing service if the configuration asks for it
    and nothing (``refuse_sharing``: damaged or lost state, agent/state/integrity.py) stands against it."""
    starters = list(COMPONENTS)
    if refuse_sharing and cfg.policy is not None and cfg.mqtt is not None:
        log.error("recording only, NOT sharing: %s", refuse_sharing)
    elif cfg.policy is not None and cfg.mqtt is not None:
        from agent.sharing.service import start_service

        starters.append(start_service)
    else:
        log.info("no [policy] and [mqtt] in the configuration: recording only, footage never leaves this device")
    from agent.homeowner import homeowner_component, homeowner_configured  # light: gpiozero/paho load only if used

    if homeowner_configured(cfg):  # [gpio] pins, [home_assistant] or [notify]
        starters.append(homeowner_component)
    if cfg.web.enabled:  # the local page; one that cannot start logs why and recording goes on (agent/web)
        from agent.web import start_web_in_run

        starters.append(start_web_in_run)
    return starters


def run_components(cfg: AgentConfig, starters: Sequence[Callable[[AgentConfig], Component]],
                   stop: threading.Event | None = None) -> int:
    """Start every component; run until SIGTERM/SIGINT (or ``stop``) or one of them finishes; stop all."""
    stop = stop or threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, _frame: stop.set())
    handles: list[Component] = []
    notifier = ServiceNotifier()  # READY=1 / WATCHDOG=1 for the systemd unit; nothing outside systemd
    try:
        for start in starters:
            handles.append(start(cfg))
        while not stop.wait(0.5):
            notifier.poll(handles)
            if any(h.wait(0) for h in handles):
                finished = [h.name for h in handles if h.wait(0)]
                log.warning("stopping because %s finished", ", ".join(finished))
                break
        log.info("stopping: finishing the segment being written")
    finally:
        notifier.stopping()
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


PRIVATE_UMASK = 0o077
"""Everything ``run`` creates (data_dir, footage, databases, outbox, keys, status files) is the service user's alone."""


def make_data_dir_private(data_dir: Path) -> None:
    """Create ``data_dir`` 0700, or take group and other access away from one this user owns.

    Files made by earlier versions (0644) are then out of reach too: the folder is the gate.
    A folder owned by someone else is left alone (its owner chose); the agent only warns.
    """
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = data_dir.stat()
    if st.st_mode & 0o077 == 0:
        return
    if st.st_uid == os.geteuid():
        data_dir.chmod(st.st_mode & 0o700)
        log.info("made %s private to this user (it was mode %o)", data_dir, st.st_mode & 0o777)
    else:
        log.warning("%s is readable by others (mode %o) and not ours to change; footage and keys in it may be exposed",
                    data_dir, st.st_mode & 0o777)


def run_agent(cfg: AgentConfig) -> int:
    """The whole of ``doorbell-agent run`` after the configuration is loaded: 0 on a clean stop.

    Runs under umask 077 (restored on return, for callers in the same process): footage,
    databases, outbox files and data_dir itself are private even where the agent creates them,
    not only where install.sh did. Other commands keep the caller's umask, so a clip the
    resident saves with ``clip -o`` is theirs to read and delete.
    """
    old = os.umask(PRIVATE_UMASK)
    try:
        log.info("doorbell-agent starting (pid %d)", os.getpid())
        make_data_dir_private(cfg.paths.data_dir)
        # Stored data in an older format is upgraded first; data from a newer version stops the agent
        # here (agent/state/migrate.py): nothing records or shares on state it might misread.
        # Damaged or lost state stops sharing (not recording); a damaged buffer index is set aside and rebuilt.
        from agent.state.integrity import check_data_dir
        from agent.state.migrate import OWNERS, migrate_data_dir

        checked = check_data_dir(cfg.paths.data_dir, sharing=cfg.policy is not None and cfg.mqtt is not None,
                                 buffer=not recorder_running(cfg))  # never pull the index from under another recorder
        migrate_data_dir(cfg.paths.data_dir, {n: m for n, m in OWNERS.items() if n not in checked.refused})
        code = run_components(cfg, components_for(cfg, refuse_sharing=checked.why or None))
        log.info("stopped")
        return code
    finally:
        os.umask(old)
