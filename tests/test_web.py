"""The local page over plain HTTP: who may see it, what a form needs, what a page never shows.

Flask's test client drives the real application (every gate, header and template); the tests that
are about serving (ports, addresses, the ``web`` command) use a real socket or the real CLI.
The browser tests are in tests/test_web_browser.py.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from agent.config import AgentConfig, load_config
from agent.errors import UserError
from agent.state.accesslog import AccessLog
from agent.state.approvals import ApprovalQueue
from agent.state.killswitch import KillSwitch
from agent.web import create_app, start_web, start_web_in_run
from agent.web.auth import set_password

POLICY = """
[policy]
program = "jackson-ms/camera-pilot-2026"
location = { lat = 32.29876, lon = -90.18481 }
timezone = "America/Chicago"
approval = "ask"

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2030-01-01T00:00:00Z
"""
PASSWORD = "correct horse battery staple"
LAN = "192.168.1.20"
EVIL = "<script>alert('owned')</script>\u202eevil"


def config(write_config, listen: str = "127.0.0.1:0", extra: str = "") -> AgentConfig:
    return load_config(write_config(POLICY + f'\n[web]\nlisten = "{listen}"\n' + extra))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def client_for(cfg: AgentConfig, clock: Clock | None = None, addr: str = LAN) -> FlaskClient:
    return browser_at(create_app(cfg, clock=clock or Clock()), addr)


def browser_at(app: Flask, addr: str) -> FlaskClient:
    """A test client whose requests come from ``addr``."""
    c = app.test_client()
    c.environ_base["REMOTE_ADDR"] = addr
    return c


def csrf(c: FlaskClient, path: str = "/") -> str:
    body = c.get(path).get_data(as_text=True)
    m = re.search(r'name="csrf" value="([^"]+)"', body)
    assert m, body[:500]
    return m.group(1)


ORIGIN = {"Origin": "http://localhost"}


def login(c: FlaskClient, password: str = PASSWORD) -> int:
    token = csrf(c, "/login")
    return c.post("/login", data={"csrf": token, "password": password}, headers=ORIGIN).status_code


def hold_request(cfg: AgentConfig, *, purpose: str = "Package theft reported on Elm Street", n: int = 1) -> int:
    """A request held for the resident, logged as the service logs it (decision first held, then logged)."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(minutes=30)
    jti = f"request-jti-{n:06d}-abcdef"
    item = ApprovalQueue(cfg.paths.state_db).hold(
        raw=b"not-a-jws", jti=jti, iss="jackson-pd", sub="Det. R. Alvarez", case="2026-001234", purpose=purpose,
        granted_start=start, granted_end=start + timedelta(minutes=2), exp=int((now + timedelta(minutes=10)).timestamp()),
        now=now,
    )
    with AccessLog(cfg.paths.state_db) as alog:
        alog.append(jti=jti, iss="jackson-pd", sub="Det. R. Alvarez", case="2026-001234", purpose=purpose,
                    area={"lat": 32.2995, "lon": -90.1838, "radius_m": 300}, requested=(start, start + timedelta(minutes=2)),
                    reason="awaiting_resident", kids=["jpd-test"], granted=(start, start + timedelta(minutes=2)),
                    basis="warrant", warrant={"ref": "W-2026-77", "court": "Hinds County Court"})
    return item.id


# -- who may see the page --------------------------------------------------------------------


def test_off_loopback_every_page_needs_the_password(write_config) -> None:
    cfg = config(write_config, "0.0.0.0:0")
    set_password(cfg.paths.web_password_file, PASSWORD)
    c = client_for(cfg)
    for path in ("/", "/log", "/shared/1", "/shared/1.mp4"):
        r = c.get(path)
        assert r.status_code == 302 and r.headers["Location"].endswith("/login"), path
    assert login(c, "wrong password") == 403
    assert c.get("/").status_code == 302
    assert login(c) == 302
    page = c.get("/").get_data(as_text=True)
    assert "Kill switch" in page and "Waiting for your answer" in page


def test_loopback_with_a_password_set_still_asks_for_it(write_config) -> None:
    cfg = config(write_config)
    set_password(cfg.paths.web_password_file, PASSWORD)
    c = client_for(cfg, addr="127.0.0.1")
    assert c.get("/").headers["Location"].endswith("/login")
    assert login(c) == 302
    assert c.get("/").status_code == 200


def test_loopback_without_a_password_answers_only_to_loopback_names(write_config) -> None:
    cfg = config(write_config)
    c = client_for(cfg, addr="127.0.0.1")
    assert c.get("/").status_code == 200
    # A site that rebinds its own name to 127.0.0.1 cannot read the page through the resident's browser.
    assert c.get("/", headers={"Host": "attacker.example:8765"}).status_code == 421


def test_off_loopback_it_refuses_to_start_without_a_password(write_config, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(write_config, "0.0.0.0:0")
    with pytest.raises(UserError, match="doorbell-agent web password"):
        start_web(cfg)
    # `run` keeps recording and sharing: the page's component only logs why it is not served.
    with caplog.at_level(logging.ERROR, logger="agent.web"):
        comp = start_web_in_run(cfg)
    assert comp.wait(0) is False  # a finished component would stop `run`
    comp.stop()
    assert comp.wait(1)
    assert "local page is NOT served" in caplog.text and "doorbell-agent web password" in caplog.text
    # `web` alone fails with the same message.
    r = cli(cfg, write_config, "web", "--listen", "0.0.0.0:0")
    assert r.returncode == 2 and "doorbell-agent web password" in r.stderr and "Traceback" not in r.stderr


def cli(cfg: AgentConfig, write_config, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    path = Path(cfg.paths.data_dir).parent / "agent.toml"
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(path), *args], capture_output=True,
                          text=True, timeout=60, input=stdin)


def test_a_taken_port_is_a_clear_error(write_config, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = config(write_config, f"127.0.0.1:{port}")
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}.*Another program uses that port"):
            start_web(cfg)
        with caplog.at_level(logging.ERROR, logger="agent.web"):
            comp = start_web_in_run(cfg)
        assert comp.wait(0) is False
        comp.stop()
        assert "Recording and sharing go on without it" in caplog.text
        r = cli(cfg, write_config, "web")
        assert r.returncode == 2 and "Another program uses that port" in r.stderr


def test_password_command_keeps_only_an_argon2_hash(write_config) -> None:
    cfg = config(write_config)
    r = cli(cfg, write_config, "web", "password", "--stdin", stdin="short\n")
    assert r.returncode == 2 and "too short" in r.stderr
    assert not cfg.paths.web_password_file.exists()
    r = cli(cfg, write_config, "web", "password", "--stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    stored = cfg.paths.web_password_file.read_text()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert cfg.paths.web_password_file.stat().st_mode & 0o777 == 0o600
    c = client_for(cfg, addr="127.0.0.1")
    assert login(c) == 302


def test_real_server_serves_with_security_headers_and_stops(write_config) -> None:
    cfg = config(write_config)
    server = start_web(cfg)
    try:
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            body = resp.read().decode()
            headers = resp.headers
        assert "Kill switch" in body
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no script at all
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        with urllib.request.urlopen(server.url + "log", timeout=10) as resp:
            assert resp.headers["Cache-Control"] == "no-store"
    finally:
        server.stop()
    assert server.wait(10)


# -- forms -----------------------------------------------------------------------------------


def test_forms_without_the_right_token_or_from_another_site_change_nothing(write_config) -> None:
    cfg = config(write_config)
    switch = KillSwitch(cfg.paths.killswitch_file)
    c = client_for(cfg, addr="127.0.0.1")
    token = csrf(c)
    attempts = [
        ({"state": "on"}, ORIGIN),  # no token
        ({"state": "on", "csrf": "x" * 43}, ORIGIN),  # a wrong one
        ({"state": "on", "csrf": token}, {"Origin": "http://attacker.example"}),  # right token, foreign page
        ({"state": "on", "csrf": token}, {"Origin": "null"}),
        ({"state": "on", "csrf": token}, {"Referer": "http://attacker.example/page"}),
        ({"state": "on", "csrf": token}, {}),  # says nothing about where it came from
    ]
    for data, headers in attempts:
        r = c.post("/killswitch", data=data, headers=headers)
        assert r.status_code == 403, (data, headers)
        assert "Nothing was changed" in r.get_data(as_text=True)
        assert not switch.engaged
    # Another session's token does not work either.
    other = client_for(cfg, addr="127.0.0.1")
    assert other.post("/killswitch", data={"state": "on", "csrf": token}, headers=ORIGIN).status_code == 403
    assert not switch.engaged
    r = c.post("/killswitch", data={"state": "on", "csrf": token}, headers={"Referer": "http://localhost/"})
    assert r.status_code == 302 and switch.engaged
    assert "homeowner (local page, from 127.0.0.1)" in switch.state().reason
    page = c.get("/").get_data(as_text=True)
    assert "The kill switch is ON" in page


def test_get_never_changes_anything(write_config) -> None:
    cfg = config(write_config)
    approval = hold_request(cfg)
    c = client_for(cfg, addr="127.0.0.1")
    with AccessLog(cfg.paths.state_db) as alog:
        before = alog.head()
    paths = ["/", "/log", "/log?decision=waiting", "/login", "/killswitch?state=on", f"/approvals/{approval}?answer=approve",
             f"/approvals/{approval}", "/consent/withdraw", "/logout", "/shared/1", "/shared/1.mp4"]
    codes = {p: c.get(p).status_code for p in paths}
    assert codes["/killswitch?state=on"] == 405 and codes[f"/approvals/{approval}?answer=approve"] == 405
    assert codes["/logout"] == 405 and codes["/consent/withdraw"] == 405
    assert not KillSwitch(cfg.paths.killswitch_file).engaged
    assert [p.id for p in ApprovalQueue(cfg.paths.state_db).pending(datetime.now(UTC))] == [approval]
    with AccessLog(cfg.paths.state_db) as alog:
        assert alog.head() == before


def test_session_ends_after_the_idle_time(write_config) -> None:
    cfg = config(write_config, "0.0.0.0:0", extra="session_minutes = 5\n")
    set_password(cfg.paths.web_password_file, PASSWORD)
    clock = Clock()
    c = client_for(cfg, clock)
    assert login(c) == 302
    clock.t += 4 * 60
    assert c.get("/").status_code == 200  # activity restarts the idle time
    clock.t += 4 * 60
    assert c.get("/").status_code == 200
    clock.t += 5 * 60 + 1
    r = c.get("/")
    assert r.status_code == 302 and r.headers["Location"].endswith("/login")


def test_logout_ends_the_session(write_config) -> None:
    cfg = config(write_config, "0.0.0.0:0")
    set_password(cfg.paths.web_password_file, PASSWORD)
    c = client_for(cfg)
    assert login(c) == 302
    token = csrf(c)
    assert c.post("/logout", data={"csrf": token}, headers=ORIGIN).status_code == 302
    assert c.get("/").headers["Location"].endswith("/login")


def test_wrong_passwords_are_limited_per_address_and_logged(write_config, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(write_config, "0.0.0.0:0")
    set_password(cfg.paths.web_password_file, PASSWORD)
    clock = Clock()
    app = create_app(cfg, clock=clock)
    guesser = browser_at(app, "10.0.0.7")
    with caplog.at_level(logging.WARNING, logger="agent.web"):
        for i in range(5):
            assert login(guesser, f"guess-number-{i}") == 403
        assert login(guesser, PASSWORD) == 429  # even the right one is not checked now
    assert "wrong password from 10.0.0.7 (5 in the last 15 minutes)" in caplog.text
    assert "login from 10.0.0.7 refused without checking" in caplog.text
    assert "guess-number" not in caplog.text and PASSWORD not in caplog.text
    # The resident on another device is not locked out.
    resident = browser_at(app, LAN)
    assert login(resident) == 302
    clock.t += 15 * 60 + 1
    assert login(guesser) == 302


# -- what pages show -------------------------------------------------------------------------


def test_no_secret_appears_in_any_page(write_config) -> None:
    broker_password = "broker-secret-8c1f2e"
    cfg = load_config(write_config(POLICY + '\n[web]\nlisten = "0.0.0.0:0"\n\n[mqtt]\nhost = "broker.example"\n'
                                   f'username = "agent"\npassword = "{broker_password}"\n'))
    set_password(cfg.paths.web_password_file, PASSWORD)
    hold_request(cfg)
    c = client_for(cfg)
    login_page = c.get("/login").get_data(as_text=True)
    assert login(c) == 302
    stored_hash = cfg.paths.web_password_file.read_text().strip()
    cookie = c.get_cookie("doorbell_session")
    assert cookie is not None
    pages = [login_page] + [c.get(p).get_data(as_text=True) for p in ("/", "/log", "/log?decision=waiting")]
    for body in pages:
        for secret in (broker_password, PASSWORD, stored_hash, stored_hash.split("$")[-1], cookie.value):
            assert secret not in body
    assert "broker.example" in pages[1]  # the broker is shown, its password is not


def test_agency_text_is_shown_inert(write_config) -> None:
    cfg = config(write_config)
    hold_request(cfg, purpose=EVIL)
    c = client_for(cfg, addr="127.0.0.1")
    for path in ("/", "/log"):
        body = c.get(path).get_data(as_text=True)
        assert "<script>" not in body and "\u202e" not in body, path
        assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;\\u202eevil" in body, path


def test_pending_request_shows_what_would_be_shared(write_config) -> None:
    cfg = config(write_config)
    approval = hold_request(cfg)
    c = client_for(cfg, addr="127.0.0.1")
    body = c.get("/").get_data(as_text=True)
    for words in (f"Request {approval} from jackson-pd", "(2 minutes)", "Det. R. Alvarez", "2026-001234",
                  "Package theft reported on Elm Street", "W-2026-77 (Hinds County Court)", "warrant",
                  "a circle of 300 m around a point", "jpd-test (not in your trust store now)"):
        assert words in body, words
    assert re.search(r"Footage</dt><dd>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d C[SD]T to", body)  # the resident's zone
    token = csrf(c)
    r = c.post(f"/approvals/{approval}", data={"csrf": token, "answer": "decline"}, headers=ORIGIN)
    assert r.status_code == 302
    assert ApprovalQueue(cfg.paths.state_db).get(approval).state == "declined_by_resident"  # type: ignore[union-attr]
    assert "Declined request" in c.get("/").get_data(as_text=True)


def test_an_unreadable_kill_switch_counts_as_on(write_config) -> None:
    cfg = config(write_config)
    cfg.paths.killswitch_file.parent.mkdir(parents=True, exist_ok=True)
    cfg.paths.killswitch_file.write_text("{not json")
    c = client_for(cfg, addr="127.0.0.1")
    body = c.get("/").get_data(as_text=True)
    assert re.search(r"Kill switch: <span class=\"state\">ON</span>", body)
    assert "treated as engaged" in body and "counts as ON" in body
    assert "Nothing can be shared now" in body


def test_log_filters(write_config) -> None:
    cfg = config(write_config)
    hold_request(cfg, n=1)
    with AccessLog(cfg.paths.state_db) as alog:
        start = datetime.now(UTC) - timedelta(hours=1)
        alog.append(jti="other-agency-request-0001", iss="hinds-so", sub="Dep. K. Moore", case="HSO-55",
                    purpose="Stolen car", area={"lat": 32.2995, "lon": -90.1838, "radius_m": 200},
                    requested=(start, start + timedelta(minutes=5)), reason="window_too_long", kids=["hso-1"])
    c = client_for(cfg, addr="127.0.0.1")
    everything = c.get("/log").get_data(as_text=True)
    assert "hinds-so" in everything and "jackson-pd" in everything
    only_hinds = c.get("/log?agency=hinds-so").get_data(as_text=True)
    assert "Stolen car" in only_hinds and "Elm Street" not in only_hinds
    refused = c.get("/log?decision=refused").get_data(as_text=True)
    assert "Stolen car" in refused and "Elm Street" not in refused
    tomorrow = (datetime.now(UTC) + timedelta(days=2)).date().isoformat()
    assert "No entry matches" in c.get(f"/log?from={tomorrow}").get_data(as_text=True)
    r = c.get("/log?from=yesterday")
    assert r.status_code == 400 and "is not a date" in r.get_data(as_text=True)


def test_withdrawing_consent_from_the_page_blocks_sharing_and_is_logged(write_config) -> None:
    cfg = config(write_config)
    c = client_for(cfg, addr="127.0.0.1")
    assert "Withdraw my consent" in c.get("/").get_data(as_text=True)
    r = c.post("/consent/withdraw", data={"csrf": csrf(c)}, headers=ORIGIN)
    assert r.status_code == 302
    body = c.get("/").get_data(as_text=True)
    assert "You withdrew your consent" in body and "Nothing can be shared now" in body
    with AccessLog(cfg.paths.state_db) as alog:
        (entry,) = [e for e in alog.entries() if e.type == "resident"]
    assert entry.data["by"] == "homeowner (local page, from 127.0.0.1)"


def test_a_new_password_ends_every_session(write_config) -> None:
    cfg = config(write_config, "0.0.0.0:0")
    set_password(cfg.paths.web_password_file, PASSWORD)
    c = client_for(cfg)
    assert login(c) == 302
    assert c.get("/").status_code == 200
    set_password(cfg.paths.web_password_file, "a different password now")
    assert c.get("/").headers["Location"].endswith("/login")
    assert login(c, "a different password now") == 302


def test_run_serves_the_page_unless_turned_off(write_config) -> None:
    from agent.runtime.supervisor import components_for

    assert start_web_in_run in components_for(config(write_config))
    assert start_web_in_run not in components_for(config(write_config, extra="enabled = false\n"))


def test_web_command_serves_until_stopped(write_config) -> None:
    import signal

    cfg = config(write_config)
    path = Path(cfg.paths.data_dir).parent / "agent.toml"
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(path), "web"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the socket listens
        m = re.search(r"at (http://127\.0\.0\.1:\d+/) \(not recording\)", line)
        assert m, line + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        with urllib.request.urlopen(m.group(1), timeout=10) as resp:
            assert "Kill switch" in resp.read().decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
