"""The live status files, and everything ``doorbell-agent status`` reports, as plain data.

The recorder and the sharing service each replace a small JSON file every few
seconds (:func:`agent.fsutil.write_json_atomic`); ``status``, which may run in another
process, reads them back (:func:`agent.fsutil.read_status`) and adds what it can see for
itself: whether a recorder holds the buffer's lock, and what the buffer holds.

Importing this module loads no video library: the helpers are used by the
recorder and the sharing service, and :func:`gather_status` imports the
buffer index and the sharing side only when it is called.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.fsutil import read_status

if TYPE_CHECKING:
    from agent.config import AgentConfig

# A status file older than this (or three status intervals, if longer) is stale.
STALE_AFTER_S = 15.0


def gather_status(cfg: AgentConfig, now: int | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (the ``--json`` form)."""
    from agent.buffer.segments import SegmentStore
    from agent.runtime.supervisor import recorder_running
    from agent.timeutil import format_utc, from_us

    now = now if now is not None else time.time_ns() // 1000
    running = recorder_running(cfg)
    st = read_status(cfg.paths.status_file)
    rec: dict[str, Any] = {"running": running, "stale": False, "status": st}
    if st is not None:
        age_s = (now - int(st.get("updated_us", 0))) / 1e6
        limit = max(STALE_AFTER_S, 3 * float(st.get("status_interval_s", 5.0)))
        rec["status_age_s"] = round(age_s, 1)
        rec["stale"] = running and age_s > limit
    buf: dict[str, Any] = {"segments": 0, "bytes": 0, "recorded_s": 0.0, "start": None, "end": None, "gaps": []}
    if cfg.paths.buffer_db.exists():
        store = SegmentStore(cfg.paths.buffer_db, cfg.paths.segments_dir, buffer=cfg.buffer)
        try:
            s = store.summary()
        finally:
            store.close()
        buf.update(
            segments=s.segments,
            bytes=s.total_bytes,
            recorded_s=round(s.recorded_us / 1e6, 3),
            start=format_utc(from_us(s.start_us), ms=True) if s.start_us is not None else None,
            end=format_utc(from_us(s.end_us), ms=True) if s.end_us is not None else None,
            gaps=[{"start": format_utc(from_us(g.start_us), ms=True), "end": format_utc(from_us(g.end_us), ms=True),
                   "seconds": round((g.end_us - g.start_us) / 1e6, 3), "reason": g.reason} for g in s.gaps],
        )
    return {"recorder": rec, "buffer": buf, "sharing": sharing_status(cfg)}


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} TB"


def human_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m} min" if h else f"{m} min {sec} s"


def sharing_status(cfg: AgentConfig, now: datetime | None = None) -> dict[str, Any]:
    """What ``status`` shows about sharing: read from disk, so it works while ``run`` is in another process."""
    from agent.protocol.trust import TrustStoreError
    from agent.runtime.supervisor import recorder_running
    from agent.state.approvals import ApprovalQueue
    from agent.state.clock import SystemClock
    from agent.state.integrity import STATE_DB
    from agent.state.killswitch import KillSwitch
    from agent.state.pin import device_identity
    from agent.state.truststore import load_trust_store
    from agent.timeutil import to_us

    now = now or datetime.now(UTC)
    out: dict[str, Any] = {"enabled": cfg.policy is not None and cfg.mqtt is not None}
    ks = KillSwitch(cfg.paths.killswitch_file).state()
    out["kill_switch"] = {"engaged": ks.engaged, "reason": ks.reason}
    ok, why = SystemClock.from_config(cfg).synced()
    out["clock"] = {"synced": ok, "why": why}
    try:
        trust = load_trust_store(cfg.paths.trust_file, missing_ok=True)
        out["trust"] = {"keys": len(trust), "usable": sum(1 for k in trust if k.valid_at(now)), "error": None}
    except TrustStoreError as exc:
        out["trust"] = {"keys": 0, "usable": 0, "error": str(exc)}
    if cfg.policy is not None:
        out["consent"] = consent_status(cfg, now)
    # What `run` checks at start (agent/state/integrity.py), checked again read-only: damaged or lost state
    # means `run` shares nothing, and the resident must hear it here, not only in the journal.
    refused = state_refusals(cfg)  # also without [mqtt]: a damaged access log is worth knowing about
    out["state"] = {"ok": not refused, "refused": refused}
    out["pending_approvals"] = 0
    if cfg.paths.state_db.exists() and STATE_DB not in refused:
        try:
            out["pending_approvals"] = len(ApprovalQueue(cfg.paths.state_db).pending(now))
        except Exception:  # noqa: BLE001 - sqlite3.Error, StateCorrupt, OSError: `status` still answers
            pass
    if cfg.mqtt is not None:
        out["broker"] = {"host": cfg.mqtt.host, "port": cfg.mqtt.port, "tls": cfg.mqtt.tls}
    svc = read_status(cfg.paths.service_status_file)
    if svc is not None:
        age = (to_us(now) - int(svc.get("updated_us", 0))) / 1e6
        svc["stale"] = age > 3 * float(svc.get("status_interval_s") or 5.0)
        svc["age_s"] = round(age, 1)
    out["service"] = svc
    out["run_running"] = recorder_running(cfg)  # `run` holds the recorder's lock while it is up
    out["not_sharing"] = not_sharing_reason(out)
    if STATE_DB in refused:  # the reason is said once (not_sharing); the log is not opened again
        out["log"] = {"hours": COUNT_HOURS, "error": "state.sqlite is damaged or lost; see above"}
    else:
        out["log"] = log_counts(cfg, now)
    # The device key's pinned thumbprint (agent.state.pin): the homeowner notes it; log verify checks against it.
    out["device_key"] = device_identity(cfg.paths.data_dir, cfg.paths.device_key_file).to_json()
    return out


def state_refusals(cfg: AgentConfig) -> dict[str, str]:
    """Why ``run`` refuses (or would refuse) to share on the state under data_dir, file name -> why; read-only.

    The check ``run`` makes at start (:func:`agent.state.integrity.sharing_refusals`), without its writes.
    Never raises: a check that cannot run is itself a reason (fail closed).
    """
    from agent.state.integrity import sharing_refusals

    try:
        return sharing_refusals(cfg.paths.data_dir, read_only=True)
    except Exception as exc:  # noqa: BLE001 - an OSError on data_dir, for one
        return {"data_dir": f"the agent's state in {cfg.paths.data_dir} cannot be checked ({type(exc).__name__}: {exc})"}


RESTART = "then restart the agent (sudo systemctl restart doorbell-agent)"


def not_sharing_reason(s: dict[str, Any]) -> str | None:
    """Why ``run`` is not sharing although the configuration asks it to, with what to do; None if nothing stands in the way here.

    Two things: the state check (``s["state"]``: damaged or lost state, which ``run`` refuses to share on),
    and, while ``run`` is up, a request listener that is not running at all (``s["service"]``). The other
    blockers (kill switch, clock, trust, consent) have their own fields.
    """
    if not s.get("enabled"):
        return None
    refused = (s.get("state") or {}).get("refused") or {}
    if refused:
        return "; and ".join(refused.values())
    if not s.get("run_running"):
        return None  # the agent is not running: `status` says so on its own line
    svc = s.get("service")
    if svc is None or svc.get("stopped"):
        return ("'doorbell-agent run' is running but its request listener is not: it refused to start or stopped "
                "(see why with: journalctl -u doorbell-agent -n 50); fix what it says, " + RESTART)
    if svc.get("stale"):
        return (f"the request listener of 'doorbell-agent run' has not reported for {svc['age_s']:.0f} s: it may be "
                "stuck (see: journalctl -u doorbell-agent -n 50); " + RESTART)
    return None


COUNT_HOURS = 24


def log_counts(cfg: AgentConfig, now: datetime, hours: int = COUNT_HOURS) -> dict[str, Any]:
    """The last ``hours`` of requests, grants, refusals and deliveries, as the access log has them.

    From the log, not the service's memory: the counts survive a restart, and are right while the agent
    is stopped. ``error`` says why there are none (a log this user cannot read, for instance).
    """
    from datetime import timedelta

    from agent.timeutil import format_utc

    out: dict[str, Any] = {"hours": hours, "since": format_utc(now - timedelta(hours=hours)), "error": None}
    if not cfg.paths.state_db.exists():
        out.update(requests=0, granted=0, refused=0, waiting=0, delivered=0, ignored=0)
        return out
    try:
        from agent.state.accesslog import AccessLog

        with AccessLog(cfg.paths.state_db) as alog:
            s = alog.summary(now - timedelta(hours=hours), now + timedelta(seconds=1))
    except Exception as exc:  # sqlite3.Error, OSError, a damaged log: `status` still answers
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    out.update(requests=s["requests"] + s["refused_not_listed"], granted=s["granted"],
               refused=s["refused"] + s["refused_not_listed"], waiting=s["waiting_or_held"],
               delivered=s["deliveries"], cut=s["deliveries_cut"], failed=s["deliveries_failed"],
               ignored=s["ignored_before_authentication"])
    return out


def consent_status(cfg: AgentConfig, now: datetime) -> dict[str, Any]:
    """Whether the resident's consent holds at ``now``, and if not, why, in words with local times.

    The rules are those in force (:func:`agent.state.consent.effective_policy`: the configuration with
    the resident's consent file applied) and the rule itself is :meth:`agent.protocol.decision.Policy.consents_at`,
    the one the decision uses (step 14), so ``status`` can never say "allowed" while every request is
    refused for consent. A consent file that cannot be used counts as no consent, as in the service.
    Needs ``cfg.policy``.
    """
    from agent.protocol.decision import Policy
    from agent.state.consent import ConsentFileError, effective_policy, overridden_keys
    from agent.timeutil import format_local, format_utc

    assert cfg.policy is not None
    try:
        rules = effective_policy(cfg)
        overridden = overridden_keys(cfg)
    except ConsentFileError as exc:
        from agent.state.consent import FIX

        start_, end_ = cfg.policy.consent.start, cfg.policy.consent.end
        return {"consents": False, "state": "unreadable", "why": f"{exc}; {FIX}", "withdrawn": True,
                "start": format_utc(start_), "end": format_utc(end_), "source": "consent_file", "file_error": str(exc)}
    where = "consent" if "consent" in overridden else "policy.consent"
    policy = Policy.from_config(rules)
    consents = policy.consents_at(now)
    start, end = policy.consent_start, policy.consent_end
    if consents:
        state, why = "given", None
    elif policy.consent_withdrawn:
        state, why = "withdrawn", ("you withdrew your consent (doorbell-agent consent withdraw; "
                                   "'doorbell-agent consent set --resume' gives it again)" if where == "consent"
                                   else "you withdrew your consent (policy.consent.withdrawn = true)")
    elif now < start:
        state, why = "not_started", f"your consent period starts only on {format_local(start, seconds=False)} ({where}.start)"
    elif now >= end:
        state, why = "ended", f"your consent period ended on {format_local(end, seconds=False)} ({where}.end)"
    else:  # the rule said no for a reason this function does not know yet: say so rather than guess
        state, why = "not_given", f"your consent does not cover this moment ({where})"
    return {
        "consents": consents, "state": state, "why": why, "withdrawn": policy.consent_withdrawn,
        "start": format_utc(start), "end": format_utc(end),
        **({"source": "consent_file", "overridden": overridden} if overridden else {}),
    }  # fmt: skip


def human_seconds(seconds: float) -> str:
    """A limit for people: "1 hour", "3 days", "90 minutes"."""
    s = int(seconds)
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if s >= size and s % size == 0:
            n = s // size
            return f"{n} {unit}{'' if n == 1 else 's'}"
    if s >= 3600 and s % 60 == 0:
        return f"{s // 60} minutes"
    return f"{s} second{'' if s == 1 else 's'}"


def human_metres(m: float) -> str:
    return f"{m / 1000:g} km" if m >= 1000 else f"{m:g} m"


_DAY_WORDS = {"mon": "Mon", "tue": "Tue", "wed": "Wed", "thu": "Thu", "fri": "Fri", "sat": "Sat", "sun": "Sun"}


def schedule_words(rules: Any) -> str:
    """The weekly schedule in words: "any day, any time", or "Mon, Tue 08:00-20:00; Sat 10:00-14:00"."""
    parts = []
    for r in rules:
        days = list(r.days)
        if set(days) == set(_DAY_WORDS):
            day_text = "every day"
        elif days == ["mon", "tue", "wed", "thu", "fri"]:
            day_text = "Mon-Fri"
        elif set(days) == {"sat", "sun"}:
            day_text = "Sat, Sun"
        else:
            day_text = ", ".join(_DAY_WORDS[d] for d in days)
        hours = "all day" if (r.from_, r.to) in (("00:00", "24:00"), ("00:00", "00:00")) else f"{r.from_}-{r.to}"
        parts.append(f"{day_text} {hours}")
    if parts == ["every day all day"]:
        return "any day, any time"
    return "; ".join(parts)


def describe_consent(cfg: AgentConfig, now: datetime) -> list[str]:
    """The resident's consent and limits in plain words, one sentence a line (``consent show``, ``status``, the page).

    Names the trusted agencies from the trust store when there are some, else the program. Local
    times in the resident's zone. A consent file that cannot be used is said first, with the fix.
    """
    from zoneinfo import ZoneInfo

    from agent.protocol.trust import TrustStoreError
    from agent.state.consent import ConsentFileError, effective_policy
    from agent.state.truststore import load_trust_store
    from agent.timeutil import format_local

    policy = cfg.require_policy()
    tz = ZoneInfo(policy.timezone)
    st = consent_status(cfg, now)
    out: list[str] = []
    try:
        rules = effective_policy(cfg)
    except ConsentFileError:
        return [f"Consent: NOTHING IS SHARED: {st['why']}."]
    try:
        trust = load_trust_store(cfg.paths.trust_file, missing_ok=True)
        names = sorted({k.iss for k in trust if k.role == "requester" and k.valid_at(now)})
    except TrustStoreError:
        names = []
    who = (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) if names else (
        f"Agencies of the program {rules.program}")
    end_local = rules.consent.end.astimezone(tz)
    until = format_local(rules.consent.end, tz, seconds=False)
    if end_local.hour == 0 and end_local.minute == 0:  # the end of the day before, as `consent set --until DAY` means
        from datetime import timedelta

        until = f"the end of {(end_local - timedelta(days=1)).strftime('%a %d %b %Y')}"
    if st["consents"]:
        out.append(f"Consent: GIVEN, from {format_local(rules.consent.start, tz, seconds=False)} until {until}.")
    elif st["state"] == "withdrawn":
        out.append("Consent: WITHDRAWN, nothing is shared. 'doorbell-agent consent set --resume' gives it again.")
    else:
        out.append(f"Consent: NOT IN FORCE now, nothing is shared: {st['why']}.")
    schedule = schedule_words(rules.consent.schedule)
    sentence = (f"{who} may receive up to {human_seconds(rules.max_window_s)} of footage at a time, from the last "
                f"{human_seconds(rules.max_age_s)}, for incidents within {human_metres(rules.max_radius_m)} of your home, "
                f"until {until}")
    out.append(sentence + ("." if schedule == "any day, any time" else f", recorded {schedule} only."))
    limits = [f"at most {rules.grants_per_issuer_per_day} grant(s) per agency per day"]
    if rules.require_warrant:
        limits.append("a warrant is required")
    if rules.require_oversight:
        limits.append("an oversight body must co-sign")
    limits.append("you approve each request yourself (doorbell-agent pending)" if rules.approval == "ask"
                  else "requests that meet these rules are shared without asking you")
    out.append("Limits: " + "; ".join(limits) + ".")
    if st.get("overridden"):
        out.append(f"Set with 'doorbell-agent consent' (in {cfg.paths.consent_file}), in place of the configuration "
                   f"file's values: {', '.join(st['overridden'])}.")
    return out


# -- does buffer.max_bytes hold buffer.retention_hours? ------------------------------------------------------

# Bits per pixel per frame that libx264 spends at the agent's settings (hardware/README.md, "Storage"): a clean,
# still picture (0.58 Mbit/s at 1280x720, 15 fps) and a detailed moving one with sensor noise (4.2 Mbit/s).
QUIET_BITS_PER_PIXEL = 0.58e6 / (1280 * 720 * 15)
BUSY_BITS_PER_PIXEL = 4.2e6 / (1280 * 720 * 15)
RECENT_HOURS = 6.0  # the footage the measured rate is taken from: the camera and scene as they are now
MIN_MEASURED_S = 600.0  # less than this much recent footage is too little to go by


def recorded_bytes_per_hour(cfg: AgentConfig, now_us: int | None = None) -> float | None:
    """What the recorder actually stored per hour of footage over the last :data:`RECENT_HOURS`, or None.

    Read from buffer.sqlite (segment sizes and durations) read-only: callers (``doctor``, ``config check``)
    must not create or upgrade the index a recorder may be writing.
    """
    import sqlite3

    path = cfg.paths.buffer_db
    if not path.exists() or path.stat().st_size == 0:
        return None
    now_us = now_us if now_us is not None else time.time_ns() // 1000
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            row = conn.execute("SELECT COALESCE(SUM(bytes), 0), COALESCE(SUM(end_us - start_us), 0) FROM segments "
                               "WHERE end_us > ?", (now_us - int(RECENT_HOURS * 3600e6),)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None  # an estimate only; a damaged index is reported (and rebuilt) elsewhere
    total, dur_us = int(row[0]), int(row[1])
    if dur_us < MIN_MEASURED_S * 1e6 or total <= 0:
        return None
    return total / (dur_us / 3600e6)


def estimated_bytes_per_hour(cfg: AgentConfig) -> tuple[float, float]:
    """Bytes per hour of footage for this camera setting before anything was recorded: (quiet scene, busy scene)."""
    cam = cfg.camera
    pixel_rate = cam.width * cam.height * cam.fps
    mbit = 1e6 / 8 * 3600  # bytes per hour at 1 Mbit/s
    if cam.source == "rtsp":  # stored as the camera sends it, at the bitrate set in its app
        return 1.0 * mbit, 4.0 * mbit
    if cam.source == "picamera2":  # the hardware encoder's fixed bitrate: 1.33 Mbit/s at 720p15, scaled
        rate = 1.33 * mbit * pixel_rate / (1280 * 720 * 15)
        return rate, rate
    if cam.encoder == "h264_v4l2m2m":
        return 4.0 * mbit, 4.0 * mbit
    return QUIET_BITS_PER_PIXEL * pixel_rate / 8 * 3600, BUSY_BITS_PER_PIXEL * pixel_rate / 8 * 3600


def retention_warning(cfg: AgentConfig, now_us: int | None = None) -> str | None:
    """A sentence when buffer.max_bytes cannot (or may not) hold buffer.retention_hours of footage, else None.

    The recorder deletes the oldest footage at whichever limit comes first, so a too small max_bytes silently
    shortens the hours kept. Uses the rate measured from recent footage when there is enough, else an estimate
    for the configured resolution and frame rate.
    """
    b, cam = cfg.buffer, cfg.camera
    want = b.retention_hours
    size = f"buffer.max_bytes ({human_bytes(b.max_bytes)})"
    measured = recorded_bytes_per_hour(cfg, now_us)
    if measured is not None:
        hours = b.max_bytes / measured
        if hours >= want:
            return None
        return (f"{size} holds only about {hours:.1f} hours of footage at the rate this camera recorded lately "
                f"({human_bytes(measured)} per hour), not the {want:g} hours of buffer.retention_hours: the oldest footage "
                f"is deleted sooner. Set buffer.max_bytes to {_bytes_setting(measured * want)} (if the disk has room; "
                f"'doorbell-agent doctor' checks), or buffer.retention_hours to {max(hours, 0.1):.1f} or less")
    quiet, busy = estimated_bytes_per_hour(cfg)
    most, least = b.max_bytes / quiet, b.max_bytes / busy
    setting = f"{cam.width}x{cam.height} at {cam.fps} fps"
    if least >= want:
        return None
    span = f"about {most:.1f} hours" if abs(most - least) < 0.05 else f"between {least:.1f} and {most:.1f} hours"
    verdict = "cannot hold" if most < want else "may not hold"
    return (f"{size} {verdict} the {want:g} hours of buffer.retention_hours: at {setting} it holds {span} of footage "
            f"({'estimated from a still to a busy picture' if most != least else 'estimated for this camera'}; "
            f"too little recent footage to measure). Set buffer.max_bytes to {_bytes_setting(quiet * want)}"
            f"{'' if most == least else ' (still) to ' + _bytes_setting(busy * want) + ' (busy)'} if the disk has room, "
            "or lower buffer.retention_hours; after a few hours of recording "
            "'doorbell-agent doctor' measures the real rate")


def _bytes_setting(n: float) -> str:
    """A buffer.max_bytes value to suggest: 10% above ``n``, as the key takes it (bytes) and in words."""
    value = int(n * 1.1)
    return f"{value} ({human_bytes(value)})"
