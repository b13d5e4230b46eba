"""The ``doorbell-agent`` command.

Each command family lives in its own module with a ``register(subparsers)``
function; this module only assembles them and turns errors into sentences.
Every command module is imported to build the parser, so a command module
imports at its top only what registering needs: heavy libraries (OpenCV,
PyAV, numpy) are imported inside the commands that use them, and pressing
the kill switch does not wait for them (tests/test_imports.py checks this).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from agent import __version__
from agent.errors import UserError

COMMAND_MODULES = (
    "agent.cli.config",
    "agent.cli.run",
    "agent.cli.clip",
    "agent.cli.trust",
    "agent.cli.killswitch",
    "agent.cli.log",
    "agent.cli.conformance",
    "agent.cli.approvals",
    "agent.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="doorbell-agent",
        description="Keeps your camera's footage on this device and shares exact minutes only "
        "for signed requests that your rules allow.",
    )
    parser.add_argument("--version", action="version", version=f"doorbell-agent {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $DOORBELL_AGENT_CONFIG or /etc/doorbell-agent/agent.toml)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"doorbell-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("doorbell-agent: stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: say so plainly, keep the detail for the developer
        logging.getLogger("agent").debug("unhandled error", exc_info=True)
        print(
            f"doorbell-agent: something went wrong inside the agent ({type(exc).__name__}: {exc}). "
            "Nothing was shared. Run again with DOORBELL_AGENT_DEBUG=1 to see the details for a bug report.",
            file=sys.stderr,
        )
        import os

        if os.environ.get("DOORBELL_AGENT_DEBUG"):
            traceback.print_exc()
        return 1
    return int(result or 0)
