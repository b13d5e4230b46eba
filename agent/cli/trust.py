"""``doorbell-agent trust add|list|revoke``: which agencies' keys the resident trusts.

Each command says what it did in plain words and changes nothing when it refuses.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.cli.common import add_json_flag, config_from, print_json
from agent.errors import UserError
from agent.protocol.trust import TrustedKey, TrustStore, TrustStoreError
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
