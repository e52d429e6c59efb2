"""Modbus endpoints: parsing of `tcp://`, `rtu://` and `rtu+tcp://` URLs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

from drivers.serial_settings import SerialSettings, parse_serial_query

__all__ = ["SERIAL_DEFAULTS", "Endpoint", "ModbusClient", "make_client", "parse_modbus_url"]

ModbusClient = AsyncModbusTcpClient | AsyncModbusSerialClient

EndpointKind = Literal["tcp", "rtu", "rtu+tcp"]

SERIAL_DEFAULTS = SerialSettings(baudrate=19200, parity="N", stopbits=1, bytesize=8)
_BAUDRATES = (1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200, 230400)
_URL_FORMS = (
    '"tcp://host:502", "rtu+tcp://host:4001" or '
    '"rtu:///dev/ttyUSB0?baudrate=19200&parity=E&stopbits=1&bytesize=8"'
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Address of a Modbus device: a TCP host and port or a serial port, and the framing."""

    kind: EndpointKind
    host: str = ""
    port: int = 502
    path: str = ""
    """Serial device path for `rtu`, such as /dev/ttyUSB0 or /dev/serial/by-id/..."""
    baudrate: int = 19200
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    bytesize: int = 8

    @property
    def is_serial(self) -> bool:
        return self.kind == "rtu"

    @property
    def bus_key(self) -> str:
        """Identity of the shared bus: devices with the same key share one client and lock."""
        if self.is_serial:
            return f"rtu://{self.path}"
        return f"{self.kind}://{self.host}:{self.port}"

    def describe(self) -> str:
        """Return the endpoint as a log or CLI line shows it."""
        if self.is_serial:
            settings = f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"
            return f"rtu://{self.path} ({settings})"
        return self.bus_key


def parse_modbus_url(url: str) -> Endpoint:
    """Parse a Modbus URL; raise ValueError naming the URL and the expected forms."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        return _parse_tcp(url, "tcp")
    if parts.scheme == "rtu+tcp":
        return _parse_tcp(url, "rtu+tcp")
    if parts.scheme == "rtu":
        return _parse_serial(url)
    msg = f"invalid Modbus URL {url!r}: expected {_URL_FORMS}"
    raise ValueError(msg)


def _parse_tcp(url: str, kind: Literal["tcp", "rtu+tcp"]) -> Endpoint:
    parts = urlsplit(url)
    if not parts.hostname:
        msg = f"invalid Modbus URL {url!r}: the host is missing; expected {_URL_FORMS}"
        raise ValueError(msg)
    if parts.query or parts.path not in ("", "/"):
        msg = f"invalid Modbus URL {url!r}: a TCP URL takes only host and port"
        raise ValueError(msg)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port == -1 or port == 0:
        msg = f"invalid port in Modbus URL {url!r}: expected a number from 1 to 65535"
        raise ValueError(msg)
    return Endpoint(kind=kind, host=parts.hostname, port=port or 502)


def _parse_serial(url: str) -> Endpoint:
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
        msg = (
            f"invalid serial Modbus URL {url!r}: write the device path after rtu:// "
            'with three slashes in all, such as "rtu:///dev/ttyUSB0?baudrate=19200"'
        )
        raise ValueError(msg)
    settings = parse_serial_query(
        url, parts.query, defaults=SERIAL_DEFAULTS, baudrates=_BAUDRATES, protocol="Modbus"
    )
    return Endpoint(
        kind="rtu",
        path=parts.path,
        baudrate=settings.baudrate,
        parity=settings.parity,
        stopbits=settings.stopbits,
        bytesize=settings.bytesize,
    )


def make_client(endpoint: Endpoint, timeout: float, name: str = "rig-agent") -> ModbusClient:
    """Create an unconnected pymodbus client for the endpoint.

    Library retries and reconnects are off (`retries=0`, `reconnect_delay=0`):
    with the pymodbus defaults a dead device costs (retries + 1) x timeout per
    request, and the callers apply their own timeouts and backoff.
    """
    if endpoint.is_serial:
        return AsyncModbusSerialClient(
            endpoint.path,
            framer=FramerType.RTU,
            baudrate=endpoint.baudrate,
            bytesize=endpoint.bytesize,
            parity=endpoint.parity,
            stopbits=endpoint.stopbits,
            name=name,
            timeout=timeout,
            retries=0,
            reconnect_delay=0,
        )
    framer = FramerType.RTU if endpoint.kind == "rtu+tcp" else FramerType.SOCKET
    return AsyncModbusTcpClient(
        endpoint.host,
        port=endpoint.port,
        framer=framer,
        name=name,
        timeout=timeout,
        retries=0,
        reconnect_delay=0,
    )
