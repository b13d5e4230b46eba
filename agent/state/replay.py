"""Replay memory: which request ids (``jti``) the agent has already seen.

The protocol (section 4, step 12) says a ``jti`` seen before with a different
payload is a replay, and one seen with the identical payload is a duplicate
copy (another geohash cell, a broker redelivery) to drop silently. That only
works if the memory survives a restart and lasts at least until the request's
``exp`` + 60 s (after that the request is ``expired`` anyway), so it lives in
SQLite (``config.paths.state_db``), WAL mode, ``synchronous=FULL``.

Only requests whose signatures verified may be remembered: otherwise anyone
could burn a real request's ``jti`` by sending garbage under it first.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from agent.state.db import connect, transaction

UTC = timezone.utc
KEEP_AFTER_EXP_S = 60
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replay_memory (
    jti            TEXT PRIMARY KEY,
    payload_sha256 TEXT NOT NULL,
    exp            INTEGER NOT NULL,  -- the request's exp, NumericDate
    keep_until     INTEGER NOT NULL,  -- exp + 60 s: not purged before this
    first_seen     INTEGER NOT NULL   -- NumericDate
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS replay_memory_keep_until ON replay_memory (keep_until);
"""


def _epoch(value: int | float | datetime) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("times must be timezone-aware")
        return int(value.timestamp())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a NumericDate or datetime, got {type(value).__name__}")
    return int(value)


class ReplayMemory:
    """``seen(jti)`` for the decision procedure; ``remember`` once a request is authenticated."""

    def __init__(self, path: Path, *, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = connect(self.path, synchronous=synchronous)
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ReplayMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def seen(self, jti: str) -> str | None:
        """The sha256 (lowercase hex) of the payload first seen with ``jti``, or None."""
        with self._lock:
            row = self._conn.execute("SELECT payload_sha256 FROM replay_memory WHERE jti = ?", (jti,)).fetchone()
        return row[0] if row else None

    def remember(self, jti: str, payload_sha256: str, exp: int | float | datetime, *, now: datetime | None = None) -> str:
        """Record ``jti`` unless already known; return the sha256 now on record for it.

        The first payload wins: a later, different payload under the same
        ``jti`` does not replace it. Compare the return value with your own
        hash to tell a fresh request (equal, and :meth:`seen` was None before)
        from a race with another copy.
        """
        if not isinstance(jti, str) or not jti:
            raise ValueError("jti must be a non-empty string")
        if not isinstance(payload_sha256, str) or not _SHA256_HEX.match(payload_sha256):
            raise ValueError("payload_sha256 must be 64 lowercase hex digits")
        exp_s = _epoch(exp)
        first = _epoch(now) if now else int(time.time())
        with self._lock, transaction(self._conn) as conn:
            conn.execute(
                "INSERT OR IGNORE INTO replay_memory (jti, payload_sha256, exp, keep_until, first_seen) "
                "VALUES (?, ?, ?, ?, ?)",
                (jti, payload_sha256, exp_s, exp_s + KEEP_AFTER_EXP_S, first),
            )
            row = conn.execute("SELECT payload_sha256 FROM replay_memory WHERE jti = ?", (jti,)).fetchone()
        return str(row[0])

    def purge(self, now: datetime | int | float | None = None) -> int:
        """Forget entries whose ``exp`` + 60 s has passed; return how many."""
        cutoff = _epoch(now) if now is not None else int(time.time())
        with self._lock, transaction(self._conn) as conn:
            cur = conn.execute("DELETE FROM replay_memory WHERE keep_until < ?", (cutoff,))
        return cur.rowcount

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM replay_memory").fetchone()[0])
