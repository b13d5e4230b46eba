"""The resident's configuration: one TOML file plus ``DOORBELL_AGENT_*`` overrides.

Every key is validated here, once, so the rest of the agent can trust what it
is handed. A missing file is an error (pydantic-settings would silently skip
it, and an agent that starts with default consent settings is worse than one
that does not start). Unknown keys are errors too: a typo in
``require_warant`` must not quietly leave a safeguard off.

Environment overrides use ``__`` between levels, e.g.
``DOORBELL_AGENT_MQTT__HOST=broker.example`` or ``DOORBELL_AGENT_CAMERA__FPS=10``.
"""

from __future__ import annotations

import os
import re
import tomllib
import zoneinfo
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from agent.errors import UserError

DEFAULT_CONFIG_PATH = Path("/etc/doorbell-agent/agent.toml")
CONFIG_ENV = "DOORBELL_AGENT_CONFIG"
ENV_PREFIX = "DOORBELL_AGENT_"

DayName = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAY_NAMES: tuple[DayName, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"(?:[01]\d|2[0-3]):[0-5]\d|24:00", re.ASCII)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    """Where the agent keeps footage, keys and logs. Everything lives under one directory."""

    data_dir: Path = Path("/var/lib/doorbell-agent")

    @property
    def segments_dir(self) -> Path:
        return self.data_dir / "segments"

    @property
    def buffer_db(self) -> Path:
        return self.data_dir / "buffer.sqlite"

    @property
    def state_db(self) -> Path:
        """Replay memory, access log, pending approvals."""
        return self.data_dir / "state.sqlite"

    @property
    def trust_file(self) -> Path:
        return self.data_dir / "trust.jwks.json"

    @property
    def killswitch_file(self) -> Path:
        return self.data_dir / "killswitch"

    @property
    def device_key_file(self) -> Path:
        return self.data_dir / "device-key.pem"

    @property
    def status_file(self) -> Path:
        """The recorder's live counters, for ``doorbell-agent status``."""
        return self.data_dir / "recorder-status.json"

    @property
    def service_status_file(self) -> Path:
        """The sharing service's live counters and broker state, for ``doorbell-agent status``."""
        return self.data_dir / "service-status.json"

    @property
    def consent_file(self) -> Path:
        """The resident's consent as last set by ``doorbell-agent consent``; overrides ``[policy.consent]``."""
        return self.data_dir / "consent.json"

    @property
    def web_password_file(self) -> Path:
        """The Argon2 hash of the local page's password (``doorbell-agent web password``)."""
        return self.data_dir / "web-password"


Point = tuple[int, int]


class CameraConfig(_Section):
    source: Literal["synthetic", "v4l2", "rtsp", "file", "picamera2"] = "synthetic"
    device: str = "/dev/video0"
    url: str | None = None
    width: Annotated[int, Field(ge=16, le=3840)] = 1280
    height: Annotated[int, Field(ge=16, le=2160)] = 720
    fps: Annotated[int, Field(ge=1, le=60)] = 15
    encoder: Literal["auto", "libx264", "h264_v4l2m2m"] = "auto"
    keyframe_interval_s: Annotated[float, Field(gt=0, le=1.0)] = 1.0
    masks: list[list[Point]] = Field(default_factory=list)
    reconnect_max_s: Annotated[float, Field(gt=0, le=300)] = 30.0

    @field_validator("url")
    @classmethod
    def _rtsp_address(cls, url: str | None, info: ValidationInfo) -> str | None:
        """An RTSP camera needs an rtsp:// address; ``run`` would otherwise fail only when it starts recording."""
        if url and info.data.get("source") == "rtsp" and not url.lower().startswith(("rtsp://", "rtsps://")):
            from agent.display import redact_url

            raise ValueError(
                f"an RTSP camera's address must start with rtsp:// (or rtsps://), got {redact_url(url)!r}. Use the camera's RTSP address, which its app or manual gives "
                "(often rtsp://USER:PASSWORD@CAMERA-IP:554/...), or set camera.source = 'file' to read a video file"
            )
        return url

    @field_validator("masks")
    @classmethod
    def _polygons(cls, masks: list[list[Point]]) -> list[list[Point]]:
        for i, poly in enumerate(masks):
            if len(poly) < 3:
                raise ValueError(f"mask {i} has {len(poly)} points; a polygon needs at least 3 [x, y] points")
            for x, y in poly:
                if x < 0 or y < 0:
                    raise ValueError(f"mask {i} has a negative coordinate ({x}, {y}); use pixel coordinates from the top-left corner")
        return masks

    @model_validator(mode="after")
    def _source_needs(self) -> CameraConfig:
        if self.source in ("rtsp", "file") and not self.url:
            raise ValueError(f"camera.source = {self.source!r} needs camera.url (an rtsp:// address or a file path)")
        if self.width % 2 or self.height % 2:
            raise ValueError("camera.width and camera.height must be even numbers (H.264 with 4:2:0 colour needs them)")
        for i, poly in enumerate(self.masks):
            for x, y in poly:
                if x > self.width or y > self.height:
                    raise ValueError(
                        f"camera.masks[{i}] point ({x}, {y}) lies outside the {self.width}x{self.height} frame"
                    )
        return self


class BufferConfig(_Section):
    segment_seconds: Annotated[float, Field(ge=1, le=60)] = 4.0
    retention_hours: Annotated[float, Field(gt=0, le=24 * 90)] = 72.0
    max_bytes: Annotated[int, Field(ge=16 * 1024 * 1024)] = 8 * 1024**3
    min_free_bytes: Annotated[int, Field(ge=0)] = 512 * 1024**2


class Location(_Section):
    lat: Annotated[float, Field(ge=-90, le=90, allow_inf_nan=False)]
    lon: Annotated[float, Field(ge=-180, le=180, allow_inf_nan=False)]


class ScheduleRule(_Section):
    """One weekly rule in the resident's local time; ``from`` > ``to`` runs past midnight."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    days: list[DayName] = Field(min_length=1)
    from_: str = Field(alias="from")
    to: str

    @field_validator("from_", "to")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.fullmatch(v):
            raise ValueError(f"{v!r} is not a time of day; write HH:MM from 00:00 to 24:00")
        return v


def _utc(v: Any) -> Any:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError("give a time zone, e.g. 2026-12-01T00:00:00Z")
        return v.astimezone(UTC)
    return v


class Consent(_Section):
    start: datetime
    end: datetime
    schedule: list[ScheduleRule] = Field(
        default_factory=lambda: [ScheduleRule(days=list(DAY_NAMES), **{"from": "00:00", "to": "24:00"})]
    )
    withdrawn: bool = False

    @field_validator("start", "end")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        return _utc(v)

    @model_validator(mode="after")
    def _order(self) -> Consent:
        if self.start >= self.end:
            raise ValueError("policy.consent.start must be before policy.consent.end")
        return self


class PolicyConfig(_Section):
    """The resident's rules. Names match the protocol vectors' ``agent`` object."""

    program: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")]
    location: Location
    timezone: str
    consent: Consent
    max_radius_m: Annotated[float, Field(gt=0, le=2000, allow_inf_nan=False)] = 1000
    max_window_s: Annotated[int, Field(gt=0, le=12 * 3600)] = 3600
    max_age_s: Annotated[int, Field(gt=0)] = 259200
    require_oversight: bool = False
    require_warrant: bool = False
    grants_per_issuer_per_day: Annotated[int, Field(ge=0, le=1000)] = 10
    approval: Literal["auto", "ask"] = "auto"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not a known time zone; use an IANA name such as America/Chicago") from None
        return v


class MqttConfig(_Section):
    host: str = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 8883
    tls: bool = True
    allow_plaintext: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    root: Annotated[str, Field(min_length=1, max_length=128)] = "civic/example"
    precision: Annotated[int, Field(ge=0, le=5)] = 4
    client_id: str | None = None
    session_expiry_s: Annotated[int, Field(ge=0, le=7 * 86400)] = 86400
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if any(c in v for c in "#+\x00") or v.startswith("/") or v.endswith("/"):
            raise ValueError(f"{v!r} is not a topic prefix; use levels like civic/jackson-ms, without # + or a leading/trailing /")
        return v

    @model_validator(mode="after")
    def _tls(self) -> MqttConfig:
        if not self.tls and not self.allow_plaintext:
            raise ValueError(
                "mqtt.tls = false sends requests and deliveries in the clear to the broker; "
                "set mqtt.allow_plaintext = true as well if you really mean it"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mqtt.cert_file and mqtt.key_file go together; give both or neither")
        return self


class ClockConfig(_Section):
    """When the system cannot tell that its clock is right (see agent/clock.py)."""

    # Declare the clock synchronized without NTP, e.g. a device with a battery-backed RTC.
    assume_synced: bool = False


def _host_port(value: str, key: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; the error names ``key`` and shows the form."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(default_port) if default_port is not None else ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT for {key}; write e.g. 127.0.0.1:8765 or [::1]:8765")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) can only mean this machine: ``localhost`` or a loopback address."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebConfig(_Section):
    """The homeowner's local page (``agent.web``)."""

    enabled: bool = True
    # Anything but loopback needs a password (doorbell-agent web password); port 0 picks a free port (tests).
    listen: str = "127.0.0.1:8765"
    session_minutes: Annotated[int, Field(ge=1, le=24 * 60)] = 30

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _host_port(v, "web.listen")
        return v

    @property
    def host(self) -> str:
        return _host_port(self.listen, "web.listen")[0]

    @property
    def port(self) -> int:
        return _host_port(self.listen, "web.listen")[1]

    @property
    def loopback_only(self) -> bool:
        return is_loopback_host(self.host)


GpioPin = Annotated[int, Field(ge=0, le=53)] | Annotated[str, Field(pattern=r"^(GPIO|BCM|BOARD)\d{1,2}$")]


class GpioConfig(_Section):
    """A push button that toggles the kill switch and an LED that shows sharing; off unless a pin is set.

    Pins are BCM numbers (17) or gpiozero names ("GPIO17", "BOARD11"); see hardware/README.md for wiring.
    """

    button_pin: GpioPin | None = None
    led_pin: GpioPin | None = None
    hold_seconds: Annotated[float, Field(ge=0.5, le=10, allow_inf_nan=False)] = 2.0
    # The button connects the pin to ground (the Pi's internal pull-up), as in hardware/README.md.
    button_pull_up: bool = True


class HomeAssistantConfig(_Section):
    """The homeowner's own MQTT broker for Home Assistant discovery; never the agency's broker."""

    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    tls: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = None
    discovery_prefix: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_/-]+$")] = "homeassistant"
    node_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] = "doorbell_agent"


class NotifyConfig(_Section):
    """A webhook (ntfy, a Home Assistant webhook, ...) that gets a short JSON POST for each event."""

    url: Annotated[str, Field(pattern=r"^https?://\S+$")]
    token: str | None = None  # sent as "Authorization: Bearer <token>" when set (ntfy access tokens)
    timeout_s: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 5.0
    # "json": a JSON body (Home Assistant webhooks, most services); "ntfy": the message as plain text with a
    # Title header, for a topic URL such as https://ntfy.sh/<topic> (agent.homeowner.webhook).
    format: Literal["json", "ntfy"] = "json"


class AgentConfig(BaseSettings):
    """The whole configuration. Load it with :func:`load_config`, not directly."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    paths: PathsConfig = PathsConfig()
    camera: CameraConfig = CameraConfig()
    buffer: BufferConfig = BufferConfig()
    policy: PolicyConfig | None = None
    mqtt: MqttConfig | None = None
    clock: ClockConfig = ClockConfig()
    web: WebConfig = WebConfig()
    gpio: GpioConfig = GpioConfig()
    home_assistant: HomeAssistantConfig | None = None
    notify: NotifyConfig | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def require_policy(self) -> PolicyConfig:
        if self.policy is None:
            raise UserError("the configuration has no [policy] section; sharing needs the resident's rules (see README, 'Configuration')")
        return self.policy

    def require_mqtt(self) -> MqttConfig:
        if self.mqtt is None:
            raise UserError("the configuration has no [mqtt] section; add the broker's host, port and topic root")
        return self.mqtt


class ConfigError(UserError):
    """A configuration problem, worded for the person who edits the file."""


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(explicit: str | os.PathLike[str] | None = None) -> AgentConfig:
    """Read, check and return the configuration, or raise :class:`ConfigError`."""
    path = config_path(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} does not exist; create it (see README, 'Configuration') "
            f"or point --config / {CONFIG_ENV} at it"
        ) from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None

    class _FromFile(AgentConfig):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return _FromFile()
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from None


def format_validation_error(exc: ValidationError, path: Path) -> str:
    lines = [f"{path}: {exc.error_count()} problem(s):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if p != "from_") or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        env = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown setting; remove it or check its spelling (README lists every key)")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required but not set")
        else:
            shown = err.get("input")
            # Never echo a secret back, even a malformed one: it may end up in a journal or a bug report.
            secret = any(word in key.lower() for word in ("password", "secret", "token")) or (
                isinstance(shown, str) and "://" in shown and "@" in shown)
            value = "" if isinstance(shown, dict) else " = (hidden)" if secret else f" = {shown!r}"
            lines.append(f"  {key}{value}: {msg} (set in the file or by {env})")
    return "\n".join(lines)
