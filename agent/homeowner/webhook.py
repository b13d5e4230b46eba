"""A message to the homeowner's phone or home server for each event worth hearing about (``[notify]``).

One HTTP POST per event (:data:`agent.homeowner.events.NOTIFY_KINDS`), in one of two shapes:

- ``format = "json"`` (the default): ``{"event", "title", "message", "at", ...}`` as JSON, for a
  Home Assistant webhook (``/api/webhook/<id>``: the automation reads ``trigger.json.title``) or any
  service that takes JSON;
- ``format = "ntfy"``: the message as plain text with ``Title``, ``Tags`` and ``Priority`` headers,
  as ntfy takes it on a topic URL (``https://ntfy.sh/<topic>``).

``token`` is sent as ``Authorization: Bearer <token>`` (ntfy access tokens, most webhook receivers).

Sent with the standard library from one worker thread, with a timeout and a bounded queue: a slow or
dead receiver costs at most ``timeout_s`` per message, a backlog drops the newest messages with a log
line, and nothing here can block or crash the agent. Nothing sent says where the camera is.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from datetime import tzinfo
from urllib.parse import urlsplit

from agent.config import NotifyConfig
from agent.homeowner.events import HomeEvent, HomeState

log = logging.getLogger("agent.homeowner.webhook")

QUEUE_SIZE = 100
_NTFY_TAGS = {
    "held_for_approval": "bell", "granted": "outbox_tray", "approved": "outbox_tray", "declined": "no_entry",
    "approval_expired": "hourglass", "delivered": "white_check_mark", "delivery_cut": "octagonal_sign",
    "delivery_failed": "warning", "delivery_refused": "no_entry", "kill_switch_on": "lock", "kill_switch_off": "unlock",
}  # fmt: skip


def where(url: str) -> str:
    """The receiver for log lines: scheme and host only (an ntfy topic, or a webhook id, is a password)."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}"
    except ValueError:
        return "(the configured notify.url)"


def build_request(cfg: NotifyConfig, event: HomeEvent, tz: tzinfo | None = None) -> urllib.request.Request:
    """The POST for one event, in the configured format."""
    title, message = event.title(), event.message(tz)
    headers = {"User-Agent": "doorbell-agent"}
    if cfg.token:
        headers["Authorization"] = f"Bearer {cfg.token}"
    if cfg.format == "ntfy":
        headers.update({"Content-Type": "text/plain; charset=utf-8", "Title": title,
                        "Tags": _NTFY_TAGS.get(event.kind, "house"),
                        "Priority": "high" if event.kind in ("held_for_approval", "kill_switch_off") else "default"})
        body = message.encode("utf-8")
    else:
        headers["Content-Type"] = "application/json"
        body = json.dumps({**event.to_json(), "title": title, "message": message}, ensure_ascii=False).encode("utf-8")
    return urllib.request.Request(cfg.url, data=body, headers=headers, method="POST")


class Webhook:
    """Queues events on the watcher's thread; one worker thread sends them."""

    name = "webhook"

    def __init__(self, cfg: NotifyConfig, *, tz: tzinfo | None = None, queue_size: int = QUEUE_SIZE) -> None:
        self.cfg = cfg
        self.tz = tz
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._queue: queue.Queue[HomeEvent | None] = queue.Queue(maxsize=queue_size)
        self._failing = False
        self._thread = threading.Thread(target=self._work, name="doorbell-webhook", daemon=True)
        self._thread.start()
        log.info("notifications go to %s (%s)", where(cfg.url), cfg.format)

    def on_state(self, state: HomeState) -> None:
        pass

    def on_event(self, event: HomeEvent) -> None:
        if not event.notify:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            log.warning("notification for %s dropped: %d are already waiting for %s", event.kind,
                        self._queue.qsize(), where(self.cfg.url))

    def _work(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            self.send(event)

    def send(self, event: HomeEvent) -> bool:
        """POST one event now; True if the receiver took it. Never raises."""
        try:
            req = build_request(self.cfg, event, self.tz)
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:  # noqa: S310 (http/https only: config)
                resp.read(65536)
                status = resp.status
        except urllib.error.HTTPError as exc:
            why = f"it answered {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, DNS, TLS, timeout
            reason = getattr(exc, "reason", exc)
            why = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
        except Exception as exc:  # anything else is a bug here, not a reason to stop the agent
            why = f"{type(exc).__name__}: {exc}"
        else:
            self.sent += 1
            if self._failing:
                log.info("notifications reach %s again", where(self.cfg.url))
                self._failing = False
            log.debug("notified %s of %s (HTTP %d)", where(self.cfg.url), event.kind, status)
            return True
        self.failed += 1
        self._failing = True
        log.warning("could not notify %s of %s: %s", where(self.cfg.url), event.kind, why)
        return False

    def close(self, timeout: float = 2.0) -> None:
        """Stop after what is queued, waiting at most ``timeout`` (the thread is a daemon: it never holds up exit)."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
