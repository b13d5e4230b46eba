"""Replay memory: which request ids (``jti``) the agent has already seen.

The protocol (section 4, step 12) says a ``jti`` seen before with a different
payload is a replay, and one seen with the identical payload is a duplicate
copy (another geohash cell, a broker redelivery) to drop silently. That only
works if the memory survives a restart and lasts at least until the request's
``exp`` + 60 s (after that the request is ``expired`` anyway), so it lives in
SQLite (``config.paths.state_db``), WAL mode, ``synchronous=FULL``.

Only requests whose signatures verified may be remembered: otherwise anyone
could burn a real request's ``jti`` by sending garbage under it first.

Purging is safe only while the clock is right. A clock stepped forward (a bad
time server) would purge entries whose requests are still valid once the clock
comes back, and the same ``jti`` could then be granted twice. Two guards:

- the memory keeps a **high-water mark**, the latest time at which it remembered
  a ``jti`` or purged anything (:meth:`ReplayMemory.high_water`), durably; the
  service treats a clock that reads more than :data:`CLOCK_BACK_TOLERANCE_S`
  earlier than that as not synchronized (protocol step 8) until it has caught up,
  and purges only with that much margin; the running service also notes each minute the time of a
  synchronized clock into the mark (:meth:`ReplayMemory.note_time`), so a step back is noticed even
  after an hour without requests;
- the service also counts a ``jti`` as seen when the access log holds a decision
  that used it, so purging this table can never make a logged request new again.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from agent.state.db import connect, transaction

KEEP_AFTER_EXP_S = 60
CLOCK_BACK_TOLERANCE_S = 5
"""How far the clock may read behind the high-water mark and still count as right: NTP's own small
corrections; a step back larger than this stops sharing until real time passes the mark again."""
NOTE_EVERY_S = 60
"""How often the running service writes the time it has seen into the mark: a step back by more than this
(plus the tolerance) is noticed even when no request came; one small write a minute at most."""
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
CREATE TABLE IF NOT EXISTS replay_clock (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    high_water_us INTEGER NOT NULL  -- the latest time this memory acted on (remembered, purged), µs
);
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
        from a race with another copy. A given ``now`` also raises the
        high-water mark, in the same transaction.
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
            if now is not None:
                _raise_mark(conn, now)
        return str(row[0])

    def purge(self, now: datetime | int | float | None = None, *, margin_s: float = 0) -> int:
        """Forget entries whose ``exp`` + 60 s had passed ``margin_s`` before ``now``; return how many.

        A purge that forgets anything raises the high-water mark to ``now`` in the same transaction,
        so a clock that later reads earlier is noticed (see the module's doc). With ``margin_s`` at
        least the tolerance the service allows a clock that went back, nothing purged can ever be
        valid again at a time the service accepts.
        """
        at = _epoch(now) if now is not None else time.time()
        with self._lock, transaction(self._conn) as conn:
            cur = conn.execute("DELETE FROM replay_memory WHERE keep_until < ?", (int(at - margin_s),))
            if cur.rowcount:
                _raise_mark(conn, at)
        return cur.rowcount

    def note_time(self, now: datetime, *, every_s: float = NOTE_EVERY_S) -> bool:
        """Raise the high-water mark to ``now`` if it trails it by ``every_s`` or more; return whether it wrote.

        Only for a clock known to be synchronized (the caller checks): a clock far ahead would otherwise
        set a mark that stops sharing until real time reaches it.
        """
        mark = self.high_water()
        if mark is not None and (now - mark).total_seconds() < every_s:
            return False
        with self._lock, transaction(self._conn) as conn:
            _raise_mark(conn, now)
        return True

    def high_water(self) -> datetime | None:
        """The latest time this memory remembered a jti at or purged at, or None if it never did."""
        with self._lock:
            row = self._conn.execute("SELECT high_water_us FROM replay_clock WHERE id = 1").fetchone()
        return datetime.fromtimestamp(row[0] / 1e6, UTC) if row else None

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM replay_memory").fetchone()[0])


def _raise_mark(conn: sqlite3.Connection, at: datetime | int | float) -> None:
    """Move the high-water mark up to ``at`` (never down), inside the caller's transaction."""
    us = round(at.timestamp() * 1e6) if isinstance(at, datetime) else round(float(at) * 1e6)
    conn.execute(
        "INSERT INTO replay_clock (id, high_water_us) VALUES (1, ?) "
        "ON CONFLICT (id) DO UPDATE SET high_water_us = MAX(high_water_us, excluded.high_water_us)",
        (us,),
    )
