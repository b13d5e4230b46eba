"""Webhook notifications ([notify]): a real HTTP server on loopback receives what a phone would show.

The events come the way they do in the agent: entries in a real access log (SQLite), the kill switch
turned through the same function as the command line, read back by the watcher from disk.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent.config import AgentConfig, NotifyConfig, load_config
from agent.homeowner import start_homeowner
from agent.homeowner.events import HomeEvent, Watcher
from agent.homeowner.webhook import Webhook
from agent.protocol.geohash import encode
from agent.runtime.controls import set_kill_switch
from agent.state.accesslog import AccessLog

HOME = (32.29876, -90.18481)
WAIT = 10.0


def policy_toml(extra: str = "") -> str:
    return f"""
[policy]
program = "jackson-ms/camera-pilot-2026"
location = {{ lat = {HOME[0]}, lon = {HOME[1]} }}
timezone = "America/Chicago"
approval = "ask"

[policy.consent]
start = 2026-01-01T00:00:00Z
end = 2030-01-01T00:00:00Z
{extra}
"""


def location_markers(cfg: AgentConfig) -> list[str]:
    """Every way the camera's place could show up in a payload: coordinates, rounded, and geohashes."""
    loc = cfg.require_policy().location
    marks = {repr(loc.lat), repr(loc.lon), f"{loc.lat:.2f}", f"{loc.lon:.2f}", f"{loc.lat:.3f}", f"{loc.lon:.3f}"}
    marks |= {encode(loc.lat, loc.lon, p) for p in range(4, 10)}
    return sorted(marks)


def assert_no_location(text: str, cfg: AgentConfig) -> None:
    for mark in location_markers(cfg):
        assert mark not in text, f"{mark!r} (the camera's location) appears in {text!r}"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def everything(self) -> str:
        return self.path + "\n" + json.dumps(self.headers) + "\n" + self.body.decode("utf-8")


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST; ``status`` and ``delay`` shape its answer."""

    def __init__(self) -> None:
        self.got: queue.Queue[Received] = queue.Queue()
        self.status = 200
        self.delay = 0.0
        self.release = threading.Event()  # set to cut a delay short
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.got.put(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                if outer.delay:
                    outer.release.wait(outer.delay)
                self.send_response(outer.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # a client that gave up
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook/secret-id"

    def next(self, timeout: float = WAIT) -> Received:
        return self.got.get(timeout=timeout)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def make_cfg(write_config: Callable[[str], Path]) -> Callable[..., AgentConfig]:
    def make(url: str, **notify: Any) -> AgentConfig:
        cfg = load_config(write_config(policy_toml()))
        return cfg.model_copy(update={"notify": NotifyConfig(url=url, **notify)})

    return make


def held_request(alog: AccessLog, jti: str, *, minutes: int = 10) -> int:
    """A request held for the resident's answer, logged as the service logs it (its area near the camera)."""
    start = datetime(2026, 12, 3, 17, 0, tzinfo=UTC)
    seq, _ = alog.append(jti=jti, iss="jackson-pd", sub="badge-4471", case="JPD-2026-001234",
                         purpose="Burglary reported on this block.",
                         area={"lat": HOME[0] + 0.001, "lon": HOME[1] + 0.001, "radius_m": 300},
                         requested=(start, start + timedelta(minutes=minutes)),
                         granted=(start, start + timedelta(minutes=minutes)), reason="awaiting_resident", kids=["jpd-1"])
    return seq


def test_events_reach_the_webhook_as_json_without_the_location(make_cfg, receiver: Receiver) -> None:
    cfg = make_cfg(receiver.url, token="tk_secret")
    cfg.paths.data_dir.mkdir(parents=True)
    with AccessLog(cfg.paths.state_db) as alog:
        held_request(alog, "old-request-0000000001")  # history: never notified
        comp = start_homeowner(cfg, poll_s=0.1)
        assert comp is not None
        try:
            held_request(alog, "new-request-0000000002", minutes=10)
            got = receiver.next()
            body = got.json()
            assert body["event"] == "held_for_approval"
            assert body["title"] == "Footage request waiting for your answer"
            assert "jackson-pd asks for 10 min 0 s of footage" in body["message"]
            assert "doorbell-agent pending" in body["message"]
            assert body["agency"] == "jackson-pd" and body["footage_s"] == 600
            assert datetime.fromisoformat(body["at"].replace("Z", "+00:00")).tzinfo is not None
            assert got.headers["content-type"] == "application/json"
            assert got.headers["authorization"] == "Bearer tk_secret"
            assert got.path == "/hook/secret-id"
            assert_no_location(got.everything(), cfg)

            alog.append_event("new-request-0000000002", "approved",
                              granted=(datetime(2026, 12, 3, 17, 0, tzinfo=UTC), datetime(2026, 12, 3, 17, 5, tzinfo=UTC)))
            alog.append_event("new-request-0000000002", "delivered", bytes=12345, chunks=3,
                              granted=(datetime(2026, 12, 3, 17, 0, tzinfo=UTC), datetime(2026, 12, 3, 17, 5, tzinfo=UTC)))
            approved, delivered = receiver.next(), receiver.next()
            assert approved.json()["event"] == "approved" and approved.json()["footage_s"] == 300
            assert delivered.json()["event"] == "delivered"
            assert delivered.json()["message"].startswith("5 min 0 s of footage was delivered to jackson-pd.")

            # The kill switch, turned from "another process" (the command line's function, on disk).
            set_kill_switch(cfg, True, by="homeowner (command line, user pi on doorbell)")
            on = receiver.next().json()
            assert on["event"] == "kill_switch_on" and on["by"] == "homeowner (command line, user pi on doorbell)"
            set_kill_switch(cfg, False, by="homeowner (local page)")
            off = receiver.next().json()
            assert off["event"] == "kill_switch_off" and "local page" in off["message"]
            for r in (approved, delivered):
                assert_no_location(r.everything(), cfg)
        finally:
            comp.stop()
            assert comp.wait(WAIT)
    assert receiver.got.empty(), "the old request was notified, or something twice"


def test_ntfy_format_is_a_plain_message_with_a_title_header(make_cfg, receiver: Receiver) -> None:
    """ntfy shows the body as the message and the Title header as its title (https://docs.ntfy.sh/publish/)."""
    cfg = make_cfg(receiver.url, format="ntfy")
    assert cfg.notify is not None
    hook = Webhook(cfg.notify, tz=ZoneInfo(cfg.require_policy().timezone))
    try:
        hook.on_event(HomeEvent("held_for_approval", datetime(2026, 12, 3, 17, 0, tzinfo=UTC), agency="jackson-pd",
                                footage_s=90))
        got = receiver.next()
        assert got.headers["title"] == "Footage request waiting for your answer"
        assert got.headers["content-type"].startswith("text/plain")
        assert got.headers["priority"] == "high"
        assert "authorization" not in got.headers
        text = got.body.decode("utf-8")
        assert text.startswith("jackson-pd asks for 1 min 30 s of footage.")
        assert text.endswith("(2026-12-03 11:00 CST)")  # the resident's local time
        assert_no_location(got.everything(), cfg)
    finally:
        hook.close()


def test_refusals_are_not_notified(make_cfg, receiver: Receiver) -> None:
    """A refusal is not worth a phone buzz (anyone with an agency key could cause thousands)."""
    cfg = make_cfg(receiver.url)
    hook = Webhook(cfg.notify)  # type: ignore[arg-type]
    try:
        at = datetime(2026, 12, 3, 17, 0, tzinfo=UTC)
        hook.on_event(HomeEvent("refused", at, agency="jackson-pd", reason="outside_geofence"))
        hook.on_event(HomeEvent("kill_switch_on", at, by="homeowner (button on GPIO17)"))
        assert receiver.next().json()["event"] == "kill_switch_on"  # the first one sent
    finally:
        hook.close()
    assert receiver.got.empty()


def test_a_failing_receiver_is_logged_and_never_blocks(make_cfg, receiver: Receiver, caplog) -> None:
    caplog.set_level(logging.INFO, logger="agent.homeowner.webhook")
    cfg = make_cfg(receiver.url, timeout_s=0.5)
    hook = Webhook(cfg.notify, queue_size=2)  # type: ignore[arg-type]
    at = datetime(2026, 12, 3, 17, 0, tzinfo=UTC)
    try:
        receiver.status = 500
        assert hook.send(HomeEvent("kill_switch_on", at, by="x")) is False
        receiver.next()
        assert "could not notify http://127.0.0.1" in caplog.text and "500" in caplog.text
        assert "secret-id" not in caplog.text, "the webhook's secret path must not be logged"

        # A receiver that hangs: each message costs at most timeout_s, and on_event never waits.
        receiver.status, receiver.delay = 200, 30.0
        started = time.monotonic()
        for _ in range(10):
            hook.on_event(HomeEvent("kill_switch_on", at, by="x"))
        assert time.monotonic() - started < 0.5
        assert hook.dropped >= 7  # one in flight, two queued, the rest dropped with a log line
        assert "dropped" in caplog.text
        failed_before, kept = hook.failed, 10 - hook.dropped
        for _ in range(kept):
            receiver.next()  # each arrives in turn, hangs, and is given up after timeout_s
        hook.close(timeout=WAIT)  # returns once the queue is worked off
        assert hook.failed == failed_before + kept and "TimeoutError" in caplog.text
        assert receiver.got.empty()
    finally:
        receiver.release.set()
        hook.close()


def test_nobody_listening_is_a_log_line(make_cfg, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.homeowner.webhook")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    hook = Webhook(make_cfg(f"http://127.0.0.1:{port}/x").notify)
    try:
        assert hook.send(HomeEvent("kill_switch_off", datetime.now(UTC), by="x")) is False
        assert "could not notify" in caplog.text and "refused" in caplog.text.lower()
    finally:
        hook.close()


def test_the_watcher_starts_from_the_log_head(make_cfg, receiver: Receiver) -> None:
    cfg = make_cfg(receiver.url)
    cfg.paths.data_dir.mkdir(parents=True)
    seen: list[HomeEvent] = []
    with AccessLog(cfg.paths.state_db) as alog:
        for i in range(3):
            held_request(alog, f"old-request-{i:010d}")
        w = Watcher(cfg, [])
        w.poll(initial=True)
        assert w.state is not None and w.state.last_request is not None
        assert w.state.last_request.kind == "held_for_approval"  # the sensor shows the latest at once...

        class Collect:
            def on_state(self, state: Any) -> None:
                pass

            def on_event(self, event: HomeEvent) -> None:
                seen.append(event)

        w.subscribers.append(Collect())
        w.poll()
        assert seen == []  # ...but nothing old is news
        held_request(alog, "new-request-0000000001")
        w.poll()
        assert [e.kind for e in seen] == ["held_for_approval"]
        w.stop()
        assert w.wait(1)


def test_run_starts_the_homeowner_part_only_when_configured(make_cfg, write_config) -> None:
    from agent.homeowner import homeowner_component
    from agent.runtime.supervisor import components_for

    assert homeowner_component in components_for(make_cfg("http://127.0.0.1:9/x"))
    assert homeowner_component not in components_for(load_config(write_config(policy_toml())))


def test_run_notifies_a_change_made_by_the_command_line_in_another_process(make_cfg, receiver: Receiver,
                                                                          tmp_path: Path) -> None:
    """The ``run`` supervisor with the homeowner part; ``doorbell-agent killswitch on`` typed in another process."""
    import subprocess
    import sys

    from agent.homeowner import homeowner_component
    from agent.runtime.supervisor import run_components

    cfg = make_cfg(receiver.url)
    path = tmp_path / "agent.toml"
    path.write_text(path.read_text() + f'\n[notify]\nurl = "{receiver.url}"\n')
    stop, started = threading.Event(), threading.Event()
    result: list[int] = []

    def homeowner_then_tell(c: AgentConfig) -> Any:
        comp = homeowner_component(c)
        started.set()
        return comp

    runner = threading.Thread(target=lambda: result.append(run_components(cfg, [homeowner_then_tell], stop)))
    runner.start()
    try:
        assert started.wait(WAIT)
        out = subprocess.run([sys.executable, "-m", "agent", "--config", str(path), "killswitch", "on"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        body = receiver.next().json()
        assert body["event"] == "kill_switch_on" and body["by"].startswith("homeowner (command line")
    finally:
        stop.set()
        runner.join(WAIT)
    assert result == [0]
