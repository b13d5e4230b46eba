"""What the homeowner can do, in one place for every way of doing it.

The command line, the local page, the push button and Home Assistant all turn
the kill switch through :func:`set_kill_switch`, so each of them writes the
switch first and records it the same way, with the same fail-closed rule.

Kept light: importing this module loads no SQLite, crypto or video library; the
access log is loaded only after the switch file is written, so a resident
pressing the switch does not wait for anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.config import AgentConfig
from agent.errors import UserError
from agent.state.consent import ConsentChange, set_consent, withdraw_consent  # consent changes live there; listed here too
from agent.state.killswitch import KillSwitch, KillSwitchState


@dataclass(frozen=True)
class SwitchChange:
    """The switch after a change and how it went into the access log."""

    state: KillSwitchState
    seq: int | None  # the log entry, or None if it could not be recorded (only possible when turning it on)
    hash: str | None
    unsigned: str | None  # why the entry is not signed yet, when the device key exists but could not sign
    error: str | None  # why the change is not in the log

    def record_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "unsigned": self.unsigned, "error": self.error}


def set_kill_switch(cfg: AgentConfig, on: bool, *, by: str) -> SwitchChange:
    """Turn the kill switch on or off and record it in the access log.

    Fail closed: if turning it **off** cannot be recorded, the switch is put back on and
    :class:`UserError` says why, so sharing never resumes off the record; turning it **on**
    stays on even if the record fails (``error`` then says why).
    """
    switch = KillSwitch(cfg.paths.killswitch_file)
    try:
        state = switch.set(on, by=by)
    except OSError as exc:
        raise UserError(
            f"cannot write the kill-switch file {switch.path} ({exc.strerror or exc}); "
            "run as the agent's user or with sudo"
        ) from None
    if state.engaged != on:
        raise UserError(f"wrote the kill switch but reading it back says otherwise: {state.reason}")
    from agent.state.accesslog import record_rule_change  # after the switch is written: loads SQLite and crypto

    try:
        seq, digest, why = record_rule_change(cfg.paths, "killswitch_on" if on else "killswitch_off", by=by)
    except Exception as exc:  # sqlite3.Error, OSError, a damaged log: the change is off the record
        error = f"{type(exc).__name__}: {exc}"
        if on:
            return SwitchChange(state, None, None, None, error)
        switch.set(True, by=f"{by}; put back on: turning it off could not be recorded"[:200])
        raise UserError(
            f"the kill switch stays ON: turning it off could not be recorded in the access log {cfg.paths.state_db} "
            f"({error}), and sharing never resumes off the record. Run it as the agent's user (the installed "
            "doorbell-agent command does), make room on the disk, or repair the log (doorbell-agent log verify)"
        ) from None
    shown = why if why is not None and cfg.paths.device_key_file.exists() else None
    return SwitchChange(state, seq, digest, shown, None)


__all__ = ["SwitchChange", "set_kill_switch", "WipeResult", "wipe_buffer", "ConsentChange", "set_consent",
           "withdraw_consent"]


@dataclass(frozen=True)
class WipeResult:
    """What ``killswitch on --wipe`` erased and how it went into the access log."""

    segments: int
    bytes: int
    stray_files: int
    problems: list[str]
    recorder_running: bool
    seq: int | None
    error: str | None  # why the wipe is not in the log

    def to_json(self) -> dict[str, Any]:
        return {"segments": self.segments, "bytes": self.bytes, "stray_files": self.stray_files,
                "problems": self.problems, "recorder_running": self.recorder_running,
                "log": {"seq": self.seq, "error": self.error}}


def wipe_buffer(cfg: AgentConfig, *, by: str) -> WipeResult:
    """Erase the stored footage (segments and their index rows; never the access log) and record it.

    Call it with the kill switch already on (:func:`set_kill_switch`), so no delivery starts from
    footage being erased. Safe while ``run`` records (:meth:`SegmentStore.wipe` deletes rows before
    files, as eviction does); footage recorded from now on is kept. Loads the buffer code (PyAV) only here.
    """
    import time

    from agent.buffer.segments import SegmentStore
    from agent.runtime.supervisor import recorder_running

    running = recorder_running(cfg)
    try:
        store = SegmentStore.from_config(cfg)
    except Exception as exc:  # sqlite3.Error, OSError
        raise UserError(f"cannot open the footage buffer {cfg.paths.buffer_db} ({exc}); nothing was erased. "
                        "Run as the agent's user (the installed doorbell-agent command does) or with sudo") from None
    try:
        report = store.wipe(time.time_ns() // 1000, recorder_active=running)
    finally:
        store.close()
    from agent.state.accesslog import record_rule_change

    seq: int | None = None
    error: str | None = None
    try:
        seq, _, _ = record_rule_change(cfg.paths, "buffer_wiped", by=by, details={
            "segments": report.segments + report.stray_files, "bytes": report.bytes,
            "recorder_running": running})
    except Exception as exc:  # the footage is gone either way; say that the record is missing
        error = f"{type(exc).__name__}: {exc}"
    return WipeResult(report.segments, report.bytes, report.stray_files, report.problems, running, seq, error)
