"""The resident's access log: every decision on an authenticated request, tamper-evident.

Why it looks like this:

- **Append-only.** A request's later fate (the resident approves or declines
  it, the approval expires, the clip is delivered, the kill switch cuts the
  delivery) is a new entry that names the request's ``jti``; nothing is ever
  updated in place.
- **Hash chain.** Each entry's hash covers the previous hash, so editing,
  deleting, inserting or reordering an entry breaks every hash after it.
  The exact construction is in :data:`agent.state.logverify.CHAIN_DOC` (and docs/protocol.md) so an
  auditor can re-check a copy of the database without this code.
- **Signed checkpoints.** Anyone who can write the database can also
  recompute a hash chain; they cannot forge the device's Ed25519 signature.
  The device signs the chain head (seq, hash, time) every
  ``checkpoint_every`` entries, whenever an entry has waited an hour without
  one (:meth:`AccessLog.checkpoint_if_due`, called on every append and by the
  service's timer) and on demand. A checkpoint also catches a log cut short at
  the end.
- **Floods do not grow it.** Messages that fail before a signature is verified
  (``oversize``, ``malformed``, ``unknown_key``, ``bad_signature``) are only
  counted, per reason and per UTC hour.
- **Durable, shared.** SQLite in WAL mode with ``synchronous=FULL`` (an append
  is on disk when :meth:`AccessLog.append` returns); the agent appends while the
  homeowner's CLI reads; ``BEGIN IMMEDIATE`` serializes appends from
  different processes so the chain never forks.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol.jose import canonical_json, sign_compact
from agent.state.db import connect, transaction
from agent.state.devicekey import DeviceKey
from agent.state.logverify import (
    CHECKPOINT_TYP,
    GENESIS_HASH,
    LOG_ID,
    VerifyReport,
    chain_hash,
    verify_connection,
)
from agent.timeutil import format_utc, from_us, parse_utc_z, to_us

PRE_AUTH_REASONS = ("oversize", "malformed", "unknown_key", "bad_signature")
DECISION_REASONS = (
    "wrong_issuer", "oversight_required", "wrong_audience", "clock_unsynced", "key_not_valid",
    "not_yet_valid", "expired", "replayed", "kill_switch", "no_consent", "warrant_required",
    "radius_too_large", "outside_geofence", "window_too_long", "outside_consent", "no_footage",
    "rate_limited", "granted", "awaiting_resident",
)  # fmt: skip
EVENTS = ("approved", "declined_by_resident", "approval_expired", "delivered", "delivery_cut", "delivery_failed")
GRANT_OUTCOMES = ("granted", "approved")
MAX_ENTRY_BYTES = 16384
_DETAIL_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS access_log (
    seq       INTEGER PRIMARY KEY,   -- 1, 2, 3, ...; never reused
    at_us     INTEGER NOT NULL,      -- copy of the entry's "at", for queries
    type      TEXT NOT NULL,         -- 'decision' | 'event'
    jti       TEXT NOT NULL,
    iss       TEXT NOT NULL,
    outcome   TEXT NOT NULL,         -- a decision's reason code, or an event's name
    entry     TEXT NOT NULL,         -- canonical JSON, exactly the bytes hashed
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS access_log_iss_at ON access_log (iss, at_us);
CREATE INDEX IF NOT EXISTS access_log_jti ON access_log (jti);
CREATE INDEX IF NOT EXISTS access_log_at ON access_log (at_us);
CREATE TABLE IF NOT EXISTS access_log_checkpoints (
    id    INTEGER PRIMARY KEY,
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL,
    at_us INTEGER NOT NULL,
    kid   TEXT NOT NULL,
    jws   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS preauth_counters (
    hour   TEXT NOT NULL,               -- UTC hour, e.g. 2026-12-03T17:00:00Z
    reason TEXT NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (hour, reason)
) WITHOUT ROWID;
"""


class AccessLogError(Exception):
    """Bad input to the log (a bug in the caller), never a reason to crash the agent on a network message."""


def _utc_ms(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise AccessLogError("times must be timezone-aware")
    dt = dt.astimezone(UTC)
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


def _window(value: Any, name: str) -> dict[str, str] | None:
    """A window given as (start, end) datetimes, or as a {start, end} mapping of datetimes or RFC 3339 strings."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        start, end = value.get("start"), value.get("end")
    else:
        try:
            start, end = value
        except (TypeError, ValueError):
            raise AccessLogError(f"{name} must be (start, end) or {{start, end}}") from None
    out = {}
    for key, v in (("start", start), ("end", end)):
        if isinstance(v, datetime):
            if v.tzinfo is None:
                raise AccessLogError(f"{name}.{key} must be timezone-aware")
            out[key] = format_utc(v)
        elif isinstance(v, str):
            try:
                out[key] = format_utc(parse_utc_z(v))
            except ValueError:
                raise AccessLogError(f"{name}.{key} {v!r} is not an RFC 3339 UTC time") from None
        else:
            raise AccessLogError(f"{name}.{key} must be a datetime or an RFC 3339 string")
    return out


def _text(value: Any, name: str, limit: int = 512) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise AccessLogError(f"{name} must be a string of at most {limit} characters")
    return value


def _json_safe(value: Any, name: str) -> Any:
    if isinstance(value, datetime):
        return format_utc(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise AccessLogError(f"{name} is not a finite number")
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise AccessLogError(f"{name} has a value of type {type(value).__name__} that the log cannot record")


@dataclass(frozen=True)
class LogEntry:
    seq: int
    hash: str
    prev_hash: str
    at: datetime
    type: str
    jti: str
    iss: str
    outcome: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "prev_hash": self.prev_hash, "entry": self.data}


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    at: datetime
    kid: str
    jws: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "at": format_utc(self.at), "kid": self.kid, "jws": self.jws}


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AccessLog:
    """The access log in ``config.paths.state_db``.

    ``device_key`` is needed only to write checkpoints (the agent service has
    it); the homeowner's CLI opens the log without it to read and verify.
    """

    def __init__(
        self,
        path: Path,
        *,
        device_key: DeviceKey | None = None,
        checkpoint_every: int = 100,
        checkpoint_interval: timedelta = timedelta(hours=1),
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.path = Path(path)
        self.device_key = device_key
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._conn = connect(self.path)
        # Counters are not evidence, and a flood must not cost one fsync per message.
        self._counters = connect(self.path, synchronous="NORMAL")
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._counters.close()

    def __enter__(self) -> AccessLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def append(
        self,
        *,
        jti: str,
        iss: str,
        sub: str,
        case: str,
        purpose: str,
        area: Mapping[str, float],
        requested: Any,
        reason: str,
        kids: Iterable[str],
        granted: Any = None,
        bytes_shared: int | None = None,
        delivery_id: str | None = None,
        payload_sha256: str | None = None,
        basis: str | None = None,
        warrant: Mapping[str, str] | None = None,
        at: datetime | None = None,
    ) -> tuple[int, str]:
        """Record one decision on an authenticated request; return ``(seq, hash)`` for the manifest's ``log``.

        ``reason`` is the section-4 code (``granted`` and ``awaiting_resident``
        included). ``requested``/``granted`` are ``(start, end)`` or ``{start, end}``.
        ``payload_sha256`` (the whole message's, as the replay memory keeps it) lets the log alone
        tell a duplicate from a replay once the replay memory has forgotten the ``jti``; entries
        written before it was recorded simply lack the member.
        """
        reason = str(getattr(reason, "value", reason))
        if reason in PRE_AUTH_REASONS:
            raise AccessLogError(f"{reason!r} happens before authentication: count it with count_rejection(), do not log it")
        if reason not in DECISION_REASONS:
            raise AccessLogError(f"unknown reason code {reason!r}")
        decision = {"granted": "granted", "awaiting_resident": "awaiting_resident"}.get(reason, "refused")
        try:
            area_obj = {k: float(area[k]) for k in ("lat", "lon", "radius_m")}
        except (KeyError, TypeError, ValueError):
            raise AccessLogError("area must have numeric lat, lon and radius_m") from None
        if bytes_shared is not None and (type(bytes_shared) is not int or bytes_shared < 0):
            raise AccessLogError("bytes_shared must be a whole number of bytes")
        body: dict[str, Any] = {
            "type": "decision",
            "jti": _text(jti, "jti", 64),
            "iss": _text(iss, "iss", 64),
            "sub": _text(sub, "sub", 64),
            "case": _text(case, "case", 64),
            "purpose": _text(purpose, "purpose", 280),
            "basis": _text(basis, "basis", 16) if basis is not None else None,
            "warrant": _json_safe(dict(warrant), "warrant") if warrant is not None else None,
            "area": _json_safe(area_obj, "area"),
            "requested": _window(requested, "requested"),
            "decision": decision,
            "reason": reason,
            "granted": _window(granted, "granted"),
            "bytes": bytes_shared,
            "delivery_id": _text(delivery_id, "delivery_id", 64) if delivery_id is not None else None,
            "kids": sorted({_text(k, "kid", 256) for k in kids}),
        }
        if payload_sha256 is not None:
            if not re.fullmatch(r"[0-9a-f]{64}", payload_sha256):
                raise AccessLogError("payload_sha256 must be 64 lowercase hex digits")
            body["payload_sha256"] = payload_sha256
        return self._append(body, at=at, outcome=reason)

    def append_request(self, request: Any, *, reason: str, kids: Iterable[str], at: datetime | None = None, **extra: Any) -> tuple[int, str]:
        """:meth:`append` for an ``agent.protocol.request.FootageRequest``-shaped object."""
        warrant = getattr(request, "warrant", None)
        area = request.area
        return self.append(
            jti=request.jti, iss=request.iss, sub=request.sub, case=request.case, purpose=request.purpose,
            area={"lat": area.lat, "lon": area.lon, "radius_m": area.radius_m},
            requested=(request.window_start, request.window_end),
            basis=getattr(request, "basis", None),
            warrant={"ref": warrant.ref, "court": warrant.court} if warrant is not None else None,
            reason=reason, kids=kids, at=at, **extra,
        )  # fmt: skip

    def append_decision(self, decision: Any, *, at: datetime | None = None, **extra: Any) -> tuple[int, str]:
        """:meth:`append` for an ``agent.protocol.decision.Decision`` on an authenticated request."""
        if decision.request is None:
            raise AccessLogError(f"decision {decision.reason!r} has no authenticated request; count it with count_rejection()")
        return self.append_request(
            decision.request, reason=decision.reason, kids=decision.kids, granted=decision.granted, at=at,
            payload_sha256=getattr(decision, "payload_sha256", None), **extra
        )

    def append_event(self, jti: str, event: str, *, at: datetime | None = None, **details: Any) -> tuple[int, str]:
        """Record something that happened later to a logged request (approval, delivery, cut-off).

        The request must already have a decision entry; the event names it by
        ``jti`` and by that entry's ``seq`` (``ref_seq``).
        """
        event = str(getattr(event, "value", event))
        if event not in EVENTS:
            raise AccessLogError(f"unknown event {event!r}; one of {', '.join(EVENTS)}")
        for key in details:
            if not _DETAIL_KEY.match(key) or key in ("type", "jti", "iss", "event", "ref_seq", "seq", "at", "v"):
                raise AccessLogError(f"event detail name {key!r} is not allowed")
        body: dict[str, Any] = {"type": "event", "jti": _text(jti, "jti", 64), "event": event}
        body.update({k: _json_safe(v, k) for k, v in details.items()})
        if "granted" in body and body["granted"] is not None:
            body["granted"] = _window(details["granted"], "granted")
        return self._append(body, at=at, outcome=event, ref_jti=jti)

    def _append(self, body: dict[str, Any], *, at: datetime | None, outcome: str, ref_jti: str | None = None) -> tuple[int, str]:
        when = _utc_ms(at or self._clock())
        with self._lock, transaction(self._conn) as conn:
                if ref_jti is not None:
                    # The decision an event follows is the one that shared or held the request: a copy
                    # refused before it (step 12 lets the genuine copy through) or a replay after it is not.
                    ref = conn.execute(
                        "SELECT seq, iss FROM access_log WHERE jti = ? AND type = 'decision' "
                        "ORDER BY outcome IN ('granted', 'awaiting_resident') DESC, seq DESC LIMIT 1",
                        (ref_jti,),
                    ).fetchone()
                    if ref is None:
                        raise AccessLogError(f"no logged request with jti {ref_jti!r}; an event must follow its decision")
                    body["ref_seq"], body["iss"] = int(ref[0]), str(ref[1])
                head = conn.execute("SELECT seq, hash FROM access_log ORDER BY seq DESC LIMIT 1").fetchone()
                prev_seq, prev_hash = (int(head[0]), bytes.fromhex(head[1])) if head else (0, GENESIS_HASH)
                seq = prev_seq + 1
                entry = {**body, "v": 1, "seq": seq, "at": format_utc(when, ms=True)}
                data = canonical_json(entry)
                if len(data) > MAX_ENTRY_BYTES:
                    raise AccessLogError(f"log entry of {len(data)} bytes is larger than {MAX_ENTRY_BYTES}")
                digest = chain_hash(prev_hash, data)
                conn.execute(
                    "INSERT INTO access_log (seq, at_us, type, jti, iss, outcome, entry, prev_hash, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, to_us(when), entry["type"], entry["jti"], entry["iss"], outcome,
                     data.decode("utf-8"), prev_hash.hex(), digest.hex()),
                )  # fmt: skip
                self._checkpoint_if_due_locked(self._clock(), seq, digest)
        return seq, digest.hex()

    def count_rejection(self, reason: str, at: datetime | None = None, count: int = 1) -> None:
        """Count messages that failed before authentication (one row per reason per UTC hour).

        ``count`` lets a busy caller add up a burst in memory and write it once.
        """
        reason = str(getattr(reason, "value", reason))
        if reason not in PRE_AUTH_REASONS:
            raise AccessLogError(f"{reason!r} is not a pre-authentication reason; log it with append()")
        if type(count) is not int or count < 1:
            raise AccessLogError("count must be a whole number of messages, at least 1")
        hour = format_utc((at or self._clock()).astimezone(UTC).replace(minute=0, second=0, microsecond=0))
        with self._lock:
            self._counters.execute(
                "INSERT INTO preauth_counters (hour, reason, count) VALUES (?, ?, ?) "
                "ON CONFLICT (hour, reason) DO UPDATE SET count = count + excluded.count",
                (hour, reason, count),
            )

    # ------------------------------------------------------------- checkpoints

    def checkpoint(self, now: datetime | None = None) -> Checkpoint:
        """Sign the current head now (on demand)."""
        if self.device_key is None:
            raise AccessLogError("writing a checkpoint needs the device key")
        with self._lock, transaction(self._conn):
            seq, digest = self._head_locked()
            return self._write_checkpoint_locked(now or self._clock(), seq, digest)

    def checkpoint_if_due(self, now: datetime | None = None) -> Checkpoint | None:
        """For the service's timer: sign the head if an entry has waited ``checkpoint_interval``."""
        if self.device_key is None:
            return None
        with self._lock, transaction(self._conn):
            seq, digest = self._head_locked()
            return self._checkpoint_if_due_locked(now or self._clock(), seq, digest)

    def _head_locked(self) -> tuple[int, bytes]:
        head = self._conn.execute("SELECT seq, hash FROM access_log ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(head[0]), bytes.fromhex(head[1])) if head else (0, GENESIS_HASH)

    def _checkpoint_if_due_locked(self, now: datetime, seq: int, digest: bytes) -> Checkpoint | None:
        if self.device_key is None or seq == 0:
            return None
        row = self._conn.execute("SELECT MAX(seq) FROM access_log_checkpoints").fetchone()
        last = int(row[0]) if row and row[0] is not None else 0
        if seq <= last:
            return None
        due = seq - last >= self.checkpoint_every
        if not due:
            oldest = self._conn.execute("SELECT at_us FROM access_log WHERE seq = ?", (last + 1,)).fetchone()
            due = oldest is not None and from_us(int(oldest[0])) <= now - self.checkpoint_interval
        return self._write_checkpoint_locked(now, seq, digest) if due else None

    def _write_checkpoint_locked(self, now: datetime, seq: int, digest: bytes) -> Checkpoint:
        assert self.device_key is not None
        key = self.device_key
        when = _utc_ms(now)
        header = {"alg": "Ed25519", "kid": key.kid, "typ": CHECKPOINT_TYP}
        payload = {
            "v": 1, "log": LOG_ID, "seq": seq, "hash": digest.hex(),
            "iat": int(when.timestamp()), "at": format_utc(when, ms=True), "device": key.public_jwk(),
        }  # fmt: skip
        jws = sign_compact(header, payload, key)
        self._conn.execute(
            "INSERT INTO access_log_checkpoints (seq, hash, at_us, kid, jws) VALUES (?, ?, ?, ?, ?)",
            (seq, digest.hex(), to_us(when), key.kid, jws),
        )
        return Checkpoint(seq=seq, hash=digest.hex(), at=when, kid=key.kid, jws=jws)

    # ------------------------------------------------------------------ reading

    def last_at(self) -> datetime | None:
        """The time of the newest entry, or None for an empty log: a time the agent has already acted on."""
        with self._lock:
            row = self._conn.execute("SELECT MAX(at_us) FROM access_log").fetchone()
        return from_us(int(row[0])) if row and row[0] is not None else None

    def head(self) -> tuple[int, str]:
        with self._lock:
            seq, digest = self._head_locked()
        return seq, digest.hex()

    def grants_since(self, iss: str, since: datetime) -> int:
        """Grants to ``iss`` after ``since`` (strictly, as ``AgentState``): immediate grants plus the resident's approvals."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM access_log WHERE iss = ? AND at_us > ? AND outcome IN (?, ?)",
                (iss, to_us(since), *GRANT_OUTCOMES),
            ).fetchone()
        return int(row[0])

    def entries(self, since: datetime | None = None, *, jti: str | None = None, limit: int | None = None) -> list[LogEntry]:
        """Entries in order, optionally from ``since`` on and/or about one request."""
        sql = "SELECT seq, hash, prev_hash, at_us, type, jti, iss, outcome, entry FROM access_log WHERE 1=1"
        params: list[Any] = []
        if since is not None:
            sql += " AND at_us >= ?"
            params.append(to_us(since))
        if jti is not None:
            sql += " AND jti = ?"
            params.append(jti)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        out = []
        for seq, h, ph, at_us, typ, j, iss, outcome, entry in rows:
            try:
                data = json.loads(entry)
            except ValueError:
                data = {"unreadable": entry}
            out.append(LogEntry(int(seq), h, ph, from_us(int(at_us)), typ, j, iss, outcome, data))
        return out

    def checkpoints(self) -> list[Checkpoint]:
        with self._lock:
            rows = self._conn.execute("SELECT seq, hash, at_us, kid, jws FROM access_log_checkpoints ORDER BY seq, id").fetchall()
        return [Checkpoint(int(s), h, from_us(int(a)), k, j) for s, h, a, k, j in rows]

    def rejection_counts(self, since: datetime | None = None) -> list[dict[str, Any]]:
        """Pre-authentication failures per UTC hour and reason, oldest first."""
        sql = "SELECT hour, reason, count FROM preauth_counters"
        params: list[Any] = []
        if since is not None:
            sql += " WHERE hour >= ?"
            params.append(format_utc(since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)))
        with self._lock:
            rows = self._counters.execute(sql + " ORDER BY hour, reason", params).fetchall()
        return [{"hour": h, "reason": r, "count": int(c)} for h, r, c in rows]

    # ------------------------------------------------------------ verification

    def verify(self, device_public_key: DeviceKey | Ed25519PublicKey | Mapping[str, str] | None = None) -> VerifyReport:
        """Re-check the whole chain and every checkpoint; name the first bad entry (see :mod:`agent.state.logverify`)."""
        key = device_public_key.public if isinstance(device_public_key, DeviceKey) else device_public_key
        with self._lock, transaction(self._conn, write=False) as conn:
            # One snapshot of both tables; the service may keep appending meanwhile.
            return verify_connection(conn, key)
