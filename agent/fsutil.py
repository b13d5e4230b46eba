"""Durable file writes: the kill switch, the trust store, keys and delivery jobs all need the same care.

A crash or power cut (a Pi's usual way to stop) must leave either the old
file or the new one, never half of each: write a temporary file beside the
target, fsync it, rename it over the target, fsync the directory.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Any


def is_disk_full(exc: BaseException) -> bool:
    """A write failed for want of space: ENOSPC/EDQUOT (PyAV's errors are OSErrors too) or SQLite's SQLITE_FULL."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc))


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o644, *, replace: bool = True, durable: bool = True) -> bool:
    """Write ``data`` to ``path`` all at once, and durably unless ``durable=False``.

    With ``replace=False`` an existing file is kept (returns False): two
    processes creating the same key file at once both end up using one key.
    ``durable=False`` skips the fsyncs for live state rewritten every few
    seconds (status files): a reader still never sees half a file, and an SD
    card is spared a flush it does not need.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return True


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` in one step so a reader never sees half a file. Not fsynced: it is live state."""
    write_atomically(path, json.dumps(data, sort_keys=True).encode("utf-8"), 0o644, durable=False)


def read_status(path: Path) -> dict[str, Any] | None:
    """The last status written to ``path``, or None if there is none (or it cannot be read)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError, PermissionError):
        return None
    return data if isinstance(data, dict) else None
