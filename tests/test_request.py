"""The claims schema of PROTOCOL.md section 3, member by member."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.protocol.request import FootageRequest, RequestError
from agent.timeutil import parse_utc_z
from tests import protocol_signing as ps

UTC = UTC


def with_change(path: str, value: Any) -> dict[str, Any]:
    """Base claims with one member set (``a.b`` for nested) or removed (value ``...``)."""
    claims = copy.deepcopy(ps.base_claims())
    *parents, last = path.split(".")
    obj = claims
    for p in parents:
        obj = obj[p]
    if value is ...:
        del obj[last]
    else:
        obj[last] = value
    return claims


def member(r: FootageRequest, path: str) -> Any:
    """The request's value for a claims path (``area.lat`` is ``r.area.lat``, ``window.end`` is ``r.window_end``)."""
    if path.startswith("window."):
        return getattr(r, path.replace(".", "_"))
    obj: Any = r
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def test_base_claims_become_a_request() -> None:
    r = FootageRequest.from_claims(ps.base_claims())
    assert r.jti == "req-0001-base-aaaaaaaa" and r.iss == "jackson-pd"
    assert r.aud == "jackson-ms/camera-pilot-2026"
    assert r.window_start == datetime(2026, 12, 3, 16, 30, tzinfo=UTC)
    assert r.window_end == datetime(2026, 12, 3, 17, 0, tzinfo=UTC)
    assert r.window_s == 1800
    assert (r.area.lat, r.area.lon, r.area.radius_m) == (32.299839, -90.183108, 300.0)
    assert r.basis == "consent" and r.warrant is None and r.nbf is None
    assert len(r.recipient.public_bytes) == 32
    assert r.recipient.to_jwk() == ps.base_claims()["recipient"]
    assert r.expires_at == datetime(2026, 12, 3, 18, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("area.radius_m", 2000),
        ("area.radius_m", 0.001),
        ("area.lat", -90.0),
        ("area.lon", 180),
        ("sub", "👮" * 64),  # characters, not bytes
        ("purpose", "x" * 280),
        ("purpose", "Straße, café, 東京 — non-ASCII text is fine"),
        ("aud", "jackson-ms/camera-pilot-2026"),
        ("jti", "A" * 64),
        ("exp", 1796320770 + 900),
        ("nbf", 1796320770),
        ("window.end", "2026-12-03T17:00:00.250Z"),
    ],
)
def test_edges_that_are_allowed(path: str, value: Any) -> None:
    """A value right at the edge of its rule is accepted, and the request carries exactly that value."""
    r = FootageRequest.from_claims(with_change(path, value))
    assert member(r, path) == (parse_utc_z(value) if path.startswith("window.") else value)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("v", True, "v"),
        ("v", 1.0, "v"),
        ("area.lat", True, "area.lat"),
        ("area.radius_m", False, "area.radius_m"),
        ("area.radius_m", 2000.0001, "area.radius_m"),
        ("area.lon", -180.5, "area.lon"),
        ("area.lat", None, "area.lat"),
        ("iat", 1796320770.0, "iat"),
        ("iat", True, "iat"),
        ("iat", -1, "iat"),
        ("exp", 1796320770 + 901, "exp"),
        ("exp", 1796320770, "exp"),
        ("exp", "1796321370", "exp"),
        ("nbf", 1.5, "nbf"),
        ("purpose", "line one\nline two", "purpose"),
        ("purpose", "escape \x1b[31m red", "purpose"),
        ("purpose", "C1 control \x85", "purpose"),
        ("purpose", "lone surrogate \ud800", "purpose"),
        ("purpose", "x" * 281, "purpose"),
        ("purpose", "", "purpose"),
        ("sub", "👮" * 65, "sub"),
        ("case", 1234, "case"),
        ("aud", "caf\u00e9", "aud"),
        ("aud", "tab\there", "aud"),
        ("jti", "req-0001-base-aaaaaaaa\n", "jti"),
        ("jti", "req-0001-base-aaaaaaa.", "jti"),
        ("jti", "A" * 65, "jti"),
        ("iss", "Jackson-PD", "iss"),
        ("basis", "suspicion", "basis"),
        ("window.start", "2026-12-03T16:30:00Z\n", "window.start"),
        ("window.start", "2026-12-03T16:30:00+00:00", "window.start"),
        ("window.start", "2026-12-03t16:30:00z", "window.start"),
        ("window.start", "2026-02-30T16:30:00Z", "window.start"),
        ("window.start", 1796315400, "window.start"),
        ("window.start", "2026-12-03T04:59:59Z", "window"),  # 12 h 0 min 1 s
        ("window.end", "2026-12-03T16:30:00Z", "window"),  # start == end
        ("window.extra", "x", "window"),
        ("area.alt", 10, "area"),
        ("area", [1, 2, 3], "area"),
        ("recipient.x", "FxN29gacW5zXqV82vQMVqoibS8BzLh7u3w2ynrrRjS", "recipient.x"),  # 31 bytes
        ("recipient.x", "FxN29gacW5zXqV82vQMVqoibS8BzLh7u3w2ynrrRjS4=", "recipient.x"),
        ("recipient.d", "AFPoY5enXBXmDGM3xhYn7ZH1_x5IIwUxAve0zwjeSjc", "recipient"),
        ("recipient.kty", "EC", "recipient"),
        ("scope", "all-cameras", "claims"),
        ("sub", ..., "claims"),
    ],
)
def test_each_rule_is_enforced_and_named(path: str, value: Any, field: str) -> None:
    with pytest.raises(RequestError) as exc:
        FootageRequest.from_claims(with_change(path, value))
    assert exc.value.where == field


def test_window_of_exactly_12_hours_is_allowed() -> None:
    r = FootageRequest.from_claims(with_change("window.start", "2026-12-03T05:00:00Z"))
    assert r.window_s == 12 * 3600


def test_warrant_present_iff_basis_is_warrant() -> None:
    claims = with_change("basis", "warrant")
    with pytest.raises(RequestError, match="missing"):
        FootageRequest.from_claims(claims)
    claims["warrant"] = {"ref": "2026-SW-0412", "court": "Hinds County Circuit Court"}
    r = FootageRequest.from_claims(claims)
    assert r.warrant is not None and r.warrant.court == "Hinds County Circuit Court"
    claims["warrant"] = {"ref": "2026-SW-0412", "court": "C" * 129}
    with pytest.raises(RequestError) as exc:
        FootageRequest.from_claims(claims)
    assert exc.value.where == "warrant.court"
    claims["warrant"] = {"ref": "2026-SW-0412"}
    with pytest.raises(RequestError):
        FootageRequest.from_claims(claims)


def test_request_is_immutable() -> None:
    r = FootageRequest.from_claims(ps.base_claims())
    with pytest.raises(AttributeError):
        r.jti = "other-jti-0000000000"  # type: ignore[misc]
