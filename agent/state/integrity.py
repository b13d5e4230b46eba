"""Start-up check of the databases under ``data_dir``: damaged or lost state stops sharing, not recording.

``run`` calls :func:`check_data_dir` before it upgrades or opens anything. What it decides, file by file:

- ``state.sqlite`` (access log, replay memory, approvals) and ``inbox.sqlite`` (requests the broker handed
  over): damaged means **no sharing** until the resident restores or moves the file aside. Starting an
  empty one instead would forget which requests were already seen and granted (a captured request could
  be granted twice) and would begin a new access log as if nothing had happened.
- ``state.sqlite`` missing, empty, or without a single signed checkpoint although the device key was
  pinned (``device-key.thumbprint``, written the first time the service started, which also signs a
  start checkpoint into the log): the agent ran before and its memory is gone. Same refusal.
- ``buffer.sqlite`` (the index of the footage files) is not evidence: everything in it is rebuilt from the
  segment files (:meth:`agent.buffer.segments.SegmentStore.reconcile` decodes each file before indexing it;
  only the reasons given for gaps are lost). A damaged index is moved aside, kept for inspection, and
  recording goes on.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from agent.errors import UserError
from agent.state.db import StateCorrupt, check_integrity, connect

log = logging.getLogger(__name__)

STATE_DB = "state.sqlite"
INBOX_DB = "inbox.sqlite"
BUFFER_DB = "buffer.sqlite"


@dataclass
class StateCheck:
    """What :func:`check_data_dir` found: files sharing must not start on, and buffer indexes set aside."""

    refused: dict[str, str] = field(default_factory=dict)  # file name -> why sharing is refused, for the resident
    set_aside: list[Path] = field(default_factory=list)

    @property
    def why(self) -> str:
        return "; ".join(self.refused.values())


def _probe(path: Path) -> None:
    """Open an existing file and run ``quick_check`` on it (even if this process checked it before);
    :class:`StateCorrupt` if damaged."""
    conn = connect(path)
    try:
        check_integrity(conn, path)
    finally:
        conn.close()


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Open ``path`` for reading only: ``status``, the page and the LED look, they never write or upgrade."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, isolation_level=None, check_same_thread=False)


def _probe_read_only(path: Path) -> None:
    """:func:`_probe` without writing: :class:`StateCorrupt` if damaged, ``sqlite3.Error`` if it cannot be read."""
    conn = _connect_read_only(path)
    try:
        check_integrity(conn, path)
    finally:
        conn.close()


class StateLost(UserError):
    """The agent ran before, and its access log and replay memory are gone: nothing is shared."""


def lost_message(path: Path, pin: Path, found: str) -> str:
    """Why sharing stops when ``path`` (state.sqlite) ``found`` (is missing, is empty...) after an earlier run."""
    return (f"{path} {found}, but this agent has run before (its device key is pinned in {pin}): the access log and "
            "the memory of requests already seen are gone, so nothing will be shared. Restore state.sqlite from your "
            "backup (README.md, 'Back up and restore'). If there is no backup and you accept starting a new, empty access log, "
            f"move {pin} aside as well, then start the agent again")


def _has_checkpoint(path: Path, *, read_only: bool = False) -> bool:
    conn = _connect_read_only(path) if read_only else connect(path)
    try:
        row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'access_log_checkpoints'").fetchone()
        return row is not None and conn.execute("SELECT 1 FROM access_log_checkpoints LIMIT 1").fetchone() is not None
    finally:
        conn.close()


def set_aside(path: Path, now: datetime | None = None) -> Path:
    """Rename ``path`` (and its ``-wal``/``-shm`` files) to ``<name>.damaged-<UTC time>``; return the new path."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("-wal", "-shm", ""):
        src = path.with_name(path.name + suffix)
        if src.exists():
            src.rename(target.with_name(target.name + suffix))
    return target


def sharing_refusals(data_dir: Path, *, read_only: bool = False) -> dict[str, str]:
    """Why sharing must not start on the state under ``data_dir``: file name -> the reason, for the resident.

    The state half of :func:`check_data_dir`. ``read_only=True`` (``status``, ``doctor``, the local page,
    the LED) opens nothing for writing; a file it cannot read at all (another user's, locked) is
    reported as unknown, which also means no sharing as far as the resident is told.
    """
    data_dir = Path(data_dir)
    probe = _probe_read_only if read_only else _probe
    refused: dict[str, str] = {}
    for name in (STATE_DB, INBOX_DB):
        path = data_dir / name
        if path.exists() and path.stat().st_size > 0:
            try:
                probe(path)
            except StateCorrupt as exc:
                refused[name] = str(exc)
            except sqlite3.Error as exc:  # not damage (connect() turns that into StateCorrupt): unreadable, locked
                refused[name] = f"{path} cannot be checked ({exc}), so whether it is intact is unknown"
    if STATE_DB not in refused:
        from agent.state.pin import PinError, pin_path, read_pin  # the pin module loads cryptography

        state, pin = data_dir / STATE_DB, pin_path(data_dir)
        try:
            pinned = pin.exists() and read_pin(pin) is not None
        except PinError:
            pinned = True  # a damaged pin is still a sign of an earlier run; the service refuses it by itself
        if pinned:
            if not state.exists():
                refused[STATE_DB] = lost_message(state, pin, "is missing")
            elif state.stat().st_size == 0:
                refused[STATE_DB] = lost_message(state, pin, "is empty")
            else:
                try:
                    if not _has_checkpoint(state, read_only=read_only):
                        refused[STATE_DB] = lost_message(state, pin, "holds no signed checkpoint")
                except sqlite3.DatabaseError as exc:
                    refused[STATE_DB] = str(StateCorrupt(state, str(exc)))
    return refused


def check_data_dir(data_dir: Path, *, sharing: bool = True, buffer: bool = True) -> StateCheck:
    """Check every database under ``data_dir`` (see the module's doc); never raises for a damaged file.

    ``sharing=False`` (a recording-only configuration) checks the buffer index only: what sharing needs
    is not used, and recording alone loads nothing of the sharing side (tests/test_imports.py).
    ``buffer=False`` leaves the buffer index alone: another process is recording into it.
    """
    data_dir = Path(data_dir)
    out = StateCheck()
    if sharing:
        out.refused.update(sharing_refusals(data_dir))
    index = data_dir / BUFFER_DB
    if buffer and index.exists() and index.stat().st_size > 0:
        try:
            _probe(index)
        except StateCorrupt as exc:
            moved = set_aside(index)
            out.set_aside.append(moved)
            log.warning("the buffer index was damaged (%s); kept it as %s and rebuilding the index from the footage files",
                        exc.detail, moved)
    for why in out.refused.values():
        log.error("sharing refused: %s", why)
    return out
