"""``doorbell-agent demo``: see the whole product work on this machine, no camera or config needed."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a self-contained demo: camera, broker, agency request, encrypted delivery")
    p.add_argument("--seconds", type=float, default=12.0, help="how long to record before the request (default 12)")
    p.add_argument("--workdir", type=Path, help="where to keep the demo's files (default: a new temporary directory)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import logging

    from agent.cli.common import log_to_stderr
    from agent.demo import run_demo

    log_to_stderr()
    logging.getLogger("agent").setLevel(logging.WARNING)
    result = run_demo(args.workdir, seconds=args.seconds)
    ok = result.log_ok and result.frames > 0 and result.frames == result.frames_in_window
    print("Demo finished: everything checked out." if ok else "Demo finished, but a check failed (see above).")
    return 0 if ok else 1
