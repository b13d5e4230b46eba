"""Requests waiting for the resident's yes or no (``policy.approval = "ask"``, protocol step 22).

The service holds a request here in ``awaiting_resident``; the homeowner
answers with ``doorbell-agent approve ID`` / ``decline ID`` from another
process; the service picks the answers up with :meth:`ApprovalQueue.approved`
(deliver, then :meth:`ApprovalQueue.mark_granted` once the delivery job is on
disk, so a crash in between repeats the step instead of losing the answer) and
:meth:`ApprovalQueue.take_refusals` (log ``declined_by_resident`` or
``approval_expired``). Each answer is acted on exactly once.

States::

    awaiting_resident --approve--> approved --mark_granted--> granted
                      --decline--> declined_by_resident --take_refusals--> (claimed)
                      --exp passes--> approval_expired  --take_refusals--> (claimed)

Storage is one table in ``state.sqlite`` (shared with the replay memory and
access log, in WAL mode). Every change runs in ``BEGIN IMMEDIATE`` so the CLI
and the service never both act on the same row, and each call opens its own
connection so no process holds a lock between calls.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from agent.errors import UserError
from agent.state.db import connect, create_schema, transaction
from agent.timeutil import format_local, format_utc, from_epoch, from_us, to_us

AWAITING = "awaiting_resident"
APPROVED = "approved"
GRANTED = "granted"
DECLINED = "declined_by_resident"
EXPIRED = "approval_expired"
STATES = (AWAITING, APPROVED, GRANTED, DECLINED, EXPIRED)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS pending_approvals (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    jti           TEXT NOT NULL UNIQUE,
    iss           TEXT NOT NULL,
    sub           TEXT NOT NULL,
    case_ref      TEXT NOT NULL,
    purpose       TEXT NOT NULL,
    granted_start INTEGER NOT NULL,  -- microseconds since the epoch (buffer time)
    granted_end   INTEGER NOT NULL,
    exp           INTEGER NOT NULL,  -- the request's exp, NumericDate
    raw           BLOB NOT NULL,     -- the request message exactly as received
    extra         TEXT NOT NULL DEFAULT '{{}}',
    held_at       INTEGER NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    decided_at    INTEGER,
    claimed_at    INTEGER
);
CREATE INDEX IF NOT EXISTS pending_approvals_state ON pending_approvals (state, claimed_at);
"""


class ApprovalError(UserError):
    """An answer that cannot be taken: unknown ID, already answered, or too late."""


@dataclass(frozen=True)
class PendingApproval:
    id: int
    jti: str
    iss: str
    sub: str
    case: str
    purpose: str
    granted_start: datetime
    granted_end: datetime
    exp: datetime
    raw: bytes
    extra: dict[str, Any]
    held_at: datetime
    state: str
    decided_at: datetime | None

    def expired_at(self, now: datetime) -> bool:
        return now > self.exp

    def claims(self) -> dict[str, Any]:
        """What the held request claims beyond the columns: legal basis, warrant, area, who signed.

        Read from the request exactly as received (``raw``), which the decision verified before holding
        it, so rows held by an older agent, before these were shown, have them too. ``signed_by`` is the
        key ids the decision verified (kept in ``extra`` since then), else those the message names.
        Empty when ``raw`` cannot be read (it always can, unless the database was edited).
        """
        from agent.protocol.jose import JwsError, parse_unverified
        from agent.protocol.request import FootageRequest

        try:
            jws = parse_unverified(self.raw)
            req = FootageRequest.from_claims(jws.claims)
        except (JwsError, ValueError):
            return {}
        kids = self.extra.get("kids")
        signed_by = [str(k) for k in kids] if isinstance(kids, list) else [sig.kid for sig in jws.signatures]
        return {
            "basis": req.basis,
            "warrant": {"ref": req.warrant.ref, "court": req.warrant.court} if req.warrant else None,
            "area": {"lat": req.area.lat, "lon": req.area.lon, "radius_m": req.area.radius_m},
            "requested": {"start": format_utc(req.window_start), "end": format_utc(req.window_end)},
            "signed_by": signed_by,
        }

    def as_json(self) -> dict[str, Any]:
        """For ``pending --json``: everything but the raw message, times in RFC 3339 UTC."""
        return {
            **self.claims(),
            "id": self.id,
            "jti": self.jti,
            "agency": self.iss,
            "officer": self.sub,
            "case": self.case,
            "purpose": self.purpose,
            "window": {"start": format_utc(self.granted_start), "end": format_utc(self.granted_end)},
            "expires": format_utc(self.exp),
            "held_at": format_utc(self.held_at),
            "state": self.state,
            "decided_at": format_utc(self.decided_at) if self.decided_at else None,
        }


def _row(r: sqlite3.Row) -> PendingApproval:
    return PendingApproval(
        id=r["id"],
        jti=r["jti"],
        iss=r["iss"],
        sub=r["sub"],
        case=r["case_ref"],
        purpose=r["purpose"],
        granted_start=from_us(r["granted_start"]),
        granted_end=from_us(r["granted_end"]),
        exp=from_epoch(r["exp"]),
        raw=bytes(r["raw"]),
        extra=json.loads(r["extra"]),
        held_at=from_us(r["held_at"]),
        state=r["state"],
        decided_at=from_us(r["decided_at"]) if r["decided_at"] is not None else None,
    )


def parse_id(text: str) -> int:
    """The ID a homeowner typed: the number ``pending`` shows, with or without a leading '#'."""
    s = text.strip().removeprefix("#")
    if not s.isdigit() or len(s) > 12:
        raise ApprovalError(f"{text!r} is not a request ID; use the number shown by 'doorbell-agent pending', e.g. 7")
    return int(s)


class ApprovalQueue:
    def __init__(self, db_path: Path) -> None:
        self.path = Path(db_path)
        self._ready = False

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on a fresh connection (the CLI and the service both write here)."""
        try:
            conn = connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(
                f"cannot open the agent's state database {self.path} ({exc}); run this as the user the agent "
                "runs as, or check paths.data_dir"
            ) from None
        conn.row_factory = sqlite3.Row
        try:
            with transaction(conn):
                if not self._ready:
                    create_schema(conn, _SCHEMA)
                yield conn
            self._ready = True
        except sqlite3.DatabaseError as exc:  # locked past the timeout, corrupt, read-only...
            raise UserError(f"the agent's state database {self.path} is not usable ({exc})") from None
        finally:
            conn.close()

    # ----- the service's side -------------------------------------------------------

    def hold(
        self,
        *,
        raw: bytes,
        jti: str,
        iss: str,
        sub: str,
        case: str,
        purpose: str,
        granted_start: datetime,
        granted_end: datetime,
        exp: int | datetime,
        now: datetime,
        extra: dict[str, Any] | None = None,
    ) -> PendingApproval:
        """Keep a request for the resident to answer. Holding the same ``jti`` again returns the first hold."""
        exp_s = int(exp.timestamp()) if isinstance(exp, datetime) else int(exp)
        with self._tx() as c:
            c.execute(
                "INSERT INTO pending_approvals (jti, iss, sub, case_ref, purpose, granted_start, granted_end, exp,"
                " raw, extra, held_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (jti) DO NOTHING",
                (jti, iss, sub, case, purpose, to_us(granted_start), to_us(granted_end), exp_s, bytes(raw),
                 json.dumps(extra or {}, sort_keys=True), to_us(now), AWAITING),
            )
            return _row(c.execute("SELECT * FROM pending_approvals WHERE jti = ?", (jti,)).fetchone())

    def approved(self) -> list[PendingApproval]:
        """Requests the resident approved that the service has not yet turned into deliveries."""
        with self._tx() as c:
            rows = c.execute("SELECT * FROM pending_approvals WHERE state = ? ORDER BY id", (APPROVED,)).fetchall()
        return [_row(r) for r in rows]

    def mark_granted(self, approval_id: int, now: datetime) -> bool:
        """The service has made the delivery job durable (or refused it on the record): done with this one.

        Returns False if it was already marked, so two claimants can never both act on one answer.
        """
        with self._tx() as c:
            cur = c.execute("UPDATE pending_approvals SET state = ?, claimed_at = ? WHERE id = ? AND state = ?",
                            (GRANTED, to_us(now), approval_id, APPROVED))
            return cur.rowcount == 1

    def take_refusals(self, now: datetime) -> list[PendingApproval]:
        """Requests declined, or whose ``exp`` passed unanswered, each returned once: log them."""
        with self._tx() as c:
            self._expire(c, now)
            rows = c.execute(
                "SELECT * FROM pending_approvals WHERE state IN (?, ?) AND claimed_at IS NULL ORDER BY id",
                (DECLINED, EXPIRED),
            ).fetchall()
            c.execute(
                "UPDATE pending_approvals SET claimed_at = ? WHERE state IN (?, ?) AND claimed_at IS NULL",
                (to_us(now), DECLINED, EXPIRED),
            )
        return [_row(r) for r in rows]

    @staticmethod
    def _expire(c: sqlite3.Connection, now: datetime) -> None:
        c.execute(
            "UPDATE pending_approvals SET state = ?, decided_at = ? WHERE state = ? AND exp < ?",
            (EXPIRED, to_us(now), AWAITING, now.timestamp()),
        )

    # ----- the resident's side (CLI) ---------------------------------------------------

    def pending(self, now: datetime) -> list[PendingApproval]:
        """Requests still waiting for an answer, oldest first."""
        with self._tx() as c:
            rows = c.execute(
                "SELECT * FROM pending_approvals WHERE state = ? AND exp >= ? ORDER BY id",
                (AWAITING, now.timestamp()),
            ).fetchall()
        return [_row(r) for r in rows]

    def get(self, approval_id: int) -> PendingApproval | None:
        with self._tx() as c:
            r = c.execute("SELECT * FROM pending_approvals WHERE id = ?", (approval_id,)).fetchone()
        return _row(r) if r else None

    def approve(self, approval_id: int, now: datetime, tz: tzinfo | None = None) -> PendingApproval:
        """The resident says yes; the service delivers it on its next look at :meth:`approved`."""
        return self._answer(approval_id, APPROVED, now, tz)

    def decline(self, approval_id: int, now: datetime, tz: tzinfo | None = None) -> PendingApproval:
        return self._answer(approval_id, DECLINED, now, tz)

    def _answer(self, approval_id: int, new_state: str, now: datetime, tz: tzinfo | None) -> PendingApproval:
        expired: PendingApproval | None = None
        with self._tx() as c:
            r = c.execute("SELECT * FROM pending_approvals WHERE id = ?", (approval_id,)).fetchone()
            if r is None:
                raise ApprovalError(
                    f"there is no request with ID {approval_id}; run 'doorbell-agent pending' to see the waiting ones"
                )
            item = _row(r)
            if item.state == AWAITING and item.expired_at(now):
                self._expire(c, now)  # record it now, so the service logs approval_expired
                expired = item
            elif item.state == AWAITING:
                c.execute(
                    "UPDATE pending_approvals SET state = ?, decided_at = ? WHERE id = ? AND state = ?",
                    (new_state, to_us(now), approval_id, AWAITING),
                )
                return _row(c.execute("SELECT * FROM pending_approvals WHERE id = ?", (approval_id,)).fetchone())
        if expired is not None:
            raise ApprovalError(
                f"request {approval_id} expired at {format_local(expired.exp, tz)} before it was answered; "
                "nothing was shared, and the agency would have to send a new request"
            )
        when = f" on {format_local(item.decided_at, tz)}" if item.decided_at else ""
        done = {
            APPROVED: "already approved" + when + " (the footage is being sent)",
            GRANTED: "already approved" + when + " and handed to the agent for sending",
            DECLINED: "already declined" + when,
            EXPIRED: "expired" + when + " before it was answered",
        }[item.state]
        raise ApprovalError(f"request {approval_id} was {done}; nothing changed")
