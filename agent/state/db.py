"""The one way this agent opens SQLite and runs a write transaction.

Every store (replay memory, access log, approvals, the buffer index) shares the same needs: WAL so
that the homeowner's CLI reads while the service writes, a busy timeout so two processes wait for
each other instead of failing half-way, and ``BEGIN IMMEDIATE`` so a writer takes the write lock
before it reads what it is about to extend (the access log's chain must never fork).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

BUSY_TIMEOUT_S = 15.0


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
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if page_size is not None:
            conn.execute(f"PRAGMA page_size = {int(page_size)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot put {path} in WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
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
