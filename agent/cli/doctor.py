"""``doorbell-agent doctor``: is everything the agent needs in order, and if not, how to fix it.

Each check says ``ok``, ``warn`` (works, but look at it), ``fail`` (something does not work) or ``skip``
(does not apply), with one sentence, and for anything not ok the fix. ``--json`` for scripts. Exit
status 1 when anything failed.

The checks: the configuration (the same as ``config check``: files ``run`` needs), the camera, the
clock's synchronization, the broker (a TLS handshake with the configured CA and client certificate),
certificate expiry (client certificate, CA file, the broker's certificate), disk space against the
retention asked for, whether buffer.max_bytes holds buffer.retention_hours, damaged or lost state (which
``run`` refuses to share on), file permissions, the trust store, the consent period, and the systemd service
with its watchdog. Nothing printed shows a secret.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import stat
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from agent.cli.common import add_json_flag, config_from, print_json
from agent.config import AgentConfig, config_path

Status = Literal["ok", "warn", "fail", "skip"]
EXPIRY_WARN = timedelta(days=30)
CONSENT_WARN = timedelta(days=14)
UNIT = "doorbell-agent.service"
SYSTEMD_RUN_DIR = Path("/run/systemd/system")  # present only while systemd is process 1


@dataclass
class Check:
    name: str
    status: Status
    message: str
    fix: str | None = None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check the camera, clock, broker, certificates, disk, permissions, trust, "
                       "consent and service, and say how to fix what is wrong",
                       description="Check everything the agent needs and say how to fix what is wrong.")
    add_json_flag(p)
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="network timeout in seconds (default 5)")
    p.set_defaults(func=cmd_doctor)


# -- the checks ----------------------------------------------------------------------------------------


def check_config(cfg: AgentConfig) -> list[Check]:
    from agent.cli.config import check_problems

    problems = check_problems(cfg)
    if not problems:
        return [Check("config", "ok", "the configuration is valid and every file it names can be used")]
    return [Check("config", "fail", p, "edit /etc/doorbell-agent/agent.toml (or the file named), then run "
                  "'doorbell-agent config check'") for p in problems]


def check_camera(cfg: AgentConfig, timeout: float) -> list[Check]:
    from agent.display import redact_url

    cam = cfg.camera
    out: list[Check] = []
    if cam.source == "v4l2":
        dev = Path(cam.device)
        if not dev.exists():
            out.append(Check("camera", "fail", f"camera.device {dev} does not exist",
                             "plug the camera in and look for it with 'ls /dev/video*', then set camera.device"))
        elif not stat.S_ISCHR(dev.stat().st_mode):
            out.append(Check("camera", "fail", f"camera.device {dev} is not a video device", "set camera.device to /dev/videoN"))
        elif not os.access(dev, os.R_OK | os.W_OK):
            out.append(Check("camera", "fail", f"{dev} cannot be opened by this user",
                             "add the user to the video group: sudo usermod -aG video doorbell-agent"))
        else:
            out.append(Check("camera", "ok", f"{dev} is present and can be opened"))
    elif cam.source == "rtsp":
        from urllib.parse import urlsplit

        parts = urlsplit(cam.url or "")
        host, port = parts.hostname or "", parts.port or 554
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            out.append(Check("camera", "ok", f"the camera at {redact_url(cam.url or '')} answers on port {port}"))
        except OSError as exc:
            out.append(Check("camera", "fail", f"cannot reach the camera at {redact_url(cam.url or '')} ({exc})",
                             "check that the camera is on and its address in camera.url (try it with ffplay)"))
    elif cam.source == "picamera2":
        nodes = list(Path("/dev").glob("media*")) + list(Path("/dev").glob("video*"))
        if nodes:
            out.append(Check("camera", "ok", f"camera device nodes present ({len(nodes)})"))
        else:
            out.append(Check("camera", "fail", "no /dev/media* or /dev/video* nodes: the camera module is not detected",
                             "check the ribbon cable and run 'rpicam-hello --list-cameras'"))
    elif cam.source == "file":
        out.append(Check("camera", "ok" if cam.url and Path(cam.url).is_file() else "fail",
                         f"camera.url {cam.url} {'is' if cam.url and Path(cam.url).is_file() else 'is not'} a file",
                         None if cam.url and Path(cam.url).is_file() else "point camera.url at a video file"))
    else:
        out.append(Check("camera", "warn", "camera.source is 'synthetic': a test pattern, not a camera",
                         "set camera.source to v4l2, rtsp or picamera2 (hardware/README.md)"))
    out.extend(_recorder_progress(cfg))
    return out


def _recorder_progress(cfg: AgentConfig) -> list[Check]:
    from agent.runtime.status import gather_status

    try:
        rec = gather_status(cfg)["recorder"]
    except Exception as exc:  # noqa: BLE001 - a doctor reports, it does not stop at the first problem
        return [Check("recording", "warn", f"cannot read the recorder's status ({type(exc).__name__}: {exc})")]
    st = rec.get("status") or {}
    if not rec.get("running"):
        return [Check("recording", "warn", "the recorder is not running",
                      "start it: sudo systemctl start doorbell-agent (its log: journalctl -u doorbell-agent)")]
    if rec.get("stale") or not st.get("fps"):
        return [Check("recording", "fail", "the recorder runs but frames are not arriving",
                      "check the camera; the service's watchdog restarts it if no frames come "
                      "(journalctl -u doorbell-agent)")]
    return [Check("recording", "ok", f"recording at {st['fps']:.1f} fps, {st.get('frames_dropped', 0)} frames dropped")]


def check_clock(cfg: AgentConfig) -> list[Check]:
    from agent.state.clock import SystemClock

    ok, why = SystemClock.from_config(cfg).synced()
    if ok:
        return [Check("clock", "ok", f"the clock is synchronized ({why})" if why else "the clock is synchronized")]
    return [Check("clock", "fail", f"the clock is not known to be right ({why}); nothing is shared until it is",
                  "turn on network time: sudo timedatectl set-ntp true (and check the network); "
                  "a device with a battery clock can set [clock] assume_synced = true")]


def _expiry(name: str, not_after: datetime, now: datetime, fix: str) -> Check:
    left = not_after - now
    when = not_after.strftime("%Y-%m-%d")
    if left <= timedelta(0):
        return Check("certificates", "fail", f"{name} expired on {when}", fix)
    if left < EXPIRY_WARN:
        return Check("certificates", "warn", f"{name} expires on {when}, in {left.days} day(s)", fix)
    return Check("certificates", "ok", f"{name} is valid until {when}")


def check_certificates(cfg: AgentConfig, now: datetime) -> list[Check]:
    if cfg.mqtt is None or not cfg.mqtt.tls:
        return [Check("certificates", "skip", "no TLS broker configured")]
    from cryptography import x509

    out = []
    for name, path, fix in (("the client certificate (mqtt.cert_file)", cfg.mqtt.cert_file,
                             "ask the program for a new client certificate and key, then set mqtt.cert_file/key_file"),
                            ("the broker's CA (mqtt.ca_file)", cfg.mqtt.ca_file,
                             "ask the program for its current CA certificate, then set mqtt.ca_file")):
        if path is None:
            continue
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            out.append(Check("certificates", "fail", f"cannot read {name} ({exc})", fix))
            continue
        out.append(_expiry(f"{name}", cert.not_valid_after_utc, now, fix))
    return out or [Check("certificates", "skip", "no client certificate or CA file configured (the system's CAs are used)")]


def check_broker(cfg: AgentConfig, timeout: float, now: datetime) -> list[Check]:
    mqtt = cfg.mqtt
    if mqtt is None:
        return [Check("broker", "skip", "no [mqtt] section: the agent only records")]
    where = f"{mqtt.host}:{mqtt.port}"
    try:
        raw = socket.create_connection((mqtt.host, mqtt.port), timeout=timeout)
    except OSError as exc:
        return [Check("broker", "fail", f"cannot reach the broker at {where} ({exc})",
                      "check the network, mqtt.host and mqtt.port; ask the program whether the broker is up")]
    if not mqtt.tls:
        raw.close()
        return [Check("broker", "warn", f"the broker at {where} answers, but the link is NOT encrypted (mqtt.tls = false)",
                      "use the broker's TLS port and set mqtt.tls = true")]
    import ssl

    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(mqtt.ca_file) if mqtt.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if mqtt.cert_file is not None and mqtt.key_file is not None:
            ctx.load_cert_chain(str(mqtt.cert_file), str(mqtt.key_file))
        with ctx.wrap_socket(raw, server_hostname=mqtt.host) as tls:
            tls.settimeout(timeout)
            der = tls.getpeercert(binary_form=True)
            version = tls.version()
            # TLS 1.3 reports a rejected client certificate only on the first read: MQTT waits for
            # our CONNECT, so a read that times out means the broker kept the connection.
            try:
                tls.settimeout(min(timeout, 1.0))
                if tls.recv(1) == b"":
                    raise ssl.SSLError("the broker closed the connection after the handshake")
            except TimeoutError:
                pass
    except ssl.SSLCertVerificationError as exc:
        return [Check("broker", "fail", f"the broker at {where} is not the one the configuration trusts "
                      f"({exc.verify_message})", "check mqtt.ca_file and that mqtt.host is the name on the broker's certificate")]
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        return [Check("broker", "fail", f"TLS with the broker at {where} failed ({exc})",
                      "check mqtt.ca_file, mqtt.cert_file and mqtt.key_file with the program's instructions")]
    out = [Check("broker", "ok", f"the broker at {where} answers over {version} and its certificate checks out")]
    if der:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        out.append(_expiry("the broker's certificate", cert.not_valid_after_utc, now,
                           "tell the program: their broker's certificate must be renewed"))
    return out


def _human(n: float) -> str:
    from agent.runtime.status import human_bytes

    return human_bytes(n)


def check_disk(cfg: AgentConfig) -> list[Check]:
    from agent.cli.config import _existing_ancestor

    data = cfg.paths.data_dir
    try:
        usage = shutil.disk_usage(_existing_ancestor(data))
    except OSError as exc:
        return [Check("disk", "fail", f"cannot measure the disk holding {data} ({exc})")]
    footage = sum(p.stat().st_size for p in cfg.paths.segments_dir.rglob("*") if p.is_file()) \
        if cfg.paths.segments_dir.is_dir() else 0
    room = usage.free + footage - cfg.buffer.min_free_bytes
    want = cfg.buffer.max_bytes
    rate = _bytes_per_hour(cfg)
    if rate:
        want = min(want, int(rate * cfg.buffer.retention_hours))
    fix = ("free space on the disk, use a larger card, or lower buffer.retention_hours / buffer.max_bytes "
           "(hardware/README.md has hours of buffer per GB)")
    if room <= 0:
        return [Check("disk", "fail", f"the disk holding {data} has {_human(usage.free)} free, less than "
                      f"buffer.min_free_bytes ({_human(cfg.buffer.min_free_bytes)}): nothing can be recorded", fix)]
    if room < want:
        hours = f", about {room / rate:.0f} of the {cfg.buffer.retention_hours:g} hours asked for" if rate else ""
        return [Check("disk", "warn", f"room for {_human(room)} of footage, less than the buffer needs "
                      f"({_human(want)}){hours}", fix)]
    return [Check("disk", "ok", f"room for {_human(room)} of footage; the buffer needs at most {_human(want)}")]


def _bytes_per_hour(cfg: AgentConfig) -> float | None:
    try:
        from agent.runtime.status import gather_status

        buf = gather_status(cfg)["buffer"]
        if buf.get("recorded_s", 0) >= 60:
            return float(buf["bytes"]) / float(buf["recorded_s"]) * 3600
    except Exception:  # noqa: BLE001 - an estimate only
        pass
    return None


def check_retention(cfg: AgentConfig) -> list[Check]:
    """Whether buffer.max_bytes holds buffer.retention_hours of footage (the recorder deletes at whichever comes first)."""
    from agent.runtime.status import retention_warning

    why = retention_warning(cfg)
    if why is None:
        return [Check("retention", "ok", f"buffer.max_bytes holds the {cfg.buffer.retention_hours:g} hours of "
                      "buffer.retention_hours")]
    sentence, _, fix = why.partition(". Set ")
    return [Check("retention", "warn", sentence, "set " + fix if fix else None)]


def check_state(cfg: AgentConfig, now: datetime) -> list[Check]:
    """Damaged or lost state, or a request listener that is down while ``run`` is up: ``run`` shares nothing."""
    if cfg.policy is None or cfg.mqtt is None:
        return [Check("state", "skip", "sharing is not configured")]
    from agent.runtime.status import RESTART, sharing_status

    s = sharing_status(cfg, now)
    refused = s["state"]["refused"]
    if refused:
        return [Check("state", "fail", f"NOT SHARING: {why}",
                      "restore the file from your backup (README.md, 'Back up and restore'), " + RESTART)
                for why in refused.values()]
    if s.get("not_sharing"):
        return [Check("state", "fail", f"NOT SHARING: {s['not_sharing']}", "see journalctl -u doorbell-agent -n 50, "
                      + RESTART)]
    return [Check("state", "ok", "the access log and the memory of requests are intact")]


def check_permissions(cfg: AgentConfig, config_file: Path) -> list[Check]:
    out: list[Check] = []
    data = cfg.paths.data_dir
    if data.is_dir():
        mode = stat.S_IMODE(data.stat().st_mode)
        if mode & 0o077:
            out.append(Check("permissions", "fail", f"{data} is open to other users (mode {mode:o}): footage and keys are exposed",
                             f"sudo chmod 0700 {data}"))
    for path, what in ((config_file, "the configuration"), (cfg.paths.device_key_file, "the device key"),
                       (cfg.mqtt.key_file if cfg.mqtt else None, "the broker client key (mqtt.key_file)")):
        if path is None or not path.exists():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o007:
            out.append(Check("permissions", "fail", f"{what} {path} can be read by every user (mode {mode:o})",
                             f"sudo chmod o-rwx {path}"))
    return out or [Check("permissions", "ok", "the data directory, configuration and keys are private")]


def check_trust(cfg: AgentConfig, now: datetime) -> list[Check]:
    from agent.protocol.trust import TrustStoreError
    from agent.state.truststore import load_trust_store

    if cfg.policy is None or cfg.mqtt is None:
        return [Check("trust", "skip", "sharing is not configured")]
    try:
        store = load_trust_store(cfg.paths.trust_file, missing_ok=True)
    except TrustStoreError as exc:
        return [Check("trust", "fail", f"the trust store cannot be read ({exc}); nothing can be verified",
                      "see 'doorbell-agent trust list', then add the agency's keys again: doorbell-agent trust add FILE")]
    usable = sum(1 for k in store if k.valid_at(now))
    if usable == 0:
        return [Check("trust", "fail", f"no agency key is trusted now ({len(store)} key(s) stored)",
                      "add the keys from your program: doorbell-agent trust add FILE")]
    return [Check("trust", "ok", f"{usable} agency key(s) trusted")]


def check_consent(cfg: AgentConfig, now: datetime) -> list[Check]:
    if cfg.policy is None:
        return [Check("consent", "skip", "no [policy]: the agent never shares")]
    from agent.runtime.status import consent_status

    c = consent_status(cfg, now)
    end = cfg.policy.consent.end
    if not c["consents"]:
        return [Check("consent", "warn", f"nothing is shared now: {c['why']}",
                      "change policy.consent in /etc/doorbell-agent/agent.toml if that is not what you want")]
    if end - now < CONSENT_WARN:
        return [Check("consent", "warn", f"your consent period ends in {(end - now).days} day(s)",
                      "extend policy.consent.end if you want to keep taking part")]
    return [Check("consent", "ok", "your consent is given now")]


def check_service(cfg: AgentConfig) -> list[Check]:
    if not SYSTEMD_RUN_DIR.is_dir() or not shutil.which("systemctl"):
        from agent.runtime.supervisor import recorder_running

        running = recorder_running(cfg)
        return [Check("service", "warn" if not running else "ok",
                      "systemd is not running here, so there is no service or watchdog; the recorder is "
                      + ("running" if running else "not running"),
                      None if running else "run 'doorbell-agent run' (e.g. under a process supervisor)")]
    try:
        text = subprocess.run(["systemctl", "show", UNIT, "--property",
                               "LoadState,ActiveState,SubState,Result,NRestarts,WatchdogUSec,UnitFileState"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Check("service", "warn", f"cannot ask systemd about {UNIT} ({exc})")]
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    out: list[Check] = []
    if props.get("LoadState") != "loaded":
        return [Check("service", "fail", f"{UNIT} is not installed", "run sudo ./install.sh from the agent's checkout")]
    if props.get("ActiveState") == "active":
        out.append(Check("service", "ok", f"{UNIT} is running ({props.get('NRestarts', '0')} restart(s))"))
    else:
        out.append(Check("service", "fail", f"{UNIT} is {props.get('ActiveState')} ({props.get('Result')})",
                         "see why: journalctl -u doorbell-agent -n 50; start it: sudo systemctl enable --now doorbell-agent"))
    if props.get("UnitFileState") not in ("enabled", None):
        out.append(Check("service", "warn", f"{UNIT} does not start at boot", "sudo systemctl enable doorbell-agent"))
    wd = props.get("WatchdogUSec", "0")
    if wd in ("0", "infinity", ""):
        out.append(Check("watchdog", "warn", "the service has no watchdog", "reinstall the unit: sudo ./install.sh"))
    elif props.get("Result") == "watchdog":
        out.append(Check("watchdog", "fail", "the watchdog restarted the service: the camera stopped delivering frames",
                         "check the camera and its cable or network; journalctl -u doorbell-agent"))
    else:
        out.append(Check("watchdog", "ok", f"the watchdog restarts the service if frames stop for {wd}"))
    return out


def run_checks(cfg: AgentConfig, config_file: Path, timeout: float = 5.0, now: datetime | None = None) -> list[Check]:
    now = now or datetime.now(UTC)
    checks: list[Check] = []
    for step in (lambda: check_config(cfg), lambda: check_camera(cfg, timeout), lambda: check_clock(cfg),
                 lambda: check_broker(cfg, timeout, now), lambda: check_certificates(cfg, now), lambda: check_disk(cfg),
                 lambda: check_retention(cfg), lambda: check_state(cfg, now),
                 lambda: check_permissions(cfg, config_file), lambda: check_trust(cfg, now),
                 lambda: check_consent(cfg, now), lambda: check_service(cfg)):
        try:
            checks.extend(step())
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            checks.append(Check("doctor", "warn", f"a check could not run ({type(exc).__name__}: {exc})"))
    return checks


MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "--  "}


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    checks = run_checks(cfg, config_path(args.config), timeout=args.timeout)
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        data: dict[str, Any] = {"ok": not failed, "checks": [asdict(c) for c in checks]}
        print_json(data)
    else:
        for c in checks:
            print(f"[{MARK[c.status]}] {c.name}: {c.message}")
            if c.fix and c.status in ("warn", "fail"):
                print(f"       fix: {c.fix}")
        print("Everything needed works." if not failed else "Some checks FAILED: see 'fix' above.")
    return 1 if failed else 0
