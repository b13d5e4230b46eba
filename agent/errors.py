"""Errors meant for people, not tracebacks.

A :class:`UserError` carries a sentence that names what was wrong and how to
fix it; the CLI prints it as is and exits non-zero. Anything else that reaches
the top is a bug, and the CLI says so in plain words too.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the person running the command can fix; ``str()`` says how."""

    exit_code = 2
