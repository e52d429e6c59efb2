"""Serial line settings written as a URL query: baudrate, parity, stopbits, bytesize."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl

__all__ = ["PARITY_NAMES", "SerialSettings", "parse_serial_query"]

Parity = Literal["N", "E", "O"]

PARITY_NAMES: dict[str, Parity] = {
    "n": "N",
    "none": "N",
    "e": "E",
    "even": "E",
    "o": "O",
    "odd": "O",
}


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """Line settings of one serial port."""

    baudrate: int
    parity: Parity
    stopbits: int
    bytesize: int


def parse_serial_query(
    url: str,
    query: str,
    *,
    defaults: SerialSettings,
    baudrates: tuple[int, ...],
    protocol: str,
) -> SerialSettings:
    """Apply the settings of a URL query to `defaults`; raise ValueError naming the bad one.

    `protocol` names the URL kind in messages, such as "Modbus" or "WITS0".
    """
    allowed: dict[str, tuple[str, ...]] = {
        "baudrate": tuple(str(rate) for rate in baudrates),
        "parity": tuple(PARITY_NAMES),
        "stopbits": ("1", "2"),
        "bytesize": ("7", "8"),
    }
    values: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            msg = (
                f"unknown setting {key!r} in serial {protocol} URL {url!r}: "
                "expected baudrate, parity, stopbits or bytesize"
            )
            raise ValueError(msg)
        if value.lower() not in allowed[key]:
            choices = ", ".join(allowed[key])
            msg = (
                f"invalid {key} {value!r} in serial {protocol} URL {url!r}: "
                f"expected one of {choices}"
            )
            raise ValueError(msg)
        values[key] = value.lower()

    return SerialSettings(
        baudrate=int(values.get("baudrate", defaults.baudrate)),
        parity=PARITY_NAMES[values["parity"]] if "parity" in values else defaults.parity,
        stopbits=int(values.get("stopbits", defaults.stopbits)),
        bytesize=int(values.get("bytesize", defaults.bytesize)),
    )
