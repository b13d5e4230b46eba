"""``doorbell-agent consent show|set|withdraw``: the resident's consent and limits, in plain words.

The configuration file (in /etc) sets the starting rules; what a resident sets here goes into
``<data_dir>/consent.json`` (:mod:`agent.state.consent`), replaces the same keys of ``[policy]``,
is recorded in the access log with the old and new values, and applies from the running agent's
next decision, without a restart.

Kept light: no SQLite, crypto or video library loads until a change is recorded.
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from agent.cli.common import add_json_flag, config_from, print_json, who_is_running
from agent.config import DAY_NAMES, AgentConfig, ScheduleRule
from agent.errors import UserError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?|d|days?)\s*$", re.I)
_DISTANCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|metres?|meters?|km)?\s*$", re.I)
_DAY_SETS = {"all": DAY_NAMES, "every": DAY_NAMES, "daily": DAY_NAMES, "weekdays": DAY_NAMES[:5], "weekends": DAY_NAMES[5:]}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("consent", help="show, change or withdraw your consent and limits",
                       description="Show, change or withdraw your consent to share footage, and its limits. "
                       "Changes apply to the running agent at once and are recorded in your access log.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="your consent and limits in plain words")
    add_json_flag(show)
    show.set_defaults(func=cmd_show)
    s = actions.add_parser(
        "set", help="change the consent period, weekly schedule or limits",
        description="Change your consent. Dates are local (policy.timezone): --until 2027-01-15 means until the end "
        "of 15 Jan 2027; --from 2027-01-01 from its start. Durations: 30m, 1h, 3d. Distances: 500m, 1.5km.",
        epilog="example: doorbell-agent consent set --until 2027-01-15 --days mon-fri --hours 08:00-20:00 "
        "--max-length 1h --max-age 3d --radius 500m --approval ask")
    s.add_argument("--from", dest="start", metavar="DATE", help="consent starts (2027-01-01, '2027-01-01 08:00' or now)")
    s.add_argument("--until", metavar="DATE", help="consent ends: a day means the end of that day; or '2027-01-15 18:00'")
    s.add_argument("--days", metavar="DAYS", help="days of the week footage may come from: mon,tue,... or mon-fri, "
                   "weekdays, weekends, all")
    s.add_argument("--hours", metavar="HH:MM-HH:MM", help="hours of those days footage may come from, e.g. 08:00-20:00 "
                   "(22:00-06:00 runs past midnight)")
    s.add_argument("--max-length", metavar="DURATION", help="the most footage one request may get, e.g. 30m or 1h")
    s.add_argument("--max-age", metavar="DURATION", help="how far back footage may be shared, e.g. 3d")
    s.add_argument("--radius", metavar="DISTANCE", help="the largest incident area a request may name, e.g. 500m")
    s.add_argument("--per-day", metavar="N", type=_count, help="grants per agency per day (0 shares nothing)")
    s.add_argument("--approval", choices=("ask", "auto"), help="ask = you approve each request; auto = rules decide")
    s.add_argument("--require-warrant", choices=("yes", "no"), help="share only for requests that cite a warrant")
    s.add_argument("--require-oversight", choices=("yes", "no"), help="share only when an oversight body co-signed")
    s.add_argument("--resume", action="store_true", help="give your consent again after 'consent withdraw'")
    add_json_flag(s)
    s.set_defaults(func=cmd_set)
    w = actions.add_parser("withdraw", help="stop sharing for good until you resume (always allowed, no questions)")
    add_json_flag(w)
    w.set_defaults(func=cmd_withdraw)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; write e.g. --per-day 5")
    return int(text)


# -- parsing what a person types -------------------------------------------------------------------


def parse_duration(text: str, option: str) -> int:
    """``30m``, ``1h``, ``3d``, ``90s`` -> seconds; the error names ``option``."""
    m = _DURATION.match(text)
    if not m:
        raise UserError(f"{option} {text!r} is not a duration; write a number and a unit: 30m, 1h, 3d (s, m, h, d)")
    unit = m.group(2).lower()[0]
    seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if seconds <= 0 or seconds != int(seconds):
        raise UserError(f"{option} {text!r} must be a whole number of seconds above zero, e.g. 30m")
    return int(seconds)


def parse_distance(text: str, option: str) -> float:
    """``500m``, ``1.5km``, ``500`` (metres) -> metres; the error names ``option``."""
    m = _DISTANCE.match(text)
    if not m:
        raise UserError(f"{option} {text!r} is not a distance; write e.g. 500m or 1.5km")
    metres = float(m.group(1)) * (1000 if (m.group(2) or "m").lower() == "km" else 1)
    if metres <= 0:
        raise UserError(f"{option} {text!r} must be above zero, e.g. 500m")
    return metres


def parse_day_or_time(text: str, option: str, tz: ZoneInfo, *, end: bool, now: datetime) -> datetime:
    """A local date (``2027-01-15``: its start, or with ``end`` the end of that day), a local date and
    time, RFC 3339, or ``now``. Returns UTC."""
    s = text.strip()
    if s.lower() == "now":
        return now.astimezone(UTC).replace(microsecond=0)
    try:
        day = datetime.strptime(s, "%Y-%m-%d").date()
    except ValueError:
        from agent.timeutil import parse_user_time

        if not re.match(r"^\d{4}-\d{2}-\d{2}", s):
            raise UserError(f"{option} {text!r} is not a date; write 2027-01-15, '2027-01-15 18:00'"
                            + (" or now" if not end else "")) from None
        return parse_user_time(s, field=option, tz=tz)
    if end:
        day += timedelta(days=1)
    return datetime.combine(day, time(0, 0), tzinfo=tz).astimezone(UTC)


def parse_days(text: str) -> list[str]:
    days: list[str] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part in _DAY_SETS:
            days.extend(_DAY_SETS[part])
        elif re.fullmatch(r"[a-z]{3}-[a-z]{3}", part) and all(d in DAY_NAMES for d in part.split("-")):
            a, b = (DAY_NAMES.index(d) for d in part.split("-"))
            days.extend(DAY_NAMES[i % 7] for i in range(a, b + (7 if b < a else 0) + 1))
        elif part in DAY_NAMES:
            days.append(part)
        else:
            raise UserError(f"--days: {part!r} is not a day; write three-letter days separated by commas "
                            "(mon,tue,wed), a range (mon-fri), or weekdays, weekends, all")
    return [d for d in DAY_NAMES if d in days]


def parse_hours(text: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*(\d{1,2}:\d{2})\s*-\s*(\d{1,2}:\d{2})\s*", text)
    if not m:
        raise UserError(f"--hours {text!r} is not a range of hours; write HH:MM-HH:MM, e.g. 08:00-20:00")
    a, b = (x.zfill(5) for x in m.groups())
    try:
        ScheduleRule(days=["mon"], **{"from": a, "to": b})
    except ValueError:
        raise UserError(f"--hours {text!r}: times of day run from 00:00 to 24:00; write e.g. 08:00-20:00") from None
    if a == b:
        raise UserError(f"--hours {text!r} is an empty range; for the whole day write 00:00-24:00 (or leave --hours out)")
    return a, b


def changes_from(args: argparse.Namespace, cfg: AgentConfig, now: datetime) -> dict[str, Any]:
    """The ``[policy]`` keys the options change, checked one by one with errors that name the option."""
    from agent.state.consent import effective_policy

    tz = ZoneInfo(cfg.require_policy().timezone)
    out: dict[str, Any] = {}
    consent: dict[str, Any] = {}
    if args.start is not None:
        consent["start"] = parse_day_or_time(args.start, "--from", tz, end=False, now=now)
    if args.until is not None:
        consent["end"] = parse_day_or_time(args.until, "--until", tz, end=True, now=now)
        if consent["end"] <= now and not args.start:
            raise UserError(f"--until {args.until!r} is already past; to stop sharing now use 'doorbell-agent consent withdraw'")
    if args.days is not None or args.hours is not None:
        days = parse_days(args.days) if args.days is not None else list(DAY_NAMES)
        a, b = parse_hours(args.hours) if args.hours is not None else ("00:00", "24:00")
        consent["schedule"] = [{"days": days, "from": a, "to": b}]
    if "start" in consent or "end" in consent:
        current = effective_policy(cfg).consent
        start, end = consent.get("start", current.start), consent.get("end", current.end)
        if start >= end:
            from agent.timeutil import format_local

            raise UserError(f"--from must come before the end of your consent ({format_local(end, tz, seconds=False)}); "
                            "give a later --until as well")
    if consent:
        out["consent"] = {k: v.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(v, datetime) else v for k, v in consent.items()}
    if args.max_length is not None:
        out["max_window_s"] = parse_duration(args.max_length, "--max-length")
        if out["max_window_s"] > 12 * 3600:
            raise UserError(f"--max-length {args.max_length!r} is above the most a request may get (12h); write 12h or less")
    if args.max_age is not None:
        out["max_age_s"] = parse_duration(args.max_age, "--max-age")
        retention = cfg.buffer.retention_hours * 3600
        if out["max_age_s"] > retention:
            print(f"Note: --max-age {args.max_age} is longer than the footage you keep "
                  f"({cfg.buffer.retention_hours:g} h, buffer.retention_hours); older footage is already gone.")
    if args.radius is not None:
        out["max_radius_m"] = parse_distance(args.radius, "--radius")
        if out["max_radius_m"] > 2000:
            raise UserError(f"--radius {args.radius!r} is above the largest allowed (2km); write 2km or less")
    if args.per_day is not None:
        if args.per_day > 1000:
            raise UserError("--per-day must be 1000 or less")
        out["grants_per_issuer_per_day"] = args.per_day
    if args.approval is not None:
        out["approval"] = args.approval
    if args.require_warrant is not None:
        out["require_warrant"] = args.require_warrant == "yes"
    if args.require_oversight is not None:
        out["require_oversight"] = args.require_oversight == "yes"
    return out


# -- the commands ---------------------------------------------------------------------------------------


def _show_json(cfg: AgentConfig, now: datetime) -> dict[str, Any]:
    from agent.runtime.status import consent_status, describe_consent
    from agent.state.consent import ConsentFileError, effective_policy

    out: dict[str, Any] = {"status": consent_status(cfg, now), "words": describe_consent(cfg, now),
                           "file": str(cfg.paths.consent_file), "file_exists": cfg.paths.consent_file.exists()}
    try:
        rules = effective_policy(cfg).model_dump(mode="json", by_alias=True)
        rules.pop("location", None)
        out["rules"] = rules
    except ConsentFileError as exc:
        out["rules"], out["error"] = None, str(exc)
    return out


def cmd_show(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    from agent.runtime.status import describe_consent

    now = datetime.now(UTC)
    if args.json:
        print_json(_show_json(cfg, now))
    else:
        print("\n".join(describe_consent(cfg, now)))
    return 0


def _report(cfg: AgentConfig, change: Any, args: argparse.Namespace, verb: str) -> int:
    from agent.runtime.status import describe_consent

    now = datetime.now(UTC)
    if args.json:
        print_json({**_show_json(cfg, now), "changed": change.changed,
                    "log": {"seq": change.seq, "hash": change.hash, "unsigned": change.unsigned}})
        return 0
    print(verb)
    print("\n".join(describe_consent(cfg, now)))
    print(f"Recorded in your access log as entry #{change.seq}"
          + (f" (not signed yet: {change.unsigned})." if change.unsigned else ".")
          + " The running agent applies it from its next decision.")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    from agent.state.consent import set_consent

    now = datetime.now(UTC)
    changes = changes_from(args, cfg, now)
    if not changes and not args.resume:
        raise UserError("nothing to change; give at least one option, e.g. --until 2027-01-15 "
                        "(doorbell-agent consent set --help lists them)")
    change = set_consent(cfg, changes, by=who_is_running(), resume=args.resume)
    what = ", ".join(change.changed) if change.changed else "nothing (the values were already so)"
    return _report(cfg, change, args, f"Changed: {what}.")


def cmd_withdraw(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    from agent.state.consent import withdraw_consent

    change = withdraw_consent(cfg, by=who_is_running())
    return _report(cfg, change, args, "Your consent is WITHDRAWN: nothing will be shared and no delivery "
                   "will start (a delivery already under way is stopped by 'doorbell-agent killswitch on').")
