"""The claims of a footage request (PROTOCOL.md section 3), validated exactly.

:func:`FootageRequest.from_claims` accepts one shape only: the exact member
set, JSON types taken literally (``true`` is not a number, ``1.0`` is not a
NumericDate), every range and pattern of the table. Anything else raises
:class:`RequestError` naming the member and the rule it broke; the decision
procedure records that as ``malformed`` and keeps the detail for debugging.

A :class:`FootageRequest` says nothing about authenticity by itself: the
decision procedure builds one before it checks signatures (a malformed
request is refused before any key is looked up) and hands it on only once
the signatures have verified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypeGuard

from agent.protocol.jose import MalformedError, b64url_decode
from agent.timeutil import from_epoch, parse_utc_z_ns

Basis = Literal["consent", "warrant"]
_BASES: tuple[Basis, ...] = ("consent", "warrant")
MAX_LIFETIME_S = 900
MAX_WINDOW = timedelta(hours=12)
MAX_RADIUS_M = 2000.0
MAX_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z: keeps datetime conversions in range

CLAIMS = frozenset(
    {"v", "jti", "iss", "aud", "sub", "iat", "exp", "case", "purpose", "basis", "area", "window", "recipient"}
)
OPTIONAL_CLAIMS = frozenset({"nbf", "warrant"})

_JTI = re.compile(r"[A-Za-z0-9_-]{16,64}")
_ISS = re.compile(r"[a-z0-9._-]{1,64}")
_AUD = re.compile(r"[\x20-\x7e]{1,128}")
# Category Cc is exactly U+0000-U+001F and U+007F-U+009F. Lone surrogates are not
# characters at all (and would break UTF-8 logging later), so they are refused too.
_NOT_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class RequestError(MalformedError):
    """A claim is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True, slots=True)
class Area:
    lat: float
    lon: float
    radius_m: float


@dataclass(frozen=True, slots=True)
class Warrant:
    ref: str
    court: str


@dataclass(frozen=True, slots=True)
class Recipient:
    """The requester's one-time X25519 key for this request's deliveries."""

    x: str
    public_bytes: bytes

    def to_jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "X25519", "x": self.x}


@dataclass(frozen=True, slots=True)
class FootageRequest:
    jti: str
    iss: str
    aud: str
    sub: str
    iat: int
    nbf: int | None
    exp: int
    case: str
    purpose: str
    basis: Basis
    warrant: Warrant | None
    area: Area
    window_start: datetime
    window_end: datetime
    recipient: Recipient

    @property
    def window_s(self) -> float:
        return (self.window_end - self.window_start).total_seconds()

    @property
    def issued_at(self) -> datetime:
        return from_epoch(self.iat)

    @property
    def expires_at(self) -> datetime:
        return from_epoch(self.exp)

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> FootageRequest:
        """Validate a decoded claims object; raise :class:`RequestError` on the first problem."""
        _members(claims, CLAIMS, OPTIONAL_CLAIMS, "claims")
        if not _is_int(claims["v"]) or claims["v"] != 1:
            raise RequestError("v", f"{claims['v']!r} is not protocol version 1")
        jti = _pattern(claims, "jti", _JTI, "16..64 of A-Z a-z 0-9 _ -")
        iss = _pattern(claims, "iss", _ISS, "1..64 of a-z 0-9 . _ -")
        aud = _pattern(claims, "aud", _AUD, "1..128 printable ASCII characters")
        sub = _text(claims, "sub", 64)
        iat = _numeric_date(claims, "iat")
        exp = _numeric_date(claims, "exp")
        nbf = _numeric_date(claims, "nbf") if "nbf" in claims else None
        if not iat < exp <= iat + MAX_LIFETIME_S:
            raise RequestError("exp", f"must be after iat and at most {MAX_LIFETIME_S} s after it (iat {iat}, exp {exp})")
        case = _text(claims, "case", 64)
        purpose = _text(claims, "purpose", 280)
        basis = claims["basis"]
        if not _is_basis(basis):
            raise RequestError("basis", f"{basis!r} is neither 'consent' nor 'warrant'")
        warrant = None
        if basis == "warrant":
            if "warrant" not in claims:
                raise RequestError("warrant", "basis is 'warrant' but the warrant member is missing")
            w = _object(claims, "warrant", {"ref", "court"})
            warrant = Warrant(ref=_text(w, "ref", 64, "warrant."), court=_text(w, "court", 128, "warrant."))
        elif "warrant" in claims:
            raise RequestError("warrant", "present although basis is 'consent'")
        a = _object(claims, "area", {"lat", "lon", "radius_m"})
        lat = _number(a, "lat", "area.")
        lon = _number(a, "lon", "area.")
        radius_m = _number(a, "radius_m", "area.")
        if not -90 <= lat <= 90:
            raise RequestError("area.lat", f"{lat} is outside [-90, 90]")
        if not -180 <= lon <= 180:
            raise RequestError("area.lon", f"{lon} is outside [-180, 180]")
        if not 0 < radius_m <= MAX_RADIUS_M:
            raise RequestError("area.radius_m", f"{radius_m} is outside (0, {MAX_RADIUS_M:g}]")
        w = _object(claims, "window", {"start", "end"})
        (start, start_ns), (end, end_ns) = _utc_z(w, "start"), _utc_z(w, "end")
        # Compared in nanoseconds: the protocol allows nine fractional digits, a datetime keeps six.
        if not start_ns < end_ns:
            raise RequestError("window", "start must be before end")
        if end_ns - start_ns > MAX_WINDOW // timedelta(microseconds=1) * 1000:
            raise RequestError("window", "longer than 12 hours")
        r = _object(claims, "recipient", {"kty", "crv", "x"})
        if r["kty"] != "OKP" or r["crv"] != "X25519":
            raise RequestError("recipient", "must be an OKP key on curve X25519")
        x = r["x"]
        if not isinstance(x, str):
            raise RequestError("recipient.x", "not a string")
        try:
            public = b64url_decode(x, "recipient.x")
        except MalformedError as exc:
            raise RequestError(exc.where, exc.why) from None
        if len(public) != 32:
            raise RequestError("recipient.x", f"decodes to {len(public)} bytes, not 32")
        return cls(
            jti=jti, iss=iss, aud=aud, sub=sub, iat=iat, nbf=nbf, exp=exp, case=case, purpose=purpose,
            basis=basis, warrant=warrant, area=Area(float(lat), float(lon), float(radius_m)),
            window_start=start, window_end=end, recipient=Recipient(x=x, public_bytes=public),
        )  # fmt: skip


def _members(obj: dict[str, Any], required: frozenset[str] | set[str], optional: frozenset[str], where: str) -> None:
    keys = obj.keys()
    if keys - required - optional:
        raise RequestError(where, f"unknown member(s) {sorted(keys - required - optional)}")
    if required - keys:
        raise RequestError(where, f"missing member(s) {sorted(required - keys)}")


def _object(claims: dict[str, Any], name: str, members: set[str]) -> dict[str, Any]:
    obj = claims[name]
    if not isinstance(obj, dict):
        raise RequestError(name, "not a JSON object")
    _members(obj, members, frozenset(), name)
    return obj


def _is_basis(v: object) -> TypeGuard[Basis]:
    return v in _BASES and isinstance(v, str)


def _is_int(v: Any) -> bool:
    return type(v) is int  # excludes bool (a subclass of int) and floats such as 1.0


def _number(obj: dict[str, Any], name: str, prefix: str = "") -> float | int:
    v = obj[name]
    if type(v) not in (int, float):  # bool is not a number here; json never yields other numeric types
        raise RequestError(prefix + name, f"{v!r} is not a number")
    return v


def _numeric_date(obj: dict[str, Any], name: str) -> int:
    v = obj[name]
    if not _is_int(v) or not 0 <= v <= MAX_NUMERIC_DATE:
        raise RequestError(name, f"{v!r} is not a NumericDate (whole seconds since the epoch)")
    return v


def _pattern(obj: dict[str, Any], name: str, pattern: re.Pattern[str], rule: str) -> str:
    v = obj[name]
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise RequestError(name, f"{v!r} is not {rule}")
    return v


def _text(obj: dict[str, Any], name: str, max_len: int, prefix: str = "") -> str:
    v = obj[name]
    if not isinstance(v, str) or not 1 <= len(v) <= max_len:
        raise RequestError(prefix + name, f"must be text of 1..{max_len} characters")
    if _NOT_TEXT.search(v):
        raise RequestError(prefix + name, "contains a control character")
    return v


def _utc_z(obj: dict[str, Any], name: str) -> tuple[datetime, int]:
    v = obj[name]
    try:
        return parse_utc_z_ns(v)
    except ValueError:
        raise RequestError(f"window.{name}", f"{v!r} is not an RFC 3339 UTC time ending in Z") from None
