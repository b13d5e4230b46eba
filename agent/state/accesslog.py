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
- **Signed checkpoints, chained.** Anyone who can write the database can also
  recompute a hash chain; they cannot forge the device's Ed25519 signature.
  The device signs the chain head (seq, hash, time) at every grant, every
  ``checkpoint_every`` entries, whenever an entry has waited an hour without
  one, at the service's start and clean shutdown, at least hourly while the
  service runs (:meth:`AccessLog.checkpoint_if_due`, called on every append and
  by the service's timer), after each of the resident's own changes and on
  demand. Each checkpoint names the one before it (``prev``), so deleting one
  from the middle shows; the start and shutdown checkpoints and the hourly
  heartbeat make a log cut at its end show too (see :class:`~agent.state.logverify.TailRules`).
- **The resident's changes are entries.** The kill switch, the trust store and
  the rules (:meth:`AccessLog.append_rule_change`, :meth:`AccessLog.service_started`)
  are recorded in the same chain as the agencies' requests (``type: "resident"``).
- **A running agent notices a cut.** The writer remembers how far the log went
  and which checkpoint it last wrote; if either is gone from the database, the
  next checkpoint says so, signed (``lost``).
- **Floods do not grow it.** Messages that fail before a signature is verified
  (``oversize``, ``malformed``, ``unknown_key``, ``bad_signature``) are only
  counted, per reason and per UTC hour. Signed messages cannot be forged, but
  a captured one can be re-sent for ever, re-serialized or after it expired:
  a request gets at most one entry per reason, further copies are counted on
  that entry; and an agency's refusals beyond
  :data:`REFUSALS_LISTED_PER_AGENCY_PER_HOUR` in an hour are counted, not
  listed (:meth:`AccessLog.record_refusal`). Counters live in tables of their
  own, outside the chain: no entry is ever updated.
- **Durable, shared.** SQLite in WAL mode with ``synchronous=FULL`` (an append
  is on disk when :meth:`AccessLog.append` returns); the agent appends while the
  homeowner's CLI reads; ``BEGIN IMMEDIATE`` serializes appends from
  different processes so the chain never forks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from agent.display import spreadsheet_cell
from agent.protocol.jose import JwsError, canonical_json, parse_compact, sign_compact
from agent.state.db import connect, transaction
from agent.state.devicekey import DeviceKey
from agent.state.logverify import (
    CHECKPOINT_TYP,
    CHECKPOINT_VERSION,
    GENESIS_HASH,
    HEARTBEAT,
    LOG_ID,
    TailRules,
    VerifyReport,
    bundle_checkpoint_line,
    bundle_entry_line,
    bundle_header_line,
    chain_hash,
    checkpoint_digest,
    verify_connection,
)
from agent.state.pin import ensure_pin, pin_path, read_pin
from agent.state.replay import CLOCK_BACK_TOLERANCE_S, KEEP_AFTER_EXP_S
from agent.timeutil import format_utc, from_us, parse_utc_z, to_us

log = logging.getLogger(__name__)

PRE_AUTH_REASONS = ("oversize", "malformed", "unknown_key", "bad_signature")
DECISION_REASONS = (
    "wrong_issuer", "oversight_required", "wrong_audience", "clock_unsynced", "key_not_valid",
    "not_yet_valid", "expired", "replayed", "kill_switch", "no_consent", "warrant_required",
    "radius_too_large", "outside_geofence", "window_too_long", "outside_consent", "no_footage",
    "rate_limited", "granted", "awaiting_resident",
)  # fmt: skip
EVENTS = ("approved", "declined_by_resident", "approval_expired", "delivered", "delivery_cut", "delivery_failed",
          "delivery_refused")
GRANT_OUTCOMES = ("granted", "approved")
REFUSALS_LISTED_PER_AGENCY_PER_HOUR = 100
"""Authenticated refusals the log lists per agency and UTC hour (:meth:`AccessLog.record_refusal`); the rest
are counted. Far more than an agency's honest mistakes in an hour, and it holds what a stolen or misused key
can add to 2,400 entries a day. Grants, held requests and events are never limited."""
RULE_CHANGES = (
    "killswitch_on", "killswitch_off", "trust_added", "trust_revoked", "trust_restored", "rules_changed",
    "rules_recorded", "approval_answered", "consent_changed", "consent_withdrawn", "consent_resumed", "buffer_wiped",
)  # fmt: skip
"""What :meth:`AccessLog.append_rule_change` records: the resident's own changes to what may be shared."""
_RESERVED = ("type", "jti", "iss", "event", "ref_seq", "seq", "at", "v", "change", "by")
MAX_ENTRY_BYTES = 16384
_DETAIL_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS access_log (
    seq       INTEGER PRIMARY KEY,   -- 1, 2, 3, ...; never reused
    at_us     INTEGER NOT NULL,      -- copy of the entry's "at", for queries
    type      TEXT NOT NULL,         -- 'decision' | 'event' | 'resident'
    jti       TEXT NOT NULL,         -- '' for the resident's own changes
    iss       TEXT NOT NULL,         -- '' for the resident's own changes
    outcome   TEXT NOT NULL,         -- a decision's reason code, an event's name, a resident change
    entry     TEXT NOT NULL,         -- canonical JSON, exactly the bytes hashed
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS access_log_iss_at ON access_log (iss, at_us);
CREATE INDEX IF NOT EXISTS access_log_jti ON access_log (jti);
CREATE INDEX IF NOT EXISTS access_log_at ON access_log (at_us);
-- Step 21 on every decision: the grants alone, so the query never walks an agency's refusals.
CREATE INDEX IF NOT EXISTS access_log_grants ON access_log (iss, at_us) WHERE outcome IN ('granted', 'approved');
CREATE TABLE IF NOT EXISTS access_log_checkpoints (
    id    INTEGER PRIMARY KEY,          -- the order they were signed in: the order of their prev chain
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
CREATE TABLE IF NOT EXISTS copy_counters (  -- not evidence: further copies of a request the log lists with that reason
    jti     TEXT NOT NULL,
    reason  TEXT NOT NULL,
    count   INTEGER NOT NULL,
    last_us INTEGER NOT NULL,           -- when the newest copy was counted
    PRIMARY KEY (jti, reason)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS copy_counters_last ON copy_counters (last_us);
CREATE TABLE IF NOT EXISTS refusal_counters (  -- not evidence: authenticated refusals per UTC hour and agency
    hour     TEXT NOT NULL,             -- UTC hour, e.g. 2026-12-03T17:00:00Z
    iss      TEXT NOT NULL,             -- the agency whose key signed
    reason   TEXT NOT NULL,
    listed   INTEGER NOT NULL,          -- written to the log (counted in the entry's own transaction)
    unlisted INTEGER NOT NULL,          -- over the hourly limit: only counted here
    PRIMARY KEY (hour, iss, reason)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unlisted_decisions (  -- not evidence: refusals over the limit that used up their jti
    jti        TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    keep_until INTEGER NOT NULL         -- the request's exp + 60 s, NumericDate; forgotten after that
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS unlisted_decisions_keep_until ON unlisted_decisions (keep_until);
CREATE TABLE IF NOT EXISTS resident_rules (  -- not evidence: what the rules were, to notice a change at start-up
    name   TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    rules  TEXT NOT NULL,
    at_us  INTEGER NOT NULL
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
    reason: str | None = None
    id: int | None = None  # its row in access_log_checkpoints: the order it was signed in

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "at": format_utc(self.at), "kid": self.kid, "jws": self.jws,
                "reason": self.reason}


def _claims_unverified(jws: str) -> dict[str, Any]:
    """A checkpoint's payload as written, without checking it: the writer reading back its own rows."""
    try:
        return parse_compact(jws, typ=CHECKPOINT_TYP).claims
    except (JwsError, ValueError):
        return {}


def _utcnow() -> datetime:
    return datetime.now(UTC)


def decision_body(
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
) -> dict[str, Any]:
    """A decision entry's members, checked (see :meth:`AccessLog.append`); ``seq``, ``at`` and ``v`` come at append.

    Apart from appending: :meth:`AccessLog.record_refusal` checks the entry before it knows whether to list
    it, and the benchmark of deciding on a big log (tests/bench/bench_decide_log.py) builds its log with it.
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
    return body


def _request_fields(request: Any) -> dict[str, Any]:
    """A ``FootageRequest``-shaped object's members, as :func:`decision_body` takes them."""
    warrant = getattr(request, "warrant", None)
    area = request.area
    return {
        "jti": request.jti, "iss": request.iss, "sub": request.sub, "case": request.case, "purpose": request.purpose,
        "area": {"lat": area.lat, "lon": area.lon, "radius_m": area.radius_m},
        "requested": (request.window_start, request.window_end), "basis": getattr(request, "basis", None),
        "warrant": {"ref": warrant.ref, "court": warrant.court} if warrant is not None else None,
    }  # fmt: skip


def _hour(at: datetime) -> str:
    """The UTC hour ``at`` falls in, as the counters key it: ``2026-12-03T17:00:00Z``."""
    return format_utc(at.astimezone(UTC).replace(minute=0, second=0, microsecond=0))


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
        # What this process has seen of the log: the head seq and the last checkpoint (id, digest). The log
        # only grows; if either shrinks under a running agent, the next checkpoint says so (``lost``).
        self._known_head = 0
        self._known_cp: tuple[int, str] | None = None
        self._heartbeat: timedelta | None = None  # set by service_started(): the running service's proof of life
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
        body = decision_body(
            jti=jti, iss=iss, sub=sub, case=case, purpose=purpose, area=area, requested=requested, reason=reason,
            kids=kids, granted=granted, bytes_shared=bytes_shared, delivery_id=delivery_id,
            payload_sha256=payload_sha256, basis=basis, warrant=warrant,
        )  # fmt: skip
        return self._append(body, at=at, outcome=body["reason"])

    def append_request(self, request: Any, *, reason: str, kids: Iterable[str], at: datetime | None = None, **extra: Any) -> tuple[int, str]:
        """:meth:`append` for an ``agent.protocol.request.FootageRequest``-shaped object."""
        return self.append(**_request_fields(request), reason=reason, kids=kids, at=at, **extra)

    def append_decision(self, decision: Any, *, at: datetime | None = None, **extra: Any) -> tuple[int, str]:
        """:meth:`append` for an ``agent.protocol.decision.Decision`` on an authenticated request."""
        if decision.request is None:
            raise AccessLogError(f"decision {decision.reason!r} has no authenticated request; count it with count_rejection()")
        return self.append_request(
            decision.request, reason=decision.reason, kids=decision.kids, granted=decision.granted, at=at,
            payload_sha256=getattr(decision, "payload_sha256", None), **extra
        )

    def record_refusal(self, decision: Any, *, at: datetime | None = None, agency: str | None = None) -> tuple[int, str] | None:
        """Record an authenticated refusal as an entry, or only count it; ``(seq, hash)`` when it was listed.

        Why not always an entry: anyone who can publish on the request topics can re-send a captured
        request's signed bytes, re-serialized into ever new bytes (each one ``replayed``) or after its
        ``exp`` (each one ``expired``), and anyone holding a trusted key can sign any number of
        requests the resident's rules refuse. Each entry costs an fsync and a row kept for good, and
        the decision's own queries run over those rows. So (docs/protocol.md section 6):

        - a request (``jti``) gets at most one entry per reason: a further copy refused for a reason
          its ``jti`` already has an entry for is counted on that entry (``copy_counters``, read
          back by :meth:`more_copies`);
        - at most :data:`REFUSALS_LISTED_PER_AGENCY_PER_HOUR` refusals per agency and UTC hour are listed;
          the rest are counted per hour, agency and reason (``refusal_counters``, :meth:`refusals_not_listed`).

        Step 12 is untouched: a refusal by checks 5 to 11 does not use up the jti, so a genuine copy
        arriving after it is still decided and listed, under its own reason. A refusal over the limit
        that did use up the jti (checks 12 to 21) is remembered in ``unlisted_decisions`` until
        ``exp`` + 60 s, so an identical copy stays a duplicate (:meth:`decided_unlisted`) and is
        never decided afresh. Grants, held requests and events never come here: they are always listed.

        ``agency`` is the agency whose key signed: the claim ``iss`` unless the refusal is
        ``wrong_issuer``, where the claim is the very thing that is wrong (the caller passes the
        signing key's ``iss``), so that no one can spread refusals over invented agency names.
        Counters are not evidence: they live outside the chain, on the ``synchronous=NORMAL``
        connection (no fsync), except that a listed refusal is counted in its entry's own transaction.
        """
        req = decision.request
        if req is None:
            raise AccessLogError(f"decision {decision.reason!r} has no authenticated request; count it with count_rejection()")
        reason = str(getattr(decision.reason, "value", decision.reason))
        if reason in ("granted", "awaiting_resident"):
            raise AccessLogError(f"{reason!r} is not a refusal: it is always listed (append_decision)")
        body = decision_body(**_request_fields(req), reason=reason, kids=decision.kids,
                             payload_sha256=getattr(decision, "payload_sha256", None))
        when = _utc_ms(at or self._clock())
        hour, agency = _hour(when), _text(agency if agency is not None else req.iss, "agency", 64)
        with self._lock:
            listed = self._conn.execute(
                "SELECT 1 FROM access_log WHERE jti = ? AND outcome = ? AND type = 'decision' LIMIT 1", (req.jti, reason),
            ).fetchone()
            if listed is not None:
                self._counters.execute(
                    "INSERT INTO copy_counters (jti, reason, count, last_us) VALUES (?, ?, 1, ?) "
                    "ON CONFLICT (jti, reason) DO UPDATE SET count = count + 1, last_us = MAX(last_us, excluded.last_us)",
                    (req.jti, reason, to_us(when)),
                )
                return None
            row = self._counters.execute(
                "SELECT COALESCE(SUM(listed), 0) FROM refusal_counters WHERE hour = ? AND iss = ?", (hour, agency),
            ).fetchone()
            if int(row[0]) < REFUSALS_LISTED_PER_AGENCY_PER_HOUR:
                return self._append_locked(body, when=when, outcome=reason, listed_under=(hour, agency))
            with transaction(self._counters) as conn:
                conn.execute(
                    "INSERT INTO refusal_counters (hour, iss, reason, listed, unlisted) VALUES (?, ?, ?, 0, 1) "
                    "ON CONFLICT (hour, iss, reason) DO UPDATE SET unlisted = unlisted + 1",
                    (hour, agency, reason),
                )
                if decision.uses_jti:
                    # With the replay memory's margin: nothing forgotten here can be valid again at a time
                    # the service accepts (it has just raised the replay memory's high-water mark to `when`).
                    conn.execute("DELETE FROM unlisted_decisions WHERE keep_until < ?",
                                 (int(when.timestamp()) - CLOCK_BACK_TOLERANCE_S,))
                    conn.execute(
                        "INSERT OR IGNORE INTO unlisted_decisions (jti, reason, keep_until) VALUES (?, ?, ?)",
                        (req.jti, reason, int(req.exp) + KEEP_AFTER_EXP_S),
                    )
        return None

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

    def append_rule_change(
        self, what: str, *, by: str, details: Mapping[str, Any] | None = None, at: datetime | None = None
    ) -> tuple[int, str]:
        """Record one of the resident's own changes to what may be shared; return ``(seq, hash)``.

        ``what`` is one of :data:`RULE_CHANGES` (``killswitch_on``/``off``, ``trust_added``/``revoked``/``restored``,
        ``rules_changed``, ``approval_answered``); ``by`` says who, in words (e.g. "homeowner (command line, user
        pi on doorbell)"); ``details`` are short facts in plain JSON (for trust: ``kids``, ``issuer``, ``file``).
        The entry is ``type: "resident"``; its ``jti`` and ``iss`` columns are empty, so no query about agencies
        or requests ever counts it. With the device key the log is signed right after (reason ``rule``), so the
        change is covered at once.
        """
        what = str(getattr(what, "value", what))
        if what not in RULE_CHANGES:
            raise AccessLogError(f"unknown resident change {what!r}; one of {', '.join(RULE_CHANGES)}")
        body: dict[str, Any] = {"type": "resident", "change": what, "by": _text(by, "by", 200)}
        for key, value in (details or {}).items():
            if not _DETAIL_KEY.match(str(key)) or key in _RESERVED:
                hint = " (name an agency 'issuer' and a request 'request')" if key in ("iss", "jti") else ""
                raise AccessLogError(f"resident change detail name {key!r} is not allowed{hint}")
            body[str(key)] = _json_safe(value, str(key))
        return self._append(body, at=at, outcome=what)

    def _append(self, body: dict[str, Any], *, at: datetime | None, outcome: str, ref_jti: str | None = None) -> tuple[int, str]:
        with self._lock:
            return self._append_locked(body, when=_utc_ms(at or self._clock()), outcome=outcome, ref_jti=ref_jti)

    def _append_locked(self, body: dict[str, Any], *, when: datetime, outcome: str, ref_jti: str | None = None,
                       listed_under: tuple[str, str] | None = None) -> tuple[int, str]:
        """Append under ``self._lock``; ``listed_under`` (hour, agency) counts a listed refusal in the same transaction."""
        with transaction(self._conn) as conn:
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
            prev_seq, prev_hash = self._head_locked()
            lost = self._lost_locked(prev_seq)
            seq, digest = self._insert_locked(body, when, outcome, prev_seq, prev_hash)
            now = self._clock()
            cp: Checkpoint | None
            if lost is not None:
                cp = self._write_checkpoint_locked(now, seq, digest, "cut_noticed", lost=lost)
            elif outcome in GRANT_OUTCOMES and self.device_key is not None:
                cp = self._write_checkpoint_locked(now, seq, digest, "grant")  # the grant is covered at once
            elif body["type"] == "resident" and self.device_key is not None:
                cp = self._write_checkpoint_locked(now, seq, digest, "rule")
            else:
                cp = self._checkpoint_if_due_locked(now, seq, digest)
            if listed_under is not None:
                conn.execute(
                    "INSERT INTO refusal_counters (hour, iss, reason, listed, unlisted) VALUES (?, ?, ?, 1, 0) "
                    "ON CONFLICT (hour, iss, reason) DO UPDATE SET listed = listed + 1",
                    (*listed_under, outcome),
                )
        self._saw(seq, cp)
        return seq, digest.hex()

    def _insert_locked(self, body: dict[str, Any], when: datetime, outcome: str, prev_seq: int, prev_hash: bytes) -> tuple[int, bytes]:
        seq = prev_seq + 1
        entry = {**body, "v": 1, "seq": seq, "at": format_utc(when, ms=True)}
        data = canonical_json(entry)
        if len(data) > MAX_ENTRY_BYTES:
            raise AccessLogError(f"log entry of {len(data)} bytes is larger than {MAX_ENTRY_BYTES}")
        digest = chain_hash(prev_hash, data)
        self._conn.execute(
            "INSERT INTO access_log (seq, at_us, type, jti, iss, outcome, entry, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, to_us(when), entry["type"], entry.get("jti", ""), entry.get("iss", ""), outcome,
             data.decode("utf-8"), prev_hash.hex(), digest.hex()),
        )  # fmt: skip
        return seq, digest

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

    def checkpoint(self, now: datetime | None = None, *, reason: str = "demand") -> Checkpoint:
        """Sign the current head now (``reason``: ``demand`` for ``log checkpoint``, ``shutdown``, ``export``)."""
        if self.device_key is None:
            raise AccessLogError("writing a checkpoint needs the device key")
        with self._lock:
            with transaction(self._conn):
                seq, digest = self._head_locked()
                lost = self._lost_locked(seq)
                cp = self._write_checkpoint_locked(now or self._clock(), seq, digest, reason, lost=lost)
            self._saw(seq, cp)
        return cp

    def checkpoint_if_due(self, now: datetime | None = None) -> Checkpoint | None:
        """For the service's timer: sign the head if an entry has waited ``checkpoint_interval``, if the running
        service has signed nothing for an hour (its heartbeat), or at once if the log shrank under it."""
        if self.device_key is None:
            return None
        with self._lock:
            with transaction(self._conn):
                seq, digest = self._head_locked()
                lost = self._lost_locked(seq)
                when = now or self._clock()
                if lost is not None:
                    cp: Checkpoint | None = self._write_checkpoint_locked(when, seq, digest, "cut_noticed", lost=lost)
                else:
                    cp = self._checkpoint_if_due_locked(when, seq, digest)
            self._saw(seq, cp)
        return cp

    def service_started(self, data_dir: Path, *, rules: Mapping[str, Any] | None = None,
                        by: str = "the configuration file, read at start-up") -> Checkpoint:
        """The sharing service calls this once at start-up, before it decides anything.

        It pins the device key (:func:`agent.state.pin.ensure_pin`: a key that is not the pinned one
        stops the service, fail closed), records the resident's ``rules`` (the ``[policy]`` section) as a
        ``rules_changed`` entry when they differ from those of the previous start, and signs a ``start``
        checkpoint that says how the previous run ended (``after``: ``clean`` if it signed a shutdown,
        ``unclean`` after a crash or power cut). From then on the heartbeat is on: the log is signed at
        least every :data:`~agent.state.logverify.HEARTBEAT` even when nothing happens, so a verifier can
        tell a live log from one whose newest checkpoints were deleted.
        """
        if self.device_key is None:
            raise AccessLogError("the service needs the device key")
        from agent.state.integrity import StateLost, lost_message  # imports this module's neighbours only

        # A pin means the agent ran before: its log must hold a checkpoint. On the first start the pin is
        # written only after the first checkpoint is committed, so a crash in between is not taken for a lost log.
        ran_before = read_pin(pin_path(data_dir)) is not None
        if ran_before:
            ensure_pin(pin_path(data_dir), self.device_key.kid)  # a key that is not the pinned one stops here
        now = self._clock()
        with self._lock:
            with transaction(self._conn) as conn:
                seq, digest = self._head_locked()
                self._known_head = seq  # the service's memory starts here
                last = conn.execute("SELECT id, jws FROM access_log_checkpoints ORDER BY id DESC LIMIT 1").fetchone()
                if last is None and ran_before:  # a lost or replaced log must not start again as if new
                    raise StateLost(lost_message(self.path, pin_path(data_dir), "holds no signed checkpoint"))
                self._known_cp = (int(last[0]), checkpoint_digest(last[1])) if last else None
                after = self._previous_run_locked(seq)
                if rules is not None:
                    change = self._rules_change_locked(dict(rules), now, by, seq)
                    if change is not None:
                        seq, digest = self._insert_locked(change, _utc_ms(now), change["change"], seq, digest)
                cp = self._write_checkpoint_locked(now, seq, digest, "start", after=after)
            self._saw(seq, cp)
            self._heartbeat = HEARTBEAT
        if not ran_before:
            ensure_pin(pin_path(data_dir), self.device_key.kid)
        return cp

    def service_stopping(self) -> Checkpoint | None:
        """The sharing service calls this on a clean stop, before closing: a ``shutdown`` checkpoint.

        Never raises: a stop must go on even with a full disk; the next start then records the stop
        as unclean, which is the truth as far as the log can prove it.
        """
        try:
            return self.checkpoint(reason="shutdown")
        except Exception as exc:  # sqlite3.Error, OSError, a missing key: logged, and the next start says "unclean"
            log.warning("could not sign the access log at shutdown (%s); the next start will record an unclean stop", exc)
            return None

    def _previous_run_locked(self, head: int) -> str:
        """How the previous run ended: the newest start or shutdown checkpoint decides."""
        rows = self._conn.execute("SELECT jws FROM access_log_checkpoints ORDER BY id DESC")
        any_row = False
        for (jws,) in rows:
            any_row = True
            claims = _claims_unverified(jws)
            if claims.get("v") != CHECKPOINT_VERSION:
                return "unknown"  # an older agent's checkpoint: it marked no runs
            if claims.get("reason") == "shutdown":
                return "clean"
            if claims.get("reason") == "start":
                return "unclean"
        return "unknown" if any_row or head else "first"

    def _rules_change_locked(self, rules: dict[str, Any], now: datetime, by: str, head: int) -> dict[str, Any] | None:
        """A ``rules_changed`` entry body if ``rules`` differ from those of the previous start, else None.

        The first rules a fresh log sees are only remembered (nothing had been decided under other
        rules); on an existing log without a record they are entered once as ``rules_recorded``. The
        home's location is compared but never written into the log, which may be exported.
        """
        sha = hashlib.sha256(canonical_json(rules)).hexdigest()
        row = self._conn.execute("SELECT sha256, rules FROM resident_rules WHERE name = 'policy'").fetchone()
        self._conn.execute(
            "INSERT INTO resident_rules (name, sha256, rules, at_us) VALUES ('policy', ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, rules = excluded.rules, at_us = excluded.at_us",
            (sha, canonical_json(rules).decode("utf-8"), to_us(now)),
        )
        if row is not None and row[0] == sha:
            return None
        if row is None and head == 0:
            return None
        try:
            before = json.loads(row[1]) if row is not None else {}
        except ValueError:
            before = {}
        changed = sorted(k for k in set(rules) | set(before) if rules.get(k) != before.get(k)) if row is not None else []
        shown = {k: v for k, v in rules.items() if k != "location"}
        body: dict[str, Any] = {"type": "resident", "change": "rules_changed" if row is not None else "rules_recorded",
                                "by": _text(by, "by", 200), "changed": changed, "sha256": sha,
                                "rules": _json_safe(shown, "rules")}
        if len(canonical_json(body)) > MAX_ENTRY_BYTES - 256:
            body.pop("rules")  # what changed and the hash of the whole still go in
        return body

    def _head_locked(self) -> tuple[int, bytes]:
        head = self._conn.execute("SELECT seq, hash FROM access_log ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(head[0]), bytes.fromhex(head[1])) if head else (0, GENESIS_HASH)

    def _lost_locked(self, head: int) -> dict[str, Any] | None:
        """What this process had seen that is gone now (entries past ``head``, or its last checkpoint), or None."""
        gone = head < self._known_head
        if self._known_cp is not None:
            row = self._conn.execute("SELECT jws FROM access_log_checkpoints WHERE id = ?", (self._known_cp[0],)).fetchone()
            gone = gone or row is None or checkpoint_digest(row[0]) != self._known_cp[1]
        if not gone:
            return None
        return {"seq": self._known_head, "found": head, "checkpoint": self._known_cp[1] if self._known_cp else None}

    def _saw(self, seq: int, cp: Checkpoint | None) -> None:
        """After a commit: remember how far the log went and the checkpoint just written."""
        self._known_head = seq
        if cp is not None and cp.id is not None:
            self._known_cp = (cp.id, checkpoint_digest(cp.jws))

    def _checkpoint_if_due_locked(self, now: datetime, seq: int, digest: bytes) -> Checkpoint | None:
        if self.device_key is None:
            return None
        row = self._conn.execute("SELECT MAX(seq) FROM access_log_checkpoints").fetchone()
        last = int(row[0]) if row and row[0] is not None else 0
        reason = None
        if seq > last:
            if seq - last >= self.checkpoint_every:
                reason = "count"
            else:
                oldest = self._conn.execute("SELECT at_us FROM access_log WHERE seq = ?", (last + 1,)).fetchone()
                if oldest is not None and from_us(int(oldest[0])) <= now - self.checkpoint_interval:
                    reason = "schedule"
        if reason is None and self._heartbeat is not None:
            newest = self._conn.execute("SELECT at_us FROM access_log_checkpoints ORDER BY id DESC LIMIT 1").fetchone()
            if newest is None or from_us(int(newest[0])) <= now - self._heartbeat:
                reason = "schedule"
        return self._write_checkpoint_locked(now, seq, digest, reason) if reason else None

    def _write_checkpoint_locked(
        self, now: datetime, seq: int, digest: bytes, reason: str, *, after: str | None = None,
        lost: dict[str, Any] | None = None,
    ) -> Checkpoint:
        assert self.device_key is not None
        key = self.device_key
        when = _utc_ms(now)
        last = self._conn.execute("SELECT jws FROM access_log_checkpoints ORDER BY id DESC LIMIT 1").fetchone()
        header = {"alg": "Ed25519", "kid": key.kid, "typ": CHECKPOINT_TYP}
        payload: dict[str, Any] = {
            "v": CHECKPOINT_VERSION, "log": LOG_ID, "seq": seq, "hash": digest.hex(),
            "prev": checkpoint_digest(last[0]) if last else None, "reason": reason,
        }  # fmt: skip
        if after is not None:
            payload["after"] = after
        if lost is not None:
            payload["lost"] = lost
        payload.update({"iat": int(when.timestamp()), "at": format_utc(when, ms=True), "device": key.public_jwk()})
        jws = sign_compact(header, payload, key)
        cur = self._conn.execute(
            "INSERT INTO access_log_checkpoints (seq, hash, at_us, kid, jws) VALUES (?, ?, ?, ?, ?)",
            (seq, digest.hex(), to_us(when), key.kid, jws),
        )
        if lost is not None:
            log.error("the access log was cut back while the agent ran (it had seen entry %d, found %d); "
                      "recorded in a signed checkpoint", lost["seq"], lost["found"])
        return Checkpoint(seq=seq, hash=digest.hex(), at=when, kid=key.kid, jws=jws, reason=reason, id=cur.lastrowid)

    # ------------------------------------------------------------------ reading

    def last_at(self) -> datetime | None:
        """The time of the newest decision or event, or None: a time the agent has already acted on.

        The resident's own changes do not count: the command line stamps them with its clock, not the agent's.
        """
        with self._lock:
            # Walks the time index back from the newest row (not MAX() with a filter, which reads every row):
            # the service asks this before every decision (step 8), on a log of any size.
            row = self._conn.execute(
                "SELECT at_us FROM access_log WHERE type IN ('decision', 'event') ORDER BY at_us DESC LIMIT 1"
            ).fetchone()
        return from_us(int(row[0])) if row and row[0] is not None else None

    def head(self) -> tuple[int, str]:
        with self._lock:
            seq, digest = self._head_locked()
        return seq, digest.hex()

    def counts_by_type(self) -> dict[str, int]:
        """How many entries of each type (``decision``, ``event``, ``resident``) the log holds."""
        with self._lock:
            rows = self._conn.execute("SELECT type, COUNT(*) FROM access_log GROUP BY type").fetchall()
        return {str(t): int(n) for t, n in rows}

    def grants_since(self, iss: str, since: datetime) -> int:
        """Grants to ``iss`` after ``since`` (strictly, as ``AgentState``): immediate grants plus the resident's approvals."""
        # GRANT_OUTCOMES spelled out, not bound, so that SQLite uses the partial index of grants
        # (access_log_grants): step 21 then reads the agency's grants only, however many refusals it has.
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM access_log WHERE iss = ? AND at_us > ? AND outcome IN ('granted', 'approved')",
                (iss, to_us(since)),
            ).fetchone()
        return int(row[0])

    def entries(
        self, since: datetime | None = None, *, jti: str | None = None, limit: int | None = None,
        until: datetime | None = None, seqs: Iterable[int] | None = None,
    ) -> list[LogEntry]:
        """Entries in order, optionally from ``since`` on (and before ``until``), about one request, or by number."""
        sql = "SELECT seq, hash, prev_hash, at_us, type, jti, iss, outcome, entry FROM access_log WHERE 1=1"
        params: list[Any] = []
        if since is not None:
            sql += " AND at_us >= ?"
            params.append(to_us(since))
        if until is not None:
            sql += " AND at_us < ?"
            params.append(to_us(until))
        if seqs is not None:
            wanted = sorted({int(x) for x in seqs})
            sql += f" AND seq IN ({','.join('?' * len(wanted))})" if wanted else " AND 0"
            params.extend(wanted)
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
        """Every checkpoint in the order it was signed (unverified: :meth:`verify` checks them)."""
        with self._lock:
            rows = self._conn.execute("SELECT id, seq, hash, at_us, kid, jws FROM access_log_checkpoints ORDER BY id").fetchall()
        return [Checkpoint(int(s), h, from_us(int(a)), k, j, _claims_unverified(j).get("reason"), int(i))
                for i, s, h, a, k, j in rows]

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

    def more_copies(self, entries: Iterable[LogEntry]) -> dict[int, int]:
        """Copies counted, not listed, on decision entries: ``{seq: count}`` (see :meth:`record_refusal`).

        The count of a (``jti``, reason) goes to the first of ``entries`` with that request and outcome;
        entries without counted copies are left out.
        """
        first: dict[tuple[str, str], int] = {}
        for e in entries:
            if e.type == "decision":
                first.setdefault((e.jti, e.outcome), e.seq)
        jtis = sorted({jti for jti, _ in first})
        out: dict[int, int] = {}
        with self._lock:
            for i in range(0, len(jtis), 500):  # SQLite's limit on bound parameters
                chunk = jtis[i:i + 500]
                rows = self._counters.execute(
                    f"SELECT jti, reason, count FROM copy_counters WHERE jti IN ({','.join('?' * len(chunk))})", chunk,
                ).fetchall()
                for jti, reason, n in rows:
                    seq = first.get((jti, reason))
                    if seq is not None:
                        out[seq] = int(n)
        return out

    def refusals_not_listed(self, since: datetime | None = None, until: datetime | None = None) -> list[dict[str, Any]]:
        """Authenticated refusals counted over the hourly limit, per UTC hour, agency and reason, oldest first.

        ``since``/``until`` select the hours that start in ``[hour of since, until)``.
        """
        sql = "SELECT hour, iss, reason, unlisted FROM refusal_counters WHERE unlisted > 0"
        params: list[Any] = []
        if since is not None:
            sql += " AND hour >= ?"
            params.append(_hour(since))
        with self._lock:
            rows = self._counters.execute(sql + " ORDER BY hour, iss, reason", params).fetchall()
        return [{"hour": h, "iss": i, "reason": r, "count": int(n)} for h, i, r, n in rows
                if until is None or parse_utc_z(h) < until]

    def decided_unlisted(self, jti: str) -> bool:
        """Whether ``jti`` was used up by a refusal over the hourly limit, counted but not listed (and still remembered)."""
        with self._lock:
            row = self._counters.execute("SELECT 1 FROM unlisted_decisions WHERE jti = ?", (jti,)).fetchone()
        return row is not None

    # ------------------------------------------------------------ verification

    def verify(
        self, device_key: Any = None, *, tail: TailRules | None = None,
        witnesses: Sequence[tuple[str, str]] = (), tz: tzinfo = UTC,
    ) -> VerifyReport:
        """Re-check the whole chain and every checkpoint; name the first bad entry (see :mod:`agent.state.logverify`).

        ``device_key`` is the pinned thumbprint (or the key): never taken from the log itself. ``tail``
        says whether the agent is running, which decides how the end of the log must look;
        ``witnesses`` are ``(name, manifest text)`` pairs an auditor collected.
        """
        with self._lock, transaction(self._conn, write=False) as conn:
            # One snapshot of both tables; the service may keep appending meanwhile.
            return verify_connection(conn, device_key, tail=tail, witnesses=witnesses, tz=tz)

    # ------------------------------------------------------------------ export

    def export_bundle(self, now: datetime | None = None) -> bytes:
        """One self-contained, verifiable file: a header with the device's public key, every entry, every checkpoint.

        The device first signs an ``export`` checkpoint over the current head, and the bundle ends with
        it, so an auditor can tell a complete bundle from one cut short (docs/protocol.md section 6).
        Entries appended meanwhile are left out: the bundle is the log as the export checkpoint saw it.
        """
        if self.device_key is None:
            raise AccessLogError("exporting a verifiable bundle needs the device key")
        cp = self.checkpoint(now, reason="export")
        assert cp.id is not None
        with self._lock, transaction(self._conn, write=False) as conn:
            entries = conn.execute(
                "SELECT seq, at_us, type, jti, iss, outcome, entry, prev_hash, hash FROM access_log "
                "WHERE seq <= ? ORDER BY seq", (cp.seq,),
            ).fetchall()
            cps = conn.execute(
                "SELECT seq, hash, at_us, kid, jws FROM access_log_checkpoints WHERE id <= ? ORDER BY id", (cp.id,),
            ).fetchall()
        out = io.BytesIO()
        out.write(bundle_header_line(self.device_key.public_jwk(), self.device_key.kid, len(entries), len(cps)) + b"\n")
        for e in entries:
            out.write(bundle_entry_line(e) + b"\n")
        for c in cps:
            out.write(bundle_checkpoint_line(c) + b"\n")
        return out.getvalue()

    def export_csv(self, describe: Callable[[LogEntry], tuple[str, str]]) -> str:
        """A spreadsheet copy of the entries, marked on its first line as not verifiable.

        ``describe(entry)`` returns ``(local time, what happened in words)``; the words belong to the CLI.
        """
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["NOT VERIFIABLE: a spreadsheet copy of the doorbell-agent access log, for reading only. "
                    "To check the log, use the bundle from 'doorbell-agent log export' (JSON lines)."])
        w.writerow(["seq", "local time", "utc time", "type", "agency", "request", "officer", "case", "purpose",
                    "outcome", "what happened", "window asked", "window granted", "bytes", "by", "entry hash"])
        for e in self.entries():
            d = e.data
            local, words = describe(e)
            asked, granted = d.get("requested"), d.get("granted")
            w.writerow([spreadsheet_cell(v) for v in (
                e.seq, local, format_utc(e.at, ms=True), e.type, e.iss, e.jti, d.get("sub", ""), d.get("case", ""),
                d.get("purpose", ""), e.outcome, words,
                f"{asked['start']} to {asked['end']}" if isinstance(asked, dict) else "",
                f"{granted['start']} to {granted['end']}" if isinstance(granted, dict) else "",
                d.get("bytes") if isinstance(d.get("bytes"), int) else "", d.get("by", ""), e.hash,
            )])  # fmt: skip
        return buf.getvalue()

    # ----------------------------------------------------------------- summary

    def summary(self, since: datetime | None, until: datetime) -> dict[str, Any]:
        """A transparency report's figures for ``[since, until)``: requests by agency, outcomes, minutes shared.

        Minutes shared are the granted windows of deliveries that completed; grants not (yet) delivered
        are counted apart. Messages refused before any signature check are only counted per hour.
        """
        entries = self.entries(since, until=until)
        refs = {int(e.data["ref_seq"]) for e in entries if e.type == "event" and isinstance(e.data.get("ref_seq"), int)}
        known = {e.seq: e for e in entries}
        known.update({e.seq: e for e in self.entries(seqs=refs - set(known))})
        agencies: dict[str, dict[str, int]] = {}
        refused: dict[str, int] = {}
        rules: dict[str, int] = {}
        granted_at_once = approved = awaiting = delivered = cut = failed = 0
        shared_s = 0.0
        for e in entries:
            if e.type == "decision":
                a = agencies.setdefault(e.iss, {"requests": 0, "granted": 0, "refused": 0})
                a["requests"] += 1
                if e.outcome == "granted":
                    a["granted"] += 1
                    granted_at_once += 1
                elif e.outcome == "awaiting_resident":
                    awaiting += 1
                else:
                    a["refused"] += 1
                    refused[e.outcome] = refused.get(e.outcome, 0) + 1
            elif e.type == "event":
                a = agencies.setdefault(e.iss, {"requests": 0, "granted": 0, "refused": 0})
                if e.outcome == "approved":
                    a["granted"] += 1
                    approved += 1
                elif e.outcome in ("declined_by_resident", "approval_expired"):
                    a["refused"] += 1
                    refused[e.outcome] = refused.get(e.outcome, 0) + 1
                elif e.outcome == "delivered":
                    delivered += 1
                    shared_s += _window_seconds(self._grant_window(e, known))
                elif e.outcome == "delivery_cut":
                    cut += 1
                else:
                    failed += 1
            else:
                rules[e.outcome] = rules.get(e.outcome, 0) + 1
        ignored = sum(c["count"] for c in self.rejection_counts(since) if parse_utc_z(c["hour"]) < until)
        not_listed: dict[str, int] = {}
        not_listed_by_agency: dict[str, int] = {}
        for c in self.refusals_not_listed(since, until):
            not_listed[c["reason"]] = not_listed.get(c["reason"], 0) + c["count"]
            not_listed_by_agency[c["iss"]] = not_listed_by_agency.get(c["iss"], 0) + c["count"]
        return {
            "since": format_utc(since) if since else None, "until": format_utc(until),
            "requests": sum(a["requests"] for a in agencies.values()), "agencies": agencies,
            "granted": granted_at_once + approved, "granted_by_rules": granted_at_once, "approved_by_you": approved,
            "waiting_or_held": awaiting, "refused": sum(refused.values()), "refused_by_reason": refused,
            "deliveries": delivered, "deliveries_cut": cut, "deliveries_failed": failed,
            "minutes_shared": round(shared_s / 60, 1), "your_changes": rules, "ignored_before_authentication": ignored,
            # Counted, not listed (record_refusal): not evidence, and not in the figures above, which are the log's.
            "more_copies": sum(self.more_copies(entries).values()),
            "refused_not_listed": sum(not_listed.values()), "refused_not_listed_by_reason": not_listed,
            "refused_not_listed_by_agency": not_listed_by_agency,
            "refusals_listed_per_agency_per_hour": REFUSALS_LISTED_PER_AGENCY_PER_HOUR,
        }  # fmt: skip

    @staticmethod
    def _grant_window(event: LogEntry, known: Mapping[int, LogEntry]) -> Any:
        """The window a delivery shared: the approval's if the resident approved it, else the decision's."""
        ref = known.get(event.data.get("ref_seq"))  # type: ignore[arg-type]
        if ref is None:
            return None
        approvals = [e for e in known.values() if e.type == "event" and e.outcome == "approved" and e.jti == event.jti
                     and isinstance(e.data.get("granted"), dict)]
        return approvals[-1].data["granted"] if approvals else ref.data.get("granted")


def _window_seconds(window: Any) -> float:
    try:
        return max(0.0, (parse_utc_z(window["end"]) - parse_utc_z(window["start"])).total_seconds())
    except (KeyError, TypeError, ValueError):
        return 0.0


def record_rule_change(
    paths: Any, what: str, *, by: str, details: Mapping[str, Any] | None = None
) -> tuple[int, str, str | None]:
    """For commands: record one of the resident's changes in the log at ``paths.state_db``.

    ``paths`` is the configuration's ``[paths]`` (``state_db``, ``data_dir``, ``device_key_file``).
    The entry is signed at once when this user can read the pinned device key; otherwise it waits
    for the service's next checkpoint. Returns ``(seq, hash, why_unsigned)`` (``None`` once signed).
    Raises ``sqlite3.Error``/``OSError``/:class:`AccessLogError` if the change could not be recorded:
    a caller that turns sharing *on* must then undo its change (fail closed).
    """
    from agent.state.pin import signing_key

    key, why = signing_key(paths.data_dir, paths.device_key_file)
    with AccessLog(paths.state_db, device_key=key) as alog:
        seq, digest = alog.append_rule_change(what, by=by, details=details)
    return seq, digest, why
