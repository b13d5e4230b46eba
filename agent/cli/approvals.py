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
from typing import Any

from agent.cli.common import add_json_flag, config_from, print_json
from agent.config import AgentConfig
from agent.display import safe_text
from agent.protocol.geo import haversine_m
from agent.protocol.trust import TrustStore
from agent.state.approvals import ApprovalQueue, PendingApproval, parse_id
from agent.timeutil import duration_words, format_local, format_utc, local_zone


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


def _signers(kids: list[str], trust: TrustStore | None) -> tuple[str, str]:
    """(who signed as the requester, who co-signed for oversight), in words, from the trust store's keys."""
    requester: list[str] = []
    oversight: list[str] = []
    for kid in kids:
        key = trust.get(kid) if trust is not None else None
        if key is None:
            requester.append(f"key {safe_text(kid)} (no longer in your trust store)")
        elif key.role == "oversight":
            oversight.append(f"{safe_text(key.iss)} (key {safe_text(kid)})")
        else:
            requester.append(f"{safe_text(key.iss)} (key {safe_text(kid)})")
    return ", ".join(requester) or "-", ", ".join(oversight) or "nobody"


def _area_words(area: dict[str, Any], home: tuple[float, float] | None) -> str:
    """How far the incident is from home, never its coordinates (they are in --json for the resident's own tools)."""
    radius = f"radius {area['radius_m']:g} m"
    if home is None:
        return f"an area of {radius}"
    distance = haversine_m(home[0], home[1], area["lat"], area["lon"])
    return f"incident {distance:.0f} m from your home, {radius}"


def _describe(item: PendingApproval, now: datetime, tz: tzinfo | None, *, home: tuple[float, float] | None = None,
              trust: TrustStore | None = None) -> list[str]:
    start = format_local(item.granted_start, tz)
    same_day = item.granted_start.astimezone(tz).date() == item.granted_end.astimezone(tz).date()
    end = item.granted_end.astimezone(tz).strftime("%H:%M:%S %Z") if same_day else format_local(item.granted_end, tz)
    length = (item.granted_end - item.granted_start).total_seconds()
    left = (item.exp - now).total_seconds()
    return [
        f"Request {item.id}: answer within {duration_words(left)} (until {format_local(item.exp, tz, seconds=False)})",
        f"  Agency:   {safe_text(item.iss)}",
        f"  Officer:  {safe_text(item.sub)}",
        f"  Case:     {safe_text(item.case)}",
        f"  Purpose:  {safe_text(item.purpose)}",
        f"  Footage:  {start} to {end} ({duration_words(length)})",
        *_claim_lines(item, home, trust),
        f"  Share it:   doorbell-agent approve {item.id}",
        f"  Refuse it:  doorbell-agent decline {item.id}",
    ]


def _claim_lines(item: PendingApproval, home: tuple[float, float] | None, trust: TrustStore | None) -> list[str]:
    c = item.claims()
    if not c:
        return ["  Details:  the request as received cannot be read again (the database was changed?)"]
    if c["basis"] == "warrant" and c.get("warrant"):
        basis = f"warrant {safe_text(c['warrant']['ref'])} from {safe_text(c['warrant']['court'])}"
    else:
        basis = "your consent (no warrant)"
    requester, cosigners = _signers(c["signed_by"], trust)
    return [
        f"  Basis:    {basis}",
        f"  Signed:   {requester}; co-signed by {cosigners}",
        f"  Area:     {_area_words(c['area'], home)}",
    ]


def _home(cfg: AgentConfig) -> tuple[float, float] | None:
    return (cfg.policy.location.lat, cfg.policy.location.lon) if cfg.policy is not None else None


def _trust(cfg: AgentConfig) -> TrustStore | None:
    from agent.protocol.trust import TrustStoreError
    from agent.state.truststore import load_trust_store

    try:
        return load_trust_store(cfg.paths.trust_file, missing_ok=True)
    except TrustStoreError:
        return None


def _as_json(item: PendingApproval, home: tuple[float, float] | None) -> dict[str, Any]:
    out = item.as_json()
    if home is not None and isinstance(out.get("area"), dict):
        out["area"]["distance_m"] = round(haversine_m(home[0], home[1], out["area"]["lat"], out["area"]["lon"]))
    return out


def _pending(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    now = _now()
    items = ApprovalQueue(cfg.paths.state_db).pending(now)
    home = _home(cfg)
    if args.json:
        print_json({"now": format_utc(now), "pending": [_as_json(i, home) for i in items]})
        return 0
    if not items:
        print("No requests are waiting for your answer.")
        if cfg.policy is not None:
            from agent.state.consent import ConsentFileError, effective_policy

            try:
                auto = effective_policy(cfg).approval != "ask"
            except ConsentFileError:
                auto = False
            if auto:
                print('(approval is "auto": requests your rules allow are shared without asking; '
                      "'doorbell-agent consent set --approval ask' makes you answer each one.)")
        return 0
    tz = local_zone()
    print(f"{len(items)} request{'s' if len(items) != 1 else ''} waiting for your answer. "
          "Nothing is shared unless you approve.\n")
    trust = _trust(cfg)
    for item in items:
        print("\n".join(_describe(item, now, tz, home=home, trust=trust)))
        print()
    return 0


def _approve(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    tz = local_zone()
    item = ApprovalQueue(cfg.paths.state_db).approve(parse_id(args.id), _now(), tz)
    if args.json:
        print_json(item.as_json())
        return 0
    length = duration_words((item.granted_end - item.granted_start).total_seconds())
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
