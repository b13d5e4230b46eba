"""The resident's consent as set with ``doorbell-agent consent``: ``<data_dir>/consent.json``.

The configuration file lives in /etc, which the agent's user cannot write, yet a resident must be
able to narrow, widen or withdraw consent at any moment, from the command line or the local page.
So the keys a resident sets (``consent`` and the limits in :data:`OVERRIDE_KEYS`) go into this
state file, and when it is present they replace the same keys of ``[policy]``. The file is checked
with the very models that check the configuration (:class:`agent.config.PolicyConfig`), so the same
bounds hold however a rule was set.

Fail closed: a consent file that cannot be read or does not pass the checks means **no sharing**.
:func:`effective_policy` raises :class:`ConsentFileError`; :class:`PolicyReloader` (what the running
service asks before each decision) then hands out the configured rules with consent withdrawn and
logs why and how to fix it. Withdrawing (:func:`withdraw_consent`) always works, even over a
damaged file, because it can only take sharing away.

Light on purpose: no SQLite or crypto is loaded until a change is recorded in the access log.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config import AgentConfig, PolicyConfig
from agent.errors import UserError
from agent.fsutil import write_atomically
from agent.timeutil import format_utc

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
OVERRIDE_KEYS = (
    "consent", "max_radius_m", "max_window_s", "max_age_s", "grants_per_issuer_per_day",
    "require_warrant", "require_oversight", "approval",
)  # fmt: skip
"""The ``[policy]`` keys the consent file may replace; the program, home location and time zone stay the configuration's."""
_BOOKKEEPING = ("v", "updated_at", "updated_by")
FIX = ("run 'doorbell-agent consent show' to see the problem; 'doorbell-agent consent withdraw' replaces the file "
       "(sharing stays off) and 'doorbell-agent consent set --resume' then allows it again")


class ConsentFileError(UserError):
    """The consent file exists but cannot be used: nothing is shared until it is fixed."""


def read_override(path: Path) -> dict[str, Any] | None:
    """The resident's keys from ``path`` (bookkeeping removed), or None when there is no file.

    Raises :class:`ConsentFileError` for anything else that is not a JSON object of known keys.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConsentFileError(f"cannot read your consent file {path} ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConsentFileError(f"your consent file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConsentFileError(f"your consent file {path} does not hold a JSON object")
    if data.get("v") != FORMAT_VERSION:
        raise ConsentFileError(f"your consent file {path} has format version {data.get('v')!r}; this agent reads {FORMAT_VERSION}")
    unknown = sorted(set(data) - set(OVERRIDE_KEYS) - set(_BOOKKEEPING))
    if unknown:
        raise ConsentFileError(f"your consent file {path} holds unknown setting(s) {', '.join(unknown)}")
    return {k: v for k, v in data.items() if k in OVERRIDE_KEYS}


def apply_override(base: PolicyConfig, override: dict[str, Any], *, where: Path) -> PolicyConfig:
    """``base`` with ``override``'s keys replaced, checked by the configuration's own models."""
    merged = {**base.model_dump(mode="json", by_alias=True), **override}
    try:
        return PolicyConfig.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'from_')}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConsentFileError(f"your consent file {where} does not pass the checks: {problems}") from None


def effective_policy(cfg: AgentConfig) -> PolicyConfig:
    """The rules in force: ``[policy]`` with the consent file's keys applied (:class:`ConsentFileError` if it is bad)."""
    base = cfg.require_policy()
    override = read_override(cfg.paths.consent_file)
    return base if override is None else apply_override(base, override, where=cfg.paths.consent_file)


def overridden_keys(cfg: AgentConfig) -> list[str]:
    """Which ``[policy]`` keys the consent file replaces (empty without a file; raises if it is bad)."""
    override = read_override(cfg.paths.consent_file)
    return sorted(override) if override else []


def closed_policy(base: PolicyConfig) -> PolicyConfig:
    """``base`` with consent withdrawn: what the service decides with while the consent file is unusable."""
    return base.model_copy(update={"consent": base.consent.model_copy(update={"withdrawn": True})})


def save_override(cfg: AgentConfig, override: dict[str, Any], *, by: str, now: datetime | None = None) -> PolicyConfig:
    """Check ``override`` against ``[policy]`` and write it atomically; returns the rules now in force."""
    base = cfg.require_policy()
    policy = apply_override(base, override, where=cfg.paths.consent_file)
    # Stored as the checked values (UTC times, canonical names), so what is read back is what was checked.
    dumped = policy.model_dump(mode="json", by_alias=True)
    body: dict[str, Any] = {k: dumped[k] for k in OVERRIDE_KEYS if k in override}
    body.update(v=FORMAT_VERSION, updated_at=format_utc(now or datetime.now(UTC)), updated_by=by)
    path = cfg.paths.consent_file
    try:
        write_atomically(path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("utf-8"), 0o644)
    except OSError as exc:
        raise UserError(f"cannot write your consent file {path} ({exc.strerror or exc}); "
                        "run as the agent's user (the installed doorbell-agent command does) or with sudo") from None
    return policy


# -- changes, for every way of making them (command line, local page) --------------------------------


def _rules(policy: PolicyConfig) -> dict[str, Any]:
    """The keys a consent change may touch, as logged (never the home's location)."""
    dumped = policy.model_dump(mode="json", by_alias=True)
    return {k: dumped[k] for k in OVERRIDE_KEYS}


@dataclass(frozen=True)
class ConsentChange:
    """A change made, the rules now in force, and its access-log entry."""

    policy: PolicyConfig
    changed: list[str]
    seq: int
    hash: str
    unsigned: str | None


def _record(cfg: AgentConfig, what: str, *, by: str, before: dict[str, Any] | None, after: PolicyConfig,
            note: str | None = None) -> tuple[list[str], int, str, str | None]:
    from agent.state.accesslog import record_rule_change  # loads SQLite and crypto only now

    new = _rules(after)
    changed = sorted(k for k in new if before is None or before.get(k) != new.get(k))
    details: dict[str, Any] = {"changed": changed, "new": {k: new[k] for k in changed},
                               "old": {k: before[k] for k in changed} if before is not None else None}
    if note:
        details["note"] = note
    seq, digest, why = record_rule_change(cfg.paths, what, by=by, details=details)
    shown = why if why is not None and cfg.paths.device_key_file.exists() else None
    return changed, seq, digest, shown


def _current(cfg: AgentConfig) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    """(the override on disk or {}, the rules in force as logged or None, why the file is unusable or None)."""
    try:
        override = read_override(cfg.paths.consent_file) or {}
        policy = effective_policy(cfg)
    except ConsentFileError as exc:
        return {}, None, str(exc)
    return override, _rules(policy), None


def set_consent(cfg: AgentConfig, changes: dict[str, Any], *, by: str, resume: bool = False) -> ConsentChange:
    """Apply ``changes`` (``[policy]`` key -> new value; ``consent`` may be a partial object) and record it.

    Any change is allowed (the resident decides); the log entry holds the old and new values.
    Takes effect at the service's next decision: it re-reads the file when it changes.
    """
    override, before, problem = _current(cfg)
    if problem is not None:
        raise ConsentFileError(f"{problem}; {FIX}")
    base = cfg.require_policy()
    new = dict(override)
    consent_update = dict(changes.pop("consent", {}) or {})
    if resume:
        consent_update["withdrawn"] = False
    if consent_update:
        current = new.get("consent") or base.consent.model_dump(mode="json", by_alias=True)
        new["consent"] = {**current, **consent_update}
    new.update(changes)
    if not consent_update and not changes:
        raise UserError("nothing to change; give at least one option (doorbell-agent consent set --help lists them)")
    policy = save_override(cfg, new, by=by)
    what = "consent_resumed" if resume and before is not None and before["consent"]["withdrawn"] else "consent_changed"
    try:
        changed, seq, digest, unsigned = _record(cfg, what, by=by, before=before, after=policy)
    except Exception as exc:  # fail closed: a change off the record must not allow sharing
        withdraw_file_only(cfg, by=f"{by}; withdrawn again: the change could not be recorded")
        raise UserError(f"your change could not be recorded in the access log ({type(exc).__name__}: {exc}); "
                        "consent is now WITHDRAWN so nothing is shared off the record. Make room on the disk or "
                        "repair the log (doorbell-agent log verify), then run the command again") from None
    return ConsentChange(policy, changed, seq, digest, unsigned)


def withdraw_file_only(cfg: AgentConfig, *, by: str) -> PolicyConfig:
    """Write consent withdrawn, over a damaged file if need be; nothing is recorded."""
    try:
        override = read_override(cfg.paths.consent_file) or {}
    except ConsentFileError:
        override = {}  # unusable: start again from the configuration, withdrawn
    base = cfg.require_policy()
    try:
        policy = apply_override(base, override, where=cfg.paths.consent_file)
    except ConsentFileError:
        override, policy = {}, base
    override["consent"] = {**policy.consent.model_dump(mode="json", by_alias=True), "withdrawn": True}
    return save_override(cfg, override, by=by)


def withdraw_consent(cfg: AgentConfig, by: str) -> ConsentChange:
    """Withdraw consent now (always allowed, even over a damaged consent file) and record it.

    The file is written first: if the log cannot take the entry, consent stays withdrawn
    (sharing less off the record is safe) and :class:`UserError` says so.
    """
    _, before, problem = _current(cfg)
    policy = withdraw_file_only(cfg, by=by)
    try:
        changed, seq, digest, unsigned = _record(
            cfg, "consent_withdrawn", by=by, before=before, after=policy,
            note=f"replaced an unusable consent file: {problem}"[:500] if problem else None)
    except Exception as exc:
        raise UserError(f"consent is withdrawn, but this could not be recorded in the access log "
                        f"({type(exc).__name__}: {exc}); check it with doorbell-agent log verify") from None
    return ConsentChange(policy, changed, seq, digest, unsigned)


# -- the running service's view ------------------------------------------------------------------------


class PolicyReloader:
    """The rules in force, re-read whenever the consent file changes (a ``stat`` per call).

    Never raises: an unusable consent file yields the configured rules with consent withdrawn
    (:func:`closed_policy`), logged once per problem with what to do. ``on_change`` is called
    with the new :class:`PolicyConfig` each time the rules in force change.
    """

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.base = cfg.require_policy()
        self.path = cfg.paths.consent_file
        self._stamp: tuple[int, int, int, int] | None = None
        self._policy: PolicyConfig = closed_policy(self.base)
        self._lock = threading.Lock()
        self.error: str | None = None
        self.get()

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return (0, 0, 0, 0)
        except OSError:
            return None  # cannot even look: read (and fail) every time
        return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)

    def get(self) -> PolicyConfig:
        stamp = self._stat()
        with self._lock:
            if stamp is not None and stamp == self._stamp:
                return self._policy
            try:
                policy = effective_policy(self.cfg)
            except ConsentFileError as exc:
                if str(exc) != self.error:
                    log.error("%s; nothing will be shared until it is fixed: %s", exc, FIX)
                self.error = str(exc)
                self._policy = closed_policy(self.base)
                self._stamp = stamp  # read again once the file changes (a flood must not re-read it per message)
                return self._policy
            if self.error is not None or (self._stamp is not None and policy != self._policy):
                log.info("your consent and limits changed (%s); they apply from the next decision", self.path)
            self.error = None
            self._policy = policy
            self._stamp = stamp
            return policy
