"""The decision procedure of PROTOCOL.md section 4, as one pure function.

:func:`decide` reads no disk, no network and no clock: the caller hands it
the message, the trust store, the resident's rules, a view of the agent's
state and the time. The same inputs always give the same :class:`Decision`,
which is what lets the protocol's vectors be the acceptance test.

The checks run in the protocol's order, 1 to 22; the first that fails is the
reason. Until the signatures have verified (reasons 1-4) nothing in the
message is trusted, and the decision carries nothing from it but the reason
and a debugging detail, so that a flood of junk can be counted, not logged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

from agent.config import PolicyConfig
from agent.protocol.geo import haversine_m
from agent.protocol.jose import BadSignatureError, MalformedError, OversizeError, UnknownKeyError, parse_unverified, verify_signatures
from agent.protocol.request import FootageRequest
from agent.protocol.schedule import Interval, Rule, longest_piece, scheduled_pieces
from agent.protocol.trust import TrustStore

CLOCK_SKEW_S = 60
RATE_WINDOW = timedelta(hours=24)
MIN_SHARE = timedelta(seconds=1)


class Reason(str, Enum):
    """Section-4 reason codes, plus ``duplicate`` (a second copy of a request already decided)."""

    OVERSIZE = "oversize"
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_ISSUER = "wrong_issuer"
    OVERSIGHT_REQUIRED = "oversight_required"
    WRONG_AUDIENCE = "wrong_audience"
    CLOCK_UNSYNCED = "clock_unsynced"
    KEY_NOT_VALID = "key_not_valid"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    KILL_SWITCH = "kill_switch"
    NO_CONSENT = "no_consent"
    WARRANT_REQUIRED = "warrant_required"
    RADIUS_TOO_LARGE = "radius_too_large"
    OUTSIDE_GEOFENCE = "outside_geofence"
    WINDOW_TOO_LONG = "window_too_long"
    OUTSIDE_CONSENT = "outside_consent"
    NO_FOOTAGE = "no_footage"
    RATE_LIMITED = "rate_limited"
    GRANTED = "granted"
    AWAITING_RESIDENT = "awaiting_resident"
    DECLINED_BY_RESIDENT = "declined_by_resident"
    APPROVAL_EXPIRED = "approval_expired"
    DUPLICATE = "duplicate"

    def __str__(self) -> str:
        return self.value


PRE_AUTH_REASONS = frozenset({Reason.OVERSIZE, Reason.MALFORMED, Reason.UNKNOWN_KEY, Reason.BAD_SIGNATURE})
# Checks 1 to 11: a message refused by one of these does not use up its jti (step 12), so a copy
# stripped of its co-signature, or one that arrived late, cannot block the genuine request.
BEFORE_REPLAY_REASONS = PRE_AUTH_REASONS | frozenset({
    Reason.WRONG_ISSUER, Reason.OVERSIGHT_REQUIRED, Reason.WRONG_AUDIENCE, Reason.CLOCK_UNSYNCED,
    Reason.KEY_NOT_VALID, Reason.NOT_YET_VALID, Reason.EXPIRED,
})


@dataclass(frozen=True, slots=True)
class Policy:
    """The resident's rules in the form the decision uses (validated by :class:`PolicyConfig`)."""

    program: str
    lat: float
    lon: float
    tz: ZoneInfo
    consent_start: datetime
    consent_end: datetime
    consent_withdrawn: bool
    schedule: tuple[Rule, ...]
    max_radius_m: float
    max_window_s: int
    max_age_s: int
    require_oversight: bool
    require_warrant: bool
    grants_per_issuer_per_day: int
    approval: Literal["auto", "ask"]

    def consents_at(self, now: datetime) -> bool:
        """Step 14: inside the consent period ``[start, end)`` and not withdrawn."""
        return not self.consent_withdrawn and self.consent_start <= now < self.consent_end

    @classmethod
    def from_config(cls, cfg: PolicyConfig) -> Policy:
        return cls(
            program=cfg.program,
            lat=cfg.location.lat,
            lon=cfg.location.lon,
            tz=ZoneInfo(cfg.timezone),
            consent_start=cfg.consent.start,
            consent_end=cfg.consent.end,
            consent_withdrawn=cfg.consent.withdrawn,
            schedule=tuple(Rule.parse(r.days, r.from_, r.to) for r in cfg.consent.schedule),
            max_radius_m=cfg.max_radius_m,
            max_window_s=cfg.max_window_s,
            max_age_s=cfg.max_age_s,
            require_oversight=cfg.require_oversight,
            require_warrant=cfg.require_warrant,
            grants_per_issuer_per_day=cfg.grants_per_issuer_per_day,
            approval=cfg.approval,
        )

    @classmethod
    def from_mapping(cls, obj: dict[str, Any]) -> Policy:
        """From a dict in the configuration's ``[policy]`` shape (e.g. a vector's ``agent`` policy members).

        Raises ``pydantic.ValidationError`` exactly as the configuration would.
        """
        return cls.from_config(PolicyConfig.model_validate(obj))


class AgentState(Protocol):
    """What the decision reads of the agent's state; implemented over SQLite and files elsewhere."""

    @property
    def clock_synced(self) -> bool: ...

    @property
    def kill_switch(self) -> bool: ...

    def seen(self, jti: str) -> str | None:
        """The sha256 (hex) of the message that carried ``jti`` before, or None."""

    def grants_since(self, iss: str, since: datetime) -> int:
        """How many grants to ``iss`` happened after ``since``."""

    def recorded(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """Spans of footage the buffer holds that overlap ``[start, end]``; gaps between spans are gaps in recording."""


@dataclass(frozen=True, slots=True)
class Decision:
    reason: Reason
    request: FootageRequest | None = None  # only once signatures have verified
    kids: tuple[str, ...] = ()  # distinct signer kids, in message order
    issuer: str | None = None  # the claim iss, once authenticated
    payload_sha256: str | None = None  # sha256 hex of the whole message, once authenticated (replay memory)
    granted: Interval | None = None  # for granted and awaiting_resident
    detail: str = ""  # for the debug log: which field, which key; never sent anywhere

    @property
    def pre_auth(self) -> bool:
        """Reasons 1-4: counted, not logged one by one."""
        return self.reason in PRE_AUTH_REASONS

    @property
    def uses_jti(self) -> bool:
        """Passed checks 1 to 11: from now on its jti counts as seen (step 12)."""
        return self.reason not in BEFORE_REPLAY_REASONS

    @property
    def shares(self) -> bool:
        return self.reason is Reason.GRANTED


def message_sha256(message: bytes) -> str:
    """The replay memory's fingerprint: sha256 of the MQTT payload exactly as received (as the vectors' ``payload_sha256``)."""
    return hashlib.sha256(message).hexdigest()


def decide(message: bytes, *, trust: TrustStore, policy: Policy, state: AgentState, now: datetime,
           request_time: datetime | None = None) -> Decision:
    """Decide one request message; never raises for anything the message contains.

    ``now`` must be timezone-aware (a naive time is a programming error and raises ``ValueError``).
    ``request_time`` (default ``now``) is the instant at which the request's own lifetime is judged
    (steps 10 and 11: ``iat``, ``nbf``, ``exp``). Deciding a request as it arrives, both are now.
    Re-checking a grant before its delivery runs passes the grant's instant: the request was
    acted on while it was valid, and a delivery delayed past ``exp`` by an outage or a restart
    must not fail for that, while everything the resident and the trust store control (keys,
    consent, rules, footage, limits) is still judged at ``now``.
    """
    if now.tzinfo is None or (request_time is not None and request_time.tzinfo is None):
        raise ValueError("decide() needs aware datetimes for now and request_time")
    # 1-2: size, then shape. Nothing below this block may trust the message until 3-4 pass.
    try:
        jws = parse_unverified(message)
        unverified_request = FootageRequest.from_claims(jws.claims)
    except OversizeError as exc:
        return Decision(Reason.OVERSIZE, detail=str(exc))
    except MalformedError as exc:
        return Decision(Reason.MALFORMED, detail=str(exc))
    # 3-4: every kid known, every signature good.
    try:
        kids = verify_signatures(jws, trust.public_key)
    except UnknownKeyError as exc:
        return Decision(Reason.UNKNOWN_KEY, detail=str(exc))
    except BadSignatureError as exc:
        return Decision(Reason.BAD_SIGNATURE, detail=str(exc))
    req = unverified_request  # authenticated from here on
    signers = [trust.get(kid) for kid in kids]
    d = _Builder(req, kids, message_sha256(message))

    # 5-6: who signed.
    if not any(k is not None and k.role == "requester" and k.iss == req.iss for k in signers):
        return d(Reason.WRONG_ISSUER, f"no requester key for iss {req.iss!r} among {list(kids)}")
    # An agency cannot oversee itself: only an oversight key of another iss counts.
    if policy.require_oversight and not any(k is not None and k.counts_as_oversight_for(req.iss) for k in signers):
        return d(Reason.OVERSIGHT_REQUIRED)
    # 7-11: for whom, and when.
    if req.aud != policy.program:
        return d(Reason.WRONG_AUDIENCE, f"aud {req.aud!r}")
    if not state.clock_synced:
        return d(Reason.CLOCK_UNSYNCED)
    for k in signers:
        if k is None or not k.valid_at(now):
            return d(Reason.KEY_NOT_VALID, f"key {k.kid if k else '?'!r} is revoked or outside its validity period")
    t = (request_time or now).timestamp()
    if t < req.iat - CLOCK_SKEW_S or (req.nbf is not None and t < req.nbf - CLOCK_SKEW_S):
        return d(Reason.NOT_YET_VALID)
    if t > req.exp + CLOCK_SKEW_S:
        return d(Reason.EXPIRED)
    # 12: replay memory.
    previous = state.seen(req.jti)
    if previous is not None:
        return d(Reason.DUPLICATE if previous == d.sha256 else Reason.REPLAYED)
    # 13-18: the resident's rules.
    if state.kill_switch:
        return d(Reason.KILL_SWITCH)
    if not policy.consents_at(now):
        return d(Reason.NO_CONSENT)
    if policy.require_warrant and req.basis != "warrant":
        return d(Reason.WARRANT_REQUIRED)
    if req.area.radius_m > policy.max_radius_m:
        return d(Reason.RADIUS_TOO_LARGE)
    distance = haversine_m(policy.lat, policy.lon, req.area.lat, req.area.lon)
    if distance > req.area.radius_m:
        return d(Reason.OUTSIDE_GEOFENCE, f"{distance:.0f} m from the camera, radius {req.area.radius_m:g} m")
    if req.window_s > policy.max_window_s:
        return d(Reason.WINDOW_TOO_LONG)
    # 19: what may be shared.
    lo = max(req.window_start, policy.consent_start, now - timedelta(seconds=policy.max_age_s))
    hi = min(req.window_end, policy.consent_end, now)
    piece = longest_piece(scheduled_pieces(lo, hi, policy.tz, policy.schedule)) if lo < hi else None
    if piece is None or piece[1] - piece[0] < MIN_SHARE:
        return d(Reason.OUTSIDE_CONSENT)
    # 20: what the buffer holds of it.
    granted = footage_within(piece, state.recorded(*piece))
    if granted is None:
        return d(Reason.NO_FOOTAGE)
    # 21-22: how often, and whether the resident decides.
    if state.grants_since(req.iss, now - RATE_WINDOW) >= policy.grants_per_issuer_per_day:
        return d(Reason.RATE_LIMITED)
    if policy.approval == "ask":
        return d(Reason.AWAITING_RESIDENT, granted=granted)
    return d(Reason.GRANTED, granted=granted)


def footage_within(piece: Interval, spans: list[tuple[datetime, datetime]]) -> Interval | None:
    """The smallest interval holding all recorded footage inside ``piece``, or None under one second of it."""
    lo, hi = piece
    clipped = sorted((max(s, lo), min(e, hi)) for s, e in spans if max(s, lo) < min(e, hi))
    if not clipped:
        return None
    total = timedelta(0)
    covered_to = clipped[0][0]
    for s, e in clipped:  # union length: overlapping spans are not counted twice
        if e > covered_to:
            total += e - max(s, covered_to)
            covered_to = e
    if total < MIN_SHARE:
        return None
    first, last = clipped[0][0], covered_to
    return first, last


class _Builder:
    """Fills in what every post-authentication decision carries."""

    __slots__ = ("req", "kids", "sha256")

    def __init__(self, req: FootageRequest, kids: tuple[str, ...], sha256: str) -> None:
        self.req, self.kids, self.sha256 = req, kids, sha256

    def __call__(self, reason: Reason, detail: str = "", *, granted: Interval | None = None) -> Decision:
        return Decision(reason, self.req, self.kids, self.req.iss, self.sha256, granted, detail)
