"""The ``doorbell-agent`` command.

Each command family lives in its own module with a ``register(subparsers)``
function; this module only assembles them and turns errors into sentences.

A command loads what it uses and nothing else: :func:`main` imports only the
module of the command it runs (:data:`COMMANDS`), and the full parser, with
every module, only for ``--help`` or a command it does not know. Command
modules import at their top only what registering needs: heavy libraries
(OpenCV, PyAV, numpy) are imported inside the commands that use them, so
pressing the kill switch does not wait for them and ``run`` holds no memory
for other commands' libraries (tests/test_imports.py checks both).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from agent import __version__
from agent.errors import glue_dash_values, run_command

COMMAND_MODULES = (
    "agent.cli.config",
    "agent.cli.run",
    "agent.cli.clip",
    "agent.cli.trust",
    "agent.cli.killswitch",
    "agent.cli.consent",
    "agent.cli.log",
    "agent.cli.conformance",
    "agent.cli.approvals",
    "agent.cli.demo",
    "agent.cli.doctor",
    "agent.cli.migrate",
    "agent.cli.web",
    "agent.cli.gpio",
)

COMMANDS: dict[str, str] = {
    "config": "agent.cli.config",
    "run": "agent.cli.run",
    "status": "agent.cli.run",
    "clip": "agent.cli.clip",
    "trust": "agent.cli.trust",
    "killswitch": "agent.cli.killswitch",
    "consent": "agent.cli.consent",
    "log": "agent.cli.log",
    "conformance": "agent.cli.conformance",
    "pending": "agent.cli.approvals",
    "approve": "agent.cli.approvals",
    "decline": "agent.cli.approvals",
    "demo": "agent.cli.demo",
    "doctor": "agent.cli.doctor",
    "migrate": "agent.cli.migrate",
    "web": "agent.cli.web",
    "gpio": "agent.cli.gpio",
}
"""The module that registers each command (tests/test_imports.py checks it against what they register)."""


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The parser with the commands of ``modules`` (by default every command)."""
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
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def command_module(argv: Sequence[str]) -> str | None:
    """The module of the command ``argv`` names, or None if argparse must see every command to answer.

    Only the top-level options can come before the command: ``--config PATH`` (or
    ``--config=PATH``, or an abbreviation argparse accepts) is skipped; anything else
    (``--help``, ``--version``, a mistake) is left to the full parser.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            return COMMANDS.get(arg)
        name, eq, _ = arg.partition("=")
        if len(name) > 2 and "--config".startswith(name):
            i += 1 if eq else 2
            continue
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    # A thumbprint is base64url: about one in 64 begins with '-', and must work as copied from `status`.
    argv = glue_dash_values(list(sys.argv[1:] if argv is None else argv), ("--device-key",))
    module = command_module(argv)
    parser = build_parser((module,) if module is not None else COMMAND_MODULES)
    args = parser.parse_args(argv)
    return run_command(lambda: args.func(args), prog="doorbell-agent", debug_env="DOORBELL_AGENT_DEBUG",
                       bug_words=" Nothing was shared.")
