"""The access log in words for people: what each entry means, one line (or a few) per entry.

Shared by ``doorbell-agent log`` and the local page (:mod:`agent.web`), so both say the same thing
about the same entry. The lines hold agency-written text as it is: pass each through
:func:`agent.display.safe_text` (the command line) or render it escaped (the page) before showing it.
"""

from __future__ import annotations

from datetime import tzinfo
from typing import Any

from agent.state.accesslog import LogEntry
from agent.timeutil import format_local, parse_utc_z

REASON_WORDS = {
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
EVENT_WORDS = {
    "approved": "you approved it",
    "declined_by_resident": "you declined it",
    "approval_expired": "it expired before you approved it",
    "delivered": "the footage was delivered",
    "delivery_cut": "the delivery was stopped by the kill switch",
    "delivery_failed": "the delivery failed",
    "delivery_refused": "stopped: when it was to be sent, your rules or trusted keys no longer allowed it",
}
CHANGE_WORDS = {
    "killswitch_on": "the kill switch was turned ON: nothing is shared",
    "killswitch_off": "the kill switch was turned off: requests follow your rules again",
    "trust_added": "agency key(s) added to your trust store",
    "trust_revoked": "agency key(s) revoked in your trust store",
    "trust_restored": "agency key(s) restored in your trust store",
    "rules_changed": "your rules changed",
    "rules_recorded": "your rules were recorded",
    "approval_answered": "you answered a request waiting for your approval",
    "consent_changed": "you changed your consent or limits",
    "consent_withdrawn": "you WITHDREW your consent: nothing is shared",
    "consent_resumed": "you gave your consent again: requests follow your rules",
    "buffer_wiped": "you erased the stored footage",
}
REFUSAL_WORDS = {**{k: v.removeprefix("refused: ") for k, v in REASON_WORDS.items()},
                  "declined_by_resident": "you declined it", "approval_expired": "it expired before you answered"}


def window_words(w: Any, tz: tzinfo) -> str:
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


def change_details(d: dict[str, Any]) -> str:
    parts = []
    if d.get("changed"):
        parts.append("changed: " + ", ".join(str(c) for c in d["changed"]))
    for key in ("issuer", "kids", "request", "answer", "file", "segments", "bytes"):
        v = d.get(key)
        if v:
            parts.append(f"{key.replace('_', ' ')} {', '.join(v) if isinstance(v, list) else v}")
    return f" ({'; '.join(parts)})" if parts else ""


def entry_words(e: LogEntry) -> str:
    if e.type == "event":
        return EVENT_WORDS.get(e.outcome, e.outcome)
    if e.type == "resident":
        return CHANGE_WORDS.get(e.outcome, e.outcome)
    return REASON_WORDS.get(e.outcome, e.outcome)


def entry_lines(e: LogEntry, tz: tzinfo) -> list[str]:
    d = e.data
    head = f"#{e.seq}  {format_local(e.at, tz)}  "
    if e.type == "resident":
        return [head + f"YOUR CHANGE: {entry_words(e)}{change_details(d)}, by {d.get('by', '?')}"]
    if e.type == "event":
        words = entry_words(e)
        extra = []
        if isinstance(d.get("bytes"), int):
            extra.append(f"{d['bytes']:,} bytes")
        if e.outcome != "delivered" and isinstance(d.get("chunks_handed"), int):
            # What the agency can hold: a delivery short of its last chunk can never be opened.
            of = f" of {d['chunks']}" if isinstance(d.get("chunks"), int) else ""
            extra.append(f"{d['chunks_handed']}{of} chunks may have reached the agency")
        if e.outcome in ("delivery_refused", "delivery_failed") and isinstance(d.get("reason"), str):
            extra.append(f"why: {d['reason']}")
        if d.get("delivery_id"):
            extra.append(f"delivery {d['delivery_id']}")
        tail = f" ({', '.join(extra)})" if extra else ""
        return [head + f"request {e.jti} from {e.iss} (entry #{d.get('ref_seq')}): {words}{tail}"]
    lines = [head + f"{e.iss}, officer {d.get('sub')}, case {d.get('case')}: {entry_words(e)}"]
    lines.append(f"      purpose: {d.get('purpose')}")
    area = d.get("area") or {}
    lines.append(
        f"      asked for: {window_words(d.get('requested'), tz)}, within {area.get('radius_m', 0):g} m of "
        f"{area.get('lat')}, {area.get('lon')}" + (f"; warrant {d['warrant'].get('ref')} ({d['warrant'].get('court')})" if isinstance(d.get("warrant"), dict) else "")
    )
    if d.get("granted"):
        label = "granted" if e.outcome == "granted" else "would share"
        shared = f"      {label}: {window_words(d.get('granted'), tz)}"
        if isinstance(d.get("bytes"), int):
            shared += f", {d['bytes']:,} bytes"
        lines.append(shared)
    lines.append(f"      request {e.jti}, signed by {', '.join(d.get('kids') or []) or '?'}")
    return lines
