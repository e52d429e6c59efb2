"""Commissioning tools: `rig-agent modbus read` and `rig-agent modbus scan`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TextIO

from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from config.units import format_duration, parse_duration
from drivers.modbus_decode import decode_registers
from drivers.modbus_transport import Endpoint, ModbusClient, make_client, parse_modbus_url
from drivers.modbus_types import (
    BIT_TABLES,
    DATA_TYPES,
    TABLES,
    ModiconAddress,
    modicon_from_integer,
    parse_modicon,
)

__all__ = [
    "DECODED_TYPES",
    "EXIT_DEVICE",
    "EXIT_USAGE",
    "ORDER_LAYOUTS",
    "Target",
    "UsageError",
    "format_bits",
    "format_decoded",
    "format_float",
    "format_registers",
    "modicon_reference",
    "parse_address",
    "parse_unit_ids",
    "run_read",
    "run_scan",
]

EXIT_OK = 0
EXIT_USAGE = 1
"""Exit code for invalid arguments: nothing was sent to the device."""
EXIT_DEVICE = 2
"""Exit code for a failed connection, a timeout or a Modbus exception response."""
EXIT_INTERRUPTED = 130

ADDRESS_MAX = 65535
UNIT_MAX = 255
"""Highest unit id a Modbus TCP header can carry; a serial bus allows 1 to 247."""
SERIAL_UNIT_MAX = 247
DEFAULT_REGISTER_COUNT = 2
"""Registers `modbus read` reads without --count: enough for one 32-bit value."""
DEFAULT_BIT_COUNT = 8
GUARD_MARGIN = 0.25
"""Seconds added to the request timeout for our own deadline around each library call."""

ORDER_LAYOUTS = (
    ("ABCD", "big", "big"),
    ("CDAB", "little", "big"),
    ("BADC", "big", "little"),
    ("DCBA", "little", "little"),
)
"""Column name, word order and byte order of the four layouts a device may use."""

DECODED_TYPES = ("int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64")
"""Types `modbus read` decodes by default; bool is left out because the binary column shows bits."""
_TABLE_NAMES = {
    "holding": ("holding register", "holding registers"),
    "input": ("input register", "input registers"),
    "coil": ("coil", "coils"),
    "discrete": ("discrete input", "discrete inputs"),
}
_OTHER_TABLE = {"holding": "input", "input": "holding", "coil": "discrete", "discrete": "coil"}
_DIGITS_RE = re.compile(r"[0-9]+")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+")
_ERRNO_RE = re.compile(r"\[Errno (\d+)\]")
_FIXED_MIN = 1e-4
_FIXED_MAX = 1e9
"""Floats whose size lies outside these bounds are printed in exponent form."""
_COLUMN_GAP = "   "
_GATEWAY_CODES = (10, 11)
"""Exception codes a gateway sends on behalf of a unit id that has no device behind it."""

# Modbus exception codes with the name the protocol specification gives them,
# and what each one usually means during commissioning.
_EXCEPTIONS: dict[int, tuple[str, str]] = {
    1: ("ILLEGAL_FUNCTION", "the device does not serve this table: try --table {other}"),
    2: (
        "ILLEGAL_DATA_ADDRESS",
        "the device has no {name} at some address of the range. The manual may count "
        "from 1 (try --address-base 1, or one address lower), the values may be in "
        "another table (try --table {other}), or the range may cross a gap (try --count 1)",
    ),
    3: ("ILLEGAL_DATA_VALUE", "the device rejected the request: try a smaller --count"),
    4: (
        "SERVER_DEVICE_FAILURE",
        "the device failed to read the value; some TCP gateways also return this code "
        "for a unit id they do not know (check --unit)",
    ),
    5: ("ACKNOWLEDGE", "the device accepted a long operation: read again later"),
    6: ("SERVER_DEVICE_BUSY", "the device is busy: read again later"),
    7: ("NEGATIVE_ACKNOWLEDGE", "the device cannot perform the request"),
    8: ("MEMORY_PARITY_ERROR", "the device found a memory fault: check the device"),
    10: (
        "GATEWAY_PATH_UNAVAILABLE",
        "the gateway has no route to this unit id: check --unit and the gateway's settings",
    ),
    11: (
        "GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND",
        "the gateway got no response on its serial side: check --unit, the wiring "
        "and the gateway's baud rate and parity",
    ),
}


class UsageError(ValueError):
    """An invalid command-line argument; the message names the value and the fix."""


class DeviceError(Exception):
    """A connection failure, timeout or exception response that ends the command."""


class ConnectionLostError(DeviceError):
    """The connection dropped during a request."""


@dataclass(frozen=True, slots=True)
class Target:
    """The table and 0-based address a command reads, and how the user wrote the address."""

    table: str
    address: int
    modicon: str = ""
    """Name of the Modicon notation the address was written in, or "" for a plain address."""


# Argument parsing


def parse_address(text: str, table: str | None = None, address_base: int | None = None) -> Target:
    """Parse `--address` as the config reads a point address.

    Without `address_base`, Modicon notation is accepted as the config accepts
    it: a form with an "x" ("4x0101") or a leading 0 ("00101") always, and a
    number such as 40101 or 300101 only when no table is given, so that
    `--table holding --address 40101` reads plain address 40101. With
    `address_base` (0 or 1) the address is a plain number counted from it.
    Raises UsageError naming the value and the fix.
    """
    text = text.strip()
    if address_base is None:
        modicon = _parse_modicon(text, table)
        if modicon is not None:
            return modicon
    if not _DIGITS_RE.fullmatch(text):
        msg = (
            f"invalid address {text!r}: expected a number such as 100, or Modicon notation "
            "such as 40101 or 4x0101 (which cannot be combined with --address-base)"
        )
        raise UsageError(msg)

    base = address_base or 0
    address = int(text) - base
    if not 0 <= address <= ADDRESS_MAX:
        low, high = base, ADDRESS_MAX + base
        msg = f"invalid address {text}: expected {low} to {high} with --address-base {base}"
        raise UsageError(msg)
    return Target(table or "holding", address)


def _parse_modicon(text: str, table: str | None) -> Target | None:
    if text.lower().startswith("0x"):
        # Both hexadecimal and the coil form of Modicon notation start with 0x.
        as_hex = f" ({text} in hexadecimal is {int(text, 16)})" if _HEX_RE.fullmatch(text) else ""
        msg = (
            f"address {text!r} is ambiguous: write a hexadecimal address in decimal{as_hex}, "
            f"or a coil in Modicon notation without the x, such as 0{text[2:].zfill(4)}"
        )
        raise UsageError(msg)
    modicon: ModiconAddress | None = None
    if "x" in text.lower() or (text.startswith("0") and len(text) in (5, 6)):
        try:
            modicon = parse_modicon(text)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    elif _DIGITS_RE.fullmatch(text) and table is None:
        modicon = modicon_from_integer(int(text))
    if modicon is None:
        return None
    if table is not None and table != modicon.table:
        digit = TABLES[table].modicon_digit
        msg = (
            f"address {text} is a {modicon.table} address in Modicon {modicon.notation} "
            f"notation, but --table is {table}: drop --table, or write the {table} address "
            f"as {digit}x{modicon.address + 1}"
        )
        raise UsageError(msg)
    return Target(modicon.table, modicon.address, modicon=f"Modicon {modicon.notation} notation")


def parse_unit_ids(text: str, highest: int = UNIT_MAX) -> list[int]:
    """Parse a unit id list such as "1-10,15,20-22" into sorted, distinct ids.

    Ids run from 1 (0 is the broadcast address, to which no device responds) to
    `highest`. Raises UsageError naming the bad item.
    """
    units: set[int] = set()
    for item in text.split(","):
        first, dash, last = item.strip().partition("-")
        if not _DIGITS_RE.fullmatch(first) or (dash and not _DIGITS_RE.fullmatch(last)):
            msg = (
                f"invalid unit id list {text!r}: {item.strip()!r} is not a number or a "
                'range; write ids and ranges separated by commas, such as "1-10,15,20-22"'
            )
            raise UsageError(msg)
        low = int(first)
        high = int(last) if last else low
        if low > high:
            msg = f"invalid unit id range {item.strip()!r}: write the lower id first"
            raise UsageError(msg)
        if low < 1 or high > highest:
            msg = f"invalid unit id {item.strip()!r}: unit ids run from 1 to {highest}"
            raise UsageError(msg)
        units.update(range(low, high + 1))
    return sorted(units)


def parse_timeout(text: str) -> float:
    """Parse `--timeout` as the config writes durations ("200ms", "1s"); raise UsageError."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        msg = f"invalid --timeout: {exc}"
        raise UsageError(msg) from exc


def parse_types(text: str | None) -> list[str]:
    """Parse `--types`, a comma-separated list of type names; None means every type."""
    if text is None:
        return list(DECODED_TYPES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DECODED_TYPES]
    if unknown or not names:
        msg = f"invalid --types {text!r}: expected names from {', '.join(DECODED_TYPES)}"
        raise UsageError(msg)
    return names


def _check_count(table: str, address: int, count: int) -> None:
    limit = TABLES[table].max_per_read
    if not 1 <= count <= limit:
        msg = f"invalid --count {count}: one read of {_TABLE_NAMES[table][1]} takes 1 to {limit}"
        raise UsageError(msg)
    if address + count - 1 > ADDRESS_MAX:
        msg = (
            f"invalid --count {count}: address {address} plus {count} runs past "
            f"address {ADDRESS_MAX}; read at most {ADDRESS_MAX + 1 - address}"
        )
        raise UsageError(msg)


def _check_unit(endpoint: Endpoint, unit: int) -> None:
    highest = SERIAL_UNIT_MAX if endpoint.kind != "tcp" else UNIT_MAX
    if not 1 <= unit <= highest:
        msg = (
            f"invalid --unit {unit}: expected 1 to {highest} on {endpoint.kind}; "
            "0 is the broadcast address, to which no device responds"
        )
        raise UsageError(msg)


def _parse_url(url: str) -> Endpoint:
    try:
        return parse_modbus_url(url)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


# Formatting


def modicon_reference(table: str, address: int) -> str:
    """Return the Modicon reference of a 0-based address: holding 100 is 40101."""
    number = address + 1
    digit = TABLES[table].modicon_digit
    return f"{digit}{number:04d}" if number <= 9999 else f"{digit}{number:05d}"


def format_float(value: float, single: bool) -> str:
    """Format a decoded float with the fewest digits that give back the same value.

    `single` marks a float32, whose shortest form has fewer digits. NaN and
    infinities are spelt out. Values outside 1e-4 to 1e9 use exponent form,
    so that a float decoded in the wrong layout (often near 1e+38 or 1e-40)
    is easy to spot.
    """
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    digits, text = _shortest(value, single)
    if _FIXED_MIN <= abs(value) < _FIXED_MAX:
        fixed = format(Decimal(text), "f")
        if len(fixed) <= 20:
            return fixed
    return f"{value:.{digits - 1}e}"


def _shortest(value: float, single: bool) -> tuple[int, str]:
    """Return the fewest significant digits that round-trip `value`, and that text."""
    for digits in range(1, 18):
        text = f"{value:.{digits}g}"
        if single:
            # Rounding near the float32 maximum can give text that float32 cannot hold.
            with contextlib.suppress(OverflowError):
                if struct.pack(">f", float(text)) == struct.pack(">f", value):
                    return digits, text
            continue
        if float(text) == value:
            return digits, text
    return 17, f"{value:.17g}"


def _format_value(value: int | float, type_name: str) -> str:
    if isinstance(value, float):
        return format_float(value, single=type_name == "float32")
    return str(value)


def format_registers(table: str, address: int, words: Sequence[int]) -> list[str]:
    """Return the raw register table: address, Modicon reference, decimal, hex, binary, ASCII."""
    header = f"{'address':>7}  {'ref':>6}  {'decimal':>7}  {'hex':>6}  {'binary':<17}  ascii"
    lines = [header]
    for offset, word in enumerate(words):
        high, low = word >> 8, word & 0xFF
        binary = f"{high:08b} {low:08b}"
        ascii_text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in (high, low))
        reference = modicon_reference(table, address + offset)
        lines.append(
            f"{address + offset:>7}  {reference:>6}  {word:>7}  0x{word:04X}  {binary:<17}  "
            f"{ascii_text}"
        )
    return lines


def format_decoded(address: int, words: Sequence[int], type_names: Sequence[str]) -> list[str]:
    """Return one block per type: a row per start address, a column per layout.

    A type appears only where its registers fit in the words read; a note
    names the types that need a larger `--count`.
    """
    lines: list[str] = []
    too_long: list[str] = []
    for type_name in type_names:
        size = DATA_TYPES[type_name].registers
        if len(words) < size:
            too_long.append(f"{type_name} needs {size}")
            continue
        rows: list[tuple[str, list[str]]] = []
        for start in range(len(words) - size + 1):
            chunk = words[start : start + size]
            cells = [
                _format_value(decode_registers(chunk, type_name, word, byte), type_name)
                for _, word, byte in ORDER_LAYOUTS
            ]
            rows.append((str(address + start), cells))
        lines.extend(_format_block(type_name, rows))
        lines.append("")
    if too_long:
        lines.append(f"not shown: {', '.join(too_long)} registers; read more with --count")
    return lines


def _format_block(type_name: str, rows: list[tuple[str, list[str]]]) -> list[str]:
    first = max(len(type_name), *(len(start) for start, _ in rows))
    width = max(4, *(len(cell) for _, cells in rows for cell in cells))
    names = _COLUMN_GAP.join(f"{name:>{width}}" for name, _, _ in ORDER_LAYOUTS)
    lines = [f"{type_name:<{first}}{_COLUMN_GAP}{names}"]
    for start, cells in rows:
        values = _COLUMN_GAP.join(f"{cell:>{width}}" for cell in cells)
        lines.append(f"{start:>{first}}{_COLUMN_GAP}{values}")
    return lines


def format_bits(address: int, bits: Sequence[bool]) -> list[str]:
    """Return the bits as rows of eight, each row headed by the address of its first bit."""
    lines = ["address  " + " ".join(f"+{column}" for column in range(8))]
    for row in range(0, len(bits), 8):
        cells = " ".join(f"{int(bit):>2}" for bit in bits[row : row + 8])
        lines.append(f"{address + row:>7}  {cells}")
    return lines


def _range_label(target: Target, count: int) -> str:
    singular, plural = _TABLE_NAMES[target.table]
    last = target.address + count - 1
    if count == 1:
        label = f"{singular} {target.address}"
        references = modicon_reference(target.table, target.address)
    else:
        label = f"{plural} {target.address}..{last}"
        first_ref = modicon_reference(target.table, target.address)
        references = f"{first_ref}..{modicon_reference(target.table, last)}"
    return f"{label} (0-based; Modicon {references})"


def _describe_exception(code: int, table: str) -> tuple[str, str]:
    name, hint = _EXCEPTIONS.get(code, ("UNKNOWN", "see the device manual for this code"))
    singular = _TABLE_NAMES[table][0]
    return name, hint.format(name=singular, other=_OTHER_TABLE[table])


# Talking to the device


class _LibraryLog(logging.Handler):
    """Log handler that collects pymodbus messages, for error messages and to keep output clean."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def connect_failure(self) -> str:
        """Return the reason of the last failed connect that pymodbus logged, or ""."""
        for message in reversed(self.messages):
            if message.startswith("Failed to connect"):
                reason = message.removeprefix("Failed to connect").strip()
                errno = _ERRNO_RE.search(reason)
                return os.strerror(int(errno.group(1))) if errno else reason
        return ""


@contextlib.contextmanager
def _quiet_library() -> Iterator[_LibraryLog]:
    """Route pymodbus log records into a list for the duration of one command."""
    logger = logging.getLogger("pymodbus.logging")
    handler = _LibraryLog()
    propagate, level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    # The agent's logging setup silences pymodbus; the connect failure reason is
    # logged at WARNING, so let at least that through to the handler.
    logger.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        logger.setLevel(level)


async def _connect(
    endpoint: Endpoint, request_timeout: float, library: _LibraryLog
) -> ModbusClient:
    """Connect a fresh client; raise DeviceError with the reason and what to check."""
    client = make_client(endpoint, request_timeout, name="rig-agent-modbus")
    connected = False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(request_timeout + GUARD_MARGIN):
            connected = await client.connect()
    if connected:
        return client
    client.close()

    reason = library.connect_failure() or f"no connection within {format_duration(request_timeout)}"
    if endpoint.is_serial:
        msg = (
            f"could not open serial port {endpoint.path}: {reason}. Check the path "
            "(ls -l /dev/serial/by-id/), that no other program such as a running "
            "rig-agent holds the port, and that this user may use it (group dialout)"
        )
    else:
        msg = (
            f"could not connect to {endpoint.describe()}: {reason}. Check the host and "
            "port and that the device or gateway is on this network. A device that "
            "takes one connection at a time refuses a second one while rig-agent polls it"
        )
    raise DeviceError(msg)


async def _request(
    client: ModbusClient, target: Target, count: int, unit: int, request_timeout: float
) -> ModbusPDU | None:
    """Send one read; return the response (possibly an exception response) or None on timeout."""
    readers = {
        "holding": client.read_holding_registers,
        "input": client.read_input_registers,
        "coil": client.read_coils,
        "discrete": client.read_discrete_inputs,
    }
    try:
        async with asyncio.timeout(request_timeout + GUARD_MARGIN):
            return await readers[target.table](target.address, count=count, device_id=unit)
    except (TimeoutError, ModbusIOException):
        return None
    except (ConnectionException, OSError) as exc:
        msg = f"connection lost during the read: {exc}"
        raise ConnectionLostError(msg) from exc
    except ModbusException as exc:
        msg = f"the read failed: {exc}"
        raise DeviceError(msg) from exc


# modbus read


def run_read(
    url: str,
    *,
    unit: int,
    table: str | None,
    address: str,
    count: int | None,
    timeout: str,
    address_base: int | None = None,
    types: str | None = None,
) -> int:
    """Read once and print the raw values and every decoding; return the exit code."""
    try:
        endpoint = _parse_url(url)
        _check_unit(endpoint, unit)
        target = parse_address(address, table, address_base)
        if count is None:
            count = DEFAULT_BIT_COUNT if target.table in BIT_TABLES else DEFAULT_REGISTER_COUNT
        _check_count(target.table, target.address, count)
        seconds = parse_timeout(timeout)
        type_names = parse_types(types)
    except UsageError as exc:
        print(f"rig-agent modbus read: {exc}", file=sys.stderr)
        return EXIT_USAGE

    _note_modicon(address, target)
    try:
        with _quiet_library() as library:
            response = asyncio.run(_read(endpoint, target, count, unit, seconds, library))
    except DeviceError as exc:
        print(f"rig-agent modbus read: {exc}", file=sys.stderr)
        return EXIT_DEVICE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED

    _print_read(endpoint, unit, target, count, response, type_names)
    return EXIT_OK


def _print_read(
    endpoint: Endpoint,
    unit: int,
    target: Target,
    count: int,
    response: ModbusPDU,
    type_names: Sequence[str],
) -> None:
    print(f"{_range_label(target, count)}, unit {unit}, {endpoint.describe()}")
    print()
    if target.table in BIT_TABLES:
        print("\n".join(format_bits(target.address, response.bits[:count])))
        return
    words = list(response.registers)
    print("\n".join(format_registers(target.table, target.address, words)))
    print()
    print("Decoded at each start address. A B C D are the bytes of the value, most")
    print("significant first; each column is one layout a device may store them in.")
    print()
    print("\n".join(format_decoded(target.address, words, type_names)).rstrip())


def _note_modicon(address: str, target: Target) -> None:
    """Tell the user when a plain number was read as Modicon notation, and how to avoid it."""
    text = address.strip()
    if target.modicon and _DIGITS_RE.fullmatch(text):
        print(
            f"note: --address {text} is read in {target.modicon}; "
            f"add --address-base 0 to read address {text} itself",
            file=sys.stderr,
        )


async def _read(
    endpoint: Endpoint,
    target: Target,
    count: int,
    unit: int,
    request_timeout: float,
    library: _LibraryLog,
) -> ModbusPDU:
    """Connect, send one read and return a response that contains `count` values."""
    client = await _connect(endpoint, request_timeout, library)
    try:
        response = await _request(client, target, count, unit, request_timeout)
    finally:
        client.close()

    described = _range_label(target, count)
    if response is None:
        msg = (
            f"no response from unit {unit} at {endpoint.describe()} within "
            f"{format_duration(request_timeout)} to a read of {described}. Check --unit "
            "(`rig-agent modbus scan URL` lists the ids that respond). "
        )
        msg += _silence_hint(endpoint)
        raise DeviceError(msg)
    if response.isError():
        code = response.exception_code
        name, hint = _describe_exception(code, target.table)
        msg = f"unit {unit} rejected the read of {described} with exception {code} {name}: {hint}"
        raise DeviceError(msg)
    received = len(response.bits) if target.table in BIT_TABLES else len(response.registers)
    if received < count:
        msg = f"unit {unit} returned {received} values for a read of {count}; read again"
        raise DeviceError(msg)
    return response


def _silence_hint(endpoint: Endpoint) -> str:
    """Return what to check when a device stays silent on this kind of endpoint."""
    if endpoint.is_serial:
        return (
            f"Check the wiring (A and B may be swapped) and that the device uses "
            f"{endpoint.baudrate} baud, parity {endpoint.parity} and {endpoint.stopbits} stop "
            "bit(s), or try a longer --timeout"
        )
    if endpoint.kind == "rtu+tcp":
        return (
            "Check the baud rate and parity of the gateway's serial side, or try a longer --timeout"
        )
    return "Try a longer --timeout"


# modbus scan


@dataclass
class _ScanResult:
    """Unit ids that responded so far, kept outside the coroutine so Ctrl-C can report them."""

    total: int
    probed: int = 0
    found: list[int] = field(default_factory=list)
    gateway_misses: int = 0
    """Ids for which a gateway returned exception 10 or 11: no device is behind the gateway."""
    started: float = field(default_factory=time.monotonic)


def run_scan(
    url: str,
    *,
    units: str,
    table: str | None,
    address: str,
    timeout: str,
) -> int:
    """Probe each unit id with one small read and list those that respond; return the exit code."""
    try:
        endpoint = _parse_url(url)
        highest = SERIAL_UNIT_MAX if endpoint.kind != "tcp" else UNIT_MAX
        unit_ids = parse_unit_ids(units, highest)
        target = parse_address(address, table)
        seconds = parse_timeout(timeout)
    except UsageError as exc:
        print(f"rig-agent modbus scan: {exc}", file=sys.stderr)
        return EXIT_USAGE

    result = _ScanResult(total=len(unit_ids))
    progress = sys.stderr if sys.stderr.isatty() else None
    try:
        with _quiet_library() as library:
            asyncio.run(_scan(endpoint, unit_ids, target, seconds, library, result, progress))
    except DeviceError as exc:
        if result.probed:
            _print_scan_summary(result, stopped=True)
        print(f"rig-agent modbus scan: {exc}", file=sys.stderr)
        return EXIT_DEVICE
    except KeyboardInterrupt:
        _print_scan_summary(result, stopped=True)
        return EXIT_INTERRUPTED
    finally:
        if progress is not None:
            progress.write("\r\033[K")
    return _report_scan(endpoint, result)


def _report_scan(endpoint: Endpoint, result: _ScanResult) -> int:
    """Print the summary of a finished scan and return the exit code: 2 if no id responded."""
    _print_scan_summary(result)
    if not result.found:
        print(
            f"rig-agent modbus scan: no unit id responded at {endpoint.describe()}. "
            f"{_silence_hint(endpoint)}",
            file=sys.stderr,
        )
        return EXIT_DEVICE
    if endpoint.kind == "tcp" and len(result.found) == result.total > 1:
        print("every unit id responded: a Modbus TCP device often ignores the unit id")
    return EXIT_OK


async def _scan(
    endpoint: Endpoint,
    unit_ids: Sequence[int],
    target: Target,
    request_timeout: float,
    library: _LibraryLog,
    result: _ScanResult,
    progress: TextIO | None,
) -> None:
    """Probe the unit ids one after another on one connection, printing each that responds."""
    client = await _connect(endpoint, request_timeout, library)
    # Silent ids are expected here, so keep pymodbus from dropping a TCP connection
    # after a few requests without a response.
    client.set_max_no_responses(len(unit_ids) + 1)
    try:
        for unit in unit_ids:
            if progress is not None:
                progress.write(
                    f"\r\033[Kprobing unit {unit} ({result.probed + 1} of {len(unit_ids)}), "
                    f"{len(result.found)} responded"
                )
                progress.flush()
            if not client.connected:
                client.close()
                client = await _connect(endpoint, request_timeout, library)
            # Some gateways drop the connection after a request for an unknown id.
            response = None
            with contextlib.suppress(ConnectionLostError):
                response = await _request(client, target, 1, unit, request_timeout)
            result.probed += 1
            if response is not None and response.exception_code in _GATEWAY_CODES:
                result.gateway_misses += 1
            elif response is not None:
                result.found.append(unit)
                if progress is not None:
                    progress.write("\r\033[K")
                print(f"unit {unit:>3}: {_describe_probe(response, target)}", flush=True)
    finally:
        client.close()


def _describe_probe(response: ModbusPDU, target: Target) -> str:
    singular = _TABLE_NAMES[target.table][0]
    if response.isError():
        name, _ = _describe_exception(response.exception_code, target.table)
        return f"responded with exception {response.exception_code} {name} (the unit exists)"
    if target.table in BIT_TABLES:
        value = int(response.bits[0]) if response.bits else "?"
    else:
        value = response.registers[0] if response.registers else "?"
    return f"responded, {singular} {target.address} = {value}"


def _print_scan_summary(result: _ScanResult, stopped: bool = False) -> None:
    ids = ", ".join(str(unit) for unit in result.found) or "none"
    elapsed = time.monotonic() - result.started
    after = f", stopped after {result.probed}" if stopped else ""
    print(
        f"{len(result.found)} of {result.total} unit ids responded{after} in {elapsed:.1f} s: {ids}"
    )
    if result.gateway_misses:
        print(
            f"{result.gateway_misses} more {'id' if result.gateway_misses == 1 else 'ids'} got "
            "exception 10 or 11 from the gateway, which means no device responded behind "
            "the gateway; these ids are not listed"
        )
