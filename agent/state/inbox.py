"""The durable inbox: every incoming message that may be a valid request, on disk until it is decided.

Why it exists. The broker hands the agent requests at QoS 1, and before this inbox the
transport held them in a bounded in-memory queue that dropped (and acknowledged) what did not
fit. A flood of junk, or simply Mosquitto before 2.0.13 sending more than the Receive Maximum
it was asked for, then cost real requests. A request is now acknowledged to the broker only
once it is safe here, and nothing that may be a valid request is dropped until this inbox holds
its bound.

How it is used (see :mod:`agent.sharing.transport`):

- paho's network thread never touches it: it stages messages in memory;
- the transport's writer thread calls :meth:`Inbox.commit` with everything staged since its
  last call, **one transaction and one fsync per batch** (group commit), so thousands of
  messages a second cost a few hundred commits, and then sends their PUBACKs;
- the decision worker reads messages back in arrival order (:meth:`Inbox.after`) and, once a
  decision is durably recorded, has the message forgotten in the writer's next batch.

Its own database file (``inbox.sqlite``), so that its commits never wait for the access log's
write lock, nor the access log for a flood's commits. Bounded by a number of messages and of
payload bytes: :meth:`Inbox.commit` refuses what does not fit and the caller counts it.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.state.db import connect, create_schema, transaction

DEFAULT_MAX_MESSAGES = 100_000
"""About 30 s of a 5,000-per-second flood beyond what the worker decides meanwhile."""
DEFAULT_MAX_BYTES = 128 * 1024 * 1024
"""Payload bytes held at most (requests are at most 16 KiB; junk is usually far smaller)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, never reused (readers page by id)
    received_us INTEGER NOT NULL,                   -- when paho handed it over, µs since the epoch
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    qos         INTEGER NOT NULL,
    dup         INTEGER NOT NULL,
    retain      INTEGER NOT NULL,
    expiry_s    INTEGER                             -- Message Expiry Interval left, if the sender set one
)
"""


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """One message as it came off the wire; nothing in it is trusted. ``id`` is 0 until stored."""

    topic: str
    payload: bytes
    received_us: int
    qos: int = 1
    dup: bool = False
    retain: bool = False
    expiry_s: int | None = None
    id: int = 0


class Inbox:
    """Messages waiting for a decision, in ``path`` (SQLite, WAL, commits durable when they return).

    One writer (:meth:`commit`) and one reader (:meth:`after`) may run on different threads: each
    has its own connection, and WAL lets the reader go on while the writer commits.
    """

    def __init__(self, path: Path, *, max_messages: int = DEFAULT_MAX_MESSAGES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("the inbox must hold at least one message and one byte")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._writer = connect(self.path)  # synchronous=FULL: a message is acknowledged only once this returns
        self._reader = connect(self.path)
        with self._write_lock, transaction(self._writer) as conn:
            create_schema(conn, _SCHEMA)
            count, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM inbox").fetchone()
        self._count = int(count)
        self._bytes = int(size)
        self.commits = 0
        """Transactions so far: with group commit, far fewer than messages."""

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._writer.close()
            self._reader.close()

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- the writer's side

    def commit(self, new: Sequence[InboxMessage], done: Collection[int] = ()) -> list[int | None]:
        """In one transaction, forget the ``done`` ids and add ``new`` in order, as far as the bound allows.

        Returns each new message's id, or None for one that did not fit (the caller counts and drops
        it). Forgetting runs first, so the room it frees is used at once. Raises ``sqlite3.Error`` or
        ``OSError`` (a full or failing disk) with nothing changed.
        """
        ids: list[int | None] = []
        with self._write_lock, transaction(self._writer) as conn:
            count, size = self._count, self._bytes
            for mid in done:
                row = conn.execute("DELETE FROM inbox WHERE id = ? RETURNING LENGTH(payload)", (mid,)).fetchone()
                if row is not None:
                    count, size = count - 1, size - int(row[0])
            for m in new:
                if count + 1 > self.max_messages or size + len(m.payload) > self.max_bytes:
                    ids.append(None)
                    continue
                cur = conn.execute(
                    "INSERT INTO inbox (received_us, topic, payload, qos, dup, retain, expiry_s) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (m.received_us, m.topic, m.payload, m.qos, int(m.dup), int(m.retain), m.expiry_s),
                )
                ids.append(int(cur.lastrowid or 0))
                count, size = count + 1, size + len(m.payload)
        with self._stats_lock:  # only once the transaction committed
            self._count, self._bytes = count, size
            self.commits += 1
        return ids

    # ----- the reader's side

    def after(self, last_id: int, limit: int = 64) -> list[InboxMessage]:
        """Up to ``limit`` stored messages with an id above ``last_id``, oldest first."""
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT id, received_us, topic, payload, qos, dup, retain, expiry_s FROM inbox "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (last_id, limit),
            ).fetchall()
        return [
            InboxMessage(topic=t, payload=bytes(p), received_us=int(r), qos=int(q), dup=bool(d), retain=bool(rt),
                         expiry_s=None if e is None else int(e), id=int(i))
            for i, r, t, p, q, d, rt, e in rows
        ]

    # ----- for status

    @property
    def messages(self) -> int:
        with self._stats_lock:
            return self._count

    @property
    def bytes(self) -> int:
        with self._stats_lock:
            return self._bytes

    def status(self) -> dict[str, int | str]:
        with self._stats_lock:
            return {"path": str(self.path), "messages": self._count, "bytes": self._bytes,
                    "max_messages": self.max_messages, "max_bytes": self.max_bytes, "commits": self.commits}
