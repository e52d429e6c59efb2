"""The Modbus data-type table: one entry per config `type`, used by validation and decoding."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATA_TYPES", "REGISTER_TABLES", "DataType"]


@dataclass(frozen=True, slots=True)
class DataType:
    """How a config `type` maps onto 16-bit registers."""

    name: str
    registers: int
    """Number of 16-bit registers the value spans."""
    struct_format: str
    """`struct` format character for the big-endian byte string of the value."""


DATA_TYPES: dict[str, DataType] = {
    t.name: t
    for t in (
        DataType("int16", 1, "h"),
        DataType("uint16", 1, "H"),
        DataType("int32", 2, "i"),
        DataType("uint32", 2, "I"),
        DataType("int64", 4, "q"),
        DataType("uint64", 4, "Q"),
        DataType("float32", 2, "f"),
        DataType("float64", 4, "d"),
    )
}

REGISTER_TABLES = ("holding", "input")
"""Tables that hold 16-bit registers."""
