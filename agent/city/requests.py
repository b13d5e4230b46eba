"""Building a footage request (protocol section 3) and choosing where to publish it (section 2).

Everything here is pure: no network, no files. ``doorbell-city request``
puts it together with :mod:`agent.city.mqtt`.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.city.keys import ISS_PATTERN, SigningKey
from agent.errors import UserError
from agent.protocol import geohash
from agent.protocol.geo import EARTH_RADIUS_M, haversine_m
from agent.protocol.jose import b64url_decode, b64url_encode, sign_compact, sign_general, strict_json
from agent.timeutil import UTC, format_utc

REQUEST_TYP = "footage-request+jwt"
MAX_PAYLOAD_BYTES = 16384
MAX_LIFETIME_S = 900
DEFAULT_LIFETIME_S = 600
MAX_RADIUS_M = 2000.0
MAX_WINDOW = timedelta(hours=12)
COVER_PRECISION = 5
# Publish to cells within radius * (1 + margin): the protocol lets an agent's distance
# formula differ from haversine by 0.5 %, so a camera just outside our circle by our
# arithmetic may be inside by its own. An extra copy costs little; a missed camera costs a lead.
COVER_MARGIN = 0.01

_JTI = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class BuiltRequest(NamedTuple):
    message: str
    jti: str
    recipient_private: dict[str, str]
    """The one-time X25519 private JWK (kty, crv, x, d): keep it secret until the deliveries are opened."""


def _text(name: str, value: Any, max_len: int) -> str:
    """Protocol "text": 1..max_len characters, none of them a control character (Cc)."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{name} is required and must not be empty")
    if len(value) > max_len:
        raise UserError(f"{name} is {len(value)} characters long; the limit is {max_len}")
    if any(unicodedata.category(c) == "Cs" for c in value):
        raise UserError(f"{name} is not valid Unicode text (it holds a lone surrogate); check the terminal's encoding")
    bad = [c for c in value if unicodedata.category(c) == "Cc"]
    if bad:
        raise UserError(f"{name} contains a control character ({bad[0]!r}, e.g. a newline or tab); remove it")
    return value


def _number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, not {value!r}")
    if value > hi or value < lo or (lo_open and value == lo):
        span = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise UserError(f"{name} {value!r} is out of range; it must be in {span}")
    return value


def _json_number(value: float) -> int | float:
    """Write 300.0 as 300: the same number, in the form every JSON reader agrees on."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else float(value)


def new_recipient_key() -> tuple[dict[str, str], dict[str, str]]:
    """A fresh X25519 key pair for one request's deliveries: (private JWK, public JWK)."""
    private = X25519PrivateKey.generate()
    x = b64url_encode(private.public_key().public_bytes_raw())
    d = b64url_encode(private.private_bytes_raw())
    return {"kty": "OKP", "crv": "X25519", "x": x, "d": d}, {"kty": "OKP", "crv": "X25519", "x": x}


def sign_request(payload: dict[str, Any], keys: Sequence[SigningKey]) -> str:
    """JWS over the claims: compact with one key, general JSON serialization with two to four."""
    if not 1 <= len(keys) <= 4:
        raise UserError("a request carries one to four signatures")
    if len({k.kid for k in keys}) != len(keys):
        raise UserError("the same kid appears twice among the signing keys; use distinct keys")
    headers = [{"alg": "Ed25519", "kid": key.kid, "typ": REQUEST_TYP} for key in keys]
    if len(keys) == 1:
        return sign_compact(headers[0], payload, keys[0])
    return sign_general(payload, list(zip(headers, keys)))


def build_request(
    *,
    requester: SigningKey,
    oversight: SigningKey | None = None,
    program: str,
    officer: str,
    case: str,
    purpose: str,
    basis: str,
    lat: float,
    lon: float,
    radius_m: float,
    window_start: datetime,
    window_end: datetime,
    warrant_ref: str | None = None,
    court: str | None = None,
    lifetime_s: int = DEFAULT_LIFETIME_S,
    now: datetime | None = None,
    jti: str | None = None,
    not_before: datetime | None = None,
) -> BuiltRequest:
    """Check every claim, make a one-time recipient key, and sign.

    ``iss`` is the requester key's agency (section 4 check 5 compares them), so
    it is not a separate argument. Raises :class:`UserError` naming the field.
    """
    if requester.role != "requester":
        raise UserError(f"the signing key {requester.kid!r} has role {requester.role!r}; a request is signed by a requester key")
    if not ISS_PATTERN.match(requester.iss):
        raise UserError(f"the signing key's iss {requester.iss!r} is not an agency id")
    if oversight is not None and oversight.role != "oversight":
        raise UserError(f"the co-signing key {oversight.kid!r} has role {oversight.role!r}; it must be an oversight key")
    if not isinstance(program, str) or not 1 <= len(program) <= 128 or not all(" " <= c <= "~" for c in program):
        raise UserError("--program (aud) must be 1 to 128 printable ASCII characters, exactly the program id residents enrolled in")
    _text("--officer", officer, 64)
    _text("--case", case, 64)
    _text("--purpose", purpose, 280)
    if basis not in ("consent", "warrant"):
        raise UserError(f"--basis {basis!r} must be consent or warrant")
    if basis == "warrant":
        if warrant_ref is None or court is None:
            raise UserError("--basis warrant needs --warrant-ref and --court")
        _text("--warrant-ref", warrant_ref, 64)
        _text("--court", court, 128)
    elif warrant_ref is not None or court is not None:
        raise UserError("--warrant-ref and --court go with --basis warrant only")
    _number("--lat", lat, -90, 90)
    _number("--lon", lon, -180, 180)
    _number("--radius", radius_m, 0, MAX_RADIUS_M, lo_open=True)
    for name, t in (("--from", window_start), ("--to", window_end)):
        if not isinstance(t, datetime) or t.tzinfo is None:
            raise UserError(f"{name} must be a time with a zone (RFC 3339, e.g. 2026-12-03T16:30:00Z)")
    if not window_start < window_end:
        raise UserError("--from must be before --to")
    if window_end - window_start > MAX_WINDOW:
        raise UserError("the footage window (--from to --to) may be at most 12 hours long")
    if isinstance(lifetime_s, bool) or not isinstance(lifetime_s, int) or not 1 <= lifetime_s <= MAX_LIFETIME_S:
        raise UserError(f"--lifetime {lifetime_s!r} must be a whole number of seconds from 1 to {MAX_LIFETIME_S}")
    jti = jti or b64url_encode(os.urandom(16))
    if not _JTI.match(jti):
        raise UserError(f"jti {jti!r} must be 16 to 64 of A-Z a-z 0-9 _ -")

    iat = int((now or datetime.now(UTC)).timestamp())
    recipient_private, recipient_public = new_recipient_key()
    payload: dict[str, Any] = {
        "v": 1,
        "jti": jti,
        "iss": requester.iss,
        "aud": program,
        "sub": officer,
        "iat": iat,
    }
    if not_before is not None:
        payload["nbf"] = int(not_before.timestamp())
    payload.update(
        {
            "exp": iat + lifetime_s,
            "case": case,
            "purpose": purpose,
            "basis": basis,
        }
    )
    if basis == "warrant":
        payload["warrant"] = {"ref": warrant_ref, "court": court}
    payload.update(
        {
            "area": {"lat": _json_number(lat), "lon": _json_number(lon), "radius_m": _json_number(radius_m)},
            "window": {"start": format_utc(window_start.astimezone(UTC)), "end": format_utc(window_end.astimezone(UTC))},
            "recipient": recipient_public,
        }
    )
    keys = [requester] + ([oversight] if oversight is not None else [])
    message = sign_request(payload, keys)
    size = len(message.encode("utf-8"))
    if size > MAX_PAYLOAD_BYTES:
        raise UserError(f"the signed request is {size} bytes; agents drop anything over {MAX_PAYLOAD_BYTES}. Shorten --purpose")
    return BuiltRequest(message, jti, recipient_private)


def request_claims(message: str) -> dict[str, Any]:
    """The claims of a request we built (no verification: for our own bookkeeping only)."""
    if message.startswith("{"):
        payload_b64 = strict_json(message, "message")["payload"]
    else:
        payload_b64 = message.split(".")[1]
    return strict_json(b64url_decode(payload_b64, "payload"), "payload")


# --- where to publish: the precision-5 geohash cells the circle touches -------------------


def distance_to_cell_m(lat: float, lon: float, cell: str) -> float:
    """Great-circle distance from a point to the nearest point of a geohash cell (0 inside).

    A cell is bounded by two parallels and two meridians. If the point's
    longitude is within the cell's, the nearest point is straight north or
    south (any other point is at least that far in latitude alone). Otherwise
    it lies on the nearer meridian edge: along a meridian at longitude offset
    dl, distance to the point is smallest at latitude atan(tan(lat) / cos(dl))
    and grows monotonically away from it, so clamping that latitude to the
    edge gives the nearest point of the edge (points on the parallel edges are
    farther than the edge's end, because distance grows with |dl|).
    """
    lat_lo, lat_hi, lon_lo, lon_hi = geohash.bounds(cell)

    def dlon(a: float, b: float) -> float:
        return (a - b + 180.0) % 360.0 - 180.0

    if dlon(lon, lon_lo) >= 0 and dlon(lon_hi, lon) >= 0:
        return haversine_m(lat, lon, min(max(lat, lat_lo), lat_hi), lon)
    edge = lon_lo if abs(dlon(lon, lon_lo)) <= abs(dlon(lon, lon_hi)) else lon_hi
    d = math.radians(dlon(lon, edge))
    if abs(d) >= math.pi / 2:  # not reachable for cells near a 2 km circle; keep the maths total
        best = lat_hi if lat >= 0 else lat_lo
    else:
        best = math.degrees(math.atan2(math.tan(math.radians(lat)), math.cos(d))) if abs(lat) < 90 else lat
    return haversine_m(lat, lon, min(max(best, lat_lo), lat_hi), edge)


def cover_cells(lat: float, lon: float, radius_m: float, *, margin: float = COVER_MARGIN) -> list[str]:
    """Every precision-5 cell whose rectangle comes within ``radius_m * (1 + margin)`` of the centre.

    Candidates come from the circle's bounding box on the cell grid (13
    longitude bits, 12 latitude bits at precision 5); each is kept only if it
    truly comes within reach. Handles the antimeridian and the poles.
    """
    reach = radius_m * (1 + margin)
    cell_h = 180.0 / 2**12
    cell_w = 360.0 / 2**13
    ang = math.degrees(reach / EARTH_RADIUS_M)
    lat_min, lat_max = max(-90.0, lat - ang), min(90.0, lat + ang)
    # One extra row and column on each side: rounding must never lose a cell; the filter drops extras.
    rows = range(max(0, math.floor((lat_min + 90) / cell_h) - 1), min(2**12 - 1, math.floor((lat_max + 90) / cell_h) + 1) + 1)
    if lat_max >= 90.0 or lat_min <= -90.0:
        cols: list[int] = list(range(2**13))  # the circle holds a pole: every longitude
    else:
        # Widest longitude offset of the circle, reached off the centre's parallel.
        s = math.sin(math.radians(ang)) / max(math.cos(math.radians(lat)), 1e-12)
        dlon = 180.0 if s >= 1 else math.degrees(math.asin(s))
        first = math.floor((lon - dlon + 180) / cell_w) - 1
        last = math.floor((lon + dlon + 180) / cell_w) + 1
        cols = sorted({c % 2**13 for c in range(first, last + 1)})
    cells = []
    for r in rows:
        clat = -90 + (r + 0.5) * cell_h
        for c in cols:
            cell = geohash.encode(clat, -180 + (c + 0.5) * cell_w, COVER_PRECISION)
            if distance_to_cell_m(lat, lon, cell) <= reach:
                cells.append(cell)
    home = geohash.encode(lat, lon, COVER_PRECISION)
    if home not in cells:  # cannot happen (distance 0), but the centre's cell must never be missed
        cells.append(home)
    return sorted(cells)


def request_topics(root: str, lat: float, lon: float, radius_m: float) -> list[str]:
    return [geohash.request_topic(root, cell) for cell in cover_cells(lat, lon, radius_m)]
