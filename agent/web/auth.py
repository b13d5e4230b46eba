"""Who may use the local page: the password, sessions, CSRF tokens, and the limit on wrong passwords.

The password is the resident's own (``doorbell-agent web password``), kept only as an Argon2 hash in
``paths.web_password_file`` (0600). Sessions live in this process's memory: a restart logs everyone
out, which is the safe direction. Every state-changing form carries the session's CSRF token, and the
server also checks that the form was sent from a page of this same server (Origin or Referer).

Fail closed: a password file that exists but cannot be read or parsed counts as "a password is set"
(the page asks for one) and no password is accepted until the file is fixed.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from agent.errors import UserError
from agent.fsutil import write_atomically

log = logging.getLogger("agent.web")

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024  # Argon2 handles any length; this only keeps a pasted novel from costing memory

MAX_SESSIONS = 1000

_hasher = PasswordHasher()


# -- the password ----------------------------------------------------------------------------


def password_is_set(path: Path) -> bool:
    """True when a password file exists (readable or not: an unreadable one still means "log in")."""
    try:
        return path.exists() or path.is_symlink()
    except OSError:
        return True


def password_stamp(path: Path) -> tuple[int, int, int] | None:
    """Which password file this is (inode, size, mtime): setting a new password changes it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters "
                        "(a few unrelated words are easy to type on a phone and hard to guess)")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"the password is too long: use at most {MAX_PASSWORD_LENGTH} characters")


def set_password(path: Path, password: str) -> None:
    """Store the Argon2 hash of ``password`` (0600, replaced in one step)."""
    check_password_rules(password)
    digest = _hasher.hash(password)
    try:
        write_atomically(path, (digest + "\n").encode("ascii"), 0o600)
    except OSError as exc:
        raise UserError(f"cannot write the password file {path} ({exc.strerror or exc}); run this as the "
                        "agent's user (the installed doorbell-agent command does) or with sudo") from None


def verify_password(path: Path, password: str) -> tuple[bool, str | None]:
    """``(matches, problem)``: ``problem`` says why no password can be checked (an unusable file)."""
    try:
        stored = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return False, f"no password is set ({path} is missing); set one with 'doorbell-agent web password'"
    except (OSError, UnicodeError) as exc:
        return False, f"cannot read the password file {path} ({exc}); set it again with 'doorbell-agent web password'"
    try:
        return _hasher.verify(stored, password), None
    except VerifyMismatchError:
        return False, None
    except (InvalidHashError, VerificationError) as exc:
        return False, f"the password file {path} is damaged ({exc}); set it again with 'doorbell-agent web password'"


# -- sessions --------------------------------------------------------------------------------


@dataclass
class Session:
    token: str
    csrf: str
    client: str
    last_seen: float
    authenticated: bool
    password_stamp: tuple[int, int, int] | None  # the password file as it was at login: a new password ends the session
    messages: list[tuple[str, str]] = field(default_factory=list)  # (kind, text) shown once on the next page


class Sessions:
    """Server-side sessions, ended after ``idle_s`` without a request (or by logging out)."""

    def __init__(self, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_token: dict[str, Session] = {}

    def new(self, client: str, *, authenticated: bool, password_stamp: tuple[int, int, int] | None = None) -> Session:
        """A fresh session (a new token after logging in: a token seen before login is never promoted)."""
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), client, self._clock(), authenticated,
                    password_stamp)
        with self._lock:
            self._sweep_locked()
            if len(self._by_token) >= MAX_SESSIONS:  # a script opening sessions must not grow memory forever
                oldest = min(self._by_token.values(), key=lambda x: (x.authenticated, x.last_seen))
                del self._by_token[oldest.token]
            self._by_token[s.token] = s
        return s

    def get(self, token: str | None) -> Session | None:
        """The live session for a cookie value, its idle time restarted; None if unknown or expired."""
        if not token:
            return None
        now = self._clock()
        with self._lock:
            s = self._by_token.get(token)
            if s is None:
                return None
            if now - s.last_seen > self.idle_s:
                del self._by_token[token]
                return None
            s.last_seen = now
            return s

    def end(self, token: str | None) -> None:
        with self._lock:
            self._by_token.pop(token or "", None)

    def _sweep_locked(self) -> None:
        now = self._clock()
        for token in [t for t, s in self._by_token.items() if now - s.last_seen > self.idle_s]:
            del self._by_token[token]


def csrf_matches(session: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(session.csrf.encode(), (given or "").encode())


# -- wrong passwords -------------------------------------------------------------------------


@dataclass
class _Failures:
    times: list[float] = field(default_factory=list)


class LoginLimiter:
    """At most ``allowed`` wrong passwords per client address in ``window_s``; then that address waits.

    Counting per address keeps one guesser from locking the resident out from another device.
    """

    def __init__(self, allowed: int = 5, window_s: float = 15 * 60, clock: Callable[[], float] = time.monotonic) -> None:
        self.allowed = allowed
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_client: dict[str, _Failures] = {}

    def wait_s(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        now = self._clock()
        with self._lock:
            f = self._by_client.get(client)
            if f is None:
                return 0.0
            f.times = [t for t in f.times if now - t < self.window_s]
            if len(f.times) < self.allowed:
                return 0.0
            return max(0.0, f.times[0] + self.window_s - now)

    def failed(self, client: str) -> int:
        """Record a wrong password; returns how many in the current window."""
        now = self._clock()
        with self._lock:
            if len(self._by_client) > 10_000:  # a flood from many addresses must not grow memory forever
                self._by_client.clear()
            f = self._by_client.setdefault(client, _Failures())
            f.times = [t for t in f.times if now - t < self.window_s] + [now]
            return len(f.times)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._by_client.pop(client, None)


def read_password_twice(prompt: Callable[[str], str]) -> str:
    """For ``web password``: ask twice so a typo does not lock the resident out."""
    first = prompt("New password for the local page: ")
    check_password_rules(first)
    if prompt("The same password again: ") != first:
        raise UserError("the two passwords differ; nothing was changed. Run 'doorbell-agent web password' again")
    return first
