"""The local page in a real browser (Debian's chromium through Playwright), against a real agent.

One walk through what a resident does: log in, approve a held request and see it delivered (a real
sharing service, a real Mosquitto broker, the reference agency client collecting the delivery),
watch what was shared, turn the kill switch on and off and see ``doorbell-agent killswitch status``
follow, decline a second request, filter the log. Screenshots at phone and desktop width go to
``docs/screenshots/`` with ``DOORBELL_UPDATE_SCREENSHOTS=1`` (the README shows them), else to the
test's temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent.config import load_config
from agent.state.accesslog import AccessLog
from agent.timeutil import set_display_zone
from agent.web import WebServer, start_web
from agent.web.auth import set_password
from tests.broker import Broker
from tests.test_service import WAIT, Agency, Agent, Env, _policy_toml, home_topic, make_env, stopped_afterwards

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PASSWORD = "a long password for the porch"
REPO = Path(__file__).resolve().parent.parent

if not CHROMIUM.exists():
    pytest.skip("the browser tests need Debian's chromium at /usr/bin/chromium (install.sh --dev installs it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (pip install -e .[test])")


@pytest.fixture
def env(tmp_path: Path, write_config, broker: Broker) -> Env:
    env = make_env(tmp_path, write_config, broker)
    # Held for the resident, and the page on a free loopback port (with a password: it must still ask).
    # The service runs on a fixed clock; the page reads this machine's, which a test machine may not sync.
    cfg = load_config(write_config(_policy_toml("ask") + '\n[web]\nlisten = "127.0.0.1:0"\n'
                                   '\n[clock]\nassume_synced = true\n'))
    env.cfg = cfg.model_copy(update={"mqtt": env.cfg.mqtt})
    set_password(env.cfg.paths.web_password_file, PASSWORD)
    return env


@pytest.fixture
def agents(env: Env) -> Iterator[list[Agent]]:
    yield from stopped_afterwards()


@pytest.fixture
def agency(env: Env) -> Iterator[Agency]:
    a = Agency(env, "jpd")
    yield a
    a.close()


@pytest.fixture
def server(env: Env) -> Iterator[WebServer]:
    # As `doorbell-agent run` and `web` do on loading the configuration (agent.cli.common.config_from).
    set_display_zone(ZoneInfo(env.cfg.require_policy().timezone))
    s = start_web(env.cfg)
    yield s
    s.stop()
    set_display_zone(None)
    assert s.wait(WAIT)
    assert not list(env.cfg.paths.data_dir.glob("web-clips-*"))  # the clip cut for the page is not kept


@pytest.fixture
def page(server: WebServer) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        pg = context.new_page()
        pg.set_default_timeout(WAIT * 1000)
        yield pg
        context.close()
        browser.close()


def killswitch_status(env: Env) -> bool:
    """What the real command says, run with the same configuration file."""
    config = env.cfg.paths.data_dir.parent / "agent.toml"
    r = subprocess.run([sys.executable, "-m", "agent", "--config", str(config), "killswitch", "status", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return bool(json.loads(r.stdout)["engaged"])


def screenshot_dir(tmp_path: Path) -> Path:
    if os.environ.get("DOORBELL_UPDATE_SCREENSHOTS") == "1":
        out = REPO / "docs" / "screenshots"
    else:
        out = Path(os.environ.get("DOORBELL_TEST_ARTIFACTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def logged(env: Env, jti: str, outcome: str) -> bool:
    with AccessLog(env.cfg.paths.state_db) as alog:
        return any(e.outcome == outcome for e in alog.entries(jti=jti))


def test_a_resident_answers_requests_and_controls_sharing_from_the_page(
        env: Env, agents: list[Agent], agency: Agency, server: WebServer, page: Any, tmp_path: Path) -> None:
    expect = sync_api.expect
    agents.append(agent := Agent(env))
    first = agency.request(purpose="Package stolen from a porch on this block.")
    agency.publish(first, [home_topic(env)])
    assert agent.next_decision().reason == "awaiting_resident"

    # Log in (loopback, but a password is set: the page asks for it).
    page.goto(server.url)
    expect(page).to_have_title("Log in · Doorbell agent")
    page.fill("#password", PASSWORD)
    page.click("button:has-text('Log in')")
    expect(page.locator("#pending h2")).to_have_text("Waiting for your answer (1)")
    held = page.locator("#pending article")
    expect(held).to_contain_text("Package stolen from a porch on this block.")
    expect(held).to_contain_text("(10 seconds)")
    expect(held).to_contain_text("jackson-pd")

    # Approve: the running agent delivers, the agency receives it, the log says so.
    held.locator("button:has-text('Approve')").click()
    expect(page.locator(".msg.ok")).to_contain_text("Approved request")
    agency.collect(first.jti)
    assert agent.wait_delivery_end(first.jti)[0] == "delivered"
    page.goto(server.url + "log")
    delivered = page.locator("li.entry", has_text="the footage was delivered")
    expect(delivered).to_have_count(1)
    expect(page.locator("li.entry", has_text="Package stolen from a porch")).to_have_count(1)
    expect(page.locator("#fingerprint")).to_contain_text("Newest entry's hash")

    # Watch exactly what was shared: the browser plays the clip cut from the buffer.
    delivered.locator("a:has-text('Watch what was shared')").click()
    video = page.locator("video")
    expect(video).to_have_count(1)
    page.wait_for_function("() => document.querySelector('video').readyState >= 1", timeout=WAIT * 1000)
    duration = page.evaluate("document.querySelector('video').duration")
    assert 9.0 <= duration <= 10.5, duration  # the 10 s granted window, to within a frame
    assert page.evaluate("document.querySelector('video').videoWidth") > 0
    assert len(list(env.cfg.paths.data_dir.glob("web-clips-*/*.mp4"))) == 1

    # The kill switch, on and off; the real command sees each change.
    page.goto(server.url)
    assert killswitch_status(env) is False
    page.click("button:has-text('Turn the kill switch ON')")
    expect(page.locator("#killswitch .state")).to_have_text("ON")
    assert killswitch_status(env) is True
    page.click("button:has-text('Turn the kill switch off')")
    expect(page.locator("#killswitch .state")).to_have_text("off")
    assert killswitch_status(env) is False

    # A second request: shown, pictured at phone and desktop width, then declined.
    second = agency.request(purpose="Hit-and-run at the corner of Elm and 3rd.")
    agency.publish(second, [home_topic(env)])
    assert agent.next_decision().reason == "awaiting_resident"
    page.goto(server.url)
    expect(page.locator("#pending h2")).to_have_text("Waiting for your answer (1)")
    expect(page.locator("#sharing h1")).to_have_text("Sharing is possible")
    shots = screenshot_dir(tmp_path)
    page.screenshot(path=str(shots / "desktop.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(shots / "phone.png"), full_page=False)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    page.set_viewport_size({"width": 1280, "height": 800})
    page.locator("#pending article").locator("button:has-text('Decline')").click()
    expect(page.locator(".msg.ok")).to_contain_text("Declined request")
    expect(page.locator("#pending h2")).to_have_text("Waiting for your answer (0)")
    deadline = time.monotonic() + WAIT  # the service logs the answer on its next round
    while not logged(env, second.jti, "declined_by_resident"):
        assert time.monotonic() < deadline, "the decline never reached the access log"
        time.sleep(0.1)

    # Filter the log: refused requests of this agency only.
    page.goto(server.url + "log")
    page.select_option("select[name=agency]", "jackson-pd")
    page.select_option("select[name=decision]", "refused")
    page.click("button:has-text('Show')")
    expect(page).to_have_url(f"{server.url}log?agency=jackson-pd&decision=refused&from=&to=")
    rows = page.locator("li.entry")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("you declined it")
    page.select_option("select[name=decision]", "granted")
    page.click("button:has-text('Show')")
    expect(page.locator("li.entry", has_text="the footage was delivered")).to_have_count(1)
    expect(page.locator("li.entry", has_text="you declined it")).to_have_count(0)
    page.screenshot(path=str(shots / "log-desktop.png"), full_page=True)
