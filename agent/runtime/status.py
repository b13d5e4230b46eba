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
    from agent.state.approvals import ApprovalQueue
    from agent.state.clock import SystemClock
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
    if cfg.paths.state_db.exists():
        out["pending_approvals"] = len(ApprovalQueue(cfg.paths.state_db).pending(now))
    else:
        out["pending_approvals"] = 0
    if cfg.mqtt is not None:
        out["broker"] = {"host": cfg.mqtt.host, "port": cfg.mqtt.port, "tls": cfg.mqtt.tls}
    svc = read_status(cfg.paths.service_status_file)
    if svc is not None:
        age = (to_us(now) - int(svc.get("updated_us", 0))) / 1e6
        svc["stale"] = age > 3 * float(svc.get("status_interval_s") or 5.0)
        svc["age_s"] = round(age, 1)
    out["service"] = svc
    # The device key's pinned thumbprint (agent.state.pin): the homeowner notes it; log verify checks against it.
    out["device_key"] = device_identity(cfg.paths.data_dir, cfg.paths.device_key_file).to_json()
    return out


def consent_status(cfg: AgentConfig, now: datetime) -> dict[str, Any]:
    """Whether the resident's consent holds at ``now``, and if not, why, in words with local times.

    The rule itself is :meth:`agent.protocol.decision.Policy.consents_at`, the one the decision uses
    (step 14), so ``status`` can never say "allowed" while every request is refused for consent.
    The reason is only worked out once that rule has said no. Needs ``cfg.policy``.
    """
    from agent.protocol.decision import Policy
    from agent.timeutil import format_local, format_utc

    assert cfg.policy is not None
    policy = Policy.from_config(cfg.policy)
    consents = policy.consents_at(now)
    start, end = policy.consent_start, policy.consent_end
    if consents:
        state, why = "given", None
    elif policy.consent_withdrawn:
        state, why = "withdrawn", "you withdrew your consent (policy.consent.withdrawn = true)"
    elif now < start:
        state, why = "not_started", f"your consent period starts only on {format_local(start, seconds=False)} (policy.consent.start)"
    elif now >= end:
        state, why = "ended", f"your consent period ended on {format_local(end, seconds=False)} (policy.consent.end)"
    else:  # the rule said no for a reason this function does not know yet: say so rather than guess
        state, why = "not_given", "your consent does not cover this moment (policy.consent)"
    return {
        "consents": consents, "state": state, "why": why, "withdrawn": policy.consent_withdrawn,
        "start": format_utc(start), "end": format_utc(end),
    }  # fmt: skip
