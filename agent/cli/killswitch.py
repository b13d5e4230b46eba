"""``doorbell-agent killswitch on|off|status``: stop all sharing at once, or allow it again.

Kept light on purpose: a resident pressing the kill switch must not wait for video libraries to load,
and the switch file is written before anything else is loaded.

Every ``on`` and ``off`` is also an entry in the access log (a ``resident`` change), signed at once
when the device key can be read. Fail closed: if turning it **off** cannot be recorded, the switch
is put back on and the command fails, so sharing never resumes off the record; turning it **on**
stays on even if the record fails (the command then says so).
"""

from __future__ import annotations

import argparse
import sys
from datetime import tzinfo
from typing import Any

from agent.cli.common import add_json_flag, config_from, print_json, who_is_running
from agent.config import AgentConfig
from agent.errors import UserError
from agent.state.killswitch import KillSwitch, KillSwitchState
from agent.timeutil import (
    format_local,
    local_zone,
)


def register(sub: argparse._SubParsersAction) -> None:
    ks = sub.add_parser("killswitch", help="stop all sharing at once, or allow it again")
    ks.add_argument("action", choices=("on", "off", "status"), help="on = share nothing; off = follow your rules; status = show")
    add_json_flag(ks)
    ks.set_defaults(func=_killswitch)




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
            state = switch.set(args.action == "on", by=who_is_running())
        except OSError as exc:
            raise UserError(
                f"cannot write the kill-switch file {switch.path} ({exc.strerror or exc}); "
                "run as the agent's user or with sudo"
            ) from None
        if state.engaged != (args.action == "on"):
            raise UserError(f"wrote the kill switch but reading it back says otherwise: {state.reason}")
        record = _record(cfg, switch, args.action == "on")
    else:
        state = switch.state()
        record = None
    if args.json:
        print_json({**state.to_json(), **({"log": record} if record is not None else {})})
        return 0
    print(_describe_switch(state, local_zone()))
    if args.action == "on":
        print("Deliveries in progress stop before their next piece.")
    if record is not None and record["seq"] is not None:
        print(f"Recorded in your access log as entry #{record['seq']}"
              + (f" (not signed yet: {record['unsigned']})." if record["unsigned"] else "."))
    elif record is not None:
        print(f"Warning: this was NOT recorded in your access log ({record['error']}); the kill switch is on all the same. "
              "Check the log with: doorbell-agent log verify", file=sys.stderr)
    return 0


def _record(cfg: AgentConfig, switch: KillSwitch, on: bool) -> dict[str, Any]:
    """Enter the change in the access log; if turning the switch off cannot be recorded, turn it back on and fail."""
    from agent.state.accesslog import record_rule_change  # after the switch is written: loads SQLite and crypto

    who = who_is_running()
    try:
        seq, digest, why = record_rule_change(cfg.paths, "killswitch_on" if on else "killswitch_off", by=who)
    except Exception as exc:  # sqlite3.Error, OSError, a damaged log: the change is off the record
        error = f"{type(exc).__name__}: {exc}"
        if on:
            return {"seq": None, "hash": None, "unsigned": None, "error": error}
        switch.set(True, by=f"{who}; put back on: turning it off could not be recorded"[:200])
        raise UserError(
            f"the kill switch stays ON: turning it off could not be recorded in the access log {cfg.paths.state_db} "
            f"({error}), and sharing never resumes off the record. Run it as the agent's user (the installed "
            "doorbell-agent command does), make room on the disk, or repair the log (doorbell-agent log verify)"
        ) from None
    shown = why if why is not None and cfg.paths.device_key_file.exists() else None
    return {"seq": seq, "hash": digest, "unsigned": shown, "error": None}
