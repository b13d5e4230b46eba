"""``doorbell-agent killswitch on|off|status``: stop all sharing at once, or allow it again.

Kept light on purpose: a resident pressing the kill switch must not wait for video libraries to load,
and the switch file is written before anything else is loaded.

Every ``on`` and ``off`` is also an entry in the access log (a ``resident`` change), signed at once
when the device key can be read, through :func:`agent.runtime.controls.set_kill_switch`, the one
the page, the button and Home Assistant use too (it holds the fail-closed rule).
"""

from __future__ import annotations

import argparse
import sys
from datetime import tzinfo
from typing import Any

from agent.cli.common import add_json_flag, config_from, print_json, who_is_running
from agent.runtime.controls import set_kill_switch
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
    record: dict[str, Any] | None = None
    if args.action in ("on", "off"):
        change = set_kill_switch(cfg, args.action == "on", by=who_is_running())
        state, record = change.state, change.record_json()
    else:
        state = KillSwitch(cfg.paths.killswitch_file).state()
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
