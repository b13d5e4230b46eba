"""The button and the light by the door, on gpiozero's own mock pins (this machine has no GPIO).

What a homeowner would check: holding the button turns the kill switch on, and again off, on the
record as the button's doing; a short press does nothing; the light is on while sharing is possible,
off while the switch is on, and blinks while a request waits for an answer and while footage goes
out (through the real sharing service, a real broker and a real delivery).

gpiozero's MockFactory runs hold timing in real time: hold_seconds is 0.5 here, and the tests wait
on the button's handled-press count and on the watcher's states, with timeouts.
"""

from __future__ import annotations

import json
import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPin

from agent.city import keygen
from agent.config import AgentConfig, ClockConfig, GpioConfig, MqttConfig, load_config
from agent.homeowner import HomeownerComponent, start_homeowner
from agent.homeowner.events import HomeEvent, HomeState, Watcher
from agent.homeowner.gpio import BLINK_DELIVERING, BLINK_WAITING, ButtonAndLight
from agent.protocol.trust import TrustStore
from agent.runtime.controls import set_kill_switch
from agent.state.accesslog import AccessLog
from agent.state.approvals import ApprovalQueue
from agent.state.killswitch import KillSwitch
from agent.state.truststore import save_trust_store
from tests.broker import Broker
from tests.test_webhook import policy_toml

WAIT = 20.0
BUTTON, LIGHT = 17, 27
GPIO = GpioConfig(button_pin=BUTTON, led_pin=LIGHT, hold_seconds=0.5)


class States:
    """A watcher subscriber that lets a test wait for a state instead of sleeping."""

    def __init__(self, watcher: Watcher) -> None:
        self.q: queue.Queue[HomeState] = queue.Queue()
        self.watcher = watcher
        watcher.subscribers.append(self)

    def on_state(self, state: HomeState) -> None:
        self.q.put(state)

    def on_event(self, event: HomeEvent) -> None:
        pass

    def wait(self, pred: Callable[[HomeState], bool], timeout: float = WAIT) -> HomeState:
        deadline = time.monotonic() + timeout
        state = self.watcher.state  # subscribed first: a change after this read is queued
        if state is not None and pred(state):
            return state
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the watcher never reported the expected state; the last was {self.watcher.state}")
            try:
                state = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if pred(state):
                return state


def blink_times(pin: MockPin, changes: int = 4, timeout: float = WAIT) -> list[float]:
    """Wait until the light has changed ``changes`` times from now; the seconds between the changes."""
    start = len(pin.states)
    deadline = time.monotonic() + timeout
    while len(pin.states) < start + changes + 1:
        assert time.monotonic() < deadline, f"the light did not blink: {pin.states[start:]}"
        time.sleep(0.02)  # a mock pin has no change event for outputs: look every 20 ms
    # A mock pin stamps each change with the time since the change before it: how long the light was on or off.
    return [s.timestamp for s in pin.states[start + 1:start + changes + 1]]


def is_blinking(pin: MockPin, pattern: tuple[float, float]) -> bool:
    """The light's typical on/off interval is close to ``pattern``'s (the fast and slow blinks differ 7-fold).

    The median of several intervals, the first one left out (it may be the change from steady to blinking):
    a busy test machine stretches a few intervals, and one stretched interval must not fail the test.
    """
    intervals = blink_times(pin, changes=7)[1:]
    expected = statistics.mean(pattern)
    ok = abs(statistics.median(intervals) - expected) < 0.1 + expected * 0.5
    if not ok:
        print(f"light intervals {intervals}, expected about {pattern}")
    return ok


def ready_to_share(cfg: AgentConfig, tmp_path: Path) -> AgentConfig:
    """Policy, a broker section, a trusted agency key, a clock taken as right: sharing is possible."""
    keys = keygen(iss="jackson-pd", kid="jpd-test", out_dir=tmp_path / "city")
    save_trust_store(TrustStore.from_jwks(keys.public_jwks), cfg.paths.trust_file)
    return cfg.model_copy(update={"clock": ClockConfig(assume_synced=True), "gpio": GPIO,
                                  "mqtt": MqttConfig(host="127.0.0.1", port=8883)})


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    f = MockFactory()
    yield f
    f.close()


@pytest.fixture
def cfg(write_config: Callable[[str], Path], tmp_path: Path) -> AgentConfig:
    c = load_config(write_config(policy_toml()))
    c.paths.data_dir.mkdir(parents=True)
    return ready_to_share(c, tmp_path)


@pytest.fixture
def home(cfg: AgentConfig, factory: MockFactory) -> Iterator[tuple[HomeownerComponent, ButtonAndLight, States]]:
    comp = start_homeowner(cfg, pin_factory=factory, poll_s=0.05)
    assert comp is not None
    (dev,) = [p for p in comp.parts if isinstance(p, ButtonAndLight)]
    states = States(comp.watcher)
    yield comp, dev, states
    comp.stop()
    assert comp.wait(WAIT)


def hold(factory: MockFactory, dev: ButtonAndLight, n: int) -> None:
    """Press and hold the button until the agent has handled press number ``n``, then let go."""
    pin = factory.pin(BUTTON)
    pin.drive_low()  # pressed: the button connects the pulled-up pin to ground
    try:
        assert dev.wait_toggles(n, WAIT), "holding the button did nothing"
    finally:
        pin.drive_high()


def switch_entries(cfg: AgentConfig) -> list[tuple[str, str]]:
    with AccessLog(cfg.paths.state_db) as alog:
        return [(e.outcome, e.data["by"]) for e in alog.entries() if e.type == "resident"
                and e.outcome.startswith("killswitch")]


def test_holding_the_button_toggles_the_kill_switch_on_the_record(cfg: AgentConfig, factory: MockFactory, home) -> None:
    comp, dev, states = home
    light = factory.pin(LIGHT)
    states.wait(lambda s: s.sharing_possible)
    assert light.state is True  # sharing possible: the light is on

    hold(factory, dev, 1)
    assert KillSwitch(cfg.paths.killswitch_file).state().engaged
    states.wait(lambda s: s.kill_switch)
    assert light.state is False  # switch on: light off
    hold(factory, dev, 2)
    assert not KillSwitch(cfg.paths.killswitch_file).state().engaged
    states.wait(lambda s: not s.kill_switch and s.sharing_possible)
    assert light.state is True
    by = "homeowner (button on GPIO17)"
    assert switch_entries(cfg) == [("killswitch_on", by), ("killswitch_off", by)]


def test_a_short_press_does_nothing(cfg: AgentConfig, factory: MockFactory, home) -> None:
    comp, dev, states = home
    pin = factory.pin(BUTTON)
    pin.drive_low()
    time.sleep(0.1)  # the press itself: a tap, well under hold_seconds (0.5 s)
    pin.drive_high()
    hold(factory, dev, 1)  # a real hold afterwards is the first press handled: the tap was not one
    assert dev.toggles == 1
    assert switch_entries(cfg) == [("killswitch_on", "homeowner (button on GPIO17)")]


def test_a_release_that_cannot_be_recorded_keeps_the_switch_on(cfg: AgentConfig, factory: MockFactory, home,
                                                                caplog) -> None:
    caplog.set_level(logging.ERROR, logger="agent.homeowner.gpio")
    comp, dev, states = home
    set_kill_switch(cfg, True, by="homeowner (command line)")
    # Then the access log becomes unusable: a directory where the database was.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cfg.paths.state_db}{suffix}").unlink(missing_ok=True)
    cfg.paths.state_db.mkdir()
    hold(factory, dev, 1)
    state = KillSwitch(cfg.paths.killswitch_file).state()
    assert state.engaged and "put back on" in (state.by or "")
    assert "could not be turned off" in caplog.text and "stays ON" in caplog.text
    assert factory.pin(LIGHT).state is False


def test_no_pin_configured_loads_no_gpio_back_end(write_config: Callable[[str], Path]) -> None:
    import subprocess
    import sys

    path = write_config(policy_toml() + '\n[notify]\nurl = "http://127.0.0.1:9/x"\n')
    code = (
        "import sys; from agent.config import load_config; from agent.homeowner import start_homeowner\n"
        f"c = start_homeowner(load_config({str(path)!r})); c.stop(); c.wait(5)\n"
        "print(sorted(m for m in sys.modules if m.startswith('gpiozero')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_a_pin_on_a_machine_without_gpio_is_a_log_line(cfg: AgentConfig, caplog) -> None:
    """No factory given: gpiozero looks for real GPIO, finds none here, and the agent runs on."""
    caplog.set_level(logging.INFO, logger="agent.homeowner")
    comp = start_homeowner(cfg, poll_s=0.05)
    assert comp is not None
    try:
        assert not any(isinstance(p, ButtonAndLight) for p in comp.parts)
        assert "button on GPIO17, light on GPIO27 cannot be used" in caplog.text
        assert "the rest of the agent runs" in caplog.text
        assert comp.wait(0) is False  # still running (the watcher)
    finally:
        comp.stop()
        assert comp.wait(WAIT)


# ---- the light through a real request, approval and delivery --------------------------------------


@pytest.mark.slow
def test_the_light_through_a_held_request_and_a_real_delivery(tmp_path: Path, write_config, broker: Broker,
                                                              factory: MockFactory) -> None:
    from tests.test_service import Agency, Agent, make_env

    env = make_env(tmp_path, write_config, broker)
    policy = env.cfg.require_policy().model_copy(update={"approval": "ask"})
    env.cfg = env.cfg.model_copy(update={"policy": policy, "gpio": GPIO, "clock": ClockConfig(assume_synced=True)})
    agent = Agent(env)
    gate = threading.Event()
    handing = threading.Event()
    events = agent.svc.delivery_events
    assert events is not None

    def hold_first_chunk(event: str, job: Any, details: dict[str, Any]) -> None:
        """Runs on the delivery thread: keep the delivery going out until the test has seen the light."""
        if event == "handing" and not handing.is_set():
            handing.set()
            gate.wait(WAIT)
        events(event, job, details)

    agent.svc.delivery_events = hold_first_chunk
    agency = Agency(env, "jpd")
    comp = start_homeowner(env.cfg, pin_factory=factory, poll_s=0.05)
    assert comp is not None
    states = States(comp.watcher)
    light = factory.pin(LIGHT)
    try:
        states.wait(lambda s: s.sharing_possible and not s.delivering and s.pending_approvals == 0)
        assert light_becomes(light, True)

        built = agency.request()
        agency.publish(built)
        states.wait(lambda s: s.pending_approvals == 1)
        assert is_blinking(light, BLINK_WAITING), "a request waiting for an answer: slow blink"

        (item,) = ApprovalQueue(env.cfg.paths.state_db).pending(env.clock.now())
        ApprovalQueue(env.cfg.paths.state_db).approve(item.id, datetime.now(UTC))  # as 'doorbell-agent approve'
        assert handing.wait(WAIT), "the approved delivery never started"
        states.wait(lambda s: s.delivering)
        assert is_blinking(light, BLINK_DELIVERING), "footage going out: fast blink"

        gate.set()
        agency.collect(built.jti)
        assert agent.wait_delivery_end(built.jti)[0] == "delivered"
        states.wait(lambda s: not s.delivering and s.pending_approvals == 0)
        assert light_becomes(light, True) and len(blink_after_settle(light)) == 0
    finally:
        gate.set()
        comp.stop()
        assert comp.wait(WAIT)
        agency.close()
        agent.stop()


def light_becomes(pin: MockPin, state: bool, timeout: float = WAIT) -> bool:
    """Whether the light reaches ``state``: it follows the watcher's state on the light's own thread."""
    deadline = time.monotonic() + timeout
    while pin.state is not state:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # a mock output pin has no change event: look every 20 ms
    return True


def blink_after_settle(pin: MockPin, quiet: float = 0.6) -> list[Any]:
    """Changes of the light during ``quiet`` seconds: none once it is steadily on (longer than a fast blink)."""
    start = len(pin.states)
    time.sleep(quiet)  # proving that nothing happens takes a wait: three fast blink periods
    return pin.states[start:]


# ---- doorbell-agent gpio test ----------------------------------------------------------------------


@pytest.fixture
def mock_pins() -> Iterator[MockFactory]:
    """gpiozero's default factory for code that asks for none (the command), restored afterwards."""
    from gpiozero import Device

    old, Device.pin_factory = Device.pin_factory, MockFactory()
    try:
        yield Device.pin_factory
    finally:
        Device.pin_factory.close()
        Device.pin_factory = old


def gpio_config(write_config: Callable[[str], Path]) -> Path:
    return write_config(f"[gpio]\nbutton_pin = {BUTTON}\nled_pin = \"GPIO{LIGHT}\"\n")


def test_gpio_test_blinks_and_sees_a_press(write_config, mock_pins: MockFactory, capsys) -> None:
    from agent.cli import main

    light, button = mock_pins.pin(LIGHT), mock_pins.pin(BUTTON)

    def press_once_blinking() -> None:
        blink_times(light, changes=2)  # the homeowner sees the light blink, then presses
        button.drive_low()

    presser = threading.Thread(target=press_once_blinking, daemon=True)
    presser.start()
    code = main(["--config", str(gpio_config(write_config)), "gpio", "test", "--timeout", str(WAIT)])
    presser.join(WAIT)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "The light on GPIO27 should be blinking now." in out
    assert "Button press seen on GPIO17" in out and "the kill switch was not changed" in out
    assert light.state is False  # closed: the light is left off


def test_gpio_test_without_a_press_says_what_to_check(write_config, mock_pins: MockFactory, capsys) -> None:
    from agent.cli import main

    path = gpio_config(write_config)
    code = main(["--config", str(path), "gpio", "test", "--timeout", "0.3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and result == {"button_pin": "GPIO17", "led_pin": "GPIO27", "pressed": False}
    code = main(["--config", str(path), "gpio", "test", "--timeout", "0.3"])
    assert code == 1
    assert "No press seen within 0.3 s" in capsys.readouterr().out
    assert not KillSwitch(path.parent / "data" / "killswitch").state().engaged


def test_gpio_test_without_pins_or_gpio_is_a_clear_error(write_config, capsys) -> None:
    from agent.cli import main

    assert main(["--config", str(write_config("")), "gpio", "test"]) != 0
    assert "no pins are set: add [gpio] button_pin = 17" in capsys.readouterr().err
    # Pins set on a machine without GPIO (no mock factory): one sentence, no traceback.
    assert main(["--config", str(gpio_config(write_config)), "gpio", "test", "--timeout", "1"]) != 0
    err = capsys.readouterr().err
    assert "cannot use the GPIO pins" in err and "Traceback" not in err
