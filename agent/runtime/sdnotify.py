"""Telling systemd how ``run`` is doing: ``READY=1`` once it really works, ``WATCHDOG=1`` only while frames arrive.

The unit is ``Type=notify`` with ``WatchdogSec=`` (systemd/doorbell-agent.service). The protocol is one
datagram per message on the Unix socket named by ``$NOTIFY_SOCKET`` (see sd_notify(3)); without that
variable (a terminal, the tests) every call here does nothing.

:class:`ServiceNotifier` is polled by the supervisor's loop (every half second) with the running components:

* ``READY=1`` once the camera has delivered a frame, the trust store has been read, and the broker has
  acknowledged the subscription (or there is no sharing service: the agent only records). A broker that
  stays unreachable for :data:`BROKER_GRACE_S` after the camera works does not hold READY back for ever:
  recording must not be restarted in a loop because the network is down, so READY is sent with a STATUS
  line saying the broker is not connected (the agent keeps reconnecting on its own).
* ``WATCHDOG=1`` at half the watchdog interval, and only if the recorder counted new frames since the
  previous ping: a camera that stalls (or a capture thread that hangs) stops the pings, and systemd
  restarts the service after ``WatchdogSec``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger("agent.run")

BROKER_GRACE_S = 60.0
"""How long READY waits for the broker once the camera works (the unit's TimeoutStartSec is longer)."""


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; False if not under systemd or the send failed."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", message, exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None if systemd expects none from us."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    wpid = env.get("WATCHDOG_PID")
    if usec <= 0 or (wpid and wpid != str(os.getpid() if pid is None else pid)):
        return None
    return usec / 2 / 1_000_000


def frames_captured(handles: Sequence[Any]) -> int | None:
    """Frames counted by every recorder among ``handles``, or None if none of them records."""
    counts = [h.recorder.stats.frames_captured for h in handles if hasattr(h, "recorder")]
    return sum(counts) if counts else None


def sharing_ready(handle: Any) -> tuple[bool, str | None]:
    """(ready, problem) for a sharing service handle whose trust store was read: is its broker subscription acknowledged?"""
    trust = getattr(handle, "trust", None)
    transport = getattr(handle, "transport", None)
    if transport is not None and not getattr(transport, "ready", True):
        err = getattr(transport, "last_error", None)
        return False, f"broker not connected yet{f' ({err})' if err else ''}"
    if trust is not None and getattr(trust, "error", None):
        return True, f"trust store problem: {trust.error}"
    return True, None


class ServiceNotifier:
    """READY and WATCHDOG for ``run``; :meth:`poll` it with the running components."""

    def __init__(self, env: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic,
                 send: Callable[[str], bool] | None = None, broker_grace_s: float = BROKER_GRACE_S) -> None:
        env = dict(os.environ if env is None else env)
        self.enabled = bool(env.get("NOTIFY_SOCKET")) or send is not None
        self.interval = watchdog_interval(env)
        self._send = send or (lambda m: notify(m, env))
        self.clock = clock
        self.broker_grace_s = broker_grace_s
        self.ready = False
        self._camera_since: float | None = None
        self._pinged_frames: int | None = None
        self._pinged_at: float | None = None
        self._trust_read: set[int] = set()

    def poll(self, handles: Sequence[Any]) -> None:
        if not self.enabled:
            return
        now = self.clock()
        frames = frames_captured(handles)
        if not self.ready:
            self._try_ready(handles, frames, now)
        if self.interval is not None and frames is not None:
            due = self._pinged_at is None or now - self._pinged_at >= self.interval
            if due and (self._pinged_frames is None or frames > self._pinged_frames) and frames > 0:
                self._send("WATCHDOG=1")
                self._pinged_frames, self._pinged_at = frames, now
            elif due and self._pinged_frames is not None and frames <= self._pinged_frames:
                log.warning("no new camera frames for %.0f s; systemd restarts the service if none arrive",
                            now - self._pinged_at if self._pinged_at is not None else 0.0)
                self._pinged_at = now  # warn once per interval, never ping without progress

    def _try_ready(self, handles: Sequence[Any], frames: int | None, now: float) -> None:
        if frames is not None and frames == 0:
            return  # the camera has not delivered a frame yet
        if self._camera_since is None:
            self._camera_since = now
        problems: list[str] = []
        waiting = False
        for h in handles:
            if hasattr(h, "recorder"):
                continue
            if id(h) not in self._trust_read and getattr(h, "trust", None) is not None:
                h.trust.get()  # read the trust store now rather than at the first request (it is cached)
                self._trust_read.add(id(h))
            ok, problem = sharing_ready(h)
            waiting |= not ok
            if problem:
                problems.append(problem)
        if waiting and now - self._camera_since < self.broker_grace_s:
            return
        status = "recording" + (" and serving requests" if any(not hasattr(h, "recorder") for h in handles) else
                                " only (no sharing configured)")
        if problems:
            status += "; " + "; ".join(problems)
        self._send(f"READY=1\nSTATUS={status}")
        log.info("told systemd the agent is ready: %s", status)
        self.ready = True

    def stopping(self) -> None:
        if self.enabled:
            self._send("STOPPING=1")
