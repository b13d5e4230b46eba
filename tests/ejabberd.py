"""A real ejabberd (mod_mqtt) for the tests and the cluster benchmark: TLS, passwords, ACLs by identity.

The same broker interface as :class:`tests.broker.Broker` (``host``, ``port``,
``ca_file``, ``credentials``, ``mqtt_config``, ``start``/``stop``), so the
end-to-end helpers written for Mosquitto run unchanged against it; only the
MQTT settings differ. The certificates come from :func:`tests.broker.mint_pki`.

Each node runs the Erlang VM directly (``erl -sname ... -s ejabberd``, the
command ``ejabberdctl foreground`` builds) as whoever runs the tests, in its
own temp directory with its own config (``docs/ejabberd/ejabberd.yml`` with the
placeholders filled in), Mnesia spool, log, node name and cookie, on free
loopback ports: a system ejabberd (``ejabberd@localhost`` on 5222/5280/1883)
is neither used nor disturbed. The users ``agent`` and ``agency`` are
registered from the node itself at boot (``-eval``), which saves starting a
second VM for ``ejabberdctl register``. Erlang distribution needs ``epmd``,
which the first node starts and which outlives it (it is shared, and harmless).

A second node joins the first with :meth:`Ejabberd.join` (``ejabberdctl
join_cluster``): users, subscriptions and sessions are then cluster-wide.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import string
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.broker import Broker, BrokerError, Credential, free_ports, mint_pki

REPO = Path(__file__).resolve().parent.parent
CONFIG_TEMPLATE = REPO / "docs" / "ejabberd" / "ejabberd.yml"
ERL = shutil.which("erl") or "/usr/bin/erl"
VHOST = "localhost"
SESSION_EXPIRY = "1 day"


def ejabberd_lib_dir() -> Path | None:
    """Where Debian's ejabberd keeps its Erlang applications (``ERL_LIBS`` for ``erl``)."""
    for candidate in sorted(Path("/usr/lib").glob("*/ejabberd-*/ebin/ejabberd.app")):
        return candidate.parent.parent.parent
    return None


def missing_ejabberd() -> str | None:
    """Why ejabberd cannot run here, or None."""
    if ejabberd_lib_dir() is None:
        return "ejabberd is not installed (apt-get install ejabberd; ./install.sh --dev installs it)"
    if not os.access(ERL, os.X_OK):
        return f"{ERL} (Erlang, a dependency of Debian's ejabberd package) is not installed"
    return None


def _erl_string(value: str) -> str:
    """An Erlang string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _erl_binary(value: str) -> str:
    return f"<<{_erl_string(value)}/utf8>>"


@dataclass
class Ejabberd(Broker):
    """One ejabberd node; :meth:`join` makes it part of another node's cluster.

    Inherits the client side (``mqtt_config``, ``credentials``, ``ca_file``) from
    :class:`tests.broker.Broker`; replaces everything about the server process.
    """

    node: str = ""
    cookie: str = ""
    cluster_with: Ejabberd | None = None
    max_queue: int = 5000
    start_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port, = free_ports(1)
        self.plain_port = 0  # no plaintext listener: ejabberd here is TLS only
        tag = secrets.token_hex(4)
        self.node = self.node or f"doorbell-ejab-{tag}@localhost"
        if self.cluster_with is not None:  # one cluster: one CA, one set of users, one cookie
            self.cookie = self.cluster_with.cookie
            self.pki = self.cluster_with.pki
            self.credentials = dict(self.cluster_with.credentials)
            self.root = self.cluster_with.root
        else:
            self.cookie = self.cookie or secrets.token_hex(16)
            self.pki = mint_pki(self.workdir / "pki")
            for role in ("agent", "agency"):
                cert, key = self.pki.clients[role]
                self.credentials[role] = Credential(role, secrets.token_urlsafe(12), cert, key)
        (self.workdir / "spool").mkdir(exist_ok=True)
        self._write_config()

    @property
    def log_file(self) -> Path:
        return self.workdir / "ejabberd.log"

    @property
    def config_file(self) -> Path:
        return self.workdir / "ejabberd.yml"

    def _write_config(self) -> None:
        assert self.pki is not None
        values = {
            "vhost": VHOST, "ip": self.host, "port": str(self.port), "loglevel": "info",
            "certfile": str(self.pki.server_cert), "keyfile": str(self.pki.server_key), "ca_file": str(self.pki.ca_file),
            "root": self.root, "session_expiry": SESSION_EXPIRY, "max_queue": str(self.max_queue),
        }
        self.config_file.write_text(string.Template(CONFIG_TEMPLATE.read_text()).substitute(values))

    def _boot_expression(self) -> str:
        """Erlang run on the node once ejabberd started: register the users (or join), then say so in a file."""
        ready = _erl_string(str(self.workdir / "ready"))
        if self.cluster_with is not None:
            step = f"ok = ejabberd_admin:join_cluster({_erl_binary(self.cluster_with.node)})"
        else:
            step = ", ".join(  # {error, exists}: a restart of this node, whose spool already has them
                f"case ejabberd_auth:try_register({_erl_binary(c.username)}, {_erl_binary(VHOST)}, "
                f"{_erl_binary(c.password)}) of ok -> ok; {{error, exists}} -> ok end"
                for c in self.credentials.values()
            )
        return f"{step}, ok = file:write_file({ready}, <<\"ok\">>)."

    # ----- lifecycle ----------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Boot the node, register the users (or join the cluster), return once the TLS listener answers."""
        if self.running:
            return
        why = missing_ejabberd()
        if why is not None:
            raise BrokerError(why)
        lib = ejabberd_lib_dir()
        (self.workdir / "ready").unlink(missing_ok=True)
        spool = self.workdir / "spool"
        env = dict(os.environ, ERL_LIBS=str(lib), EJABBERD_CONFIG_PATH=str(self.config_file),
                   EJABBERD_LOG_PATH=str(self.log_file), ERL_CRASH_DUMP_BYTES="0", HOME=str(self.workdir))
        cmd = [ERL, "-sname", self.node, "-setcookie", self.cookie, "+K", "true", "-noinput",
               "-mnesia", "dir", _erl_string(str(spool)), "-s", "ejabberd", "-eval", self._boot_expression()]
        with open(self.workdir / "erl.out", "ab") as out:
            self._proc = subprocess.Popen(cmd, cwd=spool, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + (timeout or self.start_timeout_s)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if (self.workdir / "ready").exists():
                try:
                    self._probe_tls()
                    return
                except OSError as exc:
                    last = exc
            try:  # the pause between attempts, which also notices an early exit at once
                self._proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            break
        code = self._proc.poll()
        self.stop()
        raise BrokerError(f"ejabberd node {self.node} did not become ready on port {self.port} "
                          f"(exit code {code}, last error {last!r}):\n{self.log_tail()}")

    def _probe_tls(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        with socket.create_connection((self.host, self.port), timeout=2) as raw:
            with ctx.wrap_socket(raw, server_hostname=self.host):
                pass

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the VM shuts ejabberd down cleanly), then SIGKILL if it lingers.

        ejabberd keeps MQTT sessions in the node's memory: stopping the node ends them all.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def log_tail(self, offset: int = 0, limit: int = 20000) -> str:
        text = super().log_tail(offset, limit)
        try:
            text += (self.workdir / "erl.out").read_bytes()[-4000:].decode("utf-8", "replace")
        except FileNotFoundError:
            pass
        return text


@pytest.fixture(scope="module")
def ejabberd_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ejabberd]:
    """One ejabberd node for a test module; skipped, with the reason, where ejabberd is not installed."""
    why = missing_ejabberd()
    if why is not None:
        pytest.skip(why)
    node = Ejabberd(tmp_path_factory.mktemp("ejabberd"))
    node.start()
    try:
        yield node
    finally:
        node.stop()
