"""Checking the access log, on the device or anywhere else: the auditor's half of :mod:`agent.state.accesslog`.

Kept apart from the writer so that it needs nothing but the standard library and
:mod:`agent.protocol.jose`: a copy of ``state.sqlite`` and the device's public key are enough to
re-check every entry and every signed checkpoint. The construction it checks is :data:`CHAIN_DOC`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol.jose import JwsError, ed25519_from_jwk, ed25519_public_jwk, jwk_thumbprint, parse_compact
from agent.timeutil import parse_utc_z, to_us

DOMAIN = b"doorbell-agent/access-log/v1\x00"
GENESIS_HASH = bytes(32)
CHECKPOINT_TYP = "access-log-checkpoint+jwt"
LOG_ID = "doorbell-agent/access-log/v1"

CHAIN_DOC = """\
hash_0 = 32 zero bytes (genesis)
hash_n = SHA-256( "doorbell-agent/access-log/v1" || 0x00 || hash_{n-1} (32 raw bytes) || entry_n )
entry_n = the UTF-8 bytes stored in column access_log.entry for seq n: the entry's JSON with
          keys sorted, no whitespace, non-ASCII characters unescaped; it contains "seq": n.
access_log.hash holds hash_n and access_log.prev_hash holds hash_{n-1}, both as lowercase hex.
seq runs 1, 2, 3, ... with no gaps.
A checkpoint is a JWS compact serialization signed by the device's Ed25519 key:
header {"alg":"Ed25519","kid":<RFC 7638 thumbprint of the device JWK>,"typ":"access-log-checkpoint+jwt"},
payload {"v":1,"log":"doorbell-agent/access-log/v1","seq":n,"hash":<hash_n hex>,"iat":<NumericDate>,
         "at":<RFC 3339 UTC>,"device":<device public JWK>}; seq 0 names the genesis hash.
"""


def chain_hash(prev: bytes, entry: bytes) -> bytes:
    return hashlib.sha256(DOMAIN + prev + entry).digest()


@dataclass(frozen=True)
class Problem:
    seq: int
    kind: str  # deleted | changed | reordered | inserted | checkpoint_mismatch | checkpoint_signature | truncated
    message: str


@dataclass
class VerifyReport:
    entries: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS_HASH.hex()
    checkpoints: int = 0
    checkpoints_ok: int = 0
    last_checkpoint_seq: int | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return min(self.problems, key=lambda p: p.seq) if self.problems else None

    @property
    def first_bad_seq(self) -> int | None:
        p = self.first_problem
        return p.seq if p else None

    def to_json(self) -> dict[str, Any]:
        first = self.first_problem
        return {
            "ok": self.ok,
            "entries": self.entries,
            "verified_through": {"seq": self.head_seq, "hash": self.head_hash},
            "checkpoints": self.checkpoints,
            "checkpoints_ok": self.checkpoints_ok,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "first_bad_seq": first.seq if first else None,
            "problem": first.message if first else None,
            "problems": [{"seq": p.seq, "kind": p.kind, "message": p.message} for p in sorted(self.problems, key=lambda p: p.seq)],
            "notes": self.notes,
        }


def _public_key(key: Ed25519PublicKey | Mapping[str, str] | None) -> tuple[Ed25519PublicKey, str] | None:
    if key is None:
        return None
    if isinstance(key, Ed25519PublicKey):
        return key, jwk_thumbprint(ed25519_public_jwk(key))
    return ed25519_from_jwk(key, "device"), jwk_thumbprint(key)


def verify_connection(conn: sqlite3.Connection, device_public_key: Ed25519PublicKey | Mapping[str, str] | None) -> VerifyReport:
    """Verify the log in an open database (call it inside one read transaction for a consistent snapshot).

    Give the device's public key to check checkpoint signatures against it;
    without it they are checked against the key written in each checkpoint
    (which proves less, and the report says so).
    """
    count = int(conn.execute("SELECT COUNT(*) FROM access_log").fetchone()[0])
    cps = conn.execute("SELECT seq, hash, kid, jws FROM access_log_checkpoints ORDER BY seq, id").fetchall()
    rows = conn.execute(
        "SELECT seq, at_us, type, jti, iss, outcome, entry, prev_hash, hash FROM access_log ORDER BY seq"
    )  # streamed: a years-long log need not fit in memory
    report = verify_rows(rows, cps, _public_key(device_public_key))
    report.entries = count
    return report


def _entry_problem(row: tuple[Any, ...], expected: int, prev: bytes) -> tuple[Problem | None, bytes]:
    seq, at_us, typ, jti, iss, outcome, entry, prev_hash, stored = row
    if not isinstance(seq, int) or seq < expected:
        return Problem(expected, "inserted", f"an entry numbered {seq!r} was inserted where entry {expected} belongs."), prev
    if seq > expected:
        missing = f"entry {expected} is" if seq == expected + 1 else f"entries {expected} to {seq - 1} are"
        return Problem(expected, "deleted", f"{missing} missing: the log jumps from entry {expected - 1} to entry {seq}; the missing entries were deleted."), prev
    data = entry.encode("utf-8") if isinstance(entry, str) else bytes(entry or b"")
    digest = chain_hash(prev, data)
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        return Problem(seq, "changed", f"entry {seq} is no longer readable JSON; it was changed after it was written."), digest
    inner = obj.get("seq")
    if inner != seq:
        return Problem(seq, "reordered", f"entry {seq} holds the content written as entry {inner}: entries were moved, inserted or renumbered."), digest
    if prev_hash != prev.hex():
        return Problem(seq, "changed", f"entry {seq} does not follow on from entry {seq - 1}: an entry before it was changed, removed or inserted."), digest
    if stored != digest.hex():
        return Problem(seq, "changed", f"entry {seq} was changed after it was written: its content no longer matches its hash."), digest
    at = obj.get("at")
    try:
        at_ok = isinstance(at, str) and to_us(parse_utc_z(at)) == at_us
    except (ValueError, TypeError):
        at_ok = False
    outcome_in_entry = obj.get("reason") if obj.get("type") == "decision" else obj.get("event")
    if not at_ok or (typ, jti, iss, outcome) != (obj.get("type"), obj.get("jti"), obj.get("iss"), outcome_in_entry):
        return Problem(seq, "changed", f"entry {seq}'s searchable columns (time, request, agency or outcome) were changed; they no longer match the recorded entry."), digest
    return None, digest


def _check_jws(jws: str, key: tuple[Ed25519PublicKey, str] | None) -> tuple[dict[str, Any] | None, str | None]:
    """Return (payload, None) if the checkpoint's signature holds, else (None, why)."""
    try:
        parsed = parse_compact(jws, typ=CHECKPOINT_TYP)
    except JwsError:
        return None, "is not a readable signed checkpoint"
    if key is None:
        try:
            pub, kid = _public_key(parsed.claims["device"])  # type: ignore[misc]
        except (KeyError, TypeError, JwsError):
            return None, "names no usable device key"
    else:
        pub, kid = key
    if parsed.kid != kid:
        return None, f"was signed by key {parsed.kid!r}, not this device's key {kid!r}"
    try:
        payload = parsed.verify(pub)
    except JwsError:
        return None, "has a signature that does not verify"
    if payload.get("log") != LOG_ID or type(payload.get("seq")) is not int or not isinstance(payload.get("hash"), str):
        return None, "has an unexpected payload"
    return payload, None


def verify_rows(
    rows: Iterable[tuple[Any, ...]], cps: list[tuple[Any, ...]], key: tuple[Ed25519PublicKey, str] | None
) -> VerifyReport:
    """The verification itself, over rows ``(seq, at_us, type, jti, iss, outcome, entry, prev_hash, hash)`` in seq order
    and checkpoint rows ``(seq, hash, kid, jws)``."""
    report = VerifyReport(checkpoints=len(cps))
    wanted = {int(cp[0]) for cp in cps}
    if key is None and cps:
        report.notes.append(
            "checkpoint signatures were checked against the key written in each checkpoint, not against this device's key file"
        )
    prev = GENESIS_HASH
    hashes: dict[int, bytes] = {0: GENESIS_HASH}
    expected = 1
    broken_at: int | None = None
    for row in rows:
        problem, digest = _entry_problem(row, expected, prev)
        if problem is not None:
            report.problems.append(problem)
            broken_at = problem.seq
            break
        if expected in wanted:
            hashes[expected] = digest
        prev = digest
        expected += 1
        report.entries += 1
    last_seq = expected - 1
    report.head_seq, report.head_hash = last_seq, prev.hex()

    last_good_cp = 0
    for cp_seq, cp_hash, _cp_kid, jws in cps:
        payload, why = _check_jws(jws, key)
        if payload is None:
            report.problems.append(Problem(max(int(cp_seq), 1), "checkpoint_signature", f"the signed checkpoint for entry {cp_seq} {why}."))
            continue
        if (payload["seq"], payload["hash"]) != (cp_seq, cp_hash):
            report.problems.append(Problem(max(int(cp_seq), 1), "checkpoint_signature", f"the checkpoint for entry {cp_seq} was changed: its columns differ from what the device signed."))
            continue
        report.last_checkpoint_seq = max(report.last_checkpoint_seq or 0, cp_seq)
        if broken_at is not None and cp_seq >= broken_at:
            continue
        if cp_seq > last_seq:
            report.problems.append(Problem(
                last_seq + 1, "truncated",
                f"the log ends at entry {last_seq}, but the device signed a checkpoint for entry {cp_seq}: "
                f"entries {last_seq + 1} to {cp_seq} were deleted.",
            ))  # fmt: skip
            continue
        if hashes.get(cp_seq, b"").hex() != cp_hash:
            start = last_good_cp + 1
            report.problems.append(Problem(
                start, "checkpoint_mismatch",
                f"entries {start} to {cp_seq} were rewritten: the hash chain no longer matches the checkpoint "
                f"the device signed for entry {cp_seq}.",
            ))  # fmt: skip
            continue
        last_good_cp = max(last_good_cp, cp_seq)
        report.checkpoints_ok += 1
    if report.ok and last_seq > (report.last_checkpoint_seq or 0):
        report.notes.append(
            f"entries {(report.last_checkpoint_seq or 0) + 1} to {last_seq} are not yet covered by a signed checkpoint"
        )
    return report
