"""What the homeowner's button light, Home Assistant and the webhook react to, read from disk.

Why a watcher that polls files instead of hooks in the sharing service: the
kill switch is turned by the command line and the local page from other
processes, approvals are answered from the command line, and the sharing
service must not wait for a light or a web request. Everything the homeowner
should hear about is already on disk, written by whoever did it:

- the access log (:class:`~agent.state.accesslog.AccessLog`): held requests,
  grants, the resident's approvals and declines, deliveries and their ends;
- the kill-switch file (:class:`~agent.state.killswitch.KillSwitch`);
- pending approvals (:class:`~agent.state.approvals.ApprovalQueue`);
- deliveries going out: the outbox holds a job from the grant until the
  delivery's end is logged; the service's status file counts queued jobs too
  (``pending_deliveries``), but it is written only every few seconds and leaves
  out the job being sent, so the outbox is looked at first;
- whether sharing is possible at all (:func:`agent.runtime.status.sharing_status`:
  kill switch, clock, trust store, consent), the same answer ``status`` gives.

:class:`Watcher` reads them about once a second on its own thread and hands
subscribers a :class:`HomeState` whenever it changes and a :class:`HomeEvent`
for each new thing that happened. It starts from the log's current head, so a
restart never repeats old news. Subscribers are called on the watcher's thread
and must return at once (they queue work for their own threads).

Nothing here carries where the camera is: a request's area stays in the log;
events carry the agency, times and the length of footage only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import AgentConfig
from agent.display import safe_text
from agent.fsutil import read_status
from agent.runtime.status import human_duration
from agent.state.killswitch import KillSwitch
from agent.timeutil import format_local, format_utc

if TYPE_CHECKING:
    from agent.state.accesslog import AccessLog, LogEntry

log = logging.getLogger("agent.homeowner")

POLL_S = 1.0
MAX_ENTRIES_PER_POLL = 500
"""A flood of log entries is read in bounded slices, one per poll; the watcher never stalls on a big log."""
SHARING_EVERY_S = 10.0
"""How often "is sharing possible?" and the pending approvals are read again when nothing happened: the full
answer (:func:`~agent.runtime.status.sharing_status`) costs milliseconds and grows with the log, so it is read
at once only after a new log entry or a kill-switch change. Consent periods and clock changes show within this."""
LAST_REQUEST_LOOKBACK = 200
"""At start, how far back in the log to look for the latest request (for Home Assistant's sensor)."""

# What each access-log outcome becomes. Decisions other than these two are refusals.
_DECISION_KINDS = {"awaiting_resident": "held_for_approval", "granted": "granted"}
_EVENT_KINDS = {
    "approved": "approved",
    "declined_by_resident": "declined",
    "approval_expired": "approval_expired",
    "delivered": "delivered",
    "delivery_cut": "delivery_cut",
    "delivery_failed": "delivery_failed",
    "delivery_refused": "delivery_refused",
}
REQUEST_KINDS = ("held_for_approval", "granted", "refused", *_EVENT_KINDS.values())
SWITCH_KINDS = ("kill_switch_on", "kill_switch_off")
NOTIFY_KINDS = frozenset(
    {"held_for_approval", "granted", "approved", "declined", "approval_expired", "delivered", "delivery_cut",
     "delivery_failed", "delivery_refused", *SWITCH_KINDS}
)
"""What is worth a message to the homeowner's phone. Refusals are not: anyone holding an agency key could
send a message per refusal; they show in Home Assistant's last-request sensor and in ``log show``."""


@dataclass(frozen=True)
class HomeEvent:
    """One thing the homeowner may want to hear about. No location, ever."""

    kind: str  # one of REQUEST_KINDS or SWITCH_KINDS
    at: datetime
    agency: str | None = None  # the requesting agency's id (agency-written text: shown through safe_text)
    footage_s: float | None = None  # length of the window held, granted or delivered
    by: str | None = None  # who turned the kill switch
    reason: str | None = None  # a refusal's code, or why a delivery failed
    seq: int | None = None  # the access-log entry, when there is one

    @property
    def notify(self) -> bool:
        return self.kind in NOTIFY_KINDS

    def title(self) -> str:
        """A short, fixed headline (ASCII: it also goes into an HTTP header for ntfy)."""
        return {
            "held_for_approval": "Footage request waiting for your answer",
            "granted": "Footage is being shared",
            "approved": "Approved footage is being shared",
            "declined": "Footage request declined",
            "approval_expired": "Footage request expired",
            "delivered": "Footage delivered",
            "delivery_cut": "Delivery stopped by the kill switch",
            "delivery_failed": "Delivery failed",
            "delivery_refused": "Delivery not sent",
            "refused": "Footage request refused",
            "kill_switch_on": "Kill switch ON: sharing stopped",
            "kill_switch_off": "Kill switch OFF: sharing allowed by your rules",
        }.get(self.kind, self.kind)

    def message(self, tz: tzinfo | None = None) -> str:
        """One or two plain sentences for the homeowner, with the local time."""
        who = safe_text(self.agency) if self.agency else "an agency"
        footage = f"{human_duration(self.footage_s)} of footage" if self.footage_s else "footage"
        when = format_local(self.at, tz, seconds=False)
        text = {
            "held_for_approval": f"{who} asks for {footage}. Nothing is shared until you approve it: "
                                 "run 'doorbell-agent pending'.",
            "granted": f"{who} was granted {footage} under your rules; it is being sent.",
            "approved": f"You approved {who}'s request; {footage} is being sent.",
            "declined": f"You declined {who}'s request; nothing was shared.",
            "approval_expired": f"{who}'s request expired before you answered it; nothing was shared.",
            "delivered": f"{footage[:1].upper()}{footage[1:]} was delivered to {who}.",
            "delivery_cut": f"The delivery to {who} was stopped by the kill switch.",
            "delivery_failed": f"The delivery to {who} failed ({safe_text(self.reason or 'no reason given')}).",
            "delivery_refused": f"The footage for {who} was not sent: your rules no longer allow it.",
            "refused": f"A request from {who} was refused ({safe_text(self.reason or 'refused')}).",
            "kill_switch_on": f"The kill switch was turned on by {safe_text(self.by or 'someone')}; nothing is shared.",
            "kill_switch_off": f"The kill switch was turned off by {safe_text(self.by or 'someone')}; "
                               "requests are decided by your rules again.",
        }.get(self.kind, self.kind)
        return f"{text} ({when})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.kind, "at": format_utc(self.at)}
        for name in ("agency", "footage_s", "by", "reason"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True)
class HomeState:
    """What the light and Home Assistant show right now."""

    kill_switch: bool
    kill_switch_by: str | None
    sharing_possible: bool
    why_not: str | None  # why sharing is not possible, in words
    pending_approvals: int
    delivering: bool
    last_request: HomeEvent | None = None


class Subscriber(Protocol):
    def on_state(self, state: HomeState) -> None:
        """The state changed (and once at start). Called on the watcher's thread: return at once."""

    def on_event(self, event: HomeEvent) -> None:
        """Something happened. Called on the watcher's thread: return at once."""


def _window_seconds(window: Any) -> float | None:
    from agent.state.accesslog import _window_seconds as seconds

    return seconds(window) if isinstance(window, dict) else None


def event_from_entry(entry: LogEntry) -> HomeEvent | None:
    """The homeowner's view of one access-log entry; None for checkpoints' kin and the resident's own changes.

    The resident's kill-switch changes are read from the switch itself (see :class:`Watcher`), which also
    sees a change the log could not record.
    """
    data = entry.data
    if entry.type == "decision":
        kind = _DECISION_KINDS.get(entry.outcome, "refused")
        window = data.get("granted") or data.get("requested")
        return HomeEvent(kind, entry.at, agency=entry.iss or None, footage_s=_window_seconds(window),
                         reason=entry.outcome if kind == "refused" else None, seq=entry.seq)
    if entry.type == "event" and entry.outcome in _EVENT_KINDS:
        kind = _EVENT_KINDS[entry.outcome]
        reason = data.get("reason") if kind in ("delivery_failed", "delivery_refused") else None
        return HomeEvent(kind, entry.at, agency=entry.iss or None, footage_s=_window_seconds(data.get("granted")),
                         reason=str(reason)[:200] if reason is not None else None, seq=entry.seq)
    return None


class Watcher:
    """Polls the agent's state on disk and tells subscribers what changed (see the module docstring)."""

    name = "homeowner"

    def __init__(self, cfg: AgentConfig, subscribers: Iterable[Subscriber] = (), *, poll_s: float = POLL_S,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.cfg = cfg
        self.subscribers: list[Subscriber] = list(subscribers)
        self.poll_s = poll_s
        self._clock = clock or (lambda: datetime.now(UTC))
        self._switch = KillSwitch(cfg.paths.killswitch_file)
        self._log: AccessLog | None = None
        self._seen_seq: int | None = None  # None until the log exists and its head was read
        self._state: HomeState | None = None
        self._switch_seen: bool | None = None
        self._last_request: HomeEvent | None = None
        self._sharing_cache: dict[str, Any] | None = None
        self._sharing_due = 0.0
        self._log_moved = False
        self._problems: dict[str, str] = {}  # what is wrong now, logged once per change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- lifecycle

    def start(self) -> None:
        try:
            self.poll(initial=True)
        except Exception:  # the next polls try again; the agent runs either way
            log.exception("reading the agent's state for the button, light and notifications failed")
        self._thread = threading.Thread(target=self._run, name="doorbell-homeowner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        if self._stop.is_set() and self._log is not None:
            self._log.close()
            self._log = None
        return self._stop.is_set()

    @property
    def state(self) -> HomeState | None:
        with self._lock:
            return self._state

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # a bug here must not take the agent down; the next poll tries again
                log.exception("reading the agent's state for the button, light and notifications failed")

    # ---- one look at the disk

    def poll(self, *, initial: bool = False) -> None:
        """Read everything once; tell subscribers about new events and a changed state."""
        events = self._new_log_events(initial)
        switch = self._switch.state()
        if self._switch_seen is not None and switch.engaged != self._switch_seen:
            kind = "kill_switch_on" if switch.engaged else "kill_switch_off"
            events.append(HomeEvent(kind, switch.since or self._clock(), by=switch.by or switch.reason))
        self._switch_seen = switch.engaged
        for e in events:
            if e.kind in REQUEST_KINDS:
                self._last_request = e
        now = time.monotonic()
        if self._sharing_cache is None or self._log_moved or events or now >= self._sharing_due:
            self._sharing_cache, self._sharing_due = self._sharing(), now + SHARING_EVERY_S
        state = HomeState(
            kill_switch=switch.engaged,
            kill_switch_by=switch.by,
            **self._sharing_cache,
            delivering=self._delivering(),
            last_request=self._last_request,
        )
        with self._lock:
            changed, self._state = state != self._state, state
        for sub in list(self.subscribers):
            try:
                for e in events:
                    sub.on_event(e)
                if changed:
                    sub.on_state(state)
            except Exception:  # one broken subscriber must not silence the others
                log.exception("%s failed to take an update", type(sub).__name__)

    def _problem(self, key: str, why: str | None) -> None:
        """Log a problem once when it appears and once when it clears, not every second."""
        old = self._problems.get(key)
        if why == old:
            return
        if why is None:
            self._problems.pop(key, None)
            log.info("%s: readable again", key)
        else:
            self._problems[key] = why
            log.warning("%s: %s", key, why)

    def _open_log(self) -> AccessLog | None:
        if self._log is None:
            if not self.cfg.paths.state_db.exists():
                return None  # not created by this watcher: the service makes it when it first starts
            from agent.state.accesslog import AccessLog

            self._log = AccessLog(self.cfg.paths.state_db)
        return self._log

    def _new_log_events(self, initial: bool) -> list[HomeEvent]:
        self._log_moved = False
        try:
            alog = self._open_log()
            if alog is None:
                return []
            head, _ = alog.head()
            if self._seen_seq is None:
                # Start from the current head: old entries are history, not news. (Before the log existed,
                # everything in it is new.)
                self._seen_seq = head if initial else 0
                if initial:
                    self._last_request = self._latest_request(alog, head)
                    return []
            if head < self._seen_seq:  # a log replaced under us (restored from a backup): start over from its head
                self._seen_seq = head
                return []
            upto = min(head, self._seen_seq + MAX_ENTRIES_PER_POLL)
            entries = alog.entries(seqs=range(self._seen_seq + 1, upto + 1)) if upto > self._seen_seq else []
            self._seen_seq = upto
            self._log_moved = bool(entries)  # approvals answered, rules changed: read the slow parts again
            self._problem("access log", None)
        except Exception as exc:  # sqlite3.Error, OSError: tell the resident once, keep polling
            self._problem("access log", f"cannot read {self.cfg.paths.state_db} ({type(exc).__name__}: {exc})")
            if self._log is not None:
                try:
                    self._log.close()
                finally:
                    self._log = None
            return []
        return [e for e in map(event_from_entry, entries) if e is not None]

    @staticmethod
    def _latest_request(alog: AccessLog, head: int) -> HomeEvent | None:
        entries = alog.entries(seqs=range(max(1, head - LAST_REQUEST_LOOKBACK + 1), head + 1))
        for entry in reversed(entries):
            e = event_from_entry(entry)
            if e is not None:
                return e
        return None

    def _sharing(self) -> dict[str, Any]:
        """Sharing possible? The answer ``status`` gives; anything unreadable means no (fail closed)."""
        from agent.runtime.status import sharing_status

        try:
            s = sharing_status(self.cfg, self._clock())
        except Exception as exc:
            why = f"cannot tell whether sharing is possible ({type(exc).__name__}: {exc})"
            self._problem("sharing status", why)
            return {"sharing_possible": False, "why_not": why, "pending_approvals": 0}
        self._problem("sharing status", None)
        why_not = _why_not(s)
        return {"sharing_possible": why_not is None, "why_not": why_not,
                "pending_approvals": int(s.get("pending_approvals") or 0)}

    def _delivering(self) -> bool:
        outbox = self.cfg.paths.data_dir / "outbox"  # agent.sharing.service keeps its Outbox here
        try:
            if any(outbox.glob("*.job.json")):
                return True
        except OSError:
            pass
        svc = read_status(self.cfg.paths.service_status_file)
        try:
            return bool(svc) and int(svc.get("pending_deliveries") or 0) > 0  # type: ignore[union-attr]
        except (TypeError, ValueError):
            return False


def _why_not(s: dict[str, Any]) -> str | None:
    """Why :func:`~agent.runtime.status.sharing_status` says sharing cannot happen now, or None if it can."""
    if not s.get("enabled"):
        return "sharing is not set up ([policy] and [mqtt] in the configuration)"
    if s.get("not_sharing"):  # damaged or lost state, or run's request listener is down (agent/runtime/status.py)
        return str(s["not_sharing"])
    if s["kill_switch"]["engaged"]:
        return f"the kill switch is on ({s['kill_switch']['reason']})"
    if not s["clock"]["synced"]:
        return f"the clock is not known to be right ({s['clock']['why']})"
    trust = s["trust"]
    if trust.get("error"):
        return f"the trust store cannot be read ({trust['error']})"
    if not trust.get("usable"):
        return "no agency key is trusted and valid now (doorbell-agent trust list)"
    consent = s.get("consent") or {}
    if not consent.get("consents"):
        return f"your consent does not hold now ({consent.get('why') or consent.get('state')})"
    return None
