"""``doorbell-agent log show|verify|checkpoint``: read and check the access log of every request."""

from __future__ import annotations

import argparse
from datetime import tzinfo
from typing import Any

from agent.cli.common import add_json_flag, config_from, print_json
from agent.config import AgentConfig
from agent.errors import UserError
from agent.state.accesslog import AccessLog, LogEntry
from agent.state.devicekey import DeviceKey, DeviceKeyError
from agent.timeutil import (
    format_local,
    local_zone,
    parse_user_time,
    parse_utc_z,
)


def register(sub: argparse._SubParsersAction) -> None:
    log = sub.add_parser("log", help="see and check the access log of every request")
    lsub = log.add_subparsers(dest="log_command", metavar="ACTION", required=True)
    show = lsub.add_parser("show", help="list the requests and what happened to them")
    show.add_argument("--since", metavar="TIME", help="only entries from this local time on, e.g. '2026-12-03 10:00' or '10:00'")
    add_json_flag(show)
    show.set_defaults(func=_log_show)
    ver = lsub.add_parser("verify", help="check that no entry was changed, removed, inserted or reordered")
    add_json_flag(ver)
    ver.set_defaults(func=_log_verify)
    cp = lsub.add_parser("checkpoint", help="have the device sign the log's current end now")
    add_json_flag(cp)
    cp.set_defaults(func=_log_checkpoint)


_REASON_WORDS = {
    "granted": "GRANTED",
    "awaiting_resident": "waiting for your approval",
    "wrong_issuer": "refused: signed by a key of another agency",
    "oversight_required": "refused: no oversight co-signature",
    "wrong_audience": "refused: meant for another program",
    "clock_unsynced": "refused: this device's clock was not known to be right",
    "key_not_valid": "refused: the signing key was revoked or outside its validity period",
    "not_yet_valid": "refused: the request was not valid yet",
    "expired": "refused: the request had expired",
    "replayed": "refused: a reused request id with different content",
    "kill_switch": "refused: your kill switch was on",
    "no_consent": "refused: outside your consent period",
    "warrant_required": "refused: you require a warrant",
    "radius_too_large": "refused: the search area was larger than you allow",
    "outside_geofence": "refused: your camera is outside the search area",
    "window_too_long": "refused: asked for more time than you allow",
    "outside_consent": "refused: the times asked for are outside your schedule",
    "no_footage": "refused: no footage recorded for those times",
    "rate_limited": "refused: the agency reached your daily limit",
}
_EVENT_WORDS = {
    "approved": "you approved it",
    "declined_by_resident": "you declined it",
    "approval_expired": "it expired before you approved it",
    "delivered": "the footage was delivered",
    "delivery_cut": "the delivery was stopped by the kill switch",
    "delivery_failed": "the delivery failed",
}


def _window_words(w: Any, tz: tzinfo) -> str:
    if not isinstance(w, dict):
        return "-"
    try:
        start, end = parse_utc_z(w["start"]), parse_utc_z(w["end"])
    except (KeyError, ValueError, TypeError):
        return "?"
    end_fmt = format_local(end, tz, seconds=True)
    if start.astimezone(tz).date() == end.astimezone(tz).date():
        end_fmt = end.astimezone(tz).strftime("%H:%M:%S")
    return f"{format_local(start, tz)} to {end_fmt}"


def _entry_lines(e: LogEntry, tz: tzinfo) -> list[str]:
    d = e.data
    head = f"#{e.seq}  {format_local(e.at, tz)}  "
    if e.type == "event":
        words = _EVENT_WORDS.get(e.outcome, e.outcome)
        extra = []
        if isinstance(d.get("bytes"), int):
            extra.append(f"{d['bytes']:,} bytes")
        if d.get("delivery_id"):
            extra.append(f"delivery {d['delivery_id']}")
        tail = f" ({', '.join(extra)})" if extra else ""
        return [head + f"request {e.jti} from {e.iss} (entry #{d.get('ref_seq')}): {words}{tail}"]
    lines = [head + f"{e.iss}, officer {d.get('sub')}, case {d.get('case')}: {_REASON_WORDS.get(e.outcome, e.outcome)}"]
    lines.append(f"      purpose: {d.get('purpose')}")
    area = d.get("area") or {}
    lines.append(
        f"      asked for: {_window_words(d.get('requested'), tz)}, within {area.get('radius_m', 0):g} m of "
        f"{area.get('lat')}, {area.get('lon')}" + (f"; warrant {d['warrant'].get('ref')} ({d['warrant'].get('court')})" if isinstance(d.get("warrant"), dict) else "")
    )
    if d.get("granted"):
        label = "granted" if e.outcome == "granted" else "would share"
        shared = f"      {label}: {_window_words(d.get('granted'), tz)}"
        if isinstance(d.get("bytes"), int):
            shared += f", {d['bytes']:,} bytes"
        lines.append(shared)
    lines.append(f"      request {e.jti}, signed by {', '.join(d.get('kids') or []) or '?'}")
    return lines


def _open_log(cfg: AgentConfig, device_key: DeviceKey | None = None) -> AccessLog | None:
    if not cfg.paths.state_db.exists():
        return None
    try:
        return AccessLog(cfg.paths.state_db, device_key=device_key)
    except OSError as exc:
        raise UserError(f"cannot open the access log {cfg.paths.state_db} ({exc}); run as the agent's user or with sudo") from None
    except Exception as exc:  # sqlite3.Error: a damaged or foreign file
        raise UserError(f"cannot open the access log {cfg.paths.state_db}: {exc}") from None


def _log_show(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    tz = local_zone()
    since = parse_user_time(args.since, field="--since", tz=tz) if args.since else None
    log = _open_log(cfg)
    entries = log.entries(since) if log else []
    counts = log.rejection_counts(since) if log else []
    if log:
        log.close()
    if args.json:
        print_json({
            "entries": [e.to_json() for e in entries],
            "rejected_before_authentication": counts,
        })  # fmt: skip
        return 0
    if not entries:
        print("No requests in the access log" + (f" since {format_local(since, tz)}." if since else " yet."))
    for e in entries:
        print("\n".join(_entry_lines(e, tz)))
    if counts:
        totals: dict[str, int] = {}
        for c in counts:
            totals[c["reason"]] = totals.get(c["reason"], 0) + c["count"]
        parts = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(totals.items()))
        print(f"Messages ignored before any signature check (counted, not listed): {parts}.")
    return 0


def _device_public(cfg: AgentConfig) -> tuple[DeviceKey | None, str | None]:
    path = cfg.paths.device_key_file
    if not path.exists():
        return None, f"no device key at {path}"
    try:
        return DeviceKey.load(path), None
    except DeviceKeyError as exc:
        return None, str(exc)


def _log_verify(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    key, why_no_key = _device_public(cfg)
    log = _open_log(cfg)
    if log is None:
        if args.json:
            print_json({"ok": True, "entries": 0, "problem": None, "notes": ["no access log yet"]})
        else:
            print("The access log is empty: no request has been decided yet.")
        return 0
    try:
        report = log.verify(key)
    finally:
        log.close()
    if why_no_key and report.checkpoints:
        report.notes.append(f"the device key could not be used ({why_no_key})")
    if args.json:
        print_json(report.to_json())
        return 0 if report.ok else 1
    if report.ok:
        cps = (
            f", {report.checkpoints} signed checkpoint(s), the last covering entry {report.last_checkpoint_seq}"
            if report.checkpoints
            else ", no signed checkpoint yet"
        )
        print(f"The access log is intact: {report.entries} entries{cps}.")
    else:
        first = report.first_problem
        assert first is not None
        print(f"The access log has been tampered with: {first.message}")
        good = first.seq - 1
        if good > 1:
            print(f"Entries 1 to {good} check out.")
        elif good == 1:
            print("Entry 1 checks out.")
        else:
            print("No entry before it can be vouched for.")
        if len(report.problems) > 1:
            print(f"({len(report.problems) - 1} further problem(s); see --json.)")
    for note in report.notes:
        print(f"Note: {note}.")
    return 0 if report.ok else 1


def _log_checkpoint(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    key, why = _device_public(cfg)
    if key is None:
        raise UserError(f"signing a checkpoint needs the device key: {why}")
    log = _open_log(cfg, key)
    if log is None:
        raise UserError("there is no access log yet; nothing to sign")
    try:
        cp = log.checkpoint()
    finally:
        log.close()
    if args.json:
        print_json(cp.to_json())
        return 0
    print(f"The device signed the access log up to entry {cp.seq} at {format_local(cp.at, local_zone())}.")
    return 0
