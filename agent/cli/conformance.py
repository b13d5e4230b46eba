"""``doorbell-agent conformance [FILE]``: check this agent's decisions against protocol vectors.

Needs no configuration: a vectors file carries its own rules, trust store and state.
"""

from __future__ import annotations

import argparse

from agent.cli.common import add_json_flag, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "conformance",
        help="check the agent's decisions against a protocol vectors file",
        description="Runs every case of a vectors file (such as vectors-v1.json) through the agent's real "
        "parse, verify and decide steps and reports each case whose decision differs. "
        "Exits 1 if any case differs.",
    )
    # The default is filled in by the command: the protocol modules load only when it runs.
    p.add_argument("file", metavar="FILE", nargs="?", default=None,
                   help="a vectors file (default: the vectors-v1.json bundled with this agent)")
    add_json_flag(p)
    p.set_defaults(func=_conformance)


def _conformance(args: argparse.Namespace) -> int:
    from agent.protocol.conformance import BUNDLED_VECTORS, run_vectors

    if args.file is None:
        args.file = str(BUNDLED_VECTORS)
    results = run_vectors(args.file)
    differ = [r for r in results if not r.ok]
    if args.json:
        print_json(
            {
                "file": args.file,
                "cases": len(results),
                "differ": len(differ),
                "results": [{"name": r.name, "expected": r.expected, "got": r.got, "ok": r.ok} for r in results],
            }
        )
    else:
        for r in differ:
            print(f"DIFFERS {r.name}: expected {r.expected}, got {r.got}" + (f" ({r.detail})" if r.detail else ""))
        if differ:
            print(f"{len(differ)} of {len(results)} cases differ from the vectors.")
        else:
            print(f"All {len(results)} cases match the vectors.")
    return 1 if differ else 0
