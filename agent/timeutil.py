"""Time in the three shapes the agent meets it.

- Protocol times: RFC 3339 UTC ending in ``Z`` (strict: the wire contract).
- Buffer times: integer microseconds since the epoch (exact, cheap to index).
- People's times: local wall-clock time in, local time out, on the CLI.

Inside the agent every ``datetime`` is timezone-aware UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo

from agent.errors import UserError

_RFC3339_Z = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?Z", re.ASCII)


def parse_utc_z(text: str) -> datetime:
    """Parse the protocol's RFC 3339 UTC form; raise ``ValueError`` for anything else."""
    m = _RFC3339_Z.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not an RFC 3339 UTC time ending in Z")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    frac = m.group(7)
    us = int((frac[1:] + "000000")[:6]) if frac else 0
    return datetime(y, mo, d, h, mi, s, us, tzinfo=UTC)


def parse_utc_z_ns(text: str) -> tuple[datetime, int]:
    """:func:`parse_utc_z`, plus the exact time in integer nanoseconds since the epoch.

    A datetime keeps microseconds; the protocol allows nine fractional digits, so
    comparisons that must be exact (a window's start before its end, its length)
    use the nanoseconds.
    """
    dt = parse_utc_z(text)
    frac = _RFC3339_Z.fullmatch(text).group(7)  # type: ignore[union-attr]
    sub_us = int((frac[1:] + "000000000")[6:9]) if frac else 0
    return dt, to_us(dt) * 1000 + sub_us


def format_utc(dt: datetime, *, ms: bool = False) -> str:
    """RFC 3339 UTC with ``Z``; whole seconds unless ``ms`` (or the value needs them)."""
    dt = dt.astimezone(UTC)
    if ms:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0") + "Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def to_us(dt: datetime) -> int:
    """Aware datetime to integer microseconds since the epoch, exactly."""
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def from_epoch(seconds: int | float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


_display_zone: tzinfo | None = None


def set_display_zone(tz: tzinfo | None) -> None:
    """Show and read people's times in the resident's configured zone rather than the system's."""
    global _display_zone
    _display_zone = tz


def local_zone() -> tzinfo:
    if _display_zone is not None:
        return _display_zone
    tz = datetime.now().astimezone().tzinfo
    assert tz is not None
    return tz


def parse_user_time(text: str, *, field: str, tz: tzinfo | None = None, now: datetime | None = None) -> datetime:
    """A time typed by a person: RFC 3339 (any offset), or local ``YYYY-MM-DD HH:MM[:SS]``,
    or ``HH:MM[:SS]`` meaning today. Raises :class:`UserError` naming ``field``."""
    tz = tz or local_zone()
    s = text.strip()
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith("Z") else s)
    except ValueError:
        dt = None
        for fmt in ("%H:%M", "%H:%M:%S"):
            try:
                t = datetime.strptime(s, fmt).time()
            except ValueError:
                continue
            today = (now or datetime.now(tz)).astimezone(tz).date()
            dt = datetime.combine(today, t)
            break
    # Checked after the try statement: mypy does not carry the narrowing out of an except block
    # that holds a loop with break.
    if dt is None:
        raise UserError(
            f"{field} {text!r} is not a time; write it as local time '2026-12-03 10:30', "
            f"as '10:30' for today, or as RFC 3339 '2026-12-03T16:30:00Z'"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.astimezone(UTC)


def format_local(dt: datetime, tz: tzinfo | None = None, *, seconds: bool = True) -> str:
    """For a homeowner: local wall-clock time with the zone's abbreviation."""
    local = dt.astimezone(tz or local_zone())
    return local.strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")


def duration_words(seconds: float) -> str:
    """A length of time as a homeowner says it: "45 seconds", "10 minutes", "2 h 5 min"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} hours"
