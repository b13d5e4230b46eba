"""``doorbell-agent gpio test``: check the button and light wiring (hardware/README.md) before relying on it.

Blinks the light and waits for one press of the button. It never touches the kill switch: a
homeowner testing the wiring should not stop (or resume) sharing by doing so. Run it with the agent
stopped, which otherwise holds the pins.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from agent.cli.common import add_json_flag, config_from, print_json
from agent.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    gp = sub.add_parser("gpio", help="check the kill-switch button and the light ([gpio] in the configuration)")
    gp.add_argument("action", choices=("test",), help="test = blink the light and wait for a button press")
    gp.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="how long to wait for the button press (default 30)")
    add_json_flag(gp)
    gp.set_defaults(func=_gpio)


def _gpio(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    if not 0 < args.timeout <= 600:
        raise UserError(f"--timeout {args.timeout:g} is not usable; give a number of seconds from 1 to 600")
    result = wiring_test(cfg.gpio.button_pin, cfg.gpio.led_pin, cfg.gpio.button_pull_up, args.timeout,
                         say=None if args.json else print)
    if args.json:
        print_json(result)
    return 0 if result["pressed"] is not False else 1


def wiring_test(button_pin: int | str | None, led_pin: int | str | None, pull_up: bool, timeout: float,
                *, say: Any = print, pin_factory: Any = None) -> dict[str, Any]:
    """Blink the light, wait for a press; what was seen. ``pressed`` is None when no button is configured."""
    from agent.homeowner.gpio import pin_name, quiet_fallbacks

    if button_pin is None and led_pin is None:
        raise UserError("no pins are set: add [gpio] button_pin = 17 and led_pin = 27 to the configuration "
                        "(wiring in hardware/README.md)")
    say = say or (lambda *_a: None)
    led = button = None
    try:
        from gpiozero import LED, Button

        with quiet_fallbacks() as tried:
            led = LED(led_pin, pin_factory=pin_factory) if led_pin is not None else None
            button = Button(button_pin, pull_up=pull_up, pin_factory=pin_factory) if button_pin is not None else None
    except Exception as exc:  # no GPIO here, pins busy (the agent running), a bad pin name
        if led is not None:
            led.close()
        tried_text = f"; tried {'; '.join(tried)}" if tried else ""
        raise UserError(
            f"cannot use the GPIO pins ({type(exc).__name__}: {exc}{tried_text}). Stop the agent first "
            "(sudo systemctl stop doorbell-agent), check [gpio] in the configuration, and on a Raspberry Pi "
            "that python3-lgpio is installed"
        ) from None
    bname = pin_name(button_pin) if button_pin is not None else None
    lname = pin_name(led_pin) if led_pin is not None else None
    out: dict[str, Any] = {"button_pin": bname, "led_pin": lname, "pressed": None}
    try:
        if led is not None:
            led.blink(on_time=0.25, off_time=0.25, background=True)
            say(f"The light on {lname} should be blinking now.")
        if button is None:
            say("No button is configured (gpio.button_pin); watch the light, then press Ctrl-C or wait.")
            time.sleep(min(timeout, 5.0))  # the light blinks for the homeowner to look at
            return out
        say(f"Press the button on {bname} (waiting {timeout:g} s)...")
        started = time.monotonic()
        pressed = bool(button.wait_for_press(timeout=timeout))
        out["pressed"] = pressed
        if pressed:
            out["seconds"] = round(time.monotonic() - started, 1)
            say(f"Button press seen on {bname}. The wiring works; the kill switch was not changed.")
        else:
            say(f"No press seen within {timeout:g} s. Check that the button joins {bname} "
                "(header pin 11 for GPIO17) and a GND pin (pin 9), and that gpio.button_pull_up is true "
                "for a button wired to ground.")
        return out
    finally:
        if led is not None:
            led.off()  # left dark, not floating
        for dev in (button, led):
            if dev is not None:
                dev.close()
