"""The homeowner's controls: whom to trust, the kill switch, and the access log.

``doorbell-agent trust add|list|revoke``, ``doorbell-agent killswitch on|off|status``,
``doorbell-agent log show|verify|checkpoint``. Each command reads the
configuration for its paths, says what it did in plain words, and changes
nothing when it refuses.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from agent.state.accesslog import AccessLog, LogEntry
from agent.cli.common import add_json_flag, config_from, print_json
from agent.config import AgentConfig
from agent.state.devicekey import DeviceKey, DeviceKeyError
from agent.errors import UserError
from agent.state.killswitch import KillSwitch, KillSwitchState
from agent.timeutil import format_local, format_utc, from_epoch, local_zone, parse_user_time, parse_utc_z
from agent.protocol.trust import TrustedKey, TrustStore, TrustStoreError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    trust = sub.add_parser("trust", help="manage the agencies' keys you trust")
    tsub = trust.add_subparsers(dest="trust_command", metavar="ACTION", required=True)
    add = tsub.add_parser("add", help="import an agency's public keys (a JWK Set file)")
    add.add_argument("file", metavar="FILE", help="JWK Set (JSON) from the agency or program")
    add_json_flag(add)
    add.set_defaults(func=_trust_add)
    lst = tsub.add_parser("list", help="list the trusted keys")
    add_json_flag(lst)
    lst.set_defaults(func=_trust_list)
    rev = tsub.add_parser("revoke", help="stop trusting a key (it stays listed as revoked)")
    rev.add_argument("kid", metavar="KID", help="the key id, as shown by 'trust list'")
    add_json_flag(rev)
    rev.set_defaults(func=_trust_revoke)

    ks = sub.add_parser("killswitch", help="stop all sharing at once, or allow it again")
    ks.add_argument("action", choices=("on", "off", "status"), help="on = share nothing; off = follow your rules; status = show")
    add_json_flag(ks)
    ks.set_defaults(func=_killswitch)

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


# ---------------------------------------------------------------- helpers



def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"homeowner (command line, user {user} on {socket.gethostname()})"


def _load_store(path: Path) -> TrustStore:
    try:
        return TrustStore.load(path, missing_ok=True)
    except TrustStoreError as exc:
        raise UserError(
            f"the current trust store cannot be used ({exc}). Nothing was changed. "
            f"Fix or move {path} aside, then import the agencies' keys again."
        ) from None


def _save_store(store: TrustStore, path: Path) -> None:
    try:
        store.save(path)
    except OSError as exc:
        raise UserError(f"cannot write the trust store {path} ({exc.strerror or exc}); run as the agent's user or with sudo") from None


def _key_status(key: TrustedKey, now: datetime) -> str:
    if key.revoked:
        return "revoked"
    t = now.timestamp()
    if key.nbf is not None and t < key.nbf:
        return "not yet valid"
    if key.exp is not None and t >= key.exp:
        return "expired"
    return "valid"


def _key_json(key: TrustedKey, now: datetime) -> dict[str, Any]:
    return {
        "kid": key.kid,
        "agency": key.iss,
        "role": key.role,
        "valid_from": format_utc(from_epoch(key.nbf)) if key.nbf is not None else None,
        "valid_until": format_utc(from_epoch(key.exp)) if key.exp is not None else None,
        "revoked": key.revoked,
        "status": _key_status(key, now),
    }


# ------------------------------------------------------------------ trust


def _trust_add(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    src = Path(args.file)
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {src} ({exc.strerror or exc}); give the path of the agency's JWK Set file") from None
    try:
        incoming = TrustStore.from_json(data, str(src))
    except TrustStoreError as exc:
        raise UserError(f"{exc}. Nothing was imported.") from None
    if len(incoming) == 0:
        raise UserError(f"{src} holds no keys ('keys' is empty). Nothing was imported.")
    path = cfg.paths.trust_file
    store = _load_store(path)
    before = {k.kid for k in store}
    try:
        changed = store.add(incoming)
    except TrustStoreError as exc:
        raise UserError(f"{exc}. Nothing was imported.") from None
    if changed:
        _save_store(store, path)
    now = datetime.now().astimezone()
    added = [k for k in changed if k not in before]
    updated = [k for k in changed if k in before]
    if args.json:
        print_json({"added": added, "updated": updated, "unchanged": len(incoming) - len(changed), "trust_file": str(path)})
        return 0
    for kid in added:
        key = store.get(kid)
        assert key is not None
        print(f"Added key {kid}: {key.role} key of {key.iss} ({_key_status(key, now)}).")
    for kid in updated:
        key = store.get(kid)
        assert key is not None
        print(f"Updated key {kid} of {key.iss} ({_key_status(key, now)}).")
    same = len(incoming) - len(changed)
    if same:
        print(f"{same} key(s) were already trusted, unchanged.")
    print(f"The trust store {path} now holds {len(store)} key(s).")
    return 0


def _trust_list(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    path = cfg.paths.trust_file
    store = _load_store(path)
    now = datetime.now().astimezone()
    if args.json:
        print_json({"trust_file": str(path), "keys": [_key_json(k, now) for k in store]})
        return 0
    if len(store) == 0:
        print(f"No keys are trusted yet ({path}); import an agency's keys with 'doorbell-agent trust add FILE'.")
        return 0
    tz = local_zone()
    for key in store:
        since = format_local(from_epoch(key.nbf), tz, seconds=False) if key.nbf is not None else "always"
        until = format_local(from_epoch(key.exp), tz, seconds=False) if key.exp is not None else "no end date"
        print(f"{key.kid}")
        print(f"  agency: {key.iss}   role: {key.role}   status: {_key_status(key, now)}")
        print(f"  valid from: {since}   until: {until}   revoked: {'yes' if key.revoked else 'no'}")
    return 0


def _trust_revoke(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    path = cfg.paths.trust_file
    store = _load_store(path)
    old = store.get(args.kid)
    try:
        key = store.revoke(args.kid)
    except TrustStoreError as exc:
        raise UserError(f"{exc}. Nothing was changed.") from None
    if old is not None and not old.revoked:
        _save_store(store, path)
    if args.json:
        print_json({"kid": key.kid, "agency": key.iss, "revoked": True, "already_revoked": bool(old and old.revoked)})
        return 0
    if old is not None and old.revoked:
        print(f"Key {key.kid} of {key.iss} was already revoked.")
    else:
        print(f"Revoked key {key.kid} of {key.iss}: requests signed with it will be refused from now on.")
    return 0


# ------------------------------------------------------------- kill switch


def _describe_switch(state: KillSwitchState, tz: tzinfo) -> str:
    if state.engaged and state.since is not None:
        return f"The kill switch is ON since {format_local(state.since, tz)} (set by {state.by}): nothing will be shared."
    if state.engaged:
        return f"The kill switch counts as ON: {state.reason}. Nothing will be shared until you turn it on or off again."
    if state.since is not None:
        return f"The kill switch is off since {format_local(state.since, tz)} (set by {state.by}): requests follow your rules."
    return "The kill switch is off (it has never been turned on): requests follow your rules."


def _killswitch(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    switch = KillSwitch(cfg.paths.killswitch_file)
    if args.action in ("on", "off"):
        try:
            state = switch.set(args.action == "on", by=_who())
        except OSError as exc:
            raise UserError(
                f"cannot write the kill-switch file {switch.path} ({exc.strerror or exc}); "
                "run as the agent's user or with sudo"
            ) from None
        if state.engaged != (args.action == "on"):
            raise UserError(f"wrote the kill switch but reading it back says otherwise: {state.reason}")
    else:
        state = switch.state()
    if args.json:
        print_json(state.to_json())
        return 0
    print(_describe_switch(state, local_zone()))
    if args.action == "on":
        print("Deliveries in progress stop before their next piece.")
    return 0


# --------------------------------------------------------------------- log

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
