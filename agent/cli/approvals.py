"""``doorbell-agent pending | approve ID | decline ID``: the resident answers held requests.

Only used when ``policy.approval = "ask"``. The commands write the answer into
the agent's state database; the running agent picks it up and delivers (or
logs the refusal) within a few seconds.

Everything the agency wrote (agency, officer, case, purpose) is printed through
:func:`agent.display.safe_text`, so a right-to-left override or a line break in
a case number cannot change what the resident reads before answering; ``--json``
keeps the raw values (ASCII-only JSON escapes them unambiguously).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, tzinfo

from agent.cli.common import add_json_flag, config_from, print_json
from agent.display import safe_text
from agent.state.approvals import ApprovalQueue, PendingApproval, parse_id
from agent.timeutil import format_local, format_utc, local_zone


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pending", help="list footage requests waiting for your approval")
    add_json_flag(p)
    p.set_defaults(func=_pending)

    a = sub.add_parser("approve", help="share the footage a waiting request asks for")
    a.add_argument("id", metavar="ID", help="the request's ID, as shown by 'doorbell-agent pending'")
    add_json_flag(a)
    a.set_defaults(func=_approve)

    d = sub.add_parser("decline", help="refuse a waiting request; nothing is shared")
    d.add_argument("id", metavar="ID", help="the request's ID, as shown by 'doorbell-agent pending'")
    add_json_flag(d)
    d.set_defaults(func=_decline)



def _now() -> datetime:
    return datetime.now(UTC)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} hours"


def _describe(item: PendingApproval, now: datetime, tz: tzinfo | None) -> list[str]:
    start = format_local(item.granted_start, tz)
    same_day = item.granted_start.astimezone(tz).date() == item.granted_end.astimezone(tz).date()
    end = item.granted_end.astimezone(tz).strftime("%H:%M:%S %Z") if same_day else format_local(item.granted_end, tz)
    length = (item.granted_end - item.granted_start).total_seconds()
    left = (item.exp - now).total_seconds()
    return [
        f"Request {item.id}: answer within {_duration(left)} (until {format_local(item.exp, tz, seconds=False)})",
        f"  Agency:   {safe_text(item.iss)}",
        f"  Officer:  {safe_text(item.sub)}",
        f"  Case:     {safe_text(item.case)}",
        f"  Purpose:  {safe_text(item.purpose)}",
        f"  Footage:  {start} to {end} ({_duration(length)})",
        f"  Share it:   doorbell-agent approve {item.id}",
        f"  Refuse it:  doorbell-agent decline {item.id}",
    ]


def _pending(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    now = _now()
    items = ApprovalQueue(cfg.paths.state_db).pending(now)
    if args.json:
        print_json({"now": format_utc(now), "pending": [i.as_json() for i in items]})
        return 0
    if not items:
        print("No requests are waiting for your answer.")
        if cfg.policy is not None and cfg.policy.approval != "ask":
            print('(policy.approval is "auto": requests your rules allow are shared without asking.)')
        return 0
    tz = local_zone()
    print(f"{len(items)} request{'s' if len(items) != 1 else ''} waiting for your answer. "
          "Nothing is shared unless you approve.\n")
    for item in items:
        print("\n".join(_describe(item, now, tz)))
        print()
    return 0


def _approve(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    tz = local_zone()
    item = ApprovalQueue(cfg.paths.state_db).approve(parse_id(args.id), _now(), tz)
    if args.json:
        print_json(item.as_json())
        return 0
    length = _duration((item.granted_end - item.granted_start).total_seconds())
    print(f"Approved request {item.id} from {safe_text(item.iss)} (case {safe_text(item.case)}).")
    print(f"The agent will send {length} of footage, encrypted to the agency, within a few seconds while it runs.")
    return 0


def _decline(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    tz = local_zone()
    item = ApprovalQueue(cfg.paths.state_db).decline(parse_id(args.id), _now(), tz)
    if args.json:
        print_json(item.as_json())
        return 0
    print(f"Declined request {item.id} from {safe_text(item.iss)} (case {safe_text(item.case)}). Nothing was shared.")
    print("The agency is not told.")
    return 0
