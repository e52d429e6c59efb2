"""The pydantic model of the agent's TOML config file."""

from __future__ import annotations

import ipaddress
import math
import re
import struct
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, tzinfo
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from config.units import (
    ByteSize,
    Duration,
    NonNegativeDuration,
    format_duration,
    format_size,
    parse_size,
)
from drivers.modbus_transport import Endpoint, parse_modbus_url
from drivers.modbus_types import (
    BIT_TABLES,
    DATA_TYPES,
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    ORDER_NAMES,
    REGISTER_TABLES,
    TABLES,
    DataType,
    ModiconAddress,
    TableName,
    fold_order,
    modicon_from_integer,
    order_name,
    parse_modicon,
)
from drivers.wits0_items import STANDARD_01
from drivers.wits0_link import Wits0Link, parse_wits0_url
from drivers.wits0_parser import encode_packet, parse_data_line

__all__ = [
    "BACKLOG_RATE_PATTERN",
    "NAME_PATTERN",
    "AgentSection",
    "BacklogRate",
    "BufferSection",
    "CloudSection",
    "Config",
    "ModbusPoint",
    "ModbusSource",
    "MqttSection",
    "Sources",
    "Wits0ItemMap",
    "Wits0Source",
    "WitsmlColumn",
    "WitsmlCurve",
    "WitsmlSection",
]

MIN_BUFFER_BYTES = 1024**2
"""Smallest accepted buffer.max_bytes; the buffer refuses a smaller cap too."""

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
"""Names of rigs, sources and channels: letters, digits, '_', '.' and '-'."""


def _suggestion(value: str, choices: tuple[str, ...] | list[str]) -> str:
    """Return "; did you mean 'x'?" for the choice closest to a misspelt value, or "".

    Letter case is ignored, so "dbtm" finds "DBTM".
    """
    by_folded = {choice.lower(): choice for choice in choices}
    close = get_close_matches(value.lower(), list(by_folded), n=1)
    return f"; did you mean {by_folded[close[0]]!r}?" if close else ""


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
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class AgentSection(_Section):
    """The `[agent]` table: identity, storage location and logging."""

    rig_id: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    data_dir: Path = Path("/var/lib/rig-agent")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_listen: str = "127.0.0.1:9108"
    """Address of the /metrics and /healthz server as "HOST:PORT"; "" turns it off."""
    clock_check: Literal["adjtimex", "off"] = "adjtimex"
    """Source of the system clock's synchronization state.

    With "adjtimex", readings taken while the kernel reports the clock as
    unsynchronized get quality uncertain. With "off", the state is unknown,
    qualities are left as the drivers set them, and clock jumps are not watched.
    """
    clock_jump_threshold: Duration = 2.0
    """Smallest step of the wall clock against the monotonic clock that counts as a jump."""

    @field_validator("metrics_listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        if value == "":
            return value
        # Imported here: the health module pulls in the HTTP server and prometheus_client.
        from agent.health import parse_listen

        try:
            parse_listen(value)
        except ValueError as exc:
            # The loader already shows the key and the value, so drop them from the message.
            message = str(exc).removeprefix(f'agent.metrics_listen = "{value}"')
            message = message.lstrip(": ")
            if message.startswith("has "):
                message = f"the address {message}"
            raise ValueError(message) from None
        return value


class BufferSection(_Section):
    """The `[buffer]` table: size cap and commit cadence of the SQLite buffer."""

    max_bytes: ByteSize = 2 * 1024**3
    """Maximum size of the database on disk; beyond it the oldest readings are deleted."""
    commit_interval: Duration = 0.1
    min_free_bytes: ByteSize = 64 * 1024**2
    """Free space that the buffer leaves on its filesystem.

    Readings that would cut into it are dropped.
    """

    @field_validator("max_bytes")
    @classmethod
    def _useful_cap(cls, value: int) -> int:
        if value < MIN_BUFFER_BYTES:
            msg = (
                f"max_bytes {format_size(value)} is too small to buffer an outage: "
                f'expected at least "1MiB", and on a rig box usually "1GiB" or more'
            )
            raise ValueError(msg)
        return value


# The address of a point depends on `address_base`, a key of its source, but
# pydantic validates each point before any validator of the source runs. The
# source's wrap validator therefore sets its address_base here for the
# duration of its own validation.
_ADDRESS_BASE: ContextVar[int] = ContextVar("address_base", default=0)


class ModbusPoint(_Section):
    """One `[[sources.modbus.points]]` entry: a value held in registers, a coil or an input bit.

    After validation, `table` and `address` are final: a Modicon address
    such as 40101 or a 1-based address (address_base = 1) has become the
    table and 0-based protocol address, and `address_note` explains the
    conversion. `word_order` and `byte_order` are canonical, with `order`
    folded into them.
    """

    channel: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    table: TableName = "holding"
    address: int = Field(ge=0, le=65535, strict=True)
    type: str = "uint16"
    bit: int | None = Field(default=None, ge=0, le=15, strict=True)
    order: Literal["ABCD", "CDAB", "BADC", "DCBA"] | None = None
    word_order: Literal["big", "little"] = "big"
    byte_order: Literal["big", "little"] = "big"
    scale: float = Field(default=1.0, strict=True)
    offset: float = Field(default=0.0, strict=True)
    null_value: StrictInt | StrictFloat | None = None
    unit: str = ""

    _written_address: int | str | None = PrivateAttr(default=None)
    _address_notation: str = PrivateAttr(default="")

    @model_validator(mode="wrap")
    @classmethod
    def _resolve(cls, data: Any, handler: ModelWrapValidatorHandler[ModbusPoint]) -> ModbusPoint:
        """Fold `order`, convert the written address and pick the default type of the table."""
        if not isinstance(data, dict):
            return handler(data)
        values = dict(data)
        _fold_orders(values)
        conversion = _convert_address(values, _ADDRESS_BASE.get())
        if "type" not in values and values.get("table") in BIT_TABLES:
            values["type"] = "bool"
        point = handler(values)
        if conversion is not None:
            point._written_address, point._address_notation = conversion
        return point

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
        if isinstance(value, str) and value not in TABLES:
            names = ", ".join(TABLES)
            hint = _suggestion(value, list(TABLES))
            msg = f"unknown register table {value!r}: expected one of {names}{hint}"
            raise ValueError(msg)
        return value

    @field_validator("order", mode="before")
    @classmethod
    def _order_upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> ModbusPoint:
        self._check_type_in_table()
        self._check_bit()
        self._check_null_value()
        self._check_address_space()
        return self

    def _check_type_in_table(self) -> None:
        if self.table in DATA_TYPES[self.type].tables:
            return
        msg = (
            f"type {self.type!r} cannot be read from a {self.table} table, which holds "
            f'single bits: use type = "bool", or leave type out'
        )
        raise _error_at(msg, "type")

    def _check_bit(self) -> None:
        is_bool = self.data_type.is_bit
        if self.bit is not None and not is_bool:
            msg = (
                f'bit applies only to type "bool", not "{self.type}": remove bit, or set '
                'type = "bool" to read one bit of the register'
            )
            raise _error_at(msg, "bit")
        if self.bit is not None and self.table in BIT_TABLES:
            msg = f"bit does not apply to a {self.table}, which is a single bit already: remove bit"
            raise _error_at(msg, "bit")
        if is_bool and self.bit is None and self.table in REGISTER_TABLES:
            msg = (
                f"a bool in a {self.table} register needs bit = 0 to 15 to say which bit of "
                "the 16-bit register to read (0 is the least significant): add bit"
            )
            raise _error_at(msg, "type")
        if is_bool:
            # "big" is the default of both orders, so a dumped and reloaded point passes.
            given = {
                "order": self.order is not None,
                "word_order": self.word_order != "big",
                "byte_order": self.byte_order != "big",
            }
            for key, is_given in given.items():
                if is_given:
                    msg = (
                        f"{key} does not apply to a bool, which is one bit taken as the "
                        f"device sends it: remove {key}"
                    )
                    raise _error_at(msg, key)

    def _check_null_value(self) -> None:
        if self.null_value is None:
            return
        data_type = self.data_type
        if data_type.is_bit:
            msg = "null_value does not apply to a bool, which is always 0 or 1: remove null_value"
            raise _error_at(msg, "null_value")
        if data_type.name == "float32" and _outside_float32(self.null_value):
            msg = (
                f"float32 never reads {self.null_value!r}, so this null_value would never "
                f"match: expected a value within \u00b13.4e38, as the device sends it before "
                "scale and offset"
            )
            raise _error_at(msg, "null_value")
        limits = data_type.int_range
        if limits is None:
            return
        low, high = limits
        whole = isinstance(self.null_value, int) or float(self.null_value).is_integer()
        if not whole or not low <= self.null_value <= high:
            msg = (
                f"{self.type} never reads {self.null_value!r}, so this null_value would never "
                f"match: expected a whole number from {low} to {high}, as the device sends "
                "it before scale and offset"
            )
            raise _error_at(msg, "null_value")

    def _check_address_space(self) -> None:
        last = self.address + self.span - 1
        if last > 65535:
            msg = (
                f"{self.type} spans {self.registers} registers, so address {self.address} "
                f"runs past register 65535: expected an address of at most {65536 - self.span}"
            )
            raise _error_at(msg, "address")

    @property
    def data_type(self) -> DataType:
        """The entry of the point's type in the data-type table."""
        return DATA_TYPES[self.type]

    @property
    def is_bits(self) -> bool:
        """Whether the point is read from a bit table (coil or discrete input)."""
        return self.table in BIT_TABLES

    @property
    def registers(self) -> int:
        """Number of registers the point spans; for a coil or discrete input, 1 bit."""
        return 1 if self.is_bits else self.data_type.registers

    @property
    def span(self) -> int:
        """Number of addresses the point covers in its table: registers, or 1 bit."""
        return self.registers

    @property
    def layout(self) -> str:
        """The four-letter name of the point's word and byte order: ABCD, CDAB, BADC or DCBA."""
        return order_name(self.word_order, self.byte_order)

    @property
    def address_note(self) -> str:
        """How the written address became the table and address, or "" if it was used as is."""
        if self._written_address is None:
            return ""
        unit = TABLES[self.table].unit_name
        return (
            f"address {self._written_address} \u2192 {self.table} {unit} {self.address} "
            f"({self._address_notation})"
        )


def _outside_float32(value: float) -> bool:
    """Return whether a value is too large for float32, which cannot store it at all."""
    try:
        struct.pack(">f", value)
    except OverflowError:
        return True
    return False


def _fold_orders(values: dict[str, Any]) -> None:
    """Replace `order` by the word_order and byte_order it stands for, in the raw point table."""
    order = values.get("order")
    if not isinstance(order, str):
        return
    word_order = values.get("word_order")
    byte_order = values.get("byte_order")
    if not (isinstance(word_order, str | None) and isinstance(byte_order, str | None)):
        return
    try:
        folded = fold_order(order, word_order, byte_order)
    except ValueError as exc:
        close = get_close_matches(order.strip().upper(), list(ORDER_NAMES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        msg = f"{exc}{hint}"
        raise _error_at(msg, "order") from None
    values["word_order"], values["byte_order"] = folded


def _convert_address(values: dict[str, Any], address_base: int) -> tuple[int | str, str] | None:
    """Turn a Modicon or 1-based address of the raw point table into table and 0-based address.

    Returns the written address and the name of its notation, or None when
    the address is used as written (or is left for the field check to reject).
    """
    written = values.get("address")
    table = values.get("table")
    modicon: ModiconAddress | None = None
    if isinstance(written, str):
        try:
            modicon = parse_modicon(written)
        except ValueError as exc:
            raise _error_at(str(exc), "address") from None
    elif isinstance(written, int) and not isinstance(written, bool) and table is None:
        modicon = modicon_from_integer(written)

    if modicon is not None:
        if table is not None and table not in TABLES:
            # Keep the misspelled table so its own check reports it, with no second
            # error about the address.
            values["address"] = modicon.address
            return None
        if isinstance(table, str) and table != modicon.table:
            unit = TABLES[modicon.table].unit_name
            msg = (
                f"address {written!r} is {modicon.table} {unit} {modicon.address} in Modicon "
                f"{modicon.notation} notation, but table = {table!r}: remove table, or write "
                f"the 0-based {table} address as a plain number"
            )
            raise _error_at(msg, "address")
        values["table"], values["address"] = modicon.table, modicon.address
        return modicon.written, f"Modicon {modicon.notation} notation, 1-based"

    if address_base == 1 and isinstance(written, int) and not isinstance(written, bool):
        if not 1 <= written <= 65536:
            msg = (
                f"address {written} is out of range for address_base = 1: expected 1 to 65536, "
                "the 1-based number from the device manual (or set address_base = 0 "
                "for 0-based addresses)"
            )
            raise _error_at(msg, "address")
        values["address"] = written - 1
        return written, "address_base = 1"
    return None


def _serial_settings(endpoint: Endpoint) -> dict[str, object]:
    return {
        "baudrate": endpoint.baudrate,
        "parity": endpoint.parity,
        "stopbits": endpoint.stopbits,
        "bytesize": endpoint.bytesize,
    }


class ModbusSource(_Section):
    """One `[[sources.modbus]]` device: a connection, a unit id and its points.

    NOTE: the points hold final 0-based addresses, so validating the output
    of `model_dump()` again with address_base = 1 would subtract 1 twice.
    The agent always validates the TOML file itself.
    """

    name: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    url: str
    unit_id: int = Field(default=1, ge=0, le=255, strict=True)
    poll_interval: Duration = 1.0
    timeout: Duration = 0.5
    address_base: Literal[0, 1] = 0
    max_request_registers: int = Field(default=MAX_READ_REGISTERS, ge=1, le=125, strict=True)
    max_request_bits: int = Field(default=MAX_READ_BITS, ge=1, le=2000, strict=True)
    max_gap: int = Field(default=0, ge=0, le=124, strict=True)
    frame_pause: NonNegativeDuration = 0.0
    points: list[ModbusPoint] = Field(min_length=1)

    @model_validator(mode="wrap")
    @classmethod
    def _publish_address_base(
        cls, data: Any, handler: ModelWrapValidatorHandler[ModbusSource]
    ) -> ModbusSource:
        """Validate the source while its points can see its address_base."""
        base = data.get("address_base") if isinstance(data, dict) else None
        token = _ADDRESS_BASE.set(1 if base == 1 and not isinstance(base, bool) else 0)
        try:
            return handler(data)
        finally:
            _ADDRESS_BASE.reset(token)

    @field_validator("url")
    @classmethod
    def _modbus_url(cls, value: str) -> str:
        parse_modbus_url(value)
        return value

    @field_validator("address_base", mode="before")
    @classmethod
    def _address_base_number(cls, value: object) -> object:
        if isinstance(value, bool):
            msg = f"expected the number 0 or 1, got {str(value).lower()}"
            raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError as a field error
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

    @model_validator(mode="after")
    def _points_fit_requests(self) -> ModbusSource:
        for index, point in enumerate(self.points):
            if not point.is_bits and point.registers > self.max_request_registers:
                msg = (
                    f"max_request_registers = {self.max_request_registers} is smaller than "
                    f"points[{index}] ({point.channel!r}, a {point.type} of {point.registers} "
                    f"registers), which is never split across reads: expected at least "
                    f"{point.registers}"
                )
                raise _error_at(msg, "max_request_registers")
        return self

    @model_validator(mode="after")
    def _serial_unit_id(self) -> ModbusSource:
        if self.endpoint.kind != "tcp" and self.unit_id == 0:
            msg = (
                "unit_id 0 is the broadcast address on a serial bus, which no device answers: "
                "expected the device's own id, 1 to 247"
            )
            raise _error_at(msg, "unit_id")
        return self

    @property
    def endpoint(self) -> Endpoint:
        """Where the device is reached: TCP address or serial port, with its framing."""
        return parse_modbus_url(self.url)

    @property
    def host(self) -> str:
        """Host name or address of a TCP or RTU-over-TCP device; "" for a serial port."""
        return self.endpoint.host

    @property
    def port(self) -> int:
        """TCP port of the device (502 when the URL gives none)."""
        return self.endpoint.port


STANDARD_ITEMS: Literal["standard-01"] = "standard-01"
"""Value of `items` that maps codes by the built-in table of WITS record 01 items."""

_WITS0_CODE = re.compile(r"[0-9]{4}")
_UNMAPPED_CHANNEL = re.compile(r"wits_([0-9]{4})")

Wits0Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class Wits0ItemMap(_Section):
    """One entry of `[sources.wits0.items]`: the channel and unit that a WITS code feeds."""

    channel: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    unit: str = ""


_ITEM_TABLE: TypeAdapter[dict[str, Wits0ItemMap]] = TypeAdapter(dict[str, Wits0ItemMap])

# Channel and unit of each standard record 01 item: the mnemonic, in either unit set.
_STANDARD_MAPS: dict[str, dict[str, Wits0ItemMap]] = {
    units: {
        code: Wits0ItemMap(
            channel=item.mnemonic, unit=item.metric_unit if units == "metric" else item.fps_unit
        )
        for code, item in STANDARD_01.items()
    }
    for units in ("metric", "fps")
}


class Wits0Source(_Section):
    """One `[[sources.wits0]]` link: a serial port or TCP socket carrying WITS level 0 packets."""

    name: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    url: str
    items: dict[str, Wits0ItemMap] | Literal["standard-01"] = STANDARD_ITEMS
    units: Literal["metric", "fps"] = "metric"
    """Unit column of the standard table, used when items = "standard-01"."""
    unmapped: Literal["keep", "drop"] = "keep"
    """Handling of a code with no mapping: keep it as channel `wits_<code>`, or drop it."""
    null_values: list[Wits0Number] = [-9999.0, -8888.0, -999.25]
    use_device_time: bool = Field(default=False, strict=True)
    timezone: str = "UTC"
    """IANA time zone of the device clock, used with use_device_time."""
    silence_timeout: Duration = 60.0
    transmit: bool = Field(default=False, strict=True)
    transmit_packet: str = "0111-9999"
    """Data lines of the packet to transmit, one per line, without the && and !! lines."""
    transmit_interval: Duration = 30.0

    @field_validator("url")
    @classmethod
    def _wits0_url(cls, value: str) -> str:
        parse_wits0_url(value)
        return value

    @field_validator("items", mode="wrap")
    @classmethod
    def _item_table(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Validate a table of codes, or the name of the built-in table, as one error per mistake.

        Pydantic reports a failed union once per member, with the member's
        type in the error location. Checking each form here instead gives one
        error at the key that is wrong.
        """
        if isinstance(value, str):
            return _standard_table_name(value)
        if not isinstance(value, dict):
            got = "an array of tables" if isinstance(value, list) else type(value).__name__
            msg = (
                f'expected "{STANDARD_ITEMS}" or a [sources.wits0.items] table of codes, got {got}'
            )
            raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError as a field error
        for code in value:
            if not _WITS0_CODE.fullmatch(code):
                raise _error_at(_code_message(code), code)
        return _ITEM_TABLE.validate_python(value)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        _zone(value)
        return value

    @field_validator("transmit_packet")
    @classmethod
    def _valid_transmit_packet(cls, value: str) -> str:
        _transmit_items(value)
        return value

    @model_validator(mode="after")
    def _unique_channels(self) -> Wits0Source:
        if isinstance(self.items, str):
            return self
        first_code: dict[str, str] = {}
        for code, entry in self.items.items():
            first = first_code.setdefault(entry.channel, code)
            if first != code:
                msg = (
                    f"channel {entry.channel!r} is used twice in source {self.name!r} "
                    f"(codes {first} and {code}): give each code its own channel name"
                )
                raise _error_at(msg, "items", code, "channel")
            self._check_unmapped_name(code, entry.channel)
        return self

    def _check_unmapped_name(self, code: str, channel: str) -> None:
        """Reject a channel named like the channel that another, unmapped code gets."""
        match = _UNMAPPED_CHANNEL.fullmatch(channel)
        if match is None or self.unmapped == "drop" or isinstance(self.items, str):
            return
        other = match.group(1)
        if other == code or other in self.items:
            return
        msg = (
            f"channel {channel!r} of code {code} is also the channel of code {other} while "
            f'{other} is unmapped (unmapped = "keep"), so both codes would feed one channel: '
            f"choose another channel name, or map {other} as well"
        )
        raise _error_at(msg, "items", code, "channel")

    @model_validator(mode="after")
    def _transmit_within_silence(self) -> Wits0Source:
        if self.transmit and self.transmit_interval >= self.silence_timeout:
            msg = (
                f"transmit_interval {format_duration(self.transmit_interval)} is not shorter "
                f"than silence_timeout {format_duration(self.silence_timeout)}: a device that "
                "sends only after it receives a packet would stay silent long enough to trip "
                "the watchdog; expected a transmit_interval below silence_timeout"
            )
            raise _error_at(msg, "transmit_interval")
        return self

    @property
    def link(self) -> Wits0Link:
        """Where the packets arrive: serial port and settings, or TCP host and port."""
        return parse_wits0_url(self.url)

    @property
    def tzinfo(self) -> tzinfo:
        """The time zone of the device clock."""
        return _zone(self.timezone)

    @property
    def transmit_items(self) -> tuple[tuple[str, str], ...]:
        """The (code, value text) pairs of transmit_packet."""
        return tuple(_transmit_items(self.transmit_packet))

    @property
    def transmit_bytes(self) -> bytes:
        """The packet to transmit as sent on the link, with && and !! lines and CR LF ends."""
        return encode_packet(self.transmit_items)

    def map_code(self, code: str) -> Wits0ItemMap | None:
        """Return the channel and unit that a code feeds, or None when the code is dropped.

        A code missing from `items` (or from the standard table) becomes channel
        `wits_<code>` with no unit, unless unmapped = "drop".
        """
        if isinstance(self.items, str):
            mapped = _STANDARD_MAPS[self.units].get(code)
        else:
            mapped = self.items.get(code)
        if mapped is not None or self.unmapped == "drop":
            return mapped
        return Wits0ItemMap(channel=f"wits_{code}")


def _standard_table_name(value: str) -> str:
    if value == STANDARD_ITEMS:
        return value
    hint = _suggestion(value, [STANDARD_ITEMS])
    msg = (
        f'unknown item table {value!r}: expected "{STANDARD_ITEMS}" (the built-in table of '
        "record 01 items), or a [sources.wits0.items] table that maps each code to a "
        f"channel{hint}"
    )
    raise ValueError(msg)


def _code_message(code: str) -> str:
    example = code.zfill(4) if code.isdigit() and len(code) < 4 else "0108"
    return (
        f"invalid WITS code {code!r}: expected 4 digits, the record number and the item "
        f'number, such as "{example}"; write the code in quotes to keep its leading zero'
    )


def _zone(name: str) -> tzinfo:
    """Return the time zone of an IANA name; raise ValueError naming it and the closest match."""
    # UTC needs no time zone database, which a minimal system may lack.
    if name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    names = {zone.lower(): zone for zone in available_timezones()}
    close = get_close_matches(name.lower(), list(names), n=1)
    hint = f"; did you mean {names[close[0]]!r}?" if close else ""
    msg = (
        f"unknown time zone {name!r}: expected an IANA time zone name such as "
        f'"UTC", "America/Chicago" or "Asia/Dubai"{hint}'
    )
    raise ValueError(msg)


def _transmit_items(text: str) -> list[tuple[str, str]]:
    """Split transmit_packet into (code, value text) pairs; raise ValueError for an invalid line."""
    items: list[tuple[str, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line in ("&&", "!!"):
            msg = (
                f"line {number} of transmit_packet is {line}: write only the data lines, "
                "because the agent adds the && and !! lines itself"
            )
            raise ValueError(msg)
        item = parse_data_line(line.encode("ascii")) if line.isascii() else None
        if item is None:
            msg = (
                f"line {number} of transmit_packet, {line!r}, is not a WITS data line: "
                'expected 4 digits and a number, such as "0111-9999", because the '
                "device ignores a packet that contains an invalid line"
            )
            raise ValueError(msg)
        items.append((item.code, item.text))
    if not items:
        msg = 'transmit_packet has no data line: expected at least one, such as "0111-9999"'
        raise ValueError(msg)
    return items


class Sources(_Section):
    """The `[sources]` table: every configured source, by protocol."""

    modbus: list[ModbusSource] = []
    wits0: list[Wits0Source] = []


# --- The backlog lane of the MQTT and cloud sinks ---------------------------------------

BACKLOG_RATE_PATTERN = r"^\s*(?:unlimited|(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*/\s*s)\s*$"
"""Regular expression of a backlog_rate: "unlimited", readings as "2000/s", bytes as "64KiB/s"."""
_BACKLOG_RATE_RE = re.compile(BACKLOG_RATE_PATTERN)
_BACKLOG_RATE_SCHEMA = WithJsonSchema(
    {
        "type": "string",
        "pattern": BACKLOG_RATE_PATTERN,
        "description": (
            'Rate limit of the backlog lane: readings per second such as "2000/s", bytes '
            'per second such as "64KiB/s", or "unlimited".'
        ),
    },
    mode="validation",
)


@dataclass(frozen=True, slots=True)
class BacklogRate:
    """Rate limit of a backlog lane: `amount` readings or payload bytes per second."""

    amount: float
    unit: Literal["readings", "bytes"]


def parse_backlog_rate(value: str) -> BacklogRate | None:
    """Convert a backlog_rate such as "2000/s" or "64KiB/s" to a BacklogRate; None if unlimited.

    Raises ValueError with the accepted forms for any other text or a zero rate.
    """
    match = _BACKLOG_RATE_RE.match(value)
    if match is None:
        msg = (
            f"invalid backlog rate {value!r}: expected readings per second such as "
            '"2000/s", bytes per second such as "64KiB/s" or "1MB/s", or "unlimited"'
        )
        raise ValueError(msg)
    number, size_unit = match.groups()
    if number is None:
        return None
    if size_unit is None:
        rate = BacklogRate(float(number), "readings")
    else:
        rate = BacklogRate(float(parse_size(f"{number}{size_unit}")), "bytes")
    if rate.amount <= 0:
        msg = (
            f"invalid backlog rate {value!r}: a rate of zero would never send the backlog. "
            'Give a rate above zero, or "unlimited"'
        )
        raise ValueError(msg)
    return rate


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
    backlog_threshold: int = Field(default=10_000, ge=0, strict=True)
    """Readings waiting at a (re)connect above which new readings go first.

    The older readings then drain behind them on {topic_prefix}/backfill/{source}.
    """
    backlog_rate: Annotated[str, _BACKLOG_RATE_SCHEMA] = "unlimited"
    """Rate limit of the backlog drain, "2000/s" (readings) or "64KiB/s" (payload bytes)."""

    @field_validator("backlog_rate")
    @classmethod
    def _valid_backlog_rate(cls, value: str) -> str:
        parse_backlog_rate(value)
        return value

    @property
    def backlog_limit(self) -> BacklogRate | None:
        """The parsed backlog_rate, or None when it is unlimited."""
        return parse_backlog_rate(self.backlog_rate)

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None:
            msg = (
                "the MQTT URL must not contain a user name or password: set mqtt.username, "
                "and put the password in the file named by mqtt.password_file"
            )
            raise ValueError(msg)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            msg = f'invalid MQTT URL {value!r}: expected "mqtt://host:port" or "mqtts://host:port"'
            raise ValueError(msg)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            msg = f"invalid port in MQTT URL {value!r}: expected a number from 1 to 65535"
            raise ValueError(msg) from None
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _valid_topic_prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or value.endswith("/"):
            msg = f'invalid topic prefix {value!r}: expected levels such as "rigs/{{rig_id}}"'
            raise ValueError(msg)
        if "#" in value or "+" in value or "\0" in value:
            msg = (
                f"invalid topic prefix {value!r}: the MQTT wildcards # and + are allowed "
                "only in subscriptions, not in the topics the agent publishes to"
            )
            raise ValueError(msg)
        unknown = set(re.findall(r"\{([^}]*)\}", value)) - {"rig_id"}
        if unknown:
            names = ", ".join("{" + name + "}" for name in sorted(unknown))
            msg = (
                f"unknown placeholder {names} in topic prefix {value!r}: "
                "only {rig_id} is filled in"
            )
            raise ValueError(msg)
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


_MAX_TOKEN_LIFETIME = 600.0
"""Maximum token lifetime, in seconds, that the cloud service accepts."""


class CloudSection(_Section):
    """The `[cloud]` table: the HTTPS ingest service and the device credentials for it."""

    url: str
    device_id: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    private_key_file: str = Field(min_length=1)
    audience: str = Field(default="rig-cloud", min_length=1)
    batch_max_readings: int = Field(default=5000, ge=1, le=100_000, strict=True)
    interval: Duration = 5.0
    token_lifetime: Duration = 300.0
    timeout: Duration = 30.0
    # Cap of the jittered backoff after network errors and 5xx responses. A Retry-After
    # from the service is honoured up to 5 minutes regardless.
    retry_max_delay: Duration = 60.0
    allow_insecure_http: bool = Field(default=False, strict=True)
    ca_file: str = ""
    backlog_threshold: int = Field(default=10_000, ge=0, strict=True)
    """Readings waiting at start or after an outage above which new readings go first.

    The older readings then drain behind them in batches marked X-Rig-Backlog: 1.
    """
    backlog_rate: Annotated[str, _BACKLOG_RATE_SCHEMA] = "unlimited"
    """Rate limit of the backlog drain, "2000/s" (readings) or "64KiB/s" (gzip body bytes)."""

    @field_validator("backlog_rate")
    @classmethod
    def _valid_backlog_rate(cls, value: str) -> str:
        parse_backlog_rate(value)
        return value

    @property
    def backlog_limit(self) -> BacklogRate | None:
        """The parsed backlog_rate, or None when it is unlimited."""
        return parse_backlog_rate(self.backlog_rate)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            hint = _suggestion(parts.scheme, ["https"]) if parts.scheme else ""
            msg = (
                f'invalid cloud URL {value!r}: expected "https://host[:port][/base path]", '
                f'such as "https://ingest.example.com"{hint}'
            )
            raise ValueError(msg)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            msg = f"invalid port in cloud URL {value!r}: expected a number from 1 to 65535"
            raise ValueError(msg) from None
        if parts.username is not None or parts.password is not None:
            # The value is left out of the message, which may end up in the journal.
            msg = (
                "the cloud URL contains a user name or password: remove them, because the "
                "agent authenticates with its device key and secrets never go in the file"
            )
            raise ValueError(msg)
        if parts.query or parts.fragment:
            msg = (
                f"cloud URL {value!r} has a query or fragment: expected only scheme, host, "
                "port and base path"
            )
            raise ValueError(msg)
        return value

    @field_validator("private_key_file")
    @classmethod
    def _key_file_name(cls, value: str) -> str:
        if value.strip() in (".", ".."):
            msg = (
                f"invalid private_key_file {value!r}: expected a path, or the name of a "
                "credential in $CREDENTIALS_DIRECTORY"
            )
            raise ValueError(msg)
        return value

    @field_validator("token_lifetime")
    @classmethod
    def _token_lifetime_limit(cls, value: float) -> float:
        if not 1.0 <= value <= _MAX_TOKEN_LIFETIME:
            msg = (
                f"token_lifetime {format_duration(value)} is out of range: expected 1s to 10m, "
                "because token times count whole seconds and the cloud service rejects "
                "tokens that live longer than 10 minutes"
            )
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _plain_http_only_on_loopback(self) -> CloudSection:
        if self.is_tls or self.allow_insecure_http or self.is_loopback:
            return self
        msg = (
            f"cloud URL {self.url!r} uses plain http:// to a host that is not loopback, which "
            "would send readings and device tokens unencrypted: use https://, or set "
            "allow_insecure_http = true in [cloud] for a network you trust"
        )
        raise _error_at(msg, "url")

    @property
    def host(self) -> str:
        """Host name or address of the service."""
        return urlsplit(self.url).hostname or ""

    @property
    def is_tls(self) -> bool:
        """Whether the URL is https://."""
        return urlsplit(self.url).scheme == "https"

    @property
    def is_loopback(self) -> bool:
        """Whether the host is localhost, an address in 127.0.0.0/8 or ::1."""
        # urlsplit lowercases the host name, so "LOCALHOST" arrives as "localhost".
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def base_url(self) -> str:
        """The URL without a trailing '/', to which paths such as /v1/readings are appended."""
        return self.url.rstrip("/")


# --- The WITSML time log -----------------------------------------------------------

_INDEX_MNEMONIC = "TIME"
"""Mnemonic of the time index curve that the agent puts first in every log."""
_FORBIDDEN_MNEMONIC_CHARS = "'\"<>/\\&,"
"""Characters that WITSML 1.4.1.1 servers reject in a mnemonic.

The comma also separates the entries of mnemonicList.
"""
_FORBIDDEN_UID_CHARS = "'\"<>&,/\\"
"""Characters kept out of uids: they need escaping in XML, separate list entries, or split the
path of a URL such as /v1/witsml/logs/{uid}."""
_UNSAFE_UID_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_UNIT_CHARS = 24
_MAX_NULL_VALUE_CHARS = 32
_MIN_WITSML_INTERVAL = 1.0
_MIN_ROW_PERIOD = 0.001
_MAX_ROW_PERIOD = 3600.0


def _collapse_problem(value: str) -> str | None:
    """Return why a WITSML server would store `value` differently from how it is written.

    The WITSML schema collapses white space in every text value: tabs and line
    breaks become spaces, runs of spaces become one, and leading and trailing
    spaces are removed. Returns None for text that it leaves as it is.
    """
    if not value.isprintable():
        return "contains a tab, a line break or another invisible character"
    if value != value.strip(" "):
        return "starts or ends with a space, which WITSML removes"
    if "  " in value:
        return "contains two spaces in a row, which WITSML stores as one"
    return None


_COLLAPSE_FIX = "write it with printable characters and single spaces between words"


def _forbidden_chars(value: str, forbidden: str) -> str:
    """Return the characters of `forbidden` that occur in `value`, separated by spaces."""
    return " ".join(char for char in forbidden if char in value)


def _unit_problem(unit: str) -> str | None:
    """Return why `unit` cannot be a WITSML curve unit, or None when it can ("" is unitless)."""
    if len(unit) > _MAX_UNIT_CHARS:
        return f"has {len(unit)} characters, and WITSML allows at most {_MAX_UNIT_CHARS}"
    if "," in unit:
        return "contains a comma, which separates the entries of the unitList"
    return _collapse_problem(unit)


def _curve_uid(mnemonic: str) -> str:
    """Return the logCurveInfo uid of a mnemonic: characters outside [A-Za-z0-9_.-] become '_'."""
    return _UNSAFE_UID_CHAR.sub("_", mnemonic)


class WitsmlCurve(_Section):
    """One entry of `[witsml.curves]`: the log curve that one channel's readings fill."""

    mnemonic: str = Field(min_length=1, max_length=32)
    unit: str | None = Field(default=None, max_length=_MAX_UNIT_CHARS)
    """Unit of the curve. None takes the channel's own unit, and "" makes the curve unitless."""
    description: str = Field(default="", max_length=256)
    """Text of the curve's curveDescription, which is left out when empty."""

    @model_validator(mode="before")
    @classmethod
    def _written_as_table(cls, data: Any) -> Any:
        if isinstance(data, str):
            msg = (
                "expected a table with the curve's mnemonic, such as "
                '{ mnemonic = "SPPA", unit = "psi" }, got a string'
            )
            raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError as a field error
        return data

    @field_validator("mnemonic")
    @classmethod
    def _valid_mnemonic(cls, value: str) -> str:
        forbidden = _forbidden_chars(value, _FORBIDDEN_MNEMONIC_CHARS)
        if forbidden:
            msg = (
                f"invalid mnemonic {value!r}: WITSML servers reject {forbidden} in a mnemonic; "
                "use letters, digits, spaces, '_', '-' and '.'"
            )
            raise ValueError(msg)
        problem = _collapse_problem(value)
        if problem is not None:
            msg = f"invalid mnemonic {value!r}: it {problem}; {_COLLAPSE_FIX}"
            raise ValueError(msg)
        if value.upper() == _INDEX_MNEMONIC:
            msg = (
                f"mnemonic {value!r} is reserved for the time index curve that the agent puts "
                "first in every log: choose another mnemonic for this channel"
            )
            raise ValueError(msg)
        return value

    @field_validator("unit")
    @classmethod
    def _valid_unit(cls, value: str | None) -> str | None:
        problem = _unit_problem(value) if value is not None else None
        if problem is not None:
            msg = (
                f"invalid unit {value!r}: it {problem}; write the unit as the WITSML units "
                'dictionary does, such as "psi" or "kft.lbf"'
            )
            raise ValueError(msg)
        return value

    @field_validator("description")
    @classmethod
    def _valid_description(cls, value: str) -> str:
        problem = _collapse_problem(value)
        if problem is not None:
            msg = f"invalid description: it {problem}; {_COLLAPSE_FIX}"
            raise ValueError(msg)
        return value


NullValueText = Annotated[
    str,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": _MAX_NULL_VALUE_CHARS},
                {"type": "number"},
            ],
            "description": 'Text of a missing value in the log, such as "-999.25".',
        },
        mode="validation",
    ),
]
"""The log's null value, written in TOML as a string or a number and stored as text."""


class WitsmlSection(_Section):
    """The `[witsml]` table: the WITSML 1.4.1.1 time log that readings are uploaded as.

    The log goes to the service of `[cloud]`, with the same device key.
    """

    interval: Duration = 60.0
    """How often the sink uploads the rows that closed since its last upload, at least 1s."""
    row_period: Duration = 1.0
    """Width of one row, 1ms to 1h. Rows start at whole multiples of it since the Unix epoch."""
    settle: NonNegativeDuration = 5.0
    """How long after its end a row is uploaded, so that late readings still reach it."""
    max_rows: int = Field(default=10_000, ge=1, le=100_000, strict=True)
    null_value: NullValueText = "-999.25"
    well_uid: str = Field(min_length=1, max_length=64)
    well_name: str = Field(min_length=1, max_length=64)
    wellbore_uid: str = Field(min_length=1, max_length=64)
    wellbore_name: str = Field(min_length=1, max_length=64)
    log_uid: str = Field(min_length=1, max_length=64)
    log_name: str = Field(min_length=1, max_length=64)
    curves: dict[str, WitsmlCurve]
    """Curves by key: a channel name, or "SOURCE/CHANNEL" to pick one source's channel."""

    @field_validator("interval")
    @classmethod
    def _interval_at_least_1s(cls, value: float) -> float:
        if value < _MIN_WITSML_INTERVAL:
            msg = (
                f"interval {format_duration(value)} is too short: expected at least 1s, "
                "because each upload is an HTTPS request that carries a whole document"
            )
            raise ValueError(msg)
        return value

    @field_validator("settle")
    @classmethod
    def _settle_at_most_1h(cls, value: float) -> float:
        if value > _MAX_ROW_PERIOD:
            msg = (
                "too long: expected at most 1h, because no row is uploaded until its "
                "period ended this long ago"
            )
            raise ValueError(msg)
        return value

    @field_validator("row_period")
    @classmethod
    def _row_period_in_range(cls, value: float) -> float:
        if not _MIN_ROW_PERIOD <= value <= _MAX_ROW_PERIOD:
            msg = "out of range: expected a duration from 1ms to 1h"
            raise ValueError(msg)
        microseconds = value * 1_000_000
        if abs(microseconds - round(microseconds)) > 1e-3:
            msg = (
                "row_period is not a whole number of microseconds, the resolution of reading "
                'time stamps: round it, such as "1500ms"'
            )
            raise ValueError(msg)
        return value

    @field_validator("null_value", mode="before")
    @classmethod
    def _null_value_as_text(cls, value: object) -> object:
        """Turn a TOML number into its text; -999.25 becomes "-999.25"."""
        if isinstance(value, bool):
            msg = 'expected a number or a string such as "-999.25", got a boolean'
            raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError as a field error
        if isinstance(value, float) and not math.isfinite(value):
            msg = (
                f"null_value {value} is not a finite number, and a WITSML log carries only "
                "finite numbers in numeric columns; use a number such as -999.25"
            )
            raise ValueError(msg)
        if isinstance(value, int | float):
            return repr(value)
        return value

    @field_validator("null_value")
    @classmethod
    def _valid_null_value(cls, value: str) -> str:
        fix = 'use a number such as "-999.25"'
        if not value:
            msg = f"null_value must not be empty, because WITSML rejects an empty nullValue; {fix}"
        elif len(value) > _MAX_NULL_VALUE_CHARS:
            msg = (
                f"null_value has {len(value)} characters, and WITSML allows at most "
                f"{_MAX_NULL_VALUE_CHARS}; {fix}"
            )
        elif "," in value:
            msg = f"null_value contains a comma, which separates the values of a data row; {fix}"
        elif not value.isprintable() or any(char.isspace() for char in value):
            msg = f"null_value contains white space or an invisible character; {fix}"
        elif _is_non_finite_number(value):
            msg = (
                f"null_value {value!r} is not a finite number, and a WITSML log carries only "
                f"finite numbers in numeric columns; {fix}"
            )
        else:
            return value
        raise ValueError(msg)

    @field_validator("well_uid", "wellbore_uid", "log_uid")
    @classmethod
    def _valid_uid(cls, value: str) -> str:
        if not value.isprintable() or any(char.isspace() for char in value):
            msg = "invalid uid: WITSML uids contain no spaces or other white space; use '-' or '_'"
            raise ValueError(msg)
        forbidden = _forbidden_chars(value, _FORBIDDEN_UID_CHARS)
        if forbidden:
            msg = f"invalid uid: it contains {forbidden}; use letters, digits, '_', '-' and '.'"
            raise ValueError(msg)
        return value

    @field_validator("well_name", "wellbore_name", "log_name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        problem = _collapse_problem(value)
        if problem is not None:
            msg = f"invalid name: it {problem}; {_COLLAPSE_FIX}"
            raise ValueError(msg)
        return value

    @field_validator("curves")
    @classmethod
    def _some_curves(cls, value: dict[str, WitsmlCurve]) -> dict[str, WitsmlCurve]:
        if not value:
            msg = (
                "no curves: add one line per channel to [witsml.curves], such as "
                'standpipe_pressure = { mnemonic = "SPPA", unit = "psi" }'
            )
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _unique_mnemonics_and_uids(self) -> WitsmlSection:
        key_of_mnemonic: dict[str, str] = {}
        key_of_uid: dict[str, str] = {}
        for key, curve in self.curves.items():
            first = key_of_mnemonic.setdefault(curve.mnemonic.lower(), key)
            if first != key:
                other = self.curves[first].mnemonic
                written = f" ({other!r})" if other != curve.mnemonic else ""
                msg = (
                    f"mnemonic {curve.mnemonic!r} of curve {key!r} is also the mnemonic of "
                    f"curve {first!r}{written}, and the mnemonics of a log must differ in more "
                    "than letter case: give this curve another mnemonic"
                )
                raise _error_at(msg, "curves", key, "mnemonic")
            uid = _curve_uid(curve.mnemonic)
            first = key_of_uid.setdefault(uid, key)
            if first != key:
                other = self.curves[first].mnemonic
                msg = (
                    f"mnemonics {other!r} (curve {first!r}) and {curve.mnemonic!r} (curve "
                    f"{key!r}) both give the curve uid {uid!r}, because each character other "
                    "than letters, digits, '_', '.' and '-' becomes '_' in a uid: change one "
                    "of the two mnemonics"
                )
                raise _error_at(msg, "curves", key, "mnemonic")
        return self

    @property
    def row_period_us(self) -> int:
        """Width of one row in whole microseconds."""
        return round(self.row_period * 1_000_000)


def _is_non_finite_number(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


@dataclass(frozen=True)
class WitsmlColumn:
    """One curve of `[witsml.curves]`, resolved to the channel that fills it, in file order."""

    key: str
    """The key as written in [witsml.curves]."""
    source: str | None
    """The source of a "SOURCE/CHANNEL" key, or None for a bare channel name (of one source)."""
    channel: str
    mnemonic: str
    unit: str
    """The curve's unit, or else the channel's unit, with "" for a unitless curve."""
    uid: str
    """The logCurveInfo uid: the mnemonic with each character outside [A-Za-z0-9_.-] as '_'."""
    description: str


_AnySource = ModbusSource | Wits0Source


def _wits0_codes(source: Wits0Source) -> list[str]:
    """Return the codes that the source maps by name: its items table or the standard table."""
    return list(STANDARD_01) if isinstance(source.items, str) else list(source.items)


def _channel_unit(source: _AnySource, channel: str) -> str | None:
    """Return the unit of a channel of `source`, or None when the source has no such channel."""
    if isinstance(source, ModbusSource):
        return next((point.unit for point in source.points if point.channel == channel), None)
    unmapped = _UNMAPPED_CHANNEL.fullmatch(channel)
    codes = [unmapped.group(1)] if unmapped is not None else []
    codes.extend(_wits0_codes(source))
    for code in codes:
        mapped = source.map_code(code)
        if mapped is not None and mapped.channel == channel:
            return mapped.unit
    return None


def _named_channels(source: _AnySource) -> list[str]:
    """Return the channels of `source` that have a name of their own (not wits_NNNN)."""
    if isinstance(source, ModbusSource):
        return [point.channel for point in source.points]
    names = []
    for code in _wits0_codes(source):
        mapped = source.map_code(code)
        if mapped is not None:
            names.append(mapped.channel)
    return names


def _unmapped_code_problem(source: _AnySource, channel: str) -> str | None:
    """Explain why a `wits_NNNN` channel does not exist in a WITS0 source, or return None."""
    match = _UNMAPPED_CHANNEL.fullmatch(channel)
    if match is None or not isinstance(source, Wits0Source):
        return None
    code = match.group(1)
    mapped = source.map_code(code)
    if mapped is None:
        return (
            f"channel {channel!r} would carry the unmapped WITS code {code}, but source "
            f'{source.name!r} drops unmapped codes (unmapped = "drop"): set '
            f'unmapped = "keep" in that source, or map code {code} to a channel and use '
            "that channel's name"
        )
    if mapped.channel != channel:
        return (
            f"WITS code {code} of source {source.name!r} feeds channel {mapped.channel!r}, "
            f"not {channel!r}: use {mapped.channel!r} as the key"
        )
    return None


def _find_curve_channel(key: str, sources: list[_AnySource]) -> tuple[_AnySource, str, str]:
    """Return the source, channel and channel unit that a [witsml.curves] key names.

    Raises a validation error at the key when the key names no channel, or a
    bare channel name that several sources have.
    """
    at = ("witsml", "curves", key)
    if "/" in key:
        return _find_source_channel(key, sources)
    found = [
        (source, unit) for source in sources if (unit := _channel_unit(source, key)) is not None
    ]
    if len(found) == 1:
        source, unit = found[0]
        return source, key, unit
    if found:
        owners = " and ".join(repr(source.name) for source, _ in found)
        choices = " or ".join(f'"{source.name}/{key}"' for source, _ in found)
        msg = f"channel {key!r} exists in sources {owners}: write the key as {choices} to pick one"
        raise _error_at(msg, *at)
    for source in sources:
        problem = _unmapped_code_problem(source, key)
        if problem is not None:
            raise _error_at(problem, *at)
    if not sources:
        msg = (
            f"unknown channel {key!r}: this file has no sources, so no channel can fill the "
            "curve; add the [[sources.modbus]] or [[sources.wits0]] table that reads it"
        )
        raise _error_at(msg, *at)
    names = [name for source in sources for name in _named_channels(source)]
    msg = (
        f"unknown channel {key!r}: no source has a channel of that name; expected a channel "
        'of a Modbus point or a WITS0 item, or "SOURCE/CHANNEL"'
        f"{_suggestion(key, names)}"
    )
    raise _error_at(msg, *at)


def _find_source_channel(key: str, sources: list[_AnySource]) -> tuple[_AnySource, str, str]:
    """Resolve a "SOURCE/CHANNEL" key, as `_find_curve_channel` does."""
    at = ("witsml", "curves", key)
    source_name, _, channel = key.partition("/")
    if not source_name or not channel or "/" in channel:
        msg = (
            f'invalid curve key {key!r}: expected a channel name, or "SOURCE/CHANNEL" with '
            "one '/' between a source name and one of its channels"
        )
        raise _error_at(msg, *at)
    source = next((source for source in sources if source.name == source_name), None)
    if source is None:
        names = [source.name for source in sources]
        listed = ", ".join(repr(name) for name in names) if names else "none"
        msg = (
            f"unknown source {source_name!r} in curve key {key!r}: the sources of this file "
            f"are {listed}{_suggestion(source_name, names)}"
        )
        raise _error_at(msg, *at)
    unit = _channel_unit(source, channel)
    if unit is not None:
        return source, channel, unit
    problem = _unmapped_code_problem(source, channel)
    if problem is None:
        hint = _suggestion(channel, _named_channels(source))
        problem = f"source {source_name!r} has no channel {channel!r}{hint}"
    raise _error_at(problem, *at)


def _resolve_witsml_columns(
    section: WitsmlSection, sources: list[_AnySource]
) -> list[tuple[WitsmlColumn, _AnySource]]:
    """Resolve every curve of [witsml.curves] to its channel and unit, in file order.

    Raises a validation error at the key of the first curve that names no
    channel, a channel that an earlier key names already, or a channel whose
    unit cannot be a WITSML unit while the curve sets none.
    """
    resolved: list[tuple[WitsmlColumn, _AnySource]] = []
    key_of_channel: dict[tuple[str, str], str] = {}
    for key, curve in section.curves.items():
        source, channel, channel_unit = _find_curve_channel(key, sources)
        first = key_of_channel.setdefault((source.name, channel), key)
        if first != key:
            msg = (
                f"curves {first!r} and {key!r} both name channel {channel!r} of source "
                f"{source.name!r}, and a channel fills one curve: remove one of the two"
            )
            raise _error_at(msg, "witsml", "curves", key)
        unit = curve.unit
        if unit is None:
            problem = _unit_problem(channel_unit)
            if problem is not None:
                msg = (
                    f"channel {channel!r} of source {source.name!r} has unit {channel_unit!r}, "
                    f"which cannot be a WITSML unit: it {problem}; set unit in this curve, "
                    'such as unit = "psi"'
                )
                raise _error_at(msg, "witsml", "curves", key)
            unit = channel_unit
        column = WitsmlColumn(
            key=key,
            source=source.name if "/" in key else None,
            channel=channel,
            mnemonic=curve.mnemonic,
            unit=unit,
            uid=_curve_uid(curve.mnemonic),
            description=curve.description,
        )
        resolved.append((column, source))
    return resolved


class Config(_Section):
    """The whole config file."""

    agent: AgentSection
    buffer: BufferSection = BufferSection()
    sources: Sources = Sources()
    mqtt: MqttSection | None = None
    cloud: CloudSection | None = None
    witsml: WitsmlSection | None = None

    @model_validator(mode="after")
    def _unique_source_names(self) -> Config:
        first_place: dict[str, str] = {}
        for protocol, index, source in self._all_sources():
            place = f"sources.{protocol}[{index}]"
            first = first_place.setdefault(source.name, place)
            if first != place:
                msg = (
                    f"source name {source.name!r} is used twice ({first} and {place}): "
                    "give each source its own name"
                )
                raise _error_at(msg, "sources", protocol, index, "name")
        return self

    @model_validator(mode="after")
    def _wits0_ports_unshared(self) -> Config:
        """Reject two sources that would open one serial port or listen on one TCP port."""
        owners: dict[str, str] = {}
        for source in self.sources.modbus:
            if source.endpoint.is_serial:
                owners.setdefault(f"serial port {source.endpoint.path}", source.name)
        for index, wits0 in enumerate(self.sources.wits0):
            link = wits0.link
            if link.kind == "tcp":
                continue
            key = f"serial port {link.path}" if link.is_serial else f"TCP port {link.port}"
            owner = owners.setdefault(key, wits0.name)
            if owner != wits0.name:
                msg = (
                    f"sources {owner!r} and {wits0.name!r} both open {key}, which only one "
                    "source can hold: give each WITS0 source its own port"
                )
                raise _error_at(msg, "sources", "wits0", index, "url")
        return self

    def _all_sources(self) -> list[tuple[str, int, ModbusSource | Wits0Source]]:
        """Return (protocol, index, source) for every source, in the order of the file's tables."""
        listed: list[tuple[str, int, ModbusSource | Wits0Source]] = []
        listed.extend(("modbus", index, source) for index, source in enumerate(self.sources.modbus))
        listed.extend(("wits0", index, source) for index, source in enumerate(self.sources.wits0))
        return listed

    @model_validator(mode="after")
    def _shared_buses_agree(self) -> Config:
        first_on_bus: dict[str, int] = {}
        first_unit: dict[tuple[str, int], int] = {}
        for index, source in enumerate(self.sources.modbus):
            endpoint = source.endpoint
            first = first_on_bus.setdefault(endpoint.bus_key, index)
            if first != index:
                _check_same_bus(self.sources.modbus[first], source, index)
            unit_first = first_unit.setdefault((endpoint.bus_key, source.unit_id), index)
            if unit_first != index:
                other = self.sources.modbus[unit_first]
                msg = (
                    f"sources {other.name!r} and {source.name!r} both read unit {source.unit_id} "
                    f"on {endpoint.bus_key}: give each device on one bus its own unit_id, "
                    "or merge their points into one source"
                )
                raise _error_at(msg, "sources", "modbus", index, "unit_id")
        return self

    @model_validator(mode="after")
    def _witsml_needs_cloud(self) -> Config:
        if self.witsml is not None and self.cloud is None:
            msg = (
                "[witsml] uploads the log to the service of [cloud] with its device key, but "
                "this file has no [cloud] table: add [cloud] with url, device_id and "
                "private_key_file, or remove [witsml]"
            )
            raise _error_at(msg, "witsml")
        return self

    @model_validator(mode="after")
    def _witsml_curves_resolve(self) -> Config:
        if self.witsml is not None:
            _resolve_witsml_columns(self.witsml, self._source_list())
        return self

    def _source_list(self) -> list[ModbusSource | Wits0Source]:
        return [source for _, _, source in self._all_sources()]

    def enabled_sinks(self) -> list[str]:
        """Return the names of the sinks this config enables, in a fixed order."""
        sinks: list[str] = []
        if self.mqtt is not None:
            sinks.append("mqtt")
        if self.cloud is not None:
            sinks.append("cloud")
        if self.witsml is not None:
            sinks.append("witsml")
        return sinks

    def witsml_columns(self) -> list[WitsmlColumn]:
        """Return the curves of [witsml.curves] resolved to their channels, in file order.

        Returns [] without a [witsml] table.
        """
        if self.witsml is None:
            return []
        return [column for column, _ in _resolve_witsml_columns(self.witsml, self._source_list())]

    def witsml_column_source(self, column: WitsmlColumn) -> str:
        """Return the name of the source whose channel fills `column`, also for a bare key."""
        if column.source is not None:
            return column.source
        for source in self._source_list():
            if _channel_unit(source, column.channel) is not None:
                return source.name
        msg = f"no source of this config has channel {column.channel!r}"
        raise ValueError(msg)

    def topic_prefix(self) -> str:
        """Return the MQTT topic prefix with `{rig_id}` filled in."""
        prefix = self.mqtt.topic_prefix if self.mqtt else "rigs/{rig_id}"
        return prefix.replace("{rig_id}", self.agent.rig_id)


def _check_same_bus(first: ModbusSource, source: ModbusSource, index: int) -> None:
    """Raise if two sources on one bus disagree on its serial settings or frame pause."""
    endpoint = source.endpoint
    if endpoint.is_serial:
        mine, theirs = _serial_settings(endpoint), _serial_settings(first.endpoint)
        for key, value in mine.items():
            if value != theirs[key]:
                msg = (
                    f"sources {first.name!r} and {source.name!r} share serial port "
                    f"{endpoint.path} but set {key} {theirs[key]} and {value}: every device on "
                    "one port uses the same serial settings, so make the two URLs agree"
                )
                raise _error_at(msg, "sources", "modbus", index, "url")
    if source.frame_pause != first.frame_pause:
        msg = (
            f"sources {first.name!r} and {source.name!r} share {endpoint.bus_key} but set "
            f"frame_pause {format_duration(first.frame_pause)} and "
            f"{format_duration(source.frame_pause)}: the pause belongs to the bus, so give "
            "both the same value"
        )
        raise _error_at(msg, "sources", "modbus", index, "frame_pause")
