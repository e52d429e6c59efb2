"""Modbus tables, data types, order names and address notations, shared by config and drivers.

One table of data types (`DATA_TYPES`) drives both the config validation
(which tables a type may be read from, how many registers it spans, whether
word and byte order apply) and the decoding (its `struct` format).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BIT_TABLES",
    "DATA_TYPES",
    "MAX_READ_BITS",
    "MAX_READ_REGISTERS",
    "ORDER_NAMES",
    "REGISTER_TABLES",
    "TABLES",
    "DataType",
    "ModiconAddress",
    "RegisterTable",
    "TableName",
    "fold_order",
    "modicon_from_integer",
    "order_name",
    "parse_modicon",
]

TableName = Literal["holding", "input", "coil", "discrete"]

MAX_READ_REGISTERS = 125
"""Protocol limit for one read of holding or input registers (function codes 3 and 4)."""

MAX_READ_BITS = 2000
"""Protocol limit for one read of coils or discrete inputs (function codes 1 and 2)."""


@dataclass(frozen=True, slots=True)
class RegisterTable:
    """One of the four Modbus data tables."""

    name: TableName
    function_code: int
    """Function code of a read of this table."""
    is_bits: bool
    """Whether the table contains single bits (coils, discrete inputs), not 16-bit registers."""
    modicon_digit: int
    """Leading digit of the table in Modicon notation: 0 coil, 1 discrete, 3 input, 4 holding."""
    max_per_read: int
    """Most registers or bits that one read of this table may return."""

    @property
    def unit_name(self) -> str:
        """What one address of the table holds: "register" or "bit"."""
        return "bit" if self.is_bits else "register"


TABLES: dict[str, RegisterTable] = {
    table.name: table
    for table in (
        RegisterTable("holding", 3, False, 4, MAX_READ_REGISTERS),
        RegisterTable("input", 4, False, 3, MAX_READ_REGISTERS),
        RegisterTable("coil", 1, True, 0, MAX_READ_BITS),
        RegisterTable("discrete", 2, True, 1, MAX_READ_BITS),
    )
}
"""Every table by its config name, in the order requests are planned."""

REGISTER_TABLES = ("holding", "input")
"""Tables that hold 16-bit registers."""

BIT_TABLES = ("coil", "discrete")
"""Tables that hold single bits."""


@dataclass(frozen=True, slots=True)
class DataType:
    """The layout of a config `type` in the Modbus tables."""

    name: str
    registers: int
    """Number of 16-bit registers the value spans. For bool, the register that contains the bit."""
    struct_format: str
    """`struct` format character of the big-endian byte string of the registers."""
    tables: tuple[TableName, ...]
    """Tables the type may be read from."""
    ordered: bool
    """Whether word_order and byte_order apply. A bit has no byte or word order."""

    @property
    def is_bit(self) -> bool:
        """Whether the value is a single bit (a coil, a discrete input or a bit in a register)."""
        return self.name == "bool"

    @property
    def is_float(self) -> bool:
        """Whether the value is an IEEE 754 float, which may decode to NaN or infinity."""
        return self.struct_format in ("f", "d")

    @property
    def int_range(self) -> tuple[int, int] | None:
        """Smallest and largest value of an integer type, or None for floats and bool."""
        if self.is_float or self.is_bit:
            return None
        bits = 16 * self.registers
        if self.struct_format.islower():
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return 0, 2**bits - 1


_ALL_TABLES: tuple[TableName, ...] = ("holding", "input", "coil", "discrete")
_REGISTERS: tuple[TableName, ...] = ("holding", "input")

DATA_TYPES: dict[str, DataType] = {
    data_type.name: data_type
    for data_type in (
        DataType("int16", 1, "h", _REGISTERS, ordered=True),
        DataType("uint16", 1, "H", _REGISTERS, ordered=True),
        DataType("int32", 2, "i", _REGISTERS, ordered=True),
        DataType("uint32", 2, "I", _REGISTERS, ordered=True),
        DataType("int64", 4, "q", _REGISTERS, ordered=True),
        DataType("uint64", 4, "Q", _REGISTERS, ordered=True),
        DataType("float32", 2, "f", _REGISTERS, ordered=True),
        DataType("float64", 4, "d", _REGISTERS, ordered=True),
        DataType("bool", 1, "H", _ALL_TABLES, ordered=False),
    )
}
"""Every config `type` by name."""


# --- Word and byte order ----------------------------------------------------

ORDER_NAMES: dict[str, tuple[str, str]] = {
    "ABCD": ("big", "big"),
    "CDAB": ("little", "big"),
    "BADC": ("big", "little"),
    "DCBA": ("little", "little"),
}
"""The four-letter layout names and the (word_order, byte_order) each stands for.

A, B, C and D are the bytes of a 32-bit value from the most significant
down, and the name lists them in the order the device sends them.
"""


def fold_order(
    order: str | None, word_order: str | None, byte_order: str | None
) -> tuple[str, str]:
    """Return the canonical (word_order, byte_order) from a layout name and the two orders.

    `order` is one of ABCD, CDAB, BADC, DCBA in any case. A word_order or
    byte_order given next to it must agree with it. Orders left out are
    "big". Raises ValueError on an unknown name or a conflict.
    """
    if order is None:
        return word_order or "big", byte_order or "big"
    folded = ORDER_NAMES.get(order.strip().upper())
    if folded is None:
        names = ", ".join(ORDER_NAMES)
        msg = f"unknown order {order!r}: expected one of {names}"
        raise ValueError(msg)
    name = order.strip().upper()
    for key, given, implied in (
        ("word_order", word_order, folded[0]),
        ("byte_order", byte_order, folded[1]),
    ):
        if given is not None and given != implied:
            msg = (
                f'order "{name}" means {key} = "{implied}", but {key} = "{given}" is also '
                f"given: keep either order or {key}"
            )
            raise ValueError(msg)
    return folded


def order_name(word_order: str, byte_order: str) -> str:
    """Return the four-letter layout name (ABCD, CDAB, BADC or DCBA) of a pair of orders."""
    for name, orders in ORDER_NAMES.items():
        if orders == (word_order, byte_order):
            return name
    msg = f'invalid orders {word_order!r}, {byte_order!r}: expected "big" or "little" for each'
    raise ValueError(msg)


# --- Modicon address notation -----------------------------------------------

_MODICON_DIGITS: dict[int, TableName] = {t.modicon_digit: t.name for t in TABLES.values()}

# A table digit, then the 1-based number: four or five digits ("40101",
# "400101"), or after an "x" one to five digits ("4x0101", "4x101").
_MODICON_PATTERN = re.compile(r"^\s*([0134])(?:[xX](\d{1,5})|(\d{4,5}))\s*$")


@dataclass(frozen=True, slots=True)
class ModiconAddress:
    """An address written in Modicon notation, such as 40101, converted to table and offset."""

    table: TableName
    address: int
    """0-based protocol address."""
    written: str | int
    """The address as the config file wrote it."""

    @property
    def notation(self) -> str:
        """The notation's name, such as "4xxxx"."""
        return f"{TABLES[self.table].modicon_digit}xxxx"


def parse_modicon(text: str) -> ModiconAddress:
    """Convert a Modicon address string such as "40101", "400101" or "4x0101".

    The leading digit names the table (0 coil, 1 discrete input, 3 input
    register, 4 holding register) and the rest is the 1-based number, so
    "40101" is holding address 100. Raises ValueError on any other string.
    """
    match = _MODICON_PATTERN.match(text)
    if match is None:
        msg = (
            f"invalid address {text!r}: a quoted address must be in Modicon notation, "
            'such as "40101", "400101" or "4x0101" (0 coil, 1 discrete input, '
            "3 input register, 4 holding register); write a 0-based address as a plain number"
        )
        raise ValueError(msg)
    table = _MODICON_DIGITS[int(match.group(1))]
    number = int(match.group(2) or match.group(3))
    if not 1 <= number <= 65536:
        msg = (
            f"invalid address {text!r}: the number after the table digit is 1-based, "
            "from 1 to 65536"
        )
        raise ValueError(msg)
    return ModiconAddress(table, number - 1, text)


def modicon_from_integer(value: int) -> ModiconAddress | None:
    """Convert an integer that only makes sense as a Modicon input or holding address.

    30001..39999 and 40001..49999 (and the six-digit 300001..365536 and
    400001..465536) name input and holding registers. Any other integer is
    not converted and None is returned. Callers convert only when the config
    does not name a table, so that a written table keeps plain addresses.
    """
    for digits, factor in ((5, 10_000), (6, 100_000)):
        table_digit, number = divmod(value, factor)
        limit = 9999 if digits == 5 else 65536
        if table_digit in (3, 4) and 1 <= number <= limit:
            return ModiconAddress(_MODICON_DIGITS[table_digit], number - 1, value)
    return None
