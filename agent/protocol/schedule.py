"""The resident's weekly schedule, as arithmetic on UTC intervals (PROTOCOL.md section 4, step 19).

A rule ``{days, from, to}`` names local wall-clock times in the resident's
time zone; ``to`` may be ``24:00``; ``from > to`` runs past midnight into the
next day, and the day named is the day the rule starts. ``from == to`` covers
nothing (write ``00:00``-``24:00`` for a whole day).

Daylight saving. An instant is inside a rule when the local wall-clock
reading at that instant lies inside the rule's wall-clock range. So:

- a rule edge that falls in the spring-forward gap (02:00-03:00 in
  America/Chicago does not exist that night) moves to the transition
  itself: ``02:30``-``04:00`` covers 03:00-04:00 CDT, one real hour;
- wall-clock times that occur twice at fall-back are covered both times:
  ``01:00``-``02:00`` covers two real hours that night, and ``01:30``-``01:45``
  two separate quarter hours (two pieces; the longest-piece rule then picks the earlier).

The computation splits the interval where the zone's UTC offset changes; in
each part local time is UTC plus a constant, so rules map to UTC exactly.
Offsets are sampled hourly and transitions located to the second; tzdata
has no zone whose offset changes twice within an hour.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

DAY_INDEX = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}
_DAY = timedelta(days=1)
_SAMPLE = timedelta(hours=1)
_SECOND = timedelta(seconds=1)

Interval = tuple[datetime, datetime]


@dataclass(frozen=True, slots=True)
class Rule:
    """One weekly rule; times are minutes after local midnight, ``end_min`` 1440 for 24:00."""

    days: frozenset[int]
    start_min: int
    end_min: int

    @classmethod
    def parse(cls, days: Iterable[str], start: str, end: str) -> Rule:
        """From the configuration's form (``["mon", ...]``, ``"HH:MM"``, ``"HH:MM"``)."""
        return cls(frozenset(DAY_INDEX[d] for d in days), _minutes(start), _minutes(end))

    @property
    def always(self) -> bool:
        return len(self.days) == 7 and self.start_min == 0 and self.end_min == 1440

    def wall_ranges(self, first: datetime, last: datetime) -> Iterable[tuple[datetime, datetime]]:
        """Naive local ``[start, end)`` ranges of this rule for rules starting on days ``first-1`` .. ``last``."""
        if self.start_min == self.end_min:
            return
        day = datetime(first.year, first.month, first.day) - _DAY  # an overnight rule from the day before reaches in
        stop = datetime(last.year, last.month, last.day)
        length = (self.end_min - self.start_min) % 1440 or 1440
        while day <= stop:
            if day.weekday() in self.days:
                start = day + timedelta(minutes=self.start_min)
                yield start, start + timedelta(minutes=length)
            day += _DAY


def _minutes(hhmm: str) -> int:
    if len(hhmm) != 5 or hhmm[2] != ":" or not (hhmm[:2] + hhmm[3:]).isascii() or not (hhmm[:2] + hhmm[3:]).isdigit():
        raise ValueError(f"{hhmm!r} is not HH:MM")
    h, m = int(hhmm[:2]), int(hhmm[3:])
    if not (0 <= h <= 23 and 0 <= m <= 59) and (h, m) != (24, 0):
        raise ValueError(f"{hhmm!r} is not a time of day from 00:00 to 24:00")
    return h * 60 + m


def _offset(tz: ZoneInfo, t: datetime) -> timedelta:
    off = t.astimezone(tz).utcoffset()
    assert off is not None
    return off


def constant_offset_parts(start: datetime, end: datetime, tz: ZoneInfo) -> list[tuple[datetime, datetime, timedelta]]:
    """Split ``[start, end)`` where the zone's UTC offset changes; each part with its offset."""
    parts: list[tuple[datetime, datetime, timedelta]] = []
    lo, off = start, _offset(tz, start)
    probe = start
    while probe < end:
        nxt = min(probe + _SAMPLE, end - timedelta(microseconds=1))
        if nxt <= probe:
            break
        off_n = _offset(tz, nxt)
        if off_n != off:
            a, b = probe, nxt  # offset(a) == off, offset(b) != off: bisect to the second (transitions are whole seconds)
            while b - a > _SECOND:
                mid = a + (b - a) / 2
                if _offset(tz, mid) == off:
                    a = mid
                else:
                    b = mid
            change = b.replace(microsecond=0)
            if change <= a or _offset(tz, change) == off:
                change = b
            parts.append((lo, change, off))
            lo, off = change, _offset(tz, change)
        probe = nxt
    parts.append((lo, end, off))
    return parts


def scheduled_pieces(start: datetime, end: datetime, tz: ZoneInfo, rules: Sequence[Rule]) -> list[Interval]:
    """The parts of UTC ``[start, end)`` inside the schedule: sorted, disjoint, touching pieces merged."""
    if start >= end or not rules:
        return []
    if any(r.always for r in rules):
        return [(start, end)]
    found: list[Interval] = []
    for lo, hi, off in constant_offset_parts(start, end, tz):
        wall_lo = (lo + off).replace(tzinfo=None)
        wall_hi = (hi + off).replace(tzinfo=None)
        for rule in rules:
            for ws, we in rule.wall_ranges(wall_lo, wall_hi):
                s, e = max(ws, wall_lo), min(we, wall_hi)
                if s < e:
                    found.append(((s - off).replace(tzinfo=UTC), (e - off).replace(tzinfo=UTC)))
    found.sort()
    merged: list[Interval] = []
    for s, e in found:
        if merged and s <= merged[-1][1]:
            if e > merged[-1][1]:
                merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def longest_piece(pieces: Sequence[Interval]) -> Interval | None:
    """The longest piece, the earliest of equals (``pieces`` sorted by start)."""
    best: Interval | None = None
    for s, e in pieces:
        if best is None or e - s > best[1] - best[0]:
            best = (s, e)
    return best
