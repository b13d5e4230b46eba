"""Window times carry up to nine fractional digits (protocol section 3): order and length are exact.

A datetime keeps microseconds, so a window one nanosecond long once read as start == end and was
refused as malformed, and a window 12 h plus a few nanoseconds long passed as 12 h.
"""

from __future__ import annotations

import copy

import pytest

from agent.protocol.request import FootageRequest, RequestError
from tests import protocol_signing as ps


def claims_with_window(start: str, end: str) -> dict:  # type: ignore[type-arg]
    claims = copy.deepcopy(ps.base_claims())
    claims["window"] = {"start": start, "end": end}
    return claims


def test_a_window_one_nanosecond_long_is_well_formed() -> None:
    r = FootageRequest.from_claims(claims_with_window("2026-12-03T16:30:00.000000001Z", "2026-12-03T16:30:00.000000002Z"))
    assert r.window_s == 0  # kept at microseconds; the decision then finds under a second to share


def test_a_window_ending_a_nanosecond_before_it_starts_is_malformed() -> None:
    with pytest.raises(RequestError, match="start must be before end"):
        FootageRequest.from_claims(claims_with_window("2026-12-03T16:30:00.000000002Z", "2026-12-03T16:30:00.000000001Z"))


def test_twelve_hours_exactly_is_allowed_and_a_nanosecond_more_is_not() -> None:
    FootageRequest.from_claims(claims_with_window("2026-12-03T04:30:00Z", "2026-12-03T16:30:00.000000000Z"))
    with pytest.raises(RequestError, match="longer than 12 hours"):
        FootageRequest.from_claims(claims_with_window("2026-12-03T04:30:00Z", "2026-12-03T16:30:00.000000001Z"))
