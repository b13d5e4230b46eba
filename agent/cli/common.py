"""Helpers shared by the command modules: loading config, printing for people and scripts."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import socket
import sys
from typing import Any
from zoneinfo import ZoneInfo

from agent.config import AgentConfig, load_config
from agent.timeutil import set_display_zone


def config_from(args: argparse.Namespace) -> AgentConfig:
    """Load the configuration; people's times are then shown in the resident's time zone."""
    cfg = load_config(getattr(args, "config", None))
    if cfg.policy is not None:
        set_display_zone(ZoneInfo(cfg.policy.timezone))
    return cfg


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def log_to_stderr() -> None:
    """Send the agent's log to stderr, once (DOORBELL_AGENT_DEBUG=1 for the details)."""
    root = logging.getLogger("agent")
    if not any(getattr(h, "_doorbell", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler._doorbell = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if os.environ.get("DOORBELL_AGENT_DEBUG") else logging.INFO)


def who_is_running() -> str:
    """Who made a change, in the words the access log and the kill-switch file record."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"homeowner (command line, user {user} on {socket.gethostname()})"
