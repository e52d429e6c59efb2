"""The pydantic model of the agent's TOML config file."""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from config.units import ByteSize, Duration
from drivers.modbus_types import DATA_TYPES, REGISTER_TABLES

__all__ = [
    "NAME_PATTERN",
    "AgentSection",
    "BufferSection",
    "Config",
    "ModbusPoint",
    "ModbusSource",
    "MqttSection",
    "Sources",
]

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
"""Names of rigs, sources and channels: letters, digits, '_', '.' and '-'."""


def _suggestion(value: str, choices: tuple[str, ...] | list[str]) -> str:
    """Return "; did you mean 'x'?" for the choice closest to a misspelt value, or ""."""
    close = get_close_matches(value.lower(), choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _error_at(message: str, *at: str | int) -> PydanticCustomError:
    """Build a validation error for a check that spans several fields.

    Pydantic places an error from a model validator on the whole model. The
    config loader appends `at`, a key path relative to that model, so the
    error points at the line of the offending key.
    """
    return PydanticCustomError("value_error", message, {"at": at})


class _Section(BaseModel):
    # Numbers are strict (`strict=True` on each field) so that `unit_id = true` or
    # `address = "100"` is an error rather than a silent conversion. The model as a
    # whole is not strict because strict mode rejects a string for a Path.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSection(_Section):
    """The `[agent]` table: identity, storage location and logging."""

    rig_id: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    data_dir: Path = Path("/var/lib/rig-agent")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_listen: str = "127.0.0.1:9108"


class BufferSection(_Section):
    """The `[buffer]` table: size cap and commit cadence of the SQLite buffer."""

    max_bytes: ByteSize = 2 * 1024**3
    commit_interval: Duration = 0.1


class ModbusPoint(_Section):
    """One `[[sources.modbus.points]]` entry: a value held in one or more registers."""

    channel: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    table: Literal["holding", "input"] = "holding"
    address: int = Field(ge=0, le=65535, strict=True)
    type: str = "uint16"
    word_order: Literal["big", "little"] = "big"
    byte_order: Literal["big", "little"] = "big"
    scale: float = Field(default=1.0, strict=True)
    offset: float = Field(default=0.0, strict=True)
    unit: str = ""

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in DATA_TYPES:
            names = ", ".join(DATA_TYPES)
            hint = _suggestion(value, list(DATA_TYPES))
            msg = f"unknown type {value!r}: expected one of {names}{hint}"
            raise ValueError(msg)
        return value

    @field_validator("table", mode="before")
    @classmethod
    def _known_table(cls, value: object) -> object:
        if isinstance(value, str) and value not in REGISTER_TABLES:
            names = ", ".join(REGISTER_TABLES)
            hint = _suggestion(value, REGISTER_TABLES)
            msg = f"unknown register table {value!r}: expected one of {names}{hint}"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _fits_address_space(self) -> ModbusPoint:
        last = self.address + DATA_TYPES[self.type].registers - 1
        if last > 65535:
            msg = (
                f"{self.type} spans {self.registers} registers, so address {self.address} "
                f"runs past register 65535: expected an address of at most {65536 - self.registers}"
            )
            raise _error_at(msg, "address")
        return self

    @property
    def registers(self) -> int:
        """Number of registers the point spans."""
        return DATA_TYPES[self.type].registers


class ModbusSource(_Section):
    """One `[[sources.modbus]]` device: a connection, a unit id and its points."""

    name: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    url: str
    unit_id: int = Field(default=1, ge=0, le=255, strict=True)
    poll_interval: Duration = 1.0
    timeout: Duration = 0.5
    points: list[ModbusPoint] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _tcp_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "tcp" or not parts.hostname:
            msg = f'invalid Modbus URL {value!r}: expected "tcp://host:port"'
            raise ValueError(msg)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            msg = f"invalid port in Modbus URL {value!r}: expected a number from 1 to 65535"
            raise ValueError(msg) from None
        return value

    @model_validator(mode="after")
    def _unique_channels(self) -> ModbusSource:
        first_index: dict[str, int] = {}
        for index, point in enumerate(self.points):
            first = first_index.setdefault(point.channel, index)
            if first != index:
                msg = (
                    f"channel {point.channel!r} is used twice in source {self.name!r} "
                    f"(points[{first}] and points[{index}]): give each point its own channel name"
                )
                raise _error_at(msg, "points", index, "channel")
        return self

    @property
    def host(self) -> str:
        """Host name or address of the device."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """TCP port of the device (502 when the URL gives none)."""
        return urlsplit(self.url).port or 502


class Sources(_Section):
    """The `[sources]` table: every configured source, by protocol."""

    modbus: list[ModbusSource] = []


class MqttSection(_Section):
    """The `[mqtt]` table: the broker and how readings are published."""

    url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = "rigs/{rig_id}"
    qos: Literal[0, 1] = 1
    client_id: str = ""
    username: str = ""
    password_file: str = ""
    keepalive: Duration = 30.0
    max_readings_per_message: int = Field(default=500, ge=1, le=100_000, strict=True)
    max_inflight: int = Field(default=50, ge=1, le=1000, strict=True)

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            msg = f'invalid MQTT URL {value!r}: expected "mqtt://host:port" or "mqtts://host:port"'
            raise ValueError(msg)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            msg = f"invalid port in MQTT URL {value!r}: expected a number from 1 to 65535"
            raise ValueError(msg) from None
        return value

    @field_validator("qos", mode="before")
    @classmethod
    def _qos_number(cls, value: object) -> object:
        if isinstance(value, bool):
            msg = f"expected the number 0 or 1, got {str(value).lower()}"
            raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError as a field error
        return value

    @model_validator(mode="after")
    def _password_needs_username(self) -> MqttSection:
        if self.password_file and not self.username:
            msg = (
                "password_file is set but username is empty: add username, because "
                "MQTT sends a password only together with a user name"
            )
            raise _error_at(msg, "password_file")
        return self

    @property
    def host(self) -> str:
        """Broker host name or address."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """Broker port: the URL's, or 1883 (8883 for mqtts)."""
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        return urlsplit(self.url).scheme == "mqtts"


class Config(_Section):
    """The whole config file."""

    agent: AgentSection
    buffer: BufferSection = BufferSection()
    sources: Sources = Sources()
    mqtt: MqttSection | None = None

    @model_validator(mode="after")
    def _unique_source_names(self) -> Config:
        first_index: dict[str, int] = {}
        for index, source in enumerate(self.sources.modbus):
            first = first_index.setdefault(source.name, index)
            if first != index:
                msg = (
                    f"source name {source.name!r} is used twice (sources.modbus[{first}] and "
                    f"sources.modbus[{index}]): give each source its own name"
                )
                raise _error_at(msg, "sources", "modbus", index, "name")
        return self

    def enabled_sinks(self) -> list[str]:
        """Return the names of the sinks this config enables, in a fixed order."""
        return ["mqtt"] if self.mqtt is not None else []

    def topic_prefix(self) -> str:
        """Return the MQTT topic prefix with `{rig_id}` filled in."""
        prefix = self.mqtt.topic_prefix if self.mqtt else "rigs/{rig_id}"
        return prefix.replace("{rig_id}", self.agent.rig_id)
