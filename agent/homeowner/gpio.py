"""The push button and the light by the door (``[gpio]``; wiring in hardware/README.md).

- **Button**: hold it for ``gpio.hold_seconds`` (2 s) to toggle the kill switch. A short press does
  nothing, so a bump or a curious child does not change anything. The toggle goes through
  :func:`agent.runtime.controls.set_kill_switch`, exactly like ``doorbell-agent killswitch``: written,
  then recorded in the access log; turning it off when the record fails leaves it on (fail closed).
- **Light**: on while sharing is possible, off while the kill switch is on (or sharing is otherwise
  impossible: no consent, clock unsynced, no trusted agency), blinking fast while a delivery goes out
  and slowly while a request waits for the homeowner's answer.

gpiozero is imported only when a pin is configured, so a machine without GPIO never loads its
hardware back-ends. A configured pin that cannot be used (no GPIO on this machine, pin busy) is one
clear log line; the rest of the agent runs. gpiozero runs the button's callbacks on its own thread:
they only queue, and this module's worker does the work (the access log append may take a moment).
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from agent.config import AgentConfig, GpioConfig
from agent.errors import UserError
from agent.homeowner.events import HomeEvent, HomeState

log = logging.getLogger("agent.homeowner.gpio")

BLINK_DELIVERING = (0.15, 0.15)
"""On and off seconds while a delivery goes out: fast, something is leaving the house."""
BLINK_WAITING = (0.5, 1.5)
"""While a request waits for the homeowner's answer: slow, something wants attention."""


def pin_name(pin: int | str) -> str:
    """How the resident wrote the pin, as gpiozero and the log show it: 17 -> GPIO17."""
    return f"GPIO{pin}" if isinstance(pin, int) else pin


@contextmanager
def quiet_fallbacks() -> Iterator[list[str]]:
    """gpiozero warns once per back-end it could not load; gather them for one log line instead."""
    tried: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield tried
        finally:
            tried.extend(str(w.message) for w in caught if type(w.message).__name__ == "PinFactoryFallback")


def light_mode(state: HomeState) -> str:
    """``off``, ``on``, ``blink_delivering`` or ``blink_waiting`` for one state: the light's rule in one place."""
    if state.kill_switch:
        return "off"
    if state.delivering:
        return "blink_delivering"
    if state.pending_approvals > 0:
        return "blink_waiting"
    return "on" if state.sharing_possible else "off"


class ButtonAndLight:
    """The button and/or the light, whichever pins are set. ``pin_factory`` is for tests (gpiozero's MockFactory)."""

    name = "button and light"

    def __init__(self, cfg: AgentConfig, *, pin_factory: Any = None) -> None:
        self.cfg = cfg
        gpio: GpioConfig = cfg.gpio
        self.by = f"homeowner (button on {pin_name(gpio.button_pin)})" if gpio.button_pin is not None else ""
        self.mode: str | None = None
        self.toggles = 0  # presses handled: the switch turned, or the attempt logged as failed
        self._handled = threading.Condition()
        self._jobs: queue.Queue[str] = queue.Queue(maxsize=16)
        self._stop = threading.Event()
        self.led: Any = None
        self.button: Any = None
        from gpiozero import LED, Button  # only now: a pin is configured

        try:
            if gpio.led_pin is not None:
                self.led = LED(gpio.led_pin, pin_factory=pin_factory)
            if gpio.button_pin is not None:
                self.button = Button(gpio.button_pin, pull_up=gpio.button_pull_up, hold_time=gpio.hold_seconds,
                                     pin_factory=pin_factory)
                self.button.when_held = self._held
        except BaseException:
            self.close()
            raise
        self._worker = threading.Thread(target=self._work, name="doorbell-button", daemon=True)
        self._worker.start()

    # ---- the button

    def _held(self) -> None:
        """gpiozero's thread: only queue the toggle."""
        try:
            self._jobs.put_nowait("toggle")
        except queue.Full:
            log.warning("button held again while earlier presses are still being handled; ignored")

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            if job == "toggle":
                self.toggle()
                with self._handled:
                    self.toggles += 1
                    self._handled.notify_all()

    def wait_toggles(self, n: int, timeout: float) -> bool:
        """Until ``n`` holds of the button have been handled (for tests and ``gpio test``)."""
        with self._handled:
            return self._handled.wait_for(lambda: self.toggles >= n, timeout)

    def toggle(self) -> bool:
        """Engaged -> off, anything else -> on, through the same function as the command line; False if it failed."""
        from agent.runtime.controls import set_kill_switch
        from agent.state.killswitch import KillSwitch

        engaged = KillSwitch(self.cfg.paths.killswitch_file).state().engaged
        want = not engaged
        try:
            change = set_kill_switch(self.cfg, want, by=self.by)
        except UserError as exc:  # e.g. turning it off could not be recorded: it stays on
            log.error("button: the kill switch could not be turned %s: %s", "on" if want else "off", exc)
            return False
        except Exception:
            log.exception("button: turning the kill switch %s failed", "on" if want else "off")
            return False
        log.warning("kill switch turned %s with the button (%s)", "ON" if want else "OFF", self.by)
        if change.error:
            log.error("the kill switch is on, but the access log could not record it: %s", change.error)
        return True

    # ---- the light

    def on_state(self, state: HomeState) -> None:
        mode = light_mode(state)
        if mode == self.mode or self.led is None:
            self.mode = mode
            return
        self.mode = mode
        if mode == "on":
            self.led.on()
        elif mode == "off":
            self.led.off()
        else:
            on_s, off_s = BLINK_DELIVERING if mode == "blink_delivering" else BLINK_WAITING
            self.led.blink(on_time=on_s, off_time=off_s, background=True)

    def on_event(self, event: HomeEvent) -> None:
        pass  # the light follows the state

    # ---- lifecycle

    def close(self) -> None:
        """Stop the worker, put the light out and free the pins."""
        self._stop.set()
        for dev in (self.button, self.led):
            if dev is not None:
                try:
                    if dev is self.led:
                        dev.off()  # the light goes out with the agent: nothing is shared while it is stopped
                    dev.close()
                except Exception as exc:
                    log.debug("closing %s: %s", dev, exc)


def start_button_and_light(cfg: AgentConfig, *, pin_factory: Any = None) -> ButtonAndLight | None:
    """The button and light if a pin is configured and usable, else None (with a log line saying why)."""
    gpio = cfg.gpio
    if gpio.button_pin is None and gpio.led_pin is None:
        return None
    pins = ", ".join(f"{what} on {pin_name(p)}" for what, p in (("button", gpio.button_pin), ("light", gpio.led_pin))
                     if p is not None)
    try:
        with quiet_fallbacks() as tried:
            dev = ButtonAndLight(cfg, pin_factory=pin_factory)
    except Exception as exc:  # gpiozero's BadPinFactory (no GPIO here), a pin in use, a bad pin name...
        log.error("the %s cannot be used (%s: %s%s); the rest of the agent runs without them. On a Raspberry Pi "
                  "install python3-lgpio; elsewhere remove button_pin/led_pin from [gpio]", pins, type(exc).__name__,
                  exc, f"; tried {'; '.join(tried)}" if tried else "")
        return None
    hold = f" (hold the button {gpio.hold_seconds:g} s to turn the kill switch on or off)" if dev.button is not None else ""
    log.info("%s ready%s", pins, hold)
    return dev
