"""Format versions of the agent's databases, and upgrading them in place.

Each SQLite file under ``paths.data_dir`` records the format it is in as ``PRAGMA user_version``.
A file from before versions existed reads 0. Upgrades are steps ``(version, change)``: the change
turns a file of format ``version - 1`` into format ``version``. All pending steps of a file run in one
``BEGIN IMMEDIATE`` transaction together with the new ``user_version``, so a power cut leaves the
file either as it was or fully upgraded, and running the upgrade twice changes nothing.

A file whose format is newer than this code knows (the agent was downgraded) is refused, never
"fixed": this code could misread it, and sharing on misread state is exactly what must not happen.
``run`` upgrades (or refuses) before starting anything, ``doorbell-agent migrate`` does the same on
demand, and install.sh runs ``migrate`` after installing new code and before restarting the service.

Who registers steps: the module that owns a table. It defines ``MIGRATIONS``, a list of steps for the
file its tables live in, and is named for that file in :data:`OWNERS`. Versions count per file
(1, 2, 3, ... across all owners of the file; :func:`steps_for` refuses a gap or a clash). Version 1
is the format of 0.1.0, the first with versions (:data:`BASELINE`, no change).

A step must also be safe on a file that already has its change: the modules create a missing file
with their latest ``CREATE TABLE`` (still ``user_version`` 0 until the next upgrade runs). Adding a
column is the common case; :func:`agent.state.db.add_column` does it only if it is missing. E.g. in
``agent/state/approvals.py``::

    MIGRATIONS = [(2, add_column("pending_approvals", "decided_by", "TEXT"))]
"""

from __future__ import annotations

import importlib
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import UserError
from agent.state.db import connect, transaction

Change = str | Callable[[sqlite3.Connection], None]
Step = tuple[int, Change]

BASELINE: Step = (1, "")
"""Every file: the tables as 0.1.0 creates them. Nothing to change; it only gets its version recorded."""

OWNERS: dict[str, tuple[str, ...]] = {
    "state.sqlite": ("agent.state.accesslog", "agent.state.replay", "agent.state.approvals"),
    "inbox.sqlite": ("agent.state.inbox",),
    "buffer.sqlite": ("agent.buffer.segments",),
}
"""Each database file under ``paths.data_dir`` and the modules whose ``MIGRATIONS`` upgrade it."""


class NewerFormatError(UserError):
    """A database written by a newer doorbell-agent than this one."""


@dataclass(frozen=True)
class Upgrade:
    """What :func:`migrate_data_dir` found and did for one file."""

    name: str
    path: Path
    before: int | None  # None: the file does not exist yet (the agent creates it when it needs it)
    after: int | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def steps_for(name: str, owners: Sequence[str] | None = None) -> list[Step]:
    """The upgrade steps of database file ``name``, in order, from :data:`BASELINE` on."""
    steps: list[Step] = [BASELINE]
    for module in OWNERS[name] if owners is None else owners:
        steps.extend(getattr(importlib.import_module(module), "MIGRATIONS", ()))
    steps.sort(key=lambda s: s[0])
    versions = [v for v, _ in steps]
    if versions != list(range(1, len(steps) + 1)):
        raise RuntimeError(f"{name}: upgrade steps must be numbered 1, 2, 3, ... once each; they are {versions}")
    return steps


def latest(name: str) -> int:
    """The format this code writes for database file ``name``."""
    return len(steps_for(name))


def read_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _newer_message(path: Path, found: int, known: int) -> str:
    return (f"{path} is in format {found}, written by a newer doorbell-agent than this one (which knows formats up to "
            f"{known}). This version will not use it: it could misread it, so it neither records nor shares. "
            "Install the newer version again (re-run its install.sh), or restore this folder from a backup made "
            "with this version")


def upgrade_file(path: Path, steps: Sequence[Step]) -> tuple[int, int]:
    """Bring one existing database to the last of ``steps``; return (format before, format after).

    Raises :class:`NewerFormatError`, changing nothing, if the file is newer than ``steps`` know.
    """
    known = len(steps)
    conn = connect(path)
    try:
        with transaction(conn):  # BEGIN IMMEDIATE: no other writer sees a half-upgraded file
            found = read_version(conn)
            if found > known:
                raise NewerFormatError(_newer_message(path, found, known))
            for version, change in steps[found:]:
                if callable(change):
                    change(conn)
                elif change.strip():
                    for statement in change.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {int(version)}")
        return found, max(found, known)
    finally:
        conn.close()


def migrate_data_dir(data_dir: Path, owners: Mapping[str, Sequence[str]] | None = None) -> list[Upgrade]:
    """Upgrade every database under ``data_dir`` that is older than this code; refuse if any is newer.

    Every file is checked before any is changed, so a refusal leaves them all as they were.
    """
    owners = OWNERS if owners is None else owners
    # Only the owners of files that exist are imported: recording alone loads nothing of the sharing side.
    plans = {name: steps_for(name, modules) for name, modules in owners.items() if (Path(data_dir) / name).exists()}
    for name, steps in plans.items():
        path = Path(data_dir) / name
        found = peek_version(path)
        if found > len(steps):
            raise NewerFormatError(_newer_message(path, found, len(steps)))
    done: list[Upgrade] = []
    for name in owners:
        path = Path(data_dir) / name
        steps = plans.get(name, [])
        if not steps or not path.exists():
            done.append(Upgrade(name, path, None, None))
            continue
        try:
            before, after = upgrade_file(path, steps)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"upgrading {path} failed and changed nothing ({exc}); the agent will not use it until "
                            "it is upgraded: fix the cause and run 'doorbell-agent migrate' again") from None
        done.append(Upgrade(name, path, before, after))
    return done


def peek_version(path: Path) -> int:
    """The format of an existing file (a read; the file is already in WAL mode if the agent made it)."""
    try:
        conn = connect(path)
        try:
            return read_version(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise UserError(_unreadable_message(path, exc)) from None


def _unreadable_message(path: Path, exc: Exception) -> str:
    return (f"cannot read the format of {path} ({exc}); the agent will not use it until it is readable (run this as "
            "the agent's user, check the file belongs to it, or restore it from a backup)")
