"""``doorbell-agent killswitch on|off|status``: stop all sharing at once, or allow it again.

Kept light on purpose: a resident pressing the kill switch must not wait for video libraries to load,
and the switch file is written before anything else is loaded.

Every ``on`` and ``off`` is also an entry in the access log (a ``resident`` change), signed at once
when the device key can be read, through :func:`agent.runtime.controls.set_kill_switch`, the one
the page, the button and Home Assistant use too (it holds the fail-closed rule).

``on --wipe`` then erases the stored footage (never the access log) through
:func:`agent.runtime.controls.wipe_buffer`, after the resident types yes (or ``--yes``); the
buffer code, and PyAV with it, is loaded only then.
"""

from __future__ import annotations

import argparse
import sys
from datetime import tzinfo
from typing import Any

from agent.cli.common import add_json_flag, config_from, print_json, who_is_running
from agent.config import AgentConfig
from agent.errors import UserError
from agent.runtime.controls import set_kill_switch
from agent.state.killswitch import KillSwitch, KillSwitchState
from agent.timeutil import (
    format_local,
    local_zone,
)


def register(sub: argparse._SubParsersAction) -> None:
    ks = sub.add_parser("killswitch", help="stop all sharing at once, or allow it again")
    ks.add_argument("action", choices=("on", "off", "status"), help="on = share nothing; off = follow your rules; status = show")
    ks.add_argument("--wipe", action="store_true",
                    help="with 'on': also erase all stored footage (not the access log); asks you to type yes")
    ks.add_argument("--yes", action="store_true", help="with --wipe: do not ask (for scripts)")
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


def _confirm_wipe(cfg: AgentConfig) -> bool:
    """Ask the resident to type yes: erased footage cannot come back."""
    if not sys.stdin.isatty():
        raise UserError("the kill switch is ON, but no footage was erased: --wipe cannot be undone, so add --yes "
                        "to confirm it when not typing at a terminal (doorbell-agent killswitch on --wipe --yes)")
    print(f"The kill switch is ON. Next: ERASE ALL STORED FOOTAGE in {cfg.paths.segments_dir}. "
          "It cannot be undone. Your access log is kept.")
    try:
        answer = input("Type yes to erase the footage: ")
    except EOFError:
        answer = ""
    return answer.strip().lower() == "yes"


def _killswitch(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    record: dict[str, Any] | None = None
    if args.wipe and args.action != "on":
        raise UserError("--wipe goes with 'on' only: doorbell-agent killswitch on --wipe")
    if args.yes and not args.wipe:
        raise UserError("--yes only confirms --wipe: doorbell-agent killswitch on --wipe --yes")
    wiped = None
    if args.action in ("on", "off"):
        # The switch first, before any question: no delivery starts from footage about to be erased.
        change = set_kill_switch(cfg, args.action == "on", by=who_is_running())
        state, record = change.state, change.record_json()
        if args.wipe and not args.yes and not _confirm_wipe(cfg):
            print("Not erased: you did not type yes. The kill switch is on.")
            args.wipe = False
        if args.wipe:
            from agent.runtime.controls import wipe_buffer

            wiped = wipe_buffer(cfg, by=who_is_running())
    else:
        state = KillSwitch(cfg.paths.killswitch_file).state()
    if args.json:
        print_json({**state.to_json(), **({"log": record} if record is not None else {}),
                    **({"wipe": wiped.to_json()} if wiped is not None else {})})
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
    if wiped is not None:
        from agent.runtime.status import human_bytes

        n = wiped.segments + wiped.stray_files
        print(f"Erased {n} footage file(s), {human_bytes(wiped.bytes)}. Your access log was kept.")
        if wiped.recorder_running:
            print("The recorder is still running: footage from now on is recorded again (the piece being written "
                  "at the moment of the wipe, a few seconds, is kept too). Stop it with 'systemctl stop doorbell-agent'.")
        for problem in wiped.problems:
            print(f"Warning: could not erase {problem}", file=sys.stderr)
        if wiped.seq is not None:
            print(f"The erasure is recorded in your access log as entry #{wiped.seq}.")
        else:
            print(f"Warning: the erasure was NOT recorded in your access log ({wiped.error}).", file=sys.stderr)
    return 0
