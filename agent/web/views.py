"""What the local page shows, gathered from the agent's own files as plain data for the templates.

Nothing here is new bookkeeping: the status comes from :mod:`agent.runtime.status` (and is worded by
:func:`agent.cli.run.sharing_lines`, as ``doorbell-agent status`` words it), the access log from
:class:`agent.state.accesslog.AccessLog` (worded by :mod:`agent.state.logtext`, as ``log show``),
the held requests from :class:`agent.state.approvals.ApprovalQueue`. Every text an agency wrote goes
through :func:`agent.display.safe_text` here, before the template escapes it for HTML: autoescaping
stops markup, ``safe_text`` stops right-to-left overrides and other invisible tricks.

Reading only: nothing in this module changes the agent's state (the page's GET requests use it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from agent.config import AgentConfig
from agent.display import safe_text
from agent.errors import UserError
from agent.timeutil import duration_words, format_local, parse_utc_z, to_us

log = logging.getLogger("agent.web")

MAX_LOG_ROWS = 500  # newest first; the filters narrow it down, ``log export`` has everything


def zone(cfg: AgentConfig) -> tzinfo:
    """The resident's zone (policy.timezone), else this machine's."""
    if cfg.policy is not None:
        return ZoneInfo(cfg.policy.timezone)
    tz = datetime.now().astimezone().tzinfo
    assert tz is not None
    return tz


def _local_z(text: str | None, tz: tzinfo) -> str:
    if not text:
        return "?"
    try:
        return format_local(parse_utc_z(text), tz)
    except ValueError:
        return safe_text(text)


# -- the overview ----------------------------------------------------------------------------


def overview(cfg: AgentConfig, now: datetime) -> dict[str, Any]:
    """Everything the front page shows."""
    from agent.cli.run import sharing_lines
    from agent.runtime.status import gather_status, human_bytes, human_duration

    tz = zone(cfg)
    out: dict[str, Any] = {"problems": []}
    try:
        data = gather_status(cfg)
    except UserError as exc:
        out["problems"].append(str(exc))
        data = None
    except Exception as exc:  # a damaged database: say so on the page instead of failing the page
        log.warning("local page: cannot read the agent's status: %s: %s", type(exc).__name__, exc)
        out["problems"].append(f"cannot read the agent's status: {type(exc).__name__}: {exc}")
        data = None
    if data is None:
        out["sharing"] = {"ok": False, "headline": "Unknown: the agent's status cannot be read, so count sharing as "
                          "possible only if 'doorbell-agent status' says so", "details": []}
        return out
    sharing = data["sharing"]
    lines = [safe_text(line) for line in sharing_lines(sharing)]
    headline = lines[0].removeprefix("Sharing: ") if lines else "?"
    headline = headline[:1].upper() + headline[1:]
    out["sharing"] = {"ok": lines[0].startswith("Sharing: allowed") if lines else False, "headline": headline,
                      "details": [line.strip() for line in lines[1:]
                                  if "Device identity" not in line and "wait for your answer" not in line]}  # shown below
    out["kill_switch"] = kill_switch(cfg, tz)
    out["clock"] = {"synced": sharing["clock"]["synced"], "why": safe_text(sharing["clock"]["why"] or "")}
    svc = sharing.get("service")
    broker = sharing.get("broker")
    if broker is None:
        out["broker"] = {"state": "not configured (no [mqtt]): footage never leaves this device", "ok": False}
    elif svc is None:
        out["broker"] = {"state": f"{broker['host']}:{broker['port']}: the request listener is not running", "ok": False}
    elif svc.get("stale"):
        out["broker"] = {"state": f"{broker['host']}:{broker['port']}: the request listener has not reported for "
                                  f"{svc['age_s']:.0f} s", "ok": False}
    else:
        t = svc.get("transport") or {}
        ready = bool(t.get("ready"))
        err = f" (last problem: {t['last_error']})" if t.get("last_error") and not ready else ""
        out["broker"] = {"state": safe_text(f"{t.get('broker') or broker['host']}: "
                                            f"{'connected' if ready else t.get('state') or 'not connected'}{err}"),
                         "ok": ready}
    if broker is not None and not broker["tls"]:
        out["broker"]["warning"] = "the broker link is NOT encrypted (mqtt.tls = false)"
    rec = data["recorder"]
    if not rec["running"]:
        out["recorder"] = "not running (start it with 'doorbell-agent run')"
    elif rec["stale"]:
        out["recorder"] = f"running, but not reporting for {rec['status_age_s']:.0f} s; it may be stuck"
    else:
        out["recorder"] = "running"
    buf = data["buffer"]
    if buf["segments"]:
        out["buffer"] = {
            "span": f"{_local_z(buf['start'], tz)} to {_local_z(buf['end'], tz)}",
            "recorded": human_duration(buf["recorded_s"]), "size": human_bytes(buf["bytes"]),
            "gaps": [{"span": f"{_local_z(g['start'], tz)} to {_local_z(g['end'], tz)}",
                      "length": human_duration(g["seconds"]), "reason": safe_text(g["reason"])} for g in buf["gaps"]],
        }  # fmt: skip
    else:
        out["buffer"] = None
    out["retention"] = f"{cfg.buffer.retention_hours:g} hours"
    dk = sharing.get("device_key") or {}
    out["device_key"] = {"thumbprint": dk.get("thumbprint"), "problem": dk.get("problem")}
    out["consent"] = consent_lines(cfg, now)
    out["pending_count"] = sharing.get("pending_approvals", 0)
    return out


def kill_switch(cfg: AgentConfig, tz: tzinfo) -> dict[str, Any]:
    """The switch as the file says, with who turned it and when in local time; anything odd counts as ON."""
    from agent.state.killswitch import KillSwitch

    st = KillSwitch(cfg.paths.killswitch_file).state()
    if st.since is not None and st.by is not None:
        words = f"turned {'ON' if st.engaged else 'off'} by {st.by} on {format_local(st.since, tz)}"
    else:
        words = st.reason
    return {"engaged": st.engaged, "reason": safe_text(words)}


def consent_lines(cfg: AgentConfig, now: datetime) -> list[str]:
    """The consent period and rules in plain words.

    Uses ``agent.runtime.status.describe_consent`` where it exists (the one wording of the resident's
    consent); otherwise the state from :func:`agent.runtime.status.consent_status` and the main rules.
    """
    from agent.runtime import status

    if cfg.policy is None:
        return ["No [policy] in the configuration: nothing is ever shared."]
    describe = getattr(status, "describe_consent", None)
    if describe is not None:
        return [safe_text(line) for line in describe(cfg, now)]
    tz = zone(cfg)
    c = status.consent_status(cfg, now)
    p = cfg.policy
    period = f"from {_local_z(c['start'], tz)} to {_local_z(c['end'], tz)}"
    lines = [f"You consent to share footage {period}." if c["consents"]
             else f"Your consent does not hold now: {c['why']}. (Period: {period}.)"]
    lines.append("You are asked before anything is shared (policy.approval = \"ask\")." if p.approval == "ask"
                 else "Requests your rules allow are shared without asking you (policy.approval = \"auto\").")
    lines.append(f"At most {duration_words(p.max_window_s)} of footage per request, from a search area no wider "
                 f"than {p.max_radius_m:g} m around the place the agency names.")
    lines.append(f"At most {p.grants_per_issuer_per_day} grant(s) per agency per day.")
    if p.require_warrant:
        lines.append("Only requests that name a warrant.")
    if p.require_oversight:
        lines.append("Only requests co-signed by an oversight body.")
    return lines


# -- held requests ---------------------------------------------------------------------------


def _decision_entry(cfg: AgentConfig, jti: str) -> Any:
    """The held request's decision entry in the access log (it holds the area, basis, warrant and signers)."""
    from agent.state.accesslog import AccessLog

    if not cfg.paths.state_db.exists():
        return None
    with AccessLog(cfg.paths.state_db) as alog:
        found = [e for e in alog.entries(jti=jti) if e.type == "decision"]
    return found[-1] if found else None


def _signers(cfg: AgentConfig, kids: list[str]) -> list[str]:
    """Each key that signed, with the agency and role the trust store gives it."""
    from agent.protocol.trust import TrustStoreError
    from agent.state.truststore import load_trust_store

    try:
        trust = load_trust_store(cfg.paths.trust_file, missing_ok=True)
    except TrustStoreError:
        trust = None
    out = []
    for kid in kids:
        key = trust.get(kid) if trust is not None else None
        role = f" ({key.iss}, {key.role})" if key is not None else " (not in your trust store now)"
        out.append(safe_text(kid + role))
    return out


def pending(cfg: AgentConfig, now: datetime) -> list[dict[str, Any]]:
    """The requests waiting for the resident, with what would be shared and everything the agency said."""
    from agent.protocol.geo import haversine_m
    from agent.state.approvals import ApprovalQueue

    if not cfg.paths.state_db.exists():
        return []
    tz = zone(cfg)
    out = []
    for item in ApprovalQueue(cfg.paths.state_db).pending(now):
        # What the request claims: from the held request itself (PendingApproval.claims), else from the
        # decision entry the service logged when it held the request.
        claims = item.claims() if hasattr(item, "claims") else {}
        if not claims:
            entry = _decision_entry(cfg, item.jti)
            d: dict[str, Any] = entry.data if entry is not None else {}
            claims = {"area": d.get("area"), "basis": d.get("basis"), "warrant": d.get("warrant"),
                      "signed_by": d.get("kids")}
        area = claims.get("area") or {}
        basis = claims.get("basis")
        warrant = claims.get("warrant")
        kids = [str(k) for k in claims.get("signed_by") or []]
        where = "not recorded"
        if isinstance(area, dict) and cfg.policy is not None and "lat" in area and "lon" in area:
            home = cfg.policy.location
            dist = haversine_m(home.lat, home.lon, float(area["lat"]), float(area["lon"]))
            where = (f"a circle of {float(area.get('radius_m', 0)):g} m around a point {dist:,.0f} m from your camera")
        same_day = item.granted_start.astimezone(tz).date() == item.granted_end.astimezone(tz).date()
        end = item.granted_end.astimezone(tz).strftime("%H:%M:%S %Z") if same_day else format_local(item.granted_end, tz)
        if isinstance(warrant, dict):
            warrant_words = safe_text(f"{warrant.get('ref', '?')} ({warrant.get('court', '?')})")
        elif warrant:
            warrant_words = safe_text(str(warrant))
        else:
            warrant_words = "none named"
        out.append({
            "id": item.id,
            "agency": safe_text(item.iss), "officer": safe_text(item.sub), "case": safe_text(item.case),
            "purpose": safe_text(item.purpose),
            "window": f"{format_local(item.granted_start, tz)} to {end}",
            "length": duration_words((item.granted_end - item.granted_start).total_seconds()),
            "answer_within": duration_words((item.exp - now).total_seconds()),
            "expires": format_local(item.exp, tz, seconds=False),
            "area": where, "basis": safe_text(basis) if basis else "not stated", "warrant": warrant_words,
            "signers": _signers(cfg, kids), "jti": safe_text(item.jti),
        })  # fmt: skip
    return out


# -- the access log --------------------------------------------------------------------------

DECISION_FILTERS = {
    "": "everything",
    "granted": "granted or shared",
    "refused": "refused or stopped",
    "waiting": "waiting for you",
    "yours": "your own changes",
}
_GRANTED = {"granted", "approved", "delivered"}
_WAITING = {"awaiting_resident"}


def _category(e: Any) -> str:
    if e.type == "resident":
        return "yours"
    if e.outcome in _GRANTED:
        return "granted"
    if e.outcome in _WAITING:
        return "waiting"
    return "refused"


@dataclass
class LogFilter:
    agency: str = ""
    decision: str = ""
    since: date | None = None
    until: date | None = None  # inclusive: the whole day
    errors: list[str] = field(default_factory=list)

    @classmethod
    def from_query(cls, args: Any) -> LogFilter:
        f = cls(agency=str(args.get("agency", ""))[:64], decision=str(args.get("decision", "")))
        if f.decision not in DECISION_FILTERS:
            f.errors.append(f"'decision' must be one of: {', '.join(k or 'empty' for k in DECISION_FILTERS)}")
            f.decision = ""
        for name in ("from", "to"):
            text = str(args.get(name, "")).strip()
            if not text:
                continue
            try:
                day = date.fromisoformat(text)
            except ValueError:
                f.errors.append(f"'{name}' {safe_text(text[:40])!r} is not a date; pick one as YYYY-MM-DD")
                continue
            if name == "from":
                f.since = day
            else:
                f.until = day
        if f.since and f.until and f.until < f.since:
            f.errors.append("'to' is before 'from'; nothing can match")
        return f


def _day_start(day: date, tz: tzinfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


def access_log(cfg: AgentConfig, flt: LogFilter, now: datetime) -> dict[str, Any]:
    """The filtered entries (newest first), the agencies seen, and the log's fingerprint."""
    from agent.state.accesslog import AccessLog
    from agent.state.logtext import entry_lines

    tz = zone(cfg)
    out: dict[str, Any] = {"rows": [], "agencies": [], "head": None, "checkpoint": None, "more": 0}
    if not cfg.paths.state_db.exists():
        return out
    since = _day_start(flt.since, tz) if flt.since else None
    until = _day_start(flt.until + timedelta(days=1), tz) if flt.until else None
    buffer_start = _buffer_start_us(cfg)
    with AccessLog(cfg.paths.state_db) as alog:
        everything = alog.entries(since, until=until)
        out["agencies"] = [(iss, safe_text(iss)) for iss in sorted({e.iss for e in everything if e.iss})]
        chosen = [e for e in everything if (not flt.agency or e.iss == flt.agency)
                  and (not flt.decision or _category(e) == flt.decision)]
        seq, digest = alog.head()
        cps = alog.checkpoints()
    out["head"] = {"seq": seq, "hash": digest}
    if cps:
        cp = cps[-1]
        out["checkpoint"] = {"seq": cp.seq, "hash": cp.hash, "at": format_local(cp.at, tz), "kid": cp.kid,
                             "behind": seq - cp.seq}
    out["more"] = max(0, len(chosen) - MAX_LOG_ROWS)
    by_jti: dict[str, list[Any]] = {}
    for e in everything:
        if e.jti:
            by_jti.setdefault(e.jti, []).append(e)
    for e in reversed(chosen[-MAX_LOG_ROWS:]):
        lines = [safe_text(line.strip()) for line in entry_lines(e, tz)]
        row: dict[str, Any] = {"seq": e.seq, "kind": _category(e), "head": lines[0], "lines": lines[1:],
                               "watch": None}
        if e.type == "event" and e.outcome == "delivered":
            window = shared_window(e, by_jti.get(e.jti, []))
            if window is not None:
                row["watch"] = "available" if buffer_start is not None and to_us(window[0]) >= buffer_start else "gone"
        out["rows"].append(row)
    return out


def _buffer_start_us(cfg: AgentConfig) -> int | None:
    from agent.buffer.segments import SegmentStore

    if not cfg.paths.buffer_db.exists():
        return None
    store = SegmentStore(cfg.paths.buffer_db, cfg.paths.segments_dir, buffer=cfg.buffer)
    try:
        return store.summary().start_us
    finally:
        store.close()


def shared_window(delivered: Any, same_request: list[Any]) -> tuple[datetime, datetime] | None:
    """The window a delivery shared, as the log's own summary works it out (the approval's, else the grant's)."""
    from agent.state.accesslog import AccessLog

    w = AccessLog._grant_window(delivered, {x.seq: x for x in same_request})
    try:
        return parse_utc_z(w["start"]), parse_utc_z(w["end"])
    except (KeyError, TypeError, ValueError):
        return None


def delivered_entry(cfg: AgentConfig, seq: int) -> tuple[Any, tuple[datetime, datetime] | None, list[Any]]:
    """The ``delivered`` event numbered ``seq``, its window and the request's entries; (None, None, []) if none."""
    from agent.state.accesslog import AccessLog

    if not cfg.paths.state_db.exists():
        return None, None, []
    with AccessLog(cfg.paths.state_db) as alog:
        found = alog.entries(seqs=[seq])
        if not found or found[0].type != "event" or found[0].outcome != "delivered":
            return None, None, []
        same = alog.entries(jti=found[0].jti)
    return found[0], shared_window(found[0], same), same


def cut_shared(cfg: AgentConfig, window: tuple[datetime, datetime], dest: Path) -> None:
    """Cut the shared window from the buffer into ``dest`` exactly as the delivery worker did (same call)."""
    from agent.buffer.clips import ClipError, NoFootageError, cut_clip
    from agent.buffer.segments import SegmentStore

    if not cfg.paths.buffer_db.exists():
        raise UserError("there is no footage buffer on this device")
    s_us, e_us = to_us(window[0]), to_us(window[1])
    store = SegmentStore(cfg.paths.buffer_db, cfg.paths.segments_dir, buffer=cfg.buffer)
    try:
        cut_clip(store.overlapping(s_us, e_us), s_us, e_us, dest)
    except NoFootageError:
        raise UserError("the buffer no longer holds this footage (it keeps footage "
                        f"{cfg.buffer.retention_hours:g} hours)") from None
    except ClipError as exc:
        raise UserError(f"the footage cannot be read: {exc}") from None
    finally:
        store.close()


def window_words(window: tuple[datetime, datetime], tz: tzinfo) -> str:
    start, end = window
    return (f"{format_local(start, tz)} to {format_local(end, tz)} "
            f"({duration_words((end - start).total_seconds())})")


def buffer_holds(cfg: AgentConfig, window: tuple[datetime, datetime]) -> bool:
    start = _buffer_start_us(cfg)
    return start is not None and to_us(window[0]) >= start


def local_now(cfg: AgentConfig) -> str:
    return format_local(datetime.now(UTC), zone(cfg), seconds=False)

