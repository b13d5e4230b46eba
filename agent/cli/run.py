"""``doorbell-agent run`` (record, and serve requests) and ``doorbell-agent status``.

Only arguments and printing live here: the process itself is
:mod:`agent.runtime.supervisor`, the figures :mod:`agent.runtime.status`.
Neither loads a video library when imported (the recorder is imported when
recording starts), so building the parser for any other command stays cheap.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent.cli.common import add_json_flag, config_from, log_to_stderr, print_json
from agent.runtime.status import gather_status, human_bytes, human_duration
from agent.runtime.supervisor import run_agent
from agent.timeutil import format_local, from_us


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="record the camera into the rolling buffer until stopped",
                       description="Record the camera into the rolling buffer until stopped (Ctrl-C or SIGTERM).")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="show what the recorder is doing and how much footage is held",
                       description="Show whether the recorder is running, its frame rate and dropped frames, "
                       "how much footage is held and any gaps.")
    add_json_flag(p)
    p.set_defaults(func=cmd_status)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    log_to_stderr()
    return run_agent(cfg)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    data = gather_status(cfg)
    if args.json:
        print_json(data)
    else:
        print("\n".join(status_lines(data)))
        if cfg.policy is not None:  # the consent and limits in force, in words (as `consent show` says them)
            from datetime import UTC, datetime

            from agent.runtime.status import describe_consent

            print("\n".join("  " + line for line in describe_consent(cfg, datetime.now(UTC))))
    return 0


def status_lines(data: dict[str, Any]) -> list[str]:
    rec, buf, st = data["recorder"], data["buffer"], data["recorder"]["status"]
    out: list[str] = []
    if not rec["running"]:
        when = f" (last seen {_local_us(st['updated_us'])})" if st and st.get("updated_us") else ""
        out.append(f"Recorder: NOT RUNNING{when}. Start it with 'doorbell-agent run' "
                   "(or 'systemctl start doorbell-agent').")
    elif st is None:
        out.append("Recorder: running, but it has not reported its counters yet.")
    elif rec["stale"]:
        out.append(f"Recorder: running, but its status is STALE (last update {rec['status_age_s']:.0f} s ago "
                   f"at {_local_us(st['updated_us'])}); it may be stuck. Check its log.")
    else:
        out.append(f"Recorder: running (pid {st['pid']}), camera {st['camera_state']}.")
    if st:
        out.append(f"  Camera: {st['camera']}" + (f" ({st['mode']}, {st['codec']})" if st.get("mode") else ""))
        captured, dropped = st["frames_captured"], st["frames_dropped"]
        pct = 100.0 * dropped / captured if captured else 0.0
        out.append(f"  Frame rate: {st['fps']:.1f} fps; frames captured {captured}, dropped {dropped} ({pct:.2f}%); "
                   f"reconnects {st['reconnects']}")
        if st.get("disk_full"):
            out.append(f"  {st['disk_full']}. Free some space on the disk that holds the footage.")
        if st.get("last_error"):
            out.append(f"  Last problem: {st['last_error']} at {_local_us(st['last_error_us'])}")
    if buf["segments"] == 0:
        out.append("Footage: none stored yet.")
    else:
        out.append(f"Footage: {_local_z(buf['start'])} to {_local_z(buf['end'])}, "
                   f"{human_duration(buf['recorded_s'])} recorded, {buf['segments']} segments, {human_bytes(buf['bytes'])}.")
    if buf["gaps"]:
        out.append(f"Gaps ({len(buf['gaps'])}):")
        for g in buf["gaps"]:
            out.append(f"  {_local_z(g['start'])} to {_local_z(g['end'])} ({human_duration(g['seconds'])}): {g['reason']}")
    if "sharing" in data:

        out.extend(sharing_lines(data["sharing"]))
    return out


def _local_us(us: int) -> str:
    return format_local(from_us(int(us)))


def _local_z(text: str) -> str:
    from agent.timeutil import parse_utc_z

    return format_local(parse_utc_z(text))


def sharing_lines(data: dict[str, Any]) -> list[str]:
    """``sharing_status`` in plain words for the homeowner."""
    out = []
    if not data["enabled"]:
        refused = (data.get("state") or {}).get("refused") or {}
        return ["Sharing: OFF (no [policy] and [mqtt] in the configuration): footage never leaves this device.",
                *(f"  WARNING: {why}." for why in refused.values())]
    blockers = []
    if data.get("not_sharing"):  # damaged or lost state, or a listener that is not running (runtime/status.py)
        blockers.append(data["not_sharing"])
    if data["kill_switch"]["engaged"]:
        blockers.append(f"the kill switch is ON ({data['kill_switch']['reason']})")
    if not data["clock"]["synced"]:
        blockers.append(f"the clock is not known to be right ({data['clock']['why']})")
    trust = data["trust"]
    if trust["error"]:
        blockers.append(f"the trust store cannot be read ({trust['error']})")
    elif trust["usable"] == 0:
        blockers.append("no agency key is trusted (doorbell-agent trust add FILE)")
    consent = data.get("consent")
    if consent and not consent["consents"]:
        blockers.append(consent["why"])
    svc_now = data.get("service") or {}
    if svc_now.get("consent_file_error") and not svc_now.get("stopped") and not (consent and consent.get("file_error")):
        blockers.append(f"the running agent cannot use your consent file ({svc_now['consent_file_error']})")
    if blockers:
        out.append("Sharing: BLOCKED, nothing will be shared because " + "; and ".join(blockers) + ".")
    else:
        until = f"; your consent runs until {_local_z(consent['end'])}" if consent else ""
        out.append(f"Sharing: allowed for signed requests that meet your rules ({trust['usable']} trusted agency key(s){until}).")
    broker = data.get("broker")
    if broker and not broker["tls"]:
        out.append("  WARNING: the broker link is NOT encrypted (mqtt.tls = false).")
    svc = data.get("service")
    if svc is None:
        out.append("  Request listener: not running (it starts with 'doorbell-agent run').")
    elif svc.get("stopped"):
        out.append(f"  Request listener: STOPPED at {_local_us(svc['updated_us'])}; not connected to the broker "
                   "(it starts with 'doorbell-agent run').")
    elif svc.get("stale"):
        out.append(f"  Request listener: not reporting for {svc['age_s']:.0f} s; the agent may have stopped.")
    else:
        t = svc.get("transport") or {}
        state = "connected" if t.get("ready") else (t.get("state") or "unknown")
        err = f" (last problem: {t['last_error']})" if t.get("last_error") and not t.get("ready") else ""
        out.append(f"  Broker {t.get('broker', '?')}: {state}{err}.")
        out.extend(intake_lines(t))
    counts = data.get("log")
    if counts and counts.get("error"):
        out.append(f"  Requests: cannot read the access log ({counts['error']}).")
    elif counts:
        out.append(f"  Last {counts['hours']} hours (from your access log): {counts['requests']} request(s), "
                   f"{counts['granted']} granted, {counts['refused']} refused, {counts['waiting']} held for you, "
                   f"{counts['delivered']} deliveries completed; {counts['ignored']} unsigned or malformed "
                   "messages ignored.")
    if data["pending_approvals"]:
        out.append(f"  {data['pending_approvals']} request(s) wait for your answer: doorbell-agent pending")
    dk = data.get("device_key") or {}
    if dk.get("thumbprint"):  # note it down: `log verify --device-key` and agencies' manifests (kid) use it
        out.append(f"  Device identity (thumbprint, note it down): {dk['thumbprint']}")
    if dk.get("problem"):
        out.append(f"  DEVICE KEY PROBLEM: {dk['problem']}")
    return out


def intake_lines(transport: dict[str, Any]) -> list[str]:
    """What waits in the inbox, and anything the agent could not keep: a request may have been among it."""
    out: list[str] = []
    inbox = transport.get("inbox") or {}
    tc = transport.get("counters") or {}
    if inbox.get("messages"):
        out.append(f"  Inbox: {inbox['messages']} message(s) waiting for a decision "
                   f"(room for {inbox.get('max_messages', '?')}).")
    lost = []
    if tc.get("inbox_full"):
        lost.append(f"{tc['inbox_full']} dropped because the inbox was full (a flood)")
    if tc.get("inbox_unwritable"):
        lost.append(f"{tc['inbox_unwritable']} left with the broker because the inbox could not be written "
                    "(check the disk); the broker offers them again after a reconnect")
    if tc.get("packet_too_large"):
        lost.append(f"{tc['packet_too_large']} packet(s) larger than agreed refused (the broker misbehaves)")
    if lost:
        out.append("  NOT KEPT since the agent started: " + "; ".join(lost) + ".")
    return out
