"""Weekly schedule arithmetic in the resident's time zone, daylight saving included."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from agent.protocol.schedule import Rule, constant_offset_parts, longest_piece, scheduled_pieces

UTC = UTC
CHICAGO = ZoneInfo("America/Chicago")
ALL_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def hours(pieces: list[tuple[datetime, datetime]]) -> float:
    return sum((e - s).total_seconds() for s, e in pieces) / 3600


def test_whole_day_rule_returns_the_interval() -> None:
    rules = [Rule.parse(ALL_DAYS, "00:00", "24:00")]
    assert scheduled_pieces(utc(2026, 12, 3, 16, 30), utc(2026, 12, 3, 17), CHICAGO, rules) == [
        (utc(2026, 12, 3, 16, 30), utc(2026, 12, 3, 17))
    ]


def test_overnight_rule_belongs_to_the_day_it_starts() -> None:
    rules = [Rule.parse(["wed"], "22:00", "03:00")]
    # The week of Mon 2026-11-30 .. Mon 2026-12-07 (CST, UTC-6): only Wed 22:00 -> Thu 03:00.
    pieces = scheduled_pieces(utc(2026, 11, 30, 6), utc(2026, 12, 7, 6), CHICAGO, rules)
    assert pieces == [(utc(2026, 12, 3, 4), utc(2026, 12, 3, 9))]


def test_overnight_rule_reaches_into_the_interval_from_the_day_before() -> None:
    rules = [Rule.parse(["wed"], "22:00", "03:00")]
    pieces = scheduled_pieces(utc(2026, 12, 3, 8, 30), utc(2026, 12, 3, 9, 30), CHICAGO, rules)
    assert pieces == [(utc(2026, 12, 3, 8, 30), utc(2026, 12, 3, 9))]


def test_rule_to_24_00_ends_at_local_midnight() -> None:
    rules = [Rule.parse(["thu"], "18:00", "24:00")]
    pieces = scheduled_pieces(utc(2026, 12, 3), utc(2026, 12, 5), CHICAGO, rules)
    assert pieces == [(utc(2026, 12, 4, 0), utc(2026, 12, 4, 6))]


def test_touching_rules_make_one_piece() -> None:
    rules = [Rule.parse(["thu"], "10:00", "10:35"), Rule.parse(["thu"], "10:35", "11:00"), Rule.parse(["thu"], "10:50", "11:20")]
    pieces = scheduled_pieces(utc(2026, 12, 3, 15), utc(2026, 12, 3, 18), CHICAGO, rules)
    assert pieces == [(utc(2026, 12, 3, 16), utc(2026, 12, 3, 17, 20))]


def test_from_equal_to_covers_nothing() -> None:
    rules = [Rule.parse(ALL_DAYS, "10:00", "10:00")]
    assert scheduled_pieces(utc(2026, 12, 1), utc(2026, 12, 8), CHICAGO, rules) == []


def test_longest_piece_earliest_of_equals() -> None:
    a, b, c = (utc(2026, 1, 1, 1), utc(2026, 1, 1, 2)), (utc(2026, 1, 1, 3), utc(2026, 1, 1, 4)), (utc(2026, 1, 1, 5), utc(2026, 1, 1, 5, 30))
    assert longest_piece([a, b, c]) == a
    assert longest_piece([c, (utc(2026, 1, 1, 6), utc(2026, 1, 1, 8))]) == (utc(2026, 1, 1, 6), utc(2026, 1, 1, 8))
    assert longest_piece([]) is None


@pytest.mark.parametrize("bad", ["24:01", "25:00", "7:00", "07:60", "07-00", "٠٧:٠٠", "07:00 "])
def test_bad_times_of_day(bad: str) -> None:
    with pytest.raises(ValueError):
        Rule.parse(["mon"], bad, "08:00")


# --- daylight saving in America/Chicago: 2026-03-08 (spring forward) and 2026-11-01 (fall back) ---


def test_transitions_are_located_to_the_second() -> None:
    parts = constant_offset_parts(utc(2026, 3, 7, 12), utc(2026, 3, 9, 12), CHICAGO)
    assert [(p[1], p[2]) for p in parts[:-1]] == [(utc(2026, 3, 8, 8), timedelta(hours=-6))]
    assert parts[-1][0] == utc(2026, 3, 8, 8) and parts[-1][2] == timedelta(hours=-5)
    parts = constant_offset_parts(utc(2026, 10, 31, 12), utc(2026, 11, 2, 12), CHICAGO)
    assert [p[1] for p in parts[:-1]] == [utc(2026, 11, 1, 7)]


def test_spring_forward_day_is_23_hours() -> None:
    rules = [Rule.parse(["sun"], "00:00", "24:00")]
    pieces = scheduled_pieces(utc(2026, 3, 7, 12), utc(2026, 3, 9, 12), CHICAGO, rules)
    assert pieces == [(utc(2026, 3, 8, 6), utc(2026, 3, 9, 5))]
    assert hours(pieces) == 23


def test_rule_starting_in_the_spring_gap_starts_at_the_transition() -> None:
    rules = [Rule.parse(["sun"], "02:30", "04:00")]
    pieces = scheduled_pieces(utc(2026, 3, 8), utc(2026, 3, 9), CHICAGO, rules)
    assert pieces == [(utc(2026, 3, 8, 8), utc(2026, 3, 8, 9))]  # 03:00-04:00 CDT
    gap_only = [Rule.parse(["sun"], "02:00", "02:59")]
    assert scheduled_pieces(utc(2026, 3, 8), utc(2026, 3, 9), CHICAGO, gap_only) == []


def test_overnight_rule_across_spring_forward_is_one_hour_shorter() -> None:
    rules = [Rule.parse(["sat"], "22:00", "06:00")]
    pieces = scheduled_pieces(utc(2026, 3, 7), utc(2026, 3, 9), CHICAGO, rules)
    assert pieces == [(utc(2026, 3, 8, 4), utc(2026, 3, 8, 11))]  # 22:00 CST .. 06:00 CDT: 7 real hours


def test_fall_back_day_is_25_hours() -> None:
    rules = [Rule.parse(["sun"], "00:00", "24:00")]
    pieces = scheduled_pieces(utc(2026, 10, 31, 12), utc(2026, 11, 2, 12), CHICAGO, rules)
    assert pieces == [(utc(2026, 11, 1, 5), utc(2026, 11, 2, 6))]
    assert hours(pieces) == 25


def test_repeated_hour_is_covered_both_times() -> None:
    rules = [Rule.parse(["sun"], "01:00", "02:00")]
    pieces = scheduled_pieces(utc(2026, 11, 1), utc(2026, 11, 2), CHICAGO, rules)
    assert pieces == [(utc(2026, 11, 1, 6), utc(2026, 11, 1, 8))]  # 01:00 CDT .. 02:00 CST


def test_quarter_hour_inside_the_repeated_hour_is_two_pieces() -> None:
    rules = [Rule.parse(["sun"], "01:30", "01:45")]
    pieces = scheduled_pieces(utc(2026, 11, 1), utc(2026, 11, 2), CHICAGO, rules)
    assert pieces == [(utc(2026, 11, 1, 6, 30), utc(2026, 11, 1, 6, 45)), (utc(2026, 11, 1, 7, 30), utc(2026, 11, 1, 7, 45))]
    assert longest_piece(pieces) == pieces[0]


def test_zone_without_dst_and_half_hour_offset() -> None:
    rules = [Rule.parse(["thu"], "09:00", "10:00")]
    pieces = scheduled_pieces(utc(2026, 12, 3), utc(2026, 12, 4), ZoneInfo("Asia/Kolkata"), rules)
    assert pieces == [(utc(2026, 12, 3, 3, 30), utc(2026, 12, 3, 4, 30))]


# --- against a brute-force definition: an instant is inside iff its local wall-clock reading is ---


def _inside_by_wall_clock(t: datetime, rules: list[Rule]) -> bool:
    local = t.astimezone(CHICAGO)
    minute = local.hour * 60 + local.minute
    today, yesterday = local.weekday(), (local.weekday() - 1) % 7
    for r in rules:
        if r.start_min < r.end_min:
            if today in r.days and r.start_min <= minute < r.end_min:
                return True
        elif r.start_min > r.end_min:
            if (today in r.days and minute >= r.start_min) or (yesterday in r.days and minute < r.end_min):
                return True
    return False


@pytest.mark.parametrize("week_start", [utc(2026, 3, 5), utc(2026, 10, 29), utc(2026, 12, 1)])
def test_matches_wall_clock_membership_minute_by_minute(week_start: datetime) -> None:
    rng = random.Random(week_start.toordinal())
    days = ALL_DAYS
    for _ in range(6):
        rules = []
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randrange(0, 24 * 4) * 15, rng.randrange(1, 24 * 4 + 1) * 15
            fmt = lambda m: f"{m // 60:02d}:{m % 60:02d}"  # noqa: E731
            rules.append(Rule.parse(rng.sample(days, rng.randint(1, 4)), fmt(a), fmt(b)))
        lo = week_start + timedelta(minutes=rng.randrange(0, 3 * 24 * 60))
        hi = lo + timedelta(minutes=rng.randrange(1, 4 * 24 * 60))
        pieces = scheduled_pieces(lo, hi, CHICAGO, rules)
        t = lo
        while t < hi:
            expected = _inside_by_wall_clock(t, rules)
            got = any(s <= t < e for s, e in pieces)
            assert got == expected, (rules, t)
            t += timedelta(minutes=5)
        for (_, e1), (s2, _) in zip(pieces, pieces[1:]):
            assert e1 < s2  # disjoint and not touching
