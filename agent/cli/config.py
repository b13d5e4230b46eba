"""``doorbell-agent config check``: validate the configuration without starting anything.

It is the systemd unit's ``ExecStartPre``, so it checks what ``run`` would fail on, not only the
file's syntax: the broker's CA file, client certificate and key (present, readable by this user,
really PEM), a ``data_dir`` this user can write, ``min_free_bytes`` that fits on the disk, a device
key that can be read. A problem here stops the service before it starts, with one sentence per
problem in ``journalctl -u doorbell-agent``, instead of a restart loop on an error from ``run``.

Nothing it prints shows a secret: the broker password and any password in the camera's URL are
replaced by ``"********"`` (:func:`redacted`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.cli.common import add_json_flag, config_from, print_json
from agent.config import AgentConfig, config_path
from agent.display import HIDDEN, redact_url


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check the configuration file")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="validate the configuration and say what is wrong, if anything")
    add_json_flag(check)
    check.set_defaults(func=_check)


def redacted(cfg: AgentConfig) -> dict[str, Any]:
    """The configuration as JSON-ready data, without its secrets."""
    data = cfg.model_dump(mode="json", by_alias=True)
    for section in data.values():
        if isinstance(section, dict):
            for key in ("password", "token"):
                if section.get(key) is not None:
                    section[key] = HIDDEN
    notify = data.get("notify")
    if isinstance(notify, dict) and notify.get("url"):
        # A webhook's path is its secret (an ntfy topic, a Home Assistant webhook id): show only where it goes.
        where = urlsplit(redact_url(notify["url"]))
        notify["url"] = f"{where.scheme}://{where.netloc}/{HIDDEN}"
    camera = data.get("camera")
    if isinstance(camera, dict):
        camera["url"] = redact_url(camera["url"]) if camera.get("url") else camera.get("url")
    return data


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_write(directory: Path) -> bool:
    """Really try (access(2) says yes to root even where nothing can be made, e.g. /proc)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        probe = tempfile.mkdtemp(prefix=".doorbell-agent-check-", dir=directory)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def _readable_file(key: str, path: Path) -> str | None:
    if not path.exists():
        return f"{key} = {str(path)!r} does not exist; fix the path or remove the setting"
    if not path.is_file():
        return f"{key} = {str(path)!r} is not a file"
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        who = _whoami()
        return (f"{key} = {str(path)!r} cannot be read by {who} ({exc.strerror}); make it readable to that user, "
                f"e.g. sudo chgrp doorbell-agent {path} && sudo chmod 0640 {path}")
    return None


def _whoami() -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(os.geteuid()).pw_name}"
    except (KeyError, ImportError):
        return f"uid {os.geteuid()}"


def _tls_problems(cfg: AgentConfig) -> list[str]:
    mqtt = cfg.mqtt
    if mqtt is None:
        return []
    problems = [p for p in (_readable_file(f"mqtt.{name}", path)
                            for name, path in (("ca_file", mqtt.ca_file), ("cert_file", mqtt.cert_file),
                                               ("key_file", mqtt.key_file)) if path is not None) if p]
    if problems or not mqtt.tls:
        return problems
    import ssl

    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(mqtt.ca_file) if mqtt.ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        return [f"mqtt.ca_file = {str(mqtt.ca_file)!r} is not a PEM CA certificate ({exc})"]
    if mqtt.cert_file is not None and mqtt.key_file is not None:
        try:
            ctx.load_cert_chain(str(mqtt.cert_file), str(mqtt.key_file))
        except (ssl.SSLError, OSError) as exc:
            return [f"mqtt.cert_file/mqtt.key_file cannot be used as a client certificate ({exc}); "
                    "give a PEM certificate and its unencrypted PEM key, which must match it"]
    return []


def _data_dir_problems(cfg: AgentConfig) -> list[str]:
    data_dir = cfg.paths.data_dir
    problems: list[str] = []
    if data_dir.exists() and not data_dir.is_dir():
        return [f"paths.data_dir = {str(data_dir)!r} is not a directory"]
    base = _existing_ancestor(data_dir)
    if not _can_write(base):
        what = "" if base == data_dir.absolute() else f" (it does not exist yet, and {base} is where it would be made)"
        problems.append(f"paths.data_dir = {str(data_dir)!r} cannot be written by {_whoami()}{what}; "
                        "give that user the directory (the service's is /var/lib/doorbell-agent, made by systemd) "
                        "or point paths.data_dir somewhere it owns")
    else:
        key = cfg.paths.device_key_file
        if key.exists():
            p = _readable_file("the device key", key)
            if p:
                problems.append(p)
    try:
        usage = shutil.disk_usage(base)
    except OSError as exc:
        problems.append(f"cannot measure the disk of paths.data_dir ({exc})")
        return problems
    if cfg.buffer.min_free_bytes >= usage.total:
        problems.append(f"buffer.min_free_bytes = {cfg.buffer.min_free_bytes} is not smaller than the whole disk "
                        f"holding {data_dir} ({usage.total} bytes): nothing could ever be recorded; lower it")
    return problems


def _camera_problems(cfg: AgentConfig) -> list[str]:
    cam = cfg.camera
    if cam.source == "file" and cam.url and "://" not in cam.url:
        p = _readable_file("camera.url", Path(cam.url))
        return [p] if p else []
    return []


def _consent_problems(cfg: AgentConfig) -> list[str]:
    """A consent file (``doorbell-agent consent``) that ``run`` could not use: it would share nothing."""
    if cfg.policy is None or not cfg.paths.consent_file.exists():
        return []
    from agent.state.consent import FIX, ConsentFileError, effective_policy

    try:
        effective_policy(cfg)
    except ConsentFileError as exc:
        return [f"{exc}: the agent would share nothing until it is fixed; {FIX}"]
    return []


def check_problems(cfg: AgentConfig) -> list[str]:
    """What would make ``run`` fail (or share nothing) with this configuration, one sentence each (empty when nothing would)."""
    return _data_dir_problems(cfg) + _tls_problems(cfg) + _camera_problems(cfg) + _consent_problems(cfg)


def _check(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    path = config_path(args.config)
    problems = check_problems(cfg)
    from agent.runtime.status import retention_warning  # a warning: `run` works, but keeps fewer hours

    warnings = [w for w in (retention_warning(cfg),) if w]
    if args.json:
        print_json({"ok": not problems, "path": str(path), "problems": problems, "warnings": warnings,
                    "config": redacted(cfg)})
        return 1 if problems else 0
    if problems:
        print(f"{path}: the file is valid, but 'doorbell-agent run' would fail: {len(problems)} problem(s):",
              file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{path}: configuration is valid.")
    print(f"  camera: {cfg.camera.source}, {cfg.camera.width}x{cfg.camera.height} at {cfg.camera.fps} fps")
    print(f"  footage kept in {cfg.paths.data_dir} for up to {cfg.buffer.retention_hours:g} hours")
    if cfg.policy is None:
        print("  no [policy] section: the agent records but never shares")
    elif cfg.paths.consent_file.exists():
        from agent.state.consent import overridden_keys

        print(f"  your consent file {cfg.paths.consent_file} replaces policy keys: {', '.join(overridden_keys(cfg))} "
              "(doorbell-agent consent show)")
    if cfg.mqtt is None:
        print("  no [mqtt] section: the agent does not listen for requests")
    elif not cfg.mqtt.tls:
        print("  WARNING: mqtt.tls is off; the broker link is not encrypted")
    for w in warnings:
        print(f"  WARNING: {w}.")
    return 0
