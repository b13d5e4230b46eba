"""A real Mosquitto 2.x broker for the test suite: TLS, passwords, client certificates, ACLs.

Everything is minted per test session in a temp directory: a CA, a server
certificate for 127.0.0.1/localhost, client certificates for the ``agent`` and
``agency`` users, a second unrelated CA (for "wrong CA" tests), a password
file made with ``mosquitto_passwd`` and an ACL file that gives agents read on
``{root}/v1/requests/#`` and write on ``{root}/v1/deliveries/#``, agencies the
reverse.

The fixtures are registered for every test module in ``tests/conftest.py``::

    def test_x(broker: Broker) -> None:
        cfg = broker.mqtt_config("agent", precision=5)

``broker`` is function-scoped: it makes sure the session's broker is running
(a previous test may have stopped it) and, if the test fails, prints the part
of the broker's log written during the test.
"""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import os
import queue
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttConfig

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
ROOT = "civic/test"
Role = Literal["agent", "agency"]


@dataclass(frozen=True)
class Credential:
    username: str
    password: str
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    wrong_ca_file: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, *, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def mint_pki(directory: Path, client_names: tuple[str, ...] = ("agent", "agency")) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, client certificates, and an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("doorbell-agent test CA")
    _, wrong_cert = _ca("some other CA")
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "wrong-ca.pem").write_bytes(wrong_cert.public_bytes(serialization.Encoding.PEM))
    skey, scert = _leaf(ca_key, ca_cert, "localhost", server=True)
    (directory / "server.pem").write_bytes(scert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "server.key", skey)
    clients: dict[str, tuple[Path, Path]] = {}
    for name in client_names:
        ckey, ccert = _leaf(ca_key, ca_cert, name, server=False)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(ccert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, ckey)
        clients[name] = (cert_path, key_path)
    return Pki(
        ca_file=directory / "ca.pem",
        wrong_ca_file=directory / "wrong-ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        clients=clients,
    )


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all bound at once, so the kernel cannot hand one out twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class BrokerError(RuntimeError):
    pass


@dataclass
class Broker:
    """One Mosquitto process with fixed ports, so clients can reconnect across :meth:`stop`/:meth:`start`."""

    workdir: Path
    root: str = ROOT
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick free ports
    plain_port: int = 0
    pki: Pki | None = None
    credentials: dict[str, Credential] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    # ----- setup -------------------------------------------------------------

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port or not self.plain_port:
            self.port, self.plain_port = free_ports(2)
        self.pki = mint_pki(self.workdir / "pki")
        for role in ("agent", "agency"):
            cert, key = self.pki.clients[role]
            self.credentials[role] = Credential(role, secrets.token_urlsafe(12), cert, key)
        self._write_passwords()
        self._write_acl()
        self._write_config()

    @property
    def ca_file(self) -> Path:
        assert self.pki is not None
        return self.pki.ca_file

    @property
    def wrong_ca_file(self) -> Path:
        assert self.pki is not None
        return self.pki.wrong_ca_file

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    def _write_passwords(self) -> None:
        path = self.workdir / "passwd"
        path.touch(mode=0o600)
        for cred in self.credentials.values():
            subprocess.run(
                [MOSQUITTO_PASSWD, "-b", str(path), cred.username, cred.password],
                check=True, capture_output=True, timeout=30,
            )

    def _write_acl(self) -> None:
        r = self.root
        (self.workdir / "acl").write_text(
            "user agent\n"
            f"topic read {r}/v1/requests/#\n"
            f"topic write {r}/v1/deliveries/#\n"
            "\n"
            "user agency\n"
            f"topic write {r}/v1/requests/#\n"
            f"topic read {r}/v1/deliveries/#\n"
        )

    def _write_config(self) -> None:
        assert self.pki is not None
        persist = self.workdir / "persist"
        persist.mkdir(exist_ok=True)
        w = self.workdir
        (w / "mosquitto.conf").write_text(
            "per_listener_settings false\n"
            f"user {getpass.getuser()}\n"  # run as whoever runs the tests (root here): no privilege drop
            "persistence true\n"
            f"persistence_location {persist}/\n"
            "autosave_interval 1\n"
            f"log_dest file {self.log_file}\n"
            "log_type all\n"
            "connection_messages true\n"
            "allow_anonymous false\n"
            f"password_file {w / 'passwd'}\n"
            f"acl_file {w / 'acl'}\n"
            "max_packet_size 1048576\n"
            f"\nlistener {self.port} 127.0.0.1\n"
            f"cafile {self.pki.ca_file}\n"
            f"certfile {self.pki.server_cert}\n"
            f"keyfile {self.pki.server_key}\n"
            "require_certificate true\n"
            "tls_version tlsv1.2\n"
            f"\nlistener {self.plain_port} 127.0.0.1\n"
        )

    # ----- lifecycle -----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start Mosquitto and return once it accepts a TLS connection on the agent's port."""
        if self.running:
            return
        with open(self.workdir / "mosquitto.stderr", "ab") as stderr:
            self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.workdir / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._probe_tls()
                return
            except OSError as exc:
                last = exc
            try:  # doubles as the pause between attempts, and notices an early exit at once
                self._proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            break
        code = self._proc.poll()
        self.stop()
        raise BrokerError(
            f"mosquitto did not become ready on port {self.port} (exit code {code}, last error {last!r}):\n"
            + self.log_tail()
        )

    def _probe_tls(self) -> None:
        """A TLS handshake with client auth: proves the listener is up with our certificates loaded."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        cert, key = self.credentials["agent"].cert_file, self.credentials["agent"].key_file
        ctx.load_cert_chain(str(cert), str(key))
        with socket.create_connection((self.host, self.port), timeout=2) as raw:
            with ctx.wrap_socket(raw, server_hostname=self.host):
                pass
        with socket.create_connection((self.host, self.plain_port), timeout=2):
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence file on the way out), then SIGKILL if it lingers."""
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

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, offset: int = 0, limit: int = 20000) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        try:
            data += (self.workdir / "mosquitto.stderr").read_bytes()
        except FileNotFoundError:
            pass
        return data[-limit:].decode("utf-8", "replace")

    def log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    # ----- what clients need -------------------------------------------------------

    def mqtt_config(self, role: Role = "agent", *, plaintext: bool = False, **overrides: Any) -> MqttConfig:
        """A validated MqttConfig for ``role`` on this broker; ``overrides`` replace any key."""
        cred = self.credentials[role]
        values: dict[str, Any] = dict(
            host=self.host,
            port=self.plain_port if plaintext else self.port,
            tls=not plaintext,
            allow_plaintext=plaintext,
            ca_file=None if plaintext else self.ca_file,
            cert_file=None if plaintext else cred.cert_file,
            key_file=None if plaintext else cred.key_file,
            username=cred.username,
            password=cred.password,
            root=self.root,
            client_id=f"test-{role}-{secrets.token_hex(4)}",
            session_expiry_s=300,
            keepalive_s=5,
        )
        values.update(overrides)
        return MqttConfig(**values)


class PeerClient:
    """The other side of the wire (an agency, or a second agent): a plain paho MQTT 5 client.

    Connected and subscribed synchronously, so a test can publish right after
    constructing it; every wait has a timeout.
    """

    def __init__(self, broker: Broker, role: Role = "agency", *, timeout: float = 10.0) -> None:
        cred = broker.credentials[role]
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._cond = threading.Condition()
        self._acks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._connected = False
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peer-{role}-{secrets.token_hex(4)}",
                        protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(broker.ca_file))
        ctx.load_cert_chain(str(cred.cert_file), str(cred.key_file))
        c.tls_set_context(ctx)
        c.username_pw_set(cred.username, cred.password)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = lambda _c, _u, m: self.messages.put(m)
        self.client = c
        c.connect(broker.host, broker.port, keepalive=10, clean_start=True)
        c.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._connected, timeout):
                self.close()
                raise TimeoutError(f"{role} peer did not connect within {timeout} s")

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self._connected = not rc.is_failure
            self._cond.notify_all()

    def _on_publish(self, c: mqtt.Client, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self._acks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, c: mqtt.Client, u: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        with self._cond:
            self._subacks[mid] = rcs
            self._cond.notify_all()

    def publish_nowait(self, topic: str, payload: bytes, *, expiry_s: int | None = None) -> int:
        props = Properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        return self.client.publish(topic, payload, qos=1, properties=props).mid

    def wait_puback(self, mid: int, timeout: float = 10.0) -> ReasonCode:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acks, timeout):
                raise TimeoutError(f"no PUBACK for message {mid} within {timeout} s")
            return self._acks.pop(mid)

    def publish(self, topic: str, payload: bytes, *, expiry_s: int | None = None, timeout: float = 10.0) -> ReasonCode:
        """QoS 1 publish; returns the PUBACK's reason code (a failure code is returned, not raised)."""
        return self.wait_puback(self.publish_nowait(topic, payload, expiry_s=expiry_s), timeout)

    def subscribe(self, topic_filter: str, timeout: float = 10.0) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic_filter, options=SubscribeOptions(qos=1))
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"no SUBACK within {timeout} s")
            return self._subacks.pop(mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



@pytest.fixture(scope="session")
def broker_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.fail(f"{MOSQUITTO} is not installed; the transport tests need a real Mosquitto 2.x broker")
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def broker(broker_session: Broker, request: pytest.FixtureRequest) -> Iterator[Broker]:
    """The session's broker, running; its log for this test is printed if the test fails."""
    broker_session.start()
    offset = broker_session.log_size()
    failed_before = request.session.testsfailed
    yield broker_session
    broker_session.start()  # leave it running for the next test even if this one stopped it
    if request.session.testsfailed > failed_before:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        text = f"\n----- mosquitto log during {request.node.nodeid} -----\n{broker_session.log_tail(offset)}"
        if reporter is not None:
            reporter.write_line(text)
        else:
            print(text)
