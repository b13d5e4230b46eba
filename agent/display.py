"""Showing text that came from someone else (an agency, a broker) to the resident without it misleading them.

Request fields such as the officer, the case and the purpose are signed by the agency, but nothing
stops an agency (or whoever holds its key) from putting characters into them that a terminal does
not show as themselves: a right-to-left override (U+202E) makes "case 2026-123<RLO>txt.exe" read
backwards, zero-width characters hide differences between two names, a line separator or an escape
sequence starts what looks like a line of the agent's own output. The protocol only refuses control
characters (category Cc); format characters (Cf) are valid request text.

:func:`safe_text` is the one place that decides how such text is shown. Every resident-facing line
that holds agency-supplied text goes through it: ``log show``, ``pending``, ``approve``/``decline``,
``trust list``/``add``/``revoke``/``restore``, and any page or export made for people. Machine output
(``--json``) keeps the raw value: :func:`agent.cli.common.print_json` writes ASCII-only JSON, in which
every non-ASCII character is already an unambiguous ``\\uXXXX`` escape, so a script gets the exact
text and can apply its own rules.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import urlsplit, urlunsplit

# Shown as escapes: every "other" category (Cc control, Cf format such as the bidi overrides and the
# zero-width characters, Co private use, Cs lone surrogates, Cn unassigned: a newer Unicode version may
# give an unassigned code point a format meaning the terminal knows and we do not) and the line and
# paragraph separators (Zl, Zp), which end a line in some terminals and viewers.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"})
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape_char(c: str) -> str:
    """One character as a visible escape: ``\\n``, ``\\t``, ``\\r``, else ``\\u202e`` or ``\\U000e0001``.

    One form for every other character, so what the resident sees is the code point to look up (U+202E).
    """
    if c in _SHORT:
        return _SHORT[c]
    n = ord(c)
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def needs_escape(c: str) -> bool:
    """Whether one character is shown as an escape rather than as itself."""
    return c == "\\" or unicodedata.category(c) in _ESCAPED_CATEGORIES


def safe_text(value: object) -> str:
    """``value`` as text a terminal shows exactly as it is: what reads the same is the same.

    Characters that could move, hide or break up the text are replaced by visible escapes
    (``\\u202e``), and a backslash is doubled (``\\\\``) so that an agency cannot type a fake
    escape that reads like the real one. Everything else, accented letters and other scripts
    included, is shown as it is. ``None`` and other non-strings are shown through ``str()`` and
    escaped in the same way, so a caller can pass a field it read from a log entry unchecked.
    """
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to do
    return "".join("\\\\" if c == "\\" else escape_char(c) if needs_escape(c) else c for c in text)


def spreadsheet_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: :func:`safe_text`, and no formula.

    A purpose that starts with ``=``, ``+``, ``-`` or ``@`` would be run as a formula when the
    resident opens the export (CSV injection); a leading apostrophe makes it plain text.
    Numbers stay numbers.
    """
    if value is None or isinstance(value, (int, float)):
        return "" if value is None else value
    text = safe_text(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


HIDDEN = "********"
"""What a secret is shown as, everywhere: configuration output, logs, status, errors."""


def redact_url(url: str) -> str:
    """``rtsp://user:secret@host/x`` -> ``rtsp://user:********@host/x``: camera addresses get logged and shown."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return HIDDEN  # unparseable: it may still hold a password
    if parts.query:
        # Some cameras take their credentials in the query: ...?user=admin&password=... (or pwd=, token=).
        parts = parts._replace(query="&".join(
            f"{name}={HIDDEN}" if sep and name.lower() in _SECRET_QUERY_NAMES else f"{name}{sep}{value}"
            for name, sep, value in (field.partition("=") for field in parts.query.split("&"))))
    if parts.password is None:
        return urlunsplit(parts) if parts.query else url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{HIDDEN}@{host}{port}"))


_SECRET_QUERY_NAMES = frozenset({"password", "passwd", "pass", "pwd", "pw", "psw", "token", "access_token", "auth",
                                 "authbasic", "key", "secret", "sig", "signature"})
