"""The resident's kill switch: one small file that stops all sharing at once.

It is read on every decision and before every delivery chunk, so reading must
be cheap and must never say "off" by mistake. The rules:

- no file at all means off: the state of a fresh install;
- a file that is well-formed JSON ``{"v": 1, "engaged": bool, "since": RFC 3339 UTC,
  "by": text}`` and nothing else means what it says;
- anything else (unreadable, truncated, oversized, unexpected members or
  types) means ENGAGED, with a reason saying why: when in doubt, share nothing.

Writes go to a temporary file that is flushed to disk, renamed over the old
one and followed by an fsync of the directory, so a power cut leaves either
the old state or the new one, never half a file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.fsutil import write_atomically
from agent.timeutil import format_utc, parse_utc_z

UTC = UTC
MAX_FILE_BYTES = 4096
MAX_BY_CHARS = 200


@dataclass(frozen=True)
class KillSwitchState:
    engaged: bool
    since: datetime | None
    by: str | None
    reason: str
    """Why the agent believes this: shown to the homeowner and logged when it blocks sharing."""

    def to_json(self) -> dict[str, Any]:
        return {
            "engaged": self.engaged,
            "since": format_utc(self.since) if self.since else None,
            "by": self.by,
            "reason": self.reason,
        }


def _engaged_because(why: str) -> KillSwitchState:
    return KillSwitchState(engaged=True, since=None, by=None, reason=why)


def parse_state(data: bytes, path: Path) -> KillSwitchState:
    """Interpret the file's bytes; anything unexpected means engaged."""
    if len(data) > MAX_FILE_BYTES:
        return _engaged_because(f"kill-switch file {path} is larger than {MAX_FILE_BYTES} bytes; treated as engaged")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return _engaged_because(f"kill-switch file {path} is not valid JSON ({exc}); treated as engaged")
    if not isinstance(obj, dict):
        return _engaged_because(f"kill-switch file {path} does not hold a JSON object; treated as engaged")
    if set(obj) != {"v", "engaged", "since", "by"}:
        return _engaged_because(
            f"kill-switch file {path} has members {sorted(obj)}, expected exactly by, engaged, since, v; treated as engaged"
        )
    if obj["v"] != 1 or isinstance(obj["v"], bool):
        return _engaged_because(f"kill-switch file {path} has version {obj['v']!r}, expected 1; treated as engaged")
    engaged = obj["engaged"]
    if not isinstance(engaged, bool):
        return _engaged_because(f"kill-switch file {path}: 'engaged' is {engaged!r}, not true or false; treated as engaged")
    try:
        since = parse_utc_z(obj["since"])
    except ValueError:
        return _engaged_because(f"kill-switch file {path}: 'since' is {obj['since']!r}, not an RFC 3339 UTC time; treated as engaged")
    by = obj["by"]
    if not isinstance(by, str) or not by or len(by) > MAX_BY_CHARS:
        return _engaged_because(f"kill-switch file {path}: 'by' is not a short text; treated as engaged")
    verb = "engaged" if engaged else "released"
    return KillSwitchState(engaged=engaged, since=since, by=by, reason=f"{verb} by {by} at {format_utc(since)}")


class KillSwitch:
    """The kill switch kept in ``config.paths.killswitch_file``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def state(self) -> KillSwitchState:
        """Read the file now (a few microseconds); never raises, never blocks.

        The file is opened without following a symlink and without blocking, and
        must be a regular file: a FIFO would hang every reader, and a symlink could
        point the agent at a file someone else controls (or at nothing, which would
        read as "off"). Anything but a regular file counts as engaged.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return KillSwitchState(
                engaged=False, since=None, by=None, reason=f"no kill-switch file at {self.path} (never engaged): off"
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return _engaged_because(f"kill-switch file {self.path} is a symbolic link; treated as engaged")
            return _engaged_because(f"cannot read kill-switch file {self.path} ({exc.strerror or exc}); treated as engaged")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return _engaged_because(f"kill-switch file {self.path} is not a regular file; treated as engaged")
            data = os.read(fd, MAX_FILE_BYTES + 1)
        except OSError as exc:
            return _engaged_because(f"cannot read kill-switch file {self.path} ({exc.strerror or exc}); treated as engaged")
        finally:
            os.close(fd)
        return parse_state(data, self.path)

    @property
    def engaged(self) -> bool:
        return self.state().engaged

    def engage(self, by: str, now: datetime | None = None) -> KillSwitchState:
        return self.set(True, by=by, now=now)

    def release(self, by: str, now: datetime | None = None) -> KillSwitchState:
        return self.set(False, by=by, now=now)

    def set(self, engaged: bool, *, by: str, now: datetime | None = None) -> KillSwitchState:
        """Write the new state durably; raise OSError if it could not be written."""
        by = " ".join(str(by).split())[:MAX_BY_CHARS] or "unknown"
        when = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        body = json.dumps({"v": 1, "engaged": bool(engaged), "since": format_utc(when), "by": by}, sort_keys=True)
        write_atomically(self.path, (body + "\n").encode("utf-8"))
        return self.state()
