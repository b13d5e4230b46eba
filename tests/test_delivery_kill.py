"""``kill -9`` of the real ``doorbell-agent run`` in the middle of a delivery, then a restart.

The agent runs in a subprocess (a real TLS Mosquitto, a buffer of real H.264, a trusted agency key); the
agency is the reference client. A signed request for 40 s of footage is granted; the agent is killed
with SIGKILL at a point of the delivery seen from outside (the grant on the access log; the manifest at
the agency; the k-th chunk at the agency) and started again. What the agency and the resident check:

- the agency ends up with exactly one complete delivery that opens and verifies (``open_delivery``), or
  the access log closes the grant with ``delivery_failed``/``delivery_refused``; never two complete
  deliveries with different delivery ids for one grant (chunks of the same delivery sent again are fine);
- the grant gets a closing event once the restarted agent has run long enough;
- ``log verify`` passes.

In-process restarts (``svc.stop()``) are covered in tests/test_service.py and tests/test_delivery_faults.py;
broker restarts during a delivery and requests sent while the agent is offline there and in
tests/test_transport.py. This file adds the SIGKILL of the whole process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from agent.city import open_delivery
from agent.city.receive import DeliveryCollector
from agent.state.accesslog import AccessLog
from tests.broker import Broker
from tests.mqtt_proxy import MqttProxy, SeenPacket
from tests.test_service import Agency, Env, home_topic, make_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CLOSING = ("delivered", "delivery_failed", "delivery_refused")


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_config(env: Env, path: Path, proxy: MqttProxy) -> Path:
    """The env's agent.toml plus the camera, the clock, and the broker reached through ``proxy``."""
    m = env.broker.mqtt_config("agent", plaintext=True, precision=4, client_id=env.client_id, port=proxy.port)
    mqtt = "\n".join(f"{k} = {toml_value(v)}" for k, v in m.model_dump(exclude_none=True).items()
                     if isinstance(v, str | int | float | bool | Path))
    text = path.read_text() + f"""
[camera]
source = "synthetic"
width = 320
height = 240
fps = 10

[clock]
assume_synced = true  # this machine's clock is right but not reported synchronized

[mqtt]
{mqtt}
"""
    path.write_text(text)
    return path


def start(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))


def outcomes(env: Env, jti: str) -> list[str]:
    with AccessLog(env.cfg.paths.state_db) as alog:
        return [e.outcome for e in alog.entries(jti=jti)]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("kill_at", ["grant", "manifest", "chunk 1"])
def test_kill_9_during_a_delivery_ends_in_one_delivery_or_a_logged_failure(
        tmp_path: Path, write_config: Callable[[str], Path], broker: Broker, kill_at: str) -> None:
    env = make_env(tmp_path, write_config, broker)
    proxy = MqttProxy(broker.plain_port)
    proxy.accept()
    proxy.down_delay_s = 0.3  # every PUBACK takes 300 ms to come back: the delivery takes a few seconds
    cfg = run_config(env, tmp_path / "agent.toml", proxy)
    log = tmp_path / "agent.log"
    agency = Agency(env, "kill9")
    collector: DeliveryCollector | None = None
    proc = start(cfg, log)
    try:
        wait_for(lambda: "subscribed to" in log.read_text() or proc.poll() is not None, 60, "the agent to subscribe")
        now = env.clock.now()
        built = agency.request(window=(now - timedelta(seconds=50), now - timedelta(seconds=10)))
        collector = DeliveryCollector(env.broker.root, built.jti)
        agency.publish(built, [home_topic(env)])
        t0 = time.monotonic()
        if kill_at == "grant":
            wait_for(lambda: "granted" in outcomes(env, built.jti), 30, "the grant on the access log")
            proc.send_signal(signal.SIGKILL)
        else:  # the moment the agent sends that message (seen by the proxy), before its PUBACK
            target, victim = ("/manifest" if kill_at == "manifest" else "/" + kill_at.split()[1]), proc

            def kill_on(p: SeenPacket) -> None:
                if p.kind == 3 and p.topic is not None and f"/deliveries/{built.jti}/" in p.topic \
                        and p.topic.endswith(target):
                    victim.send_signal(signal.SIGKILL)

            proxy.on_packet = kill_on
        proc.wait(30)
        proxy.on_packet = None
        at_kill = outcomes(env, built.jti)
        print(f"killed at {kill_at} {time.monotonic() - t0:.2f} s after the publish; log then: {at_kill}")
        assert at_kill == ["granted"], "the kill did not land inside the delivery"
        proc = start(cfg, log)
        # Everything the agency receives from now on, until the grant has a closing event.
        deadline = time.monotonic() + 90
        while not any(o in CLOSING for o in outcomes(env, built.jti)):
            assert time.monotonic() < deadline, f"no closing event: {outcomes(env, built.jti)}\n" + log.read_text()
            assert proc.poll() is None, log.read_text()[-3000:]
            msg = agency.session.next_message(0.5)
            if msg is not None:
                collector.add(msg.topic, msg.payload)
        while (msg := agency.session.next_message(2.0)) is not None:  # what was still on its way
            collector.add(msg.topic, msg.payload)
        closing = [o for o in outcomes(env, built.jti) if o in CLOSING]
        complete = [p for p in collector.pending.values() if p.complete and p.manifest]
        print(f"closing events {closing}; deliveries seen {len(collector.pending)}, complete {len(complete)}; "
              f"{time.monotonic() - t0:.1f} s from the publish")
        assert len(closing) == 1, outcomes(env, built.jti)
        assert len(complete) <= 1, "two complete deliveries for one grant"
        if closing == ["delivered"]:
            assert len(complete) == 1
            opened = open_delivery(complete[0].manifest or "", complete[0].chunks, built.recipient_private, built.jti)
            assert opened.granted[1] - opened.granted[0] == timedelta(seconds=40)
        else:
            assert not complete, "a delivery logged as failed reached the agency whole"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        out = subprocess.run([sys.executable, "-m", "agent", "--config", str(cfg), "log", "verify"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "intact" in out.stdout, out.stdout + out.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        agency.close()
        proxy.close()


def sigkill_broker(broker: Broker) -> None:
    """What a power cut or the OOM killer does to Mosquitto: no goodbye, no last save of its sessions."""
    proc = broker._proc  # noqa: SLF001 - the fixture has no SIGKILL of its own
    if proc is not None:
        proc.kill()


def test_broker_killed_during_a_delivery_and_while_idle(tmp_path: Path, write_config: Callable[[str], Path],
                                                        broker: Broker) -> None:
    env = make_env(tmp_path, write_config, broker)
    proxy = MqttProxy(broker.plain_port)
    proxy.accept()
    proxy.down_delay_s = 0.3
    cfg = run_config(env, tmp_path / "agent.toml", proxy)
    log = tmp_path / "agent.log"
    agency = Agency(env, "brokerkill", clean_start=False)  # its subscription must outlive the broker's restart
    proc = start(cfg, log)
    try:
        wait_for(lambda: "subscribed to" in log.read_text() or proc.poll() is not None, 60, "the agent to subscribe")
        time.sleep(3.0)  # Mosquitto saves its sessions every 2 s (autosave_interval); a SIGKILL loses the rest
        # 1. SIGKILL of the broker the moment the agent sends chunk 1 of a delivery.
        now = env.clock.now()
        built = agency.request(window=(now - timedelta(seconds=50), now - timedelta(seconds=10)))
        collector = DeliveryCollector(env.broker.root, built.jti)
        killed: list[float] = []

        def kill_on(p: SeenPacket) -> None:
            if not killed and p.kind == 3 and p.topic is not None and f"/deliveries/{built.jti}/" in p.topic \
                    and p.topic.endswith("/1"):
                killed.append(time.monotonic())
                sigkill_broker(broker)

        proxy.on_packet = kill_on
        agency.publish(built, [home_topic(env)])
        wait_for(lambda: killed, 30, "chunk 1 on its way")
        proxy.on_packet = None
        broker.stop()
        broker.start()
        deadline = time.monotonic() + 90
        while not any(o in CLOSING for o in outcomes(env, built.jti)):
            assert time.monotonic() < deadline, f"no closing event: {outcomes(env, built.jti)}"
            msg = agency.session.next_message(0.5)
            if msg is not None:
                collector.add(msg.topic, msg.payload)
        while (msg := agency.session.next_message(3.0)) is not None:
            collector.add(msg.topic, msg.payload)
        complete = [p for p in collector.pending.values() if p.complete and p.manifest]
        print(f"broker killed during the delivery: log {outcomes(env, built.jti)}; deliveries seen "
              f"{len(collector.pending)}, complete {len(complete)}; {time.monotonic() - killed[0]:.1f} s after the kill")
        assert [o for o in outcomes(env, built.jti) if o in CLOSING] == ["delivered"], outcomes(env, built.jti)
        assert len(complete) == 1, "the delivery did not reach the agency whole, or arrived twice"
        open_delivery(complete[0].manifest or "", complete[0].chunks, built.recipient_private, built.jti)

        # 2. SIGKILL while idle; requests published after it is back but before the agent reconnects.
        proxy.black_hole = True  # the agent's reconnects get nowhere until it is lifted
        sigkill_broker(broker)
        broker.stop()
        broker.start()
        t0 = time.monotonic()
        wait_for(agency.session.client.is_connected, 30, "the agency to reconnect")
        while not agency.session.events.empty():  # the old "disconnect" would fail the next publish's wait
            agency.session.events.get_nowait()
        stale = agency.request()
        for topic in [home_topic(env)]:
            agency.session.publish(topic, stale.message, expiry_s=1)  # expires before the agent is back
        fresh = agency.request()
        agency.publish(fresh, [home_topic(env)])
        wait_for(lambda: time.monotonic() - t0 > 2.0, 5, "the short-lived request to expire at the broker")
        proxy.black_hole = False
        wait_for(lambda: outcomes(env, fresh.jti), 60, "the request sent while the agent was away to be decided")
        assert outcomes(env, fresh.jti)[0] == "granted", outcomes(env, fresh.jti)
        assert outcomes(env, stale.jti) == [], "a request whose message expired at the broker was decided"
        print(f"request published while the agent was away decided {time.monotonic() - t0:.1f} s after the broker "
              "came back")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert "Traceback" not in log.read_text()
    finally:
        proxy.on_packet = None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        agency.close()
        proxy.close()
        broker.start()
