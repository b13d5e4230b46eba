"""Checking the access log, on the device or anywhere else: the auditor's half of :mod:`agent.state.accesslog`.

Kept apart from the writer so that it needs nothing but the standard library,
:mod:`agent.protocol.jose` and :mod:`agent.timeutil`: a copy of ``state.sqlite`` (or an exported
bundle) and the device's thumbprint are enough to re-check every entry, every signed checkpoint and
every delivery manifest an agency kept. The construction it checks is :data:`CHAIN_DOC`; the
same text, with the reasons behind it, is docs/protocol.md section 6.

One code path checks both sources: :func:`verify_connection` (a database) and :func:`verify_bundle`
(an exported file) both hand rows to :func:`verify_rows`, so a bundle proves exactly what the
database would.

What the caller must say, because the log cannot: which key is the device's (a thumbprint pinned
outside the database, never the key written inside a checkpoint, which anyone can replace), and
whether the agent is running now (:class:`TailRules`), since that decides how the end of the log
must look.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol.jose import (
    JwsError,
    b64url_decode,
    compact_json,
    ed25519_from_jwk,
    ed25519_public_jwk,
    jwk_thumbprint,
    parse_compact,
    strict_json,
)
from agent.timeutil import format_local, from_us, parse_utc_z, to_us

DOMAIN = b"doorbell-agent/access-log/v1\x00"
GENESIS_HASH = bytes(32)
CHECKPOINT_TYP = "access-log-checkpoint+jwt"
LOG_ID = "doorbell-agent/access-log/v1"
MANIFEST_TYP = "footage-delivery+jwt"  # agent.protocol.sealing.MANIFEST_TYP, repeated to keep this module light
BUNDLE_FORMAT = "doorbell-agent/access-log-bundle/v1"
CHECKPOINT_VERSION = 2

CHECKPOINT_REASONS = ("start", "shutdown", "grant", "schedule", "count", "demand", "rule", "export", "cut_noticed")
"""Why the device signed a (version 2) checkpoint. ``start`` and ``shutdown`` mark the agent's runs."""
START_AFTER = ("clean", "unclean", "first", "unknown")
"""A ``start`` checkpoint's ``after``: how the previous run ended, as the device saw it at start-up."""
HEARTBEAT = timedelta(hours=1)
"""The running agent signs the log at least this often, even when nothing new was written."""
GRACE = timedelta(minutes=15)
"""Slack on top of :data:`HEARTBEAT` before a missing checkpoint counts as a problem."""
ENTRY_TYPES = ("decision", "event", "resident")
GRANT_OUTCOMES = ("granted", "approved")

CHAIN_DOC = """\
hash_0 = 32 zero bytes (genesis)
hash_n = SHA-256( "doorbell-agent/access-log/v1" || 0x00 || hash_{n-1} (32 raw bytes) || entry_n )
entry_n = the UTF-8 bytes stored in column access_log.entry for seq n: the entry's JSON with
          keys sorted, no whitespace, non-ASCII characters unescaped; it contains "seq": n.
access_log.hash holds hash_n and access_log.prev_hash holds hash_{n-1}, both as lowercase hex.
seq runs 1, 2, 3, ... with no gaps. Entry types: decision, event, resident (the resident's own
changes; their jti and iss columns are empty strings).
A checkpoint is a JWS compact serialization signed by the device's Ed25519 key:
header {"alg":"Ed25519","kid":<RFC 7638 thumbprint of the device JWK>,"typ":"access-log-checkpoint+jwt"},
payload v2 {"v":2,"log":"doorbell-agent/access-log/v1","seq":n,"hash":<hash_n hex>,
            "prev":<SHA-256 hex of the previous checkpoint's JWS text, or null for the first>,
            "reason":<start|shutdown|grant|schedule|count|demand|rule|export|cut_noticed>,
            "iat":<NumericDate>,"at":<RFC 3339 UTC>,"device":<device public JWK>}
        plus "after":<clean|unclean|first|unknown> on start checkpoints, and "lost" when the
        device found the log cut back while it ran; seq 0 names the genesis hash.
payload v1 (older agents) has no prev and no reason; v1 checkpoints only come before v2 ones.
Check checkpoints against the device's thumbprint obtained outside the log (pinned, or from a
manifest), never against the key written inside the checkpoint.
"""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_V1_MEMBERS = frozenset({"v", "log", "seq", "hash", "iat", "at", "device"})
_V2_MEMBERS = _V1_MEMBERS | {"prev", "reason"}
_TAMPER_KINDS = frozenset({
    "deleted", "changed", "reordered", "inserted", "checkpoint_signature", "checkpoint_mismatch", "truncated",
    "checkpoint_chain", "cut_noticed", "witness", "bundle_format", "export_missing",
})  # fmt: skip


def chain_hash(prev: bytes, entry: bytes) -> bytes:
    return hashlib.sha256(DOMAIN + prev + entry).digest()


def checkpoint_digest(jws: str) -> str:
    """What the next checkpoint's ``prev`` names: SHA-256 of this checkpoint's JWS text (ASCII), lowercase hex."""
    return hashlib.sha256(jws.encode("ascii", "replace")).hexdigest()


def is_thumbprint(value: Any) -> bool:
    """An RFC 7638 SHA-256 thumbprint: 43 characters of canonical base64url for 32 bytes."""
    if not isinstance(value, str) or len(value) != 43:
        return False
    try:
        return len(b64url_decode(value, "thumbprint")) == 32
    except ValueError:
        return False


def thumbprint_of(key: Any) -> str | None:
    """The thumbprint to check signatures against, from a thumbprint, a public key, a JWK or a DeviceKey."""
    if key is None:
        return None
    if isinstance(key, str):
        if not is_thumbprint(key):
            raise ValueError(f"{key!r} is not a device thumbprint (43 characters of base64url)")
        return key
    if isinstance(key, Ed25519PublicKey):
        return jwk_thumbprint(ed25519_public_jwk(key))
    if hasattr(key, "public_jwk"):  # agent.state.devicekey.DeviceKey, without importing the writer's side
        return jwk_thumbprint(key.public_jwk())
    ed25519_from_jwk(key, "device")
    return jwk_thumbprint(key)


@dataclass(frozen=True)
class Problem:
    seq: int | None  # the first entry concerned, or None when the problem is not about one entry
    kind: str
    message: str

    @property
    def tampering(self) -> bool:
        """Evidence that something was changed, as opposed to something that could not be vouched for."""
        return self.kind in _TAMPER_KINDS


@dataclass
class VerifyReport:
    entries: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS_HASH.hex()
    checkpoints: int = 0
    checkpoints_ok: int = 0
    last_checkpoint_seq: int | None = None
    device_key: str | None = None
    mode: str | None = None
    last_checkpoint: dict[str, Any] | None = None
    unclean_stops: list[dict[str, Any]] = field(default_factory=list)
    witnesses: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def sorted_problems(self) -> list[Problem]:
        """Problems about the whole log (the key, the bundle) first, then by entry."""
        return sorted(self.problems, key=lambda p: (p.seq is not None, p.seq or 0))

    @property
    def first_problem(self) -> Problem | None:
        problems = self.sorted_problems()
        return problems[0] if problems else None

    @property
    def first_bad_seq(self) -> int | None:
        seqs = [p.seq for p in self.problems if p.seq is not None]
        return min(seqs) if seqs else None

    def to_json(self) -> dict[str, Any]:
        first = self.first_problem
        return {
            "ok": self.ok,
            "entries": self.entries,
            "verified_through": {"seq": self.head_seq, "hash": self.head_hash},
            "device_key": self.device_key,
            "mode": self.mode,
            "checkpoints": self.checkpoints,
            "checkpoints_ok": self.checkpoints_ok,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "last_checkpoint": self.last_checkpoint,
            "first_bad_seq": self.first_bad_seq,
            "problem": first.message if first else None,
            "problems": [{"seq": p.seq, "kind": p.kind, "message": p.message} for p in self.sorted_problems()],
            "unclean_stops": self.unclean_stops,
            "witnesses": self.witnesses,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class TailRules:
    """How the end of the log must look; the log cannot say whether the agent runs, so the caller does.

    - ``running``: the agent signed a ``start`` checkpoint when it started, and signs at least every
      :data:`HEARTBEAT`; entries may wait that long for a signature.
    - ``stopped``: the agent's last run ended with a ``shutdown`` checkpoint, and nothing after the
      newest checkpoint is unsigned. A crash or power cut shows up here until the agent starts again.
    - ``bundle``: an exported bundle ends with the device's ``export`` checkpoint over its last entry.
    """

    mode: Literal["running", "stopped", "bundle"]
    now: datetime | None = None
    heartbeat: timedelta = HEARTBEAT
    grace: timedelta = GRACE


# --------------------------------------------------------------------------- entries


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
    kind = obj.get("type")
    if kind == "decision":
        expected_cols = (kind, obj.get("jti"), obj.get("iss"), obj.get("reason"))
    elif kind == "event":
        expected_cols = (kind, obj.get("jti"), obj.get("iss"), obj.get("event"))
    elif kind == "resident" and "jti" not in obj and "iss" not in obj:
        expected_cols = (kind, "", "", obj.get("change"))  # the resident's own changes name no request
    else:
        expected_cols = (None, None, None, None)
    if not at_ok or (typ, jti, iss, outcome) != expected_cols:
        return Problem(seq, "changed", f"entry {seq}'s searchable columns (time, request, agency or outcome) were changed; they no longer match the recorded entry."), digest
    return None, digest


# ------------------------------------------------------------------------ checkpoints


@dataclass
class _Checkpoint:
    """One row of ``access_log_checkpoints`` (or one bundle line), and what its signature showed."""

    index: int
    seq: Any
    hash: Any
    at_us: Any
    kid: Any
    jws: Any
    digest: str
    payload: dict[str, Any] | None = None
    why: str | None = None

    @property
    def valid(self) -> bool:
        return self.payload is not None

    @property
    def version(self) -> int:
        return int(self.payload["v"]) if self.payload else 0

    @property
    def reason(self) -> str | None:
        return self.payload.get("reason") if self.payload else None

    @property
    def at(self) -> datetime:
        assert self.payload is not None
        return parse_utc_z(self.payload["at"])


def _payload_shape(payload: dict[str, Any]) -> str | None:
    """Why a verified payload is not a checkpoint of version 1 or 2, or None."""
    v = payload.get("v")
    keys = set(payload)
    if v == 1 and type(v) is int:
        if keys != _V1_MEMBERS:
            return "has unexpected members for a version 1 checkpoint"
    elif v == 2 and type(v) is int:
        extra = keys - _V2_MEMBERS
        if not _V2_MEMBERS <= keys or extra - {"after", "lost"}:
            return "has unexpected members for a version 2 checkpoint"
        if payload["reason"] not in CHECKPOINT_REASONS:
            return f"gives an unknown reason {payload['reason']!r}"
        if ("after" in payload) != (payload["reason"] == "start"):
            return "has 'after' on a checkpoint that is not a start-up checkpoint, or lacks it on one that is"
        if "after" in payload and payload["after"] not in START_AFTER:
            return f"gives an unknown 'after' {payload['after']!r}"
        prev = payload["prev"]
        if prev is not None and not (isinstance(prev, str) and _HEX64.fullmatch(prev)):
            return "has a 'prev' that is not a SHA-256 in lowercase hex"
        lost = payload.get("lost")
        if "lost" in payload and not (
            isinstance(lost, dict) and set(lost) == {"seq", "found", "checkpoint"}
            and type(lost["seq"]) is int and type(lost["found"]) is int
            and (lost["checkpoint"] is None or (isinstance(lost["checkpoint"], str) and _HEX64.fullmatch(lost["checkpoint"])))
        ):  # fmt: skip
            return "has a malformed 'lost'"
    else:
        return f"has version {v!r}; this verifier reads versions 1 and 2"
    if payload.get("log") != LOG_ID:
        return "is for another log"
    if type(payload.get("seq")) is not int or payload["seq"] < 0:
        return "has a 'seq' that is not a whole number"
    if not isinstance(payload.get("hash"), str) or not _HEX64.fullmatch(payload["hash"]):
        return "has a 'hash' that is not a SHA-256 in lowercase hex"
    if type(payload.get("iat")) is not int:
        return "has an 'iat' that is not a whole number"
    try:
        parse_utc_z(payload.get("at"))  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return "has an 'at' that is not an RFC 3339 UTC time"
    return None


def _check_checkpoint(cp: _Checkpoint, kid: str) -> None:
    """Fill in ``cp.payload`` if the checkpoint is genuine and its columns agree with it, else ``cp.why``."""
    try:
        parsed = parse_compact(cp.jws, typ=CHECKPOINT_TYP)
    except (JwsError, ValueError):
        cp.why = "is not a readable signed checkpoint"
        return
    if parsed.kid != kid:
        cp.why = f"was signed by key {parsed.kid!r}, not this device's key {kid!r}"
        return
    device = parsed.claims.get("device")
    try:
        if not isinstance(device, dict) or set(device) != {"kty", "crv", "x"}:
            raise ValueError("not a bare public JWK")
        pub = ed25519_from_jwk(device, "device")
    except ValueError:
        cp.why = "names no usable device key"
        return
    if jwk_thumbprint(device) != kid:  # the thumbprint commits to the key: this is the pinned key itself
        cp.why = f"carries a device key whose thumbprint is not {kid!r}"
        return
    try:
        payload = parsed.verify(pub)
    except JwsError:
        cp.why = "has a signature that does not verify"
        return
    shape = _payload_shape(payload)
    if shape is not None:
        cp.why = shape
        return
    if (payload["seq"], payload["hash"], parsed.kid, to_us(parse_utc_z(payload["at"]))) != (cp.seq, cp.hash, cp.kid, cp.at_us):
        cp.why = "was changed: its columns differ from what the device signed"
        return
    cp.payload = payload


# --------------------------------------------------------------------------- witnesses


class WitnessError(ValueError):
    """A manifest given as a witness cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Witness:
    """A delivery manifest's ``log {seq, hash}``, once its device signature is checked."""

    name: str
    kid: str
    jti: str
    delivery_id: str
    iat: int
    seq: int
    hash: str


def parse_witness(text: str, name: str) -> Witness:
    """Read one delivery manifest (the compact JWS an agency keeps) as a witness of the log."""
    try:
        parsed = parse_compact(text.strip(), typ=MANIFEST_TYP)
    except (JwsError, ValueError) as exc:
        raise WitnessError(f"manifest {name} is not a device-signed delivery manifest ({exc})") from None
    claims = parsed.claims
    device = claims.get("device")
    try:
        if not isinstance(device, dict) or set(device) != {"kty", "crv", "x"}:
            raise ValueError("not a bare public JWK")
        pub = ed25519_from_jwk(device, "device")
    except ValueError:
        raise WitnessError(f"manifest {name} names no usable device key") from None
    if jwk_thumbprint(device) != parsed.kid:
        raise WitnessError(f"manifest {name}: its kid is not the thumbprint of the device key it carries")
    try:
        parsed.verify(pub)
    except JwsError:
        raise WitnessError(f"manifest {name}: the device signature does not verify") from None
    log, jti, delivery_id, iat = claims.get("log"), claims.get("jti"), claims.get("delivery_id"), claims.get("iat")
    if not (isinstance(log, dict) and set(log) == {"seq", "hash"} and type(log["seq"]) is int and log["seq"] >= 1
            and isinstance(log["hash"], str) and _HEX64.fullmatch(log["hash"])):
        raise WitnessError(f"manifest {name} has no usable log {{seq, hash}} member")
    if not isinstance(jti, str) or not isinstance(delivery_id, str) or type(iat) is not int:
        raise WitnessError(f"manifest {name} lacks jti, delivery_id or iat")
    return Witness(name, parsed.kid, jti, delivery_id, iat, int(log["seq"]), str(log["hash"]))


# ------------------------------------------------------------------------ verification


def verify_connection(
    conn: sqlite3.Connection,
    device_key: Any,
    *,
    tail: TailRules | None = None,
    witnesses: Sequence[tuple[str, str]] = (),
    tz: tzinfo = UTC,
) -> VerifyReport:
    """Verify the log in an open database (call it inside one read transaction for a consistent snapshot).

    ``device_key`` is the device's thumbprint (or public key) obtained outside the database: the
    pin, or a manifest. Without it, checkpoints cannot be checked, and that is a problem. A missing
    table (a database that never held a log) reads as an empty log.
    """
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "access_log" not in tables:
        return verify_rows(iter(()), [], device_key, tail=tail, witnesses=witnesses, tz=tz)
    count = int(conn.execute("SELECT COUNT(*) FROM access_log").fetchone()[0])
    cps = []
    if "access_log_checkpoints" in tables:
        cps = conn.execute("SELECT seq, hash, at_us, kid, jws FROM access_log_checkpoints ORDER BY id").fetchall()
    rows = conn.execute(
        "SELECT seq, at_us, type, jti, iss, outcome, entry, prev_hash, hash FROM access_log ORDER BY seq"
    )  # streamed: a years-long log need not fit in memory
    report = verify_rows(rows, cps, device_key, tail=tail, witnesses=witnesses, tz=tz)
    report.entries = count
    return report


def verify_rows(
    rows: Iterable[tuple[Any, ...]],
    cps: Sequence[tuple[Any, ...]],
    device_key: Any,
    *,
    tail: TailRules | None = None,
    witnesses: Sequence[tuple[str, str]] = (),
    tz: tzinfo = UTC,
) -> VerifyReport:
    """The verification itself, over rows ``(seq, at_us, type, jti, iss, outcome, entry, prev_hash, hash)``
    in seq order and checkpoint rows ``(seq, hash, at_us, kid, jws)`` in the order they were written."""
    kid = thumbprint_of(device_key)
    report = VerifyReport(checkpoints=len(cps), device_key=kid, mode=tail.mode if tail else None)

    def when(dt: datetime) -> str:
        return format_local(dt, tz)

    # 1. Every checkpoint's signature, against the thumbprint from outside the log.
    checkpoints = [
        _Checkpoint(i, seq, h, at_us, k, jws, checkpoint_digest(jws) if isinstance(jws, str) else "")
        for i, (seq, h, at_us, k, jws) in enumerate(cps)
    ]  # fmt: skip
    if kid is None:
        if checkpoints:
            report.problems.append(Problem(None, "device_key", (
                f"the log has {len(checkpoints)} signed checkpoint(s), but no device thumbprint was given to check them "
                "against; the key written inside a checkpoint proves nothing (anyone can write their own)"
            )))  # fmt: skip
        checkpoints_checked: list[_Checkpoint] = []
    else:
        for cp in checkpoints:
            _check_checkpoint(cp, kid)
            if not cp.valid:
                label = cp.seq if isinstance(cp.seq, int) else "?"
                report.problems.append(Problem(
                    max(cp.seq, 1) if isinstance(cp.seq, int) else None, "checkpoint_signature",
                    f"the signed checkpoint for entry {label} {cp.why}.",
                ))  # fmt: skip
        checkpoints_checked = checkpoints
    valid = [cp for cp in checkpoints_checked if cp.valid]

    # 2. The checkpoints' own chain: each version 2 checkpoint names the one written before it.
    prev_digest: str | None = None
    prev_valid: _Checkpoint | None = None
    seen_v2 = False
    for cp in checkpoints_checked:
        if cp.valid:
            assert cp.payload is not None
            if cp.version == 1 and seen_v2:
                report.problems.append(Problem(max(cp.seq, 1), "checkpoint_chain", (
                    f"the checkpoint for entry {cp.seq} is in the old format but comes after new-format ones: "
                    "checkpoints were moved or inserted."
                )))  # fmt: skip
            if cp.version == 2:
                seen_v2 = True
                if cp.payload["prev"] != prev_digest:
                    if prev_digest is None:
                        msg = (f"the checkpoints the device signed before the one for entry {cp.seq} "
                               f"({when(cp.at)}) were deleted.")
                    elif cp.payload["prev"] is None:
                        msg = (f"the checkpoint for entry {cp.seq} ({when(cp.at)}) was the first the device signed, "
                               "but other checkpoints come before it: they were inserted.")
                    else:
                        before = f"the one for entry {prev_valid.seq} ({when(prev_valid.at)})" if prev_valid else "the previous one"
                        msg = (f"a checkpoint the device signed between {before} and the one for entry {cp.seq} "
                               f"({when(cp.at)}) is missing: checkpoints were deleted or reordered.")
                    report.problems.append(Problem(max((prev_valid.seq if prev_valid else 0) + 1, 1), "checkpoint_chain", msg))
                if prev_valid is not None and cp.seq < prev_valid.seq:
                    report.problems.append(Problem(max(cp.seq, 1), "checkpoint_chain", (
                        f"the checkpoint for entry {cp.seq} was signed after one for entry {prev_valid.seq}: "
                        "checkpoints were reordered."
                    )))  # fmt: skip
                lost = cp.payload.get("lost")
                if lost is not None:
                    report.problems.append(Problem(lost["found"] + 1, "cut_noticed", (
                        f"on {when(cp.at)} the running agent found its log cut back: it had written entries up to "
                        f"{lost['seq']}, but only entries up to {lost['found']} were left (newer entries and "
                        "the checkpoints that covered them were deleted while it ran)."
                    )))  # fmt: skip
            prev_valid = cp
        prev_digest = cp.digest

    # 3. The entries' hash chain, remembering the hashes that checkpoints and manifests name.
    parsed_witnesses: list[Witness] = []
    for name, text in witnesses:
        try:
            parsed_witnesses.append(parse_witness(text, name))
        except WitnessError as exc:
            report.problems.append(Problem(None, "witness", f"{exc}."))
    wanted = {cp.seq for cp in valid} | {w.seq for w in parsed_witnesses}
    covered = max((cp.seq for cp in valid), default=0)
    prev = GENESIS_HASH
    hashes: dict[int, bytes] = {0: GENESIS_HASH}
    facts: dict[int, tuple[str, str]] = {}  # seq -> (jti, outcome) for witnessed entries
    first_uncovered_at: datetime | None = None
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
            facts[expected] = (row[3], row[5])
        if expected == covered + 1:
            first_uncovered_at = from_us(row[1])
        prev = digest
        expected += 1
        report.entries += 1
    last_seq = expected - 1
    report.head_seq, report.head_hash = last_seq, prev.hex()

    # 4. Each checkpoint against the chain it signed.
    last_good_cp = 0
    for cp in sorted(valid, key=lambda c: (c.seq, c.index)):
        report.last_checkpoint_seq = max(report.last_checkpoint_seq or 0, cp.seq)
        if broken_at is not None and cp.seq >= broken_at:
            continue
        if cp.seq > last_seq:
            report.problems.append(Problem(
                last_seq + 1, "truncated",
                f"the log ends at entry {last_seq}, but the device signed a checkpoint for entry {cp.seq}: "
                f"entries {last_seq + 1} to {cp.seq} were deleted.",
            ))  # fmt: skip
            continue
        if hashes.get(cp.seq, b"").hex() != cp.hash:
            start = last_good_cp + 1
            report.problems.append(Problem(
                start, "checkpoint_mismatch",
                f"entries {start} to {cp.seq} were rewritten: the hash chain no longer matches the checkpoint "
                f"the device signed for entry {cp.seq}.",
            ))  # fmt: skip
            continue
        last_good_cp = max(last_good_cp, cp.seq)
        report.checkpoints_ok += 1
    if valid:
        newest = valid[-1]
        report.last_checkpoint = {"seq": newest.seq, "at": newest.payload["at"] if newest.payload else None,
                                  "reason": newest.reason}

    # 5. Manifests the agencies hold: device-signed statements of the log at each grant.
    for w in parsed_witnesses:
        item = {"file": w.name, "jti": w.jti, "delivery_id": w.delivery_id, "seq": w.seq, "ok": False}
        report.witnesses.append(item)
        signed = when(datetime.fromtimestamp(w.iat, UTC))
        if kid is not None and w.kid != kid:
            report.problems.append(Problem(None, "witness", (
                f"manifest {w.name} was signed by device key {w.kid!r}, not this device's key {kid!r}: it comes from "
                "another camera, or this device's key was replaced."
            )))  # fmt: skip
        elif broken_at is not None and w.seq >= broken_at:
            report.notes.append(f"manifest {w.name} (entry {w.seq}) could not be checked: the log is broken before it")
        elif w.seq > last_seq:
            report.problems.append(Problem(last_seq + 1, "witness", (
                f"the log ends at entry {last_seq}, but on {signed} the device signed manifest {w.name} for request "
                f"{w.jti} at entry {w.seq}: entries {last_seq + 1} to {w.seq} at least were deleted."
            )))  # fmt: skip
        elif hashes.get(w.seq, b"").hex() != w.hash:
            report.problems.append(Problem(w.seq, "witness", (
                f"entry {w.seq} is not what the device signed on {signed} in manifest {w.name} for request {w.jti}: "
                f"the log was rewritten at or before entry {w.seq}."
            )))  # fmt: skip
        elif facts.get(w.seq, ("", ""))[0] != w.jti or facts[w.seq][1] not in GRANT_OUTCOMES:
            report.problems.append(Problem(w.seq, "witness", (
                f"entry {w.seq} does not record the grant of request {w.jti} that manifest {w.name} names."
            )))  # fmt: skip
        else:
            item["ok"] = True

    # 6. How the agent's runs ended, as the device recorded at each start.
    for i, cp in enumerate(valid):
        if cp.reason == "start" and cp.payload and cp.payload.get("after") == "unclean":
            prior = valid[i - 1] if i > 0 else None
            since = when(prior.at) if prior else "its previous start"
            late = (prior.seq if prior else 0) + 1
            signed_late = (f"; entries {late} to {cp.seq}, written before the stop, were signed only at the restart"
                           if cp.seq >= late else "")
            report.unclean_stops.append({"after": prior.payload["at"] if prior and prior.payload else None,
                                         "restarted": cp.payload["at"], "entries_signed_late": [late, cp.seq]
                                         if cp.seq >= late else None})
            report.notes.append(f"the agent stopped without a clean shutdown (a crash or power cut) some time after "
                                f"{since} and started again on {when(cp.at)}{signed_late}")

    # 7. The end of the log.
    if broken_at is None and tail is not None:
        _check_tail(report, tail, valid, covered, last_seq, first_uncovered_at, when)
    elif broken_at is None and last_seq > covered and not report.problems:
        report.notes.append(f"entries {covered + 1} to {last_seq} are not yet covered by a signed checkpoint")
    return report


def _check_tail(report: VerifyReport, tail: TailRules, valid: list[_Checkpoint], covered: int, last_seq: int,
                first_uncovered_at: datetime | None, when: Callable[[datetime], str]) -> None:
    """The rules of :class:`TailRules`: the end of the log, where a cut leaves no trace in the chain."""
    newest = valid[-1] if valid else None
    markers = [cp for cp in valid if cp.reason in ("start", "shutdown")]
    marker = markers[-1] if markers else None
    uncovered = last_seq > covered
    if tail.mode == "bundle":
        if newest is None or newest.reason != "export" or newest.seq != last_seq:
            report.problems.append(Problem(None, "export_missing", (
                f"the bundle does not end with the device's signed export checkpoint over its last entry ({last_seq}): "
                "entries or checkpoints were removed from its end or added to it."
            )))  # fmt: skip
        return
    if tail.mode == "stopped":
        if uncovered:
            msg = f"entries {covered + 1} to {last_seq} are not covered by any checkpoint the device signed"
            if marker is not None and marker.reason == "start":
                msg += (f". The agent is not running and did not shut down cleanly after it started on {when(marker.at)}: "
                        "it may have crashed or lost power before it could sign them; if so, start the agent and it "
                        "signs them at start-up, saying the stop was unclean. Otherwise they were added without the "
                        "device key.")
            else:
                msg += (": they were written without the device key (while the agent was stopped, by a command that "
                        "could not read the key, or by someone else). Start the agent: it signs the log at start-up.")
            report.problems.append(Problem(covered + 1, "tail_unsigned", msg))
        elif marker is not None and marker.reason == "start":
            report.problems.append(Problem(None, "unclean_stop", (
                f"the agent is not running, and the last thing it signed about its runs is that it started on "
                f"{when(marker.at)}, with no shutdown after that. Either it crashed or lost power, or the newest entries "
                "were deleted together with the checkpoints that covered them. Start the agent (it signs the log at "
                "start-up and records whether it had stopped cleanly), then verify again."
            )))  # fmt: skip
        elif marker is None and valid and newest is not None and newest.version == 2:
            report.problems.append(Problem(None, "unclean_stop", (
                "the log holds no start-up or shutdown checkpoint of the agent: the newest entries may have been "
                "deleted with their checkpoints. Start the agent, then verify again."
            )))  # fmt: skip
        return
    now = tail.now or datetime.now(UTC)
    limit = tail.heartbeat + tail.grace
    if marker is None or marker.reason != "start":
        last = f"its newest is a shutdown on {when(marker.at)}" if marker is not None else "there is none"
        report.problems.append(Problem(None, "not_started", (
            f"the agent is running, but the log holds no checkpoint it signed when it started ({last}): the newest "
            "checkpoints were deleted, with the entries they covered."
        )))  # fmt: skip
    if newest is not None and now - newest.at > limit:
        report.problems.append(Problem(None, "stale", (
            f"the newest checkpoint the device signed is from {when(newest.at)}, but the running agent signs one at "
            f"least every {int(tail.heartbeat.total_seconds() // 60)} minutes: newer checkpoints (and the entries they "
            "covered) were deleted, or the agent's housekeeping has stopped (see doorbell-agent status)."
        )))  # fmt: skip
    if uncovered:
        if first_uncovered_at is not None and now - first_uncovered_at > limit:
            report.problems.append(Problem(covered + 1, "tail_unsigned", (
                f"entries {covered + 1} to {last_seq} have waited since {when(first_uncovered_at)} without a signed "
                "checkpoint, but the running agent signs new entries within the hour: they were added without the "
                "device key, or its checkpoints were deleted."
            )))  # fmt: skip
        else:
            report.notes.append(f"entries {covered + 1} to {last_seq} are recent; the agent signs them within the hour")


# ------------------------------------------------------------------------------ bundle


BUNDLE_HEADER = ("kind", "format", "device", "kid", "entries", "checkpoints")
BUNDLE_ENTRY = ("kind", "seq", "at_us", "type", "jti", "iss", "outcome", "prev_hash", "hash", "entry")
BUNDLE_CHECKPOINT = ("kind", "seq", "hash", "at_us", "kid", "jws")


class BundleError(ValueError):
    def __init__(self, line: int, why: str) -> None:
        super().__init__(f"line {line} of the bundle {why}")
        self.line = line


def bundle_header_line(device_jwk: Mapping[str, str], kid: str, entries: int, checkpoints: int) -> bytes:
    device = {"kty": device_jwk["kty"], "crv": device_jwk["crv"], "x": device_jwk["x"]}
    return compact_json({"kind": "header", "format": BUNDLE_FORMAT, "device": device, "kid": kid,
                         "entries": entries, "checkpoints": checkpoints})


def bundle_entry_line(row: Sequence[Any]) -> bytes:
    """One ``access_log`` row ``(seq, at_us, type, jti, iss, outcome, entry, prev_hash, hash)`` as a bundle line."""
    seq, at_us, typ, jti, iss, outcome, entry, prev_hash, digest = row
    return compact_json({"kind": "entry", "seq": seq, "at_us": at_us, "type": typ, "jti": jti, "iss": iss,
                         "outcome": outcome, "prev_hash": prev_hash, "hash": digest, "entry": entry})


def bundle_checkpoint_line(row: Sequence[Any]) -> bytes:
    """One checkpoint row ``(seq, hash, at_us, kid, jws)`` as a bundle line."""
    seq, digest, at_us, kid, jws = row
    return compact_json({"kind": "checkpoint", "seq": seq, "hash": digest, "at_us": at_us, "kid": kid, "jws": jws})


def _bundle_line(line: bytes, number: int, members: tuple[str, ...], kind: str) -> dict[str, Any]:
    try:
        obj = strict_json(line, f"line {number}")
    except ValueError as exc:
        raise BundleError(number, f"is not strict JSON ({exc})") from None
    if not isinstance(obj, dict) or tuple(obj) != members:
        raise BundleError(number, f"must be a {kind} line with exactly the members {', '.join(members)}, in that order")
    if obj["kind"] != kind:
        raise BundleError(number, f"should be a {kind} line, not {obj['kind']!r}")
    if compact_json(obj) != line:  # any change of spacing or escaping is an edit too
        raise BundleError(number, "is not written exactly as the bundle format says (spacing or escaping was changed)")
    return obj


def read_bundle(data: bytes) -> tuple[dict[str, Any], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Split an exported bundle into its header, entry rows and checkpoint rows; :class:`BundleError` if its form is off."""
    if not data.endswith(b"\n"):
        raise BundleError(max(data.count(b"\n") + 1, 1), "does not end with a newline: the file was cut short or edited")
    lines = data[:-1].split(b"\n")
    header = _bundle_line(lines[0], 1, BUNDLE_HEADER, "header")
    if header["format"] != BUNDLE_FORMAT:
        raise BundleError(1, f"names format {header['format']!r}; this verifier reads {BUNDLE_FORMAT!r}")
    n, m = header["entries"], header["checkpoints"]
    if type(n) is not int or type(m) is not int or n < 0 or m < 0:
        raise BundleError(1, "must give whole numbers of entries and checkpoints")
    if len(lines) != 1 + n + m:
        raise BundleError(len(lines), f"is the last of {len(lines)} lines, but the header announces 1 + {n} entries + {m} checkpoints")
    device = header["device"]
    if not isinstance(device, dict) or set(device) != {"kty", "crv", "x"} or not isinstance(header["kid"], str):
        raise BundleError(1, "must carry the device's public key as {kty, crv, x} and its thumbprint as kid")
    try:
        ed25519_from_jwk(device, "device")
    except ValueError:
        raise BundleError(1, "carries a device key that is not an Ed25519 public key") from None
    if jwk_thumbprint(device) != header["kid"]:
        raise BundleError(1, "gives a kid that is not the thumbprint of its device key")
    rows = []
    for i in range(n):
        o = _bundle_line(lines[1 + i], 2 + i, BUNDLE_ENTRY, "entry")
        if type(o["seq"]) is not int or type(o["at_us"]) is not int or not all(
            isinstance(o[k], str) for k in ("type", "jti", "iss", "outcome", "prev_hash", "hash", "entry")
        ):
            raise BundleError(2 + i, "has a member of the wrong type (seq and at_us are integers, the rest text)")
        rows.append((o["seq"], o["at_us"], o["type"], o["jti"], o["iss"], o["outcome"], o["entry"], o["prev_hash"], o["hash"]))
    cps = []
    for j in range(m):
        number = 2 + n + j
        o = _bundle_line(lines[1 + n + j], number, BUNDLE_CHECKPOINT, "checkpoint")
        if type(o["seq"]) is not int or type(o["at_us"]) is not int or not all(isinstance(o[k], str) for k in ("hash", "kid", "jws")):
            raise BundleError(number, "has a member of the wrong type (seq and at_us are integers, the rest text)")
        cps.append((o["seq"], o["hash"], o["at_us"], o["kid"], o["jws"]))
    return header, rows, cps


def verify_bundle(
    data: bytes, device_key: Any, *, witnesses: Sequence[tuple[str, str]] = (), tz: tzinfo = UTC
) -> VerifyReport:
    """Check an exported bundle on any machine, against the device thumbprint the auditor obtained elsewhere."""
    kid = thumbprint_of(device_key)
    if kid is None:
        raise ValueError("checking a bundle needs the device's thumbprint")
    try:
        header, rows, cps = read_bundle(data)
    except BundleError as exc:
        report = VerifyReport(device_key=kid, mode="bundle")
        report.problems.append(Problem(None, "bundle_format", f"{exc}."))
        return report
    report = verify_rows(iter(rows), cps, kid, tail=TailRules("bundle"), witnesses=witnesses, tz=tz)
    report.entries = len(rows)
    if header["kid"] != kid:
        report.problems.append(Problem(None, "device_key", (
            f"the bundle says it comes from the device with thumbprint {header['kid']!r}, not {kid!r}, the one you asked "
            "to check it against."
        )))  # fmt: skip
    return report
