"""The one way this agent opens SQLite and runs a write transaction.

Every store (replay memory, access log, approvals, the buffer index) shares the same needs: WAL so
that the homeowner's CLI reads while the service writes, a busy timeout so two processes wait for
each other instead of failing half-way, and ``BEGIN IMMEDIATE`` so a writer takes the write lock
before it reads what it is about to extend (the access log's chain must never fork).

A damaged file is refused where it is opened (:class:`StateCorrupt`), never used or silently replaced:
an access log or replay memory that started again empty would forget what the agent has seen and done.
The first open of an existing file in a process runs ``PRAGMA quick_check`` (a read of every page: 0.08 s for
25 MB on the development machine); the content of the access log is checked by its hash chain (``log verify``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from agent.errors import UserError

BUSY_TIMEOUT_S = 15.0
_DAMAGED_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_checked: set[tuple[str, int, int]] = set()  # (path, inode, device) of files that passed quick_check in this process
_checked_lock = threading.Lock()


class StateCorrupt(UserError):
    """A database file is damaged: the agent will not read it, write it, or start a new one in its place."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = Path(path)
        self.detail = detail
        super().__init__(
            f"{path} is damaged ({detail}). The agent will not use it, and will not start an empty one in its place. "
            "Stop the agent, then restore this file from your backup (README.md, 'Back up and restore'); or move it aside "
            f"(mv {path} {path}.damaged) and read README.md, 'If a database is damaged', for what that loses"
        )


def is_damage(exc: BaseException) -> bool:
    """Whether an exception from sqlite3 means a damaged file (not a busy lock or a missing permission)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in _DAMAGED_CODES


def check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """``PRAGMA quick_check`` on an open connection; :class:`StateCorrupt` naming ``path`` unless it says ok."""
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            raise StateCorrupt(path, str(exc)) from None
        raise
    if rows != ["ok"]:
        raise StateCorrupt(path, "; ".join(rows)[:300])


def connect(
    path: Path,
    *,
    synchronous: Literal["FULL", "NORMAL"] = "FULL",
    page_size: int | None = None,
) -> sqlite3.Connection:
    """Open ``path`` (creating its folder) in WAL mode, autocommit, usable from any thread.

    ``synchronous="FULL"`` makes a commit durable when it returns (evidence: the access log, replay
    memory); ``"NORMAL"`` may lose the last commits in a power cut but never corrupts the file (counters,
    the buffer index, which start-up repair rebuilds). ``page_size`` only takes effect on a new file.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError("synchronous must be FULL or NORMAL")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if page_size is not None:
            conn.execute(f"PRAGMA page_size = {int(page_size)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot put {path} in WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        key = (str(path.resolve()), st.st_ino, st.st_dev) if st is not None and st.st_size > 0 else None
        if key is not None and key not in _checked:
            check_integrity(conn, path)
            with _checked_lock:
                _checked.add(key)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_damage(exc):  # "file is not a database", "database disk image is malformed"
            raise StateCorrupt(path, str(exc)) from None
        raise
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, *, write: bool = True) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (or a plain ``BEGIN`` read snapshot with ``write=False``), then COMMIT, or ROLLBACK on any error."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def create_schema(conn: sqlite3.Connection, schema: str) -> None:
    """Run ``CREATE ... IF NOT EXISTS`` statements inside the caller's transaction.

    Not ``executescript``: it would COMMIT the caller's ``BEGIN``.
    """
    for statement in schema.split(";"):
        if statement.strip():
            conn.execute(statement)


def add_column(table: str, column: str, declaration: str) -> Callable[[sqlite3.Connection], None]:
    """An upgrade step (agent/state/migrate.py) adding ``column`` to ``table`` unless it is already there.

    Unless: a file the code just created already has the column in its ``CREATE TABLE``. A file without
    the table yet is left alone too: its owner creates the table, with the column, when it first needs it.
    """
    for name in (table, column):
        if not name.isidentifier():
            raise ValueError(f"not a plain SQL name: {name!r}")

    def step(conn: sqlite3.Connection) -> None:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if have and column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    return step
