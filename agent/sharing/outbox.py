"""``<data_dir>/outbox``: deliveries granted and not yet finished, kept across restarts.

A job is written before its grant is logged and removed only once the delivery's end is logged,
so one grant makes at most one finished delivery whatever the agent goes through in between. Beside
the job lie the cut clip and the sealed state (manifest and content key) that let an interrupted
delivery resume with byte-identical chunks. Everything here is private to the agent (0700/0600).

A job keeps what it takes to decide again whether the delivery may still go out (the request
exactly as it was signed, and when it was granted) and when it must be given up at the latest
(an absolute deadline, stored so that a restart never extends it), and what of it may already
have reached the network (so the log can say what the requester can hold after a restart).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.fsutil import write_atomically
from agent.protocol.jose import b64url_decode, b64url_encode
from agent.timeutil import format_utc, parse_utc_z

log = logging.getLogger("agent.sharing.outbox")


@dataclass
class DeliveryJob:
    jti: str
    delivery_id: str
    iss: str
    recipient: dict[str, str]
    granted_start: datetime
    granted_end: datetime
    log_seq: int
    log_hash: str
    raw: bytes | None = None
    """The request message exactly as received (the signed bytes), to decide again before delivering.
    None only for a job written by a version of the agent that did not keep it."""
    granted_at: datetime | None = None
    """When the grant (decision or resident's approval) was made: the request's own lifetime is judged then."""
    deadline: datetime | None = None
    """After this instant the delivery is given up and its clip deleted, whatever happened meanwhile."""
    chunks_handed: int = 0
    """Chunks ``0..chunks_handed-1`` of ``delivery_id`` may have reached the network (written before each hand-off)."""
    manifest_handed: bool = False
    """The manifest of ``delivery_id`` may have reached the network."""
    superseded: list[dict[str, Any]] = field(default_factory=list)
    """Earlier deliveries of this grant the requester may hold part of (see DeliveryWorker: a narrowed window)."""
    approved: bool = False
    """Granted by the resident's approval (not by the rules alone): re-checks do not ask the resident again."""

    @property
    def window(self) -> tuple[datetime, datetime]:
        return self.granted_start, self.granted_end

    @property
    def anything_handed(self) -> bool:
        return self.manifest_handed or self.chunks_handed > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "jti": self.jti, "delivery_id": self.delivery_id, "iss": self.iss, "recipient": self.recipient,
            "granted": {"start": format_utc(self.granted_start), "end": format_utc(self.granted_end)},
            "log": {"seq": self.log_seq, "hash": self.log_hash},
            "raw": None if self.raw is None else b64url_encode(self.raw),
            "granted_at": None if self.granted_at is None else format_utc(self.granted_at),
            "deadline": None if self.deadline is None else format_utc(self.deadline),
            "handed": {"manifest": self.manifest_handed, "chunks": self.chunks_handed},
            "superseded": self.superseded, "approved": self.approved,
        }  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DeliveryJob:
        handed = obj.get("handed") or {}
        raw, granted_at, deadline = obj.get("raw"), obj.get("granted_at"), obj.get("deadline")
        superseded = obj.get("superseded") or []
        if not isinstance(superseded, list) or not all(isinstance(s, dict) for s in superseded):
            raise TypeError("superseded is not a list of objects")
        return cls(
            jti=obj["jti"], delivery_id=obj["delivery_id"], iss=obj["iss"], recipient=obj["recipient"],
            granted_start=parse_utc_z(obj["granted"]["start"]), granted_end=parse_utc_z(obj["granted"]["end"]),
            log_seq=int(obj["log"]["seq"]), log_hash=obj["log"]["hash"],
            raw=None if raw is None else b64url_decode(raw, "raw"),
            granted_at=None if granted_at is None else parse_utc_z(granted_at),
            deadline=None if deadline is None else parse_utc_z(deadline),
            chunks_handed=int(handed.get("chunks", 0)), manifest_handed=bool(handed.get("manifest", False)),
            superseded=superseded, approved=bool(obj.get("approved", False)),
        )  # fmt: skip


class Outbox:
    """``<data_dir>/outbox``: jobs, clips and sealed state of deliveries not yet finished (0700/0600)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)

    def job_path(self, jti: str) -> Path:
        return self.root / f"{jti}.job.json"

    def clip_path(self, jti: str) -> Path:
        return self.root / f"{jti}.mp4"

    def sealed_path(self, jti: str) -> Path:
        return self.root / f"{jti}.sealed.json"

    def add(self, job: DeliveryJob) -> None:
        """Write (or rewrite) the job, durably: it must be on disk before anything it records happens."""
        write_atomically(self.job_path(job.jti), json.dumps(job.to_json()).encode(), mode=0o600)

    def save_sealed(self, jti: str, state: dict[str, str]) -> None:
        write_atomically(self.sealed_path(jti), json.dumps(state).encode(), mode=0o600)

    def sealed(self, jti: str) -> dict[str, str] | None:
        try:
            return json.loads(self.sealed_path(jti).read_text())
        except FileNotFoundError:
            return None

    def pending(self) -> list[DeliveryJob]:
        jobs = []
        for p in sorted(self.root.glob("*.job.json")):
            try:
                jobs.append(DeliveryJob.from_json(json.loads(p.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("unreadable delivery job %s (%s); it is set aside as %s.bad", p.name, exc, p.name)
                p.rename(p.with_name(p.name + ".bad"))
        return jobs

    def has(self, jti: str) -> bool:
        return self.job_path(jti).exists()

    def discard_clip(self, jti: str) -> None:
        """Delete the cut clip and its sealed state, keeping the job: the next attempt cuts and seals anew."""
        for p in (self.sealed_path(jti), self.clip_path(jti)):
            p.unlink(missing_ok=True)

    def remove(self, jti: str) -> None:
        # The job first: without it nothing resumes, whatever a crash leaves of the rest.
        for p in (self.job_path(jti), self.sealed_path(jti), self.clip_path(jti)):
            p.unlink(missing_ok=True)
