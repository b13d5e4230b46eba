"""The homeowner's side of ``run``: the button and light, Home Assistant, the webhook.

Each part is started only if its section is configured (``[gpio]`` pins, ``[home_assistant]``,
``[notify]``), and a part that cannot start (no GPIO on this machine, a bad CA file) is a log
line, never a reason for the agent not to run. All parts hang off one
:class:`~agent.homeowner.events.Watcher`, which reads the agent's state from disk (see there
for why), so a change made by the command line in another process is shown and notified too.
"""

from __future__ import annotations

import logging
import zoneinfo
from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig
from agent.homeowner.events import POLL_S, Subscriber, Watcher

log = logging.getLogger("agent.homeowner")


def homeowner_configured(cfg: AgentConfig) -> bool:
    """Whether any of the homeowner's parts is asked for."""
    gpio = cfg.gpio
    return (gpio.button_pin is not None or gpio.led_pin is not None or cfg.home_assistant is not None
            or cfg.notify is not None)


@dataclass
class HomeownerComponent:
    """A ``run`` component (``name``, ``stop()``, ``wait()``): the watcher and whatever parts started."""

    watcher: Watcher
    parts: list[Any] = field(default_factory=list)
    name: str = "homeowner"
    _closed: bool = False

    def stop(self) -> None:
        self.watcher.stop()

    def wait(self, timeout: float | None = None) -> bool:
        done = self.watcher.wait(timeout)
        if done and not self._closed:
            self._closed = True
            for part in self.parts:
                try:
                    part.close()
                except Exception:
                    log.exception("stopping %s failed", getattr(part, "name", part))
        return done


def start_homeowner(cfg: AgentConfig, *, pin_factory: Any = None, poll_s: float | None = None) -> HomeownerComponent | None:
    """Start what is configured; None if nothing is. ``pin_factory`` and ``poll_s`` are for tests."""
    if not homeowner_configured(cfg):
        return None
    parts: list[Any] = []
    if cfg.gpio.button_pin is not None or cfg.gpio.led_pin is not None:
        from agent.homeowner.gpio import start_button_and_light

        dev = start_button_and_light(cfg, pin_factory=pin_factory)
        if dev is not None:
            parts.append(dev)
    if cfg.home_assistant is not None:
        from agent.homeowner.homeassistant import start_home_assistant

        link = start_home_assistant(cfg)
        if link is not None:
            parts.append(link)
    if cfg.notify is not None:
        from agent.homeowner.webhook import Webhook

        tz = zoneinfo.ZoneInfo(cfg.policy.timezone) if cfg.policy is not None else None
        parts.append(Webhook(cfg.notify, tz=tz))
    subscribers: list[Subscriber] = list(parts)
    watcher = Watcher(cfg, subscribers, poll_s=poll_s or POLL_S)
    try:
        watcher.start()
    except BaseException:
        for part in parts:
            part.close()
        raise
    return HomeownerComponent(watcher, parts)


def homeowner_component(cfg: AgentConfig) -> HomeownerComponent:
    """For :func:`agent.runtime.supervisor.components_for`, which adds it only when something is configured."""
    comp = start_homeowner(cfg)
    assert comp is not None, "homeowner_component is only started when homeowner_configured(cfg)"
    return comp
