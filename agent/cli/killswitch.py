"""``doorbell-agent killswitch on|off|status``: stop all sharing at once, or allow it again.

Kept light on purpose: a resident pressing the kill switch must not wait for video libraries to load.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
from datetime import tzinfo

from agent.cli.common import add_json_flag, config_from, print_json
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


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"homeowner (command line, user {user} on {socket.gethostname()})"


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
