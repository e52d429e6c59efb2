"""WITS level 0 links: parsing of `serial://`, `tcp://` and `tcp-listen://` URLs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from drivers.serial_settings import SerialSettings, parse_serial_query

__all__ = ["WITS0_SERIAL_DEFAULTS", "LinkKind", "Wits0Link", "parse_wits0_url"]

LinkKind = Literal["serial", "tcp", "tcp-listen"]

# 9600 8N1 is the default of WITS level 0 senders and of open-source readers.
WITS0_SERIAL_DEFAULTS = SerialSettings(baudrate=9600, parity="N", stopbits=1, bytesize=8)
_BAUDRATES = (300, 600, 1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200, 230400)
_URL_FORMS = (
    '"serial:///dev/ttyS0?baudrate=9600&parity=N&stopbits=1&bytesize=8", '
    '"tcp://host:port" or "tcp-listen://0.0.0.0:port"'
)


@dataclass(frozen=True, slots=True)
class Wits0Link:
    """Endpoint of a WITS level 0 link: a serial port, a TCP server, or a TCP port to listen on."""

    kind: LinkKind
    host: str = ""
    """Host to connect to (`tcp`), or address to listen on (`tcp-listen`); "" for serial."""
    port: int = 0
    path: str = ""
    """Serial device path, such as /dev/ttyS0 or /dev/serial/by-id/..."""
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    bytesize: int = 8

    @property
    def is_serial(self) -> bool:
        """Whether the link is a serial port."""
        return self.kind == "serial"

    def describe(self) -> str:
        """Return the link as a log or CLI line shows it."""
        if self.is_serial:
            settings = f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"
            return f"serial://{self.path} ({settings})"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}"


def parse_wits0_url(url: str) -> Wits0Link:
    """Parse a WITS level 0 URL; raise ValueError naming the URL and the expected forms."""
    scheme = urlsplit(url).scheme
    if scheme == "serial":
        return _parse_serial(url)
    if scheme in ("tcp", "tcp-listen"):
        return _parse_tcp(url, "tcp" if scheme == "tcp" else "tcp-listen")
    msg = f"invalid WITS0 URL {url!r}: expected {_URL_FORMS}"
    raise ValueError(msg)


def _parse_tcp(url: str, kind: Literal["tcp", "tcp-listen"]) -> Wits0Link:
    parts = urlsplit(url)
    if not parts.hostname:
        example = "tcp-listen://0.0.0.0:5000" if kind == "tcp-listen" else "tcp://10.0.0.5:5000"
        msg = f'invalid WITS0 URL {url!r}: the host is missing; expected such as "{example}"'
        raise ValueError(msg)
    if parts.query or parts.path not in ("", "/"):
        msg = f"invalid WITS0 URL {url!r}: a {kind} URL takes only host and port"
        raise ValueError(msg)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if not port:
        # WITS has no standard TCP port, so the port must be written out.
        msg = f"invalid port in WITS0 URL {url!r}: expected a port number from 1 to 65535"
        raise ValueError(msg)
    return Wits0Link(kind=kind, host=parts.hostname, port=port)


def _parse_serial(url: str) -> Wits0Link:
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
        msg = (
            f"invalid serial WITS0 URL {url!r}: write the device path after serial:// "
            'with three slashes in all, such as "serial:///dev/ttyS0?baudrate=9600"'
        )
        raise ValueError(msg)
    settings = parse_serial_query(
        url, parts.query, defaults=WITS0_SERIAL_DEFAULTS, baudrates=_BAUDRATES, protocol="WITS0"
    )
    return Wits0Link(
        kind="serial",
        path=parts.path,
        baudrate=settings.baudrate,
        parity=settings.parity,
        stopbits=settings.stopbits,
        bytesize=settings.bytesize,
    )
