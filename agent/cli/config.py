"""``doorbell-agent config check``: validate the configuration without starting anything."""

from __future__ import annotations

import argparse

from agent.cli.common import add_json_flag, config_from, print_json
from agent.config import config_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check the configuration file")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="validate the configuration and say what is wrong, if anything")
    add_json_flag(check)
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    path = config_path(args.config)
    if args.json:
        print_json({"ok": True, "path": str(path), "config": cfg.model_dump(mode="json", by_alias=True)})
        return 0
    print(f"{path}: configuration is valid.")
    print(f"  camera: {cfg.camera.source}, {cfg.camera.width}x{cfg.camera.height} at {cfg.camera.fps} fps")
    print(f"  footage kept in {cfg.paths.data_dir} for up to {cfg.buffer.retention_hours:g} hours")
    if cfg.policy is None:
        print("  no [policy] section: the agent records but never shares")
    if cfg.mqtt is None:
        print("  no [mqtt] section: the agent does not listen for requests")
    elif not cfg.mqtt.tls:
        print("  WARNING: mqtt.tls is off; the broker link is not encrypted")
    return 0
