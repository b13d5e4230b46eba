"""``<data_dir>/outbox``: deliveries granted and not yet finished, kept across restarts.

A job is written before its grant is logged and removed only once the delivery's end is logged,
so one grant makes exactly one delivery whatever the agent goes through in between. Beside the job
lie the cut clip and the sealed state (manifest and content key) that let an interrupted delivery
resume with byte-identical chunks. Everything here is private to the agent (0700/0600).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.fsutil import write_atomically
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

    def to_json(self) -> dict[str, Any]:
        return {
            "jti": self.jti, "delivery_id": self.delivery_id, "iss": self.iss, "recipient": self.recipient,
            "granted": {"start": format_utc(self.granted_start), "end": format_utc(self.granted_end)},
            "log": {"seq": self.log_seq, "hash": self.log_hash},
        }  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DeliveryJob:
        return cls(
            jti=obj["jti"], delivery_id=obj["delivery_id"], iss=obj["iss"], recipient=obj["recipient"],
            granted_start=parse_utc_z(obj["granted"]["start"]), granted_end=parse_utc_z(obj["granted"]["end"]),
            log_seq=int(obj["log"]["seq"]), log_hash=obj["log"]["hash"],
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

    def remove(self, jti: str) -> None:
        # The job first: without it nothing resumes, whatever a crash leaves of the rest.
        for p in (self.job_path(jti), self.sealed_path(jti), self.clip_path(jti)):
            p.unlink(missing_ok=True)
