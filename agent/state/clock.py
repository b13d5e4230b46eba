"""Is the system clock known to be right? The agent refuses to share when it is not.

Every time check in the protocol (``iat``, ``exp``, key validity, consent
period, maximum age) is only as good as the clock. A Raspberry Pi has no
battery-backed clock: after a power cut it boots at the last saved time and
stays wrong until NTP answers. So "synchronized" is a fact we read from the
system, never something we assume:

- the kernel's NTP state (``adjtimex`` with ``modes = 0``, read-only, no
  privileges needed): the call returns ``TIME_ERROR`` (5) or sets
  ``STA_UNSYNC`` in ``status`` while no time daemon has disciplined the clock;
- systemd-timesyncd's flag file ``/run/systemd/timesync/synchronized``, which
  it creates once it has synchronized (timesyncd does not always clear
  ``STA_UNSYNC``).

Either one saying "synchronized" is enough. A machine with a real-time clock
and no network time can be declared synchronized by the resident with
``[clock] assume_synced = true`` (or ``DOORBELL_AGENT_CLOCK__ASSUME_SYNCED=true``).

Code that needs the time takes a :class:`ClockSource`, so tests hand it a
:class:`FixedClock` instead of patching the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")
TIME_ERROR = 5
STA_UNSYNC = 0x0040


@runtime_checkable
class ClockSource(Protocol):
    """Where the agent gets the time and whether that time can be trusted."""

    def now(self) -> datetime:
        """Timezone-aware UTC."""
        ...

    def synced(self) -> tuple[bool, str]:
        """``(True, why)`` only when the clock is known to be synchronized."""
        ...


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """``struct timex`` from <sys/timex.h> (Linux/glibc), with room to spare at the end.

    Fields are ``long`` where the kernel's are, so the layout follows the
    platform's ABI on both 64-bit and 32-bit ARM. Only ``status`` is read.
    """

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
        ("_slack", ctypes.c_char * 128),  # in case a libc's struct is larger than this one
    ]


_libc_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def _adjtimex_fn() -> Callable[[ctypes.c_void_p], int] | None:
    global _libc
    with _libc_lock:
        if _libc is None:
            name = ctypes.util.find_library("c") or "libc.so.6"
            _libc = ctypes.CDLL(name, use_errno=True)
    for symbol in ("ntp_adjtime", "adjtimex"):
        fn = getattr(_libc, symbol, None)
        if fn is not None:
            fn.argtypes = [ctypes.POINTER(_Timex)]
            fn.restype = ctypes.c_int
            return fn
    return None


def read_timex() -> tuple[int, _Timex]:
    """The kernel's NTP state, read-only: ``(return value, struct timex)``; raises OSError if it cannot be asked."""
    fn = _adjtimex_fn()
    if fn is None:
        raise OSError("the C library has no adjtimex/ntp_adjtime")
    tx = _Timex()
    tx.modes = 0  # read only
    return fn(ctypes.byref(tx)), tx  # type: ignore[arg-type]


def kernel_sync_state() -> tuple[bool, str]:
    """Ask the kernel (read-only) whether a time daemon has synchronized the clock."""
    try:
        ret, tx = read_timex()
    except OSError as exc:
        return False, f"cannot ask the kernel about the clock ({exc})"
    if ret == -1:
        err = ctypes.get_errno()
        return False, f"the kernel refused to report the clock state ({os.strerror(err)})"
    if ret == TIME_ERROR or tx.status & STA_UNSYNC:
        return False, (
            f"the kernel reports the clock as not synchronized "
            f"(state {ret}{' TIME_ERROR' if ret == TIME_ERROR else ''}, status 0x{tx.status & 0xFFFFFFFF:04x}"
            f"{' STA_UNSYNC' if tx.status & STA_UNSYNC else ''})"
        )
    return True, f"the kernel reports the clock as synchronized by a time daemon (maximum error {tx.maxerror} µs)"


def timesyncd_sync_state(flag: Path = TIMESYNCD_FLAG) -> tuple[bool, str]:
    try:
        flag.stat()
    except FileNotFoundError:
        return False, f"systemd-timesyncd has not synchronized ({flag} does not exist)"
    except OSError as exc:
        return False, f"cannot check systemd-timesyncd's flag {flag} ({exc.strerror})"
    return True, f"systemd-timesyncd has synchronized the clock ({flag} exists)"


class SystemClock:
    """The real clock, with the real synchronization checks."""

    def __init__(
        self,
        *,
        assume_synced: bool = False,
        timesync_flag: Path = TIMESYNCD_FLAG,
        kernel: Callable[[], tuple[bool, str]] = kernel_sync_state,
    ) -> None:
        self.assume_synced = assume_synced
        self.timesync_flag = timesync_flag
        self._kernel = kernel

    @classmethod
    def from_config(cls, config: object) -> SystemClock:
        """Honour ``[clock] assume_synced`` when the configuration has it."""
        section = getattr(config, "clock", None)
        return cls(assume_synced=bool(getattr(section, "assume_synced", False)))

    def now(self) -> datetime:
        return datetime.now(UTC)

    def synced(self) -> tuple[bool, str]:
        kernel_ok, kernel_why = self._kernel()
        if kernel_ok:
            return True, kernel_why
        flag_ok, flag_why = timesyncd_sync_state(self.timesync_flag)
        if flag_ok:
            return True, flag_why
        if self.assume_synced:
            return True, f"declared synchronized by the resident (clock.assume_synced); {kernel_why}"
        return False, f"{kernel_why}; {flag_why}"


class FixedClock:
    """A clock that says what it is told: for tests and the conformance runner."""

    def __init__(self, now: datetime, *, synced: bool = True, why: str | None = None) -> None:
        if now.tzinfo is None:
            raise ValueError("FixedClock needs a timezone-aware datetime")
        self._now = now.astimezone(UTC)
        self._synced = synced
        self._why = why or ("fixed clock, declared synchronized" if synced else "fixed clock, declared not synchronized")
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def synced(self) -> tuple[bool, str]:
        with self._lock:
            return self._synced, self._why

    def set(self, now: datetime) -> None:
        with self._lock:
            self._now = now.astimezone(UTC)

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now

    def set_synced(self, synced: bool, why: str | None = None) -> None:
        with self._lock:
            self._synced = synced
            self._why = why or ("fixed clock, declared synchronized" if synced else "fixed clock, declared not synchronized")
