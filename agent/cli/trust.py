"""``doorbell-agent trust add|list|revoke|restore``: which agencies' keys the resident trusts.

Each command says what it did in plain words and changes nothing when it refuses. An import only
narrows what is already trusted (see :mod:`agent.protocol.trust`): lengthening a key's validity
needs ``--force`` and prints each change; a revoked key comes back only through ``restore``.
Kids and agency ids are shown through :func:`agent.display.safe_text` like all agency-supplied text
(the trust store's own rules already keep them to plain ASCII; this keeps it so if they change).

Every change is also an entry in the access log (a ``resident`` change: ``trust_added``,
``trust_revoked``, ``trust_restored``), signed at once when the device key can be read. Fail closed,
as the kill switch does: a change that widens trust (a new key, a forced longer validity, a restored
key) that cannot be recorded is undone and the command fails, so trust never grows off the record;
a change that only narrows it (a revocation, a shorter validity) stays, and the command says it
was not recorded.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.cli.common import add_json_flag, config_from, print_json, who_is_running
from agent.config import AgentConfig
from agent.display import safe_text
from agent.errors import UserError
from agent.protocol.trust import (
    ImportWidensError,
    KeyChange,
    TrustedKey,
    TrustStore,
    TrustStoreError,
    mixed_role_agencies,
)
from agent.state.truststore import load_trust_store, save_trust_store
from agent.timeutil import (
    format_local,
    format_utc,
    from_epoch,
    local_zone,
)


def register(sub: argparse._SubParsersAction) -> None:
    trust = sub.add_parser("trust", help="manage the agencies' keys you trust")
    tsub = trust.add_subparsers(dest="trust_command", metavar="ACTION", required=True)
    add = tsub.add_parser("add", help="import an agency's public keys (a JWK Set file)")
    add.add_argument("file", metavar="FILE", help="JWK Set (JSON) from the agency or program (- reads standard input)")
    add.add_argument("--force", action="store_true",
                     help="also accept keys that the file makes valid for longer (a later or no end date, an earlier "
                          "start) than your trust store says; each change is printed")
    add_json_flag(add)
    add.set_defaults(func=_trust_add)
    lst = tsub.add_parser("list", help="list the trusted keys")
    add_json_flag(lst)
    lst.set_defaults(func=_trust_list)
    rev = tsub.add_parser("revoke", help="stop trusting a key (it stays listed as revoked)")
    rev.add_argument("kid", metavar="KID", help="the key id, as shown by 'trust list'")
    add_json_flag(rev)
    rev.set_defaults(func=_trust_revoke)
    res = tsub.add_parser("restore", help="trust a revoked key again")
    res.add_argument("kid", metavar="KID", help="the key id, as shown by 'trust list'")
    add_json_flag(res)
    res.set_defaults(func=_trust_restore)


def _load_store(path: Path) -> TrustStore:
    try:
        return load_trust_store(path, missing_ok=True)
    except TrustStoreError as exc:
        raise UserError(
            f"the current trust store cannot be used ({exc}). Nothing was changed. "
            f"Fix or move {path} aside, then import the agencies' keys again."
        ) from None


def _save_store(store: TrustStore, path: Path) -> None:
    try:
        save_trust_store(store, path)
    except OSError as exc:
        raise UserError(f"cannot write the trust store {path} ({exc.strerror or exc}); run as the agent's user or with sudo") from None


def _key_json(key: TrustedKey, now: datetime) -> dict[str, Any]:
    return {
        "kid": key.kid,
        "agency": key.iss,
        "role": key.role,
        "valid_from": format_utc(from_epoch(key.nbf)) if key.nbf is not None else None,
        "valid_until": format_utc(from_epoch(key.exp)) if key.exp is not None else None,
        "revoked": key.revoked,
        "status": key.status_at(now),
    }


def _trust_add(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    src = Path(args.file)
    try:
        # "-": the installed command opens FILE as the person typing it and hands it over on standard
        # input; the agent's user could not reopen it (not even as /dev/stdin) from their home.
        data = sys.stdin.buffer.read() if args.file == "-" else src.read_bytes()
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
    before = TrustStore(store)
    tz = local_zone()
    try:
        result = store.add(incoming, force=args.force)
    except ImportWidensError as exc:
        changes = "\n".join(f"  {safe_text(c.words(tz))}" for c in exc.widenings)
        raise UserError(
            f"{src} would make key(s) you already trust valid for longer than your trust store says:\n{changes}\n"
            "Nothing was imported. An import may only shorten a key's validity, because the file may be an old "
            "copy of the agency's keys. If the agency really extended these keys, import it again with --force: "
            f"doorbell-agent trust add --force {shlex.quote(str(src))}"
        ) from None
    except TrustStoreError as exc:
        raise UserError(f"{exc}. Nothing was imported.") from None
    record = None
    if result.changed:
        _save_store(store, path)
        widens = any(not k.revoked for k in result.added) or any(c.widens for c in result.changes)
        record = _record(cfg, "trust_added", {
            "kids": result.changed,
            "issuer": sorted({k.iss for k in incoming if k.kid in result.changed}),
            "changed": [c.words() for c in result.changes],
            "forced": result.forced,
            "file": str(src.absolute()),
        }, widens=widens, undo=lambda: _save_store(before, path), what="importing the keys")  # fmt: skip
    now = datetime.now().astimezone()
    mixed = mixed_role_agencies(incoming)
    if args.json:
        print_json({
            "added": [k.kid for k in result.added],
            "updated": sorted({c.kid for c in result.changes}),
            "changes": [c.to_json() for c in result.changes],
            "kept_revoked": list(result.kept_revoked),
            "unchanged": len(result.unchanged),
            "forced": result.forced,
            "self_oversight": {
                iss: {"requester": req, "oversight": ovs,
                      "independent_oversight": [k.kid for k in store.independent_oversight(iss)]}
                for iss, (req, ovs) in mixed.items()
            },
            "trust_file": str(path),
            **({"log": record} if record is not None else {}),
        })  # fmt: skip
        return 0
    for key in result.added:
        print(f"Added key {safe_text(key.kid)}: {key.role} key of {safe_text(key.iss)} ({key.status_at(now)}).")
    by_kid: dict[str, list[KeyChange]] = {}
    for c in result.changes:
        by_kid.setdefault(c.kid, []).append(c)
    for kid, kid_changes in by_kid.items():
        current = store.get(kid)
        assert current is not None
        forced = " (forced)" if any(c.widens for c in kid_changes) else ""
        print(f"Updated key {safe_text(kid)} of {safe_text(current.iss)}{forced}, now {current.status_at(now)}:")
        for c in kid_changes:
            print(f"  {safe_text(c.words(tz))}")
    for kid in result.kept_revoked:
        print(f"Key {safe_text(kid)} stays revoked (your trust store says revoked; an import never undoes that). "
              f"To trust it again: {_restore_command(kid)}")
    if result.unchanged:
        print(f"{len(result.unchanged)} key(s) were already trusted, unchanged.")
    for iss, (req, ovs) in mixed.items():
        print(_self_oversight_warning(store, iss, req, ovs, now))
    print(f"The trust store {path} now holds {len(store)} key(s).")
    _print_record(record)
    return 0


def _self_oversight_warning(store: TrustStore, iss: str, requester: list[str], oversight: list[str], now: datetime) -> str:
    """Why an oversight key from the requesting agency's own file does not count, and which keys do."""
    lines = [
        f"WARNING: this file holds both requester and oversight keys of {safe_text(iss)}. "
        "An agency cannot oversee itself: a co-signature by "
        + ", ".join(safe_text(k) for k in oversight)
        + f" never counts as independent oversight for requests of {safe_text(iss)}."
    ]
    independent = store.independent_oversight(iss)
    if independent:
        names = ", ".join(
            f"{safe_text(k.kid)} ({safe_text(k.iss)}" + ("" if k.valid_at(now) else f", {k.status_at(now)}") + ")"
            for k in independent
        )
        lines.append(f"  Keys that count as independent oversight for {safe_text(iss)}: {names}.")
    else:
        lines.append(f"  No key you trust counts as independent oversight for {safe_text(iss)}: with "
                     "policy.require_oversight = true its requests are refused until you import the oversight "
                     "body's keys (a court clerk, a civilian board).")
    return "\n".join(lines)


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
        print(safe_text(key.kid))
        print(f"  agency: {safe_text(key.iss)}   role: {key.role}   status: {key.status_at(now)}")
        print(f"  valid from: {since}   until: {until}   revoked: {'yes' if key.revoked else 'no'}")
        if key.revoked:
            print(f"  (to trust it again: {_restore_command(key.kid)})")
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
    record = None
    if old is not None and not old.revoked:
        _save_store(store, path)
        record = _record(cfg, "trust_revoked", {"kids": [key.kid], "issuer": key.iss}, widens=False, what="revoking the key")
    if args.json:
        print_json({"kid": key.kid, "agency": key.iss, "revoked": True, "already_revoked": bool(old and old.revoked),
                    **({"log": record} if record is not None else {})})
        return 0
    if old is not None and old.revoked:
        print(f"Key {safe_text(key.kid)} of {safe_text(key.iss)} was already revoked.")
    else:
        print(f"Revoked key {safe_text(key.kid)} of {safe_text(key.iss)}: requests signed with it will be refused from now on.")
    _print_record(record)
    return 0


def _trust_restore(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    path = cfg.paths.trust_file
    store = _load_store(path)
    before = TrustStore(store)
    old = store.get(args.kid)
    try:
        key = store.restore(args.kid)
    except TrustStoreError as exc:
        raise UserError(f"{exc}. Nothing was changed.") from None
    was_revoked = old is not None and old.revoked
    record = None
    if was_revoked:
        _save_store(store, path)
        record = _record(cfg, "trust_restored", {"kids": [key.kid], "issuer": key.iss}, widens=True,
                         undo=lambda: _save_store(before, path), what="restoring the key")
    now = datetime.now().astimezone()
    if args.json:
        print_json({"kid": key.kid, "agency": key.iss, "revoked": False, "was_revoked": was_revoked,
                    "status": key.status_at(now), **({"log": record} if record is not None else {})})
        return 0
    name = f"{safe_text(key.kid)} of {safe_text(key.iss)}"
    if not was_revoked:
        print(f"Key {name} is not revoked; nothing was changed (status: {key.status_at(now)}).")
        return 0
    if key.valid_at(now):
        print(f"Restored key {name}: requests signed with it are accepted again from now on, if your rules allow them.")
    else:
        print(f"Restored key {name}, but it is {key.status_at(now)} ({_period_words(key)}), "
              "so requests signed with it are still refused.")
    print("If the agency itself revoked this key (its key file says \"revoked\": true), it may have been stolen: "
          "importing the agency's file again revokes it again.")
    _print_record(record)
    return 0




def _record(cfg: AgentConfig, change: str, details: dict[str, Any], *, widens: bool, what: str,
            undo: Callable[[], None] | None = None) -> dict[str, Any]:
    """Enter the change in the access log; if a change that widens trust cannot be recorded, undo it and fail.

    Called after the store was written (as the kill switch does), so the log never shows a change
    that did not happen; ``undo`` puts the previous store back.
    """
    from agent.state.accesslog import record_rule_change  # loads SQLite and crypto: only once something changed

    try:
        seq, digest, why = record_rule_change(cfg.paths, change, by=who_is_running(), details=details)
    except Exception as exc:  # sqlite3.Error, OSError, a damaged log: the change is off the record
        error = f"{type(exc).__name__}: {exc}"
        if not widens:
            return {"seq": None, "hash": None, "unsigned": None, "error": error}
        assert undo is not None
        undo()
        raise UserError(
            f"{what} could not be recorded in the access log {cfg.paths.state_db} ({error}), so it was undone: "
            "your trust store is as it was, and trust never grows off the record. Run it as the agent's user "
            "(the installed doorbell-agent command does), make room on the disk, or repair the log "
            "(doorbell-agent log verify)"
        ) from None
    shown = why if why is not None and cfg.paths.device_key_file.exists() else None
    return {"seq": seq, "hash": digest, "unsigned": shown, "error": None}


def _print_record(record: dict[str, Any] | None) -> None:
    if record is None:
        return
    if record["seq"] is not None:
        print(f"Recorded in your access log as entry #{record['seq']}"
              + (f" (not signed yet: {record['unsigned']})." if record["unsigned"] else "."))
    else:
        print(f"Warning: this was NOT recorded in your access log ({record['error']}); the change stays, as it only "
              "takes trust away. Check the log with: doorbell-agent log verify", file=sys.stderr)


def _restore_command(kid: str) -> str:
    """The command to paste, quoted for the shell: a kid may hold ``;`` or ``$(...)`` (printable ASCII is allowed)."""
    command = f"doorbell-agent trust restore {shlex.quote(kid)}"
    return command if command.isascii() and command.isprintable() else safe_text(command)


def _period_words(key: TrustedKey) -> str:
    tz = local_zone()
    since = format_local(from_epoch(key.nbf), tz, seconds=False) if key.nbf is not None else "always"
    until = format_local(from_epoch(key.exp), tz, seconds=False) if key.exp is not None else "no end date"
    return f"valid from {since} until {until}"
