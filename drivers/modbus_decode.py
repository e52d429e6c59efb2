"""Convert between 16-bit Modbus registers and numbers, in any word and byte order.

pymodbus's own converters choose only the word order, so devices that swap
the two bytes inside each register (BADC, DCBA) need this module.

Orders, for a 32-bit value whose big-endian bytes are A B C D:

| layout | word_order | byte_order |
| --- | --- | --- |
| ABCD | big | big |
| CDAB | little | big |
| BADC | big | little |
| DCBA | little | little |

Word order "little" reverses every word of the value, so a 64-bit value
ABCDEFGH in word order "little" and byte order "big" is sent as GH EF CD AB.
On a one-register value word order has no effect, and byte order still
swaps its two bytes.

A bool in a register is one bit of the register's value as sent, bit 0
being the least significant. Word and byte order do not apply to it.

`decode_registers` decodes one value from its own registers and is the
reference. `value_struct` serves a faster path for whole responses: the
response is packed once into bytes, and each value is one `unpack_from`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from drivers.modbus_types import DATA_TYPES, DataType

__all__ = [
    "ORDERS",
    "apply_scale",
    "decode_registers",
    "encode_value",
    "engineering_value",
    "read_bit",
    "round_scaled",
    "shortest_float32",
    "unscale",
    "value_struct",
    "write_bit",
]

ORDERS = ("big", "little")
"""Values that `word_order` and `byte_order` accept."""

_REGISTER_MAX = 0xFFFF


def decode_registers(
    words: Sequence[int],
    type_name: str,
    word_order: str,
    byte_order: str,
    *,
    bit: int | None = None,
) -> int | float:
    """Decode the registers of one value.

    Returns an `int` for the integer types, 0 or 1 for bool (which needs
    `bit`, the bit of the register to read), and a `float` for float32 and
    float64 (NaN and infinities included). Raises ValueError on an unknown
    type or order, a register outside 0..65535, a wrong number of registers
    for the type, or a bool without a bit from 0 to 15.
    """
    data_type = _data_type(type_name)
    _check_orders(word_order, byte_order)
    if data_type.is_bit:
        _check_words(words, data_type)
        return read_bit(words[0], _bit_number(bit))
    _check_words(words, data_type)

    ordered = list(words)
    if word_order == "little":
        ordered.reverse()
    raw = b"".join(_word_bytes(word, byte_order) for word in ordered)
    value: int | float = struct.unpack(f">{data_type.struct_format}", raw)[0]
    return value


def value_struct(type_name: str, word_order: str, byte_order: str) -> tuple[struct.Struct, bool]:
    """Return the struct that reads one value from a packed response, and the buffer it reads.

    The response is packed in two ways: "plain", every register high byte
    first (`>H`) as sent, and "swapped", every register low byte first
    (`<H`). The second item is True when the value reads from the swapped
    buffer, at twice its register offset. A device with byte order "little"
    swapped the bytes of each register, and word order "little" reversed
    the registers. Reversing all the bytes of a value does both, and a
    little-endian read reverses all its bytes. So the read is little-endian
    when word order is "little", and it takes the swapped buffer when the
    two orders differ:

    | layout | word_order | byte_order | buffer | read |
    | --- | --- | --- | --- | --- |
    | ABCD | big | big | plain | big-endian |
    | DCBA | little | little | plain | little-endian |
    | BADC | big | little | swapped | big-endian |
    | CDAB | little | big | swapped | little-endian |

    A bool reads its whole register from the plain buffer, and the caller
    takes its bit. Raises ValueError on an unknown type or order, as
    `decode_registers` does.
    """
    data_type = _data_type(type_name)
    _check_orders(word_order, byte_order)
    if data_type.is_bit:
        return _VALUE_STRUCTS[">H"], False
    endian = "<" if word_order == "little" else ">"
    return _VALUE_STRUCTS[endian + data_type.struct_format], word_order != byte_order


_VALUE_STRUCTS = {
    endian + data_type.struct_format: struct.Struct(endian + data_type.struct_format)
    for data_type in DATA_TYPES.values()
    for endian in "<>"
}


def _check_words(words: Sequence[int], data_type: DataType) -> None:
    if len(words) != data_type.registers:
        msg = (
            f"{data_type.name} needs {data_type.registers} register(s), got {len(words)}: "
            f"pass exactly {data_type.registers} register value(s)"
        )
        raise ValueError(msg)
    for word in words:
        if not 0 <= word <= _REGISTER_MAX:
            msg = f"register value {word!r} is outside 0..65535"
            raise ValueError(msg)


def encode_value(
    value: float,
    type_name: str,
    word_order: str,
    byte_order: str,
    *,
    bit: int | None = None,
) -> list[int]:
    """Encode one value as the registers a device in the given order would hold.

    Integer types take an `int`, or a `float` with no fractional part. A
    bool (0 or 1) becomes a register with only `bit` set, or 0. Raises
    ValueError on an unknown type or order, a fractional value for an
    integer type, or a value out of the type's range.
    """
    data_type = _data_type(type_name)
    _check_orders(word_order, byte_order)
    if data_type.is_bit:
        if value not in (0, 1):
            msg = f"bool needs 0 or 1, got {value!r}"
            raise ValueError(msg)
        return [write_bit(0, _bit_number(bit), bool(value))]
    packed = _pack(value, data_type)

    words = [_word_from_bytes(packed[i : i + 2], byte_order) for i in range(0, len(packed), 2)]
    if word_order == "little":
        words.reverse()
    return words


def read_bit(word: int, bit: int) -> int:
    """Return bit `bit` (0 = least significant) of a 16-bit register value, as 0 or 1."""
    return (word >> _bit_number(bit)) & 1


def write_bit(word: int, bit: int, value: bool) -> int:
    """Return the register value with bit `bit` (0 = least significant) set to `value`."""
    mask = 1 << _bit_number(bit)
    return (word | mask) if value else (word & ~mask & _REGISTER_MAX)


def _bit_number(bit: int | None) -> int:
    if bit is None or not 0 <= bit <= 15:
        msg = f"invalid bit {bit!r}: a bool in a register needs a bit number from 0 to 15"
        raise ValueError(msg)
    return bit


def apply_scale(raw: float, scale: float, offset: float) -> float:
    """Convert a decoded register value to engineering units: `raw * scale + offset`."""
    return float(raw) * scale + offset


def engineering_value(raw: float, type_name: str, scale: float, offset: float) -> float:
    """Convert a decoded raw value to the engineering value that readings carry.

    A float32 becomes its shortest decimal first, and a scaled value loses
    the rounding noise of the multiplication; see `shortest_float32` and
    `round_scaled`.
    """
    if type_name == "float32":
        raw = shortest_float32(raw)
    value = apply_scale(raw, scale, offset)
    if scale != 1.0 or offset != 0.0:
        value = round_scaled(value)
    return value


_FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
_FLOAT32 = struct.Struct(">f")
_NORMAL_FORMATS = tuple(f"%.{digits}g" for digits in range(6, 10))
_ALL_FORMATS = tuple(f"%.{digits}g" for digits in range(1, 10))


def shortest_float32(value: float) -> float:
    """Return the float of the shortest decimal that a float32 reads back as the same value.

    A float32 register value widened to a double shows digits the device
    never had (3017.2 becomes 3017.199951171875). The shortest decimal with
    the same float32 bits is what the device's own display shows.
    """
    if not math.isfinite(value):
        return value
    pack = _FLOAT32.pack
    packed = pack(value)
    # Normal float32 values need 6 to 9 digits, and 6 digits of a value with
    # fewer already match, so the loop starts at 6. Subnormals (below about
    # 1.2e-38) may need fewer digits and take the full loop. "%.6g" % value
    # gives the same text as f"{value:.6g}", and is faster to run.
    formats = _NORMAL_FORMATS if abs(value) >= _FLOAT32_MIN_NORMAL else _ALL_FORMATS
    for decimal_format in formats:
        candidate = float(decimal_format % value)
        try:
            if pack(candidate) == packed:
                return candidate
        except OverflowError:
            # Rounded up past the largest float32, such as 3.403e38.
            continue
    return value


def round_scaled(value: float) -> float:
    """Drop the rounding noise that scaling leaves in the last bits of a value.

    `raw * scale + offset` in binary floating point can miss the decimal
    result by a bit or two (937 * 0.01 gives 9.370000000000001). The value
    rounded to 15 significant digits replaces it when the two are at most
    two units in the last place apart, so real digits are never lost.
    """
    if not math.isfinite(value) or value == 0:
        return value
    # Gives the same text as f"{value:.15g}", and is faster to run.
    rounded = float("%.15g" % value)  # noqa: UP031
    if abs(rounded - value) <= 2 * math.ulp(value):
        return rounded
    return value


def unscale(value: float, scale: float, offset: float) -> float:
    """Invert `apply_scale`: the raw value that reads back as `value`."""
    if scale == 0:
        msg = "scale 0 cannot be inverted: every raw value maps to the offset"
        raise ValueError(msg)
    return (value - offset) / scale


def _data_type(type_name: str) -> DataType:
    data_type = DATA_TYPES.get(type_name)
    if data_type is None:
        names = ", ".join(DATA_TYPES)
        msg = f"unknown Modbus type {type_name!r}: expected one of {names}"
        raise ValueError(msg)
    return data_type


def _check_orders(word_order: str, byte_order: str) -> None:
    for field, order in (("word_order", word_order), ("byte_order", byte_order)):
        if order not in ORDERS:
            msg = f'invalid {field} {order!r}: expected "big" or "little"'
            raise ValueError(msg)


def _pack(value: float, data_type: DataType) -> bytes:
    number: int | float = value
    if data_type.struct_format not in "fd" and isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            msg = f"{data_type.name} needs a whole number, got {value!r}"
            raise ValueError(msg)
        number = int(value)
    try:
        return struct.pack(f">{data_type.struct_format}", number)
    except (struct.error, OverflowError) as exc:
        msg = f"{value!r} does not fit in {data_type.name}: {exc}"
        raise ValueError(msg) from exc


def _word_bytes(word: int, byte_order: str) -> bytes:
    high, low = word >> 8, word & 0xFF
    return bytes((low, high)) if byte_order == "little" else bytes((high, low))


def _word_from_bytes(pair: bytes, byte_order: str) -> int:
    first, second = pair[0], pair[1]
    if byte_order == "little":
        return (second << 8) | first
    return (first << 8) | second
