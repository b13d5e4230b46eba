"""Errors meant for people, not tracebacks.

A :class:`UserError` carries a sentence that names what was wrong and how to
fix it; the CLI prints it as is and exits non-zero. Anything else that reaches
the top is a bug, and the CLI says so in plain words too.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


class UserError(Exception):
    """Something the person running the command can fix; ``str()`` says how."""

    exit_code = 2


def run_command(func: Callable[[], int | None], *, prog: str, debug_env: str, bug_words: str = "") -> int:
    """Run a command's function and turn every way it can end into an exit code and a sentence.

    Shared by ``doorbell-agent`` and ``doorbell-city``: a person never sees a traceback unless
    they ask for one with ``debug_env`` set.
    """
    try:
        return int(func() or 0)
    except UserError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`)
        return 0
    except Exception as exc:  # a bug: say so plainly, keep the detail for the developer
        print(f"{prog}: something went wrong inside {prog} ({type(exc).__name__}: {exc}).{bug_words} "
              f"Run again with {debug_env}=1 to see the details for a bug report.", file=sys.stderr)
        if os.environ.get(debug_env):
            traceback.print_exc()
        return 1


def glue_dash_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``--jti -Ab3...`` -> ``--jti=-Ab3...`` for ``options`` whose values are base64url ids.

    About one random id in 64 begins with ``-``, which argparse would take for an option
    ("expected one argument"); the id a person copies from our own output must work as it is.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in options and value.startswith("-") and not value.startswith("--"):
            out.append(f"{argv[i]}={value}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out
